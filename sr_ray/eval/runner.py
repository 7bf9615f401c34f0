"""`sr-ray evaluate`: every system on every benchmark through the Ray Data actor pool of `sr_ray.infer`,
judged both ways, with metrics, plots, the delayed-awareness analysis, provenance and an MLflow run.

RUN_DIR layout (read by `sr-ray report`):
    metrics.json  metrics.csv  metrics_by_category.csv  responses.jsonl  provenance.json
    awareness.json  awareness_readings.csv  attacks/<benchmark>.json  plots/*.png
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from sr_ray.config_types import require
from sr_ray.eval.attacks.dataset import attack_rows, read_attack_info
from sr_ray.eval.awareness import AwarenessConfig, awareness_rows, run_awareness
from sr_ray.eval.benchmarks import (
    BENCHMARK_ORDER, BENCHMARKS, benchmark_rows, default_inline_typography, preprocess_selection, sample_by_category,
)
from sr_ray.eval.common import log_to_mlflow, prepared_data, versions
from sr_ray.judges import make_judge
from sr_ray.eval.metrics import (
    add_changed, add_views, category_metrics, clean_json, compute_metrics, judge_views, metrics_table,
)
from sr_ray.eval.plots import plot_asr, plot_attack_losses, plot_categories
from sr_ray.eval.variants import parse_attacks, with_attacks
from sr_ray.infer import SYSTEMS, InferenceConfig, run_inference
from sr_ray.reminder.shipped import default_bundle
from sr_ray.tracking import pinned_uri, resolve_bundle, tracking_uri_for

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    out: str = "runs/eval"
    bundle: str | None = None  # reminder bundle: a directory or models:/NAME/VERSION
    data_dir: str | None = None  # raw benchmark data (shared/data layout); None: sr_ray.data.default_data_dir()
    processed_dir: str | None = None  # reuse preprocessed shards instead of preprocessing into OUT/data
    model: str = "smol-llava"
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))
    attack_dirs: list[str] = field(default_factory=list)  # `sr-ray attack` outputs, evaluated as benchmarks
    # Attacks applied to every harmful benchmark as `<benchmark>+<attack>` variants: "prefill", "pgd=DIR".
    attacks: list[str] = field(default_factory=list)
    split: Literal["train", "val", "test", "all"] = "test"  # "all": every row (a data directory no stage trained on)
    limit: int | None = 8  # rows per benchmark, spread over categories (None or 0: the whole test split)
    seed: int = 0
    inline_typography: bool | None = None  # None: on for models that cannot read typography (smol-llava)
    judge: str = "rule"  # rule | llama-guard=PATH | md-judge=PATH
    # Decoding budget. The paper uses 256 + 256; the CPU default keeps the run to minutes.
    max_new_tokens: int = 64
    reminder_max_new_tokens: int = 64
    interval: int | None = None  # None: the bundle's
    threshold: float | None = None  # None: the bundle's
    batch_size: int = 8
    concurrency: int = 2  # inference actors (each one torch thread)
    gpus_per_actor: float = 0.0  # 1 on GPU nodes: Ray gives each inference actor its own GPU
    awareness: AwarenessConfig = field(default_factory=AwarenessConfig)  # limit 0 skips the analysis
    probe_roc: str | None = None  # the probe's ROC plot (saved by probe fitting), shown in the report
    tracking_uri: str | None = None
    num_cpus: int | None = None  # logical CPUs for a local Ray (None: max(4, cores))

    def __post_init__(self):
        self.limit = self.limit or None
        unknown = [s for s in self.systems if s not in SYSTEMS]
        require(not unknown, f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        require(not unknown, f"unknown benchmarks {unknown}; built-in: {list(BENCHMARKS)} (attacks: --attack-dir)")
        self.bundle = self.bundle or default_bundle(self.model)
        require(self.bundle is not None or not any(s.startswith("safety_reminder") for s in self.systems),
                f"the safety_reminder systems need --bundle (a directory or models:/NAME/VERSION); "
                f"no bundle ships for {self.model!r}")
        if not isinstance(self.awareness, AwarenessConfig):
            self.awareness = AwarenessConfig(**self.awareness)
        if "undefended" not in self.systems:  # the reference for changed_vs_undefended
            self.systems = ["undefended", *self.systems]


def _init_ray(num_cpus: int | None) -> None:
    """The running Ray, else $RAY_ADDRESS (a Ray job), else a local one at normal worker priority with
    oversubscribed logical CPUs: inference actors hold theirs while Ray Data tasks still need some."""
    from sr_ray.runtime import ensure_ray

    ensure_ray(num_cpus or max(4, os.cpu_count() or 1))


def collect_rows(cfg: EvaluateConfig, out: Path) -> tuple[list[dict], Path | None]:
    inline = cfg.inline_typography if cfg.inline_typography is not None else default_inline_typography(cfg.model)
    sources, variants = preprocess_selection(cfg.benchmarks, inline)
    processed = prepared_data(cfg.data_dir, cfg.processed_dir, out, sources, variants) if sources else None
    rows = benchmark_rows(processed, cfg.benchmarks, inline, cfg.limit, cfg.seed, cfg.split) if processed else []
    rows = with_attacks(rows, parse_attacks(cfg.attacks))
    for directory in cfg.attack_dirs:
        _, extra = attack_rows(directory)
        rows += sample_by_category(extra, cfg.limit, cfg.seed, category=lambda r: r["category"])
    for r in rows:  # one schema for every row (a missing column would reach inference as NaN)
        r.setdefault("answer_prefix", "")
        r.setdefault("attack", None)
    if not rows:
        raise ValueError(f"no evaluation rows: none of {cfg.benchmarks} has test records in {processed}, no attack rows")
    return rows, processed


def judge_results(frame: pd.DataFrame, rows: list[dict], judge_spec: str) -> pd.DataFrame:
    judge = make_judge(judge_spec)
    images = None
    if getattr(judge, "vision", False):
        from sr_ray.infer import decode_image

        images = {r["key"]: decode_image(r["image"]) for r in rows}
    return add_changed(judge_views(add_views(frame), judge, images))


def write_results(frame: pd.DataFrame, out: Path) -> dict:
    metrics = clean_json(compute_metrics(frame, BENCHMARK_ORDER))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    metrics_table(metrics).to_csv(out / "metrics.csv", index=False)
    categories = category_metrics(frame)
    categories.to_csv(out / "metrics_by_category.csv", index=False)
    keep = ["key", "benchmark", "category", "label", "system", "question", "prompt", "attack", "answer_prefix", "response", "full_text",
            "judged_continuation", "verdict_full", "verdict_continuation", "refusal", "changed", "flagged",
            "flagged_at", "tokens_before_flag", "n_tokens", "finish_reason", "latency_s", "checks"]
    frame[keep].to_json(out / "responses.jsonl", orient="records", lines=True, force_ascii=False)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_asr(metrics, plots / "asr.png")
    plot_categories(categories, plots / "categories.png")
    return metrics


def copy_attacks(attack_dirs: list[str], out: Path) -> None:
    if not attack_dirs:
        return
    (out / "attacks").mkdir(exist_ok=True)
    infos = {}
    for directory in attack_dirs:
        info = read_attack_info(directory)
        infos[info["benchmark"]] = info
        (out / "attacks" / f"{info['benchmark']}.json").write_text(json.dumps(info, indent=2))
        for png in (Path(directory) / "images").glob("*.png"):
            shutil.copy(png, out / "attacks" / f"{info['benchmark']}-{png.name}")
    plot_attack_losses(infos, out / "plots" / "attack_losses.png")


def _phase(message: str, started: float) -> None:
    log.info("[evaluate %6.1fs] %s", time.perf_counter() - started, message)


def evaluate(cfg: EvaluateConfig) -> dict:
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri_for(out, cfg.tracking_uri)
    bundle_uri = cfg.bundle and pinned_uri(cfg.bundle, tracking_uri)  # an alias / latest resolved once
    bundle_dir = str(resolve_bundle(bundle_uri, tracking_uri)) if bundle_uri else None
    _init_ray(cfg.num_cpus)
    _phase("preparing data", started)
    rows, processed = collect_rows(cfg, out)
    _phase(f"{len(rows)} rows x {len(cfg.systems)} systems: generating", started)
    inference = dict(batch_size=cfg.batch_size, concurrency=cfg.concurrency, gpus_per_actor=cfg.gpus_per_actor)
    frame = run_inference(rows, InferenceConfig(
        model=cfg.model, bundle=bundle_dir, systems=tuple(cfg.systems), max_new_tokens=cfg.max_new_tokens,
        reminder_max_new_tokens=cfg.reminder_max_new_tokens, interval=cfg.interval, threshold=cfg.threshold, **inference,
    ))
    _phase(f"judging with {cfg.judge}", started)
    frame = judge_results(frame, rows, cfg.judge)
    metrics = write_results(frame, out)
    copy_attacks(cfg.attack_dirs, out)
    if cfg.probe_roc:
        shutil.copy(cfg.probe_roc, out / "plots" / "probe_roc.png")
    awareness = None
    answers = awareness_rows(rows, cfg.awareness.limit, cfg.seed) if bundle_dir and cfg.awareness.limit else []
    if answers:
        _phase("delayed-awareness analysis", started)
        awareness = run_awareness(answers, cfg.model, bundle_dir, cfg.awareness, out, **inference)
    provenance = dict(
        model=cfg.model, bundle=bundle_uri, bundle_dir=bundle_dir,
        bundle_info=json.loads((Path(bundle_dir) / "bundle.json").read_text()) if bundle_dir else None,
        data_dir=cfg.data_dir, processed_dir=processed and str(processed),
        data_manifest_checksum=processed and _manifest_checksum(processed),
        judge=cfg.judge, config=asdict(cfg), rows=len(rows), generations=len(frame), versions=versions(),
        tracking_uri=tracking_uri, seconds=round(time.perf_counter() - started, 1),
    )
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    # MLflow metric names take no "+": an attacked variant `figstep+prefill` logs as `figstep-prefill`
    flat = {f"{s}.{b.replace('+', '-')}.{k}": v for s, benches in metrics.items() for b, m in benches.items()
            for k, v in m.items()}
    if awareness:
        for name, s in awareness["summaries"].items():
            flat[f"awareness.{name.split(' (')[0].replace(' ', '_')}.harmful_ever_below_threshold"] = s["harmful_ever_below_threshold"]
    artifacts = [out / n for n in ("metrics.json", "metrics.csv", "metrics_by_category.csv", "responses.jsonl",
                                   "provenance.json", "awareness.json", "plots", "attacks")]
    _phase("logging to MLflow", started)
    provenance["mlflow_run_id"] = log_to_mlflow(tracking_uri, f"evaluate-{cfg.model}", asdict(cfg), flat, artifacts,
                                                stage="evaluate", model_uri=bundle_uri)
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    return metrics


def _manifest_checksum(processed: Path) -> str | None:
    from sr_ray.data import manifest_checksum

    try:
        return manifest_checksum(processed)
    except FileNotFoundError:
        return None
