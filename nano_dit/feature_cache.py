"""Encoder outputs computed once and cached in safetensors.

    <cache>/manifest.json                               samples (key, bucket, hashes) + encoder spec
    <cache>/latents/<fingerprint>/bucket_WxH.safetensors  VAE latents (or pixels), by image hash
    <cache>/text/<fingerprint>.safetensors                 T5 tokens (valid ones only), by caption hash
    <cache>/image/<fingerprint>/bucket_WxH.safetensors     DINOv3 global + patch tokens, by image hash

Each kind lives under the fingerprint of the one encoder it depends on (`EncoderSpec.fingerprint`),
and each entry is keyed by what it was computed from (the image's pixels at its bucket size, or the
caption), so a change of VAE recomputes latents only, a new caption recomputes that caption only,
and a run whose inputs are all cached loads no encoder at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .encoders import ConditioningEncoders, EncoderSpec, describe
from .folders import write_aside
from .locks import BuildLock
from .shards import ShardReader, bucket_name
from .timings import PhaseTimer

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# The cache's one dtype for features (latents, T5 tokens, DINOv3 global and patch tokens): fp32,
# whatever the encoders computed in. bf16 encoders (on a GPU) lose nothing in the widening, the
# files are the same whichever machine wrote them, and the training step does its flow-matching
# math in fp32 anyway; halving the memory with bf16 would save about 100 MB on the validation plan's 100
# images. Caches written in bf16 (earlier versions, on a GPU) are widened as they are read. The
# model casts its inputs to what the step computes in (its weights' dtype, then autocast's).
CACHE_DTYPE = torch.float32


def as_cached(t: torch.Tensor) -> torch.Tensor:
    """A feature in the cache's dtype (floating tensors only: masks stay integers)."""
    return t.to(CACHE_DTYPE) if t.is_floating_point() else t


def image_hash(image) -> str:
    """Content hash of an RGB image's pixels and size (so the resolution is part of the key)."""
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()[:32]


def text_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def _dir_name(fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


class TensorStore:
    """One safetensors file of named tensors, read whole and rewritten atomically."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        self.tensors: dict[str, torch.Tensor] = _load(path) if path.exists() else {}
        self.dirty = False

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = as_cached(tensor.detach().to("cpu")).contiguous()
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(self.tensors, tmp, metadata={"fingerprint": self.fingerprint})
        os.replace(tmp, self.path)  # a crash mid-write leaves the previous file whole
        self.dirty = False


@dataclass
class EncodeReport:
    samples: int
    encoded: dict[str, int]  # kind -> entries computed now
    reused: dict[str, int]  # kind -> entries found in the cache
    skipped: list[tuple[str, str]]  # (sample, reason) from the shard reader
    stand_in: bool
    max_sequence_length: int  # the T5 window (EncoderSpec's)
    truncated: int = 0  # captions encoded now that were longer than the text window, cut to it
    notes: list[str] = field(default_factory=list)  # what another run built while this one waited

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {self.encoded[k]} encoded / {self.reused[k]} cached" for k in self.encoded)
        note = " (STAND-IN encoders)" if self.stand_in else ""
        cut = (
            f"; {self.truncated} captions cut to the {self.max_sequence_length}-token window" if self.truncated else ""
        )
        waited = "".join(f"\n{n}" for n in self.notes)
        return f"{self.samples} samples, {len(self.skipped)} skipped; {kinds}{cut}{note}{waited}"


def encode_dataset(
    shard_root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    spec: EncoderSpec,
    batch_size: int | None = None,
    device: str | None = None,
    timer: PhaseTimer | None = None,
) -> EncodeReport:
    """Fill the cache for every sample of the shards; encoders load only if something is missing.

    `batch_size`: images (or captions) per encoder call; default 64 on a GPU, where a large batch
    keeps it busy, and 16 on a CPU. Reading, loading the encoders and encoding are timed as
    "data: ..." phases of `timer`."""
    cache_dir, timer = Path(cache_dir), timer or PhaseTimer()
    reader = ShardReader(shard_root)
    with timer.phase("data: reading shards"):
        samples = list(tqdm(reader, desc="read shards", unit="img"))
        if not samples:
            raise ValueError(f"no usable samples in {shard_root}: {reader.stats.summary()}")
        for s in samples:
            s["image_hash"], s["text_hash"] = image_hash(s["image"]), text_hash(s["caption"])
        buckets = {s["bucket"] for s in samples}
        todo = _missing(samples, _open_stores(cache_dir, spec, buckets))
    truncated, notes = 0, []  # captions encoded now that the text window cuts; another run's work
    if any(todo.values()):  # one run encodes; the others, started with it, wait and read what it wrote
        with BuildLock(cache_dir, "the feature cache") as lock:
            stores = _open_stores(cache_dir, spec, buckets)  # as it is now, with what it waited for
            todo = _missing(samples, stores)
            if any(todo.values()):
                truncated = _encode(todo, stores, spec, batch_size, device, timer)
            elif lock.waited_for is not None:
                notes.append(lock.note)
    _write_manifest(cache_dir, spec, samples)
    reused = {kind: len(samples) - len(pending) for kind, pending in todo.items()}
    reused["text"] = len({s["text_hash"] for s in samples}) - len(todo["text"])
    return EncodeReport(
        truncated=truncated,
        max_sequence_length=spec.max_sequence_length,
        samples=len(samples),
        encoded={kind: len(pending) for kind, pending in todo.items()},
        reused=reused,
        skipped=reader.stats.skipped,
        stand_in=spec.uses_stand_ins,
        notes=notes,
    )


def _missing(samples: list[dict], stores: dict) -> dict[str, list[dict]]:
    """The samples each kind of entry is missing for (each caption once)."""
    todo = {
        "latents": [s for s in samples if s["image_hash"] not in stores["latents"][s["bucket"]]],
        "text": [s for s in samples if s["text_hash"] not in stores["text"]],
        "image": [s for s in samples if f"{s['image_hash']}.global" not in stores["image"][s["bucket"]]],
    }
    todo["text"] = list({s["text_hash"]: s for s in todo["text"]}.values())
    return todo


def _encode(todo: dict, stores: dict, spec: EncoderSpec, batch_size, device, timer: PhaseTimer) -> int:
    """Encode what `todo` lists into `stores` and save them; returns the captions the text window cut."""
    with timer.phase("data: loading encoders"):
        encoders = ConditioningEncoders(spec, device)
    batch_size = batch_size or (64 if encoders.device.type == "cuda" else 16)
    truncated = 0
    with timer.phase("data: encoding"):
        if todo["text"]:
            truncated = encoders.count_truncated([s["caption"] for s in todo["text"]])
        if truncated:
            logger.warning(
                "%d captions are longer than the text encoder's %d-token window: cut to it",
                truncated,
                spec.max_sequence_length,
            )
        for kind, pending in todo.items():
            for batch in _batches(pending, batch_size, desc=f"encode {kind}"):
                _encode_batch(kind, batch, encoders, stores)
        for store in _all(stores):
            store.save()
    return truncated


def _open_stores(cache_dir: Path, spec: EncoderSpec, buckets) -> dict:
    def per_bucket(kind):
        fp = spec.fingerprint(kind)
        folder = cache_dir / kind / _dir_name(fp)
        return {b: TensorStore(folder / f"{bucket_name(b)}.safetensors", fp) for b in buckets}

    text_fp = spec.fingerprint("text")
    return {
        "latents": per_bucket("latents"),
        "text": TensorStore(cache_dir / "text" / f"{_dir_name(text_fp)}.safetensors", text_fp),
        "image": per_bucket("image"),
    }


def _all(stores: dict) -> list[TensorStore]:
    return [s for v in stores.values() for s in (v.values() if isinstance(v, dict) else [v])]


def _batches(items: list[dict], batch_size: int, desc: str):
    """Batches of one bucket each (the VAE needs equal sizes), with a progress bar."""
    by_bucket = defaultdict(list)
    for item in items:
        by_bucket[item["bucket"]].append(item)
    with tqdm(total=len(items), desc=desc, unit="img", disable=not items) as bar:
        for group in by_bucket.values():
            for i in range(0, len(group), batch_size):
                yield group[i : i + batch_size]
                bar.update(len(group[i : i + batch_size]))


def _encode_batch(kind: str, batch: list[dict], encoders: ConditioningEncoders, stores: dict) -> None:
    if kind == "latents":
        latents = encoders.encode_latents([s["image"] for s in batch])
        for s, z in zip(batch, latents):
            stores["latents"][s["bucket"]].put(s["image_hash"], z)
    elif kind == "text":
        embeds, mask = encoders.encode_text([s["caption"] for s in batch])
        for s, e, m in zip(batch, embeds, mask):
            stores["text"].put(s["text_hash"], e[: int(m.sum())])  # valid tokens only; padded at load
    else:
        global_embeds, tokens = encoders.encode_images([s["image"] for s in batch])
        for s, g, t in zip(batch, global_embeds, tokens):
            store = stores["image"][s["bucket"]]
            store.put(f"{s['image_hash']}.global", g)
            store.put(f"{s['image_hash']}.tokens", t)


def _write_manifest(cache_dir: Path, spec: EncoderSpec, samples: list[dict]) -> None:
    manifest = {
        "encoders": describe(spec),
        "fingerprints": {kind: spec.fingerprint(kind) for kind in ("latents", "text", "image")},
        "dtype": str(CACHE_DTYPE).removeprefix("torch."),
        "samples": [
            {
                "key": s["key"],
                "bucket": list(s["bucket"]),
                "caption": s["caption"],
                "image_hash": s["image_hash"],
                "text_hash": s["text_hash"],
                "meta": s["meta"],
            }
            for s in samples
        ],
    }
    write_aside(cache_dir / MANIFEST, json.dumps(manifest, indent=1))  # (runs started together each write it)


# --------------------------------------------------------------------------------------------
# Reading the cache (training and validation)
# --------------------------------------------------------------------------------------------
@dataclass
class CachedBucket:
    """Every cached sample of one bucket, stacked (N first); text padded to the longest caption."""

    bucket: tuple[int, int]
    keys: list[str]
    captions: list[str]
    meta: list[dict | None]
    latents: torch.Tensor  # (N, C, h, w)
    prompt_embeds: torch.Tensor  # (N, L, D)
    prompt_attention_mask: torch.Tensor  # (N, L) 1 = token, 0 = padding
    image_embeds: torch.Tensor  # (N, Di) DINOv3 global
    image_tokens: torch.Tensor  # (N, M, Di) DINOv3 patch tokens

    def __len__(self) -> int:
        return len(self.keys)


def load_cache(
    cache_dir: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[dict, list[CachedBucket]]:
    """The manifest and one `CachedBucket` per bucket; no encoder is loaded. `device`: where the
    tensors go, read straight there from the files (default: host memory)."""
    manifest = read_manifest(cache_dir)
    cache_dir, fps, device = Path(cache_dir), manifest["fingerprints"], torch.device(device or "cpu")
    text = _load(cache_dir / "text" / f"{_dir_name(fps['text'])}.safetensors", device)
    by_bucket = defaultdict(list)
    for s in manifest["samples"]:
        by_bucket[tuple(s["bucket"])].append(s)
    buckets = []
    for bucket, samples in sorted(by_bucket.items()):
        name = f"{bucket_name(bucket)}.safetensors"
        latents = _load(cache_dir / "latents" / _dir_name(fps["latents"]) / name, device)
        image = _load(cache_dir / "image" / _dir_name(fps["image"]) / name, device)
        missing = [
            s["key"]
            for s in samples
            if s["image_hash"] not in latents or f"{s['image_hash']}.global" not in image or s["text_hash"] not in text
        ]
        if missing:
            raise ValueError(
                f"feature cache {cache_dir} lacks entries for {len(missing)} samples (first: {missing[0]}); "
                "run `nano-dit data encode` again"
            )
        embeds = [text[s["text_hash"]] for s in samples]
        L = max(e.shape[0] for e in embeds)
        buckets.append(
            CachedBucket(
                bucket=bucket,
                keys=[s["key"] for s in samples],
                captions=[s["caption"] for s in samples],
                meta=[s["meta"] for s in samples],
                latents=torch.stack([latents[s["image_hash"]] for s in samples]),
                prompt_embeds=torch.stack([torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[0])) for e in embeds]),
                prompt_attention_mask=torch.stack(
                    [(torch.arange(L, device=device) < e.shape[0]).long() for e in embeds]
                ),
                image_embeds=torch.stack([image[f"{s['image_hash']}.global"] for s in samples]),
                image_tokens=torch.stack([image[f"{s['image_hash']}.tokens"] for s in samples]),
            )
        )
    return manifest, buckets


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no feature cache at {cache_dir} (run `nano-dit data encode` first)")
    return json.loads(path.read_text())


def cache_nbytes(cache_dir: str | os.PathLike) -> int:
    """Bytes the cache's current features take on disk (about what they take in memory): for
    deciding where to load them before loading them."""
    cache_dir, fps = Path(cache_dir), read_manifest(cache_dir)["fingerprints"]
    files = [cache_dir / "text" / f"{_dir_name(fps['text'])}.safetensors"]
    for kind in ("latents", "image"):
        files += (cache_dir / kind / _dir_name(fps[kind])).glob("*.safetensors")
    return sum(f.stat().st_size for f in files if f.exists())


def _load(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A cache file's tensors in the cache's dtype, on `device`."""
    if not path.exists():
        raise FileNotFoundError(f"feature cache file {path} is missing; run `nano-dit data encode` again")
    device = torch.device(device)  # safetensors names the host "cpu" only (a DDP rank on CPU has "cpu:0")
    where = "cpu" if device.type == "cpu" else str(device)
    return {name: as_cached(t) for name, t in load_file(path, device=where).items()}
