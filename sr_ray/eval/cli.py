"""`sr-ray evaluate`, `sr-ray attack pgd|pgd-adaptive|gcg`, `sr-ray report RUN_DIR`."""

from __future__ import annotations

import argparse
import json


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """Overrides of `EvaluateConfig` (shared with pipelines/evaluate.py); None keeps the YAML/default."""
    p.add_argument("--config", default="configs/evaluate.yaml",
                   help="YAML with EvaluateConfig fields (default configs/evaluate.yaml; '' = the dataclass defaults)")
    p.add_argument("--bundle", help="reminder bundle: a directory or models:/NAME/VERSION (default: the shipped one)")
    p.add_argument("--data-dir", help="raw benchmark data laid out like shared/data (preprocessed into OUT/data)")
    p.add_argument("--processed-dir", help="reuse an `sr-ray preprocess` output instead")
    p.add_argument("--out", help="run directory (default runs/eval)")
    p.add_argument("--model", help="VLM: smol-llava (default), tiny-llava, tiny-qwen2-vl, a hub id or directory")
    p.add_argument("--systems", type=_csv_list, help="comma-separated: undefended,self_reminder,safety_reminder,safety_reminder_official")
    p.add_argument("--benchmarks", type=_csv_list, help="comma-separated built-in benchmark keys (default: all)")
    p.add_argument("--limit", type=int, help="rows per benchmark, spread over categories (0: all)")
    p.add_argument("--attack-dir", dest="attack_dirs", action="append", help="an `sr-ray attack` output (repeatable)")
    p.add_argument("--attacks", type=_csv_list,
                   help="attack every harmful benchmark too: prefill,pgd=DIR -> <benchmark>+<attack> entries")
    p.add_argument("--split", choices=["train", "val", "test", "all"],
                   help="rows of this split (default test; all: a data directory no stage trained on)")
    p.add_argument("--judge", help="rule (default) | llama-guard=PATH | md-judge=PATH")
    p.add_argument("--inline-typography", action=argparse.BooleanOptionalAction, default=None,
                   help="put FigStep/TYPO image text in the prompt (default: on for smol-llava)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--reminder-max-new-tokens", type=int)
    p.add_argument("--interval", type=int)
    p.add_argument("--threshold", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--concurrency", type=int, help="inference actors")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per inference actor (1 on a GPU cluster)")
    p.add_argument("--awareness-limit", type=int, help="answers per label for the delayed-awareness analysis (0: skip)")
    p.add_argument("--awareness-max-new-tokens", type=int)
    p.add_argument("--probe-roc", help="the probe's ROC PNG to include in the report")
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite in OUT)")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--no-report", dest="report", action="store_false", help="skip writing report.html/.md")


def evaluate_config(args: argparse.Namespace):
    """The YAML (`--config`; '' = none), then the flags that were given."""
    from sr_ray.eval.runner import EvaluateConfig
    from sr_ray.train.config import config_file

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "report")}
    return EvaluateConfig.from_yaml(config_file(args.config) if args.config else None, **overrides)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sr_ray.eval.common import log_report
    from sr_ray.eval.report import write_report
    from sr_ray.eval.runner import evaluate

    cfg = evaluate_config(args)
    metrics = evaluate(cfg)
    print(json.dumps({s: {b: {k: m[k] for k in ("n", "asr_full", "asr_continuation", "refusal_rate", "changed_vs_undefended")}
                          for b, m in benches.items()} for s, benches in metrics.items()}, indent=1))
    if args.report:
        html, md = write_report(cfg.out)
        log_report(cfg.out, [html, md])
        print(f"report: {html}")
    return 0


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("attack", choices=["pgd", "pgd-adaptive", "gcg"])
    p.add_argument("--config", default="configs/attack.yaml",
                   help="YAML with AttackConfig fields (default configs/attack.yaml, CPU-sized; '' = the official settings)")
    p.add_argument("--out")
    p.add_argument("--data-dir")
    p.add_argument("--processed-dir")
    p.add_argument("--model")
    p.add_argument("--bundle", help="pgd-adaptive: the guarded pipeline under attack")
    p.add_argument("--tracking-uri")
    p.add_argument("--clean-image", help="PGD start image (default: uniform gray)")
    p.add_argument("--n-train", type=int, help="PGD: AdvBench train goals (official 320)")
    p.add_argument("--n-test", type=int, help="AdvBench test goals written out (official 100)")
    p.add_argument("--steps", type=int, help="PGD steps (official 3000) / GCG steps (official 500)")
    p.add_argument("--epsilon", type=float, help="PGD L-inf radius in [0,1] units (official 64/255)")
    p.add_argument("--step-size", type=float, help="PGD step (official 1/255)")
    p.add_argument("--batch-size", type=int, help="PGD goals per step (official 4)")
    p.add_argument("--search-width", type=int, help="GCG candidates per step (official 64)")
    p.add_argument("--topk", type=int, help="GCG top-k tokens per position (official 64)")
    p.add_argument("--seed", type=int)


def attack_config(args: argparse.Namespace):
    """The YAML (`--config`; '' = none), then the flags that were given."""
    from sr_ray.eval.attacks.runner import AttackConfig
    from sr_ray.train.config import config_file

    section = "gcg" if args.attack == "gcg" else "pgd"
    overrides = dict(attack=args.attack, out=args.out, data_dir=args.data_dir, processed_dir=args.processed_dir,
                     model=args.model, bundle=args.bundle, tracking_uri=args.tracking_uri, clean_image=args.clean_image,
                     n_train=args.n_train, n_test=args.n_test)
    overrides |= {f"{section}_steps": args.steps, f"{section}_seed": args.seed, "pgd_epsilon": args.epsilon,
                  "pgd_step_size": args.step_size, "pgd_batch_size": args.batch_size,
                  "gcg_search_width": args.search_width, "gcg_topk": args.topk}
    return AttackConfig.from_yaml(config_file(args.config) if args.config else None, **overrides)


def cmd_attack(args: argparse.Namespace) -> int:
    from sr_ray.eval.attacks.runner import run_attack

    run_attack(attack_config(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sr_ray.eval.report import write_report

    html, md = write_report(args.run_dir, args.out)
    print(f"wrote {html} and {md}")
    return 0


def add_commands(sub, bench) -> None:
    ev = sub.add_parser("evaluate", help="ASR / over-refusal of the systems on the benchmarks (Ray Data actor pool)")
    add_evaluate_arguments(ev)
    ev.set_defaults(func=cmd_evaluate)

    at = sub.add_parser("attack", help="craft PGD / adaptive-PGD images or GCG suffixes as an evaluation dataset")
    add_attack_arguments(at)
    at.set_defaults(func=cmd_attack)

    rep = sub.add_parser("report", help="one self-contained HTML page (+ Markdown) for an evaluation run")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="HTML path (default RUN_DIR/report.html; Markdown beside it)")
    rep.set_defaults(func=cmd_report)
