"""The training log, `<checkpoints>/training_log.jsonl`: one `LogRecord` per optimizer step.

The trainer adds each step's values as device tensors and flushes them at logging intervals with
one host sync for the lot; the report reads the file back with `read_log`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LogRecord:
    step: int
    loss: float
    grad_norm: float
    lr: float
    ema_decay: float
    samples_per_s: float  # over the logging interval the step belongs to
    time: float  # wall clock (Unix time) at the flush
    skipped: bool = False  # non-finite loss or gradient: the update was not applied

    def scalars(self) -> dict[str, float]:
        """What the experiment tracker gets of a record."""
        return {k: getattr(self, k) for k in ("loss", "grad_norm", "lr", "ema_decay", "samples_per_s")}

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        if not self.skipped:  # written only where it happened
            del values["skipped"]
        return json.dumps(values)


@dataclass
class _Pending:
    """One step's values, still on the device."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    ema_decay: float
    skipped: torch.Tensor  # 0-d bool: the update was not applied


class TrainingLog:
    """Appends one JSON record per step, flushed to disk at once so that a killed run keeps its log.

    `resume_step` keeps the records of steps up to it and drops later ones (they will be trained
    again), so that a resumed run's log holds every step exactly once. Only the main process
    writes (`enabled`); elsewhere the records are still made, for the progress bar.
    """

    def __init__(self, path: str | Path, enabled: bool = True, resume_step: int | None = None):
        self._file, self._pending = None, []
        if not enabled:
            return
        kept = []
        if resume_step is not None and Path(path).exists():
            kept = [line for line in Path(path).read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        self._file = open(path, "w")  # noqa: SIM115 (closed in close())
        self._file.writelines(line + "\n" for line in kept)
        self._file.flush()

    def add(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        lr: float,
        ema_decay: float,
        skipped: torch.Tensor,
    ):
        """Buffer a step's values (`loss`, `grad_norm`, `skipped`: 0-d device tensors); nothing is
        read from the device here."""
        self._pending.append(_Pending(step, loss, grad_norm, lr, ema_decay, skipped))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, samples_per_step: int, seconds: float) -> list[LogRecord]:
        """The buffered steps as records (one host sync for all of them), written; `seconds`: the
        time they took, for the rate."""
        if not self._pending:
            return []
        values = torch.stack(
            [torch.stack([p.loss.float(), p.grad_norm.float(), p.skipped.float()]) for p in self._pending]
        )
        losses, norms, skipped = values.T.tolist()  # the one host sync
        rate = samples_per_step * len(self._pending) / max(seconds, 1e-9)
        now = time.time()
        records = [
            LogRecord(p.step, loss, norm, p.lr, p.ema_decay, rate, now, bool(skip))
            for p, loss, norm, skip in zip(self._pending, losses, norms, skipped, strict=True)
        ]
        self._pending = []
        if self._file is not None:
            self._file.writelines(r.to_json() + "\n" for r in records)
            self._file.flush()
        return records

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(path: str | Path) -> list[LogRecord]:
    """The records of a training log; none when there is no log."""
    path = Path(path)
    if not path.exists():
        return []
    return [LogRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
