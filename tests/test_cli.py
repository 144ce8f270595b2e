import re

import pytest
from PIL import Image

from nano_dit.cli import main
from nano_dit.feature_cache import load_cache


def test_synth_make_tiny_and_encode_give_a_ready_cache(tmp_path, capsys):
    shards, encoders, cache = tmp_path / "shards", tmp_path / "tiny", tmp_path / "cache"
    main(
        ["data", "synth", "--out", str(shards), "--resolution", "32", "--num-images", "10", "--samples-per-shard", "2"]
    )
    assert len(list(shards.glob("bucket_32x32/shard-*.tar"))) == 5
    main(["encoders", "make-tiny", "--out", str(encoders), "--image-size", "32"])
    main(["data", "encode", "--shards", str(shards), "--cache", str(cache), "--stand-in", str(encoders)])
    out = capsys.readouterr().out
    assert "wrote 10 synthetic images" in out and "STAND-IN" in out
    assert "latents: 10 encoded / 0 cached" in out
    _, (bucket,) = load_cache(cache)
    assert len(bucket) == 10 and bucket.latents.shape[1] == 16


def test_user_errors_end_with_a_message_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "encode", "--shards", str(tmp_path / "none"), "--cache", str(tmp_path / "c"), "--pixel-mode"])
    assert exit_info.value.code == 2
    assert "shard folder" in capsys.readouterr().err


def test_synth_preview_is_a_contact_sheet_of_the_first_images(tmp_path):
    main(["data", "synth", "--out", str(tmp_path / "s"), "--resolution", "16", "--num-images", "6", "--preview"])
    sheet = Image.open(tmp_path / "s" / "preview.png")
    assert sheet.width == 4 * 192 and sheet.height > 2 * 192  # 4 columns, 2 rows with captions


@pytest.mark.parametrize(
    "argv,message",
    [
        (["data", "synth", "--num-images", "-1"], "argument --num-images: must be a finite number > 0, got -1"),
        (["data", "synth", "--resolution", "0"], "argument --resolution: must be a finite number > 0, got 0"),
        (["data", "synth", "--samples-per-shard", "0"], "argument --samples-per-shard: must be a finite number > 0"),
        (["data", "synth", "--seed", "-3"], r"argument --seed: must be in \[0, 2\*\*32\), got -3"),
        (["data", "prepare", "src", "--max-aspect", "0"], "argument --max-aspect: must be a finite number > 0, got 0"),
        (["data", "prepare", "src", "--max-aspect", "nan"], "argument --max-aspect: must be a finite number > 0"),
        (["data", "prepare", "src", "--resolution", "abc"], "argument --resolution: must be an integer, got 'abc'"),
        (
            ["validate", "--checkpoint", "c", "--guidance-scale", "nan"],
            "--guidance-scale must be a finite number >= 0, got nan",
        ),
    ],
)
def test_subcommand_flags_are_checked_at_the_door(argv, message, tmp_path, capsys):
    if argv[0] == "data":
        argv = [*argv, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize(
    "argv,dest,value",
    [
        (["validate", "--checkpoint", "c", "--num-inference-steps", "7"], "num_inference_steps", 7),
        (["validate", "--checkpoint", "c", "--guidance-scale", "2.5"], "guidance_scale", 2.5),
        (["data", "encode", "--shards", "s", "--cache", "c", "--max-sequence-length", "9"], "max_sequence_length", 9),
    ],
)
def test_subcommand_flags_take_the_trainer_s_names(argv, dest, value):
    from nano_dit.cli import build_parser

    assert getattr(build_parser().parse_args(argv), dest) == value
