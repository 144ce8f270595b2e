"""NanoDiTPipeline: text + DINOv3 image conditioned sampling with dual classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

GUIDANCE_MODES = ("independent", "nested")

# The four conditioning modes, as (drop_text, drop_image): the same masks training uses.
BRANCHES = {"none": (True, True), "text": (False, True), "image": (True, False), "both": (False, False)}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from nano_dit import NanoDiTPipeline

        >>> pipe = NanoDiTPipeline.from_pretrained("runs/demo/checkpoints/checkpoint_final")
        >>> image = pipe(prompt_embeds=text, prompt_attention_mask=mask, image_embeds=dino).images[0]
        ```
"""


def guidance_weights(mode: str, text_scale: float, image_scale: float) -> dict[str, float]:
    """Weights of each conditioning branch in the guided velocity, zero weights left out.

    independent (the seed's):  v = v∅ + s_t·(v_text − v∅) + s_i·(v_image − v∅)
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


class NanoDiTPipeline(DiffusionPipeline):
    r"""Sampling for `NanoDiTTransformer2DModel`, conditioned on T5 text and a DINOv3 image embedding.

    Components:
        transformer (`NanoDiTTransformer2DModel`): predicts the velocity v = ε − x0.
        scheduler (`FlowMatchEulerDiscreteScheduler`): Euler steps x ← x + (σ_next − σ)·v.
        vae (`AutoencoderKL`, *optional*): Flux VAE; `None` is pixel mode (latents are the image in [−1, 1]).
        text_encoder, tokenizer (*optional*): T5 encoder and its tokenizer, for `prompt`.
        image_encoder, image_processor (*optional*): DINOv3 and its processor, for `image`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"]

    def __init__(
        self,
        transformer,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        image_encoder=None,
        image_processor=None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.output_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ----------------------------------------------------------------------------------------
    # Conditioning
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device=None, max_sequence_length: int = 128):
        """T5 token embeddings `(B, L, text_embed_dim)` and their attention mask `(B, L)`."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompt needs a text_encoder and a tokenizer; pass prompt_embeds instead")
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(
            prompts, padding="longest", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        return embeds, mask

    @torch.no_grad()
    def encode_image(self, image, device=None):
        """DINOv3 global embedding `(B, image_embed_dim)` (the pooled CLS token)."""
        if self.image_encoder is None or self.image_processor is None:
            raise ValueError("image needs an image_encoder and an image_processor; pass image_embeds instead")
        device = device or self._execution_device
        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
        pixels = pixels.to(device=device, dtype=self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixels).pooler_output

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
        text_guidance_scale: float = 3.0,
        image_guidance_scale: float = 2.0,
        guidance_mode: str = "independent",
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Each guided step runs every branch it needs (∅, text-only, image-only or both) through the
        transformer as ONE batch; see `guidance_weights` for the two formulas.

        Args:
            prompt: text, encoded with the pipeline's T5; or give `prompt_embeds` (+ mask).
            image: reference image(s) for DINOv3; or give `image_embeds`.
            text_guidance_scale, image_guidance_scale: guidance scales s_t and s_i (≥ 0).
            guidance_mode: "independent" or "nested".
            num_inference_steps: Euler steps from σ = 1 to 0.
            height, width: output size in pixels; default `sample_size × vae_scale_factor`.
            output_type: "pil", "np", "pt" or "latent".

        Returns:
            `ImagePipelineOutput` with `images`, or a 1-tuple.
        """
        device = self._execution_device
        guidance_weights(guidance_mode, text_guidance_scale, image_guidance_scale)  # checks the mode early
        if text_guidance_scale < 0 or image_guidance_scale < 0:
            raise ValueError(
                f"guidance scales must be >= 0, got text_guidance_scale={text_guidance_scale}, "
                f"image_guidance_scale={image_guidance_scale}"
            )

        # 1. Conditioning (an absent condition uses the null embedding; its guidance term drops out).
        if prompt is not None and prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self.encode_prompt(prompt, device)
        if image is not None and image_embeds is None:
            image_embeds = self.encode_image(image, device)
        if prompt_embeds is None:
            text_guidance_scale = 0.0
        if image_embeds is None:
            image_guidance_scale = 0.0
        batch = self._batch_size(prompt_embeds, image_embeds) * num_images_per_prompt
        dtype = self.transformer.dtype
        prompt_embeds = _per_image(prompt_embeds, num_images_per_prompt, device, dtype)
        prompt_attention_mask = _per_image(prompt_attention_mask, num_images_per_prompt, device)
        image_embeds = _per_image(image_embeds, num_images_per_prompt, device, dtype)

        # 2. Latents and the σ schedule (passed explicitly: the scheduler applies its shift once).
        latents = self._prepare_latents(batch, height, width, generator, latents, device)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        weights = guidance_weights(guidance_mode, text_guidance_scale, image_guidance_scale)
        drop_text, drop_image = (
            torch.tensor([BRANCHES[b][i] for b in weights for _ in range(batch)], device=device) for i in (0, 1)
        )  # (K·B,) each, K = number of branches
        k = len(weights)

        # 3. Euler steps; all branches in one forward.
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            v_all = self.transformer(
                latents.repeat(k, 1, 1, 1),  # (K·B, C, h, w)
                t.expand(k * batch),
                encoder_hidden_states=_repeat(prompt_embeds, k),
                encoder_attention_mask=_repeat(prompt_attention_mask, k),
                image_embeds=_repeat(image_embeds, k),
                drop_text=drop_text,
                drop_image=drop_image,
            ).sample
            v = sum(w * v_b for w, v_b in zip(weights.values(), v_all.chunk(k)))
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)

        # 4. Decode.
        image = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ----------------------------------------------------------------------------------------
    @staticmethod
    def _batch_size(prompt_embeds, image_embeds) -> int:
        sizes = {name: t.shape[0] for name, t in (("prompt", prompt_embeds), ("image", image_embeds)) if t is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt and image batch sizes differ: {sizes}")
        return next(iter(sizes.values()), 1)

    def _prepare_latents(self, batch, height, width, generator, latents, device):
        config = self.transformer.config
        factor = self.vae_scale_factor
        height = height or config.sample_size * factor
        width = width or config.sample_size * factor
        multiple = factor * config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got height={height}, width={width}")
        shape = (batch, config.in_channels, height // factor, width // factor)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=self.transformer.dtype)

    def _decode(self, latents, output_type):
        if output_type == "latent":
            return latents
        if self.vae is None:  # pixel mode: the latents are the image in [−1, 1]
            image = latents.float().clamp(-1, 1)
        else:
            config = self.vae.config
            latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.output_processor.postprocess(image, output_type=output_type)


def _per_image(t: torch.Tensor | None, n: int, device, dtype=None) -> torch.Tensor | None:
    """Each row repeated for the `n` images per prompt, on the pipeline's device (and dtype)."""
    return None if t is None else t.repeat_interleave(n, dim=0).to(device=device, dtype=dtype)


def _repeat(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(k, *([1] * (t.ndim - 1)))
