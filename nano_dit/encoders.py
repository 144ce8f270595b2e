"""The frozen encoders: Flux VAE (or pixel mode), T5 text encoder, DINOv3 image encoder.

Each is chosen by Hub id or local folder and loaded with `from_pretrained`, in bf16 on a GPU and
fp32 on a CPU. The offline demo and the tests use *stand-in* encoders: tiny randomly initialised
models of the same classes (`make_stand_in_encoders`), saved with `save_pretrained` and read back
through the very same loading code. A folder of stand-ins carries a marker file, and everything
that loads them says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .offline import check_hub_reachable
from .pipelines import pipeline_nano_dit as pipeline

logger = logging.getLogger(__name__)

STAND_IN_MARKER = "nano_dit_stand_in.json"


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoders to use; the feature cache is keyed by these values.

    `vae=None` is pixel mode: the "latents" are the image itself in [−1, 1].
    """

    text_encoder: str = "google/t5-v1_1-base"
    image_encoder: str = "facebook/dinov3-vits16-pretrain-lvd1689m"
    vae: str | None = "black-forest-labs/FLUX.1-schnell"
    vae_subfolder: str | None = "vae"
    revision: str | None = None  # Hub revision for all three; pin it to key the cache on exact weights
    max_sequence_length: int = pipeline.MAX_SEQUENCE_LENGTH  # T5 tokens kept of a caption

    @classmethod
    def stand_in(cls, folder: str | os.PathLike, pixel_mode: bool = False) -> EncoderSpec:
        """The stand-ins written by `make_stand_in_encoders(folder)`."""
        folder = Path(folder)
        if not (folder / STAND_IN_MARKER).exists():
            raise FileNotFoundError(
                f"{folder} holds no stand-in encoders (run `nano-dit encoders make-tiny --out {folder}`)"
            )
        vae = None if pixel_mode or not (folder / "vae").exists() else str(folder / "vae")
        return cls(str(folder / "t5"), str(folder / "dinov3"), vae, None)

    def fingerprint(self, kind: str) -> str:
        """A stable string per feature kind ("latents", "text", "image"): change it, recompute that kind."""
        if kind == "latents":
            if self.vae is None:
                return "pixels"
            return f"vae:{self.vae}/{self.vae_subfolder or ''}@{_version_of(self.vae, self.revision)}"
        if kind == "text":
            return (
                f"t5:{self.text_encoder}@{_version_of(self.text_encoder, self.revision)}:max{self.max_sequence_length}"
            )
        if kind == "image":
            return f"dinov3:{self.image_encoder}@{_version_of(self.image_encoder, self.revision)}"
        raise ValueError(f"kind must be 'latents', 'text' or 'image', got {kind!r}")

    @property
    def uses_stand_ins(self) -> bool:
        return any(
            (Path(p).parent / STAND_IN_MARKER).exists()
            for p in (self.text_encoder, self.image_encoder, self.vae)
            if p is not None and Path(p).exists()
        )


def _version_of(name: str, revision: str | None) -> str:
    """A Hub id's version is its revision; a local folder's is a hash of its files.

    Files up to 64 MiB are hashed by content (so rewriting identical stand-ins keeps the cache);
    larger ones by size and modification time, to keep this fast for local copies of real models.
    """
    path = Path(name)
    if not path.exists():
        return revision or "main"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(str(file.relative_to(path)).encode())
        if stat.st_size <= 64 * 2**20:
            digest.update(file.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "local-" + digest.hexdigest()[:16]


class ConditioningEncoders:
    """Loads the three encoders and turns images and captions into model inputs.

    Args:
        spec: which encoders (`EncoderSpec`).
        device: where to run them (default: CUDA when there is one).
        dtype: their weights' dtype (default: bf16 on CUDA, fp32 elsewhere).
    """

    def __init__(self, spec: EncoderSpec, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        from diffusers import AutoencoderKL
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, T5EncoderModel

        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if spec.uses_stand_ins:
            logger.warning(
                "using STAND-IN encoders (tiny, randomly initialised): results say nothing about real T5 / DINOv3"
            )
        # Models given by Hub id: one try at the Hub first; unreachable, every load reads the cache.
        check_hub_reachable([n for n in (spec.text_encoder, spec.image_encoder, spec.vae) if n is not None])
        load = {"revision": spec.revision}
        self.tokenizer = AutoTokenizer.from_pretrained(spec.text_encoder, **load)
        self.text_encoder = T5EncoderModel.from_pretrained(spec.text_encoder, dtype=self.dtype, **load)
        self.image_processor = AutoImageProcessor.from_pretrained(spec.image_encoder, **load)
        self.image_encoder = AutoModel.from_pretrained(spec.image_encoder, dtype=self.dtype, **load)
        self.vae = None
        if spec.vae is not None:
            self.vae = AutoencoderKL.from_pretrained(
                spec.vae, subfolder=spec.vae_subfolder, torch_dtype=self.dtype, **load
            )
        for model in (self.text_encoder, self.image_encoder, self.vae):
            if model is not None:
                model.to(self.device).eval().requires_grad_(False)

    # The encoder calls themselves live in the pipeline module, so that the cache and the pipeline
    # cannot drift apart; these methods only supply this object's models, device and text window.
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 token embeddings (B, L, D) and their attention mask (B, L), padded to the longest."""
        return pipeline.encode_text(
            self.tokenizer, self.text_encoder, captions, self.device, self.spec.max_sequence_length
        )

    def count_truncated(self, captions: list[str]) -> int:
        """How many captions are longer than the text window (`max_sequence_length` tokens) and are cut."""
        return pipeline.count_truncated(self.tokenizer, captions, self.spec.max_sequence_length)

    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv3 global embedding (B, Di) — the CLS token — and patch tokens (B, M, Di)."""
        return pipeline.encode_images(self.image_processor, self.image_encoder, images, self.device)

    def encode_latents(self, images: list[Image.Image]) -> torch.Tensor:
        """Model-space latents (B, C, h, w): `(mode − shift)·scale` from the VAE, or the pixels in [−1, 1]."""
        return pipeline.encode_latents(self.vae, images_to_tensor(images).to(self.device))


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) float in [−1, 1]."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Stand-in encoders
# --------------------------------------------------------------------------------------------
def make_stand_in_encoders(
    out_dir: str | os.PathLike,
    vocabulary: list[str] | None = None,
    seed: int = 0,
    image_size: int = 64,
    width: int = 64,
    with_vae: bool = True,
) -> Path:
    """Write tiny, randomly initialised T5 / DINOv3 / Flux-layout VAE models with `save_pretrained`.

    Layout: `<out_dir>/t5/` (T5EncoderModel + a word-level tokenizer built offline from
    `vocabulary`), `<out_dir>/dinov3/` (DINOv3ViTModel + its image processor), `<out_dir>/vae/`
    (AutoencoderKL with 16 latent channels and the Flux shift / scale), and a marker file.
    Deterministic for a seed.
    """
    from diffusers import AutoencoderKL
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel, T5Config, T5EncoderModel

    from .synthetic import WORDS

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"stand-in encoders go in a folder, and {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_level_tokenizer(vocabulary or WORDS)
    tokenizer.save_pretrained(out_dir / "t5")

    with _seeded(seed):
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4
            )
        )
    t5.save_pretrained(out_dir / "t5")

    dino_config = DINOv3ViTConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=16,
        image_size=image_size,
        num_register_tokens=4,
    )
    with _seeded(seed + 1):
        DINOv3ViTModel(dino_config).save_pretrained(out_dir / "dinov3")
    DINOv3ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out_dir / "dinov3")

    if with_vae:
        with _seeded(seed + 2):
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,  # x8 down, as the Flux VAE
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 16, 16),
                layers_per_block=1,
                latent_channels=16,
                norm_num_groups=4,
                scaling_factor=0.3611,  # the Flux VAE's
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        vae.save_pretrained(out_dir / "vae")

    marker = {"stand_in": True, "seed": seed, "note": "tiny randomly initialised encoders for offline tests and demos"}
    (out_dir / STAND_IN_MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG for a block and give the caller its own state back afterwards
    (making stand-ins inside a training run must not change the run's random numbers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _word_level_tokenizer(vocabulary: list[str]):
    """A T5-style tokenizer (pad 0, EOS 1, unk 2; EOS appended) over whole lower-cased words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    words = [w for w in dict.fromkeys(v.lower() for v in vocabulary) if w not in specials]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def describe(spec: EncoderSpec) -> dict:
    return {**asdict(spec), "stand_in": spec.uses_stand_ins}
