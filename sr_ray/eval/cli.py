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

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "report", "log_level")}
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


ATTACKS = {
    "pgd": "PGD image against the undefended model",
    "pgd-adaptive": "PGD image against the guarded pipeline (probe and reminder in the loss)",
    "gcg": "GCG text suffixes (nanoGCG)",
}


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    """One subcommand per attack, each with only the flags that attack reads."""
    kinds = p.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    for kind, help_text in ATTACKS.items():
        k = kinds.add_parser(kind, help=help_text, description=help_text)
        k.add_argument("--config", default="configs/attack.yaml",
                       help="YAML with AttackConfig fields (default configs/attack.yaml, CPU-sized; '' = the official settings)")
        k.add_argument("--out")
        k.add_argument("--data-dir")
        k.add_argument("--processed-dir")
        k.add_argument("--model")
        k.add_argument("--tracking-uri")
        k.add_argument("--n-test", type=int, help="AdvBench test goals written out (official 100)")
        k.add_argument("--seed", type=int)
        if kind == "gcg":
            k.add_argument("--steps", type=int, help="GCG steps (official 500)")
            k.add_argument("--search-width", type=int, help="GCG candidates per step (official 64)")
            k.add_argument("--topk", type=int, help="GCG top-k tokens per position (official 64)")
            continue
        if kind == "pgd-adaptive":
            k.add_argument("--bundle", help="the guarded pipeline under attack")
        k.add_argument("--clean-image", help="PGD start image (default: uniform gray)")
        k.add_argument("--n-train", type=int, help="AdvBench train goals (official 320)")
        k.add_argument("--steps", type=int, help="PGD steps (official 3000)")
        k.add_argument("--epsilon", type=float, help="PGD L-inf radius in [0,1] units (official 64/255)")
        k.add_argument("--step-size", type=float, help="PGD step (official 1/255)")
        k.add_argument("--batch-size", type=int, help="PGD goals per step (official 4)")


def attack_config(args: argparse.Namespace):
    """The YAML (`--config`; '' = none), then the flags that were given."""
    from sr_ray.eval.attacks.runner import AttackConfig
    from sr_ray.train.config import config_file

    section = "gcg" if args.attack == "gcg" else "pgd"
    flag = lambda name: getattr(args, name, None)  # noqa: E731  (each attack has only its own flags)
    overrides = dict(attack=args.attack, out=args.out, data_dir=args.data_dir, processed_dir=args.processed_dir,
                     model=args.model, bundle=flag("bundle"), tracking_uri=args.tracking_uri,
                     clean_image=flag("clean_image"), n_train=flag("n_train"), n_test=args.n_test)
    overrides |= {f"{section}_steps": args.steps, f"{section}_seed": args.seed, "pgd_epsilon": flag("epsilon"),
                  "pgd_step_size": flag("step_size"), "pgd_batch_size": flag("batch_size"),
                  "gcg_search_width": flag("search_width"), "gcg_topk": flag("topk")}
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
