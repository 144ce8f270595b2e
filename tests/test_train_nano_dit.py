import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from nano_dit import NanoDiTPipeline
from nano_dit.training import parse_config

# train_nano_dit.py is a script (so that `accelerate launch` runs it), not a module of the package.
_spec = importlib.util.spec_from_file_location("train_nano_dit", Path(__file__).parents[1] / "train_nano_dit.py")
train_nano_dit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_nano_dit)


@pytest.mark.slow
def test_demo_training_learns_and_saves_a_loadable_pipeline(tmp_path):
    args = ["--total-steps", "480", "--num-images", "8", "--batch-size", "8", "--log-every", "160"]
    result = train_nano_dit.main([*args, "--output-dir", str(tmp_path), "--warmup-steps", "20"])

    lines = (tmp_path / "checkpoints" / "training_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [160, 320, 480]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["lr"] == pytest.approx(1e-6)  # cosine ends on its floor
    # Regenerated images beat the best constant guess (the mean image) by a wide margin.
    assert result["reconstruction_mse"] < 0.5 * result["data_variance"]

    pipe = NanoDiTPipeline.from_pretrained(tmp_path / "checkpoints" / "checkpoint_final")
    assert pipe.transformer.config.in_channels == 3
    assert torch.isfinite(next(pipe.transformer.parameters())).all()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--total-steps", "0"], "--total-steps must be > 0, got 0"),
        (["--peak-lr", "0"], "--peak-lr > 0"),
        (["--warmup-steps", "700"], r"--warmup-steps must be in \[0, --total-steps\), got 700"),
        (["--ema-decay", "1.5"], r"--ema-decay must be in \(0, 1\), got 1.5"),
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


def test_a_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 32 is larger than the data"):
        train_nano_dit.main(["--batch-size", "32", "--num-images", "8", "--output-dir", str(tmp_path)])


def test_the_nano_preset_says_it_needs_the_latent_cache(tmp_path):
    with pytest.raises(ValueError, match="preset 'nano' trains on 16-channel VAE latents"):
        train_nano_dit.main(["--preset", "nano", "--output-dir", str(tmp_path)])
