"""`sr-ray evaluate`, `sr-ray attack pgd|pgd-adaptive|gcg`, `sr-ray report RUN_DIR`."""

from __future__ import annotations

import argparse
import json

from sr_ray.config import add_arguments, csv_ints, csv_list, flag, from_args


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """`--config/--preset/--set` and the flags of `EvaluateConfig` (shared with pipelines/evaluate.py)."""
    add_arguments(p, "configs/evaluate.yaml", "evaluate")
    flag(p, "--bundle", help="reminder bundle: a directory or models:/NAME/VERSION (default: the shipped one)")
    flag(p, "--data-dir", help="raw benchmark data laid out like shared/data (preprocessed into OUT/data)")
    flag(p, "--processed-dir", help="reuse an `sr-ray preprocess` output instead")
    flag(p, "--out", help="run directory (default runs/eval)")
    flag(p, "--model", help="VLM: smol-llava (default), tiny-llava, tiny-qwen2-vl, a hub id or directory")
    flag(p, "--systems", type=csv_list, help="comma-separated: undefended,self_reminder,safety_reminder,safety_reminder_official")
    flag(p, "--benchmarks", type=csv_list, help="comma-separated built-in benchmark keys (default: all)")
    flag(p, "--limit", type=int, help="rows per benchmark, spread over categories (0: all)")
    flag(p, "--attack-dir", field="attack_dirs", action="append", help="an `sr-ray attack` output (repeatable)")
    flag(p, "--attacks", type=csv_list,
         help="attack every harmful benchmark too: prefill,pgd=DIR -> <benchmark>+<attack> entries")
    flag(p, "--split", choices=["train", "val", "test", "all"],
         help="rows of this split (default test; all: a data directory no stage trained on)")
    flag(p, "--judge", help="rule (default) | llama-guard=PATH | md-judge=PATH")
    flag(p, "--inline-typography", action=argparse.BooleanOptionalAction,
         help="put FigStep/TYPO image text in the prompt (default: on for smol-llava)")
    flag(p, "--max-new-tokens", type=int)
    flag(p, "--reminder-max-new-tokens", type=int)
    flag(p, "--interval", type=int)
    flag(p, "--threshold", type=float)
    flag(p, "--batch-size", type=int)
    flag(p, "--concurrency", type=int, help="inference actors")
    flag(p, "--gpus-per-actor", type=float, help="GPUs per inference actor (1 on a GPU cluster)")
    flag(p, "--awareness-limit", field="awareness.limit", type=int,
         help="answers per label for the delayed-awareness analysis (0: skip)")
    flag(p, "--awareness-max-new-tokens", field="awareness.max_new_tokens", type=int)
    flag(p, "--probe-roc", help="the probe's ROC PNG to include in the report")
    flag(p, "--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite in OUT)")
    flag(p, "--seed", type=int)
    flag(p, "--num-cpus", type=int)
    p.add_argument("--no-report", dest="report", action="store_false", help="skip writing report.html/.md")


def evaluate_config(args: argparse.Namespace):
    from sr_ray.eval.runner import EvaluateConfig

    return from_args(EvaluateConfig, args, "evaluate")


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
        add_arguments(k, "configs/attack.yaml", "attack")
        section = "gcg" if kind == "gcg" else "pgd"
        flag(k, "--out")
        flag(k, "--data-dir")
        flag(k, "--processed-dir")
        flag(k, "--model")
        flag(k, "--tracking-uri")
        flag(k, "--n-test", type=int, help="AdvBench test goals written out (official 100)")
        flag(k, "--seed", field=f"{section}.seed", type=int)
        if kind == "gcg":
            flag(k, "--steps", field="gcg.steps", type=int, help="GCG steps (official 500)")
            flag(k, "--search-width", field="gcg.search_width", type=int, help="GCG candidates per step (official 64)")
            flag(k, "--topk", field="gcg.topk", type=int, help="GCG top-k tokens per position (official 64)")
            continue
        if kind == "pgd-adaptive":
            flag(k, "--bundle", help="the guarded pipeline under attack")
        flag(k, "--clean-image", help="PGD start image (default: uniform gray)")
        flag(k, "--n-train", type=int, help="AdvBench train goals (official 320)")
        flag(k, "--steps", field="pgd.steps", type=int, help="PGD steps (official 3000)")
        flag(k, "--epsilon", field="pgd.epsilon", type=float, help="PGD L-inf radius in [0,1] units (official 64/255)")
        flag(k, "--step-size", field="pgd.step_size", type=float, help="PGD step (official 1/255)")
        flag(k, "--batch-size", field="pgd.batch_size", type=int, help="PGD goals per step (official 4)")
        flag(k, "--sweep", field="pgd.snapshots", type=csv_ints,
             help="steps sweep: also write the image after each of these step counts as OUT/steps_<n> (e.g. 0,12,60)")


def attack_config(args: argparse.Namespace):
    """The attack named by the subcommand, from `--config` (default configs/attack.yaml) and the flags."""
    from sr_ray.eval.attacks.runner import AttackConfig

    return from_args(AttackConfig, args, "attack", attack=args.attack)


def cmd_attack(args: argparse.Namespace) -> int:
    from sr_ray.eval.attacks.runner import run_attack

    run_attack(attack_config(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sr_ray.eval.report import write_report

    html, md = write_report(args.run_dir, args.out)
    print(f"wrote {html} and {md}")
    return 0


ROBUSTNESS_HELP = "adaptive-PGD steps sweep: ASR and flag rate vs steps, SafetyReminder vs a robust variant"


def cmd_robustness(args: argparse.Namespace) -> int:
    from sr_ray.eval.sweep import SweepConfig, run_sweep

    cfg = from_args(SweepConfig, args, "robustness")
    for row in run_sweep(cfg):
        print(json.dumps(row))
    print(f"sweep: {cfg.out}/sweep.json, {cfg.out}/sweep.png")
    return 0


def add_commands(sub, bench) -> None:
    ev = sub.add_parser("evaluate", help="ASR / over-refusal of the systems on the benchmarks (Ray Data actor pool)")
    add_evaluate_arguments(ev)
    ev.set_defaults(func=cmd_evaluate)

    at = sub.add_parser("attack", help="craft PGD / adaptive-PGD images or GCG suffixes as an evaluation dataset")
    add_attack_arguments(at)
    at.set_defaults(func=cmd_attack)

    rb = sub.add_parser("robustness", help=ROBUSTNESS_HELP)
    add_arguments(rb, None, "robustness")
    flag(rb, "--robust-bundle", help="the bundle with the robust option (e.g. `sr-ray calibrate-blind` output)")
    flag(rb, "--bundle", help="the plain bundle (default: the model's shipped one)")
    flag(rb, "--processed-dir")
    flag(rb, "--data-dir")
    flag(rb, "--model")
    flag(rb, "--steps", type=csv_ints, help="attack step counts of the sweep (default 0,12,60)")
    flag(rb, "--n-test", type=int, help="AdvBench test goals evaluated (32)")
    flag(rb, "--out")
    rb.set_defaults(func=cmd_robustness)

    rep = sub.add_parser("report", help="one self-contained HTML page (+ Markdown) for an evaluation run")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="HTML path (default RUN_DIR/report.html; Markdown beside it)")
    rep.set_defaults(func=cmd_report)
