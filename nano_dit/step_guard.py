"""A non-finite step never reaches the weights, the optimizer's moments or the EMA, and deciding
so costs no host sync.

The trainer computes `finite = isfinite(grad_norm) & isfinite(loss)` as a 0-d bool tensor on the
device and hands it to the two functions here, which apply the update where it is true and leave
everything exactly as it was where it is false, without reading it back:

- the optimizer: fused AdamW takes a `found_inf` tensor (the way `torch.amp.GradScaler` skips an
  overflowing step) and then updates neither the weights nor its moments nor its step count;
- the EMA: diffusers' `EMAModel.step` moves each shadow weight toward its target, `lerp(shadow,
  weight, finite)`: the new weight on a finite step, the shadow weight itself on a skipped one, so
  that it stays bit for bit.

The learning-rate schedule and the EMA's warmup count advance on every step, skipped or not: they
live on the host, and reading `finite` to decide would be the very sync this avoids.
"""

from __future__ import annotations

import torch


def optimizer_step(optimizer, finite: torch.Tensor, scaler=None) -> None:
    """`optimizer.step()` where `finite` (0-d bool, on the device) is true; where false, the weights
    and the optimizer's state stay as they were. `scaler`: fp16's GradScaler (`accelerator.scaler`),
    which then decides itself."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the optimizer
    if scaler is not None:  # fp16: the scaler's own found_inf covers non-finite gradients
        optimizer.step()
    elif getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = (~finite).to(torch.float32)  # read by the fused kernel, on the device
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif bool(finite):  # the one host sync, for optimizers with no device-side skip (bitsandbytes)
        optimizer.step()


@torch.no_grad()
def ema_step(ema, params: list[torch.Tensor], finite: torch.Tensor) -> None:
    """`ema.step(params)` where `finite` is true; where false, each shadow weight moves toward
    itself and so stays as it was. The same arithmetic as `EMAModel.step` on a finite step."""
    weight = finite.to(torch.float32)
    try:  # one multi-tensor kernel: lerp(s, p, 1) is p and lerp(s, p, 0) is s, exactly
        targets = torch._foreach_lerp(ema.shadow_params, params, weight)
    except (TypeError, RuntimeError):  # a torch whose foreach lerp takes no tensor weight
        targets = [torch.lerp(s, p, weight) for s, p in zip(ema.shadow_params, params, strict=True)]
    for target, p in zip(targets, params):
        target.requires_grad_(p.requires_grad)  # EMAModel averages what requires grad, copies the rest
    ema.step(targets)
