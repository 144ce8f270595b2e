"""Where a validation goes: one recorder writes everything a `Validation` holds, for the trainer and
for `nano-dit validate` alike.

    recorder = ValidationRecorder(run_dir, config.report_inputs(scheme, log_path, stand_in))
    summary = recorder.record(validate(sampler, buckets, metrics), step, {"checkpoint": ...})

`record` writes `validation/stepNNNNNNN/results.json`, hands the PNGs and contact sheets to a
background thread (neither the next samples nor the training steps after them wait on PNG
compression), rewrites RESULTS.md with the verdict, and, where given, notes the validation in the
run's timings.json and sends the trackers its figures and its contact sheets, as diffusers'
`log_validation` does: TensorBoard through `add_images`, W&B through `wandb.Image`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

import numpy as np
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
        trackers: Accelerate's trackers (`accelerator.trackers`), sent each validation's figures
            and sheets; none: nothing is sent.
        timings: the run's `RunTimings`, noted and saved at each validation; None for a
            validation outside training.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        report: ReportInputs,
        trackers: list | tuple = (),
        timings: RunTimings | None = None,
    ):
        self.run_dir, self.report_inputs, self.trackers, self.timings = Path(run_dir), report, trackers, timings
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
        sheets = {}  # rendered here only for the trackers; else on the writer's thread
        for path, sheet in validation.sheets.items():
            if self.trackers:
                sheets[path] = sheet.render()
                self.writer.submit(_save_image, sheets[path], folder / path)
            else:
                self.writer.submit(_save_sheet, sheet, folder / path)
        if self.timings is not None:
            setup = {} if setup_seconds is None else {"setup": round(setup_seconds, 3)}
            seconds = validation.timings["seconds"] + (setup_seconds or 0.0)
            self.timings.note_validation(step, seconds, {**setup, **validation.timings["phases"]})
            self.timings.save()
        summary = self.report()
        self.last, self.folder = {**results, **summary}, folder
        if self.trackers:
            log_validation(self.trackers, tracker_figures(self.last), sheets, step)
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


def tracker_figures(results: dict) -> dict:
    """Every figure of a validation's report, as the trackers take them: the headline figures (the
    model card's), the probes', each CFG mode's, and how many indicators passed, warned and failed."""
    figures = dict(card_figures(results))
    probes = results.get("model_probes") or {}
    for name in ("null_vs_conditional", "guided_vs_unguided", "sigma_0.25_vs_0.75"):
        if probes.get(name) is not None:
            figures[f"probe_{name}"] = probes[name]
    modes = probes.get("modes") or {}
    for mode, p in (modes.get("predictions") or {}).items():
        if p.get("relative_error") is not None:
            figures[f"mode_{mode}_relative_error"] = p["relative_error"]
    for measure, drawn in (modes.get("samples_drawn") or {}).items():
        if drawn.get("share_drawn") is not None:
            figures[f"mode_samples_{measure}_drawn"] = drawn["share_drawn"]
    statuses = [i["status"] for i in results.get("indicators", [])]
    figures.update({f"indicators_{s}": statuses.count(s) for s in ("pass", "warn", "fail")})
    return figures


def log_validation(trackers, figures: dict, sheets: dict[str, Image.Image], step: int) -> None:
    """The figures and the contact sheets (`reconstruction/sheet.png` -> `validation/reconstruction`)
    to each tracker, as diffusers' `log_validation` sends its images: TensorBoard by `add_images`,
    W&B by `wandb.Image`; any other tracker gets the figures."""
    named = {f"validation/{Path(path).parent.name}": image for path, image in sheets.items()}
    for tracker in trackers:
        tracker.log(figures, step=step)
        if tracker.name == "tensorboard":
            for name, image in named.items():
                tracker.writer.add_images(name, np.asarray(image.convert("RGB"))[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image, caption=name)] for name, image in named.items()}, step=step)


def _save_image(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else to_pil(image)).save(path)


def _save_sheet(sheet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.render().save(path)
