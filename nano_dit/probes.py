"""The model probes: parts of the design measured on the model itself, beside the three tests.

A few forwards of the transformer on cached features (no indicator reads the config):

- *null conditions learned, guidance live* (`model_probes`): for the same x_σ, σ and
  conditions, the prediction with both conditions dropped against the conditional one, and guided
  samples against unguided ones (scales (1, 1): the conditional branch alone) from the same
  noise. A model whose CFG drop masks are ignored gives identical predictions, and guidance then
  changes nothing.
- *uses the noise level* (`model_probes`): the prediction for one x_σ, told σ = 0.25 and then
  σ = 0.75. A model blind to the timestep gives the same prediction.
- *each CFG mode learned* (`mode_probes`, `mode_samples`): every mode's x0 prediction against the
  best one possible for what that mode is given (the exact posterior mean over the cached set),
  relative to what a model that never learned the mode would give; and, with ground-truth
  layouts, the text-only samples showing the captioned shapes, and the image-only samples the
  image's scene with shapes on it, as its training images have (a mode never learned draws the
  bare scene).
"""

from __future__ import annotations

import torch

from . import ground_truth
from .data import conditioning
from .feature_cache import CachedBucket
from .flow_matching import TIMESTEP_SCALE, add_noise
from .metrics import ImageMetrics
from .pipelines import guidance_weights
from .pipelines.pipeline_nano_dit import BRANCHES
from .sampling import Sampler
from .sheets import Sheet
from .synthetic import Layout

PROBE_SIGMAS = (0.25, 0.5, 0.75)
PROBE_SAMPLES = 8  # per probe, from the largest bucket
GUIDANCE_SAMPLES = 4  # unguided samples drawn to compare with the guided ones
UNGUIDED = guidance_weights("nested", 1.0, 1.0)  # the both-conditions branch alone


def model_probes(
    sampler: Sampler, metrics: ImageMetrics, bucket: CachedBucket, noise: torch.Tensor, recon: torch.Tensor
) -> dict:
    """The null-condition and noise-level probes (module docstring) on `bucket`, from each sample's
    `noise`, its guided samples `recon` beside: relative differences ||a − b|| / ||a|| of
    predictions, averaged over samples and σ, and the distance of guided to unguided samples."""
    model, device = sampler.pipe.transformer, sampler.pipe.device
    rows = list(range(min(PROBE_SAMPLES, len(bucket))))
    x0, eps = bucket.latents[rows].float().to(device), noise[rows].float().to(device)
    cond = _conditioning(bucket, rows, device, model)
    dropped = torch.ones(len(rows), dtype=torch.bool, device=device)

    def velocity(x_t, sigma, **extra):
        t = torch.full((len(rows),), sigma * TIMESTEP_SCALE, device=device)
        return model(x_t, t, **cond, **extra).sample.float()

    def relative(a, b):  # (B,) per sample
        return (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp(min=1e-8)

    with torch.inference_mode(), sampler.timer.phase("sampling"), sampler.autocast():
        null_gap = []
        for sigma in PROBE_SIGMAS:
            x_t = add_noise(x0, eps, torch.full((len(rows),), sigma, device=device))
            v = velocity(x_t, sigma)
            null_gap.append(relative(v, velocity(x_t, sigma, drop_text=dropped, drop_image=dropped)))
        x_t = add_noise(x0, eps, torch.full((len(rows),), 0.5, device=device))
        sigma_gap = relative(velocity(x_t, 0.25), velocity(x_t, 0.75))
    guided_vs_unguided, s = None, sampler.sampling
    if guidance_weights(s.guidance_mode, s.guidance_scale, s.image_guidance_scale) != UNGUIDED:
        # (sampling that is the conditional branch alone has nothing to compare)
        g = rows[:GUIDANCE_SAMPLES]
        plain = sampler.with_settings(guidance_scale=1.0, image_guidance_scale=1.0, guidance_mode="nested")
        unguided = plain.generate(bucket, g, noise)
        with sampler.timer.phase("metrics"):
            guided_vs_unguided = metrics.distance(recon[g], unguided).mean().item()
    return {
        "samples": len(rows),
        "sigmas": list(PROBE_SIGMAS),
        "null_vs_conditional": torch.cat(null_gap).mean().item(),
        "guided_vs_unguided": guided_vs_unguided,
        "sigma_0.25_vs_0.75": sigma_gap.mean().item(),
    }


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


def mode_probes(sampler: Sampler, bucket: CachedBucket, noise: torch.Tensor) -> dict:
    """Each CFG mode the dropout trains, measured as learned (the module docstring's third probe).

    Predictions: at the σ where the modes differ (`mode_sigmas`), each mode's x0 prediction against that mode's ideal one
    (`ideal_x0`: the caption alone allows every sample with the same caption, the image alone every
    sample with the same embedding, nothing allows all). The figure is the distance to the mode's
    own ideal over the distance from that ideal to what a model that never learned the mode would
    give: for a conditioned mode, the ideal with nothing known (its conditions unused); for the
    null mode, the fully conditioned one (its drop masks unused). 0 is the ideal; 1 is no better
    than that model; below 0.5, the mode lands nearer its own ideal than half-way.

    The samples the modes draw are measured by `mode_samples`.
    """
    model, device = sampler.pipe.transformer, sampler.pipe.device
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
    cond = _conditioning(bucket, rows, device, model)
    sigmas = mode_sigmas(x0, eps, x0_all)
    error = dict.fromkeys(allowed, 0.0)  # squared distance of each mode's prediction to its ideal, pooled
    # what a model that never learned the mode predicts: for a conditioned mode the ideal knowing
    # nothing (its condition unused); for the null mode the fully conditioned one (its masks unused)
    reference = {mode: "both" if mode == "none" else "none" for mode in allowed}
    gap = dict.fromkeys(allowed, 0.0)  # squared distance of each mode's ideal to its reference's, pooled
    with torch.inference_mode(), sampler.timer.phase("sampling"), sampler.autocast():
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


def mode_samples(
    sampler: Sampler, bucket: CachedBucket, noise: torch.Tensor, truth: torch.Tensor
) -> tuple[dict | None, Sheet | None]:
    """Unguided samples of the text-only and image-only modes from each sample's `noise`, measured
    on the ground-truth layouts (`measure_mode_samples`) and drawn: the training images (`truth`),
    then each mode's samples. (None, None) where the set records no layouts."""
    rows = list(range(min(MODE_SAMPLES, len(bucket))))
    layouts = [ground_truth.layout_of(bucket, i) for i in range(len(bucket))]
    if len(rows) < 2 or any(layout is None for layout in layouts):
        return None, None
    drawn = {}
    for mode in ("text", "image"):
        text_scale, image_scale = MODE_GUIDANCE[mode]
        one_branch = sampler.with_settings(
            guidance_scale=text_scale,
            image_guidance_scale=image_scale,
            guidance_mode="independent",
            validation_batch_size=len(rows),
        )
        drawn[mode] = one_branch.generate(bucket, rows, noise)
    figures, went = measure_mode_samples(drawn["text"], drawn["image"], truth, layouts)
    cells = [truth[i] for i in rows] + list(drawn["text"]) + list(drawn["image"])
    captions = [f"{bucket.keys[i]}: {bucket.captions[i]}" for i in rows]
    captions += [f"text only: shapes {t:.2f}" for t in went["text"].tolist()]
    captions += [
        f"image only: scene {s:.2f}, shapes {t:.2f}"
        for s, t in zip(went["image"].tolist(), went["image_shapes"].tolist())
    ]
    return figures, Sheet(cells, captions, columns=len(rows), cell=96)


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
    elsewhere = ground_truth.drawn_all([Layout(layout.objects, scene) for layout, scene in zip(own, others)], side)
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


def _conditioning(bucket: CachedBucket, rows: list[int], device, model) -> dict:
    """Rows `rows` of the cached conditioning as training passes it (`data.conditioning`), on
    `device`; the DINOv3 patch tokens too when `model` uses them."""
    tokens = getattr(getattr(model, "config", None), "use_image_tokens", False)
    names = ("prompt_embeds", "prompt_attention_mask", "image_embeds") + (("image_tokens",) if tokens else ())
    return conditioning({name: getattr(bucket, name)[rows].to(device) for name in names}, tokens)
