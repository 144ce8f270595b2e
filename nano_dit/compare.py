"""Designs side by side: `nano-dit compare RUN_OR_GROUP...` writes COMPARE.md and its pictures.

    nano-dit compare runs/adaln runs/tokens        # two groups of seeds (train_nano_dit.py --seeds)
    nano-dit compare runs/a_seed0 runs/a_seed1 runs/b_seed0 --out runs/ab

A run folder describes itself, wherever it was trained: `config.json` (the design and its seed),
`validation/step*/results.json` (every figure, the indicators and the verdict, with the contact
sheets beside them), `checkpoints/training_log.jsonl`, `timings.json`, and `stopped.json` when a
signal stopped it. Nothing else is read: no weights, no data, no absolute path the run recorded.

A *group* is a folder of runs (`seed0/`, `seed1/`, ... as `--seeds` writes them): one design. Run
folders given one by one are grouped by their settings, the seed and the run's own paths left
out. The first design is the baseline the others are measured against.

Only finished runs count: validated at their last step, not stopped. Every other run is named in
the report with what it lacks, never dropped in silence. Each figure is stated as its mean and
standard deviation over the seeds; a difference between two designs is *beyond the noise* when the
95 % confidence interval of the difference of their means (Welch's t, which does not assume the
designs are equally noisy) leaves out 0, and its size is given as a multiple of that interval's
half-width.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .folders import write_aside
from .report import MARK, smooth
from .training_log import LogRecord, read_log

LEVEL = 0.95  # the confidence of "beyond the noise"
REPORT = "COMPARE.md"
PICTURES = "compare"  # the folder of COMPARE.md's pictures, beside it
TESTS = ("reconstruction", "dino_swap", "text_manip", "modes")
TEST_TITLES = {
    "reconstruction": "Reconstruction (ground truth | generated)",
    "dino_swap": "DINO swap (A | B | A's caption + A's DINO | A's caption + B's DINO | the target)",
    "text_manip": "Text manipulation (original | from its caption | from the edited caption | the edit drawn)",
    "modes": "CFG modes, unguided (training image | text only | image only)",
}
# A run's own settings, not its design's: left out when runs are grouped and designs compared.
RUN_SETTINGS = {"output_dir", "checkpoint_dir", "seed", "seeds", "resume", "overwrite_output_dir", "cpu_threads"}
RUN_SETTINGS |= {"report_to", "tracker_project_name", "push_to_hub", "hub_private", "hub_model_id"}
PATH_SETTINGS = {"shards", "cache", "stand_in_encoders"}  # named differently on another machine


@dataclass(frozen=True)
class Figure:
    """One figure of a run: `better` says which way is better ("higher", "lower"; "" for a figure
    shown and tested for a difference but not ranked, such as a probe's)."""

    key: str
    label: str
    better: str
    fmt: str = "{:.3f}"


FIGURES = [
    Figure("memorised", "reconstructions memorised (share)", "higher", "{:.2f}"),
    Figure("reconstruction_stlpips", "reconstruction ST-LPIPS", "lower", "{:.4f}"),
    Figure("reconstruction_lpips", "reconstruction LPIPS", "lower", "{:.4f}"),
    Figure("reconstruction_psnr", "reconstruction PSNR (dB)", "higher", "{:.2f}"),
    Figure("reconstruction_ssim", "reconstruction SSIM", "higher", "{:.4f}"),
    Figure("dino_swap_transferred", "DINO swaps taken (share)", "higher", "{:.2f}"),
    Figure("dino_swap_scene_taken", "DINO swap: toward B's scene", "higher"),
    Figure("dino_swap_shapes_kept", "DINO swap: A's shapes kept", "higher"),
    Figure("dino_swap_sensitivity", "DINO-swap sensitivity", "", "{:.4f}"),
    Figure("text_edits_followed", "text edits followed (share)", "higher", "{:.2f}"),
    Figure("text_toward_edit", "text edits: toward the edit", "higher"),
    Figure("text_sensitivity", "text sensitivity", "", "{:.4f}"),
    Figure("mode_both_relative_error", "mode both: distance to its ideal", "lower"),
    Figure("mode_text_relative_error", "mode text only: distance to its ideal", "lower"),
    Figure("mode_image_relative_error", "mode image only: distance to its ideal", "lower"),
    Figure("mode_none_relative_error", "mode none: distance to its ideal", "lower"),
    Figure("mode_samples_text_drawn", "text-only samples drawing the shapes (share)", "higher", "{:.2f}"),
    Figure("mode_samples_image_drawn", "image-only samples drawing the scene (share)", "higher", "{:.2f}"),
    Figure("mode_samples_image_shapes_drawn", "image-only samples with shapes (share)", "higher", "{:.2f}"),
    Figure("probe_null_vs_conditional", "probe: null vs conditional prediction", "", "{:.4f}"),
    Figure("probe_guided_vs_unguided", "probe: guided vs unguided samples", "", "{:.4f}"),
    Figure("probe_sigma", "probe: σ 0.25 vs 0.75 prediction", "", "{:.4f}"),
    Figure("final_loss", "training loss at the end (smoothed)", "lower", "{:.5f}"),
    Figure("steps_per_s", "training steps/s (this run's machine)", "higher", "{:.2f}"),
]
FIGURE = {f.key: f for f in FIGURES}


# --------------------------------------------------------------------------------------------
# The arithmetic
# --------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """The mean and the standard deviation over the seeds (n - 1 in the denominator; None for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass(frozen=True)
class Difference:
    """`b` - `a` over the seeds: `delta` the difference of the means, `half_width` that of its
    confidence interval at `LEVEL` (Welch's t; None when a design has a single seed: no spread to
    judge by), `beyond` whether the interval leaves out 0 (None: cannot say)."""

    delta: float
    half_width: float | None
    beyond: bool | None

    @property
    def ratio(self) -> float | None:
        """|delta| over the half-width: > 1 beyond the noise, and by how much."""
        if self.half_width is None:
            return None
        if self.half_width == 0:
            return math.inf if self.delta else 0.0
        return abs(self.delta) / self.half_width


def difference(a: list[float], b: list[float], level: float = LEVEL) -> Difference:
    """Welch's confidence interval for mean(b) - mean(a), from each design's seeds. Two designs
    that gave each the same value on every seed, differently, differ beyond the noise (there is none)."""
    from scipy import stats

    delta = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return Difference(delta, None, None)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(delta, 0.0, delta != 0)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return Difference(delta, half, abs(delta) > half)


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run folder, as it describes itself. `problem` says why it does not count (None: finished)."""

    path: Path
    config: dict
    validations: list[dict]
    log: list[LogRecord]
    timings: dict | None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def final(self) -> dict | None:
        return self.validations[-1] if self.validations else None

    def figures(self) -> dict[str, float]:
        """Every figure of FIGURES this run recorded, from its last validation and its log."""
        out = _validation_figures(self.final) if self.final else {}
        losses = [r.loss for r in self.log if not r.skipped]
        if len(losses) >= 20:
            out["final_loss"] = smooth(losses, max(len(losses) // 20, 5))[-1]
        rate = ((self.timings or {}).get("training") or {}).get("steps_per_s")
        if rate:
            out["steps_per_s"] = rate
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _validation_figures(results: dict) -> dict[str, float | None]:
    recon, swap, manip = results["reconstruction"], results["dino_swap"], results["text_manip"]
    probes = results.get("model_probes") or {}
    modes = probes.get("modes") or {}
    out = {
        "memorised": _memorised(results),
        "reconstruction_stlpips": recon.get("mean_stlpips"),
        "reconstruction_lpips": recon.get("mean_lpips"),
        "reconstruction_psnr": recon.get("mean_psnr"),
        "reconstruction_ssim": recon.get("mean_ssim"),
        "dino_swap_transferred": swap.get("share_transferred"),
        "dino_swap_scene_taken": swap.get("mean_scene_taken"),
        "dino_swap_shapes_kept": swap.get("mean_shapes_kept"),
        "dino_swap_sensitivity": swap.get("mean_sensitivity"),
        "text_edits_followed": manip.get("share_followed"),
        "text_toward_edit": manip.get("mean_toward_edit"),
        "text_sensitivity": manip.get("mean_sensitivity"),
        "probe_null_vs_conditional": probes.get("null_vs_conditional"),
        "probe_guided_vs_unguided": probes.get("guided_vs_unguided"),
        "probe_sigma": probes.get("sigma_0.25_vs_0.75"),
    }
    for mode, p in (modes.get("predictions") or {}).items():
        out[f"mode_{mode}_relative_error"] = p.get("relative_error")
    for measure, drawn in (modes.get("samples_drawn") or {}).items():
        out[f"mode_samples_{measure}_drawn"] = drawn.get("share_drawn")
    return out


def _memorised(results: dict) -> float | None:
    """The share of reconstructions memorised by the lines the run's report judged with (a preset
    that judges image by image); None where it judges the mean alone."""
    t = results.get("thresholds") or {}
    per_image = results["reconstruction"].get("per_image") or []
    metric = t.get("decide_on")
    if t.get("memorised_share") is None or not per_image or metric not in per_image[0]:
        return None
    line, min_psnr = t[f"{metric}_success"], t.get("min_psnr")
    good = [p[metric] <= line and (min_psnr is None or p["psnr"] >= min_psnr) for p in per_image]
    return sum(good) / len(good)


def read_run(path: Path) -> Run:
    """A run folder: its config, validations, log and timings, and whether it finished."""
    config = json.loads((path / "config.json").read_text())
    validations = []
    for results_path in sorted((path / "validation").glob("step*/results.json")):
        results = json.loads(results_path.read_text())
        results["folder"] = str(results_path.parent.relative_to(path))
        validations.append(results)
    validations.sort(key=lambda r: r["step"])
    log_path = path / "checkpoints" / "training_log.jsonl"
    if not log_path.exists() and config.get("checkpoint_dir"):  # kept elsewhere on its machine
        log_path = Path(config["checkpoint_dir"]) / "training_log.jsonl"
    timings_path = path / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else None
    run = Run(path, config, validations, read_log(log_path), timings)
    run.problem = _unfinished(run)
    if not run.log:
        run.notes.append("no training log (checkpoints/training_log.jsonl): no loss curve, no final loss")
    return run


def _unfinished(run: Run) -> str | None:
    """Why `run` does not count, or None: finished, validated at its last step."""
    total, stopped = run.config.get("total_steps"), run.path / "stopped.json"
    if stopped.exists():
        record = json.loads(stopped.read_text())
        return f"stopped by {record.get('signal')} after step {record.get('step')} of {total} (not resumed)"
    if not run.validations:
        done = f"; trained to step {run.log[-1].step} of {total}" if run.log else ""
        return (
            "no validation"
            + (" (trained with --no-validation)" if run.config.get("validation") is False else "")
            + done
        )
    if run.final["step"] != total:
        done = run.log[-1].step if run.log else "?"
        return f"unfinished: its last validation is at step {run.final['step']} of {total} (trained to step {done})"
    return None


def runs_of(path: str | os.PathLike) -> tuple[list[Run], bool]:
    """The runs a path names: itself (a run folder, with its config.json) or the run folders in it
    (a group). Returns them and whether the path was a group."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or group folder")
    if (path / "config.json").exists():
        return [read_run(path)], False
    inside = sorted((p for p in path.iterdir() if (p / "config.json").exists()), key=_seed_order)
    if not inside:
        raise ValueError(f"{path} is neither a run folder (no config.json) nor a group of them (no run folder in it)")
    return [read_run(p) for p in inside], True


def _seed_order(path: Path):
    name = path.name
    digits = name[4:] if name.startswith("seed") else ""
    return (0, int(digits), name) if digits.isdigit() else (1, 0, name)


@dataclass
class Design:
    """One design: its name and its runs (one per seed); `counted` are the finished ones."""

    name: str
    runs: list[Run]

    @property
    def counted(self) -> list[Run]:
        return [r for r in self.runs if r.problem is None]

    def values(self, key: str) -> list[float]:
        return [v for v in (r.figures().get(key) for r in self.counted) if v is not None]

    @property
    def settings(self) -> dict:
        first = (self.counted or self.runs)[0]
        return design_settings(first.config)


def design_settings(config: dict) -> dict:
    """A run's settings, flat (`model.hidden_size`, `sampling.guidance_scale`), its own left out."""
    flat = {}
    for key, value in config.items():
        if key in RUN_SETTINGS:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def designs_of(paths: list[str | os.PathLike]) -> list[Design]:
    """Each group a design; loose run folders grouped by their settings (paths left out)."""
    designs, loose = [], []
    for path in paths:
        runs, group = runs_of(path)
        if group:
            designs.append(Design(Path(path).resolve().name, runs))
        else:
            loose += runs
    by_settings: dict[str, list[Run]] = {}
    for run in loose:
        key = json.dumps(
            {k: v for k, v in design_settings(run.config).items() if k not in PATH_SETTINGS}, sort_keys=True
        )
        by_settings.setdefault(key, []).append(run)
    for runs in by_settings.values():
        names = [r.name for r in runs]
        designs.append(Design("+".join(names) if len(names) <= 3 else f"{names[0]}+{len(names) - 1} more", runs))
    taken = set()
    for design in designs:  # two groups of the same folder name (runs/a/x, runs/b/x): tell them apart
        if design.name in taken:
            design.name = f"{design.runs[0].path.resolve().parent.parent.name}/{design.name}"
        taken.add(design.name)
    return designs


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def comparison(designs: list[Design]) -> dict:
    """Every figure of every design (per seed, mean, SD) and each design's difference from the first."""
    base = designs[0]
    figures = []
    for spec in FIGURES:
        per = {d.name: d.values(spec.key) for d in designs}
        if not any(per.values()):
            continue
        entry = {"key": spec.key, "label": spec.label, "better": spec.better, "designs": {}, "differences": {}}
        for name, values in per.items():
            mean, sd = mean_sd(values) if values else (None, None)
            entry["designs"][name] = {"values": values, "mean": mean, "sd": sd}
        for other in designs[1:]:
            if per[base.name] and per[other.name]:
                d = difference(per[base.name], per[other.name])
                entry["differences"][other.name] = {**asdict(d), "ratio": d.ratio}
        figures.append(entry)
    return {"baseline": base.name, "level": LEVEL, "figures": figures}


def write_comparison(paths: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """COMPARE.md (and `compare/`: its pictures and compare.json) for the runs and groups in
    `paths`, in `out` (default: a single group's own folder, else the folder the paths share).
    Returns the report's path."""
    designs = designs_of(paths)
    out = Path(out) if out is not None else _default_out(paths)
    pictures = out / PICTURES
    pictures.mkdir(parents=True, exist_ok=True)
    stats = comparison(designs) if any(d.counted for d in designs) else {"figures": [], "baseline": designs[0].name}
    seed = _common_seed(designs)
    drawn = {"curves": plot_curves(designs, pictures / "curves.png")}
    if stats["figures"]:
        drawn["figures"] = plot_figures(designs, stats, pictures / "figures.png")
    for test in TESTS:
        if side_by_side(designs, test, seed, pictures / f"{test}.png"):
            drawn[test] = True
    record = {
        "designs": [
            {
                "name": d.name,
                "runs": [
                    {"path": os.path.relpath(r.path, out), "seed": r.seed, "problem": r.problem, "notes": r.notes}
                    for r in d.runs
                ],
            }
            for d in designs
        ],
        **stats,
    }
    write_aside(pictures / "compare.json", json.dumps(record, indent=2))
    text = _markdown(designs, stats, out, seed, drawn)
    write_aside(out / REPORT, text)
    return out / REPORT


def _default_out(paths) -> Path:
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) == 1 and not (resolved[0] / "config.json").exists():
        return resolved[0]
    return Path(os.path.commonpath([p.parent for p in resolved]))


def _common_seed(designs: list[Design]) -> int | None:
    """A seed every design has a finished run of: their sheets are then of the same noise."""
    common = None
    for design in designs:
        seeds = {r.seed for r in design.counted}
        common = seeds if common is None else common & seeds
    return min(common) if common else None


def _fmt(spec: dict, value: float | None) -> str:
    return "–" if value is None else FIGURE[spec["key"]].fmt.format(value)


def _judged(spec: dict, diff: dict, other: str, base: str) -> str:
    """A difference in words: which design is ahead, and whether beyond the noise."""
    delta, half, ratio = diff["delta"], diff["half_width"], diff["ratio"]
    shown = f"{'+' if delta >= 0 else '−'}{_fmt(spec, abs(delta))}"
    if half is None:
        return f"{shown}; a single seed: no spread to judge by"
    shown += f" ± {_fmt(spec, half)}"
    if not diff["beyond"]:
        return f"{shown}: within the noise" + ("" if ratio is None or delta == 0 else f" ({ratio:.1f}×)")
    if spec["better"]:
        ahead = other if (delta > 0) == (spec["better"] == "higher") else base
        side = f"{ahead} better"
    else:
        side = f"{other} {'higher' if delta > 0 else 'lower'}"
    size = "no seed-to-seed spread at all" if half == 0 else f"{ratio:.1f}× the noise"
    return f"**{shown}: beyond the noise, {side}** ({size})"


def _markdown(designs: list[Design], stats: dict, out: Path, seed: int | None, drawn: dict) -> str:
    base = designs[0]
    title = " vs ".join(f"{d.name} ({len(d.counted)} seed{'s' if len(d.counted) != 1 else ''})" for d in designs)
    lines = [f"# Designs compared: {title}" if len(designs) > 1 else f"# Seeds of one design: {title}", ""]
    if any(r.config.get("stand_in_encoders") for d in designs for r in d.runs):
        lines += [
            "> **Stand-in encoders**: tiny random T5 / DINOv3. The figures compare the designs on this machinery,",
            "> not what real conditioning would learn.",
            "",
        ]
    lines += ["## What it says", "", *_summary(designs, stats), ""]
    lines += ["## The designs", "", *_designs_table(designs, out), ""]
    if stats["figures"]:
        lines += [
            f"## Every figure (mean ± SD over the seeds, then each seed's){'' if len(designs) == 1 else '; the difference from ' + base.name}",
            "",
            *_figures_table(designs, stats),
            "",
        ]
    lines += ["## Every verdict row (each seed's status)", "", *_verdict_rows(designs), ""]
    lines += ["## Curves", "", "![training loss and the validation figures, every run](compare/curves.png)", ""]
    if "figures" in drawn:
        lines += [
            "Each figure's seeds (dots) and mean (bar):",
            "",
            "![each figure, seed by seed](compare/figures.png)",
            "",
        ]
    if any(t in drawn for t in TESTS):
        noise = (
            f"seed {seed} of every design: the same validation noise"
            if seed is not None
            else "each design's first finished seed (no seed common to all: the noise differs)"
        )
        lines += [f"## The same samples, side by side ({noise})", ""]
        for test in TESTS:
            if test in drawn:
                lines += [f"{TEST_TITLES[test]}:", "", f"![{test}](compare/{test}.png)", ""]
    lines += ["## How to read it", "", *_method(), ""]
    return "\n".join(lines)


def _summary(designs: list[Design], stats: dict) -> list[str]:
    base, out = designs[0], []
    for d in designs:
        verdicts = [(r.seed, (r.final or {}).get("verdict")) for r in d.counted]
        gos = sum(v == "GO" for _, v in verdicts)
        line = f"- **{d.name}**: GO on {gos} of {len(verdicts)} finished seed{'s' if len(verdicts) != 1 else ''}"
        others = [f"seed {s}: {v or 'no verdict recorded'}" for s, v in verdicts if v != "GO"]
        out.append(line + (f" ({'; '.join(others)})" if others else "") + ".")
    left = [(d, r) for d in designs for r in d.runs if r.problem is not None]
    for d, r in left:
        out.append(f"- ⚠️ Left out: **{d.name} / {r.name}** (seed {r.seed}): {r.problem}.")
    for d in designs:
        if not d.counted:
            out.append(f"- ❌ **{d.name}** has no finished run: none of its figures can be compared.")
        elif len(d.counted) == 1:
            out.append(
                f"- **{d.name}** has a single finished seed: its spread is unknown, so no difference is judged."
            )
    out += [f"- Note, {d.name} / {r.name}: {note}." for d in designs for r in d.runs for note in r.notes]
    if len(designs) == 1:
        out.append(f"- One design: each figure's mean ± SD over {len(designs[0].counted)} seeds below.")
        return out
    for other in designs[1:]:
        judged = [(f, f["differences"][other.name]) for f in stats["figures"] if other.name in f["differences"]]
        beyond = [(f, d) for f, d in judged if d["beyond"]]
        within = [f["label"] for f, d in judged if d["beyond"] is False]
        if beyond:
            out.append(
                f"- **{other.name} against {base.name}, beyond the seed noise** ({len(beyond)} of {len(judged)} figures):"
            )
            out += [f"  - {f['label']}: {_judged(f, d, other.name, base.name)}" for f, d in beyond]
        elif judged and all(d["beyond"] is not None for _, d in judged):
            out.append(
                f"- **{other.name} against {base.name}: no figure differs beyond the seed noise** ({len(judged)} figures)."
            )
        if within:
            out.append(f"- Within the noise ({len(within)}): {', '.join(within)}.")
    return out


def _designs_table(designs: list[Design], out: Path) -> list[str]:
    header = "| | " + " | ".join(d.name for d in designs) + " |"
    rows = [header, "|---" * (len(designs) + 1) + "|"]

    def runs(d: Design) -> str:
        cells = []
        for r in d.runs:
            report = r.path / "RESULTS.md"
            name = f"[{r.name}]({os.path.relpath(report, out)})" if report.exists() else r.name
            cells.append(name + ("" if r.problem is None else " (left out)"))
        return ", ".join(cells)

    rows.append("| runs | " + " | ".join(runs(d) for d in designs) + " |")
    rows.append("| parameters | " + " | ".join(_parameters(d) for d in designs) + " |")
    settings = [d.settings for d in designs]
    differ = sorted(k for k in set().union(*settings) if len({json.dumps(s.get(k)) for s in settings}) > 1)
    for key in differ:
        rows.append(f"| {key} | " + " | ".join(str(s.get(key, "–")) for s in settings) + " |")
    if len(designs) > 1 and not differ:
        rows.append("| settings | " + " | ".join("the same" for _ in designs) + " |")
    for d in designs:  # runs of one design should differ in their seed alone
        own = [design_settings(r.config) for r in d.runs]
        split = sorted(
            k for k in set().union(*own) if k not in PATH_SETTINGS and len({json.dumps(s.get(k)) for s in own}) > 1
        )
        if split:
            rows += ["", f"⚠️ The runs of {d.name} differ in more than their seed: {', '.join(split)}."]
    return rows


def _parameters(design: Design) -> str:
    import torch

    from .transformer_nano_dit import NanoDiTTransformer2DModel

    model = (design.counted or design.runs)[0].config.get("model") or {}
    if not model:
        return "–"
    with torch.device("meta"):
        count = NanoDiTTransformer2DModel(**model).num_parameters()
    return f"{count / 1e6:.2f}M"


def _figures_table(designs: list[Design], stats: dict) -> list[str]:
    base = designs[0]
    header = "| figure | better | " + " | ".join(d.name for d in designs)
    header += "".join(f" | {d.name} − {base.name} (95 %)" for d in designs[1:]) + " |"
    rows = [header, "|---" * (2 + len(designs) + len(designs) - 1) + "|"]
    for f in stats["figures"]:
        cells = [f["label"], f["better"] or "–"]
        for d in designs:
            e = f["designs"][d.name]
            if e["mean"] is None:
                cells.append("–")
                continue
            spread = f" ± {_fmt(f, e['sd'])}" if e["sd"] is not None else ""
            seeds = ", ".join(_fmt(f, v) for v in e["values"])
            cells.append(f"{_fmt(f, e['mean'])}{spread} ({seeds})")
        for d in designs[1:]:
            diff = f["differences"].get(d.name)
            cells.append(_judged(f, diff, d.name, base.name) if diff else "–")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _verdict_rows(designs: list[Design]) -> list[str]:
    names = []
    for d in designs:
        for r in d.counted:
            names += [i["name"] for i in (r.final or {}).get("indicators", []) if i["name"] not in names]
    if not names:
        return ["No finished run recorded its indicators."]
    header = "| indicator | " + " | ".join(
        f"{d.name} (seeds {', '.join(str(r.seed) for r in d.counted)})" for d in designs
    )
    rows = [header + " |", "|---" * (len(designs) + 1) + "|"]
    for name in names:
        cells = []
        for d in designs:
            marks = []
            for r in d.counted:
                found = next((i for i in (r.final or {}).get("indicators", []) if i["name"] == name), None)
                marks.append(MARK[found["status"]] if found else "–")
            cells.append(" ".join(marks) or "–")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    verdicts = [" ".join(str((r.final or {}).get("verdict", "–")) for r in d.counted) or "–" for d in designs]
    rows.append("| **verdict** | " + " | ".join(verdicts) + " |")
    return rows


def _method() -> list[str]:
    return [
        f"- A figure's spread is its standard deviation over the design's finished seeds (n − 1). Two designs differ "
        f"*beyond the noise* when the {LEVEL:.0%} confidence interval of the difference of their means, from "
        "Welch's t (each design its own spread), leaves out 0; the multiple is |difference| over the interval's "
        "half-width (1× is the edge). A design with one seed has no spread: no difference is judged.",
        "- The seed moves everything at once: the weights' start, the data order, the training noise, the CFG "
        "dropout and the validation noise. The spread is the whole of what a rerun changes.",
        "- With three seeds the interval is wide (Student's t at about 4 degrees of freedom is 2.8, against 2.0 "
        "with many seeds): a difference the report calls within the noise may still be real, and more seeds narrow it.",
        f"- Each figure is tested on its own, at {LEVEL:.0%}: among 20 figures that do not differ at all, about one "
        "reads as beyond the noise by chance. Trust a difference that the pictures show and that related figures "
        "agree on (ST-LPIPS with PSNR, swaps taken with the scene taken).",
        "- Shares (of images memorised, swaps, edits) move in steps of one image, pair or edit; a figure equal on "
        "every seed of both designs has no spread, and then any difference between them is beyond it.",
        "- Training steps/s are measured on each run's own machine: compare them only between runs of one machine.",
    ]


# --------------------------------------------------------------------------------------------
# The pictures
# --------------------------------------------------------------------------------------------
def _colors(designs: list[Design]) -> dict[str, str]:
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    return {d.name: cycle[i % len(cycle)] for i, d in enumerate(designs)}


CURVE_FIGURES = (  # the validation figures drawn over the steps
    ("reconstruction_stlpips", "reconstruction ST-LPIPS (lower is better)"),
    ("dino_swap_transferred", "DINO swaps taken (share)"),
    ("text_edits_followed", "text edits followed (share)"),
)


def plot_curves(designs: list[Design], path: Path) -> bool:
    """The training loss (smoothed) and the validation figures over the steps, every run; a design
    a colour, its seeds thin lines of it; left-out runs dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(designs)
    fig, axes = plt.subplots(1, 1 + len(CURVE_FIGURES), figsize=(4.2 * (1 + len(CURVE_FIGURES)), 3.8))
    for d in designs:
        for i, r in enumerate(d.runs):
            style = dict(color=colors[d.name], lw=1.0, ls="-" if r.problem is None else "--", alpha=0.8)
            label = d.name if i == 0 else None
            losses = [x.loss for x in r.log if not x.skipped]
            if len(losses) >= 2:
                steps = [x.step for x in r.log if not x.skipped]
                axes[0].plot(steps, smooth(losses, max(len(losses) // 20, 5)), label=label, **style)
            for ax, (key, _) in zip(axes[1:], CURVE_FIGURES):
                points = [(v["step"], _validation_figures(v).get(key)) for v in r.validations]
                points = [(s, y) for s, y in points if y is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", ms=4, label=label, **style)
    axes[0].set(title="training loss (running median)", xlabel="step", yscale="log")
    for ax, (_, title) in zip(axes[1:], CURVE_FIGURES):
        ax.set(title=title, xlabel="step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_figures(designs: list[Design], stats: dict, path: Path, most: int = 12) -> bool:
    """One small panel per ranked figure: each design's seeds as dots, its mean as a bar, and the
    baseline's mean as a line across; the panel's title says whether the difference is beyond the noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [f for f in stats["figures"] if f["better"]][:most]
    if not shown:
        return False
    colors, columns = _colors(designs), 4
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
    for ax, f in zip(axes.flat, shown):
        for x, d in enumerate(designs):
            e = f["designs"][d.name]
            if not e["values"]:
                continue
            ax.scatter([x] * len(e["values"]), e["values"], color=colors[d.name], s=18, zorder=3)
            ax.hlines(e["mean"], x - 0.3, x + 0.3, color=colors[d.name], lw=2)
        beyond = [n for n, diff in f["differences"].items() if diff["beyond"]]
        note = f"beyond the noise: {', '.join(beyond)}" if beyond else "within the noise" if f["differences"] else ""
        ax.set_title(f"{f['label']} ({f['better']} is better)\n{note}", fontsize=8)
        ax.set_xticks(range(len(designs)), [d.name for d in designs], fontsize=8)
        ax.set_xlim(-0.6, len(designs) - 0.4)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def side_by_side(designs: list[Design], test: str, seed: int | None, path: Path, width: int = 900) -> bool:
    """The contact sheets of `test` of each design's run at `seed` (else its first finished run),
    next to each other under their names, each scaled to at most `width` pixels. False where no
    design has that sheet."""
    from PIL import Image, ImageDraw

    sheets = []
    for d in designs:
        run = next((r for r in d.counted if r.seed == seed), None) or (d.counted[0] if d.counted else None)
        sheet = run.path / run.final["folder"] / test / "sheet.png" if run else None
        if sheet is not None and sheet.exists():
            image = Image.open(sheet).convert("RGB")
            if image.width > width:
                image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
            sheets.append((f"{d.name}, seed {run.seed}", image))
        else:
            sheets.append((f"{d.name}: no {test} sheet", None))
    if all(image is None for _, image in sheets):
        return False
    cell_w = max(image.width for _, image in sheets if image is not None)
    cell_h = max(image.height for _, image in sheets if image is not None)
    bar, gap = 28, 12
    canvas = Image.new("RGB", (len(sheets) * cell_w + (len(sheets) - 1) * gap, cell_h + bar), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, image) in enumerate(sheets):
        x = i * (cell_w + gap)
        draw.text((x + 6, 8), title, fill="black")
        if image is not None:
            canvas.paste(image, (x, bar))
        else:
            draw.rectangle([x, bar, x + cell_w - 1, bar + cell_h - 1], fill=(230, 230, 230))
    canvas.save(path)
    return True
