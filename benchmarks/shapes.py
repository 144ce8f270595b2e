"""A preset's transformer at the real encoders' widths, and random inputs of the real shapes, for
the benchmarks: nothing is downloaded, and every benchmark measures the same model.

The real encoders: the Flux VAE (16 latent channels, 8x down: 512² images are 64² latents),
T5 v1.1 base (768 wide; captions capped at 128 tokens), DINOv3 ViT-S/16 (384 wide).
"""

from __future__ import annotations

import argparse

import torch

from nano_dit import NanoDiTTransformer2DModel
from nano_dit.config import PRESETS

LATENT_CHANNELS, TEXT_DIM, IMAGE_DIM, TEXT_TOKENS = 16, 768, 384, 128


def add_shape_arguments(parser: argparse.ArgumentParser, latent_size: int) -> None:
    """The flags that pick the model and its input size: --preset and --latent-size."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="nano", help="model size (default: nano)")
    parser.add_argument(
        "--latent-size",
        type=int,
        default=latent_size,
        help=f"latent side, 8x down from the image: 64 is the validation plan's 512² (default: {latent_size})",
    )


def build_model(
    preset: str = "nano",
    latent_size: int = 64,
    text_dim: int = TEXT_DIM,
    image_dim: int = IMAGE_DIM,
    randomize: bool = False,
) -> NanoDiTTransformer2DModel:
    """The preset's transformer for `latent_size`² latents. `randomize`: every weight N(0, 0.02),
    so that zero-initialised output layers do not make sampling trivial."""
    config = dict(
        PRESETS[preset]["model"],
        in_channels=LATENT_CHANNELS,
        sample_size=latent_size,
        text_embed_dim=text_dim,
        image_embed_dim=image_dim,
    )
    model = NanoDiTTransformer2DModel(**config)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    return model


def random_inputs(
    model: NanoDiTTransformer2DModel,
    batch: int,
    latent_size: int,
    text_tokens: int = TEXT_TOKENS,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clean latents `x0` and the conditioning keywords of one training batch for `model`."""
    c = model.config

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    x0 = randn(batch, c.in_channels, latent_size, latent_size)
    cond = {
        "encoder_hidden_states": randn(batch, text_tokens, c.text_embed_dim),
        "encoder_attention_mask": torch.ones(batch, text_tokens, dtype=torch.long, device=device),
        "image_embeds": randn(batch, c.image_embed_dim),
    }
    return x0, cond


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
