"""Training configuration, presets and the helpers `train_nano_dit.py` is built from."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

# --------------------------------------------------------------------------------------------
# Presets: the one table of model sizes and run lengths (DESIGN.md, "Presets").
# --------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # The seed's validation run: 100 images at 512², Flux VAE latents, one 24 GB GPU.
    "nano": {
        "model": {"num_layers": 12, "hidden_size": 384, "num_attention_heads": 6, "patch_size": 2, "in_channels": 16},
        "train": {"total_steps": 5000, "batch_size": 8, "warmup_steps": 500, "resolution": 512},
    },
    # A machine with no GPU and no Hub: pixel mode, small images, a few minutes on 2 CPU cores.
    "demo": {
        "model": {
            "num_layers": 4,
            "hidden_size": 128,
            "num_attention_heads": 4,
            "patch_size": 2,
            "in_channels": 3,
            "text_embed_dim": 64,
            "image_embed_dim": 64,
            "sample_size": 16,
        },
        "train": {"total_steps": 600, "batch_size": 16, "warmup_steps": 50, "resolution": 16, "num_images": 16},
    },
}


@dataclass
class TrainConfig:
    """Everything a run needs; the command line mirrors it field for field."""

    preset: str = "demo"  # a key of PRESETS: model size and the defaults below
    output_dir: str = "runs/demo"  # run folder: checkpoints/, training_log.jsonl
    total_steps: int = 600  # optimizer steps
    batch_size: int = 16  # samples per step (per process)
    peak_lr: float = 3e-4  # AdamW learning rate after warmup
    min_lr: float = 1e-6  # floor of the cosine decay
    warmup_steps: int = 50  # linear warmup; the seed's 5k would leave no room for the decay
    weight_decay: float = 0.03  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.9999  # EMAModel max decay (with warmup)
    resolution: int = 16  # image side in pixels
    num_images: int = 16  # images in the synthetic stand-in set (until the data pipeline)
    mixed_precision: str = "no"  # "no", "fp16", "bf16": passed to Accelerate
    seed: int = 0  # seeds weights, data, noise and CFG dropout
    log_every: int = 50  # steps between progress-bar and console updates
    model: dict = field(default_factory=dict)  # NanoDiTTransformer2DModel config (from the preset)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("total_steps", "batch_size", "resolution", "num_images", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.peak_lr <= 0 or not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need 0 <= --min-lr <= --peak-lr and --peak-lr > 0, got {self.min_lr}, {self.peak_lr}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"--warmup-steps must be in [0, --total-steps), got {self.warmup_steps}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig: preset defaults first, explicit flags on top."""
    parser = argparse.ArgumentParser(description="Train Nano DiT with rectified flow (run with `accelerate launch`).")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"(default: preset's, else {f.default})"
        parser.add_argument(flag, type=type(f.default), default=None, help=help_text)
    args = parser.parse_args(argv)
    preset = args.preset or TrainConfig.preset
    if preset not in PRESETS:
        parser.error(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset]["train"], **{k: v for k, v in vars(args).items() if v is not None}}
    config = TrainConfig(**values, model=dict(PRESETS[preset]["model"]))
    try:
        config.validate()
    except ValueError as err:
        parser.error(str(err))  # usage + the message naming the flag, exit status 2, before any work
    return config


# --------------------------------------------------------------------------------------------
# Stand-in data (until the shard / encoder pipeline): coloured squares with made-up embeddings.
# --------------------------------------------------------------------------------------------
def synthetic_dataset(config: TrainConfig, text_len: int = 8) -> TensorDataset:
    """Images in [−1, 1] of one coloured square on a plain background, with per-image embeddings.

    The "text" tokens and "DINO" vector are fixed random codes, one per image, standing in for
    T5 and DINOv3 outputs until the encoders land: enough to check that the model memorises
    images from their conditioning, not a measure of real conditioning.
    """
    m = config.model
    if m.get("in_channels") != 3:
        raise ValueError(
            f"preset {config.preset!r} trains on {m.get('in_channels')}-channel VAE latents, which come from the "
            "feature cache of the data pipeline; the synthetic stand-in set is pixel mode (3 channels): "
            "use --preset demo for now"
        )
    g = torch.Generator().manual_seed(config.seed)
    R, N = config.resolution, config.num_images
    images = torch.empty(N, 3, R, R)
    text = torch.randn(N, text_len, m["text_embed_dim"], generator=g)
    dino = torch.randn(N, m["image_embed_dim"], generator=g)
    for i in range(N):
        background, colour = torch.rand(3, generator=g) * 2 - 1, torch.rand(3, generator=g) * 2 - 1
        side = R // 2
        top, left = (torch.randint(0, R - side + 1, (2,), generator=g)).tolist()
        images[i] = background[:, None, None]
        images[i, :, top : top + side, left : left + side] = colour[:, None, None]
    mask = torch.ones(N, text_len, dtype=torch.long)
    return TensorDataset(images, text, mask, dino)


class JsonlLog:
    """Appends one JSON object per line, flushed at once so that a killed run keeps its log.

    Only the main process writes; on the others every call is a no-op.
    """

    def __init__(self, path: str, enabled: bool = True):
        self._file = open(path, "w") if enabled else None  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
