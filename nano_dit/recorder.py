"""Where a validation goes: one recorder writes everything a `Validation` holds, for the trainer and
for `nano-dit validate` alike.

    recorder = ValidationRecorder(run_dir, config.report_inputs(scheme, log_path, stand_in))
    summary = recorder.record(validate(sampler, buckets, metrics), step, {"checkpoint": ...})

`record` writes `validation/stepNNNNNNN/results.json`, hands the PNGs and contact sheets to a
background thread (neither the next samples nor the training steps after them wait on PNG
compression), rewrites RESULTS.md with the verdict, and, where given, notes the validation in the
run's timings.json and logs its headline figures to the trackers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .hub import card_figures
from .report import ReportInputs, write_report
from .sheets import to_pil
from .timings import RunTimings
from .validation import TESTS, Validation


class ImageWriter:
    """Writes PNGs and contact sheets on one background thread. `wait()` before reading an image
    back (the model card's sheet) and before the next validation; it raises what a write raised."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="validation-images")
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


class ValidationRecorder:
    """Writes a run's validations and its report.

    Args:
        run_dir: the run's folder (`validation/` and RESULTS.md go there).
        report: what the verdict is judged with besides the validation (`ReportInputs`).
        log: the trackers' `log(values, step=...)` (`accelerator.log`); None logs nothing.
        timings: the run's `RunTimings`, noted and saved at each validation; None for a
            validation outside training.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        report: ReportInputs,
        log: Callable[..., None] | None = None,
        timings: RunTimings | None = None,
    ):
        self.run_dir, self.report_inputs, self.log, self.timings = Path(run_dir), report, log, timings
        self.writer = ImageWriter()
        self.last: dict = {}  # the newest validation's results and verdict
        self.folder: Path | None = None  # and its folder

    def record(self, validation: Validation, step: int, info: dict, setup_seconds: float | None = None) -> dict:
        """Write `validation` as step `step`'s, with `info` (where its weights came from, the
        CFG-dropout scheme, the run) at the top of results.json; then the report. Returns the
        verdict summary. `setup_seconds`: what building the pipeline and metrics took first."""
        folder = self.run_dir / "validation" / f"step{step:07d}"
        for name in TESTS:
            (folder / name).mkdir(parents=True, exist_ok=True)
        results = {"step": step, **info, **validation.results, "timings": validation.timings}
        (folder / "results.json").write_text(json.dumps(results, indent=2))
        for path, image in validation.images.items():
            self.writer.submit(_save_image, image, folder / path)
        for path, sheet in validation.sheets.items():
            self.writer.submit(_save_sheet, sheet, folder / path)
        if self.timings is not None:
            setup = {} if setup_seconds is None else {"setup": round(setup_seconds, 3)}
            seconds = validation.timings["seconds"] + (setup_seconds or 0.0)
            self.timings.note_validation(step, seconds, {**setup, **validation.timings["phases"]})
            self.timings.save()
        summary = self.report()
        self.last, self.folder = {**results, **summary}, folder
        if self.log is not None:
            self.log(card_figures(self.last), step=step)
        return summary

    def report(self, stopped: bool = False) -> dict:
        """RESULTS.md from the newest validation and the training log; `stopped`: the run stopped itself."""
        return write_report(self.run_dir, self.report_inputs, stopped=stopped)

    def card(self) -> tuple[dict, Image.Image | None]:
        """The newest validation's headline figures and reconstruction sheet, for the model card
        ({}, None before any)."""
        self.writer.wait()
        sheet = self.folder / "reconstruction" / "sheet.png" if self.folder else None
        return card_figures(self.last), Image.open(sheet) if sheet and sheet.exists() else None

    def wait(self) -> None:
        """Until every image handed to the writer is on disk."""
        self.writer.wait()


def _save_image(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)


def _save_sheet(sheet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.render().save(path)
