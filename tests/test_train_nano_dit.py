import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import load_train_script

from nano_dit import NanoDiTPipeline
from nano_dit.config import PRESETS, parse_config

train_nano_dit = load_train_script()
ROOT = Path(__file__).resolve().parents[1]


def _demo_args(tmp_path, stand_in_dir, *extra):
    return [
        *("--num-images", "8", "--resolution", "16", "--batch-size", "8", "--warmup-steps", "20"),
        *("--shards", str(tmp_path / "shards"), "--cache", str(tmp_path / "cache")),
        *("--stand-in-encoders", str(stand_in_dir), "--output-dir", str(tmp_path / "run")),
        *("--lpips-backbone", "random", "--num-inference-steps", "10"),
        *extra,
    ]


@pytest.mark.slow
def test_demo_training_learns_and_saves_a_loadable_pipeline(tmp_path, stand_in_dir):
    args = _demo_args(tmp_path, stand_in_dir, "--total-steps", "480", "--log-every", "160")
    result = train_nano_dit.main(args)

    lines = (tmp_path / "run" / "checkpoints" / "training_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 481))  # one record per optimizer step
    assert set(records[0]) == {"step", "loss", "grad_norm", "lr", "ema_decay", "samples_per_s", "time"}
    mean_loss = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    assert mean_loss(records[-50:]) < 0.5 * mean_loss(records[:50])
    assert records[-1]["lr"] == pytest.approx(1e-6)  # cosine ends on its floor
    # Regenerated images beat the best constant guess (the mean image) by a wide margin.
    assert result["reconstruction"]["mse"] < 0.5 * result["reconstruction"]["data_variance"]

    pipe = NanoDiTPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint_final")
    assert pipe.transformer.config.in_channels == 3  # pixel mode
    assert pipe.transformer.config.text_embed_dim == 64  # the stand-in T5's width, read from the cache
    assert torch.isfinite(next(pipe.transformer.parameters())).all()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--total-steps", "0"], "--total-steps must be > 0, got 0"),
        (["--peak-lr", "0"], "--peak-lr > 0"),
        (["--warmup-steps", "2000"], r"--warmup-steps must be in \[0, --total-steps\), got 2000"),
        (["--ema-decay", "1.5"], r"--ema-decay must be in \(0, 1\), got 1.5"),
        (["--weight-decay", "-1"], r"--weight-decay must be a finite number >= 0, got -1.0"),
        (["--grad-clip", "-1"], r"--grad-clip must be a finite number > 0, got -1.0"),
        (["--grad-clip", "nan"], r"--grad-clip must be a finite number > 0, got nan"),
        (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
        (["--checkpoints-total-limit", "0"], r"--checkpoints-total-limit must be > 0 .*got 0"),
        (["--guidance-scale", "nan"], r"--guidance-scale must be a finite number >= 0, got nan"),
        (["--image-guidance-scale", "inf"], r"--image-guidance-scale must be a finite number >= 0, got inf"),
        (["--mixed-precision", "fp8x"], r"argument --mixed-precision/--mixed_precision: invalid choice: 'fp8x'"),
        (
            ["--num-attention-heads", "5"],
            r"--num-attention-heads must divide --hidden-size, got 5 heads for width 128",
        ),
        (["--num-layers", "0"], r"--num-layers must be > 0, got 0"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_flags_override_the_preset():
    config = parse_config(["--preset", "nano", "--batch-size", "4"])
    assert config.batch_size == 4 and config.total_steps == 5000
    assert config.model["num_layers"] == 12


def test_every_model_key_a_design_varies_is_a_flag_and_a_yaml_key(tmp_path):
    flags = ["--num-layers", "6", "--hidden-size", "96", "--num-attention-heads", "3", "--patch-size", "2"]
    config = parse_config([*flags, "--mlp-ratio", "2.5", "--use-image-tokens"])
    assert config.model == {
        "num_layers": 6,
        "hidden_size": 96,
        "num_attention_heads": 3,
        "patch_size": 2,
        "mlp_ratio": 2.5,
        "use_image_tokens": True,
    }
    (tmp_path / "design.yaml").write_text("preset: nano\nnum_layers: 8\nuse-image-tokens: true\n")
    config = parse_config(["--config", str(tmp_path / "design.yaml"), "--hidden-size", "192"])
    assert config.model == {
        "num_layers": 8,  # the file's
        "hidden_size": 192,  # the flag's
        "num_attention_heads": 6,  # the preset's
        "patch_size": 2,
        "use_image_tokens": True,
    }
    assert parse_config([]).model == PRESETS["demo"]["model"]  # unset: the preset's, nothing added


def test_a_model_with_image_tokens_trains_validates_and_samples_with_them(tmp_path, stand_in_dir, monkeypatch):
    """`--use-image-tokens`: every training step gets the cached DINOv3 patch tokens, validation
    samples with them (the pipeline refuses an embedding without its tokens), and the exported
    pipeline's output moves with them."""
    from nano_dit.data import CachedBatches, conditioning
    from nano_dit.feature_cache import load_cache

    steps = []
    monkeypatch.setattr(train_nano_dit, "conditioning", lambda *a: steps.append(conditioning(*a)) or steps[-1])
    args = _demo_args(tmp_path, stand_in_dir, "--total-steps", "30", "--use-image-tokens")
    result = train_nano_dit.main([*args, "--num-inference-steps", "2", "--validation-batch-size", "4"])
    assert len(steps) == 30 and all(step["image_tokens"] is not None for step in steps)
    assert result["reconstruction"]["per_image"]
    pipe = NanoDiTPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint_final")
    model = pipe.transformer
    assert model.config.use_image_tokens

    _, buckets = load_cache(tmp_path / "cache")
    batch = next(CachedBatches(buckets, 4, "cpu", seed=0))
    x, t = torch.randn_like(batch["latents"]), torch.full((4,), 500.0)
    with torch.no_grad():
        with_tokens = model(x, t, **conditioning(batch, image_tokens=True)).sample
        other = {**batch, "image_tokens": batch["image_tokens"].roll(1, dims=0)}  # each row another's tokens
        with_others = model(x, t, **conditioning(other, image_tokens=True)).sample
    assert not torch.allclose(with_tokens, with_others)  # the tokens reach the output
    assert "image_tokens" not in {k for k, v in conditioning(batch).items() if v is not None}

    def sample(tokens):
        generator = torch.Generator().manual_seed(0)
        embeds, mask = batch["prompt_embeds"][:1], batch["prompt_attention_mask"][:1]
        return pipe(
            prompt_embeds=embeds, prompt_attention_mask=mask, image_embeds=batch["image_embeds"][:1],
            image_tokens=tokens, num_inference_steps=2, generator=generator, output_type="pt",
        ).images  # fmt: skip

    assert not torch.equal(sample(batch["image_tokens"][:1]), sample(batch["image_tokens"][1:2]))
    with pytest.raises(ValueError, match="built with use_image_tokens=True: pass image_tokens"):
        sample(None)  # the embedding alone would meet the null tokens: refused


def test_a_batch_larger_than_the_data_is_refused(tmp_path, stand_in_dir):
    with pytest.raises(ValueError, match="--batch-size 32 is larger than the data"):
        train_nano_dit.main(_demo_args(tmp_path, stand_in_dir, "--batch-size", "32"))


def test_training_without_data_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard folder .* does not exist"):
        train_nano_dit.main(["--preset", "nano", "--shards", str(tmp_path / "none"), "--cache", str(tmp_path / "c")])


def test_training_on_vae_latents_takes_its_widths_from_the_cache(tmp_path, stand_in_dir):
    args = ("--no-pixel-mode", "--resolution", "32", "--total-steps", "3", "--warmup-steps", "1")
    train_nano_dit.main(_demo_args(tmp_path, stand_in_dir, *args))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["in_channels"] == 16 and config["model"]["sample_size"] == 4  # Flux layout, x8 down
    pipe = NanoDiTPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint_final")
    assert pipe.transformer.config.in_channels == 16


def test_a_yaml_config_sits_between_the_preset_and_the_flags(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("preset: nano\nbatch-size: 4\ntotal_steps: 3000\n")
    config = parse_config(["--config", str(tmp_path / "run.yaml"), "--total-steps", "2000"])
    assert (config.preset, config.batch_size, config.total_steps, config.peak_lr) == ("nano", 4, 2000, 3e-4)
    (tmp_path / "bad.yaml").write_text("batch_sise: 4\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "bad.yaml")])
    assert "unknown settings ['batch_sise']" in capsys.readouterr().err


def test_every_flag_is_explained_by_its_field_and_help_shows_it(capsys):
    from nano_dit.config import flag_fields

    fields = flag_fields()
    assert all(f.metadata["help"] for f in fields)
    assert {"guidance_scale", "num_inference_steps", "weighting_scheme"} <= {f.name for f in fields}
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "--max-bad-steps MAX_BAD_STEPS, --max_bad_steps MAX_BAD_STEPS steps in a row with a non-finite loss" in text
    assert "--checkpoint-every CHECKPOINT_EVERY, --checkpoint_every CHECKPOINT_EVERY, --checkpointing-steps" in text
    assert "--guidance-mode {independent,nested}" in text


def test_the_sampling_defaults_are_the_pipelines_own():
    import inspect

    from nano_dit import NanoDiTPipeline
    from nano_dit.config import SamplingConfig, TrainConfig

    call = inspect.signature(NanoDiTPipeline.__call__).parameters
    sampling = SamplingConfig()
    for name in ("num_inference_steps", "guidance_scale", "image_guidance_scale", "guidance_mode"):
        assert getattr(sampling, name) == call[name].default, name
    assert parse_config(["--preset", "nano"]).sampling == sampling  # the plan's run samples as the pipeline does
    demo = TrainConfig().sampling  # the demo's guidance, its one departure
    assert (demo.guidance_scale, demo.image_guidance_scale) == (2.0, 1.5)
    assert dataclasses.replace(demo, guidance_scale=3.0, image_guidance_scale=2.0) == sampling
    assert SamplingConfig.__dataclass_fields__["guidance_mode"].metadata["choices"] == ("independent", "nested")
    readme = (Path(__file__).parents[1] / "README.md").read_text()  # its example shows the defaults
    assert f"guidance_scale={sampling.guidance_scale},  # text" in readme
    assert f"image_guidance_scale={sampling.image_guidance_scale}," in readme


def test_one_set_of_defaults_the_ones_that_take_effect_shown_by_help(capsys):
    from nano_dit.config import PRESETS, TrainConfig

    assert dataclasses.replace(parse_config([]), model={}) == TrainConfig()  # no flag: the defaults, as declared
    assert PRESETS["demo"]["train"] == {}  # the default preset sets nothing of its own
    nano = parse_config(["--preset", "nano"])
    for name, value in PRESETS["nano"]["train"].items():
        assert getattr(nano.sampling if "guidance" in name else nano, name) == value, name
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (default: 2000; --preset nano: 5000)" in text
    assert "(default: 2.0; --preset nano: 3.0)" in text  # the run's guidance, not the pipeline's
    assert "the preset's, else" not in text


def test_a_saved_config_reads_back_and_unknown_fields_are_left_out():
    import dataclasses

    from nano_dit.config import TrainConfig

    config = parse_config(["--preset", "demo", "--batch-size", "4", "--num-inference-steps", "9"])
    saved = dataclasses.asdict(config)
    assert TrainConfig.from_saved(saved) == config
    assert TrainConfig.from_saved({**saved, "retired": 1}) == config  # a field this version does not know
    with pytest.raises(SystemExit):  # a name no release ever had
        parse_config(["--text-guidance-scale", "2"])


def test_every_flag_takes_both_spellings():
    import argparse

    from nano_dit.config import add_flags, flag_fields

    parser = argparse.ArgumentParser()
    add_flags(parser, flag_fields(), "default: {default}")
    for f in flag_fields():
        kind = next((t for t in ("bool", "int", "float") if f.type.startswith(t)), "str")
        value = [] if kind == "bool" else [(f.metadata["choices"] or ("3" if kind != "str" else "x",))[0]]
        dashed = vars(parser.parse_args([f"--{f.name.replace('_', '-')}", *value]))
        underscored = vars(parser.parse_args([f"--{f.name}", *value]))
        assert dashed == underscored and dashed[f.name] is not None, f.name


DIFFUSERS_LAUNCH = [
    *("--train_batch_size", "4", "--max_train_steps", "4", "--learning_rate", "1e-3", "--lr_warmup_steps", "1"),
    *("--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--max_grad_norm", "0.5", "--allow_tf32"),
    *("--gradient_accumulation_steps", "1", "--mixed_precision", "no", "--seed", "3", "--report_to", "none"),
    *("--validation_steps", "2", "--num_inference_steps", "2"),
]


def test_diffusers_flag_names_set_the_same_settings():
    config = parse_config(["--output_dir", "runs/x", "--resume_from_checkpoint", "latest", *DIFFUSERS_LAUNCH])
    assert (config.output_dir, config.resume, config.batch_size, config.total_steps) == ("runs/x", "latest", 4, 4)
    assert (config.peak_lr, config.warmup_steps, config.checkpoint_every, config.grad_clip) == (1e-3, 1, 2, 0.5)
    assert (config.checkpoints_total_limit, config.tf32, config.mixed_precision, config.seed) == (1, True, "no", 3)
    # --validation_steps is diffusers' "validate every N steps"; the Euler steps are --num_inference_steps
    assert (config.validation_every, config.sampling.num_inference_steps) == (2, 2)
    assert parse_config(["--no-allow_tf32"]).tf32 is False


def test_a_yaml_config_takes_diffusers_names_too(tmp_path):
    (tmp_path / "run.yaml").write_text("train_batch_size: 4\nlearning_rate: 0.001\nvalidation-steps: 5\n")
    config = parse_config(["--config", str(tmp_path / "run.yaml")])
    assert (config.batch_size, config.peak_lr, config.validation_every) == (4, 1e-3, 5)
    (tmp_path / "one.yaml").write_text("validation_prompts: a red circle\n")  # one prompt, not its letters
    assert parse_config(["--config", str(tmp_path / "one.yaml")]).prompts() == [("a red circle", None)]


def test_a_launch_line_with_diffusers_flag_names_trains(tmp_path, stand_in_dir):
    args = [
        *("--num-images", "8", "--resolution", "16", "--shards", str(tmp_path / "shards")),
        *("--cache", str(tmp_path / "cache"), "--stand-in-encoders", str(stand_in_dir)),
        *("--output_dir", str(tmp_path / "run"), "--lpips-backbone", "random", *DIFFUSERS_LAUNCH),
    ]
    train_nano_dit.main(args)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "validation").glob("step*")) == ["step0000002", "step0000004"]
    assert [p.name for p in (run / "checkpoints").glob("checkpoint_step*")] == ["checkpoint_step0000004"]  # limit 1
    saved = json.loads((run / "config.json").read_text())
    assert (saved["batch_size"], saved["peak_lr"], saved["grad_clip"]) == (4, 1e-3, 0.5)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--guidance-mode", "both"], "argument --guidance-mode/--guidance_mode: invalid choice: 'both'"),
        (["--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0, got -1.0"),
        (["--num-inference-steps", "0"], "--num-inference-steps must be > 0, got 0"),
        (["--shift", "0"], "--weighting-scheme / --logit-std / --shift: shift must be > 0"),
    ],
)
def test_sampling_and_objective_flags_are_checked_at_the_door(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_cpu_run_uses_the_cores_unless_told(tmp_path, stand_in_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` sets by default
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train_nano_dit.main(
            _demo_args(tmp_path / "a", stand_in_dir, "--total-steps", "2", "--warmup-steps", "1", "--no-validation")
        )
        cores = len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == cores
        train_nano_dit.main(
            _demo_args(
                tmp_path / "b",
                stand_in_dir,
                "--total-steps",
                "2",
                "--warmup-steps",
                "1",
                "--no-validation",
                "--cpu-threads",
                "1",
            )
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_run_ending_off_its_logging_interval_still_logs_its_last_steps(tmp_path, stand_in_dir):
    train_nano_dit.main(
        _demo_args(tmp_path, stand_in_dir, "--total-steps", "3", "--warmup-steps", "1", "--no-validation")
    )  # --log-every and --checkpoint-every keep their defaults, far above 3
    lines = (tmp_path / "run" / "checkpoints" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert "(step 3)" in (tmp_path / "run" / "RESULTS.md").read_text().splitlines()[0]  # the report sees them


def _sheet_sizes(run: Path, step: int) -> dict[str, tuple[int, int]]:
    """Each contact sheet of a validation (the user's prompts' too, where there are some), by name."""
    from PIL import Image

    folder = run / "validation" / f"step{step:07d}"
    return {p.parent.name: Image.open(p).size for p in folder.glob("*/sheet.png")}


def test_tensorboard_gets_the_training_figures_the_validation_figures_and_the_sheets(tmp_path, stand_in_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ("--total-steps", "20", "--warmup-steps", "2", "--log-every", "10", "--validation_steps", "10")
    prompts = ("--validation_prompts", "a red circle on the left", "a blue square")
    train_nano_dit.main(_demo_args(tmp_path, stand_in_dir, *flags, *prompts, "--report_to", "tensorboard"))
    run = tmp_path / "run"
    (events,) = (run / "nano-dit").glob("events.out.tfevents.*")  # the tracker project's folder
    read = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    read.Reload()  # tensorboard's own reader
    assert [e.step for e in read.Scalars("loss")] == [10, 20]
    assert {"loss_sigma_0.00-0.25", "grad_norm", "lr"} <= set(read.Tags()["scalars"])
    for name in ("reconstruction_psnr", "dino_swap_sensitivity", "text_sensitivity", "probe_null_vs_conditional"):
        assert [e.step for e in read.Scalars(name)] == [10, 20], name
    final = json.loads((run / "validation" / "step0000020" / "results.json").read_text())
    assert read.Scalars("reconstruction_psnr")[-1].value == pytest.approx(final["reconstruction"]["mean_psnr"])
    for step in (10, 20):  # one image per sheet and validation, the sheet itself
        sheets = _sheet_sizes(run, step)
        assert set(sheets) == {"reconstruction", "dino_swap", "text_manip", "modes", "prompts"}
        for name, (width, height) in sheets.items():
            (image,) = [e for e in read.Images(f"validation/{name}") if e.step == step]
            assert (image.width, image.height) == (width, height), (name, step)


def test_report_to_all_reaches_wandb_offline_and_tensorboard(tmp_path, stand_in_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = ("--total-steps", "10", "--warmup-steps", "2", "--log-every", "10", "--report_to", "all")
    train_nano_dit.main(_demo_args(tmp_path, stand_in_dir, *flags, "--tracker_project_name", "my-project"))
    assert list((tmp_path / "run" / "my-project").glob("events.out.tfevents.*"))  # TensorBoard, in the project
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")  # the run folder W&B keeps offline
    from PIL import Image

    media = {
        p.name.split("_10_")[0]: Image.open(p).size for p in (offline / "files/media/images/validation").glob("*")
    }
    assert media == _sheet_sizes(tmp_path / "run", 10)  # each sheet, logged at the validation's step


def test_bad_input_found_past_the_flags_ends_in_one_line_not_a_traceback(tmp_path, stand_in_dir):
    import subprocess
    import sys

    args = _demo_args(tmp_path, stand_in_dir, "--batch-size", "1000", "--total-steps", "2", "--warmup-steps", "1")
    done = subprocess.run(
        [sys.executable, "train_nano_dit.py", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 1
    assert "train_nano_dit.py: error: --batch-size 1000 is larger than the data (8 cached samples)" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_trackers_get_flat_scalar_settings():
    config = parse_config(["--guidance-scale", "2.5"])
    tracked = train_nano_dit.tracker_config(config)
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in tracked.values())  # TensorBoard's hparams
    assert tracked["sampling_guidance_scale"] == 2.5 and tracked["batch_size"] == config.batch_size
    assert (
        tracked["sampling_validation_batch_size"] == config.sampling.validation_batch_size and "model" not in tracked
    )


def test_the_default_lr_schedule_is_the_plans_cosine_to_a_floor_and_the_others_are_diffusers():
    from diffusers.optimization import get_scheduler
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from nano_dit.config import LR_SCHEDULERS

    def lrs(scheduler, steps=12):
        out = []
        for _ in range(steps):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)

    config = parse_config(["--warmup-steps", "2", "--total-steps", "10", "--min-lr", "1e-5"])
    plan = get_cosine_with_min_lr_schedule_with_warmup(optimizer(), 4, 20, min_lr=1e-5)  # 2 processes
    assert lrs(train_nano_dit.build_lr_scheduler(config, optimizer(), 2)) == lrs(plan)
    ours = lrs(train_nano_dit.build_lr_scheduler(config, optimizer(), 1))
    assert ours[0] == 0 and ours[2] == pytest.approx(1e-3) and ours[10] == pytest.approx(1e-5)  # warmup, floor
    for name in LR_SCHEDULERS[1:]:
        config = parse_config(["--lr_scheduler", name, "--lr_warmup_steps", "2", "--max_train_steps", "10"])
        expected = get_scheduler(name, optimizer(), num_warmup_steps=2, num_training_steps=10)
        assert lrs(train_nano_dit.build_lr_scheduler(config, optimizer(), 1)) == lrs(expected), name
