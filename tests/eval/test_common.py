"""Evaluation runs in MLflow: the stage's tags, metrics linked to the registered model version they measured,
and the report logged into the run after it closed."""

from __future__ import annotations

import json

import torch
from mlflow import MlflowClient

from sr_ray.eval.common import log_report, log_to_mlflow
from sr_ray.reminder import HarmProbe, ReminderBundle, SoftPrompt
from sr_ray.tracking import default_tracking_uri, pinned_uri, start_run
from sr_ray.train.pyfunc import log_bundle


def test_eval_metrics_are_linked_to_the_model_version(tmp_path):
    uri = default_tracking_uri(tmp_path / "store")
    ReminderBundle(SoftPrompt(torch.zeros(4, 64), "tiny-llava"), HarmProbe(torch.zeros(64), 0.0, base_model_id="tiny-llava"),
                   "tiny-llava").save(tmp_path / "bundle")
    version = log_bundle(tmp_path / "bundle", "reminder-eval", model="tiny-llava", tracking_uri=uri,
                         run_id=start_run(uri, "sr-ray", "train", stage="train"), aliases=["champion"])
    model_uri = pinned_uri("models:/reminder-eval@champion", uri)
    (tmp_path / "metrics.json").write_text("{}")
    run_id = log_to_mlflow(uri, "evaluate-tiny", {"limit": 4}, {"safety_reminder.figstep.asr_full": 0.25},
                           [tmp_path / "metrics.json"], stage="evaluate", model_uri=model_uri)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["sr_ray.stage"] == "evaluate"
    assert run.data.tags["sr_ray.model_version"] == f"reminder-eval/{version}"
    model_id = client.get_model_version("reminder-eval", version).tags["sr_ray.logged_model_id"]
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert linked == {"safety_reminder.figstep.asr_full": 0.25}

    (tmp_path / "provenance.json").write_text(json.dumps({"tracking_uri": uri, "mlflow_run_id": run_id}))
    (tmp_path / "report.html").write_text("<html></html>")
    log_report(tmp_path, [tmp_path / "report.html"])
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.json", "report.html"}
