"""Validation power: train the demo preset once well and once with each deliberate fault, and show
which go / no-go indicators fire.

    python scripts/validation_power.py                  # all runs, into runs/validation_power/
    python scripts/validation_power.py --only good text-ignored
    python scripts/validation_power.py --rejudge        # no training: the runs there, judged anew
                                                        # with the preset's current thresholds

Faults: the text ignored and the DINOv3 embedding ignored (the model's input zeroed in every
forward, as a wiring bug would), the CFG drop masks ignored wherever a condition is given (the
null conditions never learned), the timestep replaced by a constant (a model blind to the noise
level), the seed's old independent-Bernoulli CFG dropout, and a learning rate that diverges. The
breaks are forward hooks put on the model from outside (`--fault`, `inject_fault`). Each run validates once, at its last step. Prints the fault × indicator table
(markdown) and writes it to runs/validation_power/table.md. Offline, CPU: about 4 minutes a run
on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "good": [],
    "text-ignored": ["--fault", "text-ignored"],
    "dino-ignored": ["--fault", "dino-ignored"],
    "bernoulli-cfg": ["--fault", "bernoulli-cfg"],
    "cfg-masks-ignored": ["--fault", "cfg-masks-ignored"],
    "timestep-constant": ["--fault", "timestep-constant"],
    "diverging-lr": ["--peak-lr", "0.05"],
}
SHORT = {"pass": "pass", "fail": "**FAIL**", "warn": "warn", "n/a": "–"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=list(RUNS), help="which runs")
    parser.add_argument("--out", default="runs/validation_power", help="folder of the runs and the table")
    parser.add_argument(
        "--rejudge", action="store_true", help="judge the runs already in --out with the current thresholds"
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more trainer flags for every run, after --")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("train_nano_dit", ROOT / "train_nano_dit.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)

    rows = {}
    for name in args.only:
        out = Path(args.out) / name
        flags = ["--preset", "demo", "--output-dir", str(out), *RUNS[name], *[x for x in args.extra if x != "--"]]
        config = trainer.parse_config(flags)
        if args.rejudge:
            summary = rejudge(out, config)
        else:
            print(f"== {name}: train_nano_dit.py {' '.join(flags)}", flush=True)
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


def rejudge(out: Path, config) -> dict:
    """A finished run's report written again with the preset's current thresholds."""
    from nano_dit.report import read_log, write_report

    log = read_log(out / "checkpoints" / "training_log.jsonl")
    return write_report(
        out,
        config.thresholds(),
        config.warmup_steps,
        scheme=config.cfg_dropout().scheme,
        stand_in=True,
        stopped=log[-1]["step"] < config.total_steps,  # the log keeps every step up to a stop
    )


def _table(rows: dict) -> str:
    names = list(dict.fromkeys(n for r in rows.values() for n in r["indicators"]))
    lines = ["| indicator | " + " | ".join(rows) + " |", "| --- |" + " --- |" * len(rows)]
    for n in names:
        cells = []
        for r in rows.values():
            i = r["indicators"].get(n)
            cells.append("–" if i is None else f"{SHORT[i['status']]} ({i['value'].split(' (')[0]})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| **verdict** | " + " | ".join(f"**{r['verdict']}**" for r in rows.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
