"""The validation plan's three tests, measured rather than only looked at: `validate` runs them
with a pipeline on the cached features and returns what it found. It writes nothing;
`ValidationRecorder` (`nano_dit.recorder`) writes it:

    validation/step0001000/
      reconstruction/   every image regenerated from its own caption + DINOv3 embedding; sheet.png
      dino_swap/        5 pairs: A's caption with B's DINOv3 embedding;                   sheet.png
      text_manip/       5 rule-based caption edits, the DINOv3 embedding kept;            sheet.png
      modes/            unguided text-only and image-only samples (the mode probe);       sheet.png
      prompts/          your --validation-prompts, sampled as the run samples;           sheet.png
      results.json      every figure below, per image and as means

1. **Reconstruction**: ST-LPIPS, LPIPS, PSNR and SSIM (`nano_dit.metrics`) of each output to its
   ground truth, and the outputs' mean and spread against the data's (a mean-gray or collapsed
   model shows there).
2. **DINO swap**: the distance of each swapped output to B and to A, the share closer to B, and
   the sensitivity (the distance to A's own output). Where the data records its layouts (the
   synthetic set), the swap is measured against the picture it should give, A's shapes on B's
   scene (`nano_dit.ground_truth`): how far the output went from the model's own picture of A
   toward B's scene, and from B's bare scene toward A's shapes; a pair counts when both are at
   least half-way.
3. **Text manipulation** (`nano_dit.caption_edits`): the sensitivity (edited vs unedited output,
   same noise; the validation plan quotes 0.64 LPIPS for a broken run) and, with a ground-truth
   layout, how far the output went from the model's own picture of the original caption toward
   the edited layout, drawn: so the edited object must be found where the edit put it (and be
   gone from where it was); an edit counts when it went at least half-way.

Beside the tests, the model probes (`nano_dit.probes`) measure parts of the design on the model
itself: null conditions learned and guidance live, the noise level used, each CFG mode learned.

All sampling (`nano_dit.sampling`) starts from cached features (no image or caption is encoded
again, except the edited captions), batched across images and CFG branches, from seeded noise
that belongs to each sample, so a figure does not depend on the batch size. In a run of several
processes each does a share (the reconstruction's batches, then the other tests), and each
share is computed as one process alone computes it: the figures are a one-process validation's.
The ground truth is
the cached latents decoded by the VAE (the pixels themselves in pixel mode): the figures measure
the transformer, not the VAE. "Closer to" and the sensitivities are ST-LPIPS distances; the layout
measures are in pixels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from PIL import Image

from . import ground_truth
from .caption_edits import caption_edits
from .encoders import images_to_tensor
from .feature_cache import CachedBucket
from .metrics import ImageMetrics
from .probes import mode_probes, mode_samples, model_probes
from .sampling import Sampler, compiled_for_sampling, decode_chunk
from .sheets import Sheet

TESTS = ("reconstruction", "dino_swap", "text_manip")


@dataclass
class Validation:
    """What one validation found, nothing written yet.

    Attributes:
        results: the figures of results.json (the recorder adds the step and where the weights
            came from).
        images: the pictures to keep, by path in the validation folder (`reconstruction/k.png`),
            each `(3, H, W)` in [0, 1].
        sheets: the contact sheets that show them, by path (`dino_swap/sheet.png`).
        timings: the seconds the validation took, and per phase (sampling, decoding, metrics).
    """

    results: dict
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    sheets: dict[str, Sheet] = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """A prompt of the user's, sampled at every validation; `image`: a reference image (DINOv3)
    to condition on too, `reference` the name it is recorded under."""

    text: str
    image: Image.Image | None = None
    reference: str | None = None


@dataclass(frozen=True)
class Reference:
    """What the swap and the edits compare against, on the largest bucket: each sample's starting
    noise, its ground truth and its reconstruction (from the same noise)."""

    bucket: CachedBucket
    noise: torch.Tensor
    truth: torch.Tensor
    recon: torch.Tensor


@torch.inference_mode()
def validate(
    sampler: Sampler,
    buckets: list[CachedBucket],
    metrics: ImageMetrics,
    seed: int = 0,
    prompts: tuple = (),
    processes=None,
) -> Validation:
    """The three tests and the model probes with `sampler` on the cached `buckets`, then the user's
    `prompts` (`Prompt`s), each from noise of its own.

    `seed` seeds each sample's starting noise (bucket b from `seed + b`). The phases go to
    `sampler.timer`; those of this call are the validation's `timings`.

    `processes`: the `Accelerator` (or Accelerate `PartialState`) of a run of several processes,
    every one of which calls this. The reconstruction's batches (of `--validation-batch-size` images,
    whatever the number of processes), then the swap, the edits, the probes and the prompts, are
    split between them (`split_between_processes`) and gathered in their fixed order, on every
    process: each process returns the whole validation, the figures a one-process one gives. With
    N processes, a batch size of about images / N keeps each of them busy."""
    start, timer = time.perf_counter(), sampler.timer
    before = dict(timer.seconds)
    pipe = sampler.pipe
    if sampler.sampling.decode_batch_size is None:  # recorded in results.json as used
        sampler = sampler.with_settings(decode_batch_size=decode_chunk(pipe))
    pipe.set_progress_bar_config(disable=True)
    out = Validation(
        results={
            "sampling": {
                **asdict(sampler.sampling),
                "seed": seed,
                "mixed_precision": sampler.mixed_precision,
                "compiled": compiled_for_sampling(pipe),
            },
            "stlpips": {"available": True, "weights": "stlpips-pytorch, vST0.0 AlexNet (pretrained)"},
            "lpips": metrics.describe,
            "distance": metrics.distance_name,
            "ground_truth": "cached latents decoded by the VAE" if pipe.vae is not None else "the images (pixel mode)",
        }
    )
    noise_of = {
        b: torch.randn((len(bucket), *bucket.latents.shape[1:]), generator=torch.Generator().manual_seed(seed + b))
        for b, bucket in enumerate(buckets)
    }
    size = sampler.sampling.validation_batch_size
    batches = [
        (b, list(range(s, min(s + size, len(bucket)))))
        for b, bucket in enumerate(buckets)
        for s in range(0, len(bucket), size)
    ]

    def reconstruct(batch: tuple[int, list[int]]) -> tuple:
        b, rows = batch
        truth, recon = sampler.decode(buckets[b].latents[rows]), sampler.generate(buckets[b], rows, noise_of[b])
        with timer.phase("metrics"):
            return truth, recon, metrics.compare(recon, truth)

    done = list(zip(batches, shared(processes, reconstruct, batches), strict=True))
    recon, truth, per_image = {}, {}, []
    for b, bucket in enumerate(buckets):
        parts = [part for (of, _), part in done if of == b]
        truth[b], recon[b] = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        figures = {k: None if parts[0][2][k] is None else [v for p in parts for v in p[2][k]] for k in parts[0][2]}
        for i, key in enumerate(bucket.keys):
            per_image.append({"key": key, **{k: (v[i] if v is not None else None) for k, v in figures.items()}})
            out.images[f"reconstruction/{key}.png"] = recon[b][i]
    out.results["reconstruction"] = _reconstruction_summary(per_image, recon, truth)
    out.sheets["reconstruction/sheet.png"] = _reconstruction_sheet(buckets, recon, truth)

    main = max(range(len(buckets)), key=lambda b: len(buckets[b]))  # swap and edits: the largest bucket
    ref = Reference(buckets[main], noise_of[main], truth[main], recon[main])
    tests = {  # each writes its pictures into the part it is given and returns its figures
        "dino_swap": lambda part: _dino_swap(sampler, metrics, ref, part),
        "text_manip": lambda part: _text_manip(sampler, metrics, ref, part),
        "model_probes": lambda part: model_probes(sampler, metrics, ref.bucket, ref.noise, ref.recon),
        "modes": lambda part: mode_probes(sampler, ref.bucket, ref.noise),
        "samples_drawn": lambda part: _mode_samples(sampler, ref, part),
    }
    if prompts:
        tests["prompts"] = lambda part: _prompts(sampler, prompts, ref.bucket.bucket, seed, part)

    def run(name: str) -> Validation:
        part = Validation(results={})
        part.results[name] = tests[name](part)
        return part

    found = {}
    for part in shared(processes, run, list(tests)):
        found.update(part.results)
        out.images.update(part.images)
        out.sheets.update(part.sheets)
    out.results["dino_swap"], out.results["text_manip"] = found["dino_swap"], found["text_manip"]
    probes = found["model_probes"]
    probes["modes"] = {**found["modes"], "samples_drawn": found["samples_drawn"]}
    out.results["model_probes"] = probes
    if prompts:
        out.results["prompts"] = found["prompts"]
    phases = {name: s - before.get(name, 0.0) for name, s in timer.seconds.items() if s != before.get(name)}
    out.timings = {
        "seconds": round(time.perf_counter() - start, 3),
        "processes": getattr(processes, "num_processes", 1),
        "phases": {name: round(s, 3) for name, s in phases.items()},  # (this process's)
    }
    return out


def shared(processes, work: Callable, items: list) -> list:
    """`work(item)` for each of `items`, the items split between `processes` (an `Accelerator` or
    `PartialState`; None: this process alone) in contiguous runs, and the results gathered in the
    items' order on every process."""
    if processes is None or processes.num_processes == 1:
        return [work(item) for item in items]
    with processes.split_between_processes(list(enumerate(items))) as mine:
        done = [(k, work(item)) for k, item in mine]
    return [result for _, result in sorted(gather_object(done), key=lambda kr: kr[0])]


def _mode_samples(sampler: Sampler, ref: Reference, part: Validation) -> dict | None:
    figures, sheet = mode_samples(sampler, ref.bucket, ref.noise, ref.truth)
    if sheet is not None:
        part.sheets["modes/sheet.png"] = sheet
    return figures


def swap_pairs(bucket: CachedBucket, n: int = 5) -> list[tuple[int, int]]:
    """`n` fixed pairs (A, B) of distinct samples: (0, 1), (2, 3), ..."""
    return [(2 * i, 2 * i + 1) for i in range(min(n, len(bucket) // 2))]


def _dino_swap(sampler: Sampler, metrics: ImageMetrics, ref: Reference, out: Validation) -> dict:
    bucket, recon, truth = ref.bucket, ref.recon, ref.truth
    pairs = swap_pairs(bucket, sampler.sampling.num_pairs)
    if not pairs:
        return {"skipped": "fewer than two samples"}
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    swapped = sampler.generate(bucket, a, ref.noise, image_rows=b)  # A's caption and noise, B's DINOv3
    with sampler.timer.phase("metrics"):
        to_a, to_b = metrics.distance(swapped, truth[a]), metrics.distance(swapped, truth[b])
        sensitivity = metrics.distance(swapped, recon[a])
    layouts = [(ground_truth.layout_of(bucket, i), ground_truth.layout_of(bucket, j)) for i, j in pairs]
    measured = all(la is not None and lb is not None for la, lb in layouts)
    if measured:  # what the swap should draw: A's shapes on B's scene
        side = truth.shape[-1]
        expected = ground_truth.drawn_all([ground_truth.swapped(la, lb) for la, lb in layouts], side)
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
        out.images[f"dino_swap/pair{n}_{bucket.keys[i]}_{bucket.keys[j]}.png"] = swapped[n]
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
    out.sheets["dino_swap/sheet.png"] = Sheet(cells, captions, columns=5 if measured else 4)
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


def _text_manip(sampler: Sampler, metrics: ImageMetrics, ref: Reference, out: Validation) -> dict:
    pipe, bucket, recon, truth = sampler.pipe, ref.bucket, ref.recon, ref.truth
    edits = caption_edits(bucket, sampler.sampling.num_edits)
    if not edits:
        return {"skipped": "no caption has a word the edit rules change"}
    if pipe.text_encoder is None or pipe.tokenizer is None:
        return {"skipped": "the pipeline has no text encoder to encode the edited captions"}
    rows = [e.index for e in edits]
    embeds, mask = pipe.encode_prompt([e.edited for e in edits])
    edited = sampler.generate(bucket, rows, ref.noise, prompt_embeds=(embeds.cpu(), mask.cpu()))
    with sampler.timer.phase("metrics"):
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
        out.images[f"text_manip/edit{n}_{bucket.keys[e.index]}.png"] = edited[n]
    out.sheets["text_manip/sheet.png"] = Sheet(cells, captions, columns=4 if edits[0].target is not None else 3)
    followed = [r for r in records if "followed" in r]
    return {
        "edits": records,
        "mean_sensitivity": sensitivity.mean().item(),
        "share_followed": sum(r["followed"] for r in followed) / len(followed) if followed else None,
        "mean_toward_edit": sum(r["toward_edit"] for r in followed) / len(followed) if followed else None,
    }


def _prompts(sampler: Sampler, prompts, size: tuple[int, int], seed: int, out: Validation) -> list[dict] | dict:
    """Each prompt sampled at the bucket's `size` (W, H) with the run's settings, from noise seeded
    by `seed` and its place in the list; with its reference image, when it has one."""
    pipe, s = sampler.pipe, sampler.sampling
    if pipe.text_encoder is None or pipe.tokenizer is None:
        return {"skipped": "the pipeline has no text encoder to encode the prompts"}
    records, cells, captions = [], [], []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        with sampler.timer.phase("sampling"), sampler.autocast():
            image = pipe(
                prompt=prompt.text,
                image=prompt.image,
                width=size[0],
                height=size[1],
                num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale,
                image_guidance_scale=s.image_guidance_scale,
                guidance_mode=s.guidance_mode,
                generator=generator,
                output_type="pt",
            ).images[0]
        image = image.float().cpu()
        out.images[f"prompts/prompt{i}.png"] = image
        cells.append(image)
        captions.append(prompt.text + (f" (with {Path(prompt.reference).name})" if prompt.reference else ""))
        records.append({"prompt": prompt.text, "reference": prompt.reference, "image": f"prompts/prompt{i}.png"})
    out.sheets["prompts/sheet.png"] = Sheet(cells, captions, columns=min(len(cells), 8))
    return records


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


def _reconstruction_sheet(buckets: list[CachedBucket], recon: dict, truth: dict, limit: int = 50) -> Sheet:
    """Ground truth | generated, side by side, for up to `limit` images."""
    cells, captions = [], []
    for b, bucket in enumerate(buckets):
        for i in range(len(bucket)):
            if len(cells) >= 2 * limit:
                break
            cells += [truth[b][i], recon[b][i]]
            captions += [bucket.captions[i], "generated"]
    return Sheet(cells, captions, columns=10, cell=96)
