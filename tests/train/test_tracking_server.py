"""The cluster's tracking setup, for real: an `mlflow server` whose backend store is a PostgreSQL database
(artifacts proxied by the server), and the registry path through it over HTTP: a training run, the bundle
registered as a pyfunc model with an alias, an evaluation linked to it, downloads and
`mlflow.pyfunc.load_model`. Then the server is replaced by a fresh one on the same database, as after a
`ray down` / `ray up` of the cluster, and the registered model is still served from it."""

from __future__ import annotations

import mlflow
import pandas as pd
import psycopg
import pytest
import torch

from sr_ray.eval.common import log_to_mlflow
from sr_ray.reminder import HarmProbe, ReminderBundle, SoftPrompt
from sr_ray.tracking import pinned_uri, resolve_bundle, start_run
from sr_ray.train.pyfunc import log_bundle
from tests.train.servers import MlflowServer, Postgres


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres.start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("object-store")  # the object store's stand-in (S3 on the cluster)


def registered_rows(pg: Postgres) -> list[tuple]:
    with psycopg.connect(pg.uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, version FROM model_versions ORDER BY version")
        return cur.fetchall()


def test_registry_path_through_mlflow_server_on_postgresql(postgres, artifacts, tmp_path, monkeypatch):
    server = MlflowServer.start(postgres.uri, artifacts, tmp_path / "mlflow1.log")
    try:
        uri = server.url
        probe = HarmProbe(torch.zeros(64), bias=-9.0, base_model_id="tiny-llava")  # flags every answer
        ReminderBundle(SoftPrompt(torch.zeros(4, 64), "tiny-llava"), probe, "tiny-llava", interval=4).save(tmp_path / "b")
        run_id = start_run(uri, "sr-ray", "train", params={"lr": 2e-4}, stage="train")
        version = log_bundle(tmp_path / "b", "safety-reminder", model="tiny-llava", run_id=run_id, tracking_uri=uri,
                             aliases=["champion"])
        model_uri = pinned_uri("models:/safety-reminder@champion", uri)
        assert model_uri == f"models:/safety-reminder/{version}"
        eval_run = log_to_mlflow(uri, "evaluate-tiny", {}, {"asr": 0.5}, [], stage="evaluate", model_uri=model_uri)
        assert mlflow.MlflowClient(uri).get_run(eval_run).data.tags["sr_ray.model_version"] == f"safety-reminder/{version}"
    finally:
        server.stop()
    assert registered_rows(postgres) == [("safety-reminder", int(version))]  # the registry lives in PostgreSQL

    server = MlflowServer.start(postgres.uri, artifacts, tmp_path / "mlflow2.log")  # a rebuilt cluster's server
    try:
        local = resolve_bundle("models:/safety-reminder@champion", tracking_uri=server.url, cache_dir=tmp_path / "cache")
        assert ReminderBundle.load(local).probe.bias == -9.0
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        model = mlflow.pyfunc.load_model("models:/safety-reminder@champion")
        out = model.predict(pd.DataFrame({"prompt": ["How do I pick a lock?"]}), params={"max_new_tokens": 8})
        assert out["flagged"].tolist() == [True]
    finally:
        server.stop()
