"""Training configuration, presets and the helpers `train_nano_dit.py` is built from."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cfg_dropout import CFGDropout
from .encoders import STAND_IN_MARKER, EncoderSpec, make_stand_in_encoders
from .feature_cache import CachedBucket, EncodeReport, encode_dataset
from .shards import write_shards
from .synthetic import synthetic_samples
from .timings import phase

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Presets: the one table of model sizes and run lengths.
# --------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # The seed's validation run: 100 images at 512², Flux VAE latents, real encoders, one 24 GB GPU.
    "nano": {
        "model": {"num_layers": 12, "hidden_size": 384, "num_attention_heads": 6, "patch_size": 2},
        "train": {
            "total_steps": 5000,
            "batch_size": 8,
            "warmup_steps": 500,
            "resolution": 512,
            "shards": "data/shards/100",
            "cache": "data/cache/100",
            "output_dir": "runs/nano",
        },
    },
    # A machine with no GPU and no Hub: the synthetic set in pixel mode at 32², stand-in encoders,
    # a model small enough to memorise it in a couple of minutes on 2 CPU cores.
    "demo": {
        "model": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "patch_size": 4},
        "train": {
            "total_steps": 1500,
            "batch_size": 32,
            "peak_lr": 1e-3,
            "warmup_steps": 50,
            "resolution": 32,
            "shards": "data/shards/demo",
            "cache": "data/cache/demo",
            "stand_in_encoders": "data/encoders/tiny",
            "pixel_mode": True,
            "synth_if_missing": True,
            "checkpoint_every": 750,
            "validation_every": 750,
            "output_dir": "runs/demo",
        },
        # ST-LPIPS decides (its weights come with its wheel; LPIPS's AlexNet may not be at hand
        # offline). The numbers are set by the fault table (docs/validation.md, `scripts/validation_power.py`):
        # the good run passes, each broken run fails something.
        "thresholds": {"decide_on": "stlpips", "stlpips_success": 0.25, "stlpips_failure": 0.35},
    },
}

_ENCODERS = EncoderSpec()


@dataclass
class TrainConfig:
    """Everything a run needs; the command line mirrors it field for field."""

    preset: str = "demo"  # a key of PRESETS: model size and the defaults below
    output_dir: str = "runs/demo"  # run folder: checkpoints/, config.json
    # -- data: shards are encoded once into the feature cache; training reads only the cache
    shards: str = "data/shards/demo"  # WebDataset shard folder (bucket_<W>x<H>/shard-*.tar)
    cache: str = "data/cache/demo"  # feature-cache folder (latents, T5, DINOv3 in safetensors)
    synth_if_missing: bool = False  # write the synthetic set into --shards when it holds no shards
    num_images: int = 100  # images in that synthetic set
    resolution: int = 32  # side of the synthetic images (and the bucket base for new data)
    stand_in_encoders: str | None = None  # folder of stand-in encoders (made if missing); else the real ones
    text_encoder: str = _ENCODERS.text_encoder  # T5 Hub id or folder
    image_encoder: str = _ENCODERS.image_encoder  # DINOv3 Hub id or folder
    vae: str = _ENCODERS.vae  # Flux VAE Hub id or folder (subfolder "vae")
    pixel_mode: bool = False  # no VAE: the model works on pixels in [-1, 1]
    # -- run
    resume: str | None = None  # a checkpoint folder, or "latest" (the newest in the checkpoint folder)
    checkpoint_dir: str | None = None  # where checkpoints and the training log go (default: <output_dir>/checkpoints)
    checkpoint_every: int = 1000  # steps between accelerator.save_state checkpoints
    checkpoints_total_limit: int | None = None  # keep only the newest N checkpoints (default: all)
    overwrite_output_dir: bool = False  # start afresh in an output folder that holds a run
    # -- CFG dropout: four exclusive modes, exact counts over every 100 draws (CFGDropout)
    p_both: float = 0.7  # text and image kept
    p_none: float = 0.1  # both dropped
    p_text_only: float = 0.1  # image dropped
    p_image_only: float = 0.1  # text dropped
    # -- optimisation
    total_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # samples per micro-batch (per process); one bucket per batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    peak_lr: float = 3e-4  # AdamW learning rate after warmup
    min_lr: float = 1e-6  # floor of the cosine decay
    warmup_steps: int = 50  # linear warmup; the seed's 5k would leave no room for the decay
    weight_decay: float = 0.03  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.9999  # EMAModel max decay (with warmup)
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; unset: as `accelerate launch` says (flag or config)
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more time
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit (CUDA; pip install "nano-dit[gpu]")
    max_bad_steps: int = 10  # steps in a row with a non-finite loss or gradient that stop the run
    report_to: str = "none"  # experiment tracker: "tensorboard", "wandb" or "none"
    seed: int = 0  # seeds weights, data order, noise and CFG dropout
    cpu_threads: int | None = None  # torch threads per process on a CPU run (default: the cores / processes)
    compile: bool = False  # torch.compile the transformer through Accelerate (pays off on a GPU, after a warm-up)
    compile_backend: str = "inductor"  # dynamo backend for --compile ("eager": graph capture, no code generation)
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (fp32 weights, faster matmuls); no effect elsewhere
    cache_on_device: str = "auto"  # "yes": whole feature cache on the device; "no": host memory, a copy per batch; "auto": yes when it takes <= 1/4 of free memory
    log_every: int = 50  # steps between log records and progress-bar updates
    # -- validation: the seed's three tests on the EMA weights, then RESULTS.md (nano_dit.validation)
    validation: bool = True  # --no-validation skips the tests (and loading the encoders they need)
    validation_every: int = 1000  # steps between validations; the last step is always validated
    validation_steps: int = 50  # Euler steps per validation sample
    text_guidance_scale: float = 3.0  # dual CFG text scale for validation
    image_guidance_scale: float = 2.0  # dual CFG image scale for validation
    guidance_mode: str = "nested"  # "nested" (measured better on the demo) or "independent" (the seed's)
    lpips_backbone: str = "pretrained"  # LPIPS AlexNet: "pretrained" (cached / fetched once), "random" or "none"
    push_to_hub: bool = False  # upload checkpoint_final to the Hub at the end (token: HF_TOKEN or `hf auth login`)
    hub_model_id: str | None = None  # the Hub repo for --push-to-hub (default: the output folder's name)
    model: dict = field(default_factory=dict)  # NanoDiTTransformer2DModel config (preset + data widths)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in (
            "total_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "resolution",
            "num_images",
            "log_every",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.peak_lr <= 0 or not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need 0 <= --min-lr <= --peak-lr and --peak-lr > 0, got {self.min_lr}, {self.peak_lr}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"--warmup-steps must be in [0, --total-steps), got {self.warmup_steps}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ValueError(f"--report-to must be tensorboard, wandb or none, got {self.report_to!r}")
        if self.max_bad_steps <= 0:
            raise ValueError(f"--max-bad-steps must be > 0, got {self.max_bad_steps}")
        if self.checkpoint_every <= 0:
            raise ValueError(f"--checkpoint-every must be > 0, got {self.checkpoint_every}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit <= 0:
            raise ValueError(
                f"--checkpoints-total-limit must be > 0 (leave it unset to keep every checkpoint), "
                f"got {self.checkpoints_total_limit}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"--grad-clip must be a finite number > 0, got {self.grad_clip}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        try:
            self.cfg_dropout()
        except ValueError as err:
            raise ValueError(f"--p-both / --p-none / --p-text-only / --p-image-only: {err}") from None
        if self.validation_every <= 0 or self.validation_steps <= 0:
            raise ValueError(
                f"--validation-every and --validation-steps must be > 0, got {self.validation_every}, {self.validation_steps}"
            )
        if self.guidance_mode not in ("independent", "nested"):
            raise ValueError(f"--guidance-mode must be independent or nested, got {self.guidance_mode!r}")
        for name in ("text_guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.lpips_backbone not in ("pretrained", "random", "none"):
            raise ValueError(f"--lpips-backbone must be pretrained, random or none, got {self.lpips_backbone!r}")
        if self.mixed_precision not in (None, *MIXED_PRECISIONS):
            raise ValueError(f"--mixed-precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if self.cache_on_device not in ("auto", "yes", "no"):
            raise ValueError(f"--cache-on-device must be auto, yes or no, got {self.cache_on_device!r}")
        if self.cpu_threads is not None and self.cpu_threads <= 0:
            raise ValueError(f"--cpu-threads must be > 0, got {self.cpu_threads}")
        if self.push_to_hub:
            from huggingface_hub import get_token

            if get_token() is None:  # found before training, not after it
                raise ValueError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")

    @property
    def checkpoints(self) -> str:
        """The checkpoint folder: --checkpoint-dir, else <output_dir>/checkpoints."""
        return self.checkpoint_dir or str(Path(self.output_dir) / "checkpoints")

    @property
    def repo_id(self) -> str:
        return self.hub_model_id or Path(self.output_dir).resolve().name

    @classmethod
    def from_saved(cls, values: dict, model: dict | None = None) -> TrainConfig:
        """The config a checkpoint or a model card recorded; fields this version does not know are
        left out. `model`: the model config, where it was recorded apart."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in values.items() if k in known}
        if model is not None:
            fields["model"] = model
        return cls(**fields)

    def cfg_dropout(self, rank: int = 0) -> CFGDropout:
        """This run's CFG-dropout sampler (one stream per process)."""
        return CFGDropout(self.p_both, self.p_none, self.p_text_only, self.p_image_only, seed=self.seed + rank)

    def sampling(self):
        """How validation samples."""
        from .validation import SamplingConfig

        return SamplingConfig(
            num_inference_steps=self.validation_steps,
            text_guidance_scale=self.text_guidance_scale,
            image_guidance_scale=self.image_guidance_scale,
            guidance_mode=self.guidance_mode,
            seed=self.seed,
            mixed_precision=self.mixed_precision,
            compile=self.compile,
            compile_backend=self.compile_backend,
        )

    def thresholds(self):
        """The verdict's numbers: the seed's, with the preset's own where it has them."""
        from .report import Thresholds

        return Thresholds(**PRESETS[self.preset].get("thresholds", {}))

    def encoder_spec(self) -> EncoderSpec:
        if self.stand_in_encoders:
            return EncoderSpec.stand_in(self.stand_in_encoders, pixel_mode=self.pixel_mode)
        vae = None if self.pixel_mode else self.vae
        return EncoderSpec(text_encoder=self.text_encoder, image_encoder=self.image_encoder, vae=vae)


MIXED_PRECISIONS = ("no", "fp16", "bf16")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig: preset defaults first, explicit flags on top."""
    parser = argparse.ArgumentParser(description="Train Nano DiT with rectified flow (run with `accelerate launch`).")
    comments = _field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{comments.get(f.name, '')} (default: the preset's, else {f.default})".replace("%", "%%")
        kind = next((t for t in (bool, int, float) if f.type.startswith(t.__name__)), str)  # "int | None" -> int
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument("--config", default=None, help="YAML file of these settings (field names); flags win")
    args = parser.parse_args(argv)
    from_file = _read_config_file(args.config, parser) if args.config else {}
    preset = args.preset or from_file.get("preset") or TrainConfig.preset
    if preset not in PRESETS:
        parser.error(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    values = {**PRESETS[preset]["train"], **from_file, **flags}
    config = TrainConfig(**values, model=dict(PRESETS[preset]["model"]))
    try:
        config.validate()
    except ValueError as err:
        parser.error(str(err))  # usage + the message naming the flag, exit status 2, before any work
    return config


def _field_comments(cls) -> dict[str, str]:
    """Each field's trailing comment in the class source: the one place a setting is explained,
    shown by --help too."""
    pattern = re.compile(r"^\s+(\w+): [^#]*#\s*(.+)$")
    return {m.group(1): m.group(2) for m in map(pattern.match, inspect.getsource(cls).splitlines()) if m}


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Settings from YAML: keys are TrainConfig fields (dashes or underscores); unknown keys are refused."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: {err}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown settings {unknown}")
    return values


# --------------------------------------------------------------------------------------------
# Data: the feature cache, made when missing, read into (device) tensors
# --------------------------------------------------------------------------------------------
def prepare_feature_cache(config: TrainConfig) -> EncodeReport:
    """Make sure `config.cache` holds every sample of `config.shards`.

    Writes the synthetic set and the stand-in encoders first when the config asks for them and
    they are missing. Encoders are loaded only if something is not cached yet.
    """
    shards = Path(config.shards)
    if config.synth_if_missing and not any(shards.glob("bucket_*/shard-*.tar")):
        with phase("data: synthetic set"):
            samples = synthetic_samples(config.num_images, config.resolution, config.seed)
            write_shards(samples, shards, samples_per_shard=max(1, config.num_images // 5), overwrite=True)
        logger.info("wrote %d synthetic images to %s", config.num_images, shards)
    if config.stand_in_encoders and not (Path(config.stand_in_encoders) / STAND_IN_MARKER).exists():
        with phase("data: stand-in encoders"):
            make_stand_in_encoders(config.stand_in_encoders, seed=config.seed)
    return encode_dataset(shards, config.cache, config.encoder_spec())


def model_config_for(config: TrainConfig, buckets: list[CachedBucket]) -> dict:
    """The preset's model config with the widths the data dictates (one place per fact)."""
    first = buckets[0]
    return {
        **config.model,
        "in_channels": first.latents.shape[1],
        "sample_size": max(first.latents.shape[-2:]),
        "text_embed_dim": first.text_embeds.shape[-1],
        "image_embed_dim": first.image_embeds.shape[-1],
    }


def conditioning(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A cached batch's conditioning, as the model's keyword arguments."""
    return {
        "encoder_hidden_states": batch["text_embeds"],
        "encoder_attention_mask": batch["text_mask"],
        "image_embeds": batch["image_embeds"],
    }


class CachedBatches:
    """Endless random batches from the cached buckets; a batch never mixes buckets. Buckets are
    chosen in proportion to their size. Seeded per process.

    `on_device`: True keeps the whole cache on `device` and indexes it there (no DataLoader, no
    copy per step: the fast path, and the natural one for the seed's 100 images, tens of MB);
    False keeps it in host memory and copies each batch without blocking (gathered into pinned
    memory on CUDA); None (default) chooses the device when the cache takes at most a quarter of
    the free device memory. Both give the same batches for a seed.
    """

    FIELDS = ("latents", "text_embeds", "text_mask", "image_embeds", "image_tokens")

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
            index = index.to(self.device)
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


def _gathered(t: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `index` of host tensor `t` on `device`: on CUDA gathered straight into fresh pinned
    memory and copied without blocking, so the copy overlaps the previous step's work."""
    if device.type != "cuda":
        return t[index].to(device)
    out = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, index, out=out).to(device, non_blocking=True)


class JsonlLog:
    """Appends one JSON object per line, flushed at once so that a killed run keeps its log.

    `resume_step` keeps the records of steps up to it and drops later ones (they will be
    trained again), so that a resumed run's log holds every step exactly once. Only the main
    process writes; on the others every call is a no-op.
    """

    def __init__(self, path: str, enabled: bool = True, resume_step: int | None = None):
        self._file = None
        if not enabled:
            return
        kept = []
        if resume_step is not None and Path(path).exists():
            kept = [line for line in Path(path).read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        self._file = open(path, "w")  # noqa: SIM115 (closed in close())
        self._file.writelines(line + "\n" for line in kept)
        self._file.flush()

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
