"""WebDataset shards grouped by aspect bucket: buckets, image normalisation, writer and reader.

Layout: `<root>/bucket_<W>x<H>/shard-<00000>.tar`, members `<key>.png|jpg` (image),
`<key>.txt` (caption, UTF-8) and optionally `<key>.json` (metadata).

Reading goes through `webdataset`'s tar iterators. Bad samples never stop a run and are never
dropped silently: each is converted (colour modes, size) or skipped with a warning that names it,
and counted in `ShardReader.stats`. Missing data and tar members whose names try to leave the
folder are refused with an error.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.utils.data
import webdataset as wds
from PIL import Image, ImageOps
from webdataset.tariterators import tarfile_samples

from .folders import swap_in

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
BUCKET_DIR = re.compile(r"^bucket_(\d+)x(\d+)$")
SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")  # webdataset splits keys at the first "."


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------
def make_buckets(resolution: int, max_aspect: float = 2.0, multiple: int | None = None) -> list[tuple[int, int]]:
    """(W, H) buckets of about `resolution`² pixels, sides multiples of `multiple`, square first.

    `multiple` defaults to resolution / 8 (64 at 512: the Flux VAE's ×8 times patch 2, with room),
    and at least 16.
    """
    multiple = multiple or max(16, resolution // 8)
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple}")
    buckets = {(resolution, resolution)}
    for w in range(multiple, 2 * resolution + 1, multiple):
        h = max(multiple, round(resolution * resolution / w / multiple) * multiple)
        if max(w / h, h / w) <= max_aspect:
            buckets.update({(w, h), (h, w)})
    return sorted(buckets, key=lambda b: (abs(math.log(b[0] / b[1])), b))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width / height (in log space)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"bucket_{bucket[0]}x{bucket[1]}"


# --------------------------------------------------------------------------------------------
# Images: colour modes and sizes
# --------------------------------------------------------------------------------------------
class SampleSkipped(Exception):
    """A sample that cannot be used; the reader counts it and goes on."""


class IncompleteSample(SampleSkipped):
    """A sample missing its image or caption member (in a damaged tar, the one cut short)."""


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB version of any PIL image, and what was converted (None when it was RGB already).

    Alpha is composited over white; 16-bit and 32-bit grayscale are scaled to 8 bits (PIL's own
    conversion would clip them); palette, grayscale and CMYK go through PIL's converters.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / peak * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), f"{mode} -> RGB"
    if mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} -> RGB over white"
    return image.convert("RGB"), f"{mode} -> RGB"


def decode_caption(raw: bytes | str) -> str:
    """A caption as text, stripped; SampleSkipped when it is not UTF-8 or is empty."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleSkipped(f"caption is not UTF-8 ({err.reason} at byte {err.start})") from None
    caption = raw.strip()
    if not caption:
        raise SampleSkipped("caption is empty")
    return caption


def conversions_text(converted: Counter) -> str:
    """The conversions part of a summary line (`; converted 3 (L -> RGB), ...`), empty if none."""
    if not converted:
        return ""
    return "; converted " + ", ".join(f"{n} ({why})" for why, n in sorted(converted.items()))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize so the image covers the bucket, then centre-crop to it exactly."""
    return ImageOps.fit(image, bucket, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def check_size(image: Image.Image, bucket: tuple[int, int], min_side: int, max_aspect: float) -> None:
    """Refuse (skip) images too small to upscale or too far from any bucket's shape."""
    w, h = image.size
    if min(w, h) < min_side:
        raise SampleSkipped(f"image is {w}x{h}, smaller than the minimum side {min_side}")
    crop = max((w / h) / (bucket[0] / bucket[1]), (bucket[0] / bucket[1]) / (w / h))
    if crop > max_aspect:
        raise SampleSkipped(
            f"aspect ratio {w}x{h} is {crop:.1f}x off the nearest bucket {bucket[0]}x{bucket[1]} "
            f"(more than {max_aspect}x would crop most of the picture)"
        )


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
def write_shards(
    samples: Iterable[dict], out_dir: str | os.PathLike, samples_per_shard: int = 20, overwrite: bool = False
) -> Counter:
    """Write samples (key, image, caption, optional meta) as shards grouped by image size.

    Each image's size must be its bucket. Shards are written into `<out_dir>.partial` and swapped
    in at the end (`swap_in`), so an interrupted run never leaves a half-written set behind and an
    existing set is replaced only by a whole one. With no sample at all, `NoSamples` is raised and
    `out_dir` is left as it was. Returns the number of samples per bucket.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds data; pass overwrite=True (--overwrite) to replace it")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writers: dict[tuple[int, int], wds.ShardWriter] = {}
    counts: Counter = Counter()
    try:
        for sample in samples:
            key = sample["key"]
            if not SAFE_KEY.match(key):
                raise ValueError(f"sample key {key!r} must match {SAFE_KEY.pattern} (no dots, slashes or spaces)")
            bucket = sample["image"].size
            if bucket not in writers:
                folder = partial / bucket_name(bucket)
                folder.mkdir(parents=True)
                writers[bucket] = wds.ShardWriter(
                    str(folder / "shard-%05d.tar"), maxcount=samples_per_shard, verbose=0
                )
            record = {"__key__": key, "png": _png_bytes(sample["image"]), "txt": sample["caption"]}
            if sample.get("meta") is not None:
                record["json"] = json.dumps(sample["meta"], sort_keys=True)
            writers[bucket].write(record)
            counts[bucket_name(bucket)] += 1
    finally:
        for writer in writers.values():
            writer.close()
    if not counts:
        shutil.rmtree(partial, ignore_errors=True)
        state = "left as it was" if out_dir.exists() else "not created"
        raise NoSamples(f"no sample to write: {out_dir} is {state}")
    swap_in(partial, out_dir)
    return counts


class NoSamples(ValueError):
    """A writer was given no sample at all; the destination was not touched."""


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------
@dataclass
class ReadStats:
    """What a reader saw: samples read, skipped (with the reason for each) and converted."""

    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample or shard, reason)
    converted: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        return f"read {self.read} samples, skipped {len(self.skipped)}" + conversions_text(self.converted)


def find_shards(root: str | os.PathLike) -> list[Path]:
    """All `bucket_<W>x<H>/shard-*.tar` below root, sorted; a clear error when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"shard folder {root} does not exist (make one with `nano-dit data synth` or `prepare`)"
        )
    shards = sorted(p for p in root.glob("bucket_*/shard-*.tar") if BUCKET_DIR.match(p.parent.name))
    if not shards:
        raise FileNotFoundError(f"no shards in {root}: expected {root}/bucket_<W>x<H>/shard-00000.tar")
    return shards


def shard_bucket(path: Path) -> tuple[int, int]:
    match = BUCKET_DIR.match(path.parent.name)
    return int(match.group(1)), int(match.group(2))


class ShardReader(torch.utils.data.IterableDataset):
    """Iterate decoded samples from bucketed shards, one process's share of them.

    Args:
        root: the folder that holds the `bucket_<W>x<H>/` folders.
        rank, world_size: this process's share (DDP); samples are split by position, so every
            rank gets a disjoint part whatever the number of shards.
        min_side, max_aspect: images smaller than `min_side` or needing more than `max_aspect`
            of crop are skipped; others are fitted to their bucket.
        seed: when given, the shard order is shuffled with it (the same seed, the same order on
            every rank, so the ranks' shares stay disjoint); when None, shards are read sorted.

    Each sample is a dict: key, image (RGB PIL at the bucket size), caption, meta (dict or None),
    bucket (W, H). `stats` counts what was read, skipped and converted. As a DataLoader dataset,
    samples are split further by worker id (and each worker keeps its own `stats`).
    """

    def __init__(
        self,
        root,
        rank: int = 0,
        world_size: int = 1,
        min_side: int = 8,
        max_aspect: float = 2.0,
        seed: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.shards = find_shards(root)
        if seed is not None:
            random.Random(seed).shuffle(self.shards)
        self.rank, self.world_size = rank, world_size
        self.min_side, self.max_aspect = min_side, max_aspect
        self.stats = ReadStats()
        self._damaged: dict[str, int] = {}  # shard -> its damage event's index in stats.skipped
        self._incomplete: dict[str, tuple[str, str]] = {}  # shard -> (key, reason) of a sample missing a member

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_info()
        share, num_shares = self.rank * num_workers + worker, self.world_size * num_workers
        for index, raw in enumerate(self._raw_samples()):
            if index % num_shares != share:
                continue
            sample = self._decode(raw)
            if sample is not None:
                self.stats.read += 1
                yield sample
        self._flush_incomplete()

    def _raw_samples(self) -> Iterator[dict]:
        for path in self.shards:
            if not _ends_whole(path):  # cut at a member boundary, a tar reads "cleanly" to the cut
                self._damage(str(path), "truncated: the tar ends without its end-of-archive blocks")
        yield from tarfile_samples([{"url": str(p)} for p in self.shards], handler=self._shard_error)

    def _shard_named_in(self, exn: Exception) -> str:
        """The shard an error of webdataset's tar reader is about (it appends the url or the open
        stream to the exception's arguments)."""
        names = {str(p) for p in self.shards}
        for arg in reversed(exn.args):
            name = arg if isinstance(arg, str) else getattr(arg, "name", None)
            if isinstance(name, str) and name in names:
                return name
            quoted = re.search(r"name='([^']+)'", arg) if isinstance(arg, str) else None
            if quoted and quoted.group(1) in names:  # "... @ <_io.BufferedReader name='...'>"
                return quoted.group(1)
        return "a shard"

    def _damage(self, where: str, reason: str) -> None:
        """One damage event per shard: a second symptom of the same shard joins the first."""
        if where in self._damaged:
            index = self._damaged[where]
            if reason not in self.stats.skipped[index][1]:
                self.stats.skipped[index] = (where, f"{self.stats.skipped[index][1]}; {reason}")
            return
        logger.warning("%s: %s; the samples before the damage are read", where, reason)
        self.stats.skipped.append((where, reason))
        self._damaged[where] = len(self.stats.skipped) - 1

    def _shard_error(self, exn: Exception) -> bool:
        where = self._shard_named_in(exn)
        message = str(exn.args[0] if exn.args else exn).split(" @ ")[0]  # less the stream's repr
        reason = f"unreadable tar data ({type(exn).__name__}: {message})"
        if where in self._incomplete:  # the sample just before the damage was cut short by it
            reason += f"; it cut sample {self._incomplete.pop(where)[0]} short"
        self._damage(where, reason)
        return True  # go on with the next shard

    def _flush_incomplete(self) -> None:
        """Samples missing a member with no damage after them: skipped on their own account."""
        for url, (key, reason) in self._incomplete.items():
            logger.warning("skipping sample %s in %s: %s", key, url, reason)
            self.stats.skipped.append((key, reason))
        self._incomplete.clear()

    def _decode(self, raw: dict) -> dict | None:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        # A damage event is reported before the next sample is read: an incomplete sample still
        # waiting is not the damage's.
        self._flush_incomplete()
        try:
            if ".." in key.split("/") or key.startswith("/"):
                raise SampleSkipped("its member names leave their folder; refusing this sample")
            return self._decode_sample(raw, key, Path(url))
        except SampleSkipped as skip:
            if isinstance(skip, IncompleteSample) and url in self._damaged:  # cut short by that damage
                self._damage(url, f"it cut sample {key} short")
                return None
            if isinstance(skip, IncompleteSample):  # a damage event may still follow and claim it
                self._incomplete[url] = (key, str(skip))
                return None
            logger.warning("skipping sample %s in %s: %s", key, url, skip)
            self.stats.skipped.append((key, str(skip)))
            return None

    def _decode_sample(self, raw: dict, key: str, url: Path) -> dict:
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_ext is None:
            raise IncompleteSample(f"no image ({'/'.join(IMAGE_EXTENSIONS)} member)")
        if "txt" not in raw:
            raise IncompleteSample("no caption (.txt member)")
        caption = decode_caption(raw["txt"])
        image = open_image(raw[image_ext])
        image, converted = to_rgb(image)
        bucket = shard_bucket(url)
        check_size(image, bucket, self.min_side, self.max_aspect)
        if image.size != bucket:
            image, converted = fit_to_bucket(image, bucket), f"resized to {bucket[0]}x{bucket[1]}"
        if converted:
            self.stats.converted[converted] += 1
        try:
            meta = json.loads(raw["json"]) if "json" in raw else None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SampleSkipped(f"its {key}.json member is not JSON ({err})") from None
        return {"key": key, "image": image, "caption": caption, "meta": meta, "bucket": bucket}


def _ends_whole(path: Path) -> bool:
    """Whether a tar ends with its end-of-archive marker (two zero 512-byte blocks)."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated file fails here, not later); SampleSkipped if unreadable."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for bad data
        raise SampleSkipped(f"unreadable image ({type(err).__name__}: {err})") from None
    return image


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def bucket_batches(samples: Iterable[dict], batch_size: int, drop_last: bool = False) -> Iterator[list[dict]]:
    """Group samples into batches that never mix buckets (one open batch per bucket)."""
    open_batches: dict[tuple[int, int], list[dict]] = {}
    for sample in samples:
        batch = open_batches.setdefault(sample["bucket"], [])
        batch.append(sample)
        if len(batch) == batch_size:
            yield open_batches.pop(sample["bucket"])
    if not drop_last:
        yield from (b for b in open_batches.values() if b)
