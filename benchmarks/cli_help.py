"""`sr-ray --help` start-up time: the lazy parser (only the named command's module is imported) vs the
eager one (every area's CLI module, and so torch, transformers and Ray, imported first), side by side.

    python benchmarks/cli_help.py --out benchmarks/results/cli_help.json [--repeats 5]

Each variant runs in a fresh interpreter, alternating, so both see the same machine load and file cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "lazy": [sys.executable, "-m", "sr_ray.cli", "--help"],
    "eager": [sys.executable, "-c", "from sr_ray.cli import build_parser; build_parser().parse_args(['--help'])"],
}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True, help="result JSON")
    args = parser.parse_args()
    seconds = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, cmd in VARIANTS.items():
            seconds[name].append(timed(cmd))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {"median_s": medians, "eager_over_lazy": medians["eager"] / medians["lazy"], "seconds": seconds,
              "repeats": args.repeats, "load_avg": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_s", "eager_over_lazy", "load_avg")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
