"""`run_sapt`: the driver side of SAPT. Reads the preference rows, starts a Ray Train `TorchTrainer` (N workers,
DeepSpeed, `FailureConfig`, resume from the last checkpoint), then turns the final checkpoint into a
reminder bundle, logs curves and the bundle to MLflow and registers a model version.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pandas as pd

from sr_ray.train.config import SaptConfig, to_dict


def split_preferences(prefs: pd.DataFrame, cfg: SaptConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train rows, and a seeded sample of at most `val_limit` harmful + `val_limit` benign val rows."""
    train = prefs[prefs["split"] == "train"].reset_index(drop=True)
    if len(train) < cfg.batch_size:
        raise ValueError(f"{len(train)} train preference rows, fewer than one batch of {cfg.batch_size}")
    if train["safe"].nunique() < 2:
        raise ValueError("SAPT needs harmful (safe=False) and benign (safe=True) train rows")
    val_parts = []
    for safe, group in prefs[prefs["split"] == "val"].groupby("safe"):
        ids = sorted(group["id"])
        if cfg.val_limit is not None and len(ids) > cfg.val_limit:
            ids = random.Random(f"{cfg.seed}:val:{safe}").sample(ids, cfg.val_limit)
        val_parts.append(group[group["id"].isin(ids)])
    val = pd.concat(val_parts, ignore_index=True) if val_parts else prefs.iloc[:0]
    return train, val


def _data_checksum(data_dir: Path) -> str:
    """The preprocessed data's manifest checksum ("" when training only on official-format files)."""
    from sr_ray.data import manifest_checksum

    return manifest_checksum(data_dir) if (data_dir / "manifest.json").exists() else ""


def _mlflow_run(cfg: SaptConfig, tracking_uri: str, run_name: str, params: dict) -> str:
    """The MLflow run of this Ray Train run: reused when the run name is resumed, else created."""
    from sr_ray import tracking

    client = tracking.mlflow_client(tracking_uri)
    experiment_id = tracking.ensure_experiment(cfg.experiment, tracking_uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.ray_run_name = '{run_name}'", max_results=1)
    if found:
        return found[0].info.run_id
    return tracking.start_run(tracking_uri, cfg.experiment, run_name, params, stage="train",
                               tags={"ray_run_name": run_name})


def pick_checkpoint(result, bundle_from: str):
    """(checkpoint, its metrics): the last epoch, or the best by val/score (ties: lower val L_LM, then later)."""
    reported = sorted(result.best_checkpoints, key=lambda cm: cm[1]["epoch"])
    if bundle_from == "last":
        return reported[-1]
    finite = lambda x: x if x == x else float("-inf")  # noqa: E731  (NaN: no val rows of that kind)
    return max(reported, key=lambda cm: (finite(cm[1]["val/score"]), finite(-cm[1]["val/lm_loss"]), cm[1]["epoch"]))


def metric_history(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from sr_ray.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    history = {}
    for key in client.get_run(run_id).data.metrics:
        points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
        latest = {step: value for step, _, value in points}  # a resumed epoch re-logs the same step
        history[key] = sorted(latest.items())
    return history


def run_sapt(cfg: SaptConfig) -> tuple[Path, str, str]:
    """Train the soft prompt; returns (bundle_dir, MLflow run id, registered model version)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sr_ray.reminder import HarmProbe, ReminderBundle, SoftPrompt
    from sr_ray import tracking
    from sr_ray.data.manifest import log_manifest_input
    from sr_ray.runtime import ensure_ray, ray_runtime_env
    from sr_ray.train.loop import train_loop
    from sr_ray.train.pyfunc import log_bundle
    from sr_ray.train.plots import plot_training
    from sr_ray.train.preferences import load_preferences

    out_dir = cfg.path(cfg.out_dir, "sapt")
    run_name = cfg.run_name or f"sapt-{re.sub(r'[^A-Za-z0-9]+', '-', cfg.model)}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = out_dir / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    probe_dir = cfg.path(cfg.probe, "probe/probe")
    if cfg.init_from:  # absolute: Ray Train workers run in another directory
        if not Path(cfg.init_from).exists():
            raise FileNotFoundError(f"train.init_from {cfg.init_from}: no such bundle or soft prompt directory")
        cfg = replace(cfg, init_from=str(Path(cfg.init_from).resolve()))
    probe = HarmProbe.load(probe_dir)  # fail early on a missing / tampered probe
    prefs, quarantined = load_preferences(cfg.train_data or [cfg.path(None, "rollout/rollout.parquet")])
    train, val = split_preferences(prefs, cfg)

    tracking_uri = tracking.tracking_uri_for(cfg.work_dir, cfg.tracking_uri)
    params = to_dict(cfg) | {"run_name": run_name, "probe_dir": str(probe_dir), "n_train": len(train), "n_val": len(val),
                             "n_quarantined": len(quarantined), "probe_fit": probe.fit_info}
    run_id = _mlflow_run(cfg, tracking_uri, run_name, params)
    log_manifest_input(tracking_uri, run_id, cfg.path(cfg.data_dir, "data"), "training")
    client = tracking.mlflow_client(tracking_uri)
    if quarantined:
        (run_dir / "quarantine.jsonl").write_text("".join(json.dumps(vars(q)) + "\n" for q in quarantined))
        client.log_artifact(run_id, str(run_dir / "quarantine.jsonl"))

    ensure_ray(dashboard=True)  # the State API that Ray Train's controller polls
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"sapt": to_dict(cfg), "probe_dir": str(probe_dir), "tracking_uri": tracking_uri,
                           "mlflow_run_id": run_id, "run_name": run_name},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),  # + 1 GPU if use_gpu
        run_config=RunConfig(name=run_name, storage_path=str(out_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             worker_runtime_env=ray_runtime_env()),
        datasets={"train": ray.data.from_pandas(train), "val": ray.data.from_pandas(val)},
        dataset_config=DataConfig(datasets_to_split=[]),  # every rank slices the seeded global order itself
    )
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise

    checkpoint, chosen = pick_checkpoint(result, cfg.bundle_from)
    bundle_dir = run_dir / "bundle"
    with checkpoint.as_directory() as ckpt:
        soft_prompt = SoftPrompt.load(Path(ckpt) / "soft_prompt")
    threshold = chosen.get("val/threshold", cfg.threshold)  # calibrated per epoch when configured
    bundle = ReminderBundle(soft_prompt, probe, soft_prompt.base_model_id, cfg.interval, threshold,
                            _data_checksum(cfg.path(cfg.data_dir, "data")))
    bundle.save(bundle_dir)
    epochs = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    summary = {"run_name": run_name, "run_id": run_id, "ray_storage": result.path, "final": result.metrics,
               "bundle_epoch": chosen["epoch"], "bundle_metrics": chosen, "epochs": epochs}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot = plot_training(metric_history(tracking_uri, run_id), run_dir / "training.png", f"SAPT on {bundle.base_model_id}")
    for path in (plot, run_dir / "summary.json"):
        client.log_artifact(run_id, str(path))
    client.set_tag(run_id, "base_weights_sha256", result.metrics.get("base_weights_sha256", ""))
    client.set_tag(run_id, "bundle_epoch", chosen["epoch"])
    version = log_bundle(bundle_dir, cfg.registered_model, model=cfg.model, model_kwargs=cfg.model_kwargs,
                         run_id=run_id, tracking_uri=tracking_uri, aliases=cfg.model_aliases,
                         tags={"base_model_id": bundle.base_model_id, "data_checksum": bundle.data_checksum})
    client.set_terminated(run_id)
    return bundle_dir, run_id, version
