"""Training-step throughput: steps/s, samples/s, achieved FLOP/s and MFU, GPU busy %, peak memory;
the bare model step (eager, compiled, with a host sync, unfused) beside the trainer's own step; the
largest batch that fits a memory budget.

    python benchmarks/bench_train.py --compile --unfused --trainer    # CPU: nano model, 16² latents
    python benchmarks/bench_train.py --device cuda --latent-size 64 --compile --trainer --fit-gb 4 8

The bare step = forward + backward (bf16 autocast on CUDA) + gradient clipping + AdamW + EMA, on
random tensors of the real shapes (benchmarks/shapes.py: nothing downloaded), with the trainer's
non-finite guard (`nano_dit.step_guard`: decided on the device, no host sync). "host sync" is the
same step deciding on the host (`if bool(finite)`: one sync per step), for the ratio the device-side
guard buys; "unfused" the step with a per-parameter AdamW and EMA loop, for the ratio the fused
kernels buy. `--trainer` adds the trainer itself: `train_nano_dit.main` run for a short while on the
synthetic set (stand-in encoders, same shapes and batch), its steps/s read from its timings.json (its FLOPs taken as the bare step's):
the exact code path of a run, data, dropout, logging and all. FLOPs are counted once per
configuration with `torch.utils.flop_counter.FlopCounterMode`; MFU divides the achieved rate by the
device's matmul rate measured in the same run (bf16 on CUDA, fp32 on CPU). GPU busy % is the share of
time a kernel ran (NVML's utilisation, sampled every 20 ms while timing; "–" without a GPU).

`--fit-gb`: on CUDA, the largest batch whose measured peak (`torch.cuda.max_memory_allocated`)
stays within each budget: a guess from the peaks at batch 8 and 16, checked by running it (then
bracketed and bisected if it was off); on a CPU, the prediction of benchmarks/bench_memory.py at
the same shapes. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from shapes import TEXT_TOKENS, add_shape_arguments, build_model, random_inputs, sync
from torch.utils.flop_counter import FlopCounterMode

from nano_dit import FlowMatching
from nano_dit.config import PRESETS
from nano_dit.step_guard import ema_step, optimizer_step

ROOT = Path(__file__).resolve().parents[1]

GB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, latent_size=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 3 warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--unfused", action="store_true", help="also time per-parameter AdamW and EMA updates")
    parser.add_argument("--trainer", action="store_true", help="also time train_nano_dit.py's own step")
    parser.add_argument("--fit-gb", type=float, nargs="*", default=[], help="largest batch within each budget (GiB)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul, the device's practical peak for this model's work."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20 if device.type == "cuda" else 5
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def make_step(args, batch: int, mode: str, device: torch.device):
    """One training step of `mode` ("eager", "compiled", "host sync", "unfused") at `batch`, and its
    FLOP count."""
    model = build_model(args.preset, args.latent_size).to(device).train()
    params = list(model.parameters())
    fused = mode != "unfused"
    ema = EMAModel(params, decay=0.9999, use_ema_warmup=True, foreach=fused)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=False if not fused else None)
    forward = torch.compile(model, mode=compile_mode(device), dynamic=False) if mode == "compiled" else model
    objective = FlowMatching()
    x0, cond = random_inputs(model, batch, args.latent_size, TEXT_TOKENS, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        if mode == "compiled":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = objective.loss(forward, x0, **cond).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
        if mode == "host sync":  # decided on the host: one sync per step
            if bool(finite):
                optimizer.step()
            ema_step(ema, params, finite)
        else:  # the trainer's guard: decided on the device
            optimizer_step(optimizer, finite)
            ema_step(ema, params, finite)
        optimizer.zero_grad(set_to_none=True)

    def flops() -> int:
        with FlopCounterMode(display=False) as counter, autocast:
            objective.loss(model, x0, **cond).loss.backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    return step, flops


def compile_mode(device: torch.device) -> str:
    """The trainer's default for --compile: CUDA graphs on CUDA."""
    return "reduce-overhead" if device.type == "cuda" else "default"


@contextlib.contextmanager
def gpu_busy(device: torch.device):
    """Yields a list that holds, afterwards, the mean GPU utilisation (%) over the block: NVML's
    share of time a kernel ran, sampled every 20 ms. Empty without CUDA or NVML."""
    result, samples, done = [], [], threading.Event()

    def sample():
        while not done.wait(0.02):
            samples.append(torch.cuda.utilization(device))

    thread = None
    if device.type == "cuda":
        try:
            torch.cuda.utilization(device)
            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
        except Exception:  # no NVML (pynvml / nvidia-ml-py): busy % is not measured
            thread = None
    try:
        yield result
    finally:
        done.set()
        if thread is not None:
            thread.join()
            if samples:
                result.append(statistics.mean(samples))


def time_step(args, batch: int, mode: str, device: torch.device) -> dict:
    step, flops = make_step(args, batch, mode, device)
    count = flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        step()
    times = []
    with gpu_busy(device) as busy:
        for _ in range(args.steps):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "flops": count, "peak": peak, "busy": busy[0] if busy else None}


def time_trainer(args, batch: int, compiled: bool, device: torch.device) -> dict:
    """steps/s of `train_nano_dit.main` itself (the first step, which compiles, left out), on the
    synthetic set at the bench's shapes with stand-in encoders, and the GPU busy % over the run's
    training (data preparation included, which leaves the card idle: a lower bound)."""
    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location("train_nano_dit", ROOT / "train_nano_dit.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    steps = max(3 * args.steps, 30)
    with tempfile.TemporaryDirectory() as tmp:
        flags = [
            *(
                "--preset",
                args.preset,
                "--num-images",
                str(max(2 * batch, 16)),
                "--resolution",
                str(8 * args.latent_size),
            ),
            *("--stand-in-encoders", f"{tmp}/encoders", "--synth-if-missing", "--shards", f"{tmp}/shards"),
            *("--cache", f"{tmp}/cache", "--output-dir", f"{tmp}/run", "--batch-size", str(batch)),
            *("--total-steps", str(steps), "--warmup-steps", "1", "--checkpoint-every", str(10 * steps)),
            *("--no-validation", "--mixed-precision", "bf16" if device.type == "cuda" else "no"),
            *(["--compile"] if compiled else []),
        ]
        AcceleratorState._reset_state()  # each run sets its own precision and compilation
        try:
            with gpu_busy(device) as busy:
                trainer.main(flags)
        finally:
            AcceleratorState._reset_state()
        training = json.loads((Path(tmp) / "run" / "timings.json").read_text())["training"]
    return {"step_s": 1 / training["steps_per_s"], "busy": busy[0] if busy else None, "peak": None}


def measured_peak(args, batch: int, device: torch.device) -> float:
    """Peak bytes of two eager steps at `batch` on CUDA (inf when it runs out of memory)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step, _ = make_step(args, batch, "eager", device)
        for _ in range(2):
            step()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        return float("inf")
    finally:
        step = None
        torch.cuda.empty_cache()


def largest_batch_measured(budget: float, peak) -> int:
    """The largest batch whose peak memory `peak(batch)` fits `budget` (0 if not even one does).

    A guess from the line through the peaks at 8 and 16 (usually right: two more runs confirm
    it), then steps away from it that double until the boundary is bracketed, then bisection; each
    call of `peak` is a run, so memoise it."""
    per_sample = max((peak(16) - peak(8)) / 8, 1.0)  # a flat or noisy line must not divide by zero
    guess = max(int((budget - (peak(8) - 8 * per_sample)) // per_sample), 1)
    fits = lambda b: peak(b) <= budget  # noqa: E731
    step = 1
    if fits(guess):
        lo, hi = guess, guess + 1
        while fits(hi):
            lo, hi, step = hi, hi + 2 * step, 2 * step
    else:
        lo, hi = guess - 1, guess
        while lo >= 1 and not fits(lo):
            lo, hi, step = max(lo - 2 * step, 0), lo, 2 * step
        if lo < 1:
            return 0 if not fits(1) else _bisect(1, hi, fits)
    return _bisect(lo, hi, fits)


def _bisect(lo: int, hi: int, fits) -> int:
    """The largest batch in [lo, hi) that fits, given that lo fits and hi does not."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_batch_predicted(args, budget: float) -> tuple[int, float]:
    """benchmarks/bench_memory.py's prediction at these shapes: (batch, predicted bytes)."""
    from bench_memory import largest_batch, saved_activation_bytes

    model = build_model(args.preset, args.latent_size).train()
    static = 20 * model.num_parameters()
    per_sample = saved_activation_bytes(model, 8, args.latent_size) / 2 / 8  # bf16: half the fp32 bytes
    b = largest_batch(static, per_sample, budget)
    return b, static + b * per_sample


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    peak_rate = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokens = (args.latent_size // PRESETS[args.preset]["model"]["patch_size"]) ** 2
    print(
        f"# {args.preset} preset, {tokens} image tokens, {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"matmul {peak_rate / 1e12:.2f} TFLOP/s {'bf16' if device.type == 'cuda' else 'fp32'}; medians of {args.steps}"
    )
    print("| mode | batch | steps/s | samples/s | TFLOP/s | MFU | GPU busy | peak memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    modes = ["eager"] + ["compiled"] * args.compile + ["host sync"] + ["unfused"] * args.unfused
    modes += ["trainer"] + ["trainer, compiled"] * args.compile if args.trainer else []
    eager, flops = {}, {}
    for mode in modes:
        for batch in args.batch_sizes:
            if mode.startswith("trainer"):
                r = time_trainer(args, batch, mode.endswith("compiled"), device)
                r["flops"] = flops[batch]  # the same model, shapes and batch as the bare step
            else:
                r = time_step(args, batch, mode, device)
            rate = r["flops"] / r["step_s"]
            eager.setdefault(batch, r["step_s"])
            flops.setdefault(batch, r["flops"])
            ratio = f" ({eager[batch] / r['step_s']:.2f}× eager)" if mode != "eager" else ""
            peak = f"{r['peak'] / 2**20:.0f} MB" if r["peak"] is not None else "–"
            busy = f"{r['busy']:.0f} %" if r["busy"] is not None else "–"
            print(
                f"| {mode}{ratio} | {batch} | {1 / r['step_s']:.2f} | {batch / r['step_s']:.1f} | "
                f"{rate / 1e12:.3f} | {rate / peak_rate:.0%} | {busy} | {peak} |"
            )
    peaks = {}

    def peak(b: int) -> float:
        if b not in peaks:
            peaks[b] = measured_peak(args, b, device)
        return peaks[b]

    for gb in args.fit_gb:
        if device.type == "cuda":
            b = largest_batch_measured(gb * GB, peak)
            print(f"| largest batch in {gb:g} GiB (measured) | {b} | | | | | | {peaks.get(b, 0) / 2**20:.0f} MB |")
        else:
            b, predicted = largest_batch_predicted(args, gb * GB)
            print(f"| largest batch in {gb:g} GiB (predicted) | {b} | | | | | | {predicted / 2**20:.0f} MB (pred.) |")


if __name__ == "__main__":
    main()
