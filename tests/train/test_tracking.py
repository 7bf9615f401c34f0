"""MLflow plumbing: sqlite store, experiment artifact root, run tags, and the reminder bundle round trip
through the model registry (`models:/<name>/<version|latest|@alias>` and a plain directory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sr_ray.reminder import HarmProbe, ReminderBundle, SoftPrompt
from sr_ray.tracking import (
    default_tracking_uri, ensure_experiment, git_commit, pinned_uri, resolve_bundle, start_run, tracking_uri_for,
)
from sr_ray.train.pyfunc import log_bundle


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return root, default_tracking_uri(root)


def make_bundle(directory: Path, seed: int) -> ReminderBundle:
    g = torch.Generator().manual_seed(seed)
    bundle = ReminderBundle(SoftPrompt(torch.randn(4, 64, generator=g), "tiny-llava"),
                            HarmProbe(torch.randn(64, generator=g), 0.3, base_model_id="tiny-llava"),
                            "tiny-llava", interval=8, threshold=0.25, data_checksum=f"sha-{seed}")
    bundle.save(directory)
    return bundle


def test_store_choice_flag_then_environment_then_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri_for(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri_for(tmp_path) == "http://mlflow.internal:5000"  # every stage follows a team's server
    assert tracking_uri_for(tmp_path, "sqlite:///x.db") == "sqlite:///x.db"


def test_default_store_and_experiment_artifact_root(store):
    root, uri = store
    assert uri == f"sqlite:///{root.resolve()}/mlflow.db"
    from mlflow import MlflowClient

    exp_id = ensure_experiment("exp-a", uri)
    assert ensure_experiment("exp-a", uri) == exp_id  # idempotent
    location = MlflowClient(uri).get_experiment(exp_id).artifact_location
    assert location == (root.resolve() / "mlartifacts" / "exp-a").as_uri()


def test_bundle_round_trips_through_the_registry(store, tmp_path):
    root, uri = store
    first = make_bundle(tmp_path / "b1", seed=1)
    second = make_bundle(tmp_path / "b2", seed=2)
    run_id = start_run(uri, "exp-b", "train", params={"lr": 1e-4, "nested": {"k": 4}}, stage="train")
    v1 = log_bundle(tmp_path / "b1", "reminder-test", model="tiny-llava", run_id=run_id, tracking_uri=uri,
                    aliases=["champion"])
    v2 = log_bundle(tmp_path / "b2", "reminder-test", model="tiny-llava", run_id=run_id, tracking_uri=uri)
    assert (v1, v2) == ("1", "2")
    assert pinned_uri("models:/reminder-test@champion", uri) == "models:/reminder-test/1"
    assert pinned_uri("models:/reminder-test/latest", uri) == "models:/reminder-test/2"

    cache = tmp_path / "cache"
    for uri_ref, expected in (("models:/reminder-test/1", first), ("models:/reminder-test/latest", second),
                              ("models:/reminder-test@champion", first)):
        local = resolve_bundle(uri_ref, tracking_uri=uri, cache_dir=cache)
        loaded = ReminderBundle.load(local)
        assert torch.equal(loaded.soft_prompt.embeddings, expected.soft_prompt.embeddings)
        assert torch.equal(loaded.probe.weight, expected.probe.weight)
        settings = lambda b: (b.base_model_id, b.interval, b.threshold, b.data_checksum)  # noqa: E731
        assert settings(loaded) == settings(expected)
    assert resolve_bundle(str(tmp_path / "b1")) == (tmp_path / "b1").resolve()  # a directory passes through

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    version = client.get_model_version("reminder-test", "1")
    assert version.run_id == run_id
    run = client.get_run(run_id)
    assert run.data.params["nested.k"] == "4"
    assert run.data.tags["sr_ray.stage"] == "train"
    assert run.data.tags["mlflow.source.git.commit"] == git_commit() and len(git_commit()) == 40


def test_resolve_bundle_errors(store, tmp_path):
    _, uri = store
    with pytest.raises(FileNotFoundError, match="is not a directory or an MLflow models:/ URI"):
        resolve_bundle(str(tmp_path / "missing"))
    with pytest.raises(Exception, match="no-such-model"):
        resolve_bundle("models:/no-such-model/latest", tracking_uri=uri)
    with pytest.raises(Exception, match="no-such-model"):
        resolve_bundle("models:/no-such-model@champion", tracking_uri=uri)


def test_preprocess_manifest_is_the_runs_dataset_input(store, tmp_path):
    import json

    from mlflow import MlflowClient

    from sr_ray.data import manifest_checksum
    from sr_ray.data.manifest import log_manifest_input

    _, uri = store
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"rows_written": 12, "rows_quarantined": 1,
                                                    "by_source": {"advbench": 12}, "run": {"seconds": 3}}))
    run_id = start_run(uri, "exp-c", "train", stage="train")
    assert log_manifest_input(uri, run_id, data, "training")
    assert not log_manifest_input(uri, run_id, tmp_path, "training")  # no manifest: nothing logged
    [logged] = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.digest == manifest_checksum(data)[:32]
    assert json.loads(logged.dataset.profile)["rows_written"] == 12
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"
