"""The data phase of a run: the feature cache made when missing, then read into batches.

    synthetic set (--synth-if-missing) -> shards -> stand-in encoders (when asked) -> feature cache
    feature cache -> CachedBatches: endless seeded batches, one bucket per batch, on the device

Training reads only the cache: no image is decoded and no encoder runs once the cache is complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import TrainConfig
from .encoders import STAND_IN_MARKER, make_stand_in_encoders
from .feature_cache import CachedBucket, EncodeReport, encode_dataset
from .locks import build_once
from .pipelines.pipeline_nano_dit import transformer_inputs
from .shards import write_shards
from .synthetic import synthetic_samples
from .timings import PhaseTimer

logger = logging.getLogger(__name__)


def prepare_data(config: TrainConfig, timer: PhaseTimer | None = None) -> EncodeReport:
    """Make sure `config.cache` holds every sample of `config.shards`.

    Writes the synthetic set and the stand-in encoders first when the config asks for them and
    they are missing. Encoders are loaded only if something is not cached yet. Each part is timed
    as a "data: ..." phase of `timer`. Each part is built under a lock (`build_once`): of runs started
    together on the same folders, one builds it and the others read what it wrote (the report's
    `notes` say so).
    """
    timer = timer or PhaseTimer()
    shards, notes = Path(config.shards), []

    def synthetic_set():
        with timer.phase("data: synthetic set"):
            samples = synthetic_samples(config.num_images, config.resolution, config.seed)
            write_shards(samples, shards, samples_per_shard=max(1, config.num_images // 5), overwrite=True)
        logger.info("wrote %d synthetic images to %s", config.num_images, shards)

    def stand_in_encoders():
        with timer.phase("data: stand-in encoders"):
            make_stand_in_encoders(config.stand_in_encoders, seed=config.seed)

    if config.synth_if_missing:  # runs started together: one draws it, the others read it
        notes.append(
            build_once(shards, "the synthetic set", lambda: any(shards.glob("bucket_*/shard-*.tar")), synthetic_set)
        )
    if config.stand_in_encoders:
        marker = Path(config.stand_in_encoders) / STAND_IN_MARKER
        notes.append(build_once(marker.parent, "the stand-in encoders", marker.exists, stand_in_encoders))
    report = encode_dataset(shards, config.cache, config.encoder_spec(), timer=timer)
    report.notes[:0] = [note for note in notes if note]
    return report


def model_config_for(config: TrainConfig, buckets: list[CachedBucket]) -> dict:
    """The preset's model config with the widths the data dictates (one place per fact)."""
    first = buckets[0]
    return {
        **config.model,
        "in_channels": first.latents.shape[1],
        "sample_size": max(first.latents.shape[-2:]),
        "text_embed_dim": first.prompt_embeds.shape[-1],
        "image_embed_dim": first.image_embeds.shape[-1],
    }


def conditioning(batch: dict[str, torch.Tensor], image_tokens: bool = False) -> dict[str, torch.Tensor | None]:
    """A cached batch's conditioning, as the model's keyword arguments (`transformer_inputs`);
    `image_tokens`: with the DINOv3 patch tokens, for a model built with `use_image_tokens`."""
    tokens = batch["image_tokens"] if image_tokens else None
    return transformer_inputs(batch["prompt_embeds"], batch["prompt_attention_mask"], batch["image_embeds"], tokens)


class CachedBatches:
    """Endless random batches from the cached buckets; a batch never mixes buckets. Buckets are
    chosen in proportion to their size. Seeded per process.

    `on_device`: True keeps the whole cache on `device` and indexes it there (no DataLoader, no
    copy per step: the fast path, and the natural one for the validation plan's 100 images, tens of MB);
    False keeps it in host memory and copies each batch without blocking (gathered into pinned
    memory on CUDA); None (default) chooses the device when the cache takes at most a quarter of
    the free device memory. Both give the same batches for a seed.
    """

    FIELDS = ("latents", "prompt_embeds", "prompt_attention_mask", "image_embeds", "image_tokens")

    def __init__(self, buckets: list[CachedBucket], batch_size: int, device, seed: int = 0, on_device=None):
        total = sum(len(b) for b in buckets)
        if batch_size > total:
            raise ValueError(f"--batch-size {batch_size} is larger than the data ({total} cached samples)")
        self.batch_size = batch_size
        self.device = torch.device(device)
        nbytes = sum(getattr(b, name).nbytes for b in buckets for name in self.FIELDS)
        self.on_device = cache_fits_on_device(nbytes, self.device) if on_device is None else bool(on_device)
        home = self.device if self.on_device else torch.device("cpu")
        self.tensors = [{name: getattr(b, name).to(home) for name in self.FIELDS} for b in buckets]
        self.sizes = torch.tensor([len(b) for b in buckets], dtype=torch.float)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        bucket = int(torch.multinomial(self.sizes, 1, generator=self.generator))
        n = int(self.sizes[bucket])
        if n >= self.batch_size:
            index = torch.randperm(n, generator=self.generator)[: self.batch_size]
        else:  # a small bucket: draw with replacement rather than a smaller batch
            index = torch.randint(n, (self.batch_size,), generator=self.generator)
        tensors = self.tensors[bucket]
        if self.on_device:
            index = to_device(index, self.device)
            return {name: t[index] for name, t in tensors.items()}
        return {name: _gathered(t, index, self.device) for name, t in tensors.items()}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def cache_fits_on_device(nbytes: int, device: torch.device, share: float = 0.25) -> bool:
    """Whether a cache of `nbytes` belongs on `device`: always on the CPU (it is host memory);
    on CUDA when it takes at most `share` of the free memory (the rest is the model's)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (batch indices, CFG-dropout masks) on `device` without a host sync: on
    CUDA a plain `.to(device)` from pageable memory waits for the device's queue to drain, every
    step; from pinned memory and `non_blocking`, the copy is queued behind the work before it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _gathered(t: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `index` of host tensor `t` on `device`: on CUDA gathered straight into fresh pinned
    memory and copied without blocking, so the copy overlaps the previous step's work."""
    if device.type != "cuda":
        return t[index].to(device)
    out = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, index, out=out).to(device, non_blocking=True)
