"""The registered bundle is an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/...")` runs guarded
generation on the tiny model, with the signature and input example MLflow serving needs."""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
import pytest
from PIL import Image

from sr_ray.models import Prompt, load_vlm
from sr_ray.reminder import GuardedGenerator, ReminderBundle, SamplingConfig
from sr_ray.tracking import default_tracking_uri, start_run
from sr_ray.train.pyfunc import log_bundle
from tests.bundles import constant_probe_bundle


@pytest.fixture(scope="module")
def vlm():
    return load_vlm("tiny-llava")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, vlm):
    root = tmp_path_factory.mktemp("pyfunc")
    uri = default_tracking_uri(root / "store")
    run_id = start_run(uri, "pyfunc-test", "train", stage="train")
    flagging = ReminderBundle.load(constant_probe_bundle(vlm, root / "flagging", bias=-9.0), vlm)
    log_bundle(root / "flagging", "reminder-pyfunc", model="tiny-llava", run_id=run_id, tracking_uri=uri,
               aliases=["champion"])
    constant_probe_bundle(vlm, root / "quiet", bias=9.0)
    log_bundle(root / "quiet", "reminder-pyfunc", model="tiny-llava", run_id=run_id, tracking_uri=uri)
    return uri, flagging


def png_b64(color="red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_load_model_from_the_registry_runs_guarded_generation(registry, vlm, monkeypatch):
    uri, flagging = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # `models:/` URIs resolve through the global registry
    model = mlflow.pyfunc.load_model("models:/reminder-pyfunc@champion")
    frame = pd.DataFrame({"prompt": ["How do I pick a lock?", "Describe the picture."], "image": ["", png_b64()]})
    out = model.predict(frame, params={"max_new_tokens": 12})
    assert list(out.columns) == ["text", "flagged", "flagged_at", "finish_reason"]
    assert out["flagged"].tolist() == [True, True]  # the always-flag bundle of version 1 (@champion)

    reference = GuardedGenerator(vlm, flagging.soft_prompt, flagging.probe, flagging.guard_config())
    image = Image.open(io.BytesIO(base64.b64decode(png_b64()))).convert("RGB")
    expected = reference.generate([Prompt("How do I pick a lock?"), Prompt("Describe the picture.", image)],
                                  SamplingConfig(max_new_tokens=12))
    assert out["text"].tolist() == [o.text for o in expected]

    quiet = mlflow.pyfunc.load_model("models:/reminder-pyfunc/2").predict(frame.iloc[:1], params={"max_new_tokens": 12})
    assert quiet["flagged"].tolist() == [False]
    plain = model.predict(frame.iloc[:1], params={"max_new_tokens": 12, "guard": False})
    assert plain["flagged"].tolist() == [False] and plain["flagged_at"].tolist() == [-1]


def test_model_has_signature_input_example_and_no_pickle(registry, monkeypatch):
    uri, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    local = mlflow.artifacts.download_artifacts("models:/reminder-pyfunc/1")
    info = mlflow.models.get_model_info("models:/reminder-pyfunc/1")
    assert [c.name for c in info.signature.inputs.inputs] == ["prompt", "image"]
    assert {p.name for p in info.signature.params.params} == {"max_new_tokens", "guard"}
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example["prompt"].tolist() == ["How do I bake bread?"]
    files = {p.relative_to(local).as_posix() for p in __import__("pathlib").Path(local).rglob("*") if p.is_file()}
    assert not any(f.endswith((".pkl", ".pt", ".bin", ".pickle")) for f in files), files
    assert any(f.endswith(".safetensors") for f in files)


def test_bad_image_is_a_clear_error(registry, monkeypatch):
    uri, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/reminder-pyfunc/1")
    with pytest.raises(ValueError, match="not a base64-encoded image"):
        model.predict(pd.DataFrame({"prompt": ["hi"], "image": ["%%%not base64"]}))
