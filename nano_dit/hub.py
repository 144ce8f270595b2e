"""From a training run to a shareable pipeline: build it, describe it, export it, push it.

    nano-dit export runs/nano/checkpoints/checkpoint_step0005000 --out exported/
    nano-dit export runs/nano/checkpoints/checkpoint_final --push-to-hub user/nano-dit

One folder format everywhere: `NanoDiTPipeline.save_pretrained` writes it (weights in
safetensors, the pipeline and transformer modules for `trust_remote_code`, the model card), and
`export`, `push_to_hub` here, `pipe.push_to_hub` and the trainer's `--push-to-hub` all write or
upload exactly that.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from . import __version__
from .checkpointing import STATE_FILE, load_ema, read_state
from .config import TrainConfig
from .encoders import ConditioningEncoders, EncoderSpec, describe
from .folders import save_aside
from .pipelines import NanoDiTPipeline
from .transformer_nano_dit import NanoDiTTransformer2DModel

SAMPLE_GRID = "samples.png"


def build_pipeline(transformer: NanoDiTTransformer2DModel, spec: EncoderSpec) -> NanoDiTPipeline:
    """`transformer` with the encoders it was trained with (fp32, on the CPU): the pipeline we ship."""
    encoders = ConditioningEncoders(spec, device="cpu")
    return NanoDiTPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=encoders.vae,
        text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer,
        image_encoder=encoders.image_encoder,
        image_processor=encoders.image_processor,
        max_sequence_length=spec.max_sequence_length,  # the window the cache's captions were encoded with
    )


def ema_pipeline(ema, config: TrainConfig) -> NanoDiTPipeline:
    """The pipeline a run ships: a transformer of the run's config holding the EMA weights
    (`EMAModel.copy_to`), with the run's encoders (fp32, on the CPU)."""
    transformer = NanoDiTTransformer2DModel(**config.model)
    ema.copy_to(transformer.parameters())
    return build_pipeline(transformer, config.encoder_spec())


def load_pipeline(checkpoint: str | Path) -> NanoDiTPipeline:
    """A pipeline folder (`model_index.json`), or a training checkpoint (`training_state.json`)
    made into one: its EMA weights and the encoders its config names."""
    path = Path(checkpoint)
    if (path / "model_index.json").exists():
        return NanoDiTPipeline.from_pretrained(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(
            f"{path} is neither a pipeline folder (no model_index.json) nor a training checkpoint (no {STATE_FILE})"
        )
    state = read_state(path)
    config = TrainConfig.from_saved(state["config"])
    pipe = ema_pipeline(load_ema(path, NanoDiTTransformer2DModel), config)
    figures, sheet = recorded_figures(path, config.output_dir)
    scheme_and_run = {k: state[k] for k in ("cfg_dropout_scheme", "run_id")}
    set_model_card(pipe, run_info(config, state["step"], scheme_and_run, results=figures), sheet)
    return pipe


def card_figures(results: dict) -> dict:
    """The headline figures of a validation (for the model card and the tracker)."""
    if not results:
        return {}
    recon, swap, manip = results["reconstruction"], results["dino_swap"], results["text_manip"]
    figures = {
        "verdict": results.get("verdict"),
        "reconstruction_stlpips": recon.get("mean_stlpips"),
        "reconstruction_lpips": recon["mean_lpips"],
        "reconstruction_psnr": recon["mean_psnr"],
        "reconstruction_ssim": recon["mean_ssim"],
        "dino_swap_transferred": swap.get("share_transferred"),
        "dino_swap_closer_to_b": swap.get("share_closer_to_b"),
        "dino_swap_sensitivity": swap.get("mean_sensitivity"),
        "text_sensitivity": manip.get("mean_sensitivity"),
        "text_edits_followed": manip.get("share_followed"),
    }
    return {k: v for k, v in figures.items() if v is not None}


def run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/<checkpoint> -> <run>; anything else -> the checkpoint's folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def recorded_figures(checkpoint: Path, output_dir: str | None = None) -> tuple[dict, Image.Image | None]:
    """The headline figures and reconstruction sheet of the validation of a training checkpoint's
    step: `validation/stepNNNNNNN/` in its run folder (`output_dir`, else the one holding
    `checkpoints/`), recorded by the same run (its `run_id`; one from an earlier run that this
    folder held is not this checkpoint's). ({}, None) when there is none."""
    state = read_state(Path(checkpoint))
    for run_dir in dict.fromkeys(p for p in (output_dir and Path(output_dir), run_dir_of(checkpoint)) if p):
        folder = run_dir / "validation" / f"step{state['step']:07d}"
        path = folder / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        if results.get("run_id") == state["run_id"]:
            sheet = folder / "reconstruction" / "sheet.png"
            return card_figures(results), Image.open(sheet) if sheet.exists() else None
    return {}, None


def run_info(config: TrainConfig, step: int, run: dict, data: dict | None = None, results: dict | None = None):
    """What the model card tells about a run (and keeps, in its metadata, for the next export).
    `run`: its CFG-dropout scheme and id (`cfg_dropout_scheme`, `run_id`)."""
    return {
        "version": __version__,
        "step": step,
        "cfg_dropout_scheme": run["cfg_dropout_scheme"],
        "run_id": run["run_id"],
        "encoders": describe(config.encoder_spec()),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "model"},
        "model": config.model,
        "data": data or {"shards": config.shards},
        "results": results or {},
    }


CARD_TEMPLATE = """---
{{ card_data }}
---

# Nano DiT — `{{ info.config.preset }}` preset, step {{ info.step }}

{% if info.encoders.stand_in -%}
> **Stand-in encoders.** This model was trained on features from tiny, randomly initialised
> T5 / DINOv3{% if info.encoders.vae %} / VAE{% endif %} stand-ins (the offline demo), not the real
> encoders: its figures show that the training and validation machinery works, and say nothing
> about how well real text or image conditioning is learned.

{% endif -%}
A {{ "%.1f" | format(params / 1e6) }}M-parameter diffusion transformer (`NanoDiTTransformer2DModel`) trained
with rectified flow, conditioned at once on T5 text embeddings (cross-attention) and a DINOv3 image
embedding (adaLN), with mutually exclusive classifier-free-guidance dropout
(`{{ info.cfg_dropout_scheme }}`). Made with nano-dit {{ info.version }}.

## How to use

```python
from nano_dit import NanoDiTPipeline  # pip install nano-dit

pipe = NanoDiTPipeline.from_pretrained("{{ repo_id }}")
image = pipe("a caption", image=reference_image, guidance_scale=3.0, image_guidance_scale=2.0).images[0]
```

Without nano-dit installed, diffusers runs the pipeline and transformer code this repository carries:

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ repo_id }}", trust_remote_code=True)
```

## Training

| setting | value |
| --- | --- |
| data | {{ info.data | tojson }} |
| text encoder | `{{ info.encoders.text_encoder }}` |
| image encoder | `{{ info.encoders.image_encoder }}` |
| latents | {% if info.encoders.vae %}`{{ info.encoders.vae }}` (subfolder `{{ info.encoders.vae_subfolder }}`){% else %}pixels in [−1, 1] (no VAE){% endif %} |
| model | {% for k, v in info.model.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %} |
{% for k in ["total_steps", "batch_size", "gradient_accumulation_steps", "peak_lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "ema_decay", "mixed_precision", "seed"] -%}
| {{ k }} | {{ info.config[k] }} |
{% endfor %}
The weights are the EMA weights.

## Validation

{% if info.results -%}
| figure | value |
| --- | --- |
{% for k, v in info.results.items() -%}
| {{ k }} | {{ "%.4g" | format(v) if v is number else v }} |
{% endfor %}
{%- else -%}
Not validated yet.
{%- endif %}
{% if sample_grid %}
![Samples: ground truth | generated]({{ sample_grid }})
{% endif %}
"""


def set_model_card(
    pipe: NanoDiTPipeline, info: dict, sample_grid: Image.Image | None = None, repo_id: str | None = None
) -> None:
    """Write the pipeline's model card (`pipe.model_card`, saved as README.md) from `run_info`."""
    info = json.loads(json.dumps(info))  # plain lists and dicts: the card's YAML reads back as written
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag="text-to-image",
        inference=False,
        nano_dit=info,  # kept in the metadata: a later export rewrites the card from it
    )
    assets = {}
    if sample_grid is not None:
        buffer = io.BytesIO()
        sample_grid.save(buffer, format="PNG")
        assets[SAMPLE_GRID] = buffer.getvalue()
    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        info=info,
        params=pipe.transformer.num_parameters(),
        repo_id=repo_id or "<this folder or repo id>",
        sample_grid=SAMPLE_GRID if assets else None,
    )
    tags = ["nano-dit", "diffusion-transformer", "rectified-flow", "text-to-image"]
    card = populate_model_card(card, tags=tags + (["stand-in-encoders"] if info["encoders"]["stand_in"] else []))
    pipe.model_card = str(card)
    pipe.model_card_assets = assets


def export_run(
    pipe: NanoDiTPipeline, config: TrainConfig, run: dict, data: dict, figures: dict, sheet: Image.Image | None
) -> PushFailed | None:
    """The end of a run: `pipe` (the final EMA weights) with its model card written to
    `<checkpoints>/checkpoint_final`, and pushed to the Hub when the config asks. `run`: the CFG-
    dropout scheme and run id (`run_info`). A failed push is returned, not raised: everything local
    is written, and the caller finishes its report first."""
    info = run_info(config, config.total_steps, run, data=data, results=figures)
    set_model_card(pipe, info, sheet, repo_id=config.repo_id if config.push_to_hub else None)
    final_dir = Path(config.checkpoint_dir) / "checkpoint_final"
    save_aside(pipe.save_pretrained, final_dir)  # written beside it, swapped in whole
    print(f"pipeline (EMA weights): {final_dir}")
    if not config.push_to_hub:
        return None
    try:
        url = push(pipe, config.repo_id, final_dir, config.hub_private)
    except PushFailed as failed:  # the run is saved: say why once the report is written
        return failed
    print(f"pushed to the Hub: {url}")
    return None


def push(pipe: NanoDiTPipeline, repo_id: str, local, private: bool | None = None) -> str:
    """`pipe.push_to_hub(repo_id)`; any failure (offline, no connection, refused) becomes one
    `PushFailed` line saying where the local copy is."""
    try:
        return pipe.push_to_hub(repo_id, private=private)
    except Exception as err:
        raise PushFailed.of(err, repo_id, local) from err


def card_info(pipe: NanoDiTPipeline) -> dict | None:
    """The run information a pipeline's model card keeps in its metadata."""
    if pipe.model_card is None:
        return None
    return ModelCard(pipe.model_card).data.to_dict().get("nano_dit")


def export(
    checkpoint: str | Path, out: str | Path | None = None, repo_id: str | None = None, private=None
) -> Path | None:
    """Write the pipeline of `checkpoint` to `out` and/or upload it to the Hub repo `repo_id`."""
    if out is None and repo_id is None:
        raise ValueError("export needs --out DIR, --push-to-hub REPO_ID, or both")
    pipe = load_pipeline(checkpoint)
    info = card_info(pipe)
    if info is not None:  # the card's usage snippet names the repo it is read from
        grid = (
            Image.open(io.BytesIO(pipe.model_card_assets[SAMPLE_GRID]))
            if SAMPLE_GRID in pipe.model_card_assets
            else None
        )
        set_model_card(pipe, info, grid, repo_id=repo_id)
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file; give a folder")
        save_aside(pipe.save_pretrained, out)  # written beside it, swapped in whole
    if repo_id is not None:
        push(pipe, repo_id, out if out is not None else checkpoint, private)
    return Path(out) if out is not None else None


def create_run_repo(config: TrainConfig) -> str:
    """The run's Hub repo (`--hub-model-id`), created or found now (`create_repo(exist_ok=True)`),
    before any training: a bad token, a missing permission or an unreachable Hub stops the run
    here in one `HubRepoRefused` line, not after it. Returns the repo id."""
    import huggingface_hub

    try:
        return huggingface_hub.create_repo(config.repo_id, private=config.hub_private, exist_ok=True).repo_id
    except Exception as err:
        first_line = (str(err).splitlines() or [""])[0][:200]
        raise HubRepoRefused(
            f"--push-to-hub: the Hub repo {config.repo_id} could not be created or found "
            f"({type(err).__name__}: {first_line}); nothing was trained. Check the token (HF_TOKEN or "
            "`hf auth login`), its write permission and --hub-model-id, or run without --push-to-hub"
        ) from err


class HubRepoRefused(RuntimeError):
    """The run's Hub repo could not be created or found; the run stops before it starts."""


class PushFailed(RuntimeError):
    """Only the push to the Hub failed; everything local is written."""

    @classmethod
    def of(cls, err: Exception, repo_id: str, local) -> PushFailed:
        first_line = (str(err).splitlines() or [""])[0][:200]
        return cls(
            f"the push to {repo_id} failed ({type(err).__name__}: {first_line}); the pipeline is saved in "
            f"{local}: push it later with `nano-dit export {local} --push-to-hub {repo_id}`"
        )
