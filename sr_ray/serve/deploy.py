"""The typed application builder for Ray Serve's own tooling: `serve deploy configs/serve_deploy.yaml`,
`serve run configs/serve_deploy.yaml`, or a KubeRay RayService with the same `applications:` entry.
(`serve build` only takes an already built application, so it does not apply.)

Serve validates the config file's `args:` against `ServeAppArgs` (unknown keys refused), then the builder
reads the sr_ray config exactly as `sr-ray serve` does (`--set` overrides, every value type-checked) and
returns `build_app(cfg)`: the same two deployments, the bundle pinned to one registry version.

This module has no `from __future__ import annotations`: Serve looks at the builder's annotation as a
class to find the pydantic model.
"""

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from sr_ray.config import config_file, load
from sr_ray.serve.app import build_app
from sr_ray.serve.config import ServeConfig


class ServeAppArgs(BaseModel):
    """The `args:` of the sr_ray application in a Serve config file."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = "configs/serve.yaml"  # the sr_ray serve config (relative: the app's working dir)
    overrides: list[str] = []  # `key.path=value`, as `sr-ray serve --set`


def app_builder(args: ServeAppArgs) -> Application:
    path = config_file(args.config) if args.config else None
    return build_app(load(ServeConfig, path, sets=args.overrides))
