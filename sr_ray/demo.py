"""`sr-ray demo`: the whole method on a laptop-class machine, one command, one MLflow experiment.

preprocess -> rollout -> fit-probe -> train (2 Ray workers, DeepSpeed) -> evaluate -> report, on the
embedded default model and the development data (or the vendored demo data). Each stage is sized by its
YAML in `configs/` (the CPU sizes); the demo only points them at one work directory and one experiment.
`--preset NAME` applies to every stage as it does to each stage's own command; `--set <stage>.key=value`
(`preprocess`, `rollout`, `fit_probe`, `train`, `evaluate`) changes one stage, `--set key=value` the demo.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sr_ray.config import config_file, load
from sr_ray.reminder.shipped import default_bundle

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data_dir: str | None = None  # None: $SR_RAY_DATA_DIR, ../shared/data, else the vendored demo data
    model: str = "smol-llava"
    # rows per benchmark (15 keys with the prefill variants, 5 system passes with the shipped bundle's): sized for
    # the 20-minute budget; None: configs/evaluate.yaml's
    eval_limit: int | None = 6
    # The shipped bundle's SafetyReminder is added as `safety_reminder_shipped` (a second, smaller evaluation).
    systems: tuple[str, ...] = ("undefended", "self_reminder", "safety_reminder")
    num_cpus: int = 4  # logical CPUs for the local Ray (oversubscribed: Data actors + 2 train workers)


# preset / `--set` section: the stage's config file in configs/
STAGE_FILES = {"preprocess": "preprocess", "rollout": "rollout", "fit_probe": "fit_probe", "train": "train_sapt",
               "evaluate": "evaluate"}


class _Stages:
    """Runs stages in order, printing a banner and the wall time of each."""

    def __init__(self, total: int):
        self.total, self.done, self.started, self.times = total, 0, time.perf_counter(), {}

    def run(self, name: str, fn):
        self.done += 1
        log.info("=== [%d/%d] %s ===", self.done, self.total, name)
        t = time.perf_counter()
        result = fn()
        self.times[name] = round(time.perf_counter() - t, 1)
        log.info("=== %s: %s s (total %.0f s) ===", name, self.times[name], time.perf_counter() - self.started)
        return result


def stage_configs(cfg: DemoConfig, out: Path, data_dir: Path, tracking_uri: str, preset: str | None = None,
                  sets: list[str] = ()) -> dict:
    """{section: config} of every stage: configs/<stage>.yaml < `preset` < what the demo sets (one work
    directory, one experiment) < `sets` (`<section>.key=value`). Built before anything runs: a mistake in
    any stage stops the demo at once."""
    from sr_ray.data import PreprocessConfig
    from sr_ray.eval.runner import EvaluateConfig
    from sr_ray.tracking import EXPERIMENT  # the experiment every stage uses
    from sr_ray.train.config import ProbeFitConfig, RolloutConfig, SaptConfig

    shared = dict(work_dir=str(out), model=cfg.model, tracking_uri=tracking_uri, experiment=EXPERIMENT)
    stages = {
        "preprocess": (PreprocessConfig, dict(data_dir=str(data_dir), out_dir=str(out / "data"))),
        "rollout": (RolloutConfig, shared), "fit_probe": (ProbeFitConfig, shared), "train": (SaptConfig, shared),
        "evaluate": (EvaluateConfig, dict(
            out=str(out / "eval"), bundle=str(out / "bundle"), data_dir=str(data_dir), processed_dir=str(out / "data"),
            model=cfg.model, systems=list(cfg.systems), limit=cfg.eval_limit, tracking_uri=tracking_uri)),
    }
    return {section: load(cls, config_file(f"configs/{STAGE_FILES[section]}.yaml"), preset=preset, section=section,
                          overrides=values, sets=[s.partition(".")[2] for s in sets if s.partition(".")[0] == section],
                          where=f"{section}.")
            for section, (cls, values) in stages.items()}


def run_demo(cfg: DemoConfig, preset: str | None = None, sets: list[str] = ()) -> dict:
    """The demo; `preset` and `sets` (`<stage>.key=value`) change the stages' configs (see `stage_configs`)."""
    from dataclasses import replace

    import ray

    from sr_ray.data import default_data_dir, run_preprocess
    from sr_ray.eval.report import write_report
    from sr_ray.eval.runner import evaluate
    from sr_ray.runtime import ensure_ray
    from sr_ray.tracking import EXPERIMENT, tracking_uri_for
    from sr_ray.train import run_fit_probe, run_rollout, run_sapt

    out = Path(cfg.out).resolve()
    data_dir = Path(cfg.data_dir).resolve() if cfg.data_dir else default_data_dir()
    tracking_uri = tracking_uri_for(out)  # $MLFLOW_TRACKING_URI, else sqlite under DIR
    configs = stage_configs(cfg, out, data_dir, tracking_uri, preset, sets)
    out.mkdir(parents=True, exist_ok=True)
    log.info("sr-ray demo: model=%s data=%s out=%s; MLflow: %s (experiment %s)", cfg.model, data_dir, out,
             tracking_uri, EXPERIMENT)
    # The dashboard hosts the State API that Ray Train's controller polls (else it logs every second).
    ensure_ray(cfg.num_cpus, dashboard=True)

    stages = _Stages(7 if default_bundle(cfg.model) else 6)
    manifest = stages.run("preprocess", lambda: run_preprocess(configs["preprocess"]))
    require_probe_sources(manifest, configs["fit_probe"], data_dir)
    stages.run("rollout", lambda: run_rollout(configs["rollout"]))
    probe_dir, probe_metrics = stages.run("fit-probe", lambda: run_fit_probe(configs["fit_probe"]))
    bundle_dir, run_id, version = stages.run("train", lambda: run_sapt(configs["train"]))
    bundle = out / "bundle"
    if bundle.resolve() != Path(bundle_dir).resolve():
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(bundle_dir, bundle)
    roc = next(iter(sorted(Path(probe_dir).parent.glob("*roc*.png"))), None)
    eval_cfg = replace(configs["evaluate"], probe_roc=str(roc) if roc else configs["evaluate"].probe_roc)
    ray.data.DataContext.get_current().enable_progress_bars = True  # training turns them off
    metrics = stages.run("evaluate", lambda: evaluate(eval_cfg))
    shipped = default_bundle(cfg.model)
    if shipped:  # the shipped, fully trained bundle on the same rows, beside the demo's minutes-old one
        metrics = stages.run("evaluate shipped bundle", lambda: with_shipped(metrics, eval_cfg, shipped, out))
    html, _ = stages.run("report", lambda: write_report(out / "eval", out / "report.html"))
    summary = dict(
        out=str(out), bundle=str(bundle), model_version=version, sapt_run_id=run_id, report=str(html),
        metrics=str(out / "eval" / "metrics.json"), tracking_uri=tracking_uri, probe=probe_metrics,
        rows_written=manifest.get("rows_written"), stage_seconds=stages.times,
        total_seconds=round(time.perf_counter() - stages.started, 1),
    )
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n" + asr_table(metrics))
    print(closing_message(summary, cfg.model))
    return summary


def with_shipped(metrics: dict, eval_cfg, shipped: str, out: Path) -> dict:
    """`metrics` plus the shipped bundle's SafetyReminder as `safety_reminder_shipped` (also in metrics.json)."""
    from dataclasses import replace

    from sr_ray.eval.runner import evaluate

    other = evaluate(replace(eval_cfg, out=str(out / "eval_shipped"), bundle=shipped, systems=["undefended", "safety_reminder"],
                             awareness=replace(eval_cfg.awareness, limit=0), processed_dir=str(out / "data")))
    metrics = metrics | {"safety_reminder_shipped": other["safety_reminder"]}
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def require_probe_sources(manifest: dict, probe_cfg, data_dir: Path) -> None:
    """Fail before the long stages when the probe's harmful/harmless split is not in the data. The vendored
    demo data lacks it: the harmless instructions (Alpaca) are CC BY-NC and cannot ship with the package."""
    needed = {s.source for s in probe_cfg.harmful + probe_cfg.benign}
    missing = sorted(needed - set(manifest.get("by_source", {})))
    if missing:
        raise SystemExit(
            f"sr-ray demo: the probe needs {missing} (configs/fit_probe.yaml), which {data_dir} does not have. "
            "The vendored demo data cannot carry it (the harmless instructions are Alpaca-derived, CC BY-NC 4.0). "
            "Point --data-dir (or $SR_RAY_DATA_DIR) at a data directory laid out like shared/data, with "
            "refusal_direction/splits/{harmful,harmless}_{train,val}.json.")


def asr_table(metrics: dict) -> str:
    """Full-response ASR (harmful benchmarks) and benign change/refusal, one row per system."""
    benches = sorted({b for per in metrics.values() for b in per})
    lines = [f"{'system':<26}" + "".join(f"{b[:18]:>20}" for b in benches)]
    for system, per in metrics.items():
        cells = []
        for b in benches:
            m = per.get(b, {})
            value = m.get("asr_full") if m.get("asr_full") is not None else m.get("refusal_rate")
            cells.append(f"{'-' if value is None else f'{100 * value:.1f}%':>20}")
        lines.append(f"{system:<26}" + "".join(cells))
    return "ASR on the full response (harmful benchmarks) / refusal rate (benign: harmless, mmvet)\n" + "\n".join(lines)


def closing_message(summary: dict, model: str) -> str:
    out = summary["out"]
    return (
        f"\nreport:        {summary['report']}\n"
        f"metrics:       {summary['metrics']}\n"
        f"bundle:        {summary['bundle']}  (MLflow model version {summary['model_version']})\n"
        f"MLflow UI:     .venv/bin/mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000\n"
        f"serve it:      .venv/bin/sr-ray serve --model {model} --bundle {out}/bundle\n"
        f"total time:    {summary['total_seconds']} s  {summary['stage_seconds']}\n"
    )


def add_commands(sub, bench) -> None:
    from sr_ray.config import add_arguments, flag

    p = sub.add_parser("demo", help="preprocess -> rollout -> fit-probe -> train -> evaluate -> report")
    add_arguments(p, None, "demo", config=False)
    flag(p, "--out", help="run directory (default runs/demo)")
    flag(p, "--data-dir", help="data laid out like shared/data (default: ../shared/data or the demo data)")
    flag(p, "--model", help="VLM (default smol-llava)")
    flag(p, "--eval-limit", type=int, help="rows per benchmark (default 6)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    import argparse

    from sr_ray.config import from_args

    stage_sets = [s for s in args.set if s.partition(".")[0] in STAGE_FILES]
    demo_sets = [s for s in args.set if s not in stage_sets]
    cfg = from_args(DemoConfig, argparse.Namespace(**{**vars(args), "set": demo_sets}), "demo")
    run_demo(cfg, args.preset, stage_sets)
    return 0
