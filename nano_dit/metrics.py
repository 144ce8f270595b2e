"""The image metrics of validation: ST-LPIPS, LPIPS, PSNR and SSIM between image batches.

ST-LPIPS (shift-tolerant LPIPS on an anti-aliased AlexNet, `nano_dit.perceptual`) works offline
from the weights its wheel ships, and is the distance behind "closer to" and the sensitivities.
LPIPS (the `lpips` package) needs torchvision's AlexNet weights, downloaded once: where they are
neither cached nor reachable, its figures are null with the reason, never made up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from .offline import network_attempt, unreachable
from .perceptual import ShiftTolerantLPIPS

logger = logging.getLogger(__name__)


class ImageMetrics:
    """ST-LPIPS, LPIPS, PSNR and SSIM between image batches `(N, 3, H, W)` in [0, 1].

    ST-LPIPS (shift-tolerant LPIPS on an anti-aliased AlexNet, `nano_dit.perceptual`) is always
    there: its pretrained weights come with the `stlpips-pytorch` wheel, so it works offline, and it
    is the distance behind "closer to" and the sensitivities. LPIPS (the `lpips` package) needs
    torchvision's AlexNet weights, downloaded once: without them and without a network, its figures
    are null with the reason, never made up.

    Args:
        backbone: LPIPS's AlexNet: "pretrained" (torchvision's weights, cached or fetched once),
            "random" (randomly initialised: for tests, never for a verdict) or "none".
    """

    distance_name = "stlpips"  # what decides "closer to" and the sensitivities

    def __init__(self, device="cpu", backbone: str = "pretrained", chunk: int = 32):
        if backbone not in ("pretrained", "random", "none"):
            raise ValueError(f"LPIPS backbone must be 'pretrained', 'random' or 'none', got {backbone!r}")
        self.device, self.chunk, self.backbone = torch.device(device), chunk, backbone
        self.stlpips_model = ShiftTolerantLPIPS.from_pretrained(device=self.device)
        self.lpips_model, self.lpips_reason = _load_lpips(backbone, self.device)

    @property
    def describe(self) -> dict:
        if self.lpips_model is None:
            return {"available": False, "reason": self.lpips_reason}
        backbone = "AlexNet, torchvision weights" if self.backbone == "pretrained" else "AlexNet, RANDOM weights"
        return {"available": True, "backbone": backbone}

    def lpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Per-image LPIPS on the metric's device, `chunk` images per call; None without a backbone."""
        if self.lpips_model is None:
            return None
        return self._batched(lambda a, b: self.lpips_model(*_perceptual_inputs(a, b)), x, y)

    def stlpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image ST-LPIPS, as `lpips`."""
        return self._batched(lambda a, b: self.stlpips_model(*_perceptual_inputs(a, b)), x, y)

    @torch.inference_mode()
    def _batched(self, fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`fn` over matching chunks of `x` and `y`, moved to the device in fp32; per image, on the CPU."""
        parts = []
        for i in range(0, len(x), self.chunk):
            a, b = (t[i : i + self.chunk].to(self.device, torch.float32, non_blocking=True) for t in (x, y))
            parts.append(fn(a, b).flatten().cpu())
        return torch.cat(parts)

    @staticmethod
    def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.float() - y.float()).pow(2).flatten(1).mean(1)

    @classmethod
    def psnr(cls, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 10 * torch.log10(1.0 / cls.mse(x, y).clamp(min=1e-10))

    def ssim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image SSIM (torchmetrics, Gaussian window), on the metric's device in chunks."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        return self._batched(
            lambda a, b: structural_similarity_index_measure(a, b, data_range=1.0, reduction="none"), x, y
        )

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.stlpips(x, y)

    def compare(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float] | None]:
        """Per-image ST-LPIPS, LPIPS (or None), PSNR and SSIM."""
        lp = self.lpips(x, y)
        return {
            "stlpips": self.stlpips(x, y).tolist(),
            "lpips": None if lp is None else lp.tolist(),
            "psnr": self.psnr(x, y).tolist(),
            "ssim": self.ssim(x, y).tolist(),
        }


def _perceptual_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] images as the LPIPS networks take them: in [−1, 1], and at least 64 px on the short
    side (AlexNet's strides leave next to nothing of smaller images; the demo's are 32²)."""
    if min(x.shape[-2:]) < 64:
        size = (64 * x.shape[-2] // min(x.shape[-2:]), 64 * x.shape[-1] // min(x.shape[-2:]))
        x, y = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (x, y))
    return x * 2 - 1, y * 2 - 1


def _alexnet_url() -> str:
    """Where torchvision downloads the AlexNet ImageNet weights LPIPS uses."""
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.IMAGENET1K_V1.url


def alexnet_weights_path() -> Path:
    """Where torchvision keeps AlexNet's ImageNet weights once downloaded (torch.hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_alexnet_url()).name


def _load_lpips(backbone: str, device: torch.device):
    """(LPIPS AlexNet network or None, why not). Fetches the AlexNet weights at most once per
    process, and not at all when offline (`nano_dit.offline`)."""
    if backbone == "none":
        return None, "LPIPS switched off"
    import warnings

    import lpips

    weights, host = alexnet_weights_path(), urlparse(_alexnet_url()).netloc
    if backbone == "pretrained" and not weights.exists() and unreachable(host):
        return None, f"AlexNet weights for LPIPS are not cached ({weights}) and this process is offline"
    try:
        # "random": the same random network in every process and run (seeded, the caller's numbers kept)
        with warnings.catch_warnings(), network_attempt(host), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # torchvision's deprecation notes about lpips' call
            torch.manual_seed(0)
            model = lpips.LPIPS(net="alex", pnet_rand=backbone == "random", verbose=False)
    except OSError as err:  # no cached weights and no network: decide without LPIPS, saying so
        reason = f"AlexNet weights for LPIPS are not cached and could not be fetched ({err})"
        logger.warning("LPIPS unavailable: %s; ST-LPIPS decides", reason)
        return None, reason
    return model.to(device).eval().requires_grad_(False), None
