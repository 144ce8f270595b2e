"""Cost of one dual-CFG denoising step of NanoDiTPipeline, against (a) one plain transformer
forward at the same total batch and (b) the same guidance run as one transformer call per branch.

    python benchmarks/bench_pipeline_cfg.py                       # nano model, 16x16 latents, CPU
    python benchmarks/bench_pipeline_cfg.py --latent-size 64 --device cuda   # the validation plan's 512² on a GPU

Random weights and conditioning of the real shapes (nothing downloaded). Each repeat times
`--steps` denoising steps of each variant, interleaved; prints per-step medians and the ratios
(target: dual-CFG / plain forward <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from shapes import add_shape_arguments, build_model, sync

from nano_dit import NanoDiTPipeline
from nano_dit.pipelines.pipeline_nano_dit import BRANCHES, guidance_weights


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, latent_size=16)
    parser.add_argument("--batch-size", type=int, default=4, help="images per prompt batch (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per timing (default 5)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats (default 9)")
    parser.add_argument("--guidance-mode", choices=("independent", "nested"), default="independent")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # random weights everywhere (zero-initialised layers would make v = 0)
    model = build_model(args.preset, args.latent_size, randomize=True).to(device).eval()
    pipe = NanoDiTPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    b, text_len = args.batch_size, 64
    cond = {
        "prompt_embeds": torch.randn(b, text_len, model.config.text_embed_dim, device=device),
        "prompt_attention_mask": torch.ones(b, text_len, dtype=torch.long, device=device),
        "image_embeds": torch.randn(b, model.config.image_embed_dim, device=device),
    }
    weights = guidance_weights(args.guidance_mode, 3.0, 2.0)
    k = len(weights)
    latents = torch.randn(b, 16, args.latent_size, args.latent_size, device=device)

    @torch.no_grad()
    def dual_cfg():  # the pipeline itself: K branches in one forward per step
        pipe(**cond, latents=latents, num_inference_steps=args.steps, guidance_mode=args.guidance_mode,
             output_type="latent")  # fmt: skip

    @torch.no_grad()
    def plain_forward():  # the same total batch K·B, one forward per step, no guidance
        x, t = latents.repeat(k, 1, 1, 1), torch.full((k * b,), 500.0, device=device)
        for _ in range(args.steps):
            model(x, t, _repeat(cond["prompt_embeds"], k), _repeat(cond["prompt_attention_mask"], k),
                  _repeat(cond["image_embeds"], k))  # fmt: skip

    @torch.no_grad()
    def separate_calls():  # the same guidance with one transformer call per branch
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / args.steps, args.steps).tolist(), device=device)
        x = latents
        for t in scheduler.timesteps:
            v = 0
            for branch, w in weights.items():
                drop_text, drop_image = (torch.full((b,), BRANCHES[branch][i], device=device) for i in (0, 1))
                out = model(x, t.expand(b), cond["prompt_embeds"], cond["prompt_attention_mask"],
                            cond["image_embeds"], drop_text=drop_text, drop_image=drop_image).sample  # fmt: skip
                v = v + w * out
            x = scheduler.step(v, t, x, return_dict=False)[0]

    variants = {"dual-CFG step (pipeline)": dual_cfg, "plain forward, same batch": plain_forward}
    variants["separate calls per branch"] = separate_calls
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.preset} model, {k} branches x batch {b}, {args.latent_size}² latents, {device}, "
          f"{args.repeats} repeats of {args.steps} steps")  # fmt: skip
    for name, m in med.items():
        print(f"  {name:28s} {m * 1e3:8.1f} ms/step")
    dual = med["dual-CFG step (pipeline)"]
    print(f"  dual-CFG / plain forward     {dual / med['plain forward, same batch']:.3f}  (target <= 1.05)")
    print(f"  dual-CFG / separate calls    {dual / med['separate calls per branch']:.3f}")


def _repeat(t, k):
    return t.repeat(k, *([1] * (t.ndim - 1)))


if __name__ == "__main__":
    main()
