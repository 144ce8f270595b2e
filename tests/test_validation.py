"""The three validation tests, the go / no-go report and the fault injections, offline.

LPIPS here runs on a RANDOMLY initialised AlexNet (`--lpips-backbone random`): the tests check the
plumbing and the arithmetic, not perceptual quality; real runs use torchvision's weights.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TWO_CPU_PROCESSES, TWO_CPU_PROCESSES_ENV, load_script, load_train_script, randomize_
from diffusers import FlowMatchEulerDiscreteScheduler

from nano_dit import NanoDiTPipeline, NanoDiTTransformer2DModel
from nano_dit.caption_edits import caption_edits
from nano_dit.config import SamplingConfig, Thresholds
from nano_dit.feature_cache import CachedBucket
from nano_dit.metrics import ImageMetrics
from nano_dit.recorder import ImageWriter, ValidationRecorder
from nano_dit.report import FAIL, NA, PASS, WARN, ReportInputs, evaluate, verdict
from nano_dit.sampling import Sampler, compile_for_sampling
from nano_dit.sheets import to_pil
from nano_dit.synthetic import COLORS, SHAPES, synthetic_samples
from nano_dit.training_log import LogRecord
from nano_dit.validation import swap_pairs, validate

train_nano_dit = load_train_script()
EXCLUSIVE = "exclusive-bag100:both=70,none=10,text_only=10,image_only=10"


def _bucket(samples):
    n = len(samples)
    return CachedBucket(
        bucket=(32, 32),
        keys=[s["key"] for s in samples],
        captions=[s["caption"] for s in samples],
        meta=[s.get("meta") for s in samples],
        latents=torch.zeros(n, 3, 32, 32),
        prompt_embeds=torch.zeros(n, 4, 8),
        prompt_attention_mask=torch.ones(n, 4, dtype=torch.long),
        image_embeds=torch.zeros(n, 8),
        image_tokens=torch.zeros(n, 4, 8),
    )


def test_synthetic_edits_change_the_layout_and_draw_the_result():
    samples = list(synthetic_samples(20, 32, seed=0))
    bucket = _bucket(samples)
    edits = caption_edits(bucket, 5)
    assert [e.kind for e in edits] == ["mirror left-right", "color", "mirror top-bottom", "shape", "mirror left-right"]
    assert len({e.index for e in edits}) == 5  # five different samples
    changed_words = {
        "mirror left-right": {"left", "right"},
        "mirror top-bottom": {"top", "bottom"},
        "color": set(COLORS),
        "shape": set(SHAPES),
    }
    for e in edits:
        before, after = e.caption.replace(",", "").split(), e.edited.replace(",", "").split()
        diff = {a for a, b in zip(before, after) if a != b} | {b for a, b in zip(before, after) if a != b}
        assert len(diff) == 2 and diff <= changed_words[e.kind], (e.kind, diff)
        original = np.asarray(samples[e.index]["image"], dtype=np.float32)
        assert (np.abs(np.asarray(e.target, dtype=np.float32) - original) > 30).any()  # the drawn edit differs


def test_other_captions_get_word_swaps_without_a_target():
    captions = ["a cat sitting on a red sofa", "a dog standing at the left", "a tree"]
    bucket = _bucket([{"key": str(i), "caption": c} for i, c in enumerate(captions)])
    edits = caption_edits(bucket, 5)
    assert [(e.index, e.edited) for e in edits] == [
        (0, "a cat standing on a red sofa"),
        (1, "a dog standing at the right"),
    ]
    assert all(e.target is None for e in edits)
    assert swap_pairs(bucket, 5) == [(0, 1)]


def test_image_metrics_on_identical_and_different_images():
    metrics = ImageMetrics(backbone="random")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = x.roll(1, 0)  # each image against another
    same, other = metrics.compare(x, x), metrics.compare(x, y)
    assert same["lpips"] == pytest.approx([0, 0, 0], abs=1e-6) and min(other["lpips"]) > 0.001
    assert same["ssim"] == pytest.approx([1, 1, 1]) and max(other["ssim"]) < 0.5
    assert min(same["psnr"]) >= 99 and max(other["psnr"]) < 15
    assert metrics.describe == {"available": True, "backbone": "AlexNet, RANDOM weights"}


def _records(losses, norms):
    return [LogRecord(i + 1, x, g, 1e-3, 0.99, 1.0, 0.0) for i, (x, g) in enumerate(zip(losses, norms))]


def _results(**changes):
    results = {
        "distance": "lpips",
        "reconstruction": {
            "mean_lpips": 0.15,
            "mean_psnr": 30.0,
            "mean_ssim": 0.9,
            "mse": 0.01,
            "data_variance": 0.1,
            "output_std": 0.3,
            "data_std": 0.3,
        },
        "dino_swap": {
            "mean_sensitivity": 0.3,
            "share_closer_to_b": 0.8,
            "share_transferred": 0.8,
            "mean_scene_taken": 0.9,
            "mean_shapes_kept": 0.9,
            "pairs": [{}] * 5,
        },
        "text_manip": {
            "mean_sensitivity": 0.2,
            "share_followed": 0.8,
            "mean_toward_edit": 0.8,
            "edits": [{}] * 5,
        },
        "model_probes": {
            "null_vs_conditional": 0.4,
            "guided_vs_unguided": 0.2,
            "sigma_0.25_vs_0.75": 0.5,
            "modes": {
                "sigmas": [0.95, 0.97, 0.99],
                "predictions": {m: {"relative_error": 0.2} for m in ("both", "text", "image", "none")},
                "samples_drawn": {m: {"share_drawn": 1.0} for m in ("text", "image", "image_shapes")},
            },
        },
    }
    for key, value in changes.items():
        results[key] = {**results[key], **value}
    return results


def _modes(error=None, drawn=None):
    """The healthy mode probe with one mode's prediction error, or one mode's samples, changed."""
    modes = _results()["model_probes"]["modes"]
    if error is not None:
        modes["predictions"] = {**modes["predictions"], error[0]: {"relative_error": error[1]}}
    if drawn is not None:
        modes["samples_drawn"] = {**modes["samples_drawn"], drawn[0]: {"share_drawn": drawn[1]}}
    return {"modes": modes}


def _statuses(records, results, thresholds=None, **kw):
    thresholds = thresholds or Thresholds()
    return {i.name: i.status for i in evaluate(records, results, thresholds, 10, EXCLUSIVE, **kw)}


HEALTHY = _records([1.0 / (1 + i / 20) for i in range(400)], [1.0] * 400)


def test_a_healthy_run_is_a_go():
    indicators = evaluate(HEALTHY, _results(), Thresholds(), 10, EXCLUSIVE)
    assert all(i.status == PASS for i in indicators), [i for i in indicators if i.status != PASS]
    assert verdict(indicators) == ("GO", [])


@pytest.mark.parametrize(
    "records,results,indicator,status",
    [
        (_records([1.0] * 400, [1.0] * 400), _results(), "Loss decreases", FAIL),  # plateau
        (
            _records([1.0 / (1 + i / 20) for i in range(400)], [1.0] * 399 + [500.0]),
            _results(),
            "No gradient explosion (> 100)",
            FAIL,
        ),
        (
            _records([1.0 / (1 + i / 20) for i in range(400)], [0.001] * 400),
            _results(),
            "No vanishing gradient (< 0.01)",
            FAIL,
        ),
        (HEALTHY, _results(reconstruction={"mean_lpips": 0.25}), "Reconstruction LPIPS", WARN),
        (HEALTHY, _results(reconstruction={"mean_lpips": 0.35}), "Reconstruction LPIPS", FAIL),
        (HEALTHY, _results(reconstruction={"output_std": 0.05}), "Not mean-gray or collapsed", FAIL),
        (HEALTHY, _results(reconstruction={"mse": 0.2}), "Not mean-gray or collapsed", FAIL),
        (HEALTHY, _results(dino_swap={"mean_sensitivity": 0.0}), "Depends on the DINOv3 embedding", FAIL),
        (HEALTHY, _results(text_manip={"mean_sensitivity": 0.001}), "Depends on the text", FAIL),
        (HEALTHY, _results(dino_swap={"share_transferred": 0.6}), "DINO swap takes B's scene, keeps A's shapes", FAIL),
        (HEALTHY, _results(model_probes=_modes(error=("image", 1.2))), "Each CFG mode learned (predictions)", FAIL),
        (HEALTHY, _results(model_probes=_modes(error=("text", 0.9))), "Each CFG mode learned (predictions)", WARN),
        (HEALTHY, _results(model_probes=_modes(error=("none", 1.05))), "Each CFG mode learned (predictions)", FAIL),
        (HEALTHY, _results(model_probes=_modes(drawn=("text", 0.5))), "Each CFG mode learned (samples)", FAIL),
        (HEALTHY, _results(model_probes=_modes(drawn=("image_shapes", 0.0))), "Each CFG mode learned (samples)", FAIL),
        (HEALTHY, _results(model_probes={"null_vs_conditional": 0.0}), "Null conditions learned, guidance live", FAIL),
        (HEALTHY, _results(model_probes={"guided_vs_unguided": 0.0}), "Null conditions learned, guidance live", FAIL),
        (HEALTHY, _results(model_probes={"sigma_0.25_vs_0.75": 0.0}), "Uses the noise level", FAIL),
        (HEALTHY, _results(text_manip={"share_followed": 0.6}), "Text edits followed", FAIL),
    ],
)
def test_each_failure_indicator_fires_on_its_symptom(records, results, indicator, status):
    assert _statuses(records, results)[indicator] == status
    decision, reasons = verdict(evaluate(records, results, Thresholds(), 10, EXCLUSIVE))
    # a failure is a NO-GO; so is a reconstruction between the thresholds (not yet conclusive)
    assert decision == ("NO-GO" if status == FAIL or indicator.startswith("Reconstruction") else "GO")
    assert any(indicator in r for r in reasons)


def test_a_validation_recorded_before_the_model_probes_shows_them_as_not_recorded():
    results = _results()
    del results["model_probes"]
    statuses = _statuses(HEALTHY, results)
    assert statuses["Null conditions learned, guidance live"] == NA and statuses["Uses the noise level"] == NA


def test_without_lpips_st_lpips_decides_and_the_other_figures_stand_beside_it():
    results = _results(reconstruction={"mean_lpips": None, "mean_stlpips": 0.25})
    indicator = next(i for i in evaluate(HEALTHY, results, Thresholds(), 10, EXCLUSIVE) if i.name.startswith("Recon"))
    assert (indicator.name, indicator.status) == ("Reconstruction ST-LPIPS", WARN)
    assert indicator.value == "NOT memorised: mean 0.250 (PSNR 30.0 dB, SSIM 0.900)"
    thresholds = replace(Thresholds(), stlpips_success=0.3, stlpips_failure=0.4)
    assert _statuses(HEALTHY, results, thresholds=thresholds)["Reconstruction ST-LPIPS"] == PASS


def test_a_preset_may_decide_on_st_lpips_though_lpips_is_there():
    results = _results(reconstruction={"mean_lpips": 0.15, "mean_stlpips": 0.35})
    thresholds = replace(Thresholds(), decide_on="stlpips")
    indicator = next(i for i in evaluate(HEALTHY, results, thresholds, 10, EXCLUSIVE) if i.name.startswith("Recon"))
    assert (indicator.name, indicator.status) == ("Reconstruction ST-LPIPS", FAIL)
    assert "LPIPS 0.150" in indicator.value
    assert verdict(evaluate(HEALTHY, results, thresholds, 10, EXCLUSIVE))[0] == "NO-GO"


def test_memorised_image_by_image_needs_both_lines_in_enough_images():
    thresholds = replace(Thresholds(), decide_on="stlpips", stlpips_success=0.1, min_psnr=28.0, memorised_share=0.95)
    good = {"key": "k", "stlpips": 0.05, "psnr": 30.0}
    blurred = {"key": "k", "stlpips": 0.15, "psnr": 30.0}  # far perceptually, though close in PSNR
    recoloured = {"key": "k", "stlpips": 0.05, "psnr": 22.0}  # ST-LPIPS misses it at this size; PSNR does not

    def reconstruction(per_image):
        return next(
            i
            for i in evaluate(
                HEALTHY,
                _results(reconstruction={"mean_stlpips": 0.07, "per_image": per_image}),
                thresholds,
                10,
                EXCLUSIVE,
            )
            if i.name.startswith("Recon")
        )

    assert reconstruction([good] * 95 + [blurred] * 5).status == PASS
    for bad in (blurred, recoloured):
        indicator = reconstruction([good] * 94 + [bad] * 6)
        assert indicator.status == WARN and indicator.value.startswith("NOT memorised: 94 of 100 images memorised")
    decision, reasons = verdict(
        evaluate(
            HEALTHY,
            _results(reconstruction={"mean_stlpips": 0.07, "per_image": [good] * 94 + [blurred] * 6}),
            thresholds,
            10,
            EXCLUSIVE,
        )
    )
    assert decision == "NO-GO" and "did not memorise" in reasons[0]


def test_a_validation_recorded_without_a_perceptual_metric_is_judged_on_psnr():
    results = _results(reconstruction={"mean_lpips": None, "mean_psnr": 22.0})
    name = "Reconstruction PSNR (no perceptual metric recorded)"
    assert _statuses(HEALTHY, results)[name] == WARN
    assert _statuses(HEALTHY, results, thresholds=replace(Thresholds(), psnr_success=21.0))[name] == PASS


def test_the_old_cfg_scheme_is_a_no_go():
    indicators = evaluate(HEALTHY, _results(), Thresholds(), 10, "independent-bernoulli:text=0.2,image=0.2")
    assert verdict(indicators)[0] == "NO-GO"


def test_a_dropout_that_never_draws_a_mode_is_a_no_go():
    from nano_dit.cfg_dropout import CFGDropout

    name = "CFG dropout is exclusive and draws every mode (config)"
    assert _statuses(HEALTHY, _results())[name] == PASS
    scheme = CFGDropout(0.8, 0.1, 0.0, 0.1).scheme  # the text-only mode never drawn
    indicators = {i.name: i for i in evaluate(HEALTHY, _results(), Thresholds(), 10, scheme)}
    assert indicators[name].status == FAIL and "text_only never drawn" in indicators[name].value


def test_a_run_that_stopped_itself_is_judged_on_its_log():
    records = HEALTHY[:100] + [
        LogRecord(101 + i, float("nan"), float("inf"), 1e-3, 0.99, 1.0, 0.0, skipped=True) for i in range(10)
    ]
    indicators = {i.name: i.status for i in evaluate(records, None, Thresholds(), 10, EXCLUSIVE, stopped=True)}
    assert indicators["Finite steps"] == FAIL and indicators["No gradient explosion (> 100)"] == FAIL
    assert not any(name.startswith("Reconstruction") for name in indicators)
    assert verdict(evaluate(records, None, Thresholds(), 10, EXCLUSIVE, stopped=True))[0] == "NO-GO"


# --------------------------------------------------------------------------------------------
# End to end: training with validation, and the faults it must catch
# --------------------------------------------------------------------------------------------
def _run(tmp_path, stand_in_dir, *extra):
    args = [
        *("--num-images", "12", "--resolution", "16", "--batch-size", "4", "--warmup-steps", "2"),
        *("--total-steps", "20", "--checkpoint-every", "10", "--validation-every", "10", "--log-every", "5"),
        *("--num-inference-steps", "3", "--lpips-backbone", "random"),
        *("--shards", str(tmp_path / "shards"), "--cache", str(tmp_path / "cache")),
        *("--stand-in-encoders", str(stand_in_dir), "--output-dir", str(tmp_path / "run"), *extra),
    ]
    return train_nano_dit.main(args)


def test_training_validates_and_writes_the_report(tmp_path, stand_in_dir):
    result = _run(tmp_path, stand_in_dir)
    run = tmp_path / "run"
    for step in ("step0000010", "step0000020"):
        folder = run / "validation" / step
        names = {"reconstruction", "dino_swap", "text_manip", "modes", "results.json"}
        assert {p.name for p in folder.iterdir()} == names
        assert len(list((folder / "reconstruction").glob("synth_*.png"))) == 12
        assert all((folder / name / "sheet.png").exists() for name in ("dino_swap", "text_manip", "modes"))
    results = json.loads((run / "validation" / "step0000020" / "results.json").read_text())
    assert len(results["reconstruction"]["per_image"]) == 12
    assert results["lpips"]["backbone"] == "AlexNet, RANDOM weights"
    assert len(results["dino_swap"]["pairs"]) == 5 and len(results["text_manip"]["edits"]) == 5
    assert results["verdict"] in ("GO", "NO-GO") and results["indicators"]
    report = (run / "RESULTS.md").read_text()
    assert report.startswith("# Validation: ") and "(step 20)" in report
    assert "validation/step0000020/reconstruction/sheet.png" in report and "**Stand-in encoders**" in report
    assert (run / "validation" / "summary.png").exists()
    assert result["verdict"] == results["verdict"]


def test_your_prompts_are_sampled_at_every_validation_as_the_shipped_pipeline_samples_them(tmp_path, stand_in_dir):
    from PIL import Image

    from nano_dit.sheets import to_pil

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "prompts.txt").write_text("# mine\na small blue square at the top | red.png\n\n")
    _run(
        tmp_path,
        stand_in_dir,
        "--total-steps",
        "10",
        "--validation_prompts",
        "a red circle",
        str(tmp_path / "prompts.txt"),
    )
    folder = tmp_path / "run" / "validation" / "step0000010"
    results = json.loads((folder / "results.json").read_text())
    assert [(p["prompt"], p["reference"]) for p in results["prompts"]] == [
        ("a red circle", None),
        ("a small blue square at the top", str(tmp_path / "red.png")),
    ]
    assert {p.name for p in (folder / "prompts").iterdir()} == {"prompt0.png", "prompt1.png", "sheet.png"}
    assert "validation/step0000010/prompts/sheet.png" in (tmp_path / "run" / "RESULTS.md").read_text()
    # the last validation's prompts are what the shipped pipeline (the same EMA weights) draws
    pipe = NanoDiTPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint_final")
    pipe.set_progress_bar_config(disable=True)
    sampling = results["sampling"]
    for i, (prompt, image) in enumerate(
        [("a red circle", None), ("a small blue square at the top", tmp_path / "red.png")]
    ):
        drawn = pipe(
            prompt=prompt,
            image=Image.open(image).convert("RGB") if image else None,
            width=16,
            height=16,
            num_inference_steps=sampling["num_inference_steps"],
            guidance_scale=sampling["guidance_scale"],
            image_guidance_scale=sampling["image_guidance_scale"],
            guidance_mode=sampling["guidance_mode"],
            generator=torch.Generator().manual_seed(sampling["seed"] + i),
            output_type="pt",
        ).images[0]
        saved = np.asarray(Image.open(folder / "prompts" / f"prompt{i}.png"), dtype=np.int16)
        assert np.abs(saved - np.asarray(to_pil(drawn.float()), dtype=np.int16)).max() <= 1


def test_a_missing_prompt_file_or_reference_image_is_refused_naming_it(tmp_path, capsys):
    from nano_dit.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--validation_prompts", str(tmp_path / "none.txt")])
    assert "--validation-prompts: no prompt file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--validation_prompts", "a cat | missing.png"])
    assert "the reference image of 'a cat' is not a file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fault,indicator",
    [
        ("text-ignored", "Depends on the text"),
        ("dino-ignored", "Depends on the DINOv3 embedding"),
        ("cfg-masks-ignored", "Null conditions learned, guidance live"),
        ("timestep-constant", "Uses the noise level"),
    ],
)
def test_a_hand_broken_model_is_caught_by_its_own_indicator(tmp_path, stand_in_dir, fault, indicator):
    with load_script("validation_power").broken(fault):  # the break made from outside the package
        _run(tmp_path, stand_in_dir, "--total-steps", "10")
    results = json.loads((tmp_path / "run" / "validation" / "step0000010" / "results.json").read_text())
    status = {i["name"]: i for i in results["indicators"]}
    assert status[indicator]["status"] == FAIL
    assert results["verdict"] == "NO-GO"
    probes = results["model_probes"]
    if fault == "cfg-masks-ignored":  # every branch is the conditional one: nothing to guide
        assert probes["null_vs_conditional"] == 0
        assert probes["guided_vs_unguided"] < 1e-6  # only the guided sum's rounding (weights −1, −1, 3)
    elif fault == "timestep-constant":
        assert probes["sigma_0.25_vs_0.75"] == 0
    elif fault == "text-ignored":  # a deaf model's edited output is its unedited one, pixel for pixel
        assert results["text_manip"]["mean_sensitivity"] == 0
        assert all(e["toward_edit"] == 0 and not e["followed"] for e in results["text_manip"]["edits"])
    else:
        assert results["dino_swap"]["mean_sensitivity"] == 0
        assert all(p["scene_taken"] == 0 and not p["transferred"] for p in results["dino_swap"]["pairs"])


def test_the_model_probes_measure_a_working_model_as_live(tmp_path, tiny_config):
    """Random weights everywhere: the null embeddings differ from the conditions and σ reaches
    the modulation, so both probes read well above their thresholds."""
    pipe = _tiny_pipe(tiny_config)
    g = torch.Generator().manual_seed(0)
    b = _bucket([{"key": f"k{i}", "caption": "a cat on the left"} for i in range(6)])
    b.bucket, b.latents = (16, 16), torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    b.image_embeds = torch.randn(6, 8, generator=g)
    sampling = SamplingConfig(num_inference_steps=2)
    probes = validate(Sampler(pipe, sampling), [b], ImageMetrics(backbone="none")).results["model_probes"]
    low = Thresholds().min_prediction_change
    assert probes["samples"] == 6
    assert probes["null_vs_conditional"] > low and probes["sigma_0.25_vs_0.75"] > low
    # Images of a small random model move little under guidance; far above the broken model's
    # rounding (< 1e-6) all the same. The threshold itself is set on the demo (fault table).
    assert probes["guided_vs_unguided"] > 1e-4


def test_the_validate_command_on_a_checkpoint(tmp_path, stand_in_dir, capsys):
    from nano_dit.cli import main

    _run(tmp_path, stand_in_dir, "--no-validation")
    assert not list((tmp_path / "run" / "validation").glob("step*"))
    assert "No validation ran" in (tmp_path / "run" / "RESULTS.md").read_text()  # the log's report, and timings
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_step0000010"
    main(["validate", "--checkpoint", str(checkpoint), "--num-inference-steps", "2", "--lpips-backbone", "random"])
    assert "RESULTS.md" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "validation" / "step0000010" / "results.json").read_text())
    assert results["sampling"]["num_inference_steps"] == 2 and results["checkpoint"] == str(checkpoint)
    assert "(step 10)" in (tmp_path / "run" / "RESULTS.md").read_text()


def test_validating_a_checkpoint_of_the_old_cfg_dropout_is_refused(tmp_path, stand_in_dir, capsys):
    from nano_dit.cli import main

    with load_script("validation_power").broken("bernoulli-cfg"):
        _run(tmp_path, stand_in_dir, "--no-validation", "--total-steps", "10")
    with pytest.raises(SystemExit):
        main(["validate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "checkpoint_step0000010")])
    assert "independent-bernoulli" in capsys.readouterr().err


def test_validating_during_training_leaves_the_training_unchanged(tmp_path, stand_in_dir):
    from safetensors.torch import load_file

    _run(tmp_path / "a", stand_in_dir, "--total-steps", "8", "--checkpoint-every", "8", "--validation-every", "4")
    _run(tmp_path / "b", stand_in_dir, "--total-steps", "8", "--checkpoint-every", "8", "--no-validation")
    assert (tmp_path / "a" / "run" / "validation" / "step0000004").is_dir()
    weights = "run/checkpoints/checkpoint_step0000008/model.safetensors"
    a, b = load_file(tmp_path / "a" / weights), load_file(tmp_path / "b" / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)  # validation drew none of training's random numbers


def test_validation_covers_every_bucket_of_a_multi_aspect_set(tmp_path, tiny_config):
    config = dict(tiny_config, in_channels=3, text_embed_dim=8, image_embed_dim=8)
    pipe = NanoDiTPipeline(
        transformer=NanoDiTTransformer2DModel(**config), scheduler=FlowMatchEulerDiscreteScheduler()
    )
    g = torch.Generator().manual_seed(0)

    def bucket(n, w, h, first):
        b = _bucket([{"key": f"k{first + i}", "caption": "a cat on the left"} for i in range(n)])
        b.bucket, b.latents = (w, h), torch.rand(n, 3, h, w, generator=g) * 2 - 1
        b.image_embeds = torch.randn(n, 8, generator=g)
        return b

    buckets = [bucket(4, 16, 16, 0), bucket(6, 24, 16, 4)]
    sampling = SamplingConfig(num_inference_steps=2, validation_batch_size=3)
    results = validate(Sampler(pipe, sampling), buckets, ImageMetrics(backbone="none")).results
    assert [p["key"] for p in results["reconstruction"]["per_image"]] == [f"k{i}" for i in range(10)]
    assert len(results["dino_swap"]["pairs"]) == 3  # from the largest bucket
    assert results["text_manip"] == {"skipped": "the pipeline has no text encoder to encode the edited captions"}
    # an untrained model predicts v = 0: its output is the (clamped) starting noise, worse than the mean
    recon = results["reconstruction"]
    assert recon["mse"] > recon["data_variance"] > 0


def test_validation_writes_nothing_and_the_recorder_writes_it_all_images_in_the_background(
    tmp_path, tiny_config, monkeypatch
):
    import threading

    from PIL import Image

    class HeldWriter(ImageWriter):  # its thread starts writing only when the gate opens
        def __init__(self):
            super().__init__()
            self.gate = threading.Event()
            self.submit(self.gate.wait)

    pipe = _tiny_pipe(tiny_config)
    bucket = _bucket([{"key": f"k{i}", "caption": "a cat on the left"} for i in range(4)])
    bucket.latents = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bucket.image_embeds = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    sampling, metrics = SamplingConfig(num_inference_steps=2), ImageMetrics(backbone="none")
    monkeypatch.chdir(tmp_path)
    validation = validate(Sampler(pipe, sampling), [bucket], metrics)
    assert not list(tmp_path.iterdir())  # the core writes no file
    assert set(validation.timings["phases"]) == {"sampling", "decoding", "metrics"}

    run = tmp_path / "run"
    recorder = ValidationRecorder(run, ReportInputs(Thresholds(), 0, EXCLUSIVE))
    recorder.writer = HeldWriter()
    summary = recorder.record(validation, 7, {"checkpoint": "here"})
    folder = run / "validation" / "step0000007"
    results = json.loads((folder / "results.json").read_text())  # returned with every image still queued
    assert not list(folder.rglob("*.png")) and (run / "RESULTS.md").exists()
    assert results["step"] == 7 and results["checkpoint"] == "here" and results["verdict"] == summary["verdict"]
    assert results["reconstruction"] == validation.results["reconstruction"]
    recorder.writer.gate.set()
    recorder.wait()
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert written == sorted([*validation.images, *validation.sheets])
    assert len(written) == 4 + 1 + 2 + 1  # each reconstruction, its sheet, the swap pairs and their sheet
    for path, image in validation.images.items():  # each PNG is the image validation returned
        assert np.array_equal(np.asarray(Image.open(folder / path)), np.asarray(to_pil(image)))


def test_metrics_do_not_depend_on_how_the_images_are_chunked():
    metrics = ImageMetrics(backbone="random", chunk=32)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 3, 32, 32, generator=g), torch.rand(5, 3, 32, 32, generator=g)
    whole = metrics.compare(x, y)
    metrics.chunk = 2  # three device calls of 2, 2 and 1 images
    chunked = metrics.compare(x, y)
    assert all(chunked[k] == pytest.approx(whole[k], rel=1e-5) for k in ("lpips", "psnr", "ssim"))
    assert metrics.distance(x, y).shape == (5,)


def _tiny_pipe(tiny_config):
    config = dict(tiny_config, in_channels=3, text_embed_dim=8, image_embed_dim=8)
    transformer = randomize_(NanoDiTTransformer2DModel(**config)).eval()
    return NanoDiTPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())


def test_compiled_validation_sampling_matches_the_plain_one(tiny_config):
    pipe = _tiny_pipe(tiny_config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    bucket = _bucket([{"key": f"k{i}", "caption": "a cat"} for i in range(4)])
    bucket.latents = torch.zeros(4, 3, 16, 16)
    bucket.image_embeds = torch.randn(4, 8, generator=g)
    bucket.prompt_embeds = torch.randn(4, 4, 8, generator=g)
    noise = torch.randn(4, 3, 16, 16, generator=g)
    names = list(pipe.transformer.state_dict())

    sampler = Sampler(pipe, SamplingConfig(num_inference_steps=3, validation_batch_size=4))
    plain = sampler.generate(bucket, range(4), noise)
    swap = sampler.generate(bucket, [0, 1, 2], noise, image_rows=[1, 2, 3])
    graphs = []

    def backend(gm, example_inputs):  # dynamo's capture, run as captured: counts graphs, no codegen
        graphs.append(gm)
        return gm.forward

    compile_for_sampling(pipe, backend)
    compile_for_sampling(pipe, backend)  # once only
    compiled = sampler.generate(bucket, range(4), noise)
    # Regional: the repeated block is one graph, which every block reuses; a batch of 3 (a DINO
    # swap here) is padded to 4 and reuses it too, instead of compiling a graph of its own.
    assert len(graphs) == 1
    compiled_swap = sampler.generate(bucket, [0, 1, 2], noise, image_rows=[1, 2, 3])
    assert len(graphs) == 1 and compiled_swap.shape == swap.shape == (3, 3, 16, 16)
    assert torch.allclose(compiled, plain, atol=1e-5) and torch.allclose(compiled_swap, swap, atol=1e-5)
    assert compiled.is_inference()  # sampled under torch.inference_mode
    assert list(pipe.transformer.state_dict()) == names  # no `_orig_mod.` in anything saved


def test_an_exported_step_checkpoint_carries_the_figures_of_its_validation(tmp_path, stand_in_dir):
    from nano_dit.cli import main
    from nano_dit.hub import card_info, export

    _run(tmp_path, stand_in_dir, "--no-validation")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_step0000010"
    export(checkpoint, tmp_path / "before")
    assert "Not validated yet" in (tmp_path / "before" / "README.md").read_text()

    main(["validate", "--checkpoint", str(checkpoint), "--num-inference-steps", "2", "--lpips-backbone", "random"])
    export(checkpoint, tmp_path / "after")
    results = json.loads((tmp_path / "run" / "validation" / "step0000010" / "results.json").read_text())
    figures = card_info(NanoDiTPipeline.from_pretrained(tmp_path / "after"))["results"]
    assert figures["reconstruction_psnr"] == pytest.approx(results["reconstruction"]["mean_psnr"])
    assert figures["verdict"] == results["verdict"]
    assert (tmp_path / "after" / "samples.png").exists()

    # A validation of another run (an earlier one that this folder held) is not this checkpoint's.
    path = tmp_path / "run" / "validation" / "step0000010" / "results.json"
    path.write_text(json.dumps({**results, "run_id": "another-run"}))
    export(checkpoint, tmp_path / "stale")
    assert "Not validated yet" in (tmp_path / "stale" / "README.md").read_text()


def test_a_resumed_run_with_no_step_left_keeps_its_validated_card(tmp_path, stand_in_dir):
    from nano_dit.hub import card_info

    _run(tmp_path, stand_in_dir)
    final = tmp_path / "run" / "checkpoints" / "checkpoint_final"
    validated = card_info(NanoDiTPipeline.from_pretrained(final))["results"]
    _run(tmp_path, stand_in_dir, "--resume", "latest")  # nothing left to train: rebuilds checkpoint_final
    assert card_info(NanoDiTPipeline.from_pretrained(final))["results"] == validated != {}
    assert (final / "samples.png").exists()


def test_the_fault_harness_leaves_the_package_as_it_was(tiny_config):
    """The faults live in scripts/validation_power.py; outside `broken(...)` every model is whole."""
    from nano_dit.config import TrainConfig

    harness = load_script("validation_power")
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8),
        timestep=torch.tensor([100.0, 900.0]),
        encoder_hidden_states=torch.randn(2, 5, tiny_config["text_embed_dim"]),
        image_embeds=torch.randn(2, tiny_config["image_embed_dim"]),
    )
    late = {**inputs, "timestep": torch.tensor([900.0, 900.0])}
    with harness.broken("timestep-constant"):
        broken_model = randomize_(NanoDiTTransformer2DModel(**tiny_config))
    whole = randomize_(NanoDiTTransformer2DModel(**tiny_config))  # the same weights, built after
    with torch.no_grad():
        assert torch.equal(broken_model(**inputs).sample, broken_model(**late).sample)  # blind to σ
        assert not torch.equal(whole(**inputs).sample, whole(**late).sample)
    with harness.broken("bernoulli-cfg"):
        assert TrainConfig().cfg_dropout().scheme.startswith("independent-bernoulli")
    assert TrainConfig().cfg_dropout().scheme.startswith("exclusive")
    assert not hasattr(TrainConfig(), "fault")  # no switch in the package


def test_the_fault_table_stacks_the_runs_mode_sheets(tmp_path):
    from PIL import Image

    mode_figure = load_script("validation_power").mode_figure
    for name, colour, height in (("good", "red", 30), ("text-only-never-trained", "blue", 20)):
        folder = tmp_path / name / "validation" / "step0000010" / "modes"
        folder.mkdir(parents=True)
        Image.new("RGB", (40, height), colour).save(folder / "sheet.png")
    assert mode_figure(tmp_path, ["good"]) is None  # nothing to set beside it
    figure = Image.open(mode_figure(tmp_path, ["good", "text-only-never-trained", "missing-run"]))
    assert figure.size == (40, 16 + 30 + 16 + 20)  # each sheet under a 16-pixel label
    assert figure.getpixel((20, 16 + 15)) == (255, 0, 0) and figure.getpixel((20, 16 + 30 + 16 + 10)) == (0, 0, 255)


@pytest.mark.slow
def test_two_processes_validate_to_the_figures_and_pictures_of_one(tmp_path, stand_in_dir):
    """`nano-dit validate` under `accelerate launch` with 2 CPU processes (DDP's gloo, as the
    training tests launch it): each process samples its share, and the results and every picture
    are those of the one-process validation, bit for bit."""
    import os
    import subprocess
    import sys

    from nano_dit.cli import main

    # 12 images in 3 batches of 4: 2 for process 0, 1 for process 1
    _run(tmp_path, stand_in_dir, "--no-validation", "--total-steps", "10", "--validation-batch-size", "4")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_step0000010"
    validate = ["validate", "--checkpoint", str(checkpoint), "--lpips-backbone", "random"]
    # One process, with one thread as each of the two has (`accelerate launch` sets OMP_NUM_THREADS=1):
    # on a CPU the last bits of a convolution (LPIPS's) depend on how many threads share it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*validate, "--output-dir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    launch = [sys.executable, *TWO_CPU_PROCESSES, "-m", "nano_dit.cli"]
    env = {**os.environ, **TWO_CPU_PROCESSES_ENV}
    two = subprocess.run(
        [*launch, *validate, "--output-dir", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    verdicts = [line for line in two.stdout.splitlines() if line.endswith("/two/RESULTS.md")]
    assert len(verdicts) == 1  # the main process reports; the other did its share

    folders = [tmp_path / name / "validation" / "step0000010" for name in ("one", "two")]
    results = [json.loads((f / "results.json").read_text()) for f in folders]
    timings = [r.pop("timings") for r in results]
    assert [t["processes"] for t in timings] == [1, 2]
    assert results[0] == results[1]
    assert len(results[0]["reconstruction"]["per_image"]) == 12
    pictures = sorted(p.relative_to(folders[0]) for p in folders[0].rglob("*.png"))
    assert len(pictures) >= 12 + 5 + 4
    assert pictures == sorted(p.relative_to(folders[1]) for p in folders[1].rglob("*.png"))
    for picture in pictures:
        assert (folders[0] / picture).read_bytes() == (folders[1] / picture).read_bytes(), picture
