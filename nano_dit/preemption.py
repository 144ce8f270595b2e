"""Stopping on a cluster's signal without losing a step.

Schedulers warn a job before they kill it: Slurm sends SIGTERM at preemption or the time limit, and
the signal of `sbatch --signal=USR1@<seconds>` that long before; Kubernetes and spot instances send
SIGTERM, then SIGKILL after a grace period. During training, `StopSignals` turns SIGTERM and
SIGUSR1 into a request: the step in progress finishes, a checkpoint is written the usual way
(aside, checksummed, then renamed), the buffered log lines are written, `stopped.json` is left in
the output folder, and the process exits with `PREEMPTED_EXIT_CODE`. `--resume latest` then
continues as if nothing had happened.

With several processes, the request is agreed on: every process contributes its flag to one
all-reduce per step (on a host-side gloo group, started at one step and read at the next, so the
training step never waits for it), and all of them stop after the same step, even when the signal
reached one process only.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .folders import write_aside

# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": the run stopped
# on a signal after writing its checkpoint. A requeue wrapper tests for it (or for stopped.json,
# which survives launchers that replace a worker's exit code with their own).
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_RECORD = "stopped.json"


class Preempted(Exception):
    """The run stopped on a signal, its checkpoint written; `str()` is the line printed."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class StopSignals:
    """SIGTERM and SIGUSR1, while installed (`install` to `restore`), become a stop request.

    The handler only notes the signal and says so in one line on stderr: it never raises, so no
    step and no save is cut off midway. A second signal is noted and changes nothing; the
    checkpoint being written completes (a SIGKILL, which nothing can catch, leaves the checkpoints
    before it whole: each is renamed into place only once complete).

    `processes` > 1: `should_stop` agrees across the processes (the module docstring); call it at
    the same point of every step on every process.
    """

    def __init__(self, process_index: int = 0, processes: int = 1, signals=STOP_SIGNALS):
        self.process_index, self.signals = process_index, tuple(signals)
        self.received: int | None = None  # the first stop signal's number
        self._previous: dict[int, object] = {}
        self._group = dist.new_group(backend="gloo") if processes > 1 else None
        self._flag, self._work = None, None

    def install(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """The handlers as they were; the last step's agreement (started by every process) ended."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        who = f"process {self.process_index}: " if self._group is not None else ""
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            line = f"{who}{name} received: finishing this step, then writing a checkpoint and stopping"
        else:
            line = f"{who}{name} received again: the checkpoint in progress will complete; stopping after it"
        os.write(2, f"\n{line}\n".encode())  # not print: a handler may run in the middle of a print

    def should_stop(self) -> str | None:
        """The name of the signal the run stops on after this step, or None. One process: a
        signal has arrived. Several: a signal had reached any of them by the previous step's call
        (the largest signal number, where two differ), the same answer on each."""
        if self._group is None:
            agreed = self.received
        else:
            agreed = None
            if self._work is not None:
                self._work.wait()
                agreed = int(self._flag.item()) or None
            self._flag = torch.tensor([self.received or 0], dtype=torch.int32)
            self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return None if agreed is None else signal.Signals(agreed).name


def write_stop_record(output_dir: str | os.PathLike, signal_name: str, step: int, checkpoint: Path) -> None:
    """`stopped.json` in the output folder: why and where the run stopped, and how to go on. A
    run that resumes removes it (`clear_stop_record`)."""
    record = {
        "signal": signal_name,
        "step": step,
        "checkpoint": str(checkpoint),
        "exit_code": PREEMPTED_EXIT_CODE,
        "time": time.time(),
        "resume": "--resume latest",
    }
    write_aside(Path(output_dir) / STOP_RECORD, json.dumps(record, indent=2))


def clear_stop_record(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / STOP_RECORD).unlink(missing_ok=True)
