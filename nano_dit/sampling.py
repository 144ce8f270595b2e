"""Batched sampling from cached features, for validation: every image of a bucket through the
pipeline in a few large calls, each sample from its own seeded noise, decoded to [0, 1].

    sampler = Sampler(pipe, config.sampling, mixed_precision="bf16", timer=timer)
    images = sampler.generate(bucket, rows, noise)                       # (len(rows), 3, H, W)
    swapped = sampler.generate(bucket, a_rows, noise, image_rows=b_rows)  # A's caption, B's DINOv3

No caption or image is encoded again: the conditioning is the cache's. A figure does not depend on
the batch size, since each sample's noise belongs to it. With the transformer compiled
(`compile_for_sampling`), batches are padded to a few fixed sizes, each compiled once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import SamplingConfig
from .feature_cache import CachedBucket
from .pipelines import NanoDiTPipeline
from .pipelines.pipeline_nano_dit import decode_latents
from .timings import PhaseTimer


def compile_for_sampling(pipe: NanoDiTPipeline, backend: str | None) -> None:
    """Compile the transformer's repeated block once with dynamo `backend`: diffusers' regional
    compilation (`compile_repeated_blocks`), every block reusing one compiled graph, so compiling
    costs one block's time rather than the whole model's; in place (`nn.Module.compile`), so the
    `state_dict`, and every saved file, keeps the plain names. Shapes are static: `generate` pads
    its batches to a few sizes per bucket, compiled at the first validation and reused by the next.
    None leaves it eager."""
    if backend is not None and not compiled_for_sampling(pipe):
        pipe.transformer.compile_repeated_blocks(backend=backend, dynamic=False)


def compiled_for_sampling(pipe: NanoDiTPipeline) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in pipe.transformer.modules())


def decode_chunk(pipe: NanoDiTPipeline) -> int:
    """Latents per VAE decode: large batches where the device has room for them."""
    return 32 if pipe.device.type == "cuda" else 8


@dataclass(frozen=True)
class Sampler:
    """How validation samples: the pipeline, the sampling settings, the autocast the transformer
    runs under (as the run trained: "bf16", "fp16"; None or "no": none) and the timer its
    "sampling" and "decoding" phases go to. Decoding runs in the VAE's dtype, the figures in fp32."""

    pipe: NanoDiTPipeline
    sampling: SamplingConfig
    mixed_precision: str | None = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    def with_settings(self, **changes) -> Sampler:
        """This sampler with other `SamplingConfig` settings (the probes' unguided samples)."""
        return dataclasses.replace(self, sampling=dataclasses.replace(self.sampling, **changes))

    def autocast(self):
        """Autocast as the run trained, on any device: a CPU run in bf16 samples as a GPU one does."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        return torch.autocast(self.pipe.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    @torch.inference_mode()
    def generate(
        self,
        bucket: CachedBucket,
        rows,
        noise: torch.Tensor,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_rows=None,
    ) -> torch.Tensor:
        """Images `(len(rows), 3, H, W)` in [0, 1] on the CPU for samples `rows` of `bucket`.

        `noise` holds each sample's starting noise (indexed by row); `prompt_embeds`: (embeds, mask)
        of other captions, one per row, instead of the rows' cached ones; `image_rows`: whose DINOv3
        embedding each row takes (default: its own)."""
        pipe, sampling = self.pipe, self.sampling
        rows = list(rows)
        image_rows = rows if image_rows is None else list(image_rows)
        static = compiled_for_sampling(pipe)
        size = sampling.validation_batch_size
        out = []
        for s in range(0, len(rows), size):
            r, ir = rows[s : s + size], image_rows[s : s + size]
            if prompt_embeds is None:
                embeds, mask = bucket.prompt_embeds[r], bucket.prompt_attention_mask[r]
            else:
                embeds, mask = prompt_embeds[0][s : s + len(r)], prompt_embeds[1][s : s + len(r)]
            n = len(r)
            if static:  # a few fixed shapes per bucket, each compiled once: padded, the padding dropped after
                padded = static_batch(n, size)
                r, ir = r + r[-1:] * (padded - n), ir + ir[-1:] * (padded - n)
                embeds, mask = padded_text(embeds, mask, padded, bucket.prompt_embeds.shape[1])
            with self.timer.phase("sampling"), self.autocast():
                latents = pipe(
                    prompt_embeds=embeds,
                    prompt_attention_mask=mask,
                    image_embeds=bucket.image_embeds[ir],
                    image_tokens=bucket.image_tokens[ir],  # (used by a model built with use_image_tokens)
                    latents=noise[r],
                    height=noise.shape[-2] * pipe.vae_scale_factor,  # the bucket's size, not the default
                    width=noise.shape[-1] * pipe.vae_scale_factor,
                    num_inference_steps=sampling.num_inference_steps,
                    guidance_scale=sampling.guidance_scale,
                    image_guidance_scale=sampling.image_guidance_scale,
                    guidance_mode=sampling.guidance_mode,
                    output_type="latent",
                ).images
            out.append(latents[:n].float())
        return self.decode(torch.cat(out))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images `(N, 3, H, W)` in [0, 1] on the CPU, `decode_batch_size`
        at a time (unset: `decode_chunk`)."""
        pipe = self.pipe
        chunk = self.sampling.decode_batch_size or decode_chunk(pipe)
        dtype = pipe.transformer.dtype if pipe.vae is None else pipe.vae.dtype
        with self.timer.phase("decoding"):
            parts = [
                pipe.output_processor.postprocess(
                    decode_latents(pipe.vae, latents[i : i + chunk].to(pipe.device, dtype)), output_type="pt"
                )
                .float()
                .cpu()
                for i in range(0, len(latents), chunk)
            ]
        return torch.cat(parts)


def static_batch(n: int, size: int) -> int:
    """The batch `n` rows are sampled at when compiled: the next power of two, at most `size`. A
    bounded set of shapes (the DINO swap's 5 and the text edits' 5 share 8), each compiled once, for
    at most twice the work on the small batches; padding every call to `size` would cost 10x on them."""
    return min(size, 1 << (n - 1).bit_length())


def padded_text(embeds: torch.Tensor, mask: torch.Tensor, rows: int, length: int):
    """Text embeddings `(B, L, D)` and mask padded to `rows` rows (the last repeated) and to at least
    `length` tokens (masked out): the bucket's cached shape, so edited captions reuse its graph."""
    embeds = torch.cat([embeds, embeds[-1:].expand(rows - len(embeds), *embeds.shape[1:])])
    mask = torch.cat([mask, mask[-1:].expand(rows - len(mask), *mask.shape[1:])])
    extra = max(length - embeds.shape[1], 0)
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra))
