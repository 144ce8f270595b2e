"""NanoDiTPipeline: text + DINOv3 image conditioned sampling with dual classifier-free guidance."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

# The sampling defaults, declared here once: the trainer's validation, `nano-dit validate` and the
# README read them (this module must import nothing of nano_dit: it travels with saved pipelines).
GUIDANCE_MODES = ("independent", "nested")
DEFAULT_GUIDANCE_MODE = "nested"  # measured better on the demo (docs/validation.md); "independent" is the plan's
DEFAULT_GUIDANCE_SCALE = 3.0  # text scale s_t
DEFAULT_IMAGE_GUIDANCE_SCALE = 2.0  # image scale s_i
DEFAULT_NUM_INFERENCE_STEPS = 50
MAX_SEQUENCE_LENGTH = 128  # T5 tokens kept of a caption, when the pipeline's config does not say
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MODEL_CARD = "README.md"

# The four conditioning modes, as (drop_text, drop_image): the same masks training uses.
BRANCHES = {"none": (True, True), "text": (False, True), "image": (True, False), "both": (False, False)}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from nano_dit import NanoDiTPipeline

        >>> pipe = NanoDiTPipeline.from_pretrained("runs/demo/checkpoints/checkpoint_final")
        >>> reference = PIL.Image.open("reference.png")
        >>> image = pipe("a small red circle on the left", image=reference).images[0]

        >>> # Without this package installed, the same folder or Hub repo loads through its own code:
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("user/nano-dit", trust_remote_code=True)
        ```
"""


def guidance_weights(mode: str, text_scale: float, image_scale: float) -> dict[str, float]:
    """Weights of each conditioning branch in the guided velocity, zero weights left out.

    independent (the validation plan's):  v = v∅ + s_t·(v_text − v∅) + s_i·(v_image − v∅)
    nested (InstructPix2Pix):  v = v∅ + s_i·(v_image − v∅) + s_t·(v_both − v_image)

    Written as sums of branches, a branch whose weight is 0 is never evaluated: the nested form at
    scales (1, 1) is `v_both` alone, the independent form at (1, 0) is `v_text` alone.
    """
    if mode == "independent":
        weights = {"none": 1.0 - text_scale - image_scale, "text": text_scale, "image": image_scale}
    elif mode == "nested":
        weights = {"none": 1.0 - image_scale, "image": image_scale - text_scale, "both": text_scale}
    else:
        raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    return {branch: w for branch, w in weights.items() if w != 0.0}


def transformer_inputs(
    prompt_embeds: torch.Tensor | None,
    prompt_attention_mask: torch.Tensor | None,
    image_embeds: torch.Tensor | None,
    image_tokens: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """The conditioning under the transformer's names, from the pipeline's: the one place where
    diffusers' pipeline convention (`prompt_embeds`, `prompt_attention_mask`, also the feature
    cache's and validation's names) meets its model convention (`encoder_hidden_states`,
    `encoder_attention_mask`). The pipeline, the trainer and the model probes all call it."""
    return {
        "encoder_hidden_states": prompt_embeds,
        "encoder_attention_mask": prompt_attention_mask,
        "image_embeds": image_embeds,
        "image_tokens": image_tokens,
    }


# --------------------------------------------------------------------------------------------
# The encoder calls, written once: the pipeline and the training feature cache both call these,
# so that a caption or picture encoded for training and the same one given at sampling agree bit
# for bit.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_text(
    tokenizer, text_encoder, prompts: list[str], device, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 token embeddings `(B, L, D)` and their attention mask `(B, L)` of `prompts` (B strings).

    Each prompt keeps at most `max_sequence_length` tokens (EOS included); the batch is padded to
    its longest prompt, so `L <= max_sequence_length`, and the mask is 1 on real tokens, 0 on padding.
    """
    tokens = tokenizer(
        prompts, padding="longest", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.to(device)
    embeds = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    return embeds, mask


def count_truncated(tokenizer, prompts: list[str], max_sequence_length: int) -> int:
    """How many of `prompts` are longer than `max_sequence_length` tokens, so that `encode_text` cuts them."""
    lengths = tokenizer(prompts, truncation=False, return_length=True)["length"]
    return sum(n > max_sequence_length for n in lengths)


@torch.no_grad()
def encode_images(image_processor, image_encoder, images, device) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3 embeddings of B reference images: the global one `(B, Di)` (the pooled CLS token) and
    the patch tokens `(B, M, Di)`, the register tokens left out.

    `images`: PIL images (uint8 pixels: the processor rescales them), or any form `NanoDiTPipeline`
    takes (float tensors `(3, H, W)` / `(B, 3, H, W)` and arrays `(H, W, 3)` / `(B, H, W, 3)` in
    [0, 1], uint8 arrays), which are brought to [0, 1] first and not rescaled again. The pixels go
    to the encoder in its own dtype.
    """
    images = _as_image_list(images)
    if all(isinstance(im, PIL.Image.Image) for im in images):
        pixels = image_processor(images=images, return_tensors="pt").pixel_values
    else:  # already in [0, 1]: rescaling by 1/255 again would leave a near-blank image
        unit = [_in_unit_range(im) for im in images]
        pixels = image_processor(images=unit, do_rescale=False, return_tensors="pt").pixel_values
    out = image_encoder(pixel_values=pixels.to(device=device, dtype=image_encoder.dtype))
    first_patch = 1 + getattr(image_encoder.config, "num_register_tokens", 0)
    return out.pooler_output, out.last_hidden_state[:, first_patch:]


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Model-space latents `(B, C, H / f, W / f)` of images `(B, 3, H, W)` in [−1, 1]:
    `(mode − shift) · scale` of the VAE's latent distribution, in the VAE's dtype.

    `vae=None` is pixel mode: the latents are the pixels themselves, returned as given."""
    if vae is None:
        return pixels
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    return (latents - _vae_shift(vae)) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images `(B, 3, H, W)`, about [−1, 1], from model-space latents `(B, C, h, w)`: the inverse of
    `encode_latents` (`latent / scale + shift`, then the VAE's decoder), unclamped.

    `vae=None` is pixel mode: the latents, as fp32, clamped to [−1, 1]."""
    if vae is None:
        return latents.float().clamp(-1, 1)
    latents = latents / vae.config.scaling_factor + _vae_shift(vae)
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def _vae_shift(vae) -> float:
    """The VAE's latent shift: Flux's VAE has one, SD-style VAEs have none."""
    return getattr(vae.config, "shift_factor", None) or 0.0


class NanoDiTPipeline(DiffusionPipeline, SanaLoraLoaderMixin):
    r"""Sampling for `NanoDiTTransformer2DModel`, conditioned on T5 text and a DINOv3 image embedding.

    Components:
        transformer (`NanoDiTTransformer2DModel`): predicts the velocity v = ε − x0.
        scheduler (`FlowMatchEulerDiscreteScheduler`): Euler steps x ← x + (σ_next − σ)·v.
        vae (`AutoencoderKL`, *optional*): Flux VAE; `None` is pixel mode (latents are the image in [−1, 1]).
        text_encoder, tokenizer (*optional*): T5 encoder and its tokenizer, for `prompt`.
        image_encoder, image_processor (*optional*): DINOv3 and its processor, for `image`.

    Config:
        max_sequence_length (`int`): T5 tokens kept of a prompt, the window the training captions
            were cut to; saved in `model_index.json` (default `MAX_SEQUENCE_LENGTH`).

    A saved pipeline carries this module and the transformer's beside its weights and names them in
    `model_index.json` (diffusers' community-components layout), so that it loads with
    `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` where this package
    is not installed; `NanoDiTPipeline.from_pretrained` loads the same folder with the installed
    classes and runs none of the carried code. `model_card` (the folder's README.md) travels with
    the pipeline through `from_pretrained`, `save_pretrained` and `push_to_hub`.

    LoRA: `load_lora_weights`, `save_lora_weights`, `set_adapters`, `fuse_lora` come from diffusers'
    transformer-only LoRA loader (the one Sana's pipeline uses: LoRA on the transformer, keys as
    PEFT writes them, nothing converted); `attention_kwargs={"scale": s}` scales it per call.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        image_encoder=None,
        image_processor=None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        super().__init__()
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
        )
        # The T5 window the transformer's captions were encoded with: saved in model_index.json and
        # given back by from_pretrained, so prompts are cut as in training (folders saved without it
        # load with the default).
        self.register_to_config(max_sequence_length=max_sequence_length)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.output_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.model_card: str | None = None  # README.md text; see `save_pretrained`
        self.model_card_assets: dict[str, bytes] = {}  # files the card shows (e.g. a sample grid), by name

    # ----------------------------------------------------------------------------------------
    # Conditioning
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device=None, max_sequence_length: int | None = None):
        """T5 token embeddings `(B, L, text_embed_dim)` and their attention mask `(B, L)`, padded
        to the longest prompt: the same as the feature cache's, so cached and fresh prompts agree.

        `max_sequence_length`: tokens kept of each prompt; default `config.max_sequence_length`."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompt needs a text_encoder and a tokenizer; pass prompt_embeds instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if max_sequence_length is None:
            max_sequence_length = self.config.max_sequence_length
        device = device or self._execution_device
        prompt_embeds, prompt_attention_mask = encode_text(
            self.tokenizer, self.text_encoder, prompts, device, max_sequence_length
        )
        return prompt_embeds, prompt_attention_mask  # the names `__call__` takes them back under

    @torch.no_grad()
    def encode_image(self, image, device=None):
        """DINOv3 embeddings of reference image(s): the global one `(B, image_embed_dim)` (the
        pooled CLS token) and the patch tokens `(B, M, image_embed_dim)`.

        `image`: a PIL image or a list of them; a float tensor `(B, 3, H, W)` or `(3, H, W)` in
        [0, 1]; a NumPy array `(H, W, 3)` or `(B, H, W, 3)`, float in [0, 1] or uint8 (diffusers'
        conventions). All give the same features for the same picture.
        """
        if self.image_encoder is None or self.image_processor is None:
            raise ValueError("image needs an image_encoder and an image_processor; pass image_embeds instead")
        device = device or self._execution_device
        image_embeds, image_tokens = encode_images(self.image_processor, self.image_encoder, image, device)
        return image_embeds, image_tokens

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE,
        guidance_mode: str = DEFAULT_GUIDANCE_MODE,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        attention_kwargs: dict | None = None,
        max_sequence_length: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from a prompt and a reference image, with dual classifier-free guidance.

        Each step runs every branch the guidance needs (∅, text-only, image-only or both) through
        the transformer as ONE batch, and combines them (see `guidance_weights`):

            independent (the validation plan's):  v = v∅ + s_t·(v_text − v∅) + s_i·(v_image − v∅)
            nested (InstructPix2Pix):  v = v∅ + s_i·(v_image − v∅) + s_t·(v_both − v_image)

        A branch whose weight is zero is not run: "nested" at scales (1, 1) is one plain
        conditional forward. An absent condition (no prompt, or no image) uses the learned null
        embedding and its guidance term drops out.

        Args:
            prompt: text, encoded with the pipeline's T5; or give `prompt_embeds` (+ mask).
            image: reference image(s) for DINOv3 (PIL, list of PIL, a (B, 3, H, W) tensor in [0, 1],
                or a NumPy (B, H, W, 3) array, float in [0, 1] or uint8); or give `image_embeds`
                (and `image_tokens` for a model that uses them).
            guidance_scale, image_guidance_scale: the text scale s_t and the image scale s_i (≥ 0),
                diffusers' names for them (as InstructPix2Pix).
            guidance_mode: "nested" (the default: it evaluates both conditions together, the mode
                70 % of training teaches, and measured better on the demo; see docs/validation.md) or
                "independent" (the validation plan's formula).
            num_inference_steps: Euler steps from σ = 1 down to 0.
            height, width: output size in pixels; default `sample_size × vae_scale_factor`; both
                multiples of `vae_scale_factor × patch_size`.
            num_images_per_prompt: images per prompt (each with its own noise).
            generator, latents: the starting noise's generator, or the noise itself.
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent".
            callback_on_step_end: called after each step as `f(pipe, i, t, {name: tensor})` with the
                tensors named in `callback_on_step_end_tensor_inputs`; may return replacements.
            attention_kwargs: passed to the transformer; `{"scale": s}` scales loaded LoRA adapters.
            max_sequence_length: T5 tokens kept of each prompt; default `config.max_sequence_length`,
                the window the training captions were cut to.

        Returns:
            `ImagePipelineOutput` with `images`, or a 1-tuple when `return_dict=False`.
        """
        device = self._execution_device
        self.check_inputs(
            prompt, image, prompt_embeds, image_embeds, guidance_scale, image_guidance_scale, guidance_mode,
            num_inference_steps, num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 1. Conditioning (an absent condition uses the null embedding; its guidance term drops out).
        if prompt is not None:
            prompt_embeds, prompt_attention_mask = self.encode_prompt(prompt, device, max_sequence_length)
        if image is not None:
            image_embeds, image_tokens = self.encode_image(image, device)
        if not getattr(self.transformer.config, "use_image_tokens", False):
            image_tokens = None
        elif image_embeds is not None and image_tokens is None:  # else the model sees the null tokens
            raise ValueError(
                "this transformer was built with use_image_tokens=True: pass image_tokens (the DINOv3 patch "
                "tokens; `encode_image` returns them with the embedding) with image_embeds, or pass image="
            )
        if prompt_embeds is None:
            guidance_scale = 0.0
        if image_embeds is None:
            image_guidance_scale = 0.0
            guidance_mode = "independent"  # nested without an image is this, in two branches not three
        self._check_widths(prompt_embeds, prompt_attention_mask, image_embeds, image_tokens)
        batch = self._batch_size(prompt_embeds, image_embeds) * num_images_per_prompt
        dtype = self.transformer.dtype
        prompt_embeds = _per_image(prompt_embeds, num_images_per_prompt, device, dtype)
        prompt_attention_mask = _per_image(prompt_attention_mask, num_images_per_prompt, device)
        image_embeds = _per_image(image_embeds, num_images_per_prompt, device, dtype)
        image_tokens = _per_image(image_tokens, num_images_per_prompt, device, dtype)

        # 2. Latents and the σ schedule (passed explicitly: the scheduler applies its shift once).
        latents = self.prepare_latents(batch, height, width, generator, latents, device)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        # What diffusers' callbacks read (properties below), as its pipelines expose it. The scales
        # are read again at every step: a callback may change them (diffusers' CFG cut-off
        # callbacks set `pipe._guidance_scale = 0.0`), and the branches run follow.
        self._guidance_scale, self._image_guidance_scale = guidance_scale, image_guidance_scale
        self._num_timesteps, self._interrupt = len(self.scheduler.timesteps), False
        self._attention_kwargs, self._current_timestep = attention_kwargs, None
        step_sigmas = self.scheduler.sigmas.tolist()  # for the caches' context, read once (no per-step sync)
        conditioning = transformer_inputs(prompt_embeds, prompt_attention_mask, image_embeds, image_tokens)
        batches = {}  # branches -> the transformer's inputs for them, built once per set of branches

        def branch_inputs(branches: tuple[str, ...]) -> dict:
            if branches not in batches:
                k = len(branches)
                inputs = {name: _repeat(c, k) for name, c in conditioning.items()}  # (K·B, ...)
                for name, j in (("drop_text", 0), ("drop_image", 1)):
                    inputs[name] = torch.tensor(
                        [BRANCHES[b][j] for b in branches for _ in range(batch)], device=device
                    )
                batches[branches] = inputs
            return batches[branches]

        def step_weights() -> dict[str, float]:  # an absent condition keeps scale 0 whatever is set
            text = self._guidance_scale if prompt_embeds is not None else 0.0
            image = self._image_guidance_scale if image_embeds is not None else 0.0
            return guidance_weights(guidance_mode, text, image)

        self._do_classifier_free_guidance = len(step_weights()) > 1

        # 3. Euler steps; all branches in one forward.
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:  # set by a callback: the remaining steps are skipped
                continue
            self._current_timestep = t
            weights = step_weights()
            k = len(weights)
            self._do_classifier_free_guidance = k > 1
            # One guided forward is one denoiser call: a cache enabled on the transformer keys
            # its state by this context (diffusers' pipelines name theirs "cond" / "uncond").
            cache_step = {"step_index": i, "sigma": step_sigmas[i], "num_inference_steps": self._num_timesteps}
            with self.transformer.cache_context("cond", **cache_step):
                v_all = self.transformer(
                    latents.repeat(k, 1, 1, 1),  # (K·B, C, h, w)
                    t.expand(k * batch),
                    **branch_inputs(tuple(weights)),
                    attention_kwargs=attention_kwargs,
                ).sample
            # The guided sum in fp32: its weights (e.g. −4, 3, 2) magnify a bf16 branch's rounding.
            v = sum(w * v_b for w, v_b in zip(weights.values(), v_all.float().chunk(k)))
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0].to(latents.dtype)
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                outputs = callback_on_step_end(self, i, t, {n: tensors[n] for n in callback_on_step_end_tensor_inputs})
                latents = (outputs or {}).get("latents", latents)

        # 4. Decode.
        self._current_timestep = None
        if output_type == "latent":
            image = latents
        else:
            image = self.output_processor.postprocess(decode_latents(self.vae, latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ----------------------------------------------------------------------------------------
    # The sampling call's state, as diffusers pipelines expose it to `callback_on_step_end`
    # ----------------------------------------------------------------------------------------
    @property
    def guidance_scale(self) -> float:
        """The text guidance scale of the call in progress."""
        return self._guidance_scale

    @property
    def image_guidance_scale(self) -> float:
        return self._image_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the call runs more than one conditioning branch per step."""
        return self._do_classifier_free_guidance

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """A callback sets `pipe._interrupt = True` to stop sampling after the current step."""
        return self._interrupt

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The step's timestep (σ·1000) while sampling, else None; PAB and FasterCache read it
        through `current_timestep_callback=lambda: pipe.current_timestep`."""
        return getattr(self, "_current_timestep", None)

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    # ----------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        image,
        prompt_embeds,
        image_embeds,
        guidance_scale,
        image_guidance_scale,
        guidance_mode,
        num_inference_steps,
        num_images_per_prompt,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Refuse bad arguments before any work, naming the argument."""
        if guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {guidance_mode!r}")
        for name, value in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):  # NumPy scalars too
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, t in (("prompt_embeds", prompt_embeds), ("image_embeds", image_embeds)):
            if t is not None and not bool(torch.isfinite(t).all()):  # one check per call, not per step
                raise ValueError(f"{name} holds NaN or infinite values")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if image is not None and image_embeds is not None:
            raise ValueError("pass either image or image_embeds, not both")
        if prompt is not None and image is not None:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
            n_images = len(_as_image_list(image))
            if n_prompts != n_images:
                raise ValueError(f"got {n_prompts} prompt(s) and {n_images} image(s): give one image per prompt")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {sorted(unknown)}"
            )

    def _check_widths(self, prompt_embeds, prompt_attention_mask, image_embeds, image_tokens) -> None:
        """The conditioning's shapes against the transformer's config, as the caller gave them
        (the model would see them repeated per branch and quote those shapes)."""
        config = self.transformer.config
        expected = {
            "prompt_embeds": (prompt_embeds, 3, config.text_embed_dim, "(B, L, {})"),
            "image_embeds": (image_embeds, 2, config.image_embed_dim, "(B, {})"),
            "image_tokens": (image_tokens, 3, config.image_embed_dim, "(B, M, {})"),
        }
        for name, (t, ndim, width, form) in expected.items():
            if t is not None and (t.ndim != ndim or t.shape[-1] != width):
                raise ValueError(f"{name} must have shape {form.format(width)}, got {tuple(t.shape)}")
        mask, embeds = prompt_attention_mask, prompt_embeds
        if mask is not None and embeds is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(
                f"prompt_attention_mask must have shape {tuple(embeds.shape[:2])} (that of prompt_embeds' "
                f"first two dimensions), got {tuple(mask.shape)}"
            )

    @staticmethod
    def _batch_size(prompt_embeds, image_embeds) -> int:
        sizes = {name: t.shape[0] for name, t in (("prompt", prompt_embeds), ("image", image_embeds)) if t is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt and image batch sizes differ: {sizes}")
        return next(iter(sizes.values()), 1)

    def prepare_latents(self, batch, height, width, generator, latents, device) -> torch.Tensor:
        """The starting noise `(batch, C, height / f, width / f)`, or the given `latents` checked."""
        config = self.transformer.config
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer (or None for the default), got {value!r}")
        height = height if height is not None else config.sample_size * factor
        width = width if width is not None else config.sample_size * factor
        multiple = factor * config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got height={height}, width={width}")
        shape = (batch, config.in_channels, height // factor, width // factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} image(s): give one per image, or one")
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=self.transformer.dtype)

    # ----------------------------------------------------------------------------------------
    # Save / load / Hub
    # ----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained` (safetensors), plus the code that loads it without
        this package (this module at the top, the transformer's module in `transformer/`, both
        named in `model_index.json`) and the model card, when the pipeline has one."""
        if kwargs.pop("push_to_hub", False):
            raise ValueError("call pipe.push_to_hub(repo_id): it uploads exactly what save_pretrained writes")
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        pipeline_file = Path(inspect.getsourcefile(type(self)))
        transformer_file = Path(inspect.getsourcefile(type(self.transformer)))
        shutil.copyfile(pipeline_file, folder / pipeline_file.name)
        shutil.copyfile(transformer_file, folder / "transformer" / transformer_file.name)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [pipeline_file.stem, type(self).__name__]
        index["transformer"] = [transformer_file.stem, type(self.transformer).__name__]
        index.pop("_name_or_path", None)  # where it was loaded from: a local path
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for config_path in [*folder.glob("*/config.json"), *folder.glob("*/scheduler_config.json")]:
            config = json.loads(config_path.read_text())
            if config.pop("_name_or_path", None) is not None:  # where it was loaded from: a local path
                config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.model_card is not None:
            (folder / MODEL_CARD).write_text(self.model_card, encoding="utf-8")
            for name, data in self.model_card_assets.items():
                (folder / name).write_bytes(data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved pipeline (a folder or a Hub repo id) with this package's own classes.

        The folder names the modules it carries (for `trust_remote_code` loading elsewhere);
        here diffusers reads a view of it whose `model_index.json` names the installed classes
        instead, so none of the carried code runs. Every `DiffusionPipeline.from_pretrained`
        argument works as usual.
        """
        try:  # a string import: diffusers' import check must not ask for this package where it's absent
            installed = importlib.import_module("nano_dit")
        except ImportError:  # the copy of this module that travels with a saved pipeline
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            hub = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
            folder = Path(
                snapshot_download(str(pretrained_model_name_or_path), **{k: kwargs.pop(k) for k in hub if k in kwargs})
            )
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} is not a saved pipeline (no model_index.json in it)"
            )
        index = json.loads((folder / "model_index.json").read_text())
        with tempfile.TemporaryDirectory() as view:
            for entry in folder.iterdir():
                if entry.is_dir():
                    os.symlink(entry.resolve(), Path(view) / entry.name, target_is_directory=True)
            index["_class_name"] = cls.__name__
            if isinstance(index.get("transformer"), list):
                class_name = index["transformer"][1]
                index["transformer"] = [getattr(installed, class_name).__module__, class_name]
            (Path(view) / "model_index.json").write_text(json.dumps(index))
            try:
                pipe = super().from_pretrained(view, **kwargs)
            except (OSError, ValueError, RuntimeError) as err:  # errors name the view: name the user's folder
                message = str(err).replace(str(view), str(folder))
                raise type(err)(f"could not load the pipeline in {folder}: {message}") from err
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        card = folder / MODEL_CARD
        if card.exists():
            pipe.model_card = card.read_text(encoding="utf-8")
            shown = re.findall(r"!\[[^\]]*\]\(([\w./-]+)\)", pipe.model_card)  # images the card links to
            inside = [n for n in shown if ".." not in n.split("/") and not n.startswith("/")]
            pipe.model_card_assets = {n: (folder / n).read_bytes() for n in inside if (folder / n).is_file()}
        return pipe

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
    ):
        """Upload exactly the folder `save_pretrained` writes (weights, carried code, model card).

        The token comes from `token`, the `HF_TOKEN` environment variable or `hf auth login`; it
        is never printed or logged."""
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                token=token,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                create_pr=create_pr,
            )


def _as_image_list(image) -> list:
    """A reference image argument as a list of images, or a ValueError naming what it was."""
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
            raise ValueError(
                f"image tensor must be float (B, 3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}"
            )
        return list(image)
    if isinstance(image, np.ndarray) and image.ndim == 4:  # (B, H, W, 3)
        return list(image)
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    bad = [type(im).__name__ for im in images if not isinstance(im, (PIL.Image.Image, np.ndarray, torch.Tensor))]
    if not images or bad:
        raise ValueError(f"image must be a PIL image, a list of them or a (B, 3, H, W) tensor, got {bad or image!r}")
    return images


def _in_unit_range(image) -> np.ndarray:
    """One reference image as a float (H, W, 3) array in [0, 1]: PIL and uint8 arrays are divided by
    255, float tensors (3, H, W) and arrays (H, W, 3) are checked to lie in [0, 1] already."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"a NumPy image must be (H, W, 3) or (B, H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"float image values must lie in [0, 1], got [{low:.3g}, {high:.3g}]")
    return image.astype(np.float32)


def _per_image(t: torch.Tensor | None, n: int, device, dtype=None) -> torch.Tensor | None:
    """Each row repeated for the `n` images per prompt, on the pipeline's device (and dtype)."""
    return None if t is None else t.repeat_interleave(n, dim=0).to(device=device, dtype=dtype)


def _repeat(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(k, *([1] * (t.ndim - 1)))
