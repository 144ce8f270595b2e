"""Training-step throughput: steps/s, samples/s, achieved FLOP/s and MFU, peak memory; eager and
compiled.

    python benchmarks/bench_train.py                                   # CPU: nano model, 16² latents
    python benchmarks/bench_train.py --device cuda --latent-size 64 --batch-sizes 8 16 --compile

One step = forward + backward (bf16 autocast on CUDA) + fused AdamW + EMA update, on random tensors
of the real shapes (nothing downloaded). FLOPs are counted once per configuration with
`torch.utils.flop_counter.FlopCounterMode`; MFU divides the achieved rate by the device's matmul
rate measured in the same run (bf16 on CUDA, fp32 on CPU). Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from nano_dit import FlowMatching, NanoDiTTransformer2DModel
from nano_dit.training import PRESETS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="nano")
    parser.add_argument("--latent-size", type=int, default=16, help="latent side (64 = the seed's 512²)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 3 warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul, the device's practical peak for this model's work."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start, reps = time.perf_counter(), 20 if device.type == "cuda" else 5
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args, batch: int, compiled: bool, device: torch.device) -> dict:
    config = dict(PRESETS[args.preset]["model"], in_channels=16, sample_size=args.latent_size)
    config.update(text_embed_dim=768, image_embed_dim=384)
    model = NanoDiTTransformer2DModel(**config).to(device).train()
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, foreach=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if compiled else model
    objective = FlowMatching()
    x0 = torch.randn(batch, 16, args.latent_size, args.latent_size, device=device)
    cond = {
        "encoder_hidden_states": torch.randn(batch, 128, 768, device=device),
        "encoder_attention_mask": torch.ones(batch, 128, dtype=torch.long, device=device),
        "image_embeds": torch.randn(batch, 384, device=device),
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = objective.loss(forward, x0, **cond).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    with FlopCounterMode(display=False) as counter, autocast:
        objective.loss(model, x0, **cond).loss.backward()
    flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"step_s": seconds, "flops": flops, "peak_mb": peak}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    peak_rate = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokens = (args.latent_size // PRESETS[args.preset]["model"]["patch_size"]) ** 2
    print(
        f"# {args.preset} preset, {tokens} image tokens, {device} "
        f"(matmul {peak_rate / 1e12:.2f} TFLOP/s {'bf16' if device.type == 'cuda' else 'fp32'})"
    )
    print("| mode | batch | steps/s | samples/s | TFLOP/s | MFU | peak memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    eager = {}
    for compiled in (False, True) if args.compile else (False,):
        for batch in args.batch_sizes:
            r = run(args, batch, compiled, device)
            rate = r["flops"] / r["step_s"]
            peak = f"{r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else "–"
            mode = "compiled" if compiled else "eager"
            ratio = f" ({eager[batch] / r['step_s']:.2f}× eager)" if compiled else ""
            eager.setdefault(batch, r["step_s"])
            print(
                f"| {mode}{ratio} | {batch} | {1 / r['step_s']:.2f} | {batch / r['step_s']:.1f} | "
                f"{rate / 1e12:.3f} | {rate / peak_rate:.0%} | {peak} |"
            )


if __name__ == "__main__":
    main()
