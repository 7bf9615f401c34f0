"""The reminder version a deployment serves: a `models:/name@alias` (or `/latest`) bundle is pinned once,
on the driver, so every replica loads the same version even if the alias moves; each response's `safety`
object, the audit log and `/metrics` name it. And the deployments' resource requests come from the config
(`num_gpus` per replica)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from sr_ray.serve.api import create_api
from sr_ray.serve.app import build_app, pin_bundle
from sr_ray.serve.config import ScaleConfig, ServeConfig
from sr_ray.serve.model import GuardedModel
from sr_ray.tracking import default_tracking_uri, start_run
from sr_ray.train.pyfunc import log_bundle
from tests.bundles import constant_probe_bundle


@pytest.fixture(scope="module")
def registry(tiny_llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-registry")
    uri = default_tracking_uri(root / "store")
    run_id = start_run(uri, "sr-ray", "train", stage="train")
    for n, bias in ((1, 2.5), (2, -2.5)):
        bundle = constant_probe_bundle(tiny_llava, root / f"b{n}", bias=bias)
        log_bundle(bundle, "reminder-serve", model="tiny-llava", run_id=run_id, tracking_uri=uri,
                   aliases=["champion"] if n == 1 else [])
    return uri


def test_alias_is_pinned_once_and_named_in_responses_audit_and_metrics(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("SR_RAY_CACHE", str(tmp_path / "cache"))
    cfg = ServeConfig(model="tiny-llava", bundle="models:/reminder-serve@champion", tracking_uri=registry,
                      audit_log=str(tmp_path / "audit.jsonl"))
    pinned = pin_bundle(cfg)
    assert pinned.bundle == "models:/reminder-serve/1" and pinned.reminder_version == "reminder-serve/1"
    MlflowClient(registry).set_registered_model_alias("reminder-serve", "champion", "2")  # moves while replicas start
    model = GuardedModel(pinned)
    assert model.generator.probe.bias == 2.5  # still version 1
    try:
        with TestClient(create_api(pinned, model.generate), raise_server_exceptions=False) as client:
            body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["safety"]["model_version"] == "reminder-serve/1"
            metrics = client.get("/metrics").text
            assert 'sr_ray_model_info{model_version="reminder-serve/1"} 1.0' in metrics
    finally:
        model.scheduler.close()
    [record] = [json.loads(line) for line in Path(cfg.audit_log).read_text().splitlines()]
    assert record["model_version"] == "reminder-serve/1"
    assert pin_bundle(ServeConfig(model="tiny-llava", bundle="models:/reminder-serve/latest",
                                  tracking_uri=registry)).bundle == "models:/reminder-serve/2"


def test_replicas_request_the_configured_gpus(tiny_llava, tmp_path):
    bundle = constant_probe_bundle(tiny_llava, tmp_path / "b", bias=2.5)
    cfg = ServeConfig(model="tiny-llava", bundle=str(bundle), audit_log=None,
                      model_deployment=ScaleConfig(num_cpus=2, num_gpus=1))
    ingress = build_app(cfg)._bound_deployment
    [model] = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    assert model.ray_actor_options["num_gpus"] == 1 and model.ray_actor_options["num_cpus"] == 2
    assert ingress.ray_actor_options["num_gpus"] == 0  # the FastAPI ingress needs no GPU
