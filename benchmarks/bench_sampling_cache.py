"""What diffusers' sampling caches and regional compilation do to NanoDiTPipeline's guided step.

    python benchmarks/bench_sampling_cache.py                     # nano model, 16² latents, CPU
    python benchmarks/bench_sampling_cache.py --checkpoint runs/demo/checkpoints/checkpoint_final
    python benchmarks/bench_sampling_cache.py --latent-size 64 --device cuda --compile   # a GPU, 512²

Caches: each variant samples `--steps` guided steps (3 branches in one forward) from the same
noise, interleaved with the others, `--repeats` times. Printed per variant: the median time per
step and its ratio to no cache, the share of attention calls actually computed, and the drift:
how far the final latents land from the uncached ones, relative to how far sampling moved them. With random weights (no --checkpoint)
the distances say little about image quality; give a trained checkpoint for that.

--compile: the first call (compile time) and the steady-state step of `torch.compile(model)`
against `model.compile_repeated_blocks()` (one block compiled, reused by every block).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from shapes import LATENT_CHANNELS, TEXT_TOKENS, add_shape_arguments, build_model, sync

from nano_dit import NanoDiTPipeline
from nano_dit.transformer_nano_dit import NanoDiTAttnProcessor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, latent_size=16)
    parser.add_argument("--checkpoint", help="a trained pipeline folder (default: the preset with random weights)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per sampling (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time full against regional compilation")
    parser.add_argument("--compile-one", choices=("full", "regional"), help=argparse.SUPPRESS)  # one fresh process
    return parser.parse_args()


def cache_configs(pipe: NanoDiTPipeline) -> dict:
    """Each cache at settings diffusers documents as a starting point."""
    now = lambda: pipe.current_timestep  # noqa: E731
    return {
        "no cache": None,
        "First-Block (threshold 0.05)": FirstBlockCacheConfig(threshold=0.05),
        "First-Block (threshold 0.2)": FirstBlockCacheConfig(threshold=0.2),
        "PAB (every 2nd attention)": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=now,
        ),
        "FasterCache (attention reuse)": FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 681),
            attention_weight_callback=lambda _: 0.5,
            current_timestep_callback=now,
            is_guidance_distilled=True,  # the guided batch is not FasterCache's [uncond, cond] pair
        ),
        "TaylorSeer (interval 4)": TaylorSeerCacheConfig(cache_interval=4, disable_cache_before_step=4),
    }


class CountingProcessor(NanoDiTAttnProcessor):
    calls = 0

    def __call__(self, *args, **kwargs):
        CountingProcessor.calls += 1
        return super().__call__(*args, **kwargs)


def main() -> None:
    args = parse_args()
    if args.compile_one:
        return compile_one(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        pipe = NanoDiTPipeline.from_pretrained(args.checkpoint).to(device)
        model = pipe.transformer
    else:
        model = build_model(args.preset, args.latent_size, randomize=True).to(device).eval()
        pipe = NanoDiTPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    c, b = model.config, args.batch_size
    g = torch.Generator().manual_seed(0)
    cond = {
        "prompt_embeds": torch.randn(b, TEXT_TOKENS, c.text_embed_dim, generator=g).to(device),
        "prompt_attention_mask": torch.ones(b, TEXT_TOKENS, dtype=torch.long, device=device),
        "image_embeds": torch.randn(b, c.image_embed_dim, generator=g).to(device),
    }
    side = args.latent_size if not args.checkpoint else c.sample_size
    latents = torch.randn(b, c.in_channels if args.checkpoint else LATENT_CHANNELS, side, side, generator=g)
    latents = latents.to(device)
    model.set_attn_processor(CountingProcessor())
    full_calls = args.steps * 2 * c.num_layers

    @torch.no_grad()
    def sample():
        return pipe(**cond, latents=latents, num_inference_steps=args.steps, output_type="latent").images

    configs = cache_configs(pipe)
    times = {name: [] for name in configs}
    finals, computed = {}, {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, config in configs.items():
            if config is not None:
                model.enable_cache(config)
            CountingProcessor.calls = 0
            sync(device)
            start = time.perf_counter()
            finals[name] = sample()
            sync(device)
            if repeat:
                times[name].append((time.perf_counter() - start) / args.steps)
            computed[name] = CountingProcessor.calls / full_calls
            if config is not None:
                model.disable_cache()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    base, reference = med["no cache"], finals["no cache"].float()
    weights = "random weights" if not args.checkpoint else args.checkpoint
    print(
        f"{args.preset if not args.checkpoint else 'checkpoint'} model ({weights}), batch {b} x 3 branches, "
        f"{side}² latents, {device}, {args.steps} steps, median of {args.repeats}"
    )
    print(f"  {'':32s} {'ms/step':>8s} {'vs none':>8s} {'attention run':>14s} {'drift':>8s}")
    for name in configs:
        # How far sampling moved the latents differently: relative to what it moved them at all.
        moved = reference - latents.float()
        drift = ((finals[name].float() - reference).norm() / moved.norm()).item()
        print(f"  {name:32s} {med[name] * 1e3:8.1f} {med[name] / base:8.2f} {computed[name]:13.0%} {drift:8.3f}")

    if args.compile:
        compile_times(args)


def compile_times(args) -> None:
    """Full-model against regional compilation, each in a fresh process with an empty inductor
    cache (in one process the second would reuse the first's generated kernels)."""
    rows = {}
    for variant in ("full", "regional"):
        with tempfile.TemporaryDirectory() as cache:
            flags = ["--preset", args.preset, "--latent-size", str(args.latent_size), "--device", args.device]
            flags += ["--batch-size", str(args.batch_size), "--compile-one", variant]
            if args.checkpoint:
                flags += ["--checkpoint", args.checkpoint]
            done = subprocess.run(
                [sys.executable, __file__, *flags],
                capture_output=True,
                text=True,
                env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                check=True,
            )
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    eager = rows["full"]["eager_ms"]
    print(f"  compile ({args.device}, inductor, fresh process each): first call s, step ms, vs eager ({eager:.1f} ms)")
    names = {"full": "full model (torch.compile)", "regional": "regional (compile_repeated_blocks)"}
    for variant, row in rows.items():
        print(f"  {names[variant]:34s} {row['first_s']:9.1f} {row['step_ms']:9.1f} {row['step_ms'] / eager:9.2f}")
    print(f"  regional / full compile time     {rows['regional']['first_s'] / rows['full']['first_s']:.2f}")


def compile_one(args) -> None:
    """One variant's first call and steady step, printed as JSON (run by `compile_times`)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        model = NanoDiTPipeline.from_pretrained(args.checkpoint).transformer.to(device)
    else:
        model = build_model(args.preset, args.latent_size, randomize=True).to(device).eval()
    c, b = model.config, 3 * args.batch_size  # the guided batch: three branches
    side = c.sample_size if args.checkpoint else args.latent_size
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(b, c.in_channels, side, side, generator=g).to(device),
        timestep=torch.full((b,), 500.0, device=device),
        encoder_hidden_states=torch.randn(b, TEXT_TOKENS, c.text_embed_dim, generator=g).to(device),
        encoder_attention_mask=torch.ones(b, TEXT_TOKENS, dtype=torch.long, device=device),
        image_embeds=torch.randn(b, c.image_embed_dim, generator=g).to(device),
    )

    @torch.no_grad()
    def timed(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn(**inputs)
        sync(device)
        return time.perf_counter() - start

    eager = statistics.median(timed(model) for _ in range(5))
    if args.compile_one == "full":
        compiled = torch.compile(model)
    else:
        model.compile_repeated_blocks()
        compiled = model
    first = timed(compiled)
    step = statistics.median(timed(compiled) for _ in range(5))
    print(json.dumps({"eager_ms": eager * 1e3, "first_s": first, "step_ms": step * 1e3}))


if __name__ == "__main__":
    main()
