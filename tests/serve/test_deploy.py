"""Serve's own tooling runs the app: configs/serve_deploy.yaml is a valid Serve config file whose `args`
the typed builder accepts, and the builder, called the way `serve deploy` / `serve run` call it (Ray's
`call_user_app_builder_with_args_if_necessary`), turns args into the two deployments, refusing bad args
before anything is built."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from sr_ray.config_types import ConfigError
from sr_ray.serve.deploy import ServeAppArgs, app_builder
from tests.bundles import constant_probe_bundle

REPO = Path(__file__).resolve().parents[2]


def deployments(app) -> dict:
    """name -> ray_actor_options of an Application's deployments."""
    ingress = app._bound_deployment
    [model] = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    return {d.name: d.ray_actor_options for d in (ingress, model)}


def test_deploy_file_is_a_serve_config_with_valid_builder_args():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "configs/serve_deploy.yaml").read_text()))
    [app] = schema.applications
    assert app.import_path == "sr_ray.serve.deploy:app_builder"
    args = ServeAppArgs.model_validate(app.args)
    assert "model_deployment.num_gpus=1" in args.overrides
    assert (REPO / args.config).is_file()


def test_builder_builds_the_app_from_args(tiny_llava, tmp_path):
    bundle = constant_probe_bundle(tiny_llava, tmp_path / "b", bias=2.5)
    args = {"config": "configs/serve.yaml",
            "overrides": ["model=tiny-llava", f"bundle={bundle}", "model_deployment.num_gpus=1", "audit_log=null"]}
    app = call_user_app_builder_with_args_if_necessary(app_builder, args)
    options = deployments(app)
    assert options["GuardedModel"]["num_gpus"] == 1 and options["GuardedIngress"]["num_gpus"] == 0
    with pytest.raises(pydantic.ValidationError, match="bogus"):
        call_user_app_builder_with_args_if_necessary(app_builder, {"bogus": 1})
    with pytest.raises(ConfigError, match="port: expected int"):
        call_user_app_builder_with_args_if_necessary(app_builder, {"overrides": ["port=abc"]})

