"""Go / no-go: every success and failure indicator of the validation plan, evaluated with its number.

`write_report(run_dir, inputs)` reads `checkpoints/training_log.jsonl`, every
`validation/step*/results.json` and `timings.json` (where the run's time went), evaluates the indicators on the newest validation, adds them and
the verdict to that results.json, draws `validation/summary.png` and writes `RESULTS.md`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .cfg_dropout import scheme_counts
from .config import Thresholds, TrainConfig
from .timings import read_timings, timings_table
from .training_log import LogRecord, read_log

PASS, FAIL, WARN, NA = "pass", "fail", "warn", "n/a"
MARK = {PASS: "✅", FAIL: "❌", WARN: "⚠️", NA: "–"}


@dataclass
class Indicator:
    name: str
    status: str
    value: str
    criterion: str
    margin: str = ""  # how far the deciding figure lies past its line: + on the passing side, - short of it


def past(value: float, line: float, higher_is_better: bool = True, unit: str = "") -> str:
    """The signed distance of `value` past `line`, positive on the passing side."""
    gap = value - line if higher_is_better else line - value
    return f"{gap:+.3g}{unit}"


def smooth(values: list[float], window: int) -> list[float]:
    """Running median over `window` values (robust to the single spikes of flow-matching losses)."""
    half = max(window // 2, 0)
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def _floor(t: Thresholds, distance: str) -> float:
    """The "near zero" of a distance: `min_sensitivity` for (ST-)LPIPS; for MSE (validations
    recorded without a perceptual metric), the same visual triviality (about 40 dB PSNR)."""
    return t.min_sensitivity if distance in ("lpips", "stlpips") else 1e-4


def evaluate(
    records: list[LogRecord],
    results: dict | None,
    t: Thresholds,
    warmup_steps: int,
    scheme: str,
    stopped: bool = False,
) -> list[Indicator]:
    """The indicators on the training log so far and one validation's `results` (None: the log's
    alone, e.g. for a run that stopped itself; `stopped` says it did)."""
    out = []
    losses = [r.loss for r in records if not r.skipped]
    if len(losses) >= 20:
        curve = smooth(losses, max(len(losses) // 20, 5))
        start, end, low = curve[len(curve) // 20], curve[-1], min(curve)
        ratio = end / start if start > 0 else float("inf")
        status = PASS if ratio <= t.loss_drop and end <= 1.5 * low else FAIL if ratio >= t.loss_plateau else WARN
        out.append(
            Indicator(
                "Loss decreases",
                status,
                f"smoothed {start:.4f} → {end:.4f} ({ratio:.2f}×; lowest {low:.4f})",
                f"ends ≤ {t.loss_drop}× its start and near its lowest; ≥ {t.loss_plateau}× is a plateau or rise",
                past(ratio, t.loss_drop, higher_is_better=False, unit="×"),
            )
        )
    norms = [r.grad_norm for r in records if r.step > warmup_steps and r.grad_norm == r.grad_norm]
    if norms:
        share = sum(t.grad_low <= g <= t.grad_high for g in norms) / len(norms)
        out.append(
            Indicator(
                f"Gradient norm in [{t.grad_low}, {t.grad_high}]",
                PASS if share >= t.grad_in_range_share else WARN,
                f"{share:.0%} of steps after warmup (median {statistics.median(norms):.3g})",
                f"≥ {t.grad_in_range_share:.0%} of steps",
            )
        )
        top = max(norms)
        out.append(
            Indicator(
                f"No gradient explosion (> {t.grad_explode:g})",
                FAIL if top > t.grad_explode else PASS,
                f"max {top:.3g}",
                f"max ≤ {t.grad_explode:g}",
                past(top, t.grad_explode, higher_is_better=False),
            )
        )
        tail = statistics.median(norms[-max(len(norms) // 10, 1) :])
        out.append(
            Indicator(
                f"No vanishing gradient (< {t.grad_vanish:g})",
                FAIL if tail < t.grad_vanish else PASS,
                f"median of the last tenth {tail:.3g}",
                f"≥ {t.grad_vanish:g}",
            )
        )
    skipped = sum(r.skipped for r in records)
    out.append(
        Indicator(
            "Finite steps",
            FAIL if stopped else PASS if skipped == 0 else WARN,
            f"{skipped} skipped" + (", then the run stopped itself" if stopped else ""),
            "no non-finite loss or gradient",
        )
    )
    if results is not None:
        out += _validation_indicators(results, t)
    never = [mode for mode, count in (scheme_counts(scheme) or {}).items() if count == 0]
    out.append(
        Indicator(
            "CFG dropout is exclusive and draws every mode (config)",
            PASS if scheme.startswith("exclusive") and not never else FAIL,
            scheme + (f" ({', '.join(never)} never drawn: never trained)" if never else ""),
            "reads the recorded scheme only; the old independent-Bernoulli dropout is invalid (the validation plan's fix), "
            "and a mode the dropout never draws is never trained. Whether the model learned each mode: the probes above",
        )
    )
    return out


def _validation_indicators(results: dict, t: Thresholds) -> list[Indicator]:
    recon = results["reconstruction"]
    out = [_reconstruction(recon, t)]
    std_ratio = recon["output_std"] / max(recon["data_std"], 1e-8)
    beats_mean = recon["mse"] < recon["data_variance"]
    out.append(
        Indicator(
            "Not mean-gray or collapsed",
            PASS if std_ratio >= t.min_std_ratio and beats_mean else FAIL,
            f"output spread {std_ratio:.2f}× the data's; error {recon['mse']:.4f} vs the mean image's "
            f"{recon['data_variance']:.4f}",
            f"spread ≥ {t.min_std_ratio}× and error below the mean image's",
        )
    )

    floor, distance = _floor(t, results["distance"]), results["distance"].upper()
    for test, condition in (("dino_swap", "DINOv3 embedding"), ("text_manip", "text")):
        r = results[test]
        if "skipped" in r:
            out.append(Indicator(f"Depends on the {condition}", NA, r["skipped"], ""))
            continue
        s = r["mean_sensitivity"]
        out.append(
            Indicator(
                f"Depends on the {condition}",
                FAIL if s < floor else PASS,
                f"{distance} between outputs {s:.4g}",
                f"≥ {floor:g} (below: identical regardless of the {condition})",
                past(s, floor),
            )
        )
    out += _probe_indicators(results.get("model_probes"), t, floor, distance)
    out += _mode_indicators((results.get("model_probes") or {}).get("modes"), t)
    swap = results["dino_swap"]
    if "skipped" not in swap and swap.get("share_transferred") is not None:
        n, share = len(swap["pairs"]), swap["share_transferred"]
        out.append(
            Indicator(
                "DINO swap takes B's scene, keeps A's shapes",
                PASS if share >= t.swap_share else FAIL,
                f"{round(share * n)} of {n} pairs (toward B's scene {swap['mean_scene_taken']:.2f}, "
                f"A's shapes kept {swap['mean_shapes_kept']:.2f}, mean; 1 = exactly; "
                f"{round(swap['share_closer_to_b'] * n)} of {n} closer to B than to A)",
                f"≥ {t.swap_share:.0%} of pairs at least half-way on both, against the drawn target",
                past(round(share * n), t.swap_share * n, unit=" pairs"),
            )
        )
    elif "skipped" not in swap:  # no ground-truth layout (the user's own images): the pictures decide
        n = len(swap["pairs"])
        out.append(
            Indicator(
                "DINO swap transfers composition",
                NA,
                f"{round(swap['share_closer_to_b'] * n)} of {n} outputs closer to B than to A",
                "no ground-truth layout to measure against: judge the sheet",
            )
        )
    manip = results["text_manip"]
    if "skipped" not in manip and manip.get("share_followed") is not None:
        share, n = manip["share_followed"], len(manip["edits"])
        out.append(
            Indicator(
                "Text edits followed",
                PASS if share >= t.followed_share else FAIL,
                f"{round(share * n)} of {n} edits drawn where the edit put them "
                f"(toward the edited layout {manip['mean_toward_edit']:.2f}, mean; 1 = exactly)",
                f"≥ {t.followed_share:.0%} at least half-way from the original picture to the edited one",
                past(round(share * n), t.followed_share * n, unit=" edits"),
            )
        )
    return out


def _probe_indicators(probes: dict | None, t: Thresholds, floor: float, distance: str) -> list[Indicator]:
    """Null conditions learned (guidance live) and the noise level used, measured on the model."""
    names = ("Null conditions learned, guidance live", "Uses the noise level")
    if probes is None:
        return [Indicator(name, NA, "not recorded by this validation", "") for name in names]
    low = t.min_prediction_change
    null_gap, guided = probes["null_vs_conditional"], probes["guided_vs_unguided"]
    value = f"both-dropped vs conditional prediction {null_gap:.3g} (relative)"
    live = null_gap >= low
    if guided is not None:
        value += f"; guided vs unguided samples {distance} {guided:.3g}"
        live = live and guided >= floor
    sigma_gap = probes["sigma_0.25_vs_0.75"]
    return [
        Indicator(
            names[0],
            PASS if live else FAIL,
            value,
            f"≥ {low:g} relative, ≥ {floor:g} {distance} (below: dropping the conditions changes nothing)",
            past(null_gap, low) + ("" if guided is None else f"; {past(guided, floor)}"),
        ),
        Indicator(
            names[1],
            PASS if sigma_gap >= low else FAIL,
            f"prediction for one x_σ told σ 0.25 vs 0.75: {sigma_gap:.3g} (relative)",
            f"≥ {low:g} (below: blind to the noise level)",
            past(sigma_gap, low),
        ),
    ]


MODE_NAMES = {"both": "both", "text": "text only", "image": "image only", "none": "none"}


def _mode_indicators(modes: dict | None, t: Thresholds) -> list[Indicator]:
    """Every CFG mode the dropout trains: its predictions near that mode's ideal, its samples
    showing what the mode was given."""
    if modes is None:
        return [Indicator("Each CFG mode learned", NA, "not recorded by this validation", "")]
    errors = {m: p["relative_error"] for m, p in modes["predictions"].items() if p["relative_error"] is not None}
    if not errors:
        return [Indicator("Each CFG mode learned (predictions)", NA, "the modes' ideals coincide on this data", "")]
    worst = max(errors, key=errors.get)
    out = [
        Indicator(
            "Each CFG mode learned (predictions)",
            PASS if errors[worst] <= t.mode_error else WARN if errors[worst] <= t.mode_error_failure else FAIL,
            "; ".join(f"{MODE_NAMES[m]} {e:.2f}" for m, e in errors.items())
            + f" (distance of the mode's x0 prediction to its ideal, over the distance a mode never learned would be; "
            f"σ {', '.join(map(str, modes['sigmas']))})",
            f"each ≤ {t.mode_error:g}: more than half-way from a never-learned mode to the ideal; "
            f"> {t.mode_error_failure:g}: no better than never learned",
            past(errors[worst], t.mode_error, higher_is_better=False) + f" ({MODE_NAMES[worst]})",
        )
    ]
    drawn = modes.get("samples_drawn")
    if drawn:
        shares = {m: f["share_drawn"] for m, f in drawn.items() if f["share_drawn"] is not None}
        what = {  # measure -> (its mode, what its samples should draw)
            "text": ("text", "the captioned shapes"),
            "image": ("image", "the image's own scene"),
            "image_shapes": ("image", "shapes on that scene"),
        }
        worst = min(shares, key=shares.get) if shares else None
        out.append(
            Indicator(
                "Each CFG mode learned (samples)",
                PASS if shares and shares[worst] >= t.mode_sample_share else FAIL,
                "; ".join(
                    f"{MODE_NAMES[what[m][0]]}: {s:.0%} of samples draw {what[m][1]}" for m, s in shares.items()
                ),
                f"≥ {t.mode_sample_share:.0%} each, at least half-way toward the truth",
                past(shares[worst], t.mode_sample_share) + f" ({what[worst][1]})" if shares else "",
            )
        )
    return out


RECONSTRUCTION_FIGURES = {
    "stlpips": ("ST-LPIPS", "{:.3f}"),
    "lpips": ("LPIPS", "{:.3f}"),
    "psnr": ("PSNR", "{:.1f} dB"),
}


def _reconstruction(recon: dict, t: Thresholds) -> Indicator:
    """The mean reconstruction distance that decides (see `Thresholds.decide_on`), with the
    others beside it; with `memorised_share` set, the share of images each memorised decides."""
    have = [k for k in ("lpips", "stlpips") if recon.get(f"mean_{k}") is not None]
    metric = t.decide_on if t.decide_on in have else (have or ["psnr"])[0]
    value = recon[f"mean_{metric}"]
    name, fmt = RECONSTRUCTION_FIGURES[metric]
    others = [
        f"{label} {form.format(recon[f'mean_{k}'])}"
        for k, (label, form) in RECONSTRUCTION_FIGURES.items()
        if k != metric and recon.get(f"mean_{k}") is not None
    ]
    others.append(f"SSIM {recon['mean_ssim']:.3f}")
    if metric == "psnr":  # higher is better
        good, bad = value > t.psnr_success, value < t.psnr_failure
        criterion = f"> {t.psnr_success:g} dB memorised, < {t.psnr_failure:g} dB failed"
        name += " (no perceptual metric recorded)"
        return Indicator(
            f"Reconstruction {name}", PASS if good else FAIL if bad else WARN, f"mean {fmt.format(value)}", criterion
        )
    success, failure = getattr(t, f"{metric}_success"), getattr(t, f"{metric}_failure")
    bad = value > failure
    if t.memorised_share is None:
        good, shown = value < success, f"mean {fmt.format(value)} ({', '.join(others)})"
        criterion = f"mean < {success:g} memorised, > {failure:g} failed"
        margin = past(value, success, higher_is_better=False)
    else:
        per_image = recon["per_image"]
        memorised = [p[metric] <= success and (t.min_psnr is None or p["psnr"] >= t.min_psnr) for p in per_image]
        share = sum(memorised) / len(per_image)
        good = share >= t.memorised_share
        shown = (
            f"{sum(memorised)} of {len(per_image)} images memorised; mean {fmt.format(value)} ({', '.join(others)})"
        )
        line = f"{name} ≤ {success:g}" + (f" and PSNR ≥ {t.min_psnr:g} dB" if t.min_psnr is not None else "")
        criterion = f"≥ {t.memorised_share:.0%} of images with {line} memorised; mean {name} > {failure:g} failed"
        margin = past(sum(memorised), t.memorised_share * len(per_image), unit=" images")
    status = PASS if good and not bad else FAIL if bad else WARN
    said = {PASS: "memorised", WARN: "NOT memorised", FAIL: "failed"}[status]
    return Indicator(f"Reconstruction {name}", status, f"{said}: {shown}", criterion, margin)


def verdict(indicators: list[Indicator]) -> tuple[str, list[str]]:
    """GO when nothing fails and the reconstruction passes; the reasons otherwise."""
    failed = [f"{i.name}: {i.value}" for i in indicators if i.status == FAIL]
    recon = next((i for i in indicators if i.name.startswith("Reconstruction")), None)
    if not failed and recon is not None and recon.status == PASS:
        return "GO", [f"{i.name}: {i.value} (warning)" for i in indicators if i.status == WARN]
    if not failed:
        failed = [
            f"{recon.name}: the run did not memorise its images ({recon.value})" if recon else "no validation ran"
        ]
    return "NO-GO", failed


def validations(run_dir: Path) -> list[tuple[int, Path, dict]]:
    found = []
    for path in sorted((run_dir / "validation").glob("step*/results.json")):
        results = json.loads(path.read_text())
        found.append((results["step"], path, results))
    return sorted(found, key=lambda x: x[0])


@dataclass(frozen=True)
class ReportInputs:
    """What the go / no-go report judges a run with, besides its validations.

    Attributes:
        thresholds: the verdict's numbers.
        warmup_steps: the gradient-norm range is read after the warmup.
        scheme: the CFG-dropout scheme the run trained with (`CFGDropout.scheme`).
        log_path: the training log (default: `<run>/checkpoints/training_log.jsonl`).
        stand_in: the encoders were the stand-ins: the report says its figures test the machinery.
    """

    thresholds: Thresholds
    warmup_steps: int
    scheme: str
    log_path: str | Path | None = None
    stand_in: bool = False

    @classmethod
    def of_run(cls, config: TrainConfig, scheme: str, log_path=None, stand_in: bool = False) -> ReportInputs:
        """A run's: the thresholds of its preset and its warmup, from its config."""
        return cls(config.thresholds(), config.warmup_steps, scheme, log_path, stand_in)


def write_report(run_dir: str | Path, inputs: ReportInputs, stopped: bool = False) -> dict:
    """Evaluate the newest validation (or, with none, the training log alone), record the verdict
    in its results.json and in validation/verdict.json, draw validation/summary.png and write
    RESULTS.md; returns {"verdict", "reasons", "indicators", "step"}. `stopped`: the run stopped
    itself (too many non-finite steps)."""
    run_dir, thresholds, log_path = Path(run_dir), inputs.thresholds, inputs.log_path
    records = read_log(Path(log_path) if log_path else run_dir / "checkpoints" / "training_log.jsonl")
    history = validations(run_dir)
    step, path, results = history[-1] if history else (records[-1].step if records else 0, None, None)
    seen = [r for r in records if r.step <= step]
    indicators = evaluate(seen, results, thresholds, inputs.warmup_steps, inputs.scheme, stopped=stopped)
    decision, reasons = verdict(indicators)
    summary = {"verdict": decision, "reasons": reasons, "indicators": [asdict(i) for i in indicators], "step": step}
    if path is not None:
        results.update(summary, thresholds=asdict(thresholds))
        path.write_text(json.dumps(results, indent=2))
    (run_dir / "validation").mkdir(parents=True, exist_ok=True)
    (run_dir / "validation" / "verdict.json").write_text(json.dumps(summary, indent=2))
    plot_summary(records, [r for _, _, r in history], run_dir / "validation" / "summary.png", thresholds)
    folder = path.parent.relative_to(run_dir) if path else None
    text = _markdown(summary, folder, results, indicators, inputs.stand_in)
    timings = read_timings(run_dir)
    if timings is not None:
        text += "\n".join(["", "## Where the time went", "", *timings_table(timings), ""])
    (run_dir / "RESULTS.md").write_text(text)
    return summary


def _markdown(summary: dict, folder: Path | None, results, indicators, stand_in: bool) -> str:
    """RESULTS.md: the verdict of `summary`, then the table and the sheets of the validation in
    `folder` (relative to the run), whose `results` they are."""
    step, decision, reasons = summary["step"], summary["verdict"], summary["reasons"]
    lines = [
        f"# Validation: {'✅ GO' if decision == 'GO' else '❌ NO-GO'} (step {step})",
        "",
    ]
    if stand_in:
        lines += [
            "> **Stand-in encoders**: tiny random T5 / DINOv3. These figures test the machinery, not what real",
            "> conditioning would learn.",
            "",
        ]
    lines += [f"- {r}" for r in reasons] + ([""] if reasons else [])
    table = [
        "| | indicator | value | criterion | margin |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {MARK[i.status]} | {i.name} | {i.value} | {i.criterion} | {i.margin} |" for i in indicators],
        "",
        "![loss, gradient norm and the validation figures over the steps](validation/summary.png)",
        "",
    ]
    if results is None:
        return "\n".join([*lines, "No validation ran: the indicators come from the training log alone.", "", *table])
    rel, s, lp = folder, results["sampling"], results["lpips"]
    lines += [
        f"Sampling: {s['num_inference_steps']} Euler steps, dual CFG ({s['guidance_mode']}) text "
        f"{s['guidance_scale']} / image {s['image_guidance_scale']}, seed {s['seed']}. "
        + (f"ST-LPIPS: {results['stlpips']['weights']}. " if "stlpips" in results else "")
        + f"LPIPS: {lp['backbone'] if lp['available'] else 'unavailable — ' + lp['reason']}. "
        f'Distances for "closer to" and sensitivity: {results["distance"].upper()}. Ground truth: {results["ground_truth"]}.',
        "",
        *table,
        f"Reconstruction (ground truth | generated): ![reconstruction]({rel}/reconstruction/sheet.png)",
        "",
        f"DINO swap (A | B | A's caption + A's DINO | A's caption + B's DINO): ![dino swap]({rel}/dino_swap/sheet.png)",
        "",
        f"Text manipulation (original | from the original caption | from the edited caption | the edit drawn): "
        f"![text manipulation]({rel}/text_manip/sheet.png)",
        "",
        *(
            [
                f"CFG modes, unguided (training image | text only | image only, the same noise): "
                f"![modes]({rel}/modes/sheet.png)",
                "",
            ]
            if ((results.get("model_probes") or {}).get("modes") or {}).get("samples_drawn")
            else []
        ),
        *(
            [f"Your prompts (--validation-prompts): ![prompts]({rel}/prompts/sheet.png)", ""]
            if isinstance(results.get("prompts"), list)
            else []
        ),
        f"Every figure, per image: [{rel}/results.json]({rel}/results.json).",
        "",
    ]
    return "\n".join(lines)


def plot_summary(records: list[LogRecord], history: list[dict], path: Path, thresholds: Thresholds) -> None:
    """Loss (raw and smoothed), gradient norm, and the validation figures over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r.step for r in records]
    losses = [r.loss for r in records]
    ax = axes[0][0]
    if records:
        ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
        ax.plot(steps, smooth(losses, max(len(losses) // 20, 5)), lw=1.5, label="smoothed (running median)")
        ax.set_yscale("log")
    ax.set(title="training loss", xlabel="step")
    ax.legend()
    ax = axes[0][1]
    if records:
        ax.plot(steps, [r.grad_norm for r in records], lw=0.5)
        ax.axhspan(0.1, 10, color="green", alpha=0.08, label="[0.1, 10]")
        ax.set_yscale("log")
        ax.legend()
    ax.set(title="gradient norm (before clipping)", xlabel="step")
    vsteps = [h["step"] for h in history]
    ax = axes[1][0]
    if not history:
        ax.set(title="no validation ran")
    elif history[-1]["reconstruction"].get("mean_stlpips") is not None:
        for k in ("stlpips", "lpips"):
            ys = [h["reconstruction"].get(f"mean_{k}") for h in history]
            if all(y is not None for y in ys):
                ax.plot(vsteps, ys, "o-", label=f"mean {RECONSTRUCTION_FIGURES[k][0]}")
        ax.axhline(thresholds.stlpips_success, color="green", ls="--", lw=0.8, label="ST-LPIPS: memorised")
        ax.axhline(thresholds.stlpips_failure, color="red", ls="--", lw=0.8, label="ST-LPIPS: failed")
        ax.set(title="reconstruction distance (lower is better)")
        ax.legend()
    else:
        ax.plot(vsteps, [h["reconstruction"]["mean_psnr"] for h in history], "o-", label="mean PSNR (dB)")
        ax.set(title="reconstruction PSNR, dB (LPIPS unavailable)")
    ax.set(xlabel="step")
    ax = axes[1][1]
    for key, label in (("dino_swap", "DINO-swap sensitivity"), ("text_manip", "text sensitivity")):
        ys = [h[key].get("mean_sensitivity") for h in history]
        if all(y is not None for y in ys):
            ax.plot(vsteps, ys, "o-", label=label)
    ax2 = ax.twinx()
    for (test, key), label, color in (
        (("dino_swap", "share_transferred"), "swap: pairs transferred", "gray"),
        (("text_manip", "share_followed"), "edits: share followed", "black"),
    ):
        ys = [h[test].get(key) for h in history]
        if all(y is not None for y in ys):
            ax2.plot(vsteps, ys, "s--", color=color, label=label)
    ax2.set_ylim(-0.05, 1.05)
    ax.set(title="conditioning", xlabel="step")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
