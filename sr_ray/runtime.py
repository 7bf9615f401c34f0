"""Process-wide settings every entry point (CLI, Ray worker, Serve replica) applies first."""

from __future__ import annotations

import logging
import os

# Offline by design: no hub downloads at run time; CPU-friendly threading; no Ray telemetry.
RUNTIME_ENV_VARS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    "SR_RAY_LOG_LEVEL": os.environ.get("SR_RAY_LOG_LEVEL", "INFO"),  # `sr-ray --log-level`, forwarded to workers
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """sr_ray's progress lines to stderr (results stay on stdout), at `level` if given, else
    $SR_RAY_LOG_LEVEL (INFO); the handler is added once per process."""
    logger = logging.getLogger("sr_ray")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("SR_RAY_LOG_LEVEL", "INFO"))
    if level:
        logger.setLevel(level)
        os.environ["SR_RAY_LOG_LEVEL"] = level


def quiet_third_party() -> None:
    """Set the offline/quiet environment for this process (idempotent)."""
    for key, value in RUNTIME_ENV_VARS.items():
        os.environ.setdefault(key, value)
    setup_logging()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def ray_runtime_env(extra: dict | None = None) -> dict:
    """`runtime_env` for ray.init / job submission so workers get the same environment."""
    env = {k: os.environ.get(k, v) for k, v in RUNTIME_ENV_VARS.items()}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return {"env_vars": env}


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Use the running Ray session; else join $RAY_ADDRESS (a `ray job submit` job) or the cluster `ray start`
    began on this node (a command run on a cluster node, outside a job); else start a local one. Joining
    takes no `num_cpus`: Ray refuses to resize an existing cluster.

    A local Ray started here runs its workers at normal priority: Ray's default (nice 15) makes them yield
    to every other process on a shared machine, so a "parallel" run could be slower than the same work in
    one normal-priority process. `dashboard` hosts the State API that Ray Train's controller polls.
    """
    import ray

    if ray.is_initialized():
        return
    from ray._private.services import find_bootstrap_address  # the file ray.init() itself joins through

    if os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None):
        ray.init(runtime_env=ray_runtime_env())
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet that ray.init starts
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=ray_runtime_env())
