"""Turn a folder of the user's own images into bucketed shards.

Three sources:
- a folder of images with sidecar captions: `cat.jpg` + `cat.txt`;
- a folder of images with a `metadata.jsonl`: one `{"file_name": "cat.jpg", "text": "..."}` per
  line (`caption` is accepted for `text`), the layout of Hugging Face's `imagefolder`;
- a Hugging Face `datasets` image dataset: a folder written by `save_to_disk`, or a Hub name.

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

from PIL import ImageOps
from tqdm.auto import tqdm

from .shards import (
    IMAGE_EXTENSIONS,
    NoSamples,
    SampleSkipped,
    check_size,
    conversions_text,
    decode_caption,
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
    open_image,
    to_rgb,
    write_shards,
)

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
MAX_CAPTION_CHARS = 2000  # far past T5's 128-token window (about 500 characters); the rest is noise or damage


def clean_caption(caption: str) -> tuple[str, list[str]]:
    """The caption without control characters (newlines and tabs become spaces) and trimmed to
    MAX_CAPTION_CHARS; and what was done, for the report."""
    done = []
    cleaned = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", caption)
    if cleaned != caption:
        done.append("caption control characters removed")
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    if len(cleaned) > MAX_CAPTION_CHARS:
        cleaned = cleaned[:MAX_CAPTION_CHARS].rsplit(" ", 1)[0]
        done.append(f"caption trimmed to {MAX_CAPTION_CHARS} characters")
    if not cleaned:
        raise SampleSkipped("caption is empty once control characters are removed")
    return cleaned, done


@dataclass
class PrepareReport:
    written: Counter = field(default_factory=Counter)  # bucket -> samples
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    converted: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        buckets = ", ".join(f"{b}: {n}" for b, n in sorted(self.written.items())) or "nothing"
        text = f"wrote {sum(self.written.values())} samples ({buckets}); skipped {len(self.skipped)}"
        return text + conversions_text(self.converted)


def find_source_items(src: str | os.PathLike) -> list[tuple[Path, str | bytes | None]]:
    """(image path, caption) pairs: the caption is a str from metadata.jsonl, the raw bytes of a
    sidecar .txt (decoded later, so a bad encoding skips one sample), or None when missing.
    Every other file of the folder is accounted for by `unused_files`."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    metadata = src / "metadata.jsonl"
    if metadata.exists():
        return list(_from_metadata(src, metadata))
    images = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl in {src}")
    return [(p, p.with_suffix(".txt").read_bytes() if p.with_suffix(".txt").exists() else None) for p in images]


def unused_files(src: str | os.PathLike, items: list[tuple[Path, str | bytes | None]]) -> list[tuple[str, str]]:
    """The folder's files that no sample reads, each with the reason: an unsupported type, or a
    caption with no image. (metadata.jsonl itself is read, not unused.)"""
    src = Path(src)
    used = {Path(path).resolve() for path, _ in items} | {src.resolve() / "metadata.jsonl"}
    used |= {Path(path).with_suffix(".txt").resolve() for path, _ in items}
    unused = []
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.resolve() in used or p.name.startswith("."):
            continue
        kind = p.suffix.lower().lstrip(".")
        reason = (
            "a caption with no image beside it"
            if kind == "txt"
            else f"unsupported file type .{kind or '(none)'} (images: {', '.join(IMAGE_EXTENSIONS)})"
        )
        unused.append((str(p.relative_to(src)), reason))
    return unused


def _from_metadata(src: Path, metadata: Path) -> Iterator[tuple[Path, str | None]]:
    root = src.resolve()
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{metadata}:{number}: not a JSON object ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{metadata}:{number}: not a JSON object (a {type(record).__name__})")
        name = record.get("file_name")
        if not name:
            raise ValueError(f"{metadata}:{number} has no file_name")
        path = (src / name).resolve()
        if root not in path.parents:
            raise ValueError(f"{metadata}:{number}: file_name {name!r} points outside {src}; refusing")
        yield path, record.get("text", record.get("caption"))


def hf_dataset_items(
    name: str, split: str = "train", image_column: str = "image", text_column: str = "text"
) -> list[tuple[str, bytes | None, str | None]]:
    """(name, image bytes, caption) from a `datasets` image dataset (a `save_to_disk` folder or a
    Hub name). Images are taken undecoded, so that a bad one skips one sample, not the run."""
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a Hugging Face dataset needs `pip install datasets`") from None
    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset(name, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"split {split!r} not in {name} (it has {list(dataset)})")
        dataset = dataset[split]
    for column in (image_column, text_column):
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} not in {name} (it has {dataset.column_names})")
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return [
        (f"{path.name or name}[{i}]", (row[image_column] or {}).get("bytes"), row[text_column])
        for i, row in enumerate(dataset)
    ]


@dataclass(frozen=True)
class BucketFit:
    """How source images are fitted to the aspect buckets.

    Attributes:
        resolution: the bucket base (buckets hold about `resolution`² pixels).
        max_aspect: an image more than this far off its nearest bucket's shape is skipped (the
            crop would lose most of the picture).
        min_side: an image whose short side is smaller is skipped (default: resolution / 4).
    """

    resolution: int = 512
    max_aspect: float = 2.0
    min_side: int | None = None

    @property
    def smallest_side(self) -> int:
        return self.min_side or max(1, self.resolution // 4)


def prepare_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    fit: BucketFit = BucketFit(),
    samples_per_shard: int = 100,
    overwrite: bool = False,
    hf_dataset: dict | None = None,
) -> PrepareReport:
    """Read `src`, fit every image to its nearest bucket (`fit`) and write shards into `out_dir`.

    `hf_dataset` (keyword arguments of `hf_dataset_items`, possibly empty) reads `src` as a
    Hugging Face dataset instead of a folder. Images too small or too far off every bucket's
    shape (`BucketFit`) are skipped, each with its reason.
    """
    report = PrepareReport()
    if hf_dataset is None:
        found = find_source_items(src)
        items = [(str(path), path, caption) for path, caption in found]
        for name, reason in unused_files(src, found):
            logger.warning("skipping %s: %s", name, reason)
            report.skipped.append((name, reason))
    else:
        items = hf_dataset_items(str(src), **hf_dataset)
    buckets = make_buckets(fit.resolution, max_aspect=fit.max_aspect)
    root = Path(src).resolve()

    def samples():
        for item in tqdm(items, desc="prepare", unit="img"):
            name = item[0]
            try:
                yield _prepare_one(item, buckets, fit, report, root)
            except SampleSkipped as skip:
                logger.warning("skipping %s: %s", name, skip)
                report.skipped.append((name, str(skip)))

    try:
        report.written = write_shards(samples(), out_dir, samples_per_shard, overwrite=overwrite)
    except NoSamples as err:
        reasons = Counter(re.sub(r"(?<![A-Za-z.])\d+(x\d+)?", "#", why.split(" (")[0]) for _, why in report.skipped)
        common = reasons.most_common(5)
        summary = "; ".join(f"{n} × {reason}" for reason, n in common) or "the source holds no item"
        if len(reasons) > len(common):
            summary += f"; and {sum(reasons.values()) - sum(n for _, n in common)} more for other reasons"
        raise NoUsableImages(f"no usable image in {src} ({summary}); {err}") from None
    return report


class NoUsableImages(ValueError):
    """Every item of the source was skipped; the message counts the reasons."""


def _prepare_one(item: tuple, buckets, fit: BucketFit, report: PrepareReport, root: Path) -> dict:
    """One source item (name, image: a path or bytes, caption) -> a sample fitted to its bucket,
    or SampleSkipped; what was converted on the way is counted in `report`."""
    name, image, caption = item
    if caption is None:
        raise SampleSkipped("no caption (no sidecar .txt and no metadata text)")
    caption, cleaned = clean_caption(decode_caption(caption))
    for what in cleaned:
        report.converted[what] += 1
    if image is None:
        raise SampleSkipped("no image data")
    if isinstance(image, Path):
        if not image.resolve().is_relative_to(root):
            raise SampleSkipped(f"a link leading outside the source folder (to {image.resolve()}); refusing")
        image = image.read_bytes()
    image = open_image(image)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise SampleSkipped(f"animated image ({frames} frames): only still images are used")
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
        report.converted["EXIF orientation applied"] += 1
    image, converted = to_rgb(image)
    if converted:
        report.converted[converted] += 1
    bucket = nearest_bucket(*image.size, buckets)
    check_size(image, bucket, fit.smallest_side, fit.max_aspect)
    return {"key": _key(name), "image": fit_to_bucket(image, bucket), "caption": caption, "meta": {"source": name}}


def _key(name: str) -> str:
    """A webdataset-safe, unique key: the name's safe characters plus a hash of the whole name."""
    stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", Path(name).stem)[:48].strip("_") or "image"
    return f"{stem}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
