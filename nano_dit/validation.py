"""The validation plan's three validation tests, measured rather than only looked at.

    validation/step0001000/
      reconstruction/   every image regenerated from its own caption + DINOv3 embedding; sheet.png
      dino_swap/        5 pairs: A's caption with B's DINOv3 embedding;                   sheet.png
      text_manip/       5 rule-based caption edits, the DINOv3 embedding kept;            sheet.png
      modes/            unguided text-only and image-only samples (the mode probe);       sheet.png
      results.json      every figure below, per image and as means

1. **Reconstruction**: ST-LPIPS (shift-tolerant LPIPS, pretrained weights shipped with its
   wheel), LPIPS (the `lpips` package, AlexNet), PSNR and SSIM of each output to its ground truth,
   and the outputs' mean and spread against the data's (a mean-gray or collapsed model shows there).
2. **DINO swap**: the distance of each swapped output to B and to A, the share closer to B, and
   the sensitivity (the distance to A's own output). Where the data records its layouts (the
   synthetic set), the swap is measured against the picture it should give, A's shapes on B's
   scene (`nano_dit.ground_truth`): how far the output went from the model's own picture of A
   toward B's scene, and from B's bare scene toward A's shapes; a pair counts when both are at
   least half-way.
3. **Text manipulation**: the sensitivity (edited vs unedited output, same noise; the validation
   plan quotes 0.64 LPIPS for a broken run) and, with a ground-truth layout, how far the output
   went from the model's own picture of the original caption toward the edited layout, drawn: so
   the edited object must be found where the edit put it (and be gone from where it was); an edit
   counts when it went at least half-way.

Beside the three tests, three **model probes** measure parts of the design on the model itself
(a few forwards of the transformer on cached features; no indicator reads the config):

- *null conditions learned, guidance live*: for the same x_σ, σ and conditions, the prediction
  with both conditions dropped against the conditional one, and guided samples against unguided
  ones (scales (1, 1): the conditional branch alone) from the same noise. A model whose CFG drop
  masks are ignored gives identical predictions, and guidance then changes nothing.
- *uses the noise level*: the prediction for one x_σ, told σ = 0.25 and then σ = 0.75. A model
  blind to the timestep gives the same prediction.
- *each CFG mode learned* (`_mode_probes`): every mode's x0 prediction against the best one
  possible for what that mode is given (the exact posterior mean over the cached set), relative to
  what a model that never learned the mode would give; and, with ground-truth layouts, the
  text-only samples showing the captioned shapes, and the image-only samples the image's scene
  with shapes on it, as its training images have (a mode never learned draws the bare scene).

All sampling starts from cached features (no image or caption is encoded again, except the edited
captions), batched across images and CFG branches, from seeded noise that belongs to each sample,
so a figure does not depend on the batch size. The ground truth is the cached latents decoded by
the VAE (the pixels themselves in pixel mode): the figures measure the transformer, not the VAE.

"Closer to" and the sensitivities are ST-LPIPS distances; the layout measures are in pixels. LPIPS needs AlexNet weights that
torchvision downloads once: where they are neither cached nor reachable, the results say so
(`"lpips": null` and the reason), ST-LPIPS decides, and no LPIPS figure is made up.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from PIL import Image

from . import ground_truth
from .checkpointing import checkpoint_name
from .config import SamplingConfig, TrainConfig
from .encoders import images_to_tensor
from .feature_cache import CachedBucket, load_cache
from .flow_matching import TIMESTEP_SCALE, add_noise
from .hub import build_pipeline, card_figures, card_info, load_pipeline, recorded_figures, run_dir_of
from .offline import network_attempt, unreachable
from .perceptual import ShiftTolerantLPIPS
from .pipelines import guidance_weights
from .pipelines.pipeline_nano_dit import BRANCHES
from .report import write_report
from .sheets import contact_sheet
from .synthetic import EDIT_KINDS, Layout, edit_layout, render
from .timings import PhaseTimer, phase
from .transformer_nano_dit import NanoDiTTransformer2DModel

logger = logging.getLogger(__name__)

TESTS = ("reconstruction", "dino_swap", "text_manip")


def compile_for_sampling(pipe, backend: str | None) -> None:
    """Compile the transformer's repeated block once with dynamo `backend`: diffusers' regional
    compilation (`compile_repeated_blocks`), every block reusing one compiled graph, so compiling
    costs one block's time rather than the whole model's; in place (`nn.Module.compile`), so the
    `state_dict`, and every saved file, keeps the plain names. Shapes are static: `generate` pads
    its batches to a few sizes per bucket, compiled at the first validation and reused by the next.
    None leaves it eager."""
    if backend is not None and not compiled_for_sampling(pipe):
        pipe.transformer.compile_repeated_blocks(backend=backend, dynamic=False)


def compiled_for_sampling(pipe) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in pipe.transformer.modules())


def _autocast(pipe, mixed_precision: str | None):
    """Autocast as the run trained, on any device: a CPU run in bf16 samples as a GPU one does."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(pipe.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
class ImageMetrics:
    """ST-LPIPS, LPIPS, PSNR and SSIM between image batches `(N, 3, H, W)` in [0, 1].

    ST-LPIPS (shift-tolerant LPIPS on an anti-aliased AlexNet, `nano_dit.perceptual`) is always
    there: its pretrained weights come with the `stlpips-pytorch` wheel, so it works offline, and it
    is the distance behind "closer to" and the sensitivities. LPIPS (the `lpips` package) needs
    torchvision's AlexNet weights, downloaded once: without them and without a network, its figures
    are null with the reason, never made up.

    Args:
        backbone: LPIPS's AlexNet: "pretrained" (torchvision's weights, cached or fetched once),
            "random" (randomly initialised: for tests, never for a verdict) or "none".
    """

    distance_name = "stlpips"  # what decides "closer to" and the sensitivities

    def __init__(self, device="cpu", backbone: str = "pretrained", chunk: int = 32):
        if backbone not in ("pretrained", "random", "none"):
            raise ValueError(f"LPIPS backbone must be 'pretrained', 'random' or 'none', got {backbone!r}")
        self.device, self.chunk, self.backbone = torch.device(device), chunk, backbone
        self.stlpips_model = ShiftTolerantLPIPS.from_pretrained(device=self.device)
        self.lpips_model, self.lpips_reason = _load_lpips(backbone, self.device)

    @property
    def describe(self) -> dict:
        if self.lpips_model is None:
            return {"available": False, "reason": self.lpips_reason}
        backbone = "AlexNet, torchvision weights" if self.backbone == "pretrained" else "AlexNet, RANDOM weights"
        return {"available": True, "backbone": backbone}

    def lpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Per-image LPIPS on the metric's device, `chunk` images per call; None without a backbone."""
        if self.lpips_model is None:
            return None
        return self._batched(lambda a, b: self.lpips_model(*_perceptual_inputs(a, b)), x, y)

    def stlpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image ST-LPIPS, as `lpips`."""
        return self._batched(lambda a, b: self.stlpips_model(*_perceptual_inputs(a, b)), x, y)

    @torch.inference_mode()
    def _batched(self, fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`fn` over matching chunks of `x` and `y`, moved to the device in fp32; per image, on the CPU."""
        parts = []
        with phase("metrics"):
            for i in range(0, len(x), self.chunk):
                a, b = (t[i : i + self.chunk].to(self.device, torch.float32, non_blocking=True) for t in (x, y))
                parts.append(fn(a, b).flatten().cpu())
        return torch.cat(parts)

    @staticmethod
    def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.float() - y.float()).pow(2).flatten(1).mean(1)

    @classmethod
    def psnr(cls, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 10 * torch.log10(1.0 / cls.mse(x, y).clamp(min=1e-10))

    def ssim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image SSIM (torchmetrics, Gaussian window), on the metric's device in chunks."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        return self._batched(
            lambda a, b: structural_similarity_index_measure(a, b, data_range=1.0, reduction="none"), x, y
        )

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.stlpips(x, y)

    def compare(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float] | None]:
        """Per-image ST-LPIPS, LPIPS (or None), PSNR and SSIM."""
        lp = self.lpips(x, y)
        return {
            "stlpips": self.stlpips(x, y).tolist(),
            "lpips": None if lp is None else lp.tolist(),
            "psnr": self.psnr(x, y).tolist(),
            "ssim": self.ssim(x, y).tolist(),
        }


def _perceptual_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] images as the LPIPS networks take them: in [−1, 1], and at least 64 px on the short
    side (AlexNet's strides leave next to nothing of smaller images; the demo's are 32²)."""
    if min(x.shape[-2:]) < 64:
        size = (64 * x.shape[-2] // min(x.shape[-2:]), 64 * x.shape[-1] // min(x.shape[-2:]))
        x, y = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (x, y))
    return x * 2 - 1, y * 2 - 1


def _alexnet_url() -> str:
    """Where torchvision downloads the AlexNet ImageNet weights LPIPS uses."""
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.IMAGENET1K_V1.url


def alexnet_weights_path() -> Path:
    """Where torchvision keeps AlexNet's ImageNet weights once downloaded (torch.hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_alexnet_url()).name


def _load_lpips(backbone: str, device: torch.device):
    """(LPIPS AlexNet network or None, why not). Fetches the AlexNet weights at most once per
    process, and not at all when offline (`nano_dit.offline`)."""
    if backbone == "none":
        return None, "LPIPS switched off"
    import warnings

    import lpips

    weights, host = alexnet_weights_path(), urlparse(_alexnet_url()).netloc
    if backbone == "pretrained" and not weights.exists() and unreachable(host):
        return None, f"AlexNet weights for LPIPS are not cached ({weights}) and this process is offline"
    try:
        with warnings.catch_warnings(), network_attempt(host):
            warnings.simplefilter("ignore")  # torchvision's deprecation notes about lpips' call
            model = lpips.LPIPS(net="alex", pnet_rand=backbone == "random", verbose=False)
    except OSError as err:  # no cached weights and no network: decide without LPIPS, saying so
        reason = f"AlexNet weights for LPIPS are not cached and could not be fetched ({err})"
        logger.warning("LPIPS unavailable: %s; ST-LPIPS decides", reason)
        return None, reason
    return model.to(device).eval().requires_grad_(False), None


# --------------------------------------------------------------------------------------------
# What each test samples
# --------------------------------------------------------------------------------------------
@dataclass
class Edit:
    """A caption edit of sample `index`; `target` is the edited layout rendered, when known."""

    index: int
    kind: str
    caption: str
    edited: str
    target: Image.Image | None = field(default=None, repr=False)


WORD_SWAPS = [("left", "right"), ("top", "bottom"), ("sitting", "standing"), ("red", "blue"), ("green", "purple")]


def swap_pairs(bucket: CachedBucket, n: int = 5) -> list[tuple[int, int]]:
    """`n` fixed pairs (A, B) of distinct samples: (0, 1), (2, 3), ..."""
    return [(2 * i, 2 * i + 1) for i in range(min(n, len(bucket) // 2))]


def caption_edits(bucket: CachedBucket, n: int = 5) -> list[Edit]:
    """`n` rule-based edits of distinct samples, cycling through the kinds of `EDIT_KINDS`.

    With a synthetic layout (`meta["objects"]`), the edit is made to the layout (left ↔ right,
    top ↔ bottom, another colour, another shape) and the caption is the layout's own, so the
    edited image is known. Other captions get word swaps ("left" ↔ "right", "sitting" ↔
    "standing", colours) and no target. Edits whose caption the set holds (on its other
    samples) come first: an overfit model is asked to recombine what it learned, the caption of
    one sample with the image of another, as the DINO swap asks of the embedding; an edit to a
    caption it never saw asks for a generalisation that 100 images cannot be expected to teach.
    """
    known = set(bucket.captions)
    edits, used = [], set()
    for in_set in (True, False):
        for attempt in range(4 * n * len(EDIT_KINDS)):  # a kind that fits no sample is skipped
            if len(edits) == n:
                break
            kind = EDIT_KINDS[attempt % len(EDIT_KINDS)]
            for i in (j for j in range(len(bucket)) if j not in used):
                edit = _edit_sample(bucket, i, kind)
                if edit is not None and (edit.edited in known) == in_set:
                    edits.append(edit)
                    used.add(i)
                    break
    return edits


def _edit_sample(bucket: CachedBucket, i: int, kind: str) -> Edit | None:
    caption, meta = bucket.captions[i], bucket.meta[i] or {}
    if "objects" in meta:
        layout = Layout.from_json(meta)
        edited = edit_layout(layout, kind)
        if edited is None:
            return None
        return Edit(i, kind, caption, edited.caption, render(edited, bucket.bucket[0]))
    for a, b in WORD_SWAPS:
        for old, new in ((a, b), (b, a)):
            if re.search(rf"\b{old}\b", caption):
                return Edit(i, f"{old} -> {new}", caption, re.sub(rf"\b{old}\b", new, caption))
    return None


# --------------------------------------------------------------------------------------------
# Running the tests
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate(
    pipe, bucket: CachedBucket, rows, noise, sampling: SamplingConfig, precision=None, text=None, image_rows=None
):
    """Images `(len(rows), 3, H, W)` in [0, 1] for samples `rows` of `bucket`, batched, sampled
    under autocast in `precision` ("bf16", "fp16"; None or "no": none).

    `text`: (embeds, mask) to use instead of the rows' cached captions; `image_rows`: whose DINOv3
    embedding each row takes (default: its own). `noise` holds each sample's starting noise.
    """
    rows = list(rows)
    image_rows = rows if image_rows is None else list(image_rows)
    static = compiled_for_sampling(pipe)
    size = sampling.batch_size
    out = []
    for s in range(0, len(rows), size):
        r, ir = rows[s : s + size], image_rows[s : s + size]
        if text is None:
            embeds, mask = bucket.text_embeds[r], bucket.text_mask[r]
        else:
            embeds, mask = text[0][s : s + len(r)], text[1][s : s + len(r)]
        n = len(r)
        if static:  # a few fixed shapes per bucket, each compiled once: padded, the padding dropped after
            padded = _static_batch(n, size)
            r, ir = r + r[-1:] * (padded - n), ir + ir[-1:] * (padded - n)
            embeds, mask = _padded_text(embeds, mask, padded, bucket.text_embeds.shape[1])
        with phase("sampling"), _autocast(pipe, precision):
            images = pipe(
                prompt_embeds=embeds,
                prompt_attention_mask=mask,
                image_embeds=bucket.image_embeds[ir],
                latents=noise[r],
                height=noise.shape[-2] * pipe.vae_scale_factor,  # the bucket's size, not the default
                width=noise.shape[-1] * pipe.vae_scale_factor,
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                image_guidance_scale=sampling.image_guidance_scale,
                guidance_mode=sampling.guidance_mode,
                output_type="latent",
            ).images
        out.append(images[:n].float())
    return decode(pipe, torch.cat(out), sampling.decode_batch_size)


def _static_batch(n: int, size: int) -> int:
    """The batch `n` rows are sampled at when compiled: the next power of two, at most `size`. A
    bounded set of shapes (the DINO swap's 5 and the text edits' 5 share 8), each compiled once, for
    at most twice the work on the small batches; padding every call to `size` would cost 10x on them."""
    return min(size, 1 << (n - 1).bit_length())


def _decode_chunk(pipe) -> int:
    """Latents per VAE decode: large batches where the device has room for them."""
    return 32 if pipe.device.type == "cuda" else 8


def _padded_text(embeds: torch.Tensor, mask: torch.Tensor, rows: int, length: int):
    """Text embeddings `(B, L, D)` and mask padded to `rows` rows (the last repeated) and to at least
    `length` tokens (masked out): the bucket's cached shape, so edited captions reuse its graph."""
    embeds = torch.cat([embeds, embeds[-1:].expand(rows - len(embeds), *embeds.shape[1:])])
    mask = torch.cat([mask, mask[-1:].expand(rows - len(mask), *mask.shape[1:])])
    extra = max(length - embeds.shape[1], 0)
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra))


@torch.inference_mode()
def decode(pipe, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Model-space latents -> images `(N, 3, H, W)` in [0, 1] on the CPU, `chunk` at a time
    (default: 32 on a GPU, 8 elsewhere)."""
    chunk = chunk or _decode_chunk(pipe)
    dtype = pipe.transformer.dtype if pipe.vae is None else pipe.vae.dtype
    with phase("decoding"):
        parts = [
            pipe.decode_latents(latents[i : i + chunk].to(pipe.device, dtype), "pt").float().cpu()
            for i in range(0, len(latents), chunk)
        ]
    return torch.cat(parts)


@torch.inference_mode()
def run_validation(
    pipe,
    buckets: list[CachedBucket],
    out_dir: str | Path,
    metrics: ImageMetrics,
    sampling: SamplingConfig,
    step: int,
    info: dict | None = None,
    *,
    seed: int = 0,
    mixed_precision: str | None = None,
    writer: ImageWriter | None = None,
) -> dict:
    """Run the three tests with `pipe` on the cached `buckets`; write images, sheets and results.json
    (with `info`, e.g. the checkpoint and its CFG-dropout scheme, at the top, and the seconds spent
    sampling, decoding, on metrics and writing images under "timings").

    `seed` seeds each sample's starting noise; `mixed_precision` ("bf16", "fp16", "no" or None) is
    the autocast the transformer samples under, as the run trained. Decoding and metrics run in fp32.
    `writer`: an `ImageWriter` that writes the images in the background (the caller waits on it);
    None writes them before returning.
    """
    start = time.perf_counter()
    if sampling.decode_batch_size is None:  # recorded in results.json as used
        sampling = replace(sampling, decode_batch_size=_decode_chunk(pipe))
    token = _WRITER.set(writer)
    try:
        with PhaseTimer(pipe.device) as timer:
            results = _run_tests(pipe, buckets, Path(out_dir), metrics, sampling, step, info, seed, mixed_precision)
    finally:
        _WRITER.reset(token)
    results["timings"] = {"seconds": round(time.perf_counter() - start, 3), "phases": timer.as_dict()}
    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _run_tests(pipe, buckets, out_dir: Path, metrics, sampling, step: int, info: dict | None, seed, precision) -> dict:
    for name in TESTS:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    results = {
        "step": step,
        **(info or {}),
        "sampling": {
            **asdict(sampling),
            "seed": seed,
            "mixed_precision": precision,
            "compiled": compiled_for_sampling(pipe),
        },
        "stlpips": {"available": True, "weights": "stlpips-pytorch, vST0.0 AlexNet (pretrained)"},
        "lpips": metrics.describe,
        "distance": metrics.distance_name,
        "ground_truth": "cached latents decoded by the VAE" if pipe.vae is not None else "the images (pixel mode)",
    }
    recon, truth, noise_of = {}, {}, {}
    per_image = []
    for b, bucket in enumerate(buckets):
        noise = torch.randn(
            (len(bucket), *bucket.latents.shape[1:]), generator=torch.Generator().manual_seed(seed + b)
        )
        noise_of[b] = noise
        truth[b] = decode(pipe, bucket.latents, sampling.decode_batch_size)
        recon[b] = generate(pipe, bucket, range(len(bucket)), noise, sampling, precision)
        figures = metrics.compare(recon[b], truth[b])
        for i, key in enumerate(bucket.keys):
            per_image.append({"key": key, **{k: (v[i] if v is not None else None) for k, v in figures.items()}})
            _save(recon[b][i], out_dir / "reconstruction" / f"{key}.png")
    results["reconstruction"] = _reconstruction_summary(per_image, recon, truth)
    _reconstruction_sheet(buckets, recon, truth, out_dir / "reconstruction" / "sheet.png")

    main = max(range(len(buckets)), key=lambda b: len(buckets[b]))  # swap and edits: the largest bucket
    results["dino_swap"] = _dino_swap(
        pipe, buckets[main], recon[main], truth[main], noise_of[main], metrics, sampling, precision, out_dir
    )
    results["text_manip"] = _text_manip(
        pipe, buckets[main], recon[main], truth[main], noise_of[main], metrics, sampling, precision, out_dir
    )
    results["model_probes"] = _model_probes(
        pipe, buckets[main], recon[main], noise_of[main], metrics, sampling, precision
    )
    modes = _mode_probes(pipe, buckets[main], noise_of[main], precision)
    modes["samples_drawn"] = _mode_samples(
        pipe, buckets[main], truth[main], noise_of[main], precision, sampling.num_inference_steps, out_dir
    )
    results["model_probes"]["modes"] = modes
    return results


PROBE_SIGMAS = (0.25, 0.5, 0.75)
PROBE_SAMPLES = 8  # per probe, from the largest bucket
GUIDANCE_SAMPLES = 4  # unguided samples drawn to compare with the guided ones
UNGUIDED = guidance_weights("nested", 1.0, 1.0)  # the both-conditions branch alone


def _model_probes(pipe, bucket, recon, noise, metrics, sampling, precision) -> dict:
    """The null-condition and noise-level probes (module docstring): relative differences
    ||a − b|| / ||a|| of predictions, averaged over samples and σ, and the distance of guided to
    unguided samples."""
    model, device = pipe.transformer, pipe.device
    rows = list(range(min(PROBE_SAMPLES, len(bucket))))
    x0, eps = bucket.latents[rows].float().to(device), noise[rows].float().to(device)
    cond = {
        "encoder_hidden_states": bucket.text_embeds[rows].to(device),
        "encoder_attention_mask": bucket.text_mask[rows].to(device),
        "image_embeds": bucket.image_embeds[rows].to(device),
    }
    dropped = torch.ones(len(rows), dtype=torch.bool, device=device)

    def velocity(x_t, sigma, **extra):
        t = torch.full((len(rows),), sigma * TIMESTEP_SCALE, device=device)
        return model(x_t, t, **cond, **extra).sample.float()

    def relative(a, b):  # (B,) per sample
        return (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp(min=1e-8)

    with torch.inference_mode(), phase("sampling"), _autocast(pipe, precision):
        null_gap = []
        for sigma in PROBE_SIGMAS:
            x_t = add_noise(x0, eps, torch.full((len(rows),), sigma, device=device))
            v = velocity(x_t, sigma)
            null_gap.append(relative(v, velocity(x_t, sigma, drop_text=dropped, drop_image=dropped)))
        x_t = add_noise(x0, eps, torch.full((len(rows),), 0.5, device=device))
        sigma_gap = relative(velocity(x_t, 0.25), velocity(x_t, 0.75))
    guided_vs_unguided = None
    guided = guidance_weights(sampling.guidance_mode, sampling.guidance_scale, sampling.image_guidance_scale)
    if guided != UNGUIDED:  # (sampling that is the conditional branch alone has nothing to compare)
        g = rows[:GUIDANCE_SAMPLES]
        plain = replace(sampling, guidance_scale=1.0, image_guidance_scale=1.0, guidance_mode="nested")
        guided_vs_unguided = (
            metrics.distance(recon[g], generate(pipe, bucket, g, noise, plain, precision)).mean().item()
        )
    return {
        "samples": len(rows),
        "sigmas": list(PROBE_SIGMAS),
        "null_vs_conditional": torch.cat(null_gap).mean().item(),
        "guided_vs_unguided": guided_vs_unguided,
        "sigma_0.25_vs_0.75": sigma_gap.mean().item(),
    }


# The noise levels the mode probe may use; it keeps those where the modes' ideals differ (`mode_sigmas`).
MODE_SIGMA_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
MODE_SAMPLES = 16  # per mode, from the largest bucket
MODE_GUIDANCE = {"text": (1.0, 0.0), "image": (0.0, 1.0), "none": (0.0, 0.0)}  # independent form: one branch


def ideal_x0(x_t: torch.Tensor, sigma: float, candidates: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The best possible x0 prediction for each row of `x_t` `(B, C, H, W)`: the mean of the
    training targets `candidates` `(N, C, H, W)` that the row's mode allows (`allowed` `(B, N)`
    bool), weighted by how likely each is to have produced x_σ = (1 − σ)·x0 + σ·ε. For training
    data drawn uniformly from the set, this is exactly what the flow-matching loss of that mode is
    minimised by (its x0 = x_σ − σ·v)."""
    weights = _posterior(x_t, sigma, candidates, allowed)  # (B, N)
    return (weights @ candidates.flatten(1).double()).float().view_as(x_t)


def mode_sigmas(x0: torch.Tensor, eps: torch.Tensor, candidates: torch.Tensor) -> list[float]:
    """The σ of `MODE_SIGMA_GRID` at which the modes' ideals differ: where x_σ leaves the null
    mode's ideal spread over at least 2 samples (below, x_σ alone gives its x0 away and every mode's
    ideal is the same) and at most half the set (above, x_σ says next to nothing of its sample).
    Where no σ of the grid does, the one whose spread is nearest that range."""
    every = torch.ones(len(x0), len(candidates), dtype=torch.bool, device=x0.device)
    spread = {}
    for sigma in MODE_SIGMA_GRID:
        x_t = add_noise(x0, eps, torch.full((len(x0),), sigma, device=x0.device))
        weights = _posterior(x_t, sigma, candidates, every)
        spread[sigma] = (1 / weights.pow(2).sum(1)).mean().item()  # effective number of samples
    low, high = 2.0, max(len(candidates) / 2, 2.0)
    kept = [s for s, n in spread.items() if low <= n <= high]
    return kept or [min(spread, key=lambda s: min(abs(spread[s] - low), abs(spread[s] - high)))]


def _posterior(x_t: torch.Tensor, sigma: float, candidates: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`(B, N)`: how likely each allowed candidate x0 is to have produced each row's x_σ."""
    scaled = (1 - sigma) * candidates.flatten(1)  # (N, D)
    exact = "donot_use_mm_for_euclid_dist"  # (the matrix-product shortcut loses the small distances)
    logits = -torch.cdist(x_t.flatten(1).double(), scaled.double(), compute_mode=exact).pow(2) / (2 * sigma**2)
    return torch.softmax(logits.masked_fill(~allowed, -torch.inf), dim=1)


def _mode_probes(pipe, bucket, noise, precision) -> dict:
    """Each CFG mode the dropout trains, measured as learned (the module docstring's third probe).

    Predictions: at the σ where the modes differ (`mode_sigmas`), each mode's x0 prediction against that mode's ideal one
    (`ideal_x0`: the caption alone allows every sample with the same caption, the image alone every
    sample with the same embedding, nothing allows all). The figure is the distance to the mode's
    own ideal over the distance from that ideal to what a model that never learned the mode would
    give: for a conditioned mode, the ideal with nothing known (its conditions unused); for the
    null mode, the fully conditioned one (its drop masks unused). 0 is the ideal; 1 is no better
    than that model; below 0.5, the mode lands nearer its own ideal than half-way.

    The samples the modes draw are measured by `_mode_samples`.
    """
    model, device = pipe.transformer, pipe.device
    rows = list(range(min(MODE_SAMPLES, len(bucket))))
    x0_all = bucket.latents.float().to(device)  # (N, C, h, w): every candidate
    x0, eps = x0_all[rows], noise[rows].float().to(device)
    same_text = torch.tensor([[bucket.captions[i] == c for c in bucket.captions] for i in rows], device=device)
    embeds = bucket.image_embeds.flatten(1)
    same_image = torch.tensor([[torch.equal(embeds[i], e) for e in embeds] for i in rows], device=device)
    allowed = {
        "both": same_text & same_image,
        "text": same_text,
        "image": same_image,
        "none": torch.ones_like(same_text),
    }
    cond = {
        "encoder_hidden_states": bucket.text_embeds[rows].to(device),
        "encoder_attention_mask": bucket.text_mask[rows].to(device),
        "image_embeds": bucket.image_embeds[rows].to(device),
    }
    sigmas = mode_sigmas(x0, eps, x0_all)
    error = dict.fromkeys(allowed, 0.0)  # squared distance of each mode's prediction to its ideal, pooled
    # what a model that never learned the mode predicts: for a conditioned mode the ideal knowing
    # nothing (its condition unused); for the null mode the fully conditioned one (its masks unused)
    reference = {mode: "both" if mode == "none" else "none" for mode in allowed}
    gap = dict.fromkeys(allowed, 0.0)  # squared distance of each mode's ideal to its reference's, pooled
    with torch.inference_mode(), phase("sampling"), _autocast(pipe, precision):
        for sigma in sigmas:
            x_t = add_noise(x0, eps, torch.full((len(rows),), sigma, device=device))
            t = torch.full((len(rows),), sigma * TIMESTEP_SCALE, device=device)
            ideal = {m: ideal_x0(x_t, sigma, x0_all, allowed[m]) for m in allowed}
            for mode, (drop_text, drop_image) in BRANCHES.items():
                masks = {
                    "drop_text": torch.full((len(rows),), drop_text, device=device),
                    "drop_image": torch.full((len(rows),), drop_image, device=device),
                }
                v = model(x_t, t, **cond, **masks).sample.float()
                error[mode] += (x_t - sigma * v - ideal[mode]).pow(2).sum().item()
                gap[mode] += (ideal[reference[mode]] - ideal[mode]).pow(2).sum().item()
    predictions = {
        mode: {
            "relative_error": (error[mode] / gap[mode]) ** 0.5 if gap[mode] > 0 else None,
            "against": reference[mode],
        }
        for mode in allowed
    }
    return {"samples": len(rows), "sigmas": sigmas, "predictions": predictions}


def _mode_samples(pipe, bucket, truth, noise, precision, num_inference_steps: int, out_dir: Path) -> dict | None:
    """Unguided samples of the text-only and image-only modes, measured on the ground-truth
    layouts (`measure_mode_samples`; None where the set records none) and drawn in
    `out_dir`/modes/sheet.png: the training images, then each mode's samples, from the same noise."""
    rows = list(range(min(MODE_SAMPLES, len(bucket))))
    layouts = [_layout_of(bucket, i) for i in range(len(bucket))]
    if len(rows) < 2 or any(layout is None for layout in layouts):
        return None
    drawn = {}
    for mode in ("text", "image"):
        text_scale, image_scale = MODE_GUIDANCE[mode]
        sampling = SamplingConfig(num_inference_steps, text_scale, image_scale, "independent", batch_size=len(rows))
        drawn[mode] = generate(pipe, bucket, rows, noise, sampling, precision)
    figures, went = measure_mode_samples(drawn["text"], drawn["image"], truth, layouts)
    cells = [truth[i] for i in rows] + list(drawn["text"]) + list(drawn["image"])
    captions = [f"{bucket.keys[i]}: {bucket.captions[i]}" for i in rows]
    captions += [f"text only: shapes {t:.2f}" for t in went["text"].tolist()]
    captions += [
        f"image only: scene {s:.2f}, shapes {t:.2f}"
        for s, t in zip(went["image"].tolist(), went["image_shapes"].tolist())
    ]
    (out_dir / "modes").mkdir(parents=True, exist_ok=True)
    _sheet(cells, captions, out_dir / "modes" / "sheet.png", columns=len(rows), cell=96)
    return figures


def measure_mode_samples(
    text_only: torch.Tensor, image_only: torch.Tensor, truth: torch.Tensor, layouts: list[Layout]
) -> tuple[dict, dict]:
    """How far the text-only and image-only samples of the set's first rows (`(K, 3, H, W)` in
    [0, 1], from the same noise) drew what their mode was given; `truth` `(N, 3, H, W)` and
    `layouts` are the whole set's. Three measures; a sample counts at `ground_truth.HALF_WAY`:

    - `text`, the captioned shapes: from the bare scene toward the original
      (`ground_truth.toward`), read on the shapes (the scene is not the caption's to tell);
    - `image`, its own scene: from the same shapes on another scene toward the original, read on
      the scene;
    - `image_shapes`, shapes on that scene: the pixels that stand off the bare own scene as a shape
      of the set does, wherever they are, over the area of the set's smallest shape
      (`ground_truth.faintest_shape`: 0 is the bare scene, 1 that smallest shape). The embedding
      is of the whole picture and every training image has a shape: a mode that learned it draws
      some (not always the image's own), while one never learned (composed from the
      both-conditions and null modes) leaves the scene bare.

    Returns the figures (per measure, its values and the share counted) and the per-sample values
    (NaN where there is nothing to measure)."""
    rows = list(range(len(text_only)))
    side, own = truth.shape[-1], [layouts[k] for k in rows]
    bare = torch.stack([ground_truth.scene_alone(layout, side) for layout in own])
    others = [own[(k + 1) % len(own)].scene for k in rows]
    elsewhere = _drawn([Layout(layout.objects, scene) for layout, scene in zip(own, others)], side)
    contrast, smallest = ground_truth.faintest_shape(layouts, side)
    went = {
        "text": ground_truth.toward(text_only, bare, truth[rows]),
        "image": ground_truth.toward(image_only, elsewhere, truth[rows]),
        "image_shapes": ground_truth.shape_pixels(image_only, bare, contrast).float() / smallest,
    }
    figures = {}
    for name, values in went.items():
        known = values[~values.isnan()]
        figures[name] = {
            "values": known.tolist(),
            "share_drawn": (known >= ground_truth.HALF_WAY).float().mean().item() if len(known) else None,
        }
    figures["image_shapes"].update(contrast=contrast, smallest_shape_pixels=smallest)
    return figures, went


def _reconstruction_summary(per_image: list[dict], recon: dict, truth: dict) -> dict:
    """Means over every image of every bucket (buckets differ in size: pixels are pooled flat)."""
    outputs = torch.cat([t.flatten() for t in recon.values()])
    data = torch.cat([t.flatten() for t in truth.values()])
    mean = lambda k: None if per_image[0][k] is None else sum(p[k] for p in per_image) / len(per_image)  # noqa: E731
    return {
        "mean_stlpips": mean("stlpips"),
        "mean_lpips": mean("lpips"),
        "mean_psnr": mean("psnr"),
        "mean_ssim": mean("ssim"),
        "mse": torch.cat([ImageMetrics.mse(recon[b], truth[b]) for b in recon]).mean().item(),
        "data_variance": data.var().item(),  # the error of the best single constant
        "output_mean": outputs.mean().item(),
        "output_std": outputs.std().item(),
        "data_mean": data.mean().item(),
        "data_std": data.std().item(),
        "per_image": per_image,
    }


def _layout_of(bucket: CachedBucket, i: int) -> Layout | None:
    """Sample `i`'s ground-truth layout (the synthetic set records one), else None."""
    meta = bucket.meta[i] or {}
    return Layout.from_json(meta) if "objects" in meta and "scene" in meta else None


def _drawn(layouts: list[Layout], side: int) -> torch.Tensor:
    return torch.stack([ground_truth.drawn(layout, side) for layout in layouts])


def _dino_swap(pipe, bucket, recon, truth, noise, metrics, sampling, precision, out_dir) -> dict:
    pairs = swap_pairs(bucket, sampling.num_pairs)
    if not pairs:
        return {"skipped": "fewer than two samples"}
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    swapped = generate(pipe, bucket, a, noise, sampling, precision, image_rows=b)  # A's caption and noise, B's DINOv3
    to_a, to_b = metrics.distance(swapped, truth[a]), metrics.distance(swapped, truth[b])
    sensitivity = metrics.distance(swapped, recon[a])
    layouts = [(_layout_of(bucket, i), _layout_of(bucket, j)) for i, j in pairs]
    measured = all(la is not None and lb is not None for la, lb in layouts)
    if measured:  # what the swap should draw: A's shapes on B's scene
        side = truth.shape[-1]
        expected = _drawn([ground_truth.swapped(la, lb) for la, lb in layouts], side)
        # from the model's own picture of A (its caption and embedding, the same noise) to B's scene:
        # a model deaf to the embedding reads exactly 0, whatever its picture of A looks like
        scene_taken = ground_truth.toward(swapped, recon[a], expected)
        bare = torch.stack([ground_truth.scene_alone(lb, side) for _, lb in layouts])
        shapes_kept = ground_truth.toward(swapped, bare, expected)  # B's bare scene -> A's shapes on it
    records, cells, captions = [], [], []
    for n, (i, j) in enumerate(pairs):
        record = {
            "a": bucket.keys[i],
            "b": bucket.keys[j],
            "distance_to_a": to_a[n].item(),
            "distance_to_b": to_b[n].item(),
            "closer_to_b": bool(to_b[n] < to_a[n]),
            "sensitivity": sensitivity[n].item(),
        }
        _save(swapped[n], out_dir / "dino_swap" / f"pair{n}_{bucket.keys[i]}_{bucket.keys[j]}.png")
        cells += [truth[i], truth[j], recon[i], swapped[n]]
        captions += [
            f"A: {bucket.captions[i]}",
            f"B: {bucket.captions[j]}",
            "A's caption + A's DINO",
            "A's caption + B's DINO",
        ]
        if measured:
            record.update(scene_taken=scene_taken[n].item(), shapes_kept=shapes_kept[n].item())
            record["transferred"] = bool(
                scene_taken[n] >= ground_truth.HALF_WAY and shapes_kept[n] >= ground_truth.HALF_WAY
            )
            cells.append(expected[n])
            captions.append(
                f"target: A's shapes on B's scene (scene {scene_taken[n]:.2f}, shapes {shapes_kept[n]:.2f})"
            )
        records.append(record)
    _sheet(cells, captions, out_dir / "dino_swap" / "sheet.png", columns=5 if measured else 4)
    summary = {
        "pairs": records,
        "share_closer_to_b": sum(r["closer_to_b"] for r in records) / len(records),
        "mean_sensitivity": sensitivity.mean().item(),
        "share_transferred": None,
    }
    if measured:
        summary.update(
            share_transferred=sum(r["transferred"] for r in records) / len(records),
            mean_scene_taken=scene_taken.mean().item(),
            mean_shapes_kept=shapes_kept.mean().item(),
        )
    return summary


def _text_manip(pipe, bucket, recon, truth, noise, metrics, sampling, precision, out_dir) -> dict:
    edits = caption_edits(bucket, sampling.num_edits)
    if not edits:
        return {"skipped": "no caption has a word the edit rules change"}
    if pipe.text_encoder is None or pipe.tokenizer is None:
        return {"skipped": "the pipeline has no text encoder to encode the edited captions"}
    rows = [e.index for e in edits]
    embeds, mask = pipe.encode_prompt([e.edited for e in edits])
    edited = generate(pipe, bucket, rows, noise, sampling, precision, text=(embeds.cpu(), mask.cpu()))
    sensitivity = metrics.distance(edited, recon[rows])
    records, cells, captions = [], [], []
    for n, e in enumerate(edits):
        record = {"key": bucket.keys[e.index], "kind": e.kind, "caption": e.caption, "edited": e.edited}
        record["sensitivity"] = sensitivity[n].item()
        cells += [truth[e.index], recon[e.index], edited[n]]
        captions += [f"original: {e.caption}", "generated from the original caption", f"edited: {e.edited}"]
        if e.target is not None:
            target = (images_to_tensor([e.target])[0] + 1) / 2  # (3, H, W) in [0, 1]
            # Toward the edited picture, read where the two pictures differ: the object found where
            # the edit put it (and gone from where it was), in its edited colour and kind.
            # from the model's own picture of the original caption (the same noise): a model deaf to
            # the text reads exactly 0, even where its pictures are a blur half-way between the two
            went = ground_truth.toward(edited[n : n + 1], recon[e.index : e.index + 1], target[None]).item()
            record.update(toward_edit=went, followed=went >= ground_truth.HALF_WAY)
            cells.append(target)
            captions.append(f"the edited layout, drawn (reached {went:.2f})")
        records.append(record)
        _save(edited[n], out_dir / "text_manip" / f"edit{n}_{bucket.keys[e.index]}.png")
    _sheet(cells, captions, out_dir / "text_manip" / "sheet.png", columns=4 if edits[0].target is not None else 3)
    followed = [r for r in records if "followed" in r]
    return {
        "edits": records,
        "mean_sensitivity": sensitivity.mean().item(),
        "share_followed": sum(r["followed"] for r in followed) / len(followed) if followed else None,
        "mean_toward_edit": sum(r["toward_edit"] for r in followed) / len(followed) if followed else None,
    }


# --------------------------------------------------------------------------------------------
# Images: PNGs and contact sheets, written by a background thread
# --------------------------------------------------------------------------------------------
class ImageWriter:
    """Writes the validation's PNGs and contact sheets on one background thread, so that neither
    the validation's sampling nor the training steps after it wait on PNG compression. `wait()`
    before reading an image back (the model card's sheet) and before the next validation; it
    raises what a write raised."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="validation-images")
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


_WRITER: contextvars.ContextVar[ImageWriter | None] = contextvars.ContextVar("image_writer", default=None)


def _write(fn, *args) -> None:
    """`fn(*args)` on the active `ImageWriter`'s thread (see `run_validation`), or here and now."""
    writer = _WRITER.get()
    if writer is None:
        with phase("writing"):
            fn(*args)
    else:
        writer.submit(fn, *args)


def _to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _save(t: torch.Tensor, path: Path) -> None:
    _write(lambda: _to_pil(t).save(path))


def _sheet(cells: list[torch.Tensor], captions: list[str], path: Path, columns: int = 4, cell: int = 160) -> None:
    _write(lambda: contact_sheet([_to_pil(c) for c in cells], captions, columns=columns, cell=cell).save(path))


def _reconstruction_sheet(buckets, recon, truth, path: Path, limit: int = 50) -> None:
    """Ground truth | generated, side by side, for up to `limit` images."""
    cells, captions = [], []
    for b, bucket in enumerate(buckets):
        for i in range(len(bucket)):
            if len(cells) >= 2 * limit:
                break
            cells += [truth[b][i], recon[b][i]]
            captions += [bucket.captions[i], "generated"]
    _write(lambda: contact_sheet([_to_pil(c) for c in cells], captions, columns=10, cell=96).save(path))


# --------------------------------------------------------------------------------------------
# During training: the Validator. Standalone: `nano-dit validate --checkpoint PATH`
# --------------------------------------------------------------------------------------------
class Validator:
    """The three tests on a run's EMA weights (main process; the others wait), then RESULTS.md.

    The validation pipeline (its own transformer, the encoders the run used, LPIPS) is built at the
    first validation and kept; at the end it holds the final EMA weights and is what ships.
    """

    def __init__(self, config: TrainConfig, buckets, scheme: str, stand_in: bool, accelerator, ema, log_path, timings):
        self.config, self.buckets, self.scheme, self.stand_in = config, buckets, scheme, stand_in
        self.accelerator, self.ema, self.log_path, self.timings = accelerator, ema, log_path, timings
        self.pipe, self.metrics, self.last, self.folder = None, None, {}, None
        self.writer = ImageWriter()  # the images of one validation are written while training goes on

    def __call__(self, step: int) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # training's random numbers stay as they were
                self._validate(step)
        accelerator.wait_for_everyone()

    def _validate(self, step: int) -> None:
        config, start = self.config, time.perf_counter()
        self.writer.wait()  # the last validation's images (usually long written)
        pipe = self.pipeline()  # the EMA weights of this step
        if self.metrics is None:  # the first validation loads the encoders and the metrics' networks
            pipe.to(self.accelerator.device)
            self.metrics = ImageMetrics(self.accelerator.device, config.lpips_backbone)
            compile_for_sampling(pipe, config.compile_backend if config.compile else None)
        setup = time.perf_counter() - start
        self.folder = Path(config.output_dir) / "validation" / f"step{step:07d}"
        info = {"checkpoint": f"EMA weights at step {step}", "cfg_dropout_scheme": self.scheme}
        results = run_validation(
            pipe, self.buckets, self.folder, self.metrics, config.sampling, step, info,
            seed=config.seed, mixed_precision=config.mixed_precision, writer=self.writer,
        )  # fmt: skip
        self.timings.note_validation(
            step, time.perf_counter() - start, {"setup": round(setup, 3), **results["timings"]["phases"]}
        )
        self.timings.save()
        summary = self.report()
        self.last = {**results, **summary}
        self.accelerator.log(card_figures(self.last), step=step)
        reasons = "; ".join(summary["reasons"][:3])
        self.accelerator.print(
            f"validation at step {step}: {summary['verdict']}{' — ' + reasons if reasons else ''} "
            f"(see {Path(config.output_dir) / 'RESULTS.md'})"
        )

    def pipeline(self):
        """The shipped pipeline: the run's encoders and a transformer holding the EMA weights
        (the one validation sampled with, when a validation ran)."""
        if self.pipe is None:
            self.pipe = build_pipeline(NanoDiTTransformer2DModel(**self.config.model), self.config.encoder_spec())
        self.ema.copy_to(self.pipe.transformer.parameters())
        return self.pipe

    def report(self, stopped: bool = False) -> dict:
        """RESULTS.md from the newest validation and the training log; `stopped`: the run stopped itself."""
        config = self.config
        return write_report(
            config.output_dir,
            config.thresholds(),
            config.warmup_steps,
            scheme=self.scheme,
            log_path=self.log_path,
            stand_in=self.stand_in,
            stopped=stopped,
        )

    def figures(self) -> tuple[dict, Image.Image | None]:
        """The last validation's headline figures and reconstruction sheet, for the model card; a run
        resumed with no step left has the ones recorded beside its last checkpoint."""
        self.writer.wait()
        sheet = self.folder / "reconstruction" / "sheet.png" if self.folder else None
        figures, sheet = card_figures(self.last), Image.open(sheet) if sheet and sheet.exists() else None
        last = Path(self.config.checkpoints) / checkpoint_name(self.config.total_steps)
        if not figures and last.exists():
            figures, sheet = recorded_figures(last, self.config.total_steps, self.config.output_dir)
        return figures, sheet


def validate_checkpoint(
    checkpoint: str | Path,
    cache: str | None = None,
    output_dir: str | None = None,
    device: str | None = None,
    lpips_backbone: str = "pretrained",
    overrides: dict | None = None,
) -> dict:
    """Validate a training checkpoint (its EMA weights) or a pipeline folder made by a run; write
    `<run>/validation/stepNNNNNNN/` and `<run>/RESULTS.md`. Returns the verdict summary.

    `overrides`: sampling settings (`SamplingConfig` fields) and `compile` / `mixed_precision`,
    in place of the run's."""
    checkpoint = Path(checkpoint)
    pipe = load_pipeline(checkpoint)
    info = card_info(pipe)
    if info is None:
        raise ValueError(f"{checkpoint} carries no run information (its model card has no nano_dit metadata)")
    scheme = info.get("cfg_dropout_scheme", "")
    if not scheme.startswith("exclusive"):
        raise ValueError(
            f"{checkpoint} was trained with CFG-dropout scheme {scheme!r}, not the mutually exclusive one: "
            "its conditioning modes are mixed up, so dual-CFG validation of it means nothing "
            "(the validation plan's fix: such checkpoints are invalid; retrain)"
        )
    config = TrainConfig.from_saved(info["config"], model=info["model"])
    overrides = dict(overrides or {})
    run_level = {k: overrides.pop(k) for k in ("compile", "mixed_precision") if k in overrides}
    config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, **overrides), **run_level)
    config.sampling.check()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.to(device)
    compile_for_sampling(pipe, config.compile_backend if config.compile else None)
    _, buckets = load_cache(cache or config.cache)
    run_dir = Path(output_dir) if output_dir else run_dir_of(checkpoint)
    writer = ImageWriter()  # the report below reads no image: it is written while that goes on
    step = info["step"]
    run_validation(
        pipe,
        buckets,
        run_dir / "validation" / f"step{step:07d}",
        ImageMetrics(device, lpips_backbone),
        config.sampling,
        step,
        {"checkpoint": str(checkpoint), "cfg_dropout_scheme": scheme},
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        writer=writer,
    )
    summary = write_report(
        run_dir,
        config.thresholds(),
        config.warmup_steps,
        scheme=scheme,
        log_path=checkpoint.parent / "training_log.jsonl",
        stand_in=info["encoders"]["stand_in"],
    )
    writer.wait()
    return {**summary, "report": str(run_dir / "RESULTS.md")}
