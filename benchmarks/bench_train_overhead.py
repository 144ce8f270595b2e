"""Overhead of the training iteration (batches, CFG dropout, clipping, the finite check, EMA,
logging) over the bare model step (forward, backward, AdamW) at the same size.

    python benchmarks/bench_train_overhead.py               # demo preset on CPU, 300 steps
    python benchmarks/bench_train_overhead.py --steps 100

Offline: it makes the synthetic set and stand-in encoders in a temporary folder. The trainer's
step time comes from its own log (samples/s over each logging interval, the first left out as
warm-up); the bare step is timed right before and right after the run, on the same cached batches.
Prints medians and the ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nano_dit import FlowMatching, NanoDiTTransformer2DModel
from nano_dit.config import PRESETS, parse_config
from nano_dit.data import CachedBatches, conditioning, model_config_for, prepare_data
from nano_dit.feature_cache import load_cache

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (and bare steps per side)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step")
    return parser.parse_args()


def bare_steps(model, batches, steps: int) -> list[float]:
    """Per-step times of forward + backward + AdamW alone."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    objective, times = FlowMatching(), []
    for _ in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        out = objective.loss(model, batch["latents"], **conditioning(batch))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[10:]  # warm-up left out


def main() -> None:
    args = parse_args()
    spec = importlib.util.spec_from_file_location("train_nano_dit", ROOT / "train_nano_dit.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with tempfile.TemporaryDirectory() as tmp:
        flags = [
            *("--preset", "demo", "--num-images", "32", "--batch-size", str(args.batch_size)),
            *("--total-steps", str(args.steps), "--log-every", "25", "--checkpoint-every", str(10 * args.steps)),
            *("--shards", f"{tmp}/shards", "--cache", f"{tmp}/cache", "--stand-in-encoders", f"{tmp}/enc"),
            *("--output-dir", f"{tmp}/run", "--no-validation"),
        ]
        config = parse_config(flags)
        prepare_data(config)
        _, buckets = load_cache(config.cache)
        model = NanoDiTTransformer2DModel(**model_config_for(config, buckets))
        batches = CachedBatches(buckets, args.batch_size, "cpu", seed=0)

        before = bare_steps(model, batches, args.steps)
        train.main(flags)
        after = bare_steps(model, batches, args.steps)

        lines = (Path(tmp) / "run" / "checkpoints" / "training_log.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        rates = [r["samples_per_s"] for r in records if r["step"] % 25 == 0][1:]  # one per interval, warm-up out
        trainer = statistics.median(args.batch_size / r for r in rates)
    bare = statistics.median(before + after)
    print(f"# demo preset ({PRESETS['demo']['model']}), batch {args.batch_size}, {args.steps} steps, CPU")
    print("| loop | step (ms, median) |")
    print("| --- | ---: |")
    print(f"| bare model step (forward, backward, AdamW) | {bare * 1e3:.1f} |")
    print(f"| training iteration (train_nano_dit.py) | {trainer * 1e3:.1f} |")
    print(f"\ntraining-iteration / bare-step ratio: {trainer / bare:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
