"""Training-step time of NanoDiT against diffusers' PixArtTransformer2DModel of the same shape.

One training step = forward, backward and an AdamW update. Both models get the same depth, width,
heads, patch, image-token count and text context, run in this process, interleaved (A B A B ...)
so that machine noise hits both alike; the table gives medians and their ratio, and each model's
achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) against this machine's measured
fp32 matmul rate.

    python benchmarks/bench_step_vs_pixart.py            # the issue's setting: 12 x 384, 256 tokens, batch 8
    python benchmarks/bench_step_vs_pixart.py --layers 4 --repeats 3   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from diffusers import PixArtTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from nano_dit import NanoDiTTransformer2DModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks in both models")
    parser.add_argument("--hidden-size", type=int, default=384, help="width of both models")
    parser.add_argument("--heads", type=int, default=6, help="attention heads")
    parser.add_argument("--patch-size", type=int, default=2, help="latent patch side")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (a square grid)")
    parser.add_argument("--text-tokens", type=int, default=64, help="length of the T5 context")
    parser.add_argument("--text-dim", type=int, default=768, help="width of the T5 context")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument(
        "--fused-adamw",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fused AdamW kernel for both models, as the trainer uses (--no-fused-adamw: foreach)",
    )
    return parser.parse_args()


def build_models(args):
    side = int(args.tokens**0.5) * args.patch_size  # latent side that gives `tokens` patches
    if (side // args.patch_size) ** 2 != args.tokens:
        raise ValueError(f"--tokens must be a square number, got {args.tokens}")
    nano = NanoDiTTransformer2DModel(
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.heads,
        patch_size=args.patch_size,
        in_channels=16,
        text_embed_dim=args.text_dim,
        sample_size=side,
    )
    pixart = PixArtTransformer2DModel(
        num_layers=args.layers,
        num_attention_heads=args.heads,
        attention_head_dim=args.hidden_size // args.heads,
        patch_size=args.patch_size,
        in_channels=16,
        out_channels=16,
        cross_attention_dim=args.hidden_size,
        caption_channels=args.text_dim,
        sample_size=side,
        interpolation_scale=1,
        use_additional_conditions=False,
    )
    return nano, pixart, side


def make_steps(nano, pixart, side, args):
    g = torch.Generator().manual_seed(args.seed)
    B, L = args.batch_size, args.text_tokens
    x = torch.randn(B, 16, side, side, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, L, args.text_dim, generator=g)
    mask = torch.ones(B, L)
    mask[: B // 2, L // 2 :] = 0  # half the batch padded, as real captions are
    dino = torch.randn(B, nano.config.image_embed_dim, generator=g)
    target = torch.randn_like(x)

    def nano_loss():
        v = nano(x, t, text, encoder_attention_mask=mask, image_embeds=dino).sample
        return (v - target).pow(2).mean()

    def pixart_loss():
        v = pixart(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
        return (v - target).pow(2).mean()

    def as_step(model, loss_fn):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.fused_adamw)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

        return step

    return {
        "NanoDiT": (nano, count_flops(nano_loss), as_step(nano, nano_loss)),
        "PixArt": (pixart, count_flops(pixart_loss), as_step(pixart, pixart_loss)),
    }


def count_flops(loss_fn) -> int:
    """FLOPs of one forward + backward, counted by PyTorch's own FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matmul rate (median of `repeats`), the ceiling for both models."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    nano, pixart, side = build_models(args)
    runs = make_steps(nano, pixart, side, args)
    peak = matmul_gflops()

    times = {name: [] for name in runs}
    for _ in range(2):  # warm-up
        for _, _, step in runs.values():
            step()
    for _ in range(args.repeats):  # interleaved
        for name, (_, _, step) in runs.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.layers} layers x {args.hidden_size}, {args.heads} heads, patch {args.patch_size}, "
        f"{args.tokens} tokens, {args.text_tokens} text tokens, batch {args.batch_size}, "
        f"{'fused' if args.fused_adamw else 'foreach'} AdamW; "
        f"medians of {args.repeats} interleaved steps"
    )
    print(f"# measured fp32 matmul rate: {peak:.1f} GFLOP/s")
    print("| model | params (M) | step (s) | GFLOP per step | GFLOP/s | of matmul rate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (model, flops, _) in runs.items():
        median = statistics.median(times[name])
        rate = flops / median / 1e9
        print(
            f"| {name} | {model.num_parameters() / 1e6:.1f} | {median:.3f} | {flops / 1e9:.1f} | "
            f"{rate:.1f} | {rate / peak:.0%} |"
        )
    ratio = statistics.median(times["NanoDiT"]) / statistics.median(times["PixArt"])
    # Each NanoDiT step against the PixArt step right after it: drift in machine load cancels.
    paired = statistics.median(a / b for a, b in zip(times["NanoDiT"], times["PixArt"]))
    print(f"\nNanoDiT / PixArt step-time ratio: {ratio:.3f} of medians, {paired:.3f} median of pairs (target <= 1.0)")


if __name__ == "__main__":
    main()
