"""The ``firekit`` command line. Thin: every subcommand calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import FirekitError


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, seconds=args.seconds, size=args.size, seed=args.seed,
             modality_b=args.modality_b)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firekit",
        description="FIRE image registration: affine + non-rigid, 2D/3D, one network for both directions.",
    )
    parser.add_argument("--version", action="version", version=f"firekit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small 2D FIRE model on a synthetic phantom pair and write results + a figure",
        description=(
            "Build a synthetic 2D head phantom pair related by a known affine, train a small FIRE model on it "
            "on the CPU, and write model.pt, losses.csv, metrics.txt and registration.png to --out."
        ),
    )
    demo.add_argument("--out", default="results", help="output folder (created; existing demo files are replaced)")
    demo.add_argument("--steps", type=int, default=400, help="maximum training steps (default 400)")
    demo.add_argument("--seconds", type=float, default=60.0, help="stop training after this many seconds (default 60)")
    demo.add_argument("--size", type=int, default=64, help="image side in pixels, a multiple of 4 >= 32 (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--modality-b", default="t2", choices=["t1", "t2", "flair"],
                      help="contrast of the fixed image; the moving one is T1 (default t2: multi-modal; t1: mono-modal)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except FirekitError as exc:
        if args.debug:
            raise
        print(f"firekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("firekit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
