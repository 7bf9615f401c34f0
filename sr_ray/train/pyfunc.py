"""The reminder bundle as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/safety-reminder@champion")
.predict(frame)` runs guarded generation.

The model uses pyfunc's loader-module form: the MLmodel names this module and `data/bundle/` holds the bundle
(safetensors + JSON) as is. Nothing is pickled; loading imports the installed `sr_ray` and verifies the
bundle's pinned checksums. The base VLM is named in the model config (`model`, `model_kwargs`), since the
bundle only works on the model it was trained for.
"""

from __future__ import annotations

import base64
import binascii
import io
from importlib.metadata import version
from pathlib import Path

import pandas as pd

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


def bundle_path(model_dir: str | Path) -> Path:
    """The bundle directory inside a pyfunc model directory (its MLmodel's `data`)."""
    from mlflow.models import Model

    conf = Model.load(str(model_dir)).flavors["python_function"]
    return Path(model_dir) / conf["data"]


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
