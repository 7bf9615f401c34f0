"""`sr-ray` command line. Each area owns its subcommands in `sr_ray/<area>/cli.py`.

Every such module exposes `add_commands(sub, bench)`: `sub` is the top-level subparsers object, `bench` the
subparsers of `sr-ray bench`. Each parser sets `func=<callable(args)>`.

Importing an area's CLI module imports torch, transformers or Ray (seconds), so only the module of the
command being run is imported; the others appear in `--help` from `COMMANDS` (kept in sync with the modules
by tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

# command: (the module that defines it, its one-line help)
COMMANDS = {
    "generate": ("sr_ray.reminder.cli", "guarded generation on one prompt; prints the answer and the trace"),
    "preprocess": ("sr_ray.data.cli", "benchmarks -> validated Parquet shards + manifest (Ray Data)"),
    "data": ("sr_ray.data.cli", "inspect preprocessed data"),
    "serve": ("sr_ray.serve.cli", "run the guarded OpenAI-compatible VLM endpoint on Ray Serve"),
    "rollout": ("sr_ray.train.cli", "on-policy rollouts of the base VLM -> preference rows"),
    "fit-probe": ("sr_ray.train.cli", "fit the harm probe (PCA-20 -> 4 -> LR), val AUC + ROC"),
    "train": ("sr_ray.train.cli", "SAPT on Ray Train + DeepSpeed -> registered reminder bundle"),
    "align": ("sr_ray.train.cli", "rebuild the embedded default's safety alignment (seeded LoRA SFT, PEFT)"),
    "calibrate-blind": ("sr_ray.train.cli", "add the image-blind check to a bundle (threshold from benign val answers)"),
    "evaluate": ("sr_ray.eval.cli", "ASR / over-refusal of the systems on the benchmarks (Ray Data actor pool)"),
    "attack": ("sr_ray.eval.cli", "craft PGD / adaptive-PGD images or GCG suffixes as an evaluation dataset"),
    "robustness": ("sr_ray.eval.cli", "adaptive-PGD steps sweep: ASR and flag rate vs steps, SafetyReminder vs a robust variant"),
    "report": ("sr_ray.eval.cli", "one self-contained HTML page (+ Markdown) for an evaluation run"),
    "demo": ("sr_ray.demo", "preprocess -> rollout -> fit-probe -> train -> evaluate -> report"),
}
BENCH_HELP = "side-by-side benchmarks"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sr-ray {version('sr_ray')}")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        help="sr_ray's progress messages on stderr (default $SR_RAY_LOG_LEVEL, else INFO)")
    return parser


ALL_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


def modules_for(command: str | None) -> list[str]:
    """The CLI modules `command` needs: its own; every one for `bench` (each area adds benchmarks)."""
    if command == "bench":
        return ALL_MODULES
    return [COMMANDS[command][0]] if command in COMMANDS else []


def build_parser(modules: list[str] = ALL_MODULES) -> argparse.ArgumentParser:
    """The parser with the commands of `modules` in full; the other commands are listed only."""
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help=BENCH_HELP).add_subparsers(dest="bench", required=True)
    for name in modules:
        importlib.import_module(name).add_commands(sub, bench)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (None for `--help` / `--version` alone)."""
    pre = argparse.ArgumentParser(add_help=False)  # only the top-level option that takes a value
    pre.add_argument("--log-level")
    _, rest = pre.parse_known_args(argv)
    return next((a for a in rest if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    from sr_ray.config_types import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(modules_for(_command_of(argv)))
    args = parser.parse_args(argv)
    from sr_ray.runtime import quiet_third_party, setup_logging

    setup_logging(args.log_level)
    quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:  # a usage error, found before any work started
        parser.exit(2, f"sr-ray {args.command}: error: {err}\n")


def pipeline_main(script: str, description: str, add_arguments, func, argv: list[str] | None = None) -> int:
    """Entry of `pipelines/<script>` (a `ray job submit` entrypoint): the subcommand's flags (`add_arguments`)
    and its config check, a mistake exiting 2 before any work as `sr-ray` does."""
    from sr_ray.config_types import ConfigError
    from sr_ray.runtime import quiet_third_party

    quiet_third_party()
    parser = argparse.ArgumentParser(prog=f"pipelines/{script}", description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(func(args) or 0)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
