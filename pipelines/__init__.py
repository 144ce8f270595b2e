"""Diffusers pipelines of Nano DiT; installed as `nano_dit.pipelines`."""

from .pipeline_nano_dit import NanoDiTPipeline, guidance_weights

__all__ = ["NanoDiTPipeline", "guidance_weights"]
