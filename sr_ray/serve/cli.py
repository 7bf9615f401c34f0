"""`sr-ray serve` (run the guarded endpoint) and `sr-ray bench serve` (guard on vs off through Serve)."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from sr_ray.config import add_arguments, flag, from_args


def add_config_args(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, "configs/serve.yaml", "serve")
    flag(parser, "--model", help="tiny-llava | smol-llava | hub id | local dir")
    flag(parser, "--bundle", help="reminder bundle dir or MLflow models:/<name>/<version>")
    flag(parser, "--probe", help="probe dir (with a fresh soft prompt) when there is no bundle")
    flag(parser, "--host")
    flag(parser, "--port", type=int)
    flag(parser, "--no-guard", field="guard.enabled", action="store_false",
         help="serve with the guard off (no reminder needed)")


def config_from_args(args: argparse.Namespace):
    from sr_ray.serve.config import ServeConfig

    return from_args(ServeConfig, args, "serve")


def checked_config(args: argparse.Namespace):
    """The config, validated and its bundle load-checked before any Ray start; on a mistake, exit 2 with
    one line naming it (no traceback)."""
    from sr_ray.reminder.artifacts import ArtifactError
    from sr_ray.serve.app import preflight

    try:
        cfg = config_from_args(args)
        preflight(cfg)
    except (ValueError, TypeError, OSError, ArtifactError, yaml.YAMLError) as err:
        print(f"sr-ray serve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def _serve(args: argparse.Namespace) -> int:
    from sr_ray.serve.app import serve_forever

    serve_forever(checked_config(args), ray_address=args.address)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sr_ray.serve.bench import ServeBenchConfig, run_serve_bench, write_result

    if args.workload == "mixed":
        return _bench_mixed(args)
    cfg = ServeBenchConfig(model=args.model, bundle=args.bundle, requests=args.requests or 32, rounds=args.rounds,
                           concurrency=args.concurrency, max_tokens=args.max_tokens)
    result = run_serve_bench(cfg)
    write_result(result, args.out)
    keys = ("rps_guarded", "rps_plain", "ratio", "p50_ms", "p99_ms", "ttft_p50_ms", "errors")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0 if result["errors"] == 0 else 1


def _bench_mixed(args: argparse.Namespace) -> int:
    from sr_ray.serve.bench import write_result
    from sr_ray.serve.bench_mixed import MixedBenchConfig, run_mixed_bench

    cfg = MixedBenchConfig(model=args.model, bundle=args.bundle, rate_rps=args.rate, seed=args.seed,
                           **({"requests": args.requests} if args.requests else {}))
    result = run_mixed_bench(cfg)
    write_result(result, args.out)
    keys = ("rps_static", "rps_continuous", "ratio_throughput", "p50_short_ms_static", "p50_short_ms_continuous",
            "ratio_short_latency", "cpu_s_after_disconnect", "cpu_s_full_answer", "ratio_guarded_plain", "errors")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0 if result["errors"] == 0 else 1


def _bench_memory(args: argparse.Namespace) -> int:
    from sr_ray.serve.bench import write_result
    from sr_ray.serve.membench import run_memory_bench

    result = run_memory_bench(args.concurrency)
    write_result(result, args.out)
    print(json.dumps({"worst_ratio_with_budgets": result["worst_ratio_with_budgets"]}))
    return 0


def add_commands(sub, bench) -> None:
    p = sub.add_parser("serve", help="run the guarded OpenAI-compatible VLM endpoint on Ray Serve")
    add_config_args(p)
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.set_defaults(func=_serve)

    b = bench.add_parser("serve", help="guarded vs plain throughput/latency through the same Serve app; "
                                       "--workload mixed: static batcher vs continuous scheduler, open loop")
    b.add_argument("--workload", choices=["guard", "mixed"], default="guard")
    b.add_argument("--model", default="smol-llava")
    b.add_argument("--bundle", help="reminder bundle dir (default: fresh soft prompt + never-flag probe)")
    b.add_argument("--requests", type=int, help="guard: requests per mode per round (32); mixed: arrivals (40)")
    b.add_argument("--rate", type=float, default=1.0, help="mixed: arrivals per second")
    b.add_argument("--seed", type=int, default=0, help="mixed: the workload's seed")
    b.add_argument("--rounds", type=int, default=2)
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--out", required=True, help="result JSON")
    b.set_defaults(func=_bench)

    m = bench.add_parser("ingress-memory", help="ingress peak RSS under concurrent maximal-image requests vs idle")
    m.add_argument("--concurrency", type=int, default=16)
    m.add_argument("--out", required=True, help="result JSON")
    m.set_defaults(func=_bench_memory)
