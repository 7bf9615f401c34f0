"""`sr-ray preprocess`, `sr-ray data stats DIR`, `sr-ray bench data`."""

from __future__ import annotations

import argparse
import json

from sr_ray.config import add_arguments, csv_list, flag, from_args
from sr_ray.data.config import PreprocessConfig


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config/--preset/--set` and the flags of `PreprocessConfig` (shared with pipelines/preprocess.py)."""
    add_arguments(parser, "configs/preprocess.yaml", "preprocess")
    flag(parser, "--data-dir", help="data directory laid out like shared/data (default: sr_ray.data.default_data_dir())")
    flag(parser, "--out", field="out_dir", help="output directory (default: runs/data)")
    flag(parser, "--sources", type=csv_list, help="comma-separated source names (default: all found)")
    flag(parser, "--variants", type=csv_list, help="comma-separated variant names (default: all)")
    flag(parser, "--limit-per-source", type=int, help="first N rows per source")
    flag(parser, "--seed", type=int)
    flag(parser, "--max-side", type=int)
    flag(parser, "--num-cpus", type=int, help="CPUs for ray.init when no Ray session is running")
    flag(parser, "--executor", choices=["ray", "loop"])
    flag(parser, "--mmsafetybench-images", help="folder <scenario>/{SD_TYPO,SD}/<id>.jpg (upstream imgs/)")
    flag(parser, "--coco-dir", help="COCO train2017 images for VLSafe image rows")
    flag(parser, "--jailbreakv-images", help="JailBreakV-28K folder that its image_path column is relative to")
    flag(parser, "--tokenizer", help="local tokenizer/processor dir: add chat_prompt + input_ids columns")
    flag(parser, "--no-progress", field="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return from_args(PreprocessConfig, args, "preprocess")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from sr_ray.data.manifest import format_stats
    from sr_ray.data.pipeline import run_preprocess

    cfg = config_from_args(args)
    manifest = run_preprocess(cfg)
    print(format_stats(manifest))
    print(f"\nwrote {cfg.out_dir}/shards/*.parquet, manifest.json, quarantine.jsonl")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from sr_ray.data.manifest import format_stats, manifest_checksum, read_manifest

    print(format_stats(read_manifest(args.dir)))
    print(f"\nmanifest_checksum {manifest_checksum(args.dir)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sr_ray.data.bench import run_data_benchmark, write_benchmark

    result = run_data_benchmark(args.data_dir, num_cpus=args.num_cpus, limit_per_source=args.limit_per_source,
                                repeat=args.repeat, trials=args.trials)
    write_benchmark(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


def add_commands(sub, bench) -> None:
    pre = sub.add_parser("preprocess", help="benchmarks -> validated Parquet shards + manifest (Ray Data)")
    add_preprocess_arguments(pre)
    pre.set_defaults(func=cmd_preprocess)

    data = sub.add_parser("data", help="inspect preprocessed data").add_subparsers(dest="data_command", required=True)
    stats = data.add_parser("stats", help="print a preprocess output's manifest as tables")
    stats.add_argument("dir", help="output directory of `sr-ray preprocess`")
    stats.set_defaults(func=cmd_stats)

    b = bench.add_parser("data", help="Ray Data pipeline vs one-process loop on the image-heavy sources")
    b.add_argument("--data-dir", required=True)
    b.add_argument("--out", required=True, help="JSON file for the result")
    b.add_argument("--num-cpus", type=int, help="CPUs for ray.init (default: all cores)")
    b.add_argument("--limit-per-source", type=int, help="fewer rows (to find where Ray pays off)")
    b.add_argument("--repeat", type=int, default=1, help="replicate the rows N times (to find where Ray pays off)")
    b.add_argument("--trials", type=int, default=1, help="alternate ray/loop N times, report medians")
    b.set_defaults(func=cmd_bench)
