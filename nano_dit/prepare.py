"""Turn a folder of the user's own images into bucketed shards.

Two source layouts, the ones Hugging Face's `imagefolder` knows:
- images with sidecar captions: `cat.jpg` + `cat.txt`;
- images with a `metadata.jsonl`: one `{"file_name": "cat.jpg", "text": "..."}` per line
  (`caption` is accepted for `text`).

Each image is converted to RGB, resized and centre-cropped to its nearest aspect bucket, and
written with its caption. Unusable samples are skipped with a warning that names them, and listed
in the returned report; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .shards import (
    IMAGE_EXTENSIONS,
    SampleSkipped,
    check_size,
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
    open_image,
    to_rgb,
    write_shards,
)

logger = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    written: Counter = field(default_factory=Counter)  # bucket -> samples
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    converted: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        buckets = ", ".join(f"{b}: {n}" for b, n in sorted(self.written.items())) or "nothing"
        text = f"wrote {sum(self.written.values())} samples ({buckets}); skipped {len(self.skipped)}"
        if self.converted:
            text += "; converted " + ", ".join(f"{n} ({why})" for why, n in sorted(self.converted.items()))
        return text


def find_source_items(src: str | os.PathLike) -> list[tuple[Path, str | bytes | None]]:
    """(image path, caption) pairs: the caption is a str from metadata.jsonl, the raw bytes of a
    sidecar .txt (decoded later, so a bad encoding skips one sample), or None when missing."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    metadata = src / "metadata.jsonl"
    if metadata.exists():
        return list(_from_metadata(src, metadata))
    images = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl in {src}")
    return [(p, p.with_suffix(".txt").read_bytes() if p.with_suffix(".txt").exists() else None) for p in images]


def _from_metadata(src: Path, metadata: Path) -> Iterator[tuple[Path, str | None]]:
    root = src.resolve()
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        name = record.get("file_name")
        if not name:
            raise ValueError(f"{metadata}:{number} has no file_name")
        path = (src / name).resolve()
        if root not in path.parents:
            raise ValueError(f"{metadata}:{number}: file_name {name!r} points outside {src}; refusing")
        yield path, record.get("text", record.get("caption"))


def prepare_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    resolution: int = 512,
    samples_per_shard: int = 100,
    max_aspect: float = 2.0,
    min_side: int | None = None,
    overwrite: bool = False,
) -> PrepareReport:
    """Read `src`, fit every image to its nearest bucket and write shards into `out_dir`.

    Images smaller than `min_side` (default resolution / 4) or more than `max_aspect` off their
    nearest bucket (a crop that would lose most of the picture) are skipped.
    """
    items = find_source_items(src)
    buckets = make_buckets(resolution, max_aspect=max_aspect)
    report = PrepareReport()
    min_side = min_side or max(1, resolution // 4)

    def samples():
        for path, caption in tqdm(items, desc="prepare", unit="img"):
            try:
                yield _prepare_one(path, caption, buckets, min_side, max_aspect, report)
            except SampleSkipped as skip:
                logger.warning("skipping %s: %s", path, skip)
                report.skipped.append((str(path), str(skip)))

    report.written = write_shards(samples(), out_dir, samples_per_shard, overwrite=overwrite)
    if not report.written:
        raise ValueError(f"no usable images in {src}: every one was skipped ({report.skipped[:3]} ...)")
    return report


def _prepare_one(path: Path, caption, buckets, min_side: int, max_aspect: float, report: PrepareReport) -> dict:
    if caption is None:
        raise SampleSkipped("no caption (no sidecar .txt and no metadata text)")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleSkipped(f"caption is not UTF-8 ({err.reason} at byte {err.start})") from None
    caption = caption.strip()
    if not caption:
        raise SampleSkipped("caption is empty")
    image, converted = to_rgb(open_image(path.read_bytes()))
    if converted:
        report.converted[converted] += 1
    bucket = nearest_bucket(*image.size, buckets)
    check_size(image, bucket, min_side, max_aspect)
    return {
        "key": _key(path),
        "image": fit_to_bucket(image, bucket),
        "caption": caption,
        "meta": {"source": path.name},
    }


def _key(path: Path) -> str:
    """A webdataset-safe, unique key: the file stem's safe characters plus a hash of the path."""
    stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", path.stem)[:48] or "image"
    return f"{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
