"""Where a run's time went: wall-clock seconds per phase, written to `timings.json` and RESULTS.md.

    timer = PhaseTimer(device)
    with timer.phase("data: encoding"):
        ...

A phase's clock starts and stops after the device has finished its queued work (one
`torch.cuda.synchronize` at each edge, none in between), so asynchronous CUDA kernels are billed
to the phase that launched them. Phases of the same name add up. The timer is handed to the code
it times (`prepare_data(config, timer)`, `evaluate(..., timer=timer)`); code given none times into
a timer of its own that nobody reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from .folders import write_aside

TIMINGS_FILE = "timings.json"


class PhaseTimer:
    """Seconds per named phase, in the order they first ran."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def as_dict(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self.seconds.items()}


class RunTimings:
    """A training run's timings.json: the phases of `timer`, the training rates and each validation.

    Args:
        run_dir: where timings.json goes (beside config.json).
        timer: the run's `PhaseTimer`.
        settings: what the figures depend on (device, precision, compile), recorded with them.
    """

    def __init__(self, run_dir, timer: PhaseTimer, settings: dict, started: float | None = None):
        self.run_dir, self.timer, self.settings = Path(run_dir), timer, settings
        self.started = time.perf_counter() if started is None else started  # perf_counter() at the run's start
        self.training: dict = {}
        self.validations: list[dict] = []
        self.train_peak: float | None = None
        self._loop = (self.started, 0.0)  # (perf_counter(), seconds timed) at the loop's start

    def start_loop(self) -> None:
        """The training loop starts: its own time counts from here, less the phases timed inside it."""
        self._loop = (time.perf_counter(), sum(self.timer.seconds.values()))

    def end_loop(self, steps: int, samples_per_step: int, device: torch.device) -> None:
        """The loop ran `steps` optimizer steps since `start_loop`. Its own time, less its first step,
        checkpoints and validations (timed apart), is the "training" phase and gives the rates."""
        self.timer.sync()
        if steps <= 0:
            return
        started, timed_before = self._loop
        seconds = time.perf_counter() - started - (sum(self.timer.seconds.values()) - timed_before)
        self.timer.add("training", seconds)
        self.note_peak(device)
        self.note_training(steps - 1, seconds, self.timer.seconds["training: first step"], samples_per_step)

    def note_training(self, steps: int, seconds: float, first_step: float, samples_per_step: int) -> None:
        """`steps` optimizer steps after the first took `seconds`; the first took `first_step`."""
        rate = steps / seconds if seconds > 0 else 0.0
        self.training = {
            "steps": steps + 1,
            "first_step_seconds": round(first_step, 3),
            "steps_per_s": rate,
            "samples_per_s": rate * samples_per_step,
            "peak_memory_gib": self.train_peak,
        }

    def note_peak(self, device: torch.device) -> None:
        """The device's peak memory while training (read before validation adds its own)."""
        peak = peak_memory_gib(device)
        if peak is not None:
            self.train_peak = max(self.train_peak or 0.0, peak)

    def note_validation(self, step: int, seconds: float, phases: dict) -> None:
        self.validations.append({"step": step, "seconds": round(seconds, 3), "phases": phases})

    def as_dict(self) -> dict:
        return {
            **self.settings,
            "total_seconds": round(time.perf_counter() - self.started, 3),
            "phases": self.timer.as_dict(),
            "training": self.training,
            "validations": self.validations,
        }

    def save(self) -> Path:
        return write_timings(self.run_dir, self.as_dict())


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def peak_memory_gib(device: torch.device) -> float | None:
    """The device's peak allocated memory so far (CUDA), else None."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def write_timings(run_dir: str | os.PathLike, timings: dict) -> Path:
    """`<run_dir>/timings.json`, written aside and renamed (a crash leaves the previous one)."""
    path = Path(run_dir) / TIMINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_aside(path, json.dumps(timings, indent=2))
    return path


def read_timings(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / TIMINGS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def timings_table(timings: dict) -> list[str]:
    """Markdown lines: one row per phase with its share of the run, then the training rates."""
    rows = timings.get("phases", {})
    total = timings.get("total_seconds") or sum(rows.values()) or 1.0
    lines = [
        "| phase | seconds | share |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {s:.1f} | {s / total:.0%} |" for name, s in rows.items()],
        f"| **whole run** | **{total:.1f}** | |",
    ]
    train = timings.get("training") or {}
    if train.get("steps", 0) > 1:  # a rate needs steps after the first
        memory = train.get("peak_memory_gib")
        lines += [
            "",
            f"Training: {train['steps']} steps, {train['steps_per_s']:.2f} steps/s and "
            f"{train['samples_per_s']:.1f} samples/s after the first step (which took "
            f"{train['first_step_seconds']:.1f} s{', compiling' if timings.get('compile') else ''})"
            + (f"; peak device memory {memory:.2f} GiB" if memory is not None else "")
            + ".",
        ]
    validations = timings.get("validations", [])
    if validations:
        lines += ["", "Each validation:", ""]
    for v in validations:
        parts = ", ".join(f"{k} {s:.1f} s" for k, s in v["phases"].items())
        lines.append(f"- step {v['step']}: {v['seconds']:.1f} s ({parts})")
    where = timings.get("device", "?")
    resumed = f"; resumed at step {timings['start_step']}" if timings.get("start_step") else ""
    lines += [
        "",
        f"Device: {where}; precision {timings.get('mixed_precision')}; compile {timings.get('compile')}{resumed}.",
    ]
    return lines
