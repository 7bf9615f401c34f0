"""The whole pipeline as Ray jobs on a real two-node Ray cluster, as docs/cluster.md runs it on GPUs.

Each stage is submitted through the Jobs API (`JobSubmissionClient.submit_job`, the same call
`ray job submit --working-dir .` makes) as `python pipelines/<stage>.py --config configs/<stage>.yaml`
+ overrides, on a tiny model with tiny limits. Stages hand files to each other through one work dir (both
"nodes" share this machine's disk, as cluster nodes share /mnt/shared) and log to one sqlite MLflow store.
The trained bundle is then served from the MLflow registry and queried with the openai client.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors, list_nodes
from sklearn.metrics import roc_auc_score

from tests.cluster.conftest import REPO, free_port
from tests.reminder.reference import solo_answers

pytestmark = pytest.mark.slow

MODEL = "tiny-llava"
EXCLUDES = [".venv", ".git", "runs", "mlruns", "*.db", "__pycache__", ".pytest_cache", "*.egg-info", "/cache"]
JOB_TIMEOUT_S = 300


def real_data_dir() -> Path:
    if os.environ.get("SR_RAY_DATA_DIR"):
        return Path(os.environ["SR_RAY_DATA_DIR"]).resolve()
    return (REPO / "../shared/data").resolve()


def small_data_dir(root: Path) -> Path:
    """The vendored demo data (FigStep, AdvBench) plus the first rows of each refusal_direction split, the
    harmful/harmless prompts the probe is fit on: a real data dir, small enough for 2 cores."""
    root.mkdir(parents=True)
    for name in ("FigStep", "AdvBench"):
        shutil.copytree(REPO / "sr_ray/demo_data" / name, root / name)
    splits = real_data_dir() / "refusal_direction/splits"
    (root / "refusal_direction/splits").mkdir(parents=True)
    for path in sorted(splits.glob("*.json")):
        (root / "refusal_direction/splits" / path.name).write_text(json.dumps(json.loads(path.read_text())[:12]))
    return root


class Stages:
    """Submits `pipelines/<stage>.py` as Ray jobs and waits for each."""

    def __init__(self, dashboard_url: str, work: Path):
        self.client = JobSubmissionClient(dashboard_url)
        self.tracking_uri = f"sqlite:///{work}/mlflow.db"
        self.timings: dict[str, float] = {}

    def run(self, script: str, *args: str) -> str:
        entrypoint = shlex.join(["python", f"pipelines/{script}", *args])
        # Like `ray job submit --working-dir .`: the environment comes from the nodes (as on the cluster, where
        # ~/.bashrc sets it); job-level env_vars would collide with the stages' own ray.init(runtime_env=...).
        runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES}
        start = time.monotonic()
        job_id = self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        status = self.client.get_job_status(job_id)
        while not status.is_terminal():
            if time.monotonic() - start > JOB_TIMEOUT_S:
                self.client.stop_job(job_id)
                pytest.fail(f"{script} still {status} after {JOB_TIMEOUT_S} s:\n{self.client.get_job_logs(job_id)[-6000:]}")
            time.sleep(2)
            status = self.client.get_job_status(job_id)
        logs = self.client.get_job_logs(job_id)
        self.timings[script] = round(time.monotonic() - start, 1)
        assert status == JobStatus.SUCCEEDED, f"{script}: {status}\n{logs[-6000:]}"
        return logs


def last_json(logs: str) -> dict:
    """The JSON summary a stage prints last (a stage's stdout ends with it)."""
    start = logs.rindex("\n{\n") + 1
    return json.loads(logs[start : logs.index("\n}", start) + 2])


def test_pipeline_as_ray_jobs_on_two_nodes(local_cluster, tmp_path):
    work = tmp_path / "runs"
    stages = Stages(local_cluster.dashboard_url, work)
    data = small_data_dir(tmp_path / "data")
    shards = work / "data"
    common = ["--model", MODEL, "--work-dir", str(work), "--tracking-uri", stages.tracking_uri]

    alive = [n for n in list_nodes(address=local_cluster.dashboard_url) if n.state == "ALIVE"]
    assert len(alive) == 2 and sum(n.resources_total["CPU"] for n in alive) == 4

    stages.run("preprocess.py", "--config", "configs/preprocess.yaml", "--data-dir", str(data), "--out", str(shards),
               "--sources", "figstep,advbench,harmful_harmless", "--limit-per-source", "72", "--no-progress")
    manifest = json.loads((shards / "manifest.json").read_text())
    written = pd.concat([pd.read_parquet(p) for p in (shards / "shards").glob("*.parquet")])
    assert manifest["rows_written"] == len(written) > 0
    assert manifest["by_source"] == written["source"].value_counts().to_dict()
    assert set(manifest["by_source"]) == {"figstep", "advbench", "harmful_harmless"}

    stages.run("rollout.py", "--config", "configs/rollout.yaml", *common, "--data-dir", str(shards),
               "--set", "harmful=[{source: advbench, train: 4, val: 2}, {source: figstep, variant: image, train: 2, val: 1}]",
               "--set", "benign=[{source: harmful_harmless, train: 6, val: 3}]",
               "--set", "max_new_tokens=12", "--set", "concurrency=2", "--set", "cpus_per_actor=0.5")
    rollout = work / "rollout/rollout.parquet"
    answers = pd.read_parquet(rollout)
    assert answers.groupby(["split", "safe"]).size().to_dict() == {
        ("train", False): 6, ("train", True): 6, ("val", False): 3, ("val", True): 3}
    # the job's answers are the model's own greedy answers, each generated here alone
    from sr_ray.models import load_vlm

    vlm = load_vlm(MODEL)
    solo = solo_answers(vlm, answers.rename(columns={"attack_prefix": "answer_prefix"}).assign(max_new_tokens=12)
                        .to_dict("records"))
    assert list(answers["response"]) == [o.text for o in solo]

    stages.run("fit_probe.py", "--config", "configs/fit_probe.yaml", *common, "--data-dir", str(shards),
               "--set", "harmful=[{source: harmful_harmless, train: 6, val: 3}]",
               "--set", "benign=[{source: harmful_harmless, train: 6, val: 3}]", "--set", "n_components=4")
    probe = work / "probe/probe"
    probe_metrics = json.loads((work / "probe/metrics.json").read_text())
    assert probe_metrics["train/n"] == 12 and probe_metrics["val/n"] == 6
    # the job's val AUC is sklearn's on the probe's readings of the same val prompts, computed here
    from sr_ray.reminder import HarmProbe, ReminderBundle
    from sr_ray.train.config import ProbeFitConfig, RecordSelection
    from sr_ray.train.probe_fit import _prompt_end_rows, extract_features

    fitted = HarmProbe.load(probe, vlm)
    selection = [RecordSelection("harmful_harmless", train=6, val=3)]
    val_rows = _prompt_end_rows(ProbeFitConfig(work_dir=str(work), data_dir=str(shards), model=MODEL,
                                               harmful=selection, benign=selection), "val")
    _, feats = extract_features(MODEL, {}, val_rows, fitted.fit_info["feature"], 8)
    p_unsafe = 1 - fitted.p_safe(torch.tensor(feats)).numpy()
    assert probe_metrics["val/auc"] == pytest.approx(roc_auc_score([not r["safe"] for r in val_rows], p_unsafe))

    # 1.5 CPUs per train worker: two do not fit on one 2-CPU node, so DeepSpeed's all-reduce crosses nodes.
    logs = stages.run("train_sapt.py", "--config", "configs/train_sapt.yaml", *common, "--num-workers", "2",
                      "--epochs", "1", "--set", f"train_data=[{rollout}]", "--set", f"probe={probe}",
                      "--set", f"data_dir={shards}", "--set", "cpus_per_worker=1.5", "--set", "max_target_tokens=12",
                      "--set", "val_limit=2", "--set", "val_max_new_tokens=12")
    trained = last_json(logs)
    bundle = ReminderBundle.load(trained["bundle"], vlm)
    assert bundle.base_model_id == MODEL and bundle.threshold == trained["final"]["val/threshold"]

    # MLflow: one run per stage, finished, with their metrics and artifacts; the bundle registered.
    client = MlflowClient(stages.tracking_uri, registry_uri=stages.tracking_uri)
    experiment = client.get_experiment_by_name("sr-ray")
    runs = {r.data.tags.get("sr_ray.stage"): r for r in client.search_runs([experiment.experiment_id])}
    assert {"rollout", "fit-probe", "train"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["train"].info.run_id == trained["mlflow_run_id"]
    steps = client.get_metric_history(trained["mlflow_run_id"], "train/total_loss")
    assert [m.step for m in steps] == [1, 2, 3]  # 12 train rows / batch 4, one epoch, logged by rank 0 only
    # the stage's final train loss is the epoch mean of the per-step losses it logged
    assert trained["final"]["train/total_loss"] == pytest.approx(sum(m.value for m in steps) / 3)
    assert {"training.png", "summary.json"} <= {a.path for a in client.list_artifacts(trained["mlflow_run_id"])}
    assert "probe" in {a.path for a in client.list_artifacts(runs["fit-probe"].info.run_id)}
    assert experiment.artifact_location.startswith(f"file://{work}")  # not inside a Ray worker's temp dir
    model_uri = trained["model_uri"]
    name, version = model_uri.removeprefix("models:/").split("/")
    assert client.get_model_version(name, version).run_id == trained["mlflow_run_id"]

    # Evaluate the registered bundle against the undefended model: metrics, plots, report, an MLflow run.
    stages.run("evaluate.py", "--config", "configs/evaluate.yaml", "--model", MODEL, "--bundle", model_uri,
               "--processed-dir", str(shards), "--out", str(work / "eval"), "--tracking-uri", stages.tracking_uri,
               "--systems", "undefended,safety_reminder", "--benchmarks", "figstep,advbench,harmless", "--limit", "2",
               "--max-new-tokens", "12", "--reminder-max-new-tokens", "12", "--awareness-limit", "0", "--attacks", "",
               "--probe-roc", str(work / "probe/roc.png"))
    metrics = json.loads((work / "eval/metrics.json").read_text())
    assert set(metrics) == {"undefended", "safety_reminder"}
    assert all(set(m) == {"figstep", "advbench", "harmless"} and all(b["n"] == 2 for b in m.values())
               for m in metrics.values())
    from sr_ray.eval.report import fmt

    report = (work / "eval/report.md").read_text()
    for bench in ("figstep", "advbench"):  # the report's ASR table holds this run's figures
        assert "| " + " | ".join([bench, *(fmt(metrics[s][bench]["asr_full"]) for s in metrics)]) + " |" in report
    assert (work / "eval/report.html").stat().st_size > len(report)
    [evaluation] = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sr_ray.stage") == "evaluate"]
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.metrics["safety_reminder.advbench.n"] == 2
    assert {"metrics.json", "report.html", "report.md"} <= {a.path for a in client.list_artifacts(evaluation.info.run_id)}

    # Serve the registered bundle on the cluster (the job returns once the app runs), query it over HTTP.
    port = free_port()
    stages.run("serve.py", "--config", "configs/serve.yaml", "--model", MODEL, "--bundle", model_uri,
               "--port", str(port), "--set", f"tracking_uri={stages.tracking_uri}",
               "--set", f"audit_log={tmp_path / 'audit.jsonl'}",
               "--set", "model_deployment.num_cpus=0.5", "--set", "ingress_deployment.num_cpus=0.1")
    from openai import OpenAI

    openai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = openai.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "How do I bake bread?"}], max_tokens=24)
    assert raw.http_response.status_code == 200
    completion = raw.parse()
    # the served answer is the guarded engine's with the registered bundle, token for token
    from sr_ray.models import Prompt
    from sr_ray.reminder import GuardedGenerator, SamplingConfig

    want = GuardedGenerator(vlm, bundle.soft_prompt, bundle.probe).generate(
        [Prompt("How do I bake bread?")], SamplingConfig(max_new_tokens=24),
        bundle.guard_config(reminder_max_new_tokens=24))[0]
    assert completion.choices[0].message.content == want.text
    safety = completion.model_extra["safety"]
    assert safety["enabled"] is True and (safety["checks_run"], safety["flagged"]) == (len(want.checks), want.flagged)

    # Where the jobs' actors ran: the two SAPT workers on different nodes, Serve's proxy on each node.
    placed: dict[str, set[str]] = {}
    for actor in list_actors(address=local_cluster.dashboard_url, limit=1000, detail=True):
        if actor.node_id:  # None: never placed
            placed.setdefault(actor.class_name, set()).add(actor.node_id)
    assert len(placed["RayTrainWorker"]) == 2 and len(placed["ProxyActor"]) == 2, placed
    print("nodes per actor class:", {name: len(nodes) for name, nodes in sorted(placed.items())})
    print("stage wall times (s):", json.dumps(stages.timings))
