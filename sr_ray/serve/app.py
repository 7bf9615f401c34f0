"""The Ray Serve application: an autoscaled FastAPI ingress in front of autoscaled, batching model replicas.

    client --HTTP--> Serve proxy --> GuardedIngress (auth, validation, SSE, metrics, audit)
                                         --handle, streaming--> GuardedModel (VLM + reminder, scheduler)

The ingress re-sends a request to another model replica when the one serving it dies before any text
reached the client (see `api.Call`); a stream that already showed text fails with an in-band error.
Backpressure: beyond `max_ongoing_requests` per replica, at most `max_queued_requests` wait at each
caller; more get 503 with Retry-After (`BackPressureError` from the handle). A replica's `check_health`
fails when its decode loop is stuck. Replicas shut down gracefully for longer than the request timeout,
so a downscale lets every admitted answer finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from sr_ray.runtime import ensure_ray, quiet_third_party, ray_runtime_env
from sr_ray.serve.api import create_api
from sr_ray.serve.budget import Busy
from sr_ray.serve.config import ServeConfig
from sr_ray.serve.model import GenerationJob, GuardedModel

REPLICA_LOST = (RayActorError, ActorUnavailableError)


@serve.ingress()
class GuardedIngress:
    def __init__(self, cfg: ServeConfig, model: DeploymentHandle):
        quiet_third_party()
        self.cfg, self.model = cfg, model.options(stream=True)

    def __serve_build_asgi_app__(self):
        return create_api(self.cfg, self.generate, retry_on=REPLICA_LOST, proxy_sets_request_id=True)

    async def generate(self, job: GenerationJob):
        response = self.model.generate.remote(job)
        try:
            async for item in response:
                yield item
        except BackPressureError as err:
            raise Busy(f"the model replicas are at capacity: {err}") from None
        except (GeneratorExit, asyncio.CancelledError):  # closed early (client gone, timeout): free the row
            with contextlib.suppress(Exception):  # best effort; an unassigned request raises its own cancel
                response.cancel()
            raise


def pin_bundle(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with a `models:/name@alias` or `/latest` bundle resolved to its version number, once, here on
    the driver: every replica then loads that version, even if the alias moves while they start."""
    if not (cfg.bundle or "").startswith("models:/"):
        return cfg
    from sr_ray.tracking import pinned_uri

    return dataclasses.replace(cfg, bundle=pinned_uri(cfg.bundle, cfg.tracking_uri))


def build_app(cfg: ServeConfig):
    """The bound Serve application for `serve.run` (deployment options from `cfg`; the bundle pinned)."""
    cfg = pin_bundle(cfg.validate())
    runtime_env = ray_runtime_env()
    m, i = cfg.model_deployment, cfg.ingress_deployment
    drain_s = cfg.limits.request_timeout_s + 30  # longer than any admitted request may run
    model = serve.deployment(GuardedModel).options(
        name="GuardedModel", autoscaling_config=m.autoscaling_config(), max_ongoing_requests=m.max_ongoing_requests,
        max_queued_requests=m.max_queued_requests, graceful_shutdown_timeout_s=drain_s,
        ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus, "runtime_env": runtime_env},
        health_check_period_s=5)
    ingress = serve.deployment(GuardedIngress).options(
        name="GuardedIngress", autoscaling_config=i.autoscaling_config(), max_ongoing_requests=i.max_ongoing_requests,
        max_queued_requests=i.max_queued_requests, graceful_shutdown_timeout_s=drain_s,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
        ray_actor_options={"num_cpus": i.num_cpus, "num_gpus": i.num_gpus, "runtime_env": runtime_env})
    return ingress.bind(cfg, model.bind(cfg))


def preflight(cfg: ServeConfig) -> None:
    """What can be checked before Ray starts, so a typo fails in a second with its reason, not after Ray
    and Serve came up: the config's rules, the reminder bundle or probe loaded (checksums verified; a
    `models:/` URI is resolved through MLflow), the audit log's directory created."""
    from sr_ray.reminder import HarmProbe, ReminderBundle
    from sr_ray.serve.audit import node_path
    from sr_ray.tracking import resolve_bundle

    cfg.validate()
    if cfg.bundle:
        ReminderBundle.load(resolve_bundle(cfg.bundle, cfg.tracking_uri))
    elif cfg.probe:
        HarmProbe.load(cfg.probe)
    if cfg.audit_log:
        node_path(cfg.audit_log).parent.mkdir(parents=True, exist_ok=True)


def start(cfg: ServeConfig, ray_address: str | None = None) -> str:
    """Check `cfg` (`preflight`), join Ray (the running session, `ray_address`, $RAY_ADDRESS, else a local
    one with workers at normal priority), start Serve's HTTP proxy on cfg.host:cfg.port, deploy; return
    the base URL."""
    cfg = pin_bundle(cfg)
    preflight(cfg)
    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port,
                              "request_timeout_s": cfg.limits.request_timeout_s + 30})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def serve_forever(cfg: ServeConfig, ray_address: str | None = None) -> None:
    url = start(cfg, ray_address)
    print(f"sr_ray guarded VLM serving {cfg.model_name!r} at {url}/v1 (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(cfg.app_name)
