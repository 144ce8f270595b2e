"""Shift-tolerant LPIPS (ST-LPIPS): a perceptual distance that a one-pixel shift barely moves.

LPIPS (Zhang et al., 2018) compares unit-normalised AlexNet features of two images through learned
per-channel weights. Plain AlexNet subsamples with strides and max-pools, so its features alias: shift
an image by one pixel and LPIPS reports a sizeable difference that no viewer sees. ST-LPIPS retrains
the same metric on an anti-aliased AlexNet: the first convolution runs at stride 1, every subsampling
is a binomial blur followed by stride 2 ("blur-pool", Zhang 2019), and the blur pads by reflection,
wider than it needs to. That makes it a fairer yardstick for generated samples, whose content is not
aligned pixel for pixel with any reference.

    Abhijay Ghildyal and Feng Liu. Shift-tolerant Perceptual Similarity Metric. ECCV 2022.
    https://arxiv.org/abs/2207.13686, https://github.com/abhijay9/ShiftTolerant-LPIPS

Licence: BSD 2-Clause, Copyright (c) 2022 Abhijay Ghildyal, Feng Liu. The pretrained weights (backbone
and linear layers, 2,470,848 parameters) are the ones the `stlpips-pytorch` wheel ships, read from
where pip installed it; they are not copied into this repository.

Why not `from stlpips_pytorch import stlpips`: its modules import IPython and torchsummary at import
time (debugging leftovers), which this project does not depend on. So the network is rebuilt here,
layer for layer as `stlpips.LPIPS(net="alex", variant="shift_tolerant")` builds it with its defaults
(blur filter size 3, `version="0.1"` input scaling, `spatial=False`, `normalize=False`), and gives the
same numbers (tests/test_perceptual.py checks them against ones the package computed).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "alex_shift_tolerant.pth"
_WEIGHTS_SUBDIR = ("weights", "vST0.0")

# The smallest height and width the network accepts: below it, the third blur-pool gets a map of 2 px
# or less, and torch refuses a reflection pad (2 px) not smaller than its input. The package has the same limit and does not
# resize either, so smaller images must be upsampled by the caller.
MIN_SIZE = 21

# Feature channels of the five tapped layers; one linear (1x1 conv) weight vector per layer.
_CHANNELS = (64, 192, 384, 256, 256)
# Index in `features` of the ReLU whose output each layer taps (the package's slice boundaries).
_TAPS = (2, 6, 10, 12, 14)

# Checkpoint key -> our key. The package splits the layer stack into five `net.slice*` Sequentials
# that keep the global layer index, wraps each linear conv as `lin*.model.1` (model.0 is a Dropout,
# identity in eval and without weights), and keeps the input scaling in a `scaling_layer` module.
_CHECKPOINT_KEY_RULES = (
    (r"^net\.slice\d\.(\d+)\.", r"features.\1."),
    (r"^lin(\d)\.model\.1\.", r"lins.\1."),
    (r"^scaling_layer\.", ""),
)


def stlpips_weights_path() -> Path:
    """The ST-LPIPS AlexNet weights inside the installed `stlpips-pytorch` distribution.

    `find_spec` on a top-level name locates the package without executing it, so nothing of it is imported.
    """
    spec = importlib.util.find_spec("stlpips_pytorch")
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or []:
        path = Path(folder).joinpath(*_WEIGHTS_SUBDIR, WEIGHTS_FILE)
        if path.is_file():
            return path
    where = "is not installed" if spec is None else "is installed but holds no such file"
    raise FileNotFoundError(
        f"ST-LPIPS weights {'/'.join((*_WEIGHTS_SUBDIR, WEIGHTS_FILE))} not found: stlpips-pytorch {where} "
        "(pip install stlpips-pytorch)"
    )


class _BlurPool(nn.Module):
    """Binomial blur, then keep every second pixel: subsampling without aliasing.

    Padding is `size - 1` per side (the package's `pad_more`), by reflection, so the output is a little
    larger than a plain stride-2 step gives: (H + size - 2) // 2 + 1.
    """

    def __init__(self, channels: int, size: int = 3):
        super().__init__()
        row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float32)
        kernel = row[:, None] * row[None, :]
        # One depthwise copy per channel; persistent, because the checkpoint stores it (as `filt`).
        self.register_buffer("filt", (kernel / kernel.sum()).expand(channels, 1, size, size).contiguous())
        self.pad = size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return F.conv2d(x, self.filt, stride=2, groups=x.shape[1])


class ShiftTolerantLPIPS(nn.Module):
    """ST-LPIPS distance with the AlexNet backbone; build it with `from_pretrained`.

    `forward(x, y)` takes two batches (N, 3, H, W) in [-1, 1], H and W at least `MIN_SIZE`, and returns
    (N,) distances (0 for identical images). The weights are frozen, but gradients flow to the inputs.
    """

    def __init__(self):
        super().__init__()
        # LPIPS v0.1 maps [-1, 1] inputs to roughly ImageNet-standardised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        # Shapes for a 64x64 input. Every subsampling of AlexNet (conv stride 4, max-pool stride 2) is
        # split into a dense step (stride 1) and a blur-pool.
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=1, padding=2),  # 0: (N, 64, 58, 58)
            _BlurPool(64),  # 1: (N, 64, 30, 30); blurred before the ReLU, as the weights were trained
            nn.ReLU(),  # 2: tap 1
            nn.MaxPool2d(kernel_size=3, stride=1),  # 3: (N, 64, 28, 28)
            _BlurPool(64),  # 4: (N, 64, 15, 15)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 5: (N, 192, 15, 15)
            nn.ReLU(),  # 6: tap 2
            nn.MaxPool2d(kernel_size=3, stride=1),  # 7: (N, 192, 13, 13)
            _BlurPool(192),  # 8: (N, 192, 8, 8)
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 9: (N, 384, 8, 8)
            nn.ReLU(),  # 10: tap 3
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 11: (N, 256, 8, 8)
            nn.ReLU(),  # 12: tap 4
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 13: (N, 256, 8, 8)
            nn.ReLU(),  # 14: tap 5 (AlexNet's last max-pool would come next; LPIPS never uses it)
        )
        # How much each channel's squared feature difference counts: learned on human judgements.
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
    ) -> ShiftTolerantLPIPS:
        """The network with the shipped weights (default: `stlpips_weights_path()`), frozen, in eval mode."""
        state = torch.load(stlpips_weights_path() if path is None else path, map_location="cpu", weights_only=True)
        model = cls()
        model.load_state_dict({_our_key(k): v for k, v in state.items()}, strict=True)
        return model.to(device).eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected two (N, 3, H, W) batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {tuple(x.shape[-2:])}")
        distance = 0
        for lin, fx, fy in zip(self.lins, self._features(x), self._features(y)):
            per_pixel = lin((fx - fy).square())  # (N, C, h, w) -> (N, 1, h, w)
            distance = distance + per_pixel.mean(dim=(2, 3))  # (N, 1)
        return distance[:, 0]  # (N,)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations of `x`, each scaled to unit length along the channels."""
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                # Unit length, so that each layer compares feature directions, not activation scale.
                taps.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps


def _our_key(checkpoint_key: str) -> str:
    for pattern, replacement in _CHECKPOINT_KEY_RULES:
        checkpoint_key = re.sub(pattern, replacement, checkpoint_key)
    return checkpoint_key
