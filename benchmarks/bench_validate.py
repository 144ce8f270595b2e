"""Time of one full validation (the validation plan's three tests, nano_dit.validation.run_validation) at the
nano preset: eager and compiled, cold (first call) and warm.

    python benchmarks/bench_validate.py                       # CPU: 16 images at 128², 10 Euler steps
    python benchmarks/bench_validate.py --device cuda --compile   # GPU: the validation plan's 100 images at 512², 50 steps

Everything has the real shapes and random weights (nothing downloaded): the nano transformer at
the real encoders' widths (benchmarks/shapes.py), the Flux VAE's architecture on CUDA (a tiny
stand-in VAE on the CPU, `--vae` to choose), a 768-wide stand-in T5 for the edited captions, and
LPIPS on a randomly initialised AlexNet (the same work as the real one). The cache holds the
synthetic set's captions and layouts (so the text edits have targets) with random latents and
DINOv3 embeddings. Sampling runs as validation does: batched across images and CFG branches,
under `torch.inference_mode`, bf16 autocast on CUDA. Prints one table: seconds per validation and
their split (sampling holds compilation on a first compiled call; the images are written by a
background thread, as in training, and waited for between calls, outside the timing), and how many
graphs dynamo has compiled so far (regional compilation: the repeated block, once per shape the
tests sample at: the guided batch, the one-branch batch of the probes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from shapes import IMAGE_DIM, LATENT_CHANNELS, TEXT_DIM, build_model, sync
from transformers import AutoTokenizer, T5EncoderModel

from nano_dit import NanoDiTPipeline
from nano_dit.caption_edits import caption_edits
from nano_dit.config import PRESETS, SamplingConfig
from nano_dit.encoders import make_stand_in_encoders
from nano_dit.feature_cache import CachedBucket
from nano_dit.metrics import ImageMetrics
from nano_dit.recorder import ImageWriter
from nano_dit.sampling import Sampler, compile_for_sampling
from nano_dit.sheets import to_pil
from nano_dit.synthetic import synthetic_samples
from nano_dit.timings import PhaseTimer
from nano_dit.validation import swap_pairs, validate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="nano")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="cached images (default: 100 on CUDA, 16 on CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: 512 on CUDA, 128 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: 50 on CUDA, 10 on CPU)")
    parser.add_argument("--vae", choices=("flux", "stand-in"), default=None, help="default: flux on CUDA")
    parser.add_argument(
        "--mixed-precision", choices=("no", "bf16"), default=None, help="autocast (default: bf16 on CUDA)"
    )
    parser.add_argument("--compile", action="store_true", help="also time compiled sampling")
    parser.add_argument("--repeats", type=int, default=2, help="validations per mode (the first is cold)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.images = args.images or (100 if cuda else 16)
    args.resolution = args.resolution or (512 if cuda else 128)
    args.steps = args.steps or (50 if cuda else 10)
    args.vae = args.vae or ("flux" if cuda else "stand-in")
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    return args


def flux_vae() -> AutoencoderKL:
    """The FLUX.1 VAE's architecture (black-forest-labs/FLUX.1-schnell, subfolder vae), random weights."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_pipeline(args, folder: Path, device: torch.device) -> NanoDiTPipeline:
    encoders = make_stand_in_encoders(folder, width=TEXT_DIM, image_size=64, with_vae=args.vae == "stand-in")
    vae = flux_vae() if args.vae == "flux" else AutoencoderKL.from_pretrained(encoders / "vae")
    vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as ConditioningEncoders loads it
    torch.manual_seed(0)
    latent = args.resolution // 8
    pipe = NanoDiTPipeline(
        transformer=build_model(args.preset, latent, randomize=True),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.to(dtype=vae_dtype).eval(),
        text_encoder=T5EncoderModel.from_pretrained(encoders / "t5").eval(),
        tokenizer=AutoTokenizer.from_pretrained(encoders / "t5"),
    )
    return pipe.to(device)


def synthetic_cache(args, pipe: NanoDiTPipeline) -> list[CachedBucket]:
    """The synthetic set's captions and layouts, their T5 features, random latents and DINOv3 embeddings."""
    samples = list(islice(synthetic_samples(args.images, resolution=32, seed=0), args.images))
    captions = [s["caption"] for s in samples]
    embeds, mask = pipe.encode_prompt(captions)
    g = torch.Generator().manual_seed(0)
    latent = args.resolution // 8
    return [
        CachedBucket(
            bucket=(args.resolution, args.resolution),
            keys=[s["key"] for s in samples],
            captions=captions,
            meta=[s["meta"] for s in samples],
            latents=torch.randn(args.images, LATENT_CHANNELS, latent, latent, generator=g),
            prompt_embeds=embeds.float().cpu(),
            prompt_attention_mask=mask.cpu(),
            image_embeds=torch.randn(args.images, IMAGE_DIM, generator=g),
            image_tokens=torch.zeros(args.images, 1, IMAGE_DIM),
        )
    ]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    for library in (diffusers.utils.logging, transformers.utils.logging):  # the table, not loading chatter
        library.set_verbosity_error()
        library.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(args, Path(tmp) / "encoders", device)
        buckets = synthetic_cache(args, pipe)
        metrics = ImageMetrics(device, backbone="random")
        bucket = buckets[0]  # reconstructions, DINO swaps, text edits
        sampled = len(bucket) + len(swap_pairs(bucket)) + len(caption_edits(bucket))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"# one full validation: {args.preset} transformer ({pipe.transformer.num_parameters() / 1e6:.1f}M), "
            f"{args.images} images at {args.resolution}², {args.steps} Euler steps x 3 CFG branches, "
            f"{sampled} images sampled, VAE: {args.vae}; {device} ({name})"
        )
        print(
            "| mode | call | seconds | sampled images/s | sampling | decoding | metrics | writing | graphs compiled |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        sampling, writer = SamplingConfig(num_inference_steps=args.steps), ImageWriter()
        for compiled in (False, True) if args.compile else (False,):
            if compiled:  # as the trainer does at its first validation: the repeated block, once
                compile_for_sampling(pipe, "inductor")
            for repeat in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                timer = PhaseTimer(device)
                validation = validate(Sampler(pipe, sampling, args.mixed_precision, timer), buckets, metrics)
                folder = Path(tmp) / f"run{compiled}{repeat}"
                with timer.phase("writing"):  # the PNGs, here on the clock (training writes them in the background)
                    for path, image in validation.images.items():
                        (folder / path).parent.mkdir(parents=True, exist_ok=True)
                        writer.submit(to_pil(image).save, folder / path)
                    writer.wait()
                sync(device)
                seconds = time.perf_counter() - start
                call = "first (with compilation)" if compiled and repeat == 0 else ("first" if repeat == 0 else "warm")
                mode = "compiled" if compiled else "eager"
                split = [timer.seconds.get(k, 0.0) for k in ("sampling", "decoding", "metrics", "writing")]
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # compiled so far, all shapes
                print(
                    f"| {mode} | {call} | {seconds:.1f} | {sampled / seconds:.1f} | "
                    + " | ".join(f"{x:.1f}" for x in split)
                    + f" | {graphs} |"
                )


if __name__ == "__main__":
    main()
