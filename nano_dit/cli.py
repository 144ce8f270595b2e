"""The `nano-dit` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import json


def _model_info(args: argparse.Namespace) -> None:
    from nano_dit import NanoDiTTransformer2DModel
    from nano_dit.training import PRESETS

    model = NanoDiTTransformer2DModel(**PRESETS[args.preset]["model"])
    print(json.dumps({"preset": args.preset, "parameters": model.num_parameters(), **model.config}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    from nano_dit.training import PRESETS

    parser = argparse.ArgumentParser(prog="nano-dit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("model-info", help="print a preset's model config and parameter count")
    info.add_argument("--preset", choices=sorted(PRESETS), default="nano", help="which preset (default: nano)")
    info.set_defaults(func=_model_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
