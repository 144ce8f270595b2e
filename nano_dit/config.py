"""Every setting of a run, declared once: `TrainConfig` (with the validation sampling settings
nested in it as `SamplingConfig`), the `PRESETS` table, the verdict's `Thresholds`, and the
command-line parsing that mirrors them.

Each field's help text lives in its metadata (`setting(...)`); `--help`, `check()` and the YAML
reader all read it from there. This module sits at the bottom of the package: it imports the
small modules that define a setting's allowed values and nothing that trains, samples or reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cfg_dropout import CFGDropout
from .encoders import EncoderSpec
from .flow_matching import WEIGHTING_SCHEMES, FlowMatching
from .pipelines.pipeline_nano_dit import (
    DEFAULT_GUIDANCE_MODE,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    GUIDANCE_MODES,
    MAX_SEQUENCE_LENGTH,
)

MIXED_PRECISIONS = ("no", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LPIPS_BACKBONES = ("pretrained", "random", "none")
# transformers' cosine-with-floor (the plan's), then diffusers' get_scheduler's own
LR_SCHEDULERS = (
    "cosine_with_min_lr",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
REPORT_TO = ("none", "tensorboard", "wandb", "all")


def setting(default=dataclasses.MISSING, help: str = "", *, choices=None, flag: bool = True, factory=None, alias=None):
    """A dataclass field with its help text (and allowed values) in its metadata: the one place a
    setting is explained. `flag=False`: settable in code and YAML only. `alias`: the name diffusers'
    training examples give the same setting, accepted as a flag and a YAML key too."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "alias": alias}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Validation sampling
# --------------------------------------------------------------------------------------------
@dataclass
class SamplingConfig:
    """How validation samples: the validation plan's Euler steps and dual-CFG scales. The defaults
    are the pipeline's own."""

    num_inference_steps: int = setting(DEFAULT_NUM_INFERENCE_STEPS, "Euler steps per validation sample")
    guidance_scale: float = setting(DEFAULT_GUIDANCE_SCALE, "dual-CFG text scale s_t for validation")
    image_guidance_scale: float = setting(DEFAULT_IMAGE_GUIDANCE_SCALE, "dual-CFG image scale s_i for validation")
    guidance_mode: str = setting(
        DEFAULT_GUIDANCE_MODE,
        "dual-CFG formula: nested (measured better on the demo) or independent (the validation plan's)",
        choices=GUIDANCE_MODES,
    )
    validation_batch_size: int = setting(
        50, "images per validation pipeline call (times the CFG branches); N processes share the calls"
    )
    decode_batch_size: int | None = setting(
        None, "latents per VAE decode; unset: 32 on a GPU, 8 elsewhere (a 512² decode is memory-hungry)", flag=False
    )
    num_pairs: int = setting(5, "DINO-swap pairs", flag=False)
    num_edits: int = setting(5, "text-manipulation edits", flag=False)

    def check(self) -> None:
        for name in ("num_inference_steps", "validation_batch_size", "decode_batch_size", "num_pairs", "num_edits"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        _check_choices(self)


# --------------------------------------------------------------------------------------------
# The verdict's numbers
# --------------------------------------------------------------------------------------------
@dataclass
class Thresholds:
    """The numbers the verdict uses, each with what it means and where it comes from. The defaults
    are the validation plan's (mean LPIPS < 0.2 memorised, > 0.3 failed); the demo preset sets its
    own from the ground truth alone (`scripts/calibrate_thresholds.py`, docs/validation.md), never
    from the run it judges."""

    # Which mean reconstruction distance decides: "lpips" (the plan's, where AlexNet's weights were
    # at hand; ST-LPIPS otherwise) or "stlpips" (always computable offline).
    decide_on: str = "lpips"
    lpips_success: float = 0.2  # mean reconstruction LPIPS below: memorised
    lpips_failure: float = 0.3  # above: failed
    # ST-LPIPS is trained on the same human judgments (BAPPS) as LPIPS, on the same scale: the
    # plan's numbers carry over until a run calibrates its own.
    stlpips_success: float = 0.2
    stlpips_failure: float = 0.3
    # Where set, "memorised" is judged image by image: an image is memorised when its distance is
    # at most the success line *and* its PSNR at least `min_psnr` (dB), and the reconstruction
    # passes when at least `memorised_share` of the images are. None: the plan's mean alone.
    min_psnr: float | None = None
    memorised_share: float | None = None
    psnr_success: float = 25.0  # dB; decides for validations recorded with no perceptual metric
    psnr_failure: float = 20.0
    loss_drop: float = 0.5  # the smoothed loss must end at most this fraction of where it started
    loss_plateau: float = 0.9  # ending above this fraction is a plateau (or a rise)
    grad_low: float = 0.1  # the plan's healthy gradient-norm range
    grad_high: float = 10.0
    grad_in_range_share: float = 0.9  # share of steps after warmup that must lie in the range
    grad_explode: float = 100.0
    grad_vanish: float = 0.01
    min_sensitivity: float = 0.01  # LPIPS between outputs below: identical regardless of that condition
    # On a set with ground-truth layouts, a DINO swap counts when the output went at least half-way
    # from A's scene to B's and from B's bare scene to A's shapes (`nano_dit.ground_truth`), an edit
    # when it went half-way from the original picture to the edited one; the test passes when this
    # share of its pairs / edits count (4 of 5: one miss is noise, two are a pattern).
    swap_share: float = 0.8
    followed_share: float = 0.8
    min_std_ratio: float = 0.5  # output spread / data spread below: mean-gray or collapsed
    # Model probes: relative change of the prediction below which a condition or σ makes no difference.
    min_prediction_change: float = 0.01
    # Each CFG mode learned: its x0 prediction's distance to the mode's ideal, over the distance a
    # mode never learned would be (0: ideal, 1: no better than never learned). At most `mode_error`
    # the mode is learned (more than half-way); above `mode_error_failure` it is no better than a
    # mode never learned; between, learned only in part (a warning). And the text-only / image-only
    # samples showing what they were given in `mode_sample_share` of the samples.
    mode_error: float = 0.5
    mode_error_failure: float = 1.0
    mode_sample_share: float = 0.8


# --------------------------------------------------------------------------------------------
# Presets: the one table of model sizes and run lengths
# --------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # The validation plan's run: 100 images at 512², Flux VAE latents, real encoders, one 24 GB GPU.
    # Its "train" values are where it differs from TrainConfig's defaults, which are the demo's.
    "nano": {
        "model": {"num_layers": 12, "hidden_size": 384, "num_attention_heads": 6, "patch_size": 2},
        "train": {
            "total_steps": 5000,
            "batch_size": 8,
            "peak_lr": 3e-4,
            "warmup_steps": 500,
            "resolution": 512,
            "shards": "data/shards/100",
            "cache": "data/cache/100",
            "stand_in_encoders": None,
            "pixel_mode": False,
            "synth_if_missing": False,
            "validation_every": 1000,
            "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE,
            "output_dir": "runs/nano",
        },
    },
    # A machine with no GPU and no Hub: the synthetic set in pixel mode at 32², stand-in encoders,
    # a model that memorises it within the README's 10 minutes on 2 CPU cores. Its training
    # settings are TrainConfig's defaults (the README's first command names no other), each
    # measured (the experiment table in docs/validation.md): the peak LR (2e-3 against 1e-3: 29.7
    # against 23.8 dB in the same steps), one validation at the end (each costs ~40 s of training),
    # and guidance 2 / 1.5, under which the memorised model's samples stay crisp (3 / 2 overshoots).
    "demo": {
        "model": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "patch_size": 4},
        "train": {},
        # ST-LPIPS decides (its weights come with its wheel; LPIPS's AlexNet may not be at hand
        # offline), with PSNR beside it, image by image. The lines come from the ground truth alone
        # (`scripts/calibrate_thresholds.py`, docs/validation.md): memorised is no farther than a copy
        # a person can't tell from the original (ST-LPIPS 0.10, 28 dB, which a shape of another kind
        # or colour does not reach); failed is as far as the shapes blurred into blobs (0.16).
        "thresholds": {
            "decide_on": "stlpips",
            "stlpips_success": 0.10,
            "stlpips_failure": 0.16,
            "min_psnr": 28.0,
            "memorised_share": 0.95,
        },
    },
}


def _run_sampling() -> SamplingConfig:
    """TrainConfig's sampling: the pipeline's, at the demo's guidance 2 / 1.5, under which the
    memorised model's samples stay crisp (the pipeline's own 3 / 2, which the nano preset keeps,
    overshoots)."""
    return replace(SamplingConfig(), guidance_scale=2.0, image_guidance_scale=1.5)


_ENCODERS = EncoderSpec()
_OBJECTIVE = FlowMatching()


@dataclass
class ModelDesign:
    """The model-config keys a design comparison varies, as flags and `--config` YAML keys; unset,
    the preset's (and where the preset is silent, NanoDiTTransformer2DModel's own). They land in
    `TrainConfig.model`, with the widths the data dictates."""

    num_layers: int | None = setting(None, "transformer blocks")
    hidden_size: int | None = setting(None, "model width")
    num_attention_heads: int | None = setting(None, "attention heads (they divide the width)")
    patch_size: int | None = setting(None, "patch side, in latent pixels")
    mlp_ratio: float | None = setting(None, "MLP width over the model width")
    use_image_tokens: bool | None = setting(
        None, "DINOv3 patch tokens in the cross-attention beside the text, as well as the global embedding in adaLN"
    )


def design_of(model: dict) -> dict:
    """The `ModelDesign` keys of a model config, each as it takes effect (the model's defaults
    filled in)."""
    import inspect

    from .transformer_nano_dit import NanoDiTTransformer2DModel

    defaults = inspect.signature(NanoDiTTransformer2DModel.__init__).parameters
    return {f.name: model.get(f.name, defaults[f.name].default) for f in dataclasses.fields(ModelDesign)}


def check_design(model: dict) -> None:
    """Refuse a model config no model can be built with, naming the flag."""
    design = design_of(model)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "patch_size", "mlp_ratio"):
        if not design[name] > 0:
            raise ValueError(f"{_flag(name)} must be > 0, got {design[name]}")
    if design["hidden_size"] % design["num_attention_heads"]:
        raise ValueError(
            f"--num-attention-heads must divide --hidden-size, got {design['num_attention_heads']} heads "
            f"for width {design['hidden_size']}"
        )


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run needs; the command line mirrors it field for field (the nested sampling
    settings as flat flags)."""

    preset: str = setting("demo", "model size and the defaults below", choices=PRESETS)
    output_dir: str = setting("runs/demo", "run folder: checkpoints/, config.json, validation/, RESULTS.md")
    # -- data: shards are encoded once into the feature cache; training reads only the cache
    shards: str = setting("data/shards/demo", "WebDataset shard folder (bucket_<W>x<H>/shard-*.tar)")
    cache: str = setting("data/cache/demo", "feature-cache folder (latents, T5, DINOv3 in safetensors)")
    synth_if_missing: bool = setting(True, "write the synthetic set into --shards when it holds no shards")
    num_images: int = setting(100, "images in that synthetic set")
    resolution: int = setting(32, "side of the synthetic images (and the bucket base for new data)")
    stand_in_encoders: str | None = setting(
        "data/encoders/tiny", "folder of stand-in encoders (made if missing); unset: the real ones"
    )
    text_encoder: str = setting(_ENCODERS.text_encoder, "T5 Hub id or folder")
    image_encoder: str = setting(_ENCODERS.image_encoder, "DINOv3 Hub id or folder")
    vae: str = setting(_ENCODERS.vae, 'Flux VAE Hub id or folder (subfolder "vae")')
    pixel_mode: bool = setting(True, "no VAE: the model works on pixels in [-1, 1]")
    max_sequence_length: int = setting(MAX_SEQUENCE_LENGTH, "T5 tokens kept of a caption (cache and shipped pipeline)")
    # -- run
    resume: str | None = setting(
        None, 'a checkpoint folder, or "latest" (the newest in the checkpoint folder)', alias="resume_from_checkpoint"
    )
    checkpoint_dir: str | None = setting(
        None, "where checkpoints and the training log go (default: <output_dir>/checkpoints)"
    )  # made <output_dir>/checkpoints when the config is (__post_init__): one folder, one name
    checkpoint_every: int = setting(
        1000, "steps between accelerator.save_state checkpoints", alias="checkpointing_steps"
    )
    checkpoints_total_limit: int | None = setting(None, "keep only the newest N checkpoints (default: all)")
    overwrite_output_dir: bool = setting(False, "start afresh in an output folder that holds a run")
    # -- CFG dropout: four exclusive modes, exact counts over every 100 draws (CFGDropout)
    p_both: float = setting(0.7, "CFG dropout: text and image kept")
    p_none: float = setting(0.1, "CFG dropout: both dropped")
    p_text_only: float = setting(0.1, "CFG dropout: image dropped")
    p_image_only: float = setting(0.1, "CFG dropout: text dropped")
    # -- the objective: how the training σ is drawn (FlowMatching's defaults)
    weighting_scheme: str = setting(
        _OBJECTIVE.weighting_scheme, "density of the training σ (SD3)", choices=WEIGHTING_SCHEMES
    )
    logit_mean: float = setting(_OBJECTIVE.logit_mean, "location of the logit-normal σ density")
    logit_std: float = setting(_OBJECTIVE.logit_std, "scale of the logit-normal σ density")
    mode_scale: float = setting(_OBJECTIVE.mode_scale, 'scale of the "mode" σ density')
    shift: float = setting(_OBJECTIVE.shift, "SD3 time shift of the training σ (1: as drawn)")
    # -- optimisation
    total_steps: int = setting(2000, "optimizer steps", alias="max_train_steps")
    batch_size: int = setting(
        32, "samples per micro-batch (per process); one bucket per batch", alias="train_batch_size"
    )
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    peak_lr: float = setting(2e-3, "AdamW learning rate after warmup", alias="learning_rate")
    lr_scheduler: str = setting(
        "cosine_with_min_lr",
        "LR schedule after the warmup: the plan's cosine to --min-lr, or one of diffusers' get_scheduler",
        choices=LR_SCHEDULERS,
    )
    min_lr: float = setting(1e-6, "floor of the cosine decay (cosine_with_min_lr)")
    warmup_steps: int = setting(
        50, "linear warmup; the plan's 5k would leave no room for the decay", alias="lr_warmup_steps"
    )
    weight_decay: float = setting(0.03, "AdamW weight decay")
    grad_clip: float = setting(1.0, "max global gradient norm", alias="max_grad_norm")
    ema_decay: float = setting(0.9999, "EMAModel max decay (with warmup)")
    mixed_precision: str | None = setting(
        None, "unset: as `accelerate launch` says (flag or config)", choices=MIXED_PRECISIONS
    )
    gradient_checkpointing: bool = setting(False, "recompute block activations in backward: less memory, more time")
    use_8bit_adam: bool = setting(False, 'bitsandbytes\' AdamW8bit (CUDA; pip install "nano-dit[gpu]")')
    max_bad_steps: int = setting(
        10,
        "steps in a row with a non-finite loss or gradient (each skipped on the device) that stop the run; "
        "read at logging steps (--log-every), so the stop comes at the first one after",
    )
    report_to: str = setting(
        "none", "experiment tracker (all: every one Accelerate finds installed)", choices=REPORT_TO
    )
    tracker_project_name: str = setting("nano-dit", "the trackers' project (accelerator.init_trackers)")
    seed: int = setting(0, "seeds weights, data order, noise, CFG dropout and the validation noise")
    seeds: str | None = setting(
        None,
        "several seeds, e.g. 0,1,2: one run of this design per seed, in <output_dir>/seed<S>/, one after "
        "another (under `accelerate launch` with N processes: a seed per process, each a run of its own), then "
        "<output_dir>/COMPARE.md: each figure's mean and spread over the seeds",
    )
    cpu_threads: int | None = setting(None, "torch threads per process on a CPU run (default: the cores / processes)")
    compile: bool = setting(False, "torch.compile the transformer through Accelerate (pays off on a GPU)")
    compile_backend: str = setting("inductor", 'dynamo backend for --compile ("eager": capture, no code generation)')
    compile_mode: str | None = setting(
        None,
        "torch.compile mode for --compile, graphs static per bucket; unset: reduce-overhead (CUDA graphs) on CUDA, "
        "default elsewhere",
        choices=COMPILE_MODES,
    )
    tf32: bool = setting(
        True, "TF32 matmuls on Ampere+ GPUs (fp32 weights, faster matmuls); no effect elsewhere", alias="allow_tf32"
    )
    cache_on_device: str = setting(
        "auto",
        "yes: the whole feature cache on the device; no: host memory, a copy per batch; "
        "auto: yes when it takes <= 1/4 of free memory",
        choices=("auto", "yes", "no"),
    )
    log_every: int = setting(50, "steps between log records and progress-bar updates")
    # -- validation: the plan's three tests on the EMA weights, then RESULTS.md (nano_dit.validation)
    validation: bool = setting(True, "--no-validation skips the tests (and loading the encoders they need)")
    validation_every: int = setting(
        2000, "steps between validations; the last step is always validated", alias="validation_steps"
    )
    validation_prompts: list[str] | None = setting(
        None,
        "your prompts, sampled at every validation: each a prompt, or a .txt file of one per line; a line "
        "`prompt | reference.png` also conditions on that image (DINOv3)",
    )
    sampling: SamplingConfig = setting(help="how validation samples", factory=_run_sampling)
    lpips_backbone: str = setting(
        "pretrained", "LPIPS AlexNet: pretrained (cached / fetched once), random or none", choices=LPIPS_BACKBONES
    )
    push_to_hub: bool = setting(
        False,
        "upload checkpoint_final to the Hub at the end; the repo is created or found first, before any "
        "work (token: HF_TOKEN or `hf auth login`)",
    )
    hub_private: bool | None = setting(None, "create the Hub repo private (unset: the Hub's default)")
    hub_model_id: str | None = setting(None, "the Hub repo for --push-to-hub (default: the output folder's name)")
    model: dict = setting(help="NanoDiTTransformer2DModel config (preset + data widths)", flag=False, factory=dict)

    def __post_init__(self) -> None:
        if self.checkpoint_dir is None:
            self.checkpoint_dir = str(Path(self.output_dir) / "checkpoints")

    def prompts(self) -> list[tuple[str, str | None]]:
        """--validation-prompts as (prompt, reference image path or None): each value a prompt, or a
        .txt file read one prompt per line (blank lines and `#` lines skipped); `prompt | image` names
        a reference image, a relative path read from the file's folder."""
        out, values = [], self.validation_prompts or []
        for value in [values] if isinstance(values, str) else values:  # a YAML file may give one string
            path = Path(value)
            if value.endswith(".txt"):
                if not path.is_file():
                    raise ValueError(f"--validation-prompts: no prompt file {value}")
                lines = [line.strip() for line in path.read_text().splitlines()]
                out += [_prompt(line, path.parent) for line in lines if line and not line.startswith("#")]
            else:
                out.append(_prompt(value, Path.cwd()))
        for prompt, image in out:
            if image is not None and not Path(image).is_file():
                raise ValueError(f"--validation-prompts: the reference image of {prompt!r} is not a file: {image}")
        return out

    def check(self) -> None:
        """Refuse a bad setting with a message naming its flag, before any work."""
        positive = ("total_steps", "batch_size", "gradient_accumulation_steps", "resolution", "num_images")
        positive += ("log_every", "max_bad_steps", "checkpoint_every", "validation_every", "max_sequence_length")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.peak_lr <= 0 or not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need 0 <= --min-lr <= --peak-lr and --peak-lr > 0, got {self.min_lr}, {self.peak_lr}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"--warmup-steps must be in [0, --total-steps), got {self.warmup_steps}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
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
        if self.cpu_threads is not None and self.cpu_threads <= 0:
            raise ValueError(f"--cpu-threads must be > 0, got {self.cpu_threads}")
        if self.seeds is not None:
            self.seed_list()  # each one a seed, none twice
            if self.push_to_hub:
                raise ValueError(
                    "--seeds with --push-to-hub: a sweep compares seeds; push the run you keep afterwards "
                    "(nano-dit export RUN/checkpoints/checkpoint_final --push-to-hub REPO)"
                )
            if Path(self.checkpoint_dir) != Path(self.output_dir) / "checkpoints":
                raise ValueError(
                    f"--seeds with --checkpoint-dir {self.checkpoint_dir}: each seed's run keeps its checkpoints "
                    "in its own folder, <output_dir>/seed<S>/checkpoints"
                )
        _check_choices(self)
        self.sampling.check()
        self.prompts()  # the prompt files and reference images exist
        try:
            self.cfg_dropout()
        except ValueError as err:
            raise ValueError(f"--p-both / --p-none / --p-text-only / --p-image-only: {err}") from None
        try:
            self.objective()
        except ValueError as err:
            raise ValueError(f"--weighting-scheme / --logit-std / --shift: {err}") from None
        if self.push_to_hub:
            from huggingface_hub import get_token  # (the Hub client, only when a push is asked for)

            if get_token() is None:  # found before training, not after it
                raise ValueError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")

    def seed_list(self) -> list[int]:
        """--seeds as a list: "0,1,2" (a YAML file may give a list), each in [0, 2**32), none twice."""
        values = self.seeds if isinstance(self.seeds, (list, tuple)) else str(self.seeds).split(",")
        try:
            seeds = [int(str(v).strip()) for v in values]
        except ValueError:
            raise ValueError(f"--seeds must be integers separated by commas, e.g. 0,1,2, got {self.seeds!r}") from None
        if not seeds or any(not 0 <= s < 2**32 for s in seeds):
            raise ValueError(f"--seeds must each be in [0, 2**32), got {self.seeds!r}")
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"--seeds names a seed twice: {self.seeds!r}")
        return seeds

    def for_seed(self, seed: int) -> TrainConfig:
        """The run of one seed of --seeds: that seed, in <output_dir>/seed<S>/."""
        folder = str(Path(self.output_dir) / f"seed{seed}")
        return dataclasses.replace(self, seed=seed, seeds=None, output_dir=folder, checkpoint_dir=None)

    @property
    def repo_id(self) -> str:
        return self.hub_model_id or Path(self.output_dir).resolve().name

    @classmethod
    def from_saved(cls, values: dict, model: dict | None = None) -> TrainConfig:
        """The config a checkpoint or a model card recorded (`dataclasses.asdict` of one); fields
        this version does not know are left out. `model`: the model config, where it was recorded apart."""
        values = dict(values)
        sampling = dict(values.pop("sampling", None) or {})
        known = _field_names(cls)
        fields = {k: v for k, v in values.items() if k in known}
        fields["sampling"] = SamplingConfig(**{k: v for k, v in sampling.items() if k in _field_names(SamplingConfig)})
        if model is not None:
            fields["model"] = model
        return cls(**fields)

    def cfg_dropout(self, rank: int = 0) -> CFGDropout:
        """This run's CFG-dropout sampler (one stream per process)."""
        return CFGDropout(self.p_both, self.p_none, self.p_text_only, self.p_image_only, seed=self.seed + rank)

    def objective(self) -> FlowMatching:
        """This run's rectified-flow objective (how σ is drawn)."""
        return FlowMatching(self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale, self.shift)

    def thresholds(self) -> Thresholds:
        """The verdict's numbers: the plan's, with the preset's own where it has them."""
        return Thresholds(**PRESETS[self.preset].get("thresholds", {}))

    def encoder_spec(self) -> EncoderSpec:
        if self.stand_in_encoders:
            spec = EncoderSpec.stand_in(self.stand_in_encoders, pixel_mode=self.pixel_mode)
        else:
            spec = EncoderSpec(self.text_encoder, self.image_encoder, vae=None if self.pixel_mode else self.vae)
        return dataclasses.replace(spec, max_sequence_length=self.max_sequence_length)


def _prompt(text: str, folder: Path) -> tuple[str, str | None]:
    """`prompt` or `prompt | image` -> (prompt, image path or None), a relative image read from `folder`."""
    prompt, _, image = (part.strip() for part in text.partition("|"))
    if not prompt:
        raise ValueError(f"--validation-prompts: an empty prompt in {text!r}")
    return prompt, (str(folder / image) if image and not Path(image).is_absolute() else image or None)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_choices(config) -> None:
    """Every setting with allowed values (its metadata's `choices`) holds one of them."""
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise ValueError(f"{_flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def flag_fields(cls=TrainConfig) -> list[dataclasses.Field]:
    """The fields that are flags, nested ones flattened (`sampling.guidance_scale` is --guidance-scale)."""
    out = []
    for f in dataclasses.fields(cls):
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            out += flag_fields(type(nested))
        elif f.metadata.get("flag", True):
            out.append(f)
    return out


def flag_names(f: dataclasses.Field) -> list[str]:
    """A field's flags: its name with dashes and with underscores (`--output-dir`, `--output_dir`, as
    transformers' HfArgumentParser registers them), then its diffusers alias in both spellings."""
    names = [f.name] + ([f.metadata["alias"]] if f.metadata.get("alias") else [])
    return list(dict.fromkeys(flag for name in names for flag in (_flag(name), f"--{name}")))


def aliases(cls=TrainConfig) -> dict[str, str]:
    """diffusers' names of the settings -> the fields' names."""
    return {f.metadata["alias"]: f.name for f in flag_fields(cls) if f.metadata.get("alias")}


def add_flags(
    parser: argparse.ArgumentParser, fields: list[dataclasses.Field], default_note, presets: bool = False
) -> None:
    """One flag per field, its type, choices and help read from the field. `default_note` says where
    an unset flag's value comes from (`{default}`: the field's default; or a function of the
    field that says it); `presets`: also each
    preset's own value, where it sets one. Unset flags parse as None."""
    sampling, sampling_flags = _run_sampling(), {x.name for x in flag_fields(SamplingConfig)}
    for f in fields:
        kind = next((t for t in (bool, int, float) if f.type.startswith(t.__name__)), str)  # "int | None" -> int
        default = f.default if f.default is not dataclasses.MISSING else None
        if presets and f.name in sampling_flags:  # the run's sampling default, not the pipeline's
            default = getattr(sampling, f.name)
        note = default_note(f) if callable(default_note) else default_note.format(default=default)
        if presets:
            note += "".join(
                f"; --preset {name}: {preset['train'][f.name]}"
                for name, preset in PRESETS.items()
                if f.name in preset["train"]
            )
        help_text = f"{f.metadata['help']} ({note})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                *flag_names(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        if f.type.startswith("list["):  # several values after one flag, as diffusers' --validation_prompts
            parser.add_argument(*flag_names(f), dest=f.name, nargs="+", default=None, help=help_text)
            continue
        parser.add_argument(
            *flag_names(f), dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text
        )


def _preset_design(f: dataclasses.Field) -> str:
    """Where an unset `ModelDesign` flag's value comes from: each preset's value."""
    values = [f"--preset {name}: {design_of(preset['model'])[f.name]}" for name, preset in PRESETS.items()]
    return "default: the preset's; " + ", ".join(values)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig: preset defaults first, then a --config file, explicit flags on top."""
    parser = argparse.ArgumentParser(description="Train Nano DiT with rectified flow (run with `accelerate launch`).")
    add_flags(parser, flag_fields(), "default: {default}", presets=True)
    add_flags(parser, flag_fields(ModelDesign), _preset_design)
    parser.add_argument("--config", default=None, help="YAML file of these settings (flag names); flags win")
    args = parser.parse_args(argv)
    from_file = _read_config_file(args.config, parser) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    preset = flags.get("preset") or from_file.get("preset") or TrainConfig.preset
    values = {**PRESETS[preset]["train"], **from_file, **flags}
    sampling_names = {f.name for f in flag_fields(SamplingConfig)}
    sampling = replace(_run_sampling(), **{k: values.pop(k) for k in sampling_names if k in values})
    design = {f.name: values.pop(f.name) for f in flag_fields(ModelDesign) if f.name in values}
    model = {**PRESETS[preset]["model"], **{k: v for k, v in design.items() if v is not None}}
    config = TrainConfig(**values, sampling=sampling, model=model)
    try:
        check_design(config.model)
        config.check()
    except ValueError as err:
        parser.error(str(err))  # usage + the message naming the flag, exit status 2, before any work
    return config


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Settings from YAML: keys are the flags' names (dashes or underscores); unknown keys are refused."""
    import yaml  # (read only when a --config file is given)

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: {err}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    names = aliases()
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        values[names.get(name, name)] = value
    unknown = sorted(set(values) - {f.name for f in flag_fields() + flag_fields(ModelDesign)})
    if unknown:
        parser.error(f"--config {path}: unknown settings {unknown}")
    if values.get("preset", TrainConfig.preset) not in PRESETS:
        parser.error(f"--config {path}: preset must be one of {', '.join(PRESETS)}, got {values['preset']!r}")
    return values
