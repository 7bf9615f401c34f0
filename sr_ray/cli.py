"""`sr-ray` command line. Each area owns its subcommands in `sr_ray/<area>/cli.py`.

Every such module exposes `add_commands(sub, bench)`: `sub` is the top-level subparsers
object, `bench` the subparsers of `sr-ray bench`. Each parser sets `func=<callable(args)>`.
"""

from __future__ import annotations

import argparse
import importlib

from sr_ray.runtime import quiet_third_party

COMMAND_MODULES = [
    "sr_ray.reminder.cli",
    "sr_ray.data.cli",
    "sr_ray.serve.cli",
    "sr_ray.train.cli",
    "sr_ray.eval.cli",
    "sr_ray.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="side-by-side benchmarks").add_subparsers(dest="bench", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
