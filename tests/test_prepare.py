import json

import numpy as np
import pytest
from PIL import Image

from nano_dit.prepare import BucketFit, prepare_shards
from nano_dit.shards import ShardReader


def _image(path, size=(96, 64), mode="RGB", color=(10, 200, 30)):
    Image.new("RGB", size, color).convert(mode).save(path)


def test_a_folder_with_sidecar_captions_becomes_bucketed_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([(96, 64), (64, 96), (64, 64), (100, 64)]):
        _image(src / f"img {i}.png", size)
        (src / f"img {i}.txt").write_text(f"picture number {i}")
    report = prepare_shards(src, tmp_path / "out", BucketFit(64, min_side=16))
    assert sum(report.written.values()) == 4 and report.skipped == []
    samples = list(ShardReader(tmp_path / "out"))
    for s in samples:
        assert s["image"].size == s["bucket"]
        w, h = s["bucket"]
        assert 0.75 < w * h / 64**2 < 1.3
    wide = next(s for s in samples if s["caption"] == "picture number 0")
    assert wide["bucket"][0] > wide["bucket"][1]  # landscape stays landscape
    assert len({s["bucket"] for s in samples}) >= 3


def test_metadata_jsonl_is_read_and_paths_outside_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.jpg", (64, 64))
    (src / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "a green picture"}) + "\n")
    prepare_shards(src, tmp_path / "out", BucketFit(64))
    assert [s["caption"] for s in ShardReader(tmp_path / "out")] == ["a green picture"]

    (src / "metadata.jsonl").write_text(json.dumps({"file_name": "../secret.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="points outside"):
        prepare_shards(src, tmp_path / "out2", BucketFit(64))


@pytest.mark.parametrize(
    "name,write,reason",
    [
        ("tiny", lambda p: _image(p.with_suffix(".png"), (1, 1)), "smaller than the minimum side"),
        ("strip", lambda p: _image(p.with_suffix(".png"), (640, 32)), "aspect ratio 640x32"),
        ("broken", lambda p: p.with_suffix(".png").write_bytes(b"\x89PNG garbage"), "unreadable image"),
        ("nocap", lambda p: _image(p.with_suffix(".jpg")), "no caption"),
        ("latin", lambda p: _image(p.with_suffix(".png")), "not UTF-8"),
    ],
)
def test_unusable_images_are_skipped_and_reported(tmp_path, name, write, reason):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "good.png")
    (src / "good.txt").write_text("fine")
    write(src / name)
    if name != "nocap":
        (src / f"{name}.txt").write_bytes("café".encode("latin-1") if name == "latin" else b"caption")
    report = prepare_shards(src, tmp_path / "out", BucketFit(64))
    assert sum(report.written.values()) == 1
    assert len(report.skipped) == 1 and name in report.skipped[0][0] and reason in report.skipped[0][1]
    assert "skipped 1" in report.summary()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_colour_modes_are_converted_and_counted(tmp_path, mode):
    src = tmp_path / "src"
    src.mkdir()
    path = src / ("x.jpg" if mode == "CMYK" else "x.png")
    _image(path, (64, 64), mode)
    (src / "x.txt").write_text("converted")
    report = prepare_shards(src, tmp_path / "out", BucketFit(64))
    assert sum(report.converted.values()) == 1 and mode in next(iter(report.converted))
    (sample,) = ShardReader(tmp_path / "out")
    assert np.asarray(sample["image"]).shape == (64, 64, 3)


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(src / "deep.png")
    (src / "deep.txt").write_text("mid gray")
    prepare_shards(src, tmp_path / "out", BucketFit(64))
    (sample,) = ShardReader(tmp_path / "out")
    assert abs(int(np.asarray(sample["image"])[0, 0, 0]) - 128) <= 1


def test_an_empty_or_missing_source_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_shards(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        prepare_shards(tmp_path / "empty", tmp_path / "out")


def test_a_hugging_face_dataset_becomes_shards_and_its_bad_rows_are_skipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {
        "image": [{"bytes": _png_bytes((96, 64)), "path": None}, {"bytes": b"broken", "path": None}],
        "caption": ["a wide green picture", "a broken one"],
    }
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    report = prepare_shards(tmp_path / "ds", tmp_path / "out", BucketFit(64), hf_dataset={"text_column": "caption"})
    assert sum(report.written.values()) == 1
    assert report.skipped[0][0] == "ds[1]" and "unreadable image" in report.skipped[0][1]
    (sample,) = ShardReader(tmp_path / "out")
    assert sample["caption"] == "a wide green picture" and sample["bucket"][0] > sample["bucket"][1]

    with pytest.raises(ValueError, match="column 'text' not in"):
        prepare_shards(tmp_path / "ds", tmp_path / "out2", BucketFit(64), hf_dataset={})


def _png_bytes(size):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_overwrite_with_no_usable_image_keeps_the_existing_set_and_counts_the_reasons(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    _image(good / "a.png", (64, 64))
    (good / "a.txt").write_text("a green picture")
    prepare_shards(good, tmp_path / "out", BucketFit(64))
    before = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    for i in range(3):
        _image(bad / f"tiny{i}.png", (4, 4))
        (bad / f"tiny{i}.txt").write_text("too small")
    _image(bad / "mute.png", (64, 64))  # no caption
    with pytest.raises(ValueError, match=r"no usable image in .*bad \(3 × image is #, smaller .*1 × no caption"):
        prepare_shards(bad, tmp_path / "out", BucketFit(64), overwrite=True)
    assert sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")) == before
    assert [s["caption"] for s in ShardReader(tmp_path / "out")] == ["a green picture"]
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.old").exists()


def test_overwrite_replaces_a_set_only_with_a_whole_one(tmp_path, monkeypatch):
    import nano_dit.shards as shards

    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.png", (64, 64))
    (src / "a.txt").write_text("first")
    prepare_shards(src, tmp_path / "out", BucketFit(64))
    (src / "a.txt").write_text("second")
    real_rename, renames = shards.Path.rename, []

    def crash_after_moving_the_old_set_aside(self, target):
        renames.append((self.name, target.name))
        if self.name.endswith(".partial"):
            raise OSError("killed between the two renames")
        return real_rename(self, target)

    monkeypatch.setattr(shards.Path, "rename", crash_after_moving_the_old_set_aside)
    with pytest.raises(OSError, match="killed"):
        prepare_shards(src, tmp_path / "out", BucketFit(64), overwrite=True)
    assert renames == [("out", "out.old"), ("out.partial", "out")]
    # The old set is whole beside the target, the new one whole in .partial: nothing was lost.
    assert [s["caption"] for s in ShardReader(tmp_path / "out.old")] == ["first"]
    assert [s["caption"] for s in ShardReader(tmp_path / "out.partial")] == ["second"]


def test_every_file_of_a_folder_is_written_converted_or_skipped_by_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "plain.png", (64, 64))
    (src / "plain.txt").write_text("a plain picture")
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(src / "moving.gif", save_all=True, append_images=frames[1:])  # an unsupported type
    (src / "moving.txt").write_text("an animation")
    frames[0].save(src / "moving.webp", save_all=True, append_images=frames[1:])  # animated, a supported type
    (src / "moving.webp.txt").write_text("unused")  # (the caption file of moving.webp is moving.txt)
    rotated = Image.new("RGB", (96, 64), (10, 200, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated.save(src / "rotated.jpg", exif=exif)
    (src / "rotated.txt").write_text("tall\x00 once\x07 turned")
    outside = tmp_path / "outside.png"
    _image(outside, (64, 64))
    (src / "link.png").symlink_to(outside)
    (src / "link.txt").write_text("a link out")
    (src / "notes.md").write_text("not data")

    report = prepare_shards(src, tmp_path / "out", BucketFit(64))
    skipped = dict(report.skipped)
    assert set(skipped) == {
        "moving.gif",
        "moving.webp.txt",
        "notes.md",
        str(src / "moving.webp"),
        str(src / "link.png"),
    }
    assert skipped["moving.gif"].startswith("unsupported file type .gif")
    assert skipped[str(src / "moving.webp")] == "animated image (2 frames): only still images are used"
    assert skipped[str(src / "link.png")].startswith("a link leading outside the source folder")
    assert report.converted["EXIF orientation applied"] == 1
    assert report.converted["caption control characters removed"] == 1
    samples = {s["caption"]: s for s in ShardReader(tmp_path / "out")}
    assert set(samples) == {"a plain picture", "tall once turned"}
    w, h = samples["tall once turned"]["bucket"]
    assert h > w  # stored upright: the 96×64 JPEG displays as 64×96
    # 11 files: 2 samples written and 5 files skipped by name; the other 4 are those samples' captions
    assert sum(report.written.values()) + len(report.skipped) == 7


def test_a_long_caption_is_trimmed_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.png", (64, 64))
    (src / "a.txt").write_text("word " * 100_000)
    report = prepare_shards(src, tmp_path / "out", BucketFit(64))
    (sample,) = ShardReader(tmp_path / "out")
    assert len(sample["caption"]) <= 2000 and sample["caption"].startswith("word word")
    assert report.converted["caption trimmed to 2000 characters"] == 1


def test_a_bad_metadata_line_names_the_file_and_the_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.png", (64, 64))
    (src / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", text}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not a JSON object \(Expecting property name"):
        prepare_shards(src, tmp_path / "out", BucketFit(64))
