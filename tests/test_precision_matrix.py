"""The GPU user's paths, walked on a CPU.

The README's seed command once crashed at its first step on a GPU (bf16 latents from a cache
written on the GPU met an fp32 model with autocast off) while every CPU test passed: the CPU runs
were fp32 end to end. Here a CPU run takes each path a GPU run takes:

    mixed precision  "no" | "bf16"      set as `accelerate launch` sets it (ACCELERATE_MIXED_PRECISION),
                                        no script flag; CPU autocast runs bf16 as CUDA's does
    feature cache    fp32 | bf16        written on a CPU, or in bf16 as the encoders on a GPU made it
    compile          off | on           torch.compile with the aot_eager backend (dynamo + AOTAutograd)

each through training, a resume, a validation and a pipeline call fed the cache's own tensors.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import load_train_script
from safetensors.torch import load_file, save_file

from nano_dit import NanoDiTPipeline, NanoDiTTransformer2DModel, flow_matching
from nano_dit.cli import main as cli_main
from nano_dit.config import parse_config
from nano_dit.data import prepare_data
from nano_dit.feature_cache import CACHE_DTYPE, load_cache

train_nano_dit = load_train_script()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, stand_in_dir):
    """The same 8 synthetic images at 32², VAE latents (the GPU run's 16-channel layout), cached
    twice: in fp32 as a CPU writes them, and with every feature in bf16 as a GPU's encoders made them."""
    root = tmp_path_factory.mktemp("data")
    config = parse_config(
        [
            *("--shards", str(root / "shards"), "--cache", str(root / "fp32"), "--synth-if-missing"),
            *("--num-images", "8", "--resolution", "32", "--stand-in-encoders", str(stand_in_dir), "--no-pixel-mode"),
        ]
    )
    prepare_data(config)
    shutil.copytree(root / "fp32", root / "bf16")
    for path in (root / "bf16").rglob("*.safetensors"):
        tensors = {k: t.bfloat16() if t.is_floating_point() else t for k, t in load_file(path).items()}
        save_file(tensors, path)
    return {"shards": root / "shards", "fp32": root / "fp32", "bf16": root / "bf16"}


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its precision and dynamo settings per process: each run here starts anew."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def dtypes_seen(monkeypatch):
    """The dtypes of x_σ and the target in every training step, and of the model's output before
    Accelerate's wrapper (which returns fp32 under mixed precision) hands it on."""
    seen = {"x_t": set(), "model": set(), "target": set()}
    add_noise, mse, forward = flow_matching.add_noise, flow_matching.per_sample_mse, NanoDiTTransformer2DModel.forward

    def recording_add_noise(x0, noise, sigmas):
        x_t = add_noise(x0, noise, sigmas)
        seen["x_t"].add(x_t.dtype)
        return x_t

    def recording_mse(pred, target):
        seen["target"].add(target.dtype)
        return mse(pred, target)

    def recording_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen["model"].add(out.sample.dtype)
        return out

    monkeypatch.setattr(flow_matching, "add_noise", recording_add_noise)
    monkeypatch.setattr(flow_matching, "per_sample_mse", recording_mse)
    monkeypatch.setattr(NanoDiTTransformer2DModel, "forward", recording_forward)
    return seen


def _run_args(caches, cache: str, stand_in_dir, out, compiled: bool, *extra):
    return [
        *("--shards", str(caches["shards"]), "--cache", str(caches[cache]), "--output-dir", str(out)),
        *("--stand-in-encoders", str(stand_in_dir), "--no-pixel-mode", "--resolution", "32"),
        *("--batch-size", "4", "--warmup-steps", "1", "--checkpoint-every", "2", "--log-every", "1"),
        *("--num-inference-steps", "2", "--lpips-backbone", "none"),
        *(("--compile", "--compile-backend", "aot_eager") if compiled else ()),
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("cache", ["fp32", "bf16"], ids=["fp32-cache", "bf16-cache"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_train_resume_validate_and_sample(
    precision, cache, compiled, caches, stand_in_dir, tmp_path, monkeypatch, fresh_accelerate_state, dtypes_seen
):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)  # what `accelerate launch` exports
    run = tmp_path / "run"
    # Train two steps (checkpoint at 2), then resume to 4 and validate there.
    train_nano_dit.main(_run_args(caches, cache, stand_in_dir, run, compiled, "--total-steps", "2", "--no-validation"))
    AcceleratorState._reset_state(True)
    result = train_nano_dit.main(
        _run_args(caches, cache, stand_in_dir, run, compiled, "--total-steps", "4", "--resume", "latest")
    )

    config = json.loads((run / "config.json").read_text())
    assert config["mixed_precision"] == precision  # the precision in effect, though no flag said it
    assert config["compile"] is compiled
    # The model computes in autocast's dtype (training and validation); x_σ and the target stay fp32.
    compute = DTYPES[precision] if precision != "no" else torch.float32
    assert dtypes_seen == {"x_t": {torch.float32}, "model": {compute}, "target": {torch.float32}}

    log = [json.loads(line) for line in (run / "checkpoints" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in log)

    assert result["sampling"]["mixed_precision"] == precision  # validation sampled as training ran
    recon = result["reconstruction"]
    assert all(torch.isfinite(torch.tensor(recon[k])) for k in ("mean_stlpips", "mean_psnr", "mean_ssim"))
    timings = json.loads((run / "timings.json").read_text())
    assert {"training: first step", "training", "validation", "export"} <= set(timings["phases"])
    assert timings["mixed_precision"] == precision and timings["validations"][0]["step"] == 4

    # The pipeline, fed the cache's tensors in the dtype they were stored in.
    pipe = NanoDiTPipeline.from_pretrained(run / "checkpoints" / "checkpoint_final")
    text = load_file(next((caches[cache] / "text").glob("*.safetensors")))
    embeds = next(iter(text.values()))[None]  # (1, L, D), stored dtype
    image = load_file(next((caches[cache] / "image").rglob("*.safetensors")))
    image_embeds = next(v for k, v in image.items() if k.endswith(".global"))[None]
    assert embeds.dtype == image_embeds.dtype == DTYPES[cache]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        images = pipe(
            prompt_embeds=embeds,
            image_embeds=image_embeds,
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="pt",
        ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_the_cache_has_one_dtype_whatever_wrote_it(caches):
    for cache in ("fp32", "bf16"):
        _, buckets = load_cache(caches[cache])
        for name in ("latents", "prompt_embeds", "image_embeds", "image_tokens"):
            assert getattr(buckets[0], name).dtype == CACHE_DTYPE, (cache, name)
        assert buckets[0].prompt_attention_mask.dtype == torch.long
    fp32, bf16 = load_cache(caches["fp32"])[1][0], load_cache(caches["bf16"])[1][0]
    # the bf16 cache holds the fp32 one's values rounded to bf16, widened back exactly
    torch.testing.assert_close(bf16.latents, fp32.latents.bfloat16().float(), rtol=0, atol=0)


def _two_steps(caches, stand_in_dir, run, *flags):
    """Two training steps on the fp32 cache, no validation."""
    args = ("--total-steps", "2", "--no-validation", *flags)
    train_nano_dit.main(_run_args(caches, "fp32", stand_in_dir, run, False, *args))


@pytest.mark.slow
def test_nano_dit_validate_reads_a_bf16_cache(caches, stand_in_dir, tmp_path, fresh_accelerate_state):
    run = tmp_path / "run"
    _two_steps(caches, stand_in_dir, run, "--mixed-precision", "bf16")
    checkpoint = run / "checkpoints" / "checkpoint_step0000002"
    cli_main(
        ["validate", "--checkpoint", str(checkpoint), "--cache", str(caches["bf16"]), "--num-inference-steps", "2"]
    )
    results = json.loads((run / "validation" / "step0000002" / "results.json").read_text())
    assert results["sampling"]["mixed_precision"] == "bf16"  # as the run trained
    assert torch.isfinite(torch.tensor(results["reconstruction"]["mean_stlpips"]))


def test_an_explicit_flag_wins_over_accelerate_launch(
    caches, stand_in_dir, tmp_path, monkeypatch, fresh_accelerate_state
):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    _two_steps(caches, stand_in_dir, tmp_path / "run", "--mixed-precision", "no")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == "no"


@pytest.mark.slow
def test_the_readme_launch_with_its_config_file_trains_in_bf16(caches, stand_in_dir, tmp_path):
    """`accelerate launch --config_file accelerate_config.yaml train_nano_dit.py ...`, the README's
    seed command: the file's `mixed_precision: bf16` is what the run trains in."""
    root = Path(__file__).parents[1]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "accelerate_config.yaml"),
    ]
    args = _run_args(caches, "bf16", stand_in_dir, tmp_path / "run", False, "--total-steps", "2", "--no-validation")
    result = subprocess.run(
        [*launch, str(root / "train_nano_dit.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "run" / "timings.json").read_text())["mixed_precision"] == "bf16"
