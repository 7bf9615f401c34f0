"""Fit the harm probe (SafetyReminder §3): final-norm hidden states of harmful vs harmless prompts,
PCA-20 -> first 4 components -> logistic regression, validated by ROC-AUC and accuracy, saved as a
`HarmProbe` artifact with an ROC plot, tracked in MLflow.

Features are computed in one Ray task (so the model can sit on a GPU node); the fit runs on the driver.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from sr_ray.models import Prompt
from sr_ray.train.config import ProbeFitConfig, to_dict


def _prompt_end_rows(cfg: ProbeFitConfig, split: str) -> list[dict]:
    from sr_ray.train.preferences import select_records

    rows = []
    for label, selections in (("harmful", cfg.harmful), ("benign", cfg.benign)):
        for r in select_records(cfg.path(cfg.data_dir, "data"), selections, label, split, cfg.seed):
            rows.append(dict(prompt=r.prompt, answer_prefix="", safe=label == "benign"))
    return rows


def _soft_token_rows(cfg: ProbeFitConfig, split: str) -> list[dict]:
    """Prompt + a sampled prefix of the rollout's own answer (rejected for harmful, chosen for benign)."""
    import pandas as pd

    from sr_ray.train.preferences import sample_prefix

    rollout = cfg.path(cfg.rollout, "rollout/rollout.parquet")
    if not rollout.exists():
        raise FileNotFoundError(f"feature 'soft_token' needs the model's answers: {rollout} (run `sr-ray rollout`)")
    frame = pd.read_parquet(rollout, columns=["id", "prompt", "split", "safe", "chosen", "rejected"])
    rows = []
    for r in frame[frame["split"] == split].to_dict("records"):
        answer = r["chosen"] if r["safe"] else r["rejected"]
        prefix, _ = sample_prefix(answer, random.Random(f"{cfg.seed}:{r['id']}"))
        rows.append(dict(prompt=r["prompt"], answer_prefix=prefix, safe=bool(r["safe"])))
    return rows


def extract_features(model: str, model_kwargs: dict, rows: list[dict], feature: str, batch_size: int) -> tuple[str, np.ndarray]:
    """(model id, (N, D) float32 features): last prompt token (text only), or last soft token of the init
    soft prompt."""
    from tqdm.auto import tqdm

    from sr_ray.models import load_vlm
    from sr_ray.reminder import SoftPrompt
    from sr_ray.runtime import quiet_third_party

    quiet_third_party()
    vlm = load_vlm(model, **model_kwargs)
    prompts = [Prompt(r["prompt"], answer_prefix=r["answer_prefix"]) for r in rows]
    if feature == "prompt_end":
        return vlm.model_id, vlm.last_prompt_hidden(prompts, batch_size=batch_size, progress=True).numpy()
    soft = SoftPrompt.from_text(vlm)(vlm.dtype)
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(prompts), batch_size), desc="features"):
            e = vlm.embed(vlm.encode(prompts[i : i + batch_size]), suffix=soft)
            feats.append(vlm.hidden(e.embeds, e.attention_mask, e.position_ids)[:, -1].float().cpu())
    return vlm.model_id, torch.cat(feats).numpy()


def probe_metrics(probe, feats: np.ndarray, safe: np.ndarray) -> dict[str, float]:
    """ROC-AUC of P(unsafe) for 'harmful', accuracy at 0.5 (as the official script prints) and the flag
    rates at the inference threshold."""
    from sklearn.metrics import roc_auc_score

    p_safe = probe.p_safe(torch.tensor(feats)).numpy()
    unsafe = ~safe.astype(bool)
    flagged = p_safe < probe.threshold
    return {
        "auc": float(roc_auc_score(unsafe, 1 - p_safe)) if 0 < unsafe.sum() < len(unsafe) else float("nan"),
        "accuracy": float(((p_safe >= 0.5) == safe.astype(bool)).mean()),
        "flag_rate_harmful": float(flagged[unsafe].mean()) if unsafe.any() else float("nan"),
        "flag_rate_harmless": float(flagged[~unsafe].mean()) if (~unsafe).any() else float("nan"),
        "n": int(len(safe)),
    }


def run_fit_probe(cfg: ProbeFitConfig) -> tuple[Path, dict]:
    """Fit, validate, save (`<out_dir>/probe`, metrics.json, roc.png) and log to MLflow. Returns (probe_dir, metrics)."""
    import ray

    from sr_ray.reminder import HarmProbe
    from sr_ray.runtime import ensure_ray
    from sr_ray import tracking
    from sr_ray.train.plots import plot_roc

    out_dir = cfg.path(cfg.out_dir, "probe")
    out_dir.mkdir(parents=True, exist_ok=True)
    build = _prompt_end_rows if cfg.feature == "prompt_end" else _soft_token_rows
    splits = {split: build(cfg, split) for split in ("train", "val")}
    if len({r["safe"] for r in splits["train"]}) < 2:
        raise ValueError(f"the probe's train split needs harmful and harmless rows, got {len(splits['train'])} of one kind")
    ensure_ray()
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(extract_features)
    # One task: the model loads once for both splits.
    model_id, all_feats = ray.get(task.remote(cfg.model, cfg.model_kwargs, splits["train"] + splits["val"],
                                              cfg.feature, cfg.batch_size))
    feats = {"train": all_feats[: len(splits["train"])], "val": all_feats[len(splits["train"]) :]}
    labels = {s: np.array([r["safe"] for r in rows], dtype=bool) for s, rows in splits.items()}
    probe = HarmProbe.fit(feats["train"], labels["train"], n_components=cfg.n_components, top_m=cfg.top_m,
                          threshold=cfg.threshold, base_model_id=model_id, seed=cfg.seed)
    probe.fit_info |= {"feature": cfg.feature, "layer": "final norm"}
    metrics = {f"{s}/{k}": v for s in splits for k, v in probe_metrics(probe, feats[s], labels[s]).items()}
    probe_dir = probe.save(out_dir / "probe")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    curves = {s: (~labels[s], 1 - probe.p_safe(torch.tensor(feats[s])).numpy()) for s in splits}
    roc = out_dir / "roc.png"
    plot_roc(curves, roc, f"harm probe on {model_id} ({cfg.feature})")

    tracking_uri = tracking.tracking_uri_for(cfg.work_dir, cfg.tracking_uri)
    run_id = tracking.start_run(tracking_uri, cfg.experiment, "fit-probe", to_dict(cfg), stage="fit-probe")
    client = tracking.mlflow_client(tracking_uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(roc))
    client.log_artifacts(run_id, str(probe_dir), "probe")
    client.set_terminated(run_id)
    metrics["run_id"] = run_id
    return probe_dir, metrics

