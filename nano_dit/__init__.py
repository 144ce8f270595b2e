"""Nano DiT: validate a diffusion-transformer design (T5 + DINOv3 conditioning, rectified flow) before the big run."""

__version__ = "0.1.0"

from .cfg_dropout import CFGDropout, CFGMode
from .flow_matching import FlowMatching
from .pipelines import NanoDiTPipeline
from .transformer_nano_dit import NanoDiTTransformer2DModel

__all__ = [
    "CFGDropout",
    "CFGMode",
    "FlowMatching",
    "NanoDiTPipeline",
    "NanoDiTTransformer2DModel",
    "__version__",
]
