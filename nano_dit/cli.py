"""The `nano-dit` command: one entry point, a subcommand per job.

nano-dit data synth --out data/shards/100 --resolution 512
nano-dit data prepare my_images/ --out data/shards/mine --resolution 512
nano-dit encoders make-tiny --out data/encoders/tiny
nano-dit data encode --shards data/shards/100 --cache data/cache/100 --stand-in data/encoders/tiny
nano-dit model-info --preset nano
nano-dit export runs/nano/checkpoints/checkpoint_final --out exported/ [--push-to-hub user/nano-dit]
nano-dit validate --checkpoint runs/nano/checkpoints/checkpoint_step0005000
nano-dit compare runs/adaln runs/tokens   # groups of seeds (train_nano_dit.py --seeds 0,1,2) or run folders
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _synth(args: argparse.Namespace) -> None:
    from nano_dit.shards import write_shards
    from nano_dit.synthetic import synthetic_samples

    first = []  # the set's first twelve, kept for the preview as they are written

    def samples():
        for sample in synthetic_samples(args.num_images, args.resolution, args.seed):
            if args.preview and len(first) < 12:
                first.append(sample)
            yield sample

    counts = write_shards(samples(), args.out, args.samples_per_shard, overwrite=args.overwrite)
    print(f"wrote {sum(counts.values())} synthetic images to {args.out} ({dict(counts)})")
    if args.preview:
        from nano_dit.sheets import contact_sheet

        path = f"{args.out}/preview.png"
        contact_sheet([s["image"] for s in first], [s["caption"] for s in first]).save(path)
        print(f"preview of the first {len(first)}: {path}")


def _prepare(args: argparse.Namespace) -> None:
    from nano_dit.prepare import BucketFit, prepare_shards

    report = prepare_shards(
        args.src,
        args.out,
        BucketFit(args.resolution, args.max_aspect, args.min_side),
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
        hf_dataset=(
            {"split": args.split, "image_column": args.image_column, "text_column": args.text_column}
            if args.hf_dataset
            else None
        ),
    )
    print(report.summary())
    for name, reason in report.skipped:
        print(f"  skipped {name}: {reason}")


def _make_tiny(args: argparse.Namespace) -> None:
    from nano_dit.encoders import make_stand_in_encoders

    out = make_stand_in_encoders(args.out, seed=args.seed, image_size=args.image_size, with_vae=not args.no_vae)
    print(f"wrote STAND-IN encoders (tiny, randomly initialised, not real T5 / DINOv3) to {out}")


def _encode(args: argparse.Namespace) -> None:
    from nano_dit.encoders import EncoderSpec
    from nano_dit.feature_cache import encode_dataset

    if args.stand_in:
        spec = EncoderSpec.stand_in(args.stand_in, pixel_mode=args.pixel_mode)
    else:
        spec = EncoderSpec(
            text_encoder=args.text_encoder,
            image_encoder=args.image_encoder,
            vae=None if args.pixel_mode else args.vae,
            vae_subfolder=args.vae_subfolder,
            revision=args.revision,
            max_sequence_length=args.max_sequence_length,
        )
    report = encode_dataset(args.shards, args.cache, spec, batch_size=args.batch_size, device=args.device)
    print(report.summary())


def _model_info(args: argparse.Namespace) -> None:
    from nano_dit import NanoDiTTransformer2DModel
    from nano_dit.config import PRESETS

    model = NanoDiTTransformer2DModel(**PRESETS[args.preset]["model"])
    print(json.dumps({"preset": args.preset, "parameters": model.num_parameters(), **model.config}, indent=2))


def _export(args: argparse.Namespace) -> None:
    from nano_dit.hub import export

    export(args.checkpoint, args.out, repo_id=args.push_to_hub, private=args.private)
    if args.out:
        print(f"wrote the pipeline of {args.checkpoint} to {args.out}")
    if args.push_to_hub:
        print(f"pushed the pipeline of {args.checkpoint} to https://huggingface.co/{args.push_to_hub}")


def _validate(args: argparse.Namespace) -> None:
    import dataclasses

    from nano_dit.config import SamplingConfig, flag_fields

    sampling = {
        f.name: getattr(args, f.name) for f in flag_fields(SamplingConfig) if getattr(args, f.name) is not None
    }
    dataclasses.replace(SamplingConfig(), **sampling).check()  # refused before anything is loaded
    run_level = {k: getattr(args, k) for k in ("compile", "mixed_precision") if getattr(args, k) is not None}
    summary = validate_checkpoint(
        args.checkpoint,
        cache=args.cache,
        output_dir=args.output_dir,
        device=args.device,
        lpips_backbone=args.lpips_backbone,
        overrides={**sampling, **run_level},
    )
    if summary is None:  # a process of several, other than the main one: it did its share
        return
    print(f"{summary['verdict']}: {summary['report']}")
    for reason in summary["reasons"]:
        print(f"  {reason}")


def validate_checkpoint(
    checkpoint: str | Path,
    cache: str | None = None,
    output_dir: str | None = None,
    device: str | None = None,
    lpips_backbone: str = "pretrained",
    overrides: dict | None = None,
) -> dict | None:
    """Validate a training checkpoint (its EMA weights) or a pipeline folder made by a run; write
    `<run>/validation/stepNNNNNNN/` and `<run>/RESULTS.md`. Returns the verdict summary.

    `overrides`: sampling settings (`SamplingConfig` fields) and `compile` / `mixed_precision`,
    in place of the run's. Under `accelerate launch` with several processes, the validation is
    split between them (`validation.validate`) and the main one writes it; the others return None.
    Unset, `device` is the process's own (Accelerate's `PartialState`)."""
    import dataclasses

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from nano_dit.config import TrainConfig
    from nano_dit.feature_cache import load_cache
    from nano_dit.hub import card_info, load_pipeline, run_dir_of
    from nano_dit.metrics import ImageMetrics
    from nano_dit.recorder import ValidationRecorder
    from nano_dit.report import ReportInputs
    from nano_dit.sampling import Sampler, compile_for_sampling
    from nano_dit.timings import PhaseTimer
    from nano_dit.validation import validate

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
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as `accelerate launch` set it up
    device = torch.device(device) if device else processes.device
    pipe.to(device)
    compile_for_sampling(pipe, config.compile_backend if config.compile else None)
    _, buckets = load_cache(cache or config.cache)
    run_dir = Path(output_dir) if output_dir else run_dir_of(checkpoint)
    log_path = checkpoint.parent / "training_log.jsonl"
    report = ReportInputs.of_run(config, scheme, log_path, stand_in=info["encoders"]["stand_in"])
    sampler = Sampler(pipe, config.sampling, config.mixed_precision, PhaseTimer(device))
    metrics = ImageMetrics(device, lpips_backbone)
    validation = validate(sampler, buckets, metrics, seed=config.seed, processes=processes)
    if not processes.is_main_process:
        return None
    recorder = ValidationRecorder(run_dir, report)
    run = {"checkpoint": str(checkpoint), "cfg_dropout_scheme": scheme, "run_id": info["run_id"]}
    summary = recorder.record(validation, info["step"], run)
    recorder.wait()
    return {**summary, "report": str(run_dir / "RESULTS.md")}


def _compare(args: argparse.Namespace) -> None:
    from nano_dit.compare import write_comparison

    report = write_comparison(args.runs, out=args.out)
    print(f"wrote {report}")


def _number(kind, minimum: float = 0, inclusive: bool = False):
    """An argparse type: a finite number of `kind` above `minimum` (or at it, when `inclusive`),
    refused in one line naming the value."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
        if not (value >= minimum if inclusive else value > minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from nano_dit.config import (
        LPIPS_BACKBONES,
        MIXED_PRECISIONS,
        PRESETS,
        SamplingConfig,
        add_flags,
        flag_fields,
    )
    from nano_dit.encoders import EncoderSpec

    parser = argparse.ArgumentParser(
        prog="nano-dit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make, import and encode datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="write the synthetic shapes set as shards")
    synth.add_argument("--out", required=True, help="shard folder, e.g. data/shards/100")
    synth.add_argument("--resolution", type=_number(int), default=512, help="image side in pixels (default 512)")
    synth.add_argument("--num-images", type=_number(int), default=100, help="how many images (default 100)")
    synth.add_argument(
        "--samples-per-shard", type=_number(int), default=20, help="samples per tar (default 20: 5 shards)"
    )
    synth.add_argument("--seed", type=_seed, default=0, help="layout seed (default 0)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    synth.add_argument("--preview", action="store_true", help="also write preview.png, a contact sheet of 12")
    synth.set_defaults(func=_synth)

    prepare = data.add_parser("prepare", help="shards from a folder of images with captions")
    prepare.add_argument("src", help="folder of images with sidecar .txt captions, or with a metadata.jsonl")
    prepare.add_argument("--out", required=True, help="shard folder to write")
    prepare.add_argument("--resolution", type=_number(int), default=512, help="bucket base resolution (default 512)")
    prepare.add_argument("--samples-per-shard", type=_number(int), default=100, help="samples per tar (default 100)")
    prepare.add_argument("--max-aspect", type=_number(float), default=2.0, help="widest bucket, and the largest crop")
    prepare.add_argument(
        "--min-side", type=_number(int), default=None, help="skip smaller images (default resolution/4)"
    )
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    prepare.add_argument(
        "--hf-dataset", action="store_true", help="SRC is a Hugging Face dataset (save_to_disk folder or Hub name)"
    )
    prepare.add_argument("--split", default="train", help="with --hf-dataset: the split (default train)")
    prepare.add_argument("--image-column", default="image", help="with --hf-dataset: image column (default image)")
    prepare.add_argument("--text-column", default="text", help="with --hf-dataset: caption column (default text)")
    prepare.set_defaults(func=_prepare)

    defaults = EncoderSpec()
    encode = data.add_parser("encode", help="compute the feature cache (latents, T5, DINOv3) once")
    encode.add_argument("--shards", required=True, help="shard folder to encode")
    encode.add_argument("--cache", required=True, help="cache folder (reused across runs)")
    encode.add_argument("--stand-in", default=None, help="folder of stand-in encoders (make-tiny); overrides the ids")
    encode.add_argument("--text-encoder", default=defaults.text_encoder, help="T5 Hub id or folder")
    encode.add_argument("--image-encoder", default=defaults.image_encoder, help="DINOv3 Hub id or folder")
    encode.add_argument("--vae", default=defaults.vae, help="AutoencoderKL Hub id or folder")
    encode.add_argument("--vae-subfolder", default=defaults.vae_subfolder, help="subfolder of --vae (default vae)")
    encode.add_argument("--pixel-mode", action="store_true", help="no VAE: the latents are the pixels")
    encode.add_argument("--revision", default=None, help="Hub revision to pin (keys the cache)")
    encode.add_argument(
        "--max-sequence-length",
        type=_number(int),
        default=defaults.max_sequence_length,
        help="T5 tokens kept of a caption (the shipped pipeline keeps the same)",
    )
    encode.add_argument(
        "--batch-size",
        type=_number(int),
        default=None,
        help="images per encoder call (default: 64 on a GPU, 16 on a CPU)",
    )
    encode.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    encode.set_defaults(func=_encode)

    encoders = sub.add_parser("encoders", help="encoder utilities").add_subparsers(dest="action", required=True)
    tiny = encoders.add_parser("make-tiny", help="write tiny random stand-ins of T5, DINOv3 and the Flux VAE")
    tiny.add_argument("--out", required=True, help="folder to write")
    tiny.add_argument("--seed", type=_seed, default=0, help="weight seed (default 0)")
    tiny.add_argument("--image-size", type=_number(int), default=64, help="DINOv3 input side (default 64)")
    tiny.add_argument("--no-vae", action="store_true", help="skip the VAE (pixel mode only)")
    tiny.set_defaults(func=_make_tiny)

    info = sub.add_parser("model-info", help="print a preset's model config and parameter count")
    info.add_argument("--preset", choices=sorted(PRESETS), default="nano", help="which preset (default: nano)")
    info.set_defaults(func=_model_info)

    exp = sub.add_parser(
        "export",
        help="a pipeline folder from a checkpoint (EMA weights, encoders, model card), written or pushed to the Hub",
    )
    exp.add_argument("checkpoint", help="checkpoint_stepNNNNNNN (training state) or checkpoint_final (a pipeline)")
    exp.add_argument("--out", default=None, help="folder to write")
    exp.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="Hub repo to upload to (token: HF_TOKEN or `hf auth login`)",
    )
    exp.add_argument("--private", action="store_true", default=None, help="create the Hub repo as private")
    exp.set_defaults(func=_export)

    val = sub.add_parser(
        "validate", help="the validation plan's three tests on a checkpoint, and the go / no-go report"
    )
    val.add_argument(
        "--checkpoint", required=True, help="checkpoint_stepNNNNNNN or a pipeline folder (checkpoint_final)"
    )
    val.add_argument("--cache", default=None, help="feature cache (default: the one the run trained on)")
    val.add_argument(
        "--output-dir", default=None, help="run folder for validation/ and RESULTS.md (default: the checkpoint's run)"
    )
    # The sampling settings, as the trainer's flags name them; unset: the run's own.
    add_flags(val, flag_fields(SamplingConfig), "default: the run's")
    val.add_argument("--lpips-backbone", choices=LPIPS_BACKBONES, default="pretrained", help="default: pretrained")
    val.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the transformer for sampling (default: as the run trained)",
    )
    val.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISIONS,
        default=None,
        help="sample under autocast (default: the precision the run trained in)",
    )
    val.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    val.set_defaults(func=_validate)

    cmp = sub.add_parser(
        "compare",
        help="designs side by side from finished runs: COMPARE.md with every figure's mean and seed spread, "
        "which differences exceed it, the curves overlaid and the sheets next to each other",
    )
    cmp.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_OR_GROUP",
        help="a run folder, or a folder of runs (the seeds of one design, as --seeds writes them); "
        "the first design is the baseline",
    )
    cmp.add_argument(
        "--out",
        default=None,
        help="folder for COMPARE.md and compare/ (default: a single group's, else the runs' parent)",
    )
    cmp.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as err:  # the user's input or the network, not a bug: one line
        from nano_dit.hub import PushFailed  # (imported here: the CLI starts without torch)

        if not isinstance(err, (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, PushFailed)):
            raise
        print(f"nano-dit {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
