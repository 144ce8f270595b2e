"""Rectified-flow (flow-matching) training objective.

The math, in the convention of diffusers' `FlowMatchEulerDiscreteScheduler`:

    x_σ = (1 − σ)·x0 + σ·ε,         σ ∈ [0, 1], ε ~ N(0, I)      (σ = 0: data, σ = 1: noise)
    v   = dx_σ/dσ = ε − x0                                        (what the model predicts)
    L   = E‖v_θ(x_σ, σ·1000, c) − (ε − x0)‖²

Sampling integrates dx/dσ = v from σ = 1 down to 0; the scheduler's `step` does
`x ← x + (σ_next − σ)·v`, so a perfect v lands exactly on x0.

σ is drawn through diffusers' `compute_density_for_timestep_sampling` ("uniform", "logit_normal",
"mode"; SD3, Esser et al. 2024, §3.1) and optionally shifted towards noise with
`σ' = s·σ / (1 + (s − 1)·σ)` (SD3 eq. 23, the scheduler's own static shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

TIMESTEP_SCALE = 1000.0  # the model and the scheduler see timestep = σ·1000

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift: `s·σ / (1 + (s − 1)·σ)`; shift > 1 spends more steps near noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, with σ of shape (B,) broadcast over the other dimensions."""
    sigmas = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # (B, 1, 1, 1)
    return (1 - sigmas) * x0 + sigmas * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0: the direction from data to noise, constant along the straight path."""
    return noise - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, (B,), computed in fp32 whatever the autocast dtype."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class FlowMatchingLoss:
    loss: torch.Tensor  # () mean over the batch: what to backpropagate
    per_sample: torch.Tensor  # (B,) detached, for loss-by-σ logging
    sigmas: torch.Tensor  # (B,)


@dataclass
class FlowMatching:
    """σ sampling and the velocity loss.

    Args:
        weighting_scheme: how σ is drawn: "uniform", "logit_normal" (SD3's default) or "mode".
        logit_mean, logit_std: location and scale of the logit-normal density.
        mode_scale: scale of the "mode" density (SD3 uses 1.29).
        shift: SD3 time shift applied after sampling; 1.0 leaves σ as drawn.
    """

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def sample_sigmas(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(batch_size,) noise levels σ in [0, 1]."""
        u = compute_density_for_timestep_sampling(
            weighting_scheme="none" if self.weighting_scheme == "uniform" else self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
            generator=generator,
        )
        return shift_sigmas(u, self.shift) if self.shift != 1.0 else u

    def loss(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        noise: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **conditioning,
    ) -> FlowMatchingLoss:
        """Noise `x0` (B, C, H, W), run `model`, and return the velocity loss.

        `conditioning` goes to the model as keyword arguments (`encoder_hidden_states`,
        `image_embeds`, `drop_text`, ...). `noise` and `sigmas` are drawn when not given. Whatever
        the dtype of `x0` and `noise`, x_σ and the target are fp32.
        """
        B = x0.shape[0]
        # Noise, interpolation and target in fp32 whatever the features' dtype (a bf16 x0 would
        # round x_t and the target to 8 mantissa bits); the model casts x_t at its door.
        x0 = x0.float()
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32, generator=generator)
        noise = noise.float()
        if sigmas is None:
            sigmas = self.sample_sigmas(B, device=x0.device, generator=generator)
        sigmas = sigmas.float()
        x_t = add_noise(x0, noise, sigmas)  # (B, C, H, W) fp32
        pred = model(x_t, sigmas * TIMESTEP_SCALE, **conditioning).sample
        per_sample = per_sample_mse(pred, velocity_target(x0, noise))  # (B,)
        return FlowMatchingLoss(loss=per_sample.mean(), per_sample=per_sample.detach(), sigmas=sigmas)


def loss_by_sigma_bin(
    per_sample: torch.Tensor, sigmas: torch.Tensor, num_bins: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of per-sample losses in `num_bins` equal σ bins over [0, 1].

    Returns two (num_bins,) tensors on the losses' device; the trainer adds them up between
    logging steps and divides there, so nothing here syncs with the host.
    """
    bins = (sigmas.detach().float() * num_bins).long().clamp_(0, num_bins - 1)  # (B,)
    sums = torch.zeros(num_bins, device=per_sample.device).index_add_(0, bins, per_sample.detach().float())
    counts = torch.zeros(num_bins, device=per_sample.device).index_add_(0, bins, torch.ones_like(sums[bins]))
    return sums, counts


class LossBySigma:
    """The mean loss per σ bin since it was last read, summed on the device (nothing read back
    until `read`): the tracker's `loss_sigma_<lo>-<hi>` curves."""

    def __init__(self, num_bins: int, device: torch.device | str):
        self.num_bins = num_bins
        self.names = [f"loss_sigma_{i / num_bins:.2f}-{(i + 1) / num_bins:.2f}" for i in range(num_bins)]
        self.sums = torch.zeros(num_bins, device=device)
        self.counts = torch.zeros(num_bins, device=device)

    def add(self, per_sample: torch.Tensor, sigmas: torch.Tensor) -> None:
        sums, counts = loss_by_sigma_bin(per_sample, sigmas, self.num_bins)
        self.sums, self.counts = self.sums + sums, self.counts + counts

    def read(self) -> dict[str, float]:
        """The mean loss per bin since the last read (0 in a bin no sample fell in); then afresh."""
        means = (self.sums / self.counts.clamp(min=1)).tolist()
        self.sums, self.counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        return dict(zip(self.names, means))
