"""The `openzaya` command: argparse subcommands, each a thin call into a library module.

Every subcommand registers itself in one `add_<name>(sub)` function below; flags are kebab-case and named by unit.
Imports of heavy modules happen inside the handlers, so `openzaya --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


# -----------------------------------------------------------------------------
# train-tiny: the main job until the full speedrun exists


def add_train_tiny(sub):
    p = sub.add_parser("train-tiny", help="train a tiny ZAYA model on a built-in synthetic corpus and print samples")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: __import__("openzaya.tiny", fromlist=["main"]).main(a))


# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openzaya", description="ZAYA1 MoE++ models, training and Markovian RSA")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in [add_train_tiny]:
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
