import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from nano_dit.shards import (
    ShardReader,
    bucket_batches,
    find_shards,
    make_buckets,
    nearest_bucket,
    to_rgb,
    write_shards,
)
from nano_dit.synthetic import COLORS, POSITIONS, SHAPES, synthetic_samples


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path, members: dict[str, bytes]) -> None:
    """A tar written by hand, so that tests can put in it what no writer of ours would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


GOOD = _png(Image.new("RGB", (16, 16), (200, 10, 10)))


# --------------------------------------------------------------------------------------------
# Synthetic set
# --------------------------------------------------------------------------------------------
def test_synthetic_set_is_deterministic_and_its_captions_name_every_object():
    a = list(synthetic_samples(20, 32, seed=3, workers=1))  # drawn here
    b = list(synthetic_samples(20, 32, seed=3, workers=3))  # drawn by a pool of processes, in order
    assert [s["caption"] for s in a] == [s["caption"] for s in b] and [s["key"] for s in a] == [s["key"] for s in b]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))
    assert len({s["caption"] for s in a}) == 10  # each caption on two scenes
    assert len({json.dumps(s["meta"], sort_keys=True) for s in a}) == 20  # no two images alike
    for s in a:
        objects = s["meta"]["objects"]
        assert s["caption"].count(" and ") == len(objects) - 1
        for o in objects:
            assert f"{o['size']} {o['color']} {o['shape']}" in s["caption"]
        assert "background" not in s["caption"] and s["meta"]["caption"] == s["caption"]


def test_synthetic_pixels_match_the_layout():
    for s in synthetic_samples(10, 64, seed=0):
        pixels = np.asarray(s["image"]).astype(int)
        for o in s["meta"]["objects"]:
            x, y = (round(c * 64) for c in o["center"])
            assert np.abs(pixels[y, x] - COLORS[o["color"]]).max() < 30, (s["key"], o)


def test_synthetic_set_covers_the_attributes_the_text_edits_swap():
    samples = list(synthetic_samples(100, 16, seed=0))
    objects = [o for s in samples for o in s["meta"]["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["color"] for o in objects} == set(COLORS)
    assert {o["position"] for o in objects} == set(POSITIONS)
    assert any("on the left" in s["caption"] for s in samples)
    assert any("on the right" in s["caption"] for s in samples)


# --------------------------------------------------------------------------------------------
# Buckets, writer, reader
# --------------------------------------------------------------------------------------------
def test_buckets_keep_the_pixel_count_and_sides_multiple_of_64():
    buckets = make_buckets(512)
    assert buckets[0] == (512, 512)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.8 < w * h / 512**2 < 1.2 and max(w / h, h / w) <= 2.0
    assert nearest_bucket(1920, 1080, buckets) in {(640, 384), (704, 384)}
    assert nearest_bucket(1080, 1920, buckets) in {(384, 640), (384, 704)}


def test_round_trip_synth_to_shards_to_reader(tmp_path):
    counts = write_shards(synthetic_samples(25, 32), tmp_path / "s", samples_per_shard=10)
    assert dict(counts) == {"bucket_32x32": 25}
    assert [p.name for p in find_shards(tmp_path / "s")] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    reader = ShardReader(tmp_path / "s")
    samples = list(reader)
    expected = list(synthetic_samples(25, 32))
    assert [s["key"] for s in samples] == [s["key"] for s in expected]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(samples, expected))
    assert samples[0]["meta"]["objects"] == expected[0]["meta"]["objects"]
    assert reader.stats.read == 25 and reader.stats.skipped == []


def test_write_refuses_to_overwrite_without_asking(tmp_path):
    write_shards(synthetic_samples(2, 16), tmp_path / "s")
    with pytest.raises(FileExistsError, match="already holds data"):
        write_shards(synthetic_samples(2, 16), tmp_path / "s")
    write_shards(synthetic_samples(3, 16), tmp_path / "s", overwrite=True)
    assert ShardReader(tmp_path / "s").__iter__().__next__()["key"].startswith("synth_")
    assert not (tmp_path / "s.partial").exists()


def test_ranks_see_disjoint_samples_that_cover_the_set(tmp_path):
    write_shards(synthetic_samples(23, 16), tmp_path / "s", samples_per_shard=5)
    keys = [{s["key"] for s in ShardReader(tmp_path / "s", rank=r, world_size=2)} for r in range(2)]
    assert keys[0].isdisjoint(keys[1])
    assert len(keys[0] | keys[1]) == 23 and abs(len(keys[0]) - len(keys[1])) <= 1


def test_batches_never_mix_buckets():
    samples = [{"bucket": b, "i": i} for i, b in enumerate([(8, 8), (8, 16), (8, 8), (8, 16), (8, 8), (8, 8)])]
    batches = list(bucket_batches(samples, batch_size=2))
    assert all(len({s["bucket"] for s in batch}) == 1 for batch in batches)
    assert sorted(s["i"] for batch in batches for s in batch) == list(range(6))
    assert [len(b) for b in bucket_batches(samples, batch_size=3, drop_last=True)] == [3]


# --------------------------------------------------------------------------------------------
# Bad input: converted, skipped with a counted warning naming the sample, or refused
# --------------------------------------------------------------------------------------------
def _read(tmp_path, members):
    _write_tar(tmp_path / "s" / "bucket_16x16" / "shard-00000.tar", members)
    reader = ShardReader(tmp_path / "s")
    return list(reader), reader.stats


@pytest.mark.parametrize(
    "members,reason",
    [
        ({"bad.png": b"not an image at all", "bad.txt": b"x"}, "unreadable image"),
        ({"bad.png": GOOD[: len(GOOD) // 2], "bad.txt": b"x"}, "unreadable image"),
        ({"bad.png": GOOD}, "no caption"),
        ({"bad.png": GOOD, "bad.txt": "café".encode("latin-1")}, "caption is not UTF-8"),
        ({"bad.png": GOOD, "bad.txt": b"   "}, "caption is empty"),
        ({"bad.txt": b"a caption without its image"}, "no image"),
        ({"bad.png": _png(Image.new("RGB", (1, 1))), "bad.txt": b"x"}, "smaller than the minimum side"),
    ],
)
def test_a_bad_sample_is_skipped_counted_and_named(tmp_path, caplog, members, reason):
    members = {"ok.png": GOOD, "ok.txt": b"a red square", **members}
    with caplog.at_level(logging.WARNING, logger="nano_dit.shards"):
        samples, stats = _read(tmp_path, members)
    assert [s["key"] for s in samples] == ["ok"]
    assert len(stats.skipped) == 1 and stats.skipped[0][0] == "bad" and reason in stats.skipped[0][1]
    assert "bad" in caplog.text and reason in caplog.text


def test_a_truncated_tar_keeps_what_came_before_and_reports_the_rest(tmp_path, caplog):
    members = {f"k{i}.png": GOOD for i in range(4)} | {f"k{i}.txt": b"a red square" for i in range(4)}
    path = tmp_path / "s" / "bucket_16x16" / "shard-00000.tar"
    _write_tar(path, dict(sorted(members.items())))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    reader = ShardReader(tmp_path / "s")
    with caplog.at_level(logging.WARNING):
        samples = list(reader)
    assert 1 <= len(samples) < 4
    assert reader.stats.skipped and "shard-00000.tar" in caplog.text


@pytest.mark.parametrize(
    "mode,make",
    [
        ("L", lambda: Image.new("L", (16, 16), 128)),
        ("RGBA", lambda: Image.new("RGBA", (16, 16), (255, 0, 0, 0))),
        ("P", lambda: Image.new("RGB", (16, 16), (0, 0, 255)).convert("P")),
        ("I;16", lambda: Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))),
        ("CMYK", lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0))),
    ],
)
def test_colour_modes_are_converted_to_rgb(mode, make):
    image = make()
    assert image.mode == mode
    rgb, converted = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (16, 16) and mode in converted
    expected = {"L": (128,) * 3, "RGBA": (255,) * 3, "P": (0, 0, 255), "I;16": (255,) * 3, "CMYK": (255, 0, 0)}
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - expected[mode]).max() <= 2


def test_a_grayscale_sample_in_a_shard_is_converted_and_counted(tmp_path):
    samples, stats = _read(tmp_path, {"g.png": _png(Image.new("L", (16, 16), 7)), "g.txt": b"gray"})
    assert samples[0]["image"].mode == "RGB" and stats.converted == {"L -> RGB": 1}


def test_a_member_that_leaves_the_folder_is_skipped_by_name_and_the_rest_is_read(tmp_path):
    samples, stats = _read(tmp_path, {"ok.png": GOOD, "ok.txt": b"x", "../evil.png": GOOD, "../evil.txt": b"x"})
    assert [s["key"] for s in samples] == ["ok"]
    assert stats.skipped == [("../evil", "its member names leave their folder; refusing this sample")]


def test_a_json_member_that_is_not_json_skips_its_sample_by_name(tmp_path):
    members = {"ok.png": GOOD, "ok.txt": b"x", "bad.png": GOOD, "bad.txt": b"y", "bad.json": b"{oops"}
    samples, stats = _read(tmp_path, members)
    assert [s["key"] for s in samples] == ["ok"]
    assert stats.skipped[0][0] == "bad" and stats.skipped[0][1].startswith("its bad.json member is not JSON")


def test_a_truncated_tar_is_one_damage_event(tmp_path):
    members = {f"k{i}.png": GOOD for i in range(4)} | {f"k{i}.txt": b"a red square" for i in range(4)}
    path = tmp_path / "s" / "bucket_16x16" / "shard-00000.tar"
    _write_tar(path, dict(sorted(members.items())))
    data = path.read_bytes()
    for cut in range(len(data) // 3, len(data) - 1024, 97):  # wherever the cut falls
        path.write_bytes(data[:cut])
        reader = ShardReader(tmp_path / "s")
        samples = list(reader)
        assert len(samples) <= 4  # (a cut inside the end padding loses no sample, but is still a cut)
        # One entry: the damage (with the sample it cut short), or, where the cut falls between
        # members so that tar sees a clean end, the sample left without its caption.
        assert len(reader.stats.skipped) == 1, (cut, reader.stats.skipped)


def test_missing_or_empty_shard_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardReader(tmp_path / "nowhere")
    (tmp_path / "empty" / "bucket_16x16").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no shards in"):
        ShardReader(tmp_path / "empty")


def test_metadata_is_kept(tmp_path):
    samples, _ = _read(tmp_path, {"m.png": GOOD, "m.txt": b"x", "m.json": json.dumps({"a": 1}).encode()})
    assert samples[0]["meta"] == {"a": 1}


def test_a_seed_shuffles_the_shard_order_reproducibly(tmp_path):
    write_shards(synthetic_samples(12, 16), tmp_path / "s", samples_per_shard=2)
    order = lambda seed: [s["key"] for s in ShardReader(tmp_path / "s", seed=seed)]  # noqa: E731
    assert order(1) == order(1)
    assert order(1) != order(2) and sorted(order(1)) == sorted(order(None))
    shares = [{s["key"] for s in ShardReader(tmp_path / "s", rank=r, world_size=2, seed=1)} for r in range(2)]
    assert shares[0].isdisjoint(shares[1]) and len(shares[0] | shares[1]) == 12


def test_dataloader_workers_split_the_samples_between_them(tmp_path):
    import torch.utils.data

    write_shards(synthetic_samples(10, 16), tmp_path / "s", samples_per_shard=3)
    loader = torch.utils.data.DataLoader(
        ShardReader(tmp_path / "s"), batch_size=None, num_workers=2, collate_fn=lambda s: s["key"]
    )
    keys = list(loader)
    assert sorted(keys) == sorted(s["key"] for s in synthetic_samples(10, 16))  # each exactly once


def test_a_bad_sample_before_a_truncation_is_skipped_on_its_own_account(tmp_path):
    """A tar cut at a member boundary is marked damaged before it is read; a sample earlier in
    it that is bad for another reason is still skipped by its own name and reason."""
    members = {"a.png": GOOD, "a.txt": b"", "b.png": GOOD, "b.txt": b"fine", "c.png": GOOD, "c.txt": b"cut"}
    path = tmp_path / "s" / "bucket_16x16" / "shard-00000.tar"
    _write_tar(path, members)
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"c.txt")])  # cut at c.txt's header: c loses its caption
    reader = ShardReader(tmp_path / "s")
    assert [s["key"] for s in reader] == ["b"]
    skipped = dict(reader.stats.skipped)
    assert skipped["a"] == "caption is empty"
    assert skipped[str(path)].startswith("truncated") and "it cut sample c short" in skipped[str(path)]
