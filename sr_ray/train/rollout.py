"""On-policy rollouts for SAPT: the base VLM answers the training prompts and its answers become the
preference rows (Ray Data actor pool via `sr_ray.infer.run_inference`: one model load per actor).

Harmful prompt: rejected = the model's own answer (its prefixes are what the reminder must recover from),
chosen = a refusal from the configured set (seeded per row). A selection with `attack: prefill` forces the
answer to start with the harmful target (the prefilling attack): an aligned model refuses direct asks, so
its jailbroken answers come from attacked prompts, as at test time. Benign prompt: chosen = the model's own
answer (the reminder must continue it unchanged), rejected = the official constant refusal.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from sr_ray.data.images import noise_image_bytes
from sr_ray.data.prefill import prefill_text
from sr_ray.train.config import OFFICIAL_REJECTED, RolloutConfig, to_dict
from sr_ray.train.preferences import PREFERENCE_COLUMNS, select_records


def rollout_requests(cfg: RolloutConfig) -> pd.DataFrame:
    """The prompts to answer: the configured selections of every requested split."""
    rows = []
    for split in cfg.splits:
        for label, selections in (("harmful", cfg.harmful), ("benign", cfg.benign)):
            for sel in selections:
                for r in select_records(cfg.path(cfg.data_dir, "data"), [sel], label, split, cfg.seed):
                    prefix = prefill_text(r.reference if r.source == "advbench" else None) if sel.attack == "prefill" else ""
                    row_id = "+".join([r.id] + [tag for tag in (sel.attack, sel.image) if tag])
                    image = noise_image_bytes(f"{cfg.seed}:{row_id}") if sel.image == "noise" else r.image
                    rows.append(dict(id=row_id, source=r.source, split=split, prompt=r.prompt, image=image,
                                     safe=label == "benign", answer_prefix=prefix))
    if not rows:
        raise ValueError(f"no records selected from {cfg.path(cfg.data_dir, 'data')} for splits {cfg.splits}")
    return pd.DataFrame(rows)


def to_preferences(answers: pd.DataFrame, refusals: list[str], seed: int) -> pd.DataFrame:
    """Preference rows from (request + `response`) rows."""
    if not refusals:
        raise ValueError("the refusal set is empty; SAPT needs at least one refusal text for harmful rows")
    from sr_ray.judges import RuleJudge

    judge = RuleJudge()
    out = answers.copy()
    refusal = [random.Random(f"{seed}:{i}").choice(refusals) for i in out["id"]]
    out["chosen"] = [r if not safe else ans for r, safe, ans in zip(refusal, out["safe"], out["response"])]
    # A prefilled answer is the prefill followed by what the model wrote after it.
    answer = [f"{p} {a}".strip() if p else a for p, a in zip(out.get("answer_prefix", [""] * len(out)), out["response"])]
    out["rejected"] = [ans if not safe else OFFICIAL_REJECTED for safe, ans in zip(out["safe"], answer)]
    out["attack_prefix"] = list(out.get("answer_prefix", [""] * len(out)))
    out["chosen_ended"] = [not safe or reason == "stop" for safe, reason in zip(out["safe"], out["finish_reason"])]
    out["origin"] = "rollout"
    out["base_refusal"] = [judge.is_refusal(a) for a in out["response"]]
    return out[PREFERENCE_COLUMNS + ["response", "finish_reason", "base_refusal"]]


def run_rollout(cfg: RolloutConfig) -> Path:
    """Roll out, write the preference parquet (+ a summary JSON), log to MLflow; returns the parquet path."""
    from sr_ray.infer import InferenceConfig, run_inference
    from sr_ray import tracking

    out = cfg.path(cfg.out, "rollout/rollout.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    requests = rollout_requests(cfg)
    infer = InferenceConfig(model=cfg.model, systems=("undefended",), max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, concurrency=cfg.concurrency, cpus_per_actor=cfg.cpus_per_actor,
                            gpus_per_actor=cfg.gpus_per_actor, model_kwargs=cfg.model_kwargs)
    answers = run_inference(requests, infer)
    # Images are not passed through inference outputs: join them back by id.
    answers = answers.drop(columns="image", errors="ignore").merge(requests[["id", "image"]], on="id", how="left")
    prefs = to_preferences(answers.sort_values("id", kind="stable").reset_index(drop=True), cfg.refusals, cfg.seed)
    prefs.to_parquet(out, index=False)

    summary = {"rows": len(prefs)}
    for (split, safe), group in prefs.groupby(["split", "safe"]):
        kind = "benign" if safe else "harmful"
        summary[f"{split}/{kind}/rows"] = len(group)
        summary[f"{split}/{kind}/base_refusal_rate"] = float(group["base_refusal"].mean())
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    tracking_uri = tracking.tracking_uri_for(cfg.work_dir, cfg.tracking_uri)
    run_id = tracking.start_run(tracking_uri, cfg.experiment, "rollout", to_dict(cfg), stage="rollout")
    client = tracking.mlflow_client(tracking_uri)
    for key, value in summary.items():
        client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(out.with_suffix(".summary.json")))
    client.log_text(run_id, prefs.drop(columns=["image"]).head(50).to_json(orient="records", indent=1), "sample.json")
    client.set_terminated(run_id)
    return out

