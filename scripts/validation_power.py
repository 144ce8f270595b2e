"""Validation power: train the demo preset once well and once with each deliberate fault, and show
which go / no-go indicators fire.

    python scripts/validation_power.py                  # all runs, into runs/validation_power/
    python scripts/validation_power.py --only good text-ignored
    python scripts/validation_power.py --rejudge        # no training: the runs there, judged anew
                                                        # with the preset's current thresholds

Faults: the text ignored and the DINOv3 embedding ignored (the model's input zeroed in every
forward, as a wiring bug would), the CFG drop masks ignored wherever a condition is given (the
null conditions never learned), the timestep replaced by a constant (a model blind to the noise
level), the plan's old independent-Bernoulli CFG dropout, a learning rate that diverges, and a CFG
mode (text only, image only) that the dropout never draws, so the model never learns it. The
breaks are made here, from outside the package (`broken`: a forward pre-hook on every model built,
or the old dropout in place of the exclusive one); the package itself carries no fault switch.
Each run validates once, at its last step. Prints the fault × indicator table (markdown) and
writes it to runs/validation_power/table.md; with the good run and a never-trained one, also
mode_samples.png, their CFG-mode sheets one under another (docs/mode_samples_never_trained.png).
Offline, CPU: about 7 minutes a run on 2 cores of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # run name -> (the fault it carries, extra trainer flags)
    "good": (None, []),
    "text-ignored": ("text-ignored", []),
    "dino-ignored": ("dino-ignored", []),
    "bernoulli-cfg": ("bernoulli-cfg", []),
    "cfg-masks-ignored": ("cfg-masks-ignored", []),
    "timestep-constant": ("timestep-constant", []),
    "diverging-lr": (None, ["--peak-lr", "0.05"]),
    # a CFG mode the dropout never draws: the model never learns it
    "text-only-never-trained": (None, ["--p-both", "0.8", "--p-text-only", "0"]),
    "image-only-never-trained": (None, ["--p-both", "0.8", "--p-image-only", "0"]),
}


# --------------------------------------------------------------------------------------------
# The faults: made here, from outside the package (the core carries no fault switch)
# --------------------------------------------------------------------------------------------
class IndependentDropout:
    """The plan's OLD dropout, kept only to show that validation catches it: text and image each
    dropped by its own Bernoulli draw, so the four modes come out as products (with 0.2 each:
    64 % both, 16 % text-only, 16 % image-only, 4 % none) and are not exact. Its scheme string
    says so; resume and `nano-dit validate` refuse any scheme that is not the exclusive one."""

    def __init__(self, p_text: float = 0.2, p_image: float = 0.2, seed: int = 0):
        self.p_text, self.p_image, self.seed = p_text, p_image, seed
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def scheme(self) -> str:
        return f"independent-bernoulli:text={self.p_text},image={self.p_image}"

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        draws = torch.rand(2, n, generator=self._generator)
        return draws[0] < self.p_text, draws[1] < self.p_image

    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])


def _zero(*names):
    def hook(module, args, kwargs):  # the input replaced by zeros, as a wiring bug would
        return args, {k: (torch.zeros_like(v) if k in names and v is not None else v) for k, v in kwargs.items()}

    return hook


def _ignore_masks(module, args, kwargs):  # the null conditions are never learned, nor used
    return args, {**kwargs, "drop_text": None, "drop_image": None}


def _constant_timestep(module, args, kwargs):  # a model blind to the noise level
    if len(args) > 1:  # (hidden_states, timestep, ...) positional, as the trainer and the pipeline call it
        return (args[0], torch.full_like(args[1], 500.0), *args[2:]), kwargs
    return args, {**kwargs, "timestep": torch.full_like(torch.as_tensor(kwargs["timestep"]), 500.0)}


MODEL_FAULTS = {
    "text-ignored": _zero("encoder_hidden_states"),
    "dino-ignored": _zero("image_embeds", "image_tokens"),
    "cfg-masks-ignored": _ignore_masks,
    "timestep-constant": _constant_timestep,
}
FAULTS = (*MODEL_FAULTS, "bernoulli-cfg")


@contextlib.contextmanager
def broken(fault: str | None):
    """Within it, every NanoDiTTransformer2DModel built (training's and validation's) carries the
    fault as a forward pre-hook, in training and sampling alike; "bernoulli-cfg" makes every run
    draw the old independent dropout instead."""
    from nano_dit import NanoDiTTransformer2DModel
    from nano_dit.config import TrainConfig

    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    saved = NanoDiTTransformer2DModel.__init__, TrainConfig.cfg_dropout
    if fault in MODEL_FAULTS:
        built = NanoDiTTransformer2DModel.__init__

        @functools.wraps(built)  # the signature stays: diffusers reads the config's keys from it
        def init(self, *args, **kwargs):
            built(self, *args, **kwargs)
            self.register_forward_pre_hook(MODEL_FAULTS[fault], with_kwargs=True)

        NanoDiTTransformer2DModel.__init__ = init
    elif fault == "bernoulli-cfg":
        TrainConfig.cfg_dropout = lambda config, rank=0: IndependentDropout(0.2, 0.2, seed=config.seed + rank)
    try:
        yield
    finally:
        NanoDiTTransformer2DModel.__init__, TrainConfig.cfg_dropout = saved


SHORT = {"pass": "pass", "fail": "**FAIL**", "warn": "warn", "n/a": "–"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=list(RUNS), help="which runs")
    parser.add_argument("--out", default="runs/validation_power", help="folder of the runs and the table")
    parser.add_argument(
        "--rejudge", action="store_true", help="judge the runs already in --out with the current thresholds"
    )
    parser.add_argument(
        "--revalidate",
        action="store_true",
        help="no training: validate the final weights of the runs already in --out again (with the fault), then judge",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more trainer flags for every run, after --")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("train_nano_dit", ROOT / "train_nano_dit.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)

    rows = {}
    for name in args.only:
        out = Path(args.out) / name
        fault, extra = RUNS[name]
        flags = ["--preset", "demo", "--output-dir", str(out), *extra, *[x for x in args.extra if x != "--"]]
        with broken(fault):
            config = trainer.parse_config(flags)
            if args.revalidate:
                from nano_dit.cli import validate_checkpoint

                final = out / "checkpoints" / "checkpoint_final"
                try:
                    if final.exists():
                        validate_checkpoint(final, cache=config.cache, output_dir=out)
                except ValueError as err:  # the old dropout's checkpoints are refused: its own validation stands
                    print(f"   {name}: not validated again ({str(err).split(':')[0]})")
                summary = rejudge(out, config)  # with the run's own log (a stopped run has no final weights)
            elif args.rejudge:
                summary = rejudge(out, config)
            else:
                print(f"== {name} (fault: {fault}): train_nano_dit.py {' '.join(flags)}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                flags += ["--validation-every", str(config.total_steps)]  # one validation, at the end
                try:
                    trainer.main(flags)
                except RuntimeError as err:  # K non-finite steps in a row: the run stops, its log is judged
                    print(f"   {name} stopped: {str(err).split(':')[0]}")
                summary = json.loads((out / "validation" / "verdict.json").read_text())
        rows[name] = {"verdict": summary["verdict"], "indicators": {i["name"]: i for i in summary["indicators"]}}
    table = _table(rows)
    print(table)
    Path(args.out, "table.md").write_text(table + "\n")
    figure = mode_figure(Path(args.out), [n for n in rows if n == "good" or n.endswith("-never-trained")])
    if figure:
        print(f"The CFG modes' samples, run by run: {figure}")


def mode_figure(out: Path, names: list[str]) -> Path | None:
    """The runs' CFG-mode sheets (their last validation's `modes/sheet.png`: training images, then
    unguided text-only and image-only samples from the same noise) one under another, each under
    its run's name, in `out`/mode_samples.png. None where fewer than two runs have one."""
    from PIL import Image, ImageDraw

    sheets = {}
    for name in names:
        found = sorted((out / name / "validation").glob("step*/modes/sheet.png"))
        if found:
            sheets[name] = Image.open(found[-1]).convert("RGB")
    if len(sheets) < 2:
        return None
    label = 16
    width = max(sheet.width for sheet in sheets.values())
    figure = Image.new("RGB", (width, sum(sheet.height + label for sheet in sheets.values())), "white")
    draw, y = ImageDraw.Draw(figure), 0
    for name, sheet in sheets.items():
        draw.text((4, y + 3), f"run: {name}", fill="black")
        figure.paste(sheet, (0, y + label))
        y += sheet.height + label
    path = out / "mode_samples.png"
    figure.save(path)
    return path


def rejudge(out: Path, config) -> dict:
    """A finished run's report written again with the preset's current thresholds."""
    from nano_dit.report import ReportInputs, write_report
    from nano_dit.training_log import read_log

    log = read_log(out / "checkpoints" / "training_log.jsonl")
    inputs = ReportInputs.of_run(config, config.cfg_dropout().scheme, stand_in=True)
    return write_report(
        out, inputs, stopped=log[-1].step < config.total_steps
    )  # the log keeps every step up to a stop


def _table(rows: dict) -> str:
    names = list(dict.fromkeys(n for r in rows.values() for n in r["indicators"]))
    lines = ["| indicator | " + " | ".join(rows) + " |", "| --- |" + " --- |" * len(rows)]
    for n in names:
        cells = []
        for r in rows.values():
            i = r["indicators"].get(n)
            margin = f"; margin {i['margin']}" if i and i.get("margin") else ""
            cells.append("–" if i is None else f"{SHORT[i['status']]} ({i['value'].split(' (')[0]}{margin})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| **verdict** | " + " | ".join(f"**{r['verdict']}**" for r in rows.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
