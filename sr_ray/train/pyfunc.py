"""The reminder bundle as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/safety-reminder@champion")
.predict(frame)` runs guarded generation.

The model uses pyfunc's loader-module form: the MLmodel names this module and `data/bundle/` holds the bundle
(safetensors + JSON) as is. Nothing is pickled; loading imports the installed `sr_ray` and verifies the
bundle's pinned checksums. The base VLM is named in the model config (`model`, `model_kwargs`), since the
bundle only works on the model it was trained for. `log_bundle` registers it (`sr_ray.tracking` resolves it).
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from importlib.metadata import version
from pathlib import Path

import pandas as pd

from sr_ray.tracking import BUNDLE_MODEL_TYPE, MODEL_ID_TAG, mlflow_client

PREDICT_PARAMS = {"max_new_tokens": 256, "guard": True}
INPUT_EXAMPLE = pd.DataFrame({"prompt": ["How do I bake bread?"], "image": [""]})
PINNED = ("torch", "transformers", "safetensors", "mlflow")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False)])
    outputs = Schema([ColSpec("string", "text"), ColSpec("boolean", "flagged"), ColSpec("long", "flagged_at"),
                      ColSpec("string", "finish_reason")])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", PREDICT_PARAMS["max_new_tokens"]),
                          ParamSpec("guard", "boolean", PREDICT_PARAMS["guard"])])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def save_pyfunc(bundle_dir: str | Path, path: str | Path, model: str, model_kwargs: dict | None = None) -> Path:
    """Write the pyfunc model directory (MLmodel, signature, input example, data/bundle) to `path`.

    `save_model` (not `log_model`): logging would load the VLM to check the input example, a 7B model on
    the job driver. The requirements are pinned here so MLflow does not load the model to infer them.
    """
    import mlflow

    mlflow.pyfunc.save_model(
        str(path), loader_module=__name__, data_path=str(bundle_dir), signature=signature(),
        input_example=(INPUT_EXAMPLE, PREDICT_PARAMS), model_config={"model": model, "model_kwargs": model_kwargs or {}},
        pip_requirements=[f"{p}=={version(p)}" for p in ("sr_ray", *PINNED)],
    )
    return Path(path)


def log_bundle(bundle_dir: str | Path, name: str, *, model: str, model_kwargs: dict | None = None,
               run_id: str, tracking_uri: str | None = None, tags: dict | None = None,
               aliases: list[str] = ()) -> str:
    """Log `bundle_dir` as a pyfunc LoggedModel (linked to `run_id`, guarded generation on `model`), register
    it under `name` and point `aliases` at the new version; returns the version."""
    import mlflow

    client = mlflow_client(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name="reminder_bundle", source_run_id=run_id,
                                        model_type=BUNDLE_MODEL_TYPE, tags=tags)
    with tempfile.TemporaryDirectory(prefix="sr_ray-pyfunc-") as tmp:
        client.log_model_artifacts(logged.model_id, str(save_pyfunc(bundle_dir, Path(tmp) / "model", model, model_kwargs)))
    client.finalize_logged_model(logged.model_id, "READY")
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    # The source is the model's artifact location, not `models:/<model_id>`: the sqlite registry resolves the
    # latter through the process-global tracking URI, which may point at another store.
    # The model id is also a version tag: the SQL registry stores (and returns) no model_id.
    version = client.create_model_version(name, source=client.get_logged_model(logged.model_id).artifact_location,
                                          run_id=run_id, model_id=logged.model_id,
                                          tags=(tags or {}) | {MODEL_ID_TAG: logged.model_id})
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def _decode_image(text):
    from PIL import Image

    if text is None or (isinstance(text, float) and pd.isna(text)) or text == "":
        return None
    try:
        return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")
    except (binascii.Error, OSError) as err:
        raise ValueError(f"image: not a base64-encoded image ({err})") from None


class GuardedPyfuncModel:
    """What `mlflow.pyfunc.load_model` wraps: the VLM, the verified bundle and a guarded generator."""

    def __init__(self, bundle_dir: str | Path, model: str, model_kwargs: dict | None = None):
        from sr_ray.models import load_vlm
        from sr_ray.reminder import GuardedGenerator, ReminderBundle

        self.vlm = load_vlm(model, **(model_kwargs or {}))
        self.bundle = ReminderBundle.load(bundle_dir, self.vlm)
        self.generator = GuardedGenerator(self.vlm, self.bundle.soft_prompt, self.bundle.probe,
                                          self.bundle.guard_config())

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from sr_ray.models import Prompt
        from sr_ray.reminder import SamplingConfig

        params = PREDICT_PARAMS | (params or {})
        images = model_input["image"] if "image" in model_input else [None] * len(model_input)
        prompts = [Prompt(str(text), _decode_image(image)) for text, image in zip(model_input["prompt"], images)]
        outs = self.generator.generate(prompts, SamplingConfig(max_new_tokens=int(params["max_new_tokens"])),
                                       guard=bool(params["guard"]))
        return pd.DataFrame({"text": [o.text for o in outs], "flagged": [o.flagged for o in outs],
                             "flagged_at": [-1 if o.flagged_at is None else o.flagged_at for o in outs],
                             "finish_reason": [o.finish_reason for o in outs]})


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> GuardedPyfuncModel:
    config = model_config or {}
    return GuardedPyfuncModel(data_path, config["model"], config.get("model_kwargs"))
