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
# envs: list, sample and self-check the verifiable environments (logic in openzaya/envs/registry.py)


def add_envs(sub):
    p = sub.add_parser("envs", help="list, sample and check the verifiable environments")
    envs_sub = p.add_subparsers(dest="envs_command", required=True)
    q = envs_sub.add_parser("list", help="every environment with its tags and difficulty range")
    q.add_argument("--source", default=None, help="only this source (openzaya, reasoning_gym, rlve, ...)")
    q.set_defaults(func=lambda a: print(__import__("openzaya.envs.registry", fromlist=["x"]).describe_envs(a.source)))
    q = envs_sub.add_parser("sample", help="print one problem: prompt, reference answer and solution")
    q.add_argument("name")
    q.add_argument("--difficulty", type=int, default=0)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=lambda a: print(__import__("openzaya.envs.registry", fromlist=["x"]).describe_sample(
        a.name, a.difficulty, a.seed)))
    q = envs_sub.add_parser("check", help="self-check every environment at min/mid/max difficulty, 2 seeds")
    q.add_argument("--source", default=None, help="only this source")
    q.set_defaults(func=lambda a: __import__("openzaya.envs.registry", fromlist=["x"]).run_check(a.source))


# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openzaya", description="ZAYA1 MoE++ models, training and Markovian RSA")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in [add_train_tiny, add_envs]:
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
