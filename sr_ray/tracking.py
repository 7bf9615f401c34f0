"""MLflow plumbing every stage shares: the default sqlite store, one experiment naming scheme and tag set,
and the one resolver from a bundle source (a directory or a registry URI) to a local bundle directory.

Every stage logs into the experiment `sr-ray` (configurable) with the tags `sr_ray.stage` and
`mlflow.source.git.commit`. Training registers a bundle (`sr_ray.train.pyfunc.log_bundle`) as an MLflow 3
LoggedModel holding a pyfunc model (MLmodel, signature, input example, the bundle's safetensors + JSON under
`data/`, nothing pickled), then as a version of a registered model: `models:/<name>/<version>`,
`models:/<name>/latest` and `models:/<name>@<alias>` all resolve to it, here, for evaluation, Serve and
`sr-ray generate`. This module imports no other sr_ray module: it sits below all of them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

EXPERIMENT = "sr-ray"
STAGE_TAG = "sr_ray.stage"
BUNDLE_MODEL_TYPE = "sr_ray.reminder_bundle"
MODEL_ID_TAG = "sr_ray.logged_model_id"
REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def git_commit() -> str | None:
    """The source checkout's commit (None outside a git checkout, e.g. an installed wheel)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tags(stage: str, extra: dict | None = None) -> dict:
    """The tag set of every sr_ray run: its stage and the code's git commit (MLflow's own tag names)."""
    tags = {STAGE_TAG: stage, "mlflow.source.type": "JOB"}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags | (extra or {})


def default_tracking_uri(root: str | Path) -> str:
    """sqlite store at `<root>/mlflow.db` (the file store is in maintenance mode in MLflow 3)."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def tracking_uri_for(root: str | Path, tracking_uri: str | None = None) -> str:
    """The given store, else $MLFLOW_TRACKING_URI (a team's server), else a sqlite store under `root`."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def mlflow_client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(name: str, tracking_uri: str, artifact_location: str | Path | None = None) -> str:
    """Experiment id of `name`, created if needed, always with an explicit artifact root.

    For a sqlite store the default root is `<db dir>/mlartifacts/<name>`; without it, artifacts logged from a
    Ray worker land in that worker's temporary directory (MLflow resolves `./mlruns` against the worker's cwd).
    """
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        artifact_location = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name
    if artifact_location is not None and "://" not in str(artifact_location):
        artifact_location = Path(artifact_location).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location and str(artifact_location))
    except Exception:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict | None = None, *, stage: str,
              tags: dict | None = None) -> str:
    """Create a run (not made active in this process) with `run_tags(stage)` and flattened `params`; returns
    its id."""
    from mlflow.entities import Param

    client = mlflow_client(tracking_uri)
    run = client.create_run(ensure_experiment(experiment, tracking_uri), run_name=run_name,
                            tags=run_tags(stage, tags))
    flat = [Param(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    return run.info.run_id


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def registry_version(uri: str, tracking_uri: str | None = None):
    """The `ModelVersion` a `models:/name/<version|latest>` or `models:/name@alias` URI names now."""
    client = mlflow_client(tracking_uri)
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = ref.rpartition("/")
    if not name:
        raise ValueError(f"{uri}: expected models:/<name>/<version|latest> or models:/<name>@<alias>")
    if version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"{uri}: no versions of registered model {name!r}")
        version = str(max(int(v.version) for v in versions))
    return client.get_model_version(name, version)


def link_model_version(tracking_uri: str, run_id: str, model_uri: str | None) -> str | None:
    """Record that run `run_id` measured the registered version `model_uri` names (tag `sr_ray.model_version`,
    the LoggedModel as a run input); returns that LoggedModel's id, to which the run's metrics are then linked
    (None for a plain directory)."""
    from mlflow.entities import LoggedModelInput

    if not (model_uri or "").startswith("models:/"):
        return None
    version = registry_version(model_uri, tracking_uri)
    client = mlflow_client(tracking_uri)
    client.set_tag(run_id, "sr_ray.model_version", f"{version.name}/{version.version}")
    model_id = version.tags.get(MODEL_ID_TAG)
    if model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    return model_id


def pinned_uri(uri: str, tracking_uri: str | None = None) -> str:
    """`models:/name/<number>` for any registry URI (an alias or `latest` resolved now); other sources as is."""
    if not uri.startswith("models:/"):
        return uri
    version = registry_version(uri, tracking_uri)
    return f"models:/{version.name}/{version.version}"


def resolve_bundle(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local bundle directory for `uri`: a directory as is, or `models:/...` downloaded (and cached).

    The download is verified later by `ReminderBundle.load` (pinned checksums of both parts).
    """
    import mlflow

    if Path(uri).expanduser().is_dir():
        return Path(uri).expanduser().resolve()
    if not uri.startswith("models:/"):
        raise FileNotFoundError(f"reminder bundle {uri!r} is not a directory or an MLflow models:/ URI")
    found = registry_version(uri, tracking_uri)
    name, version = found.name, str(found.version)
    cache = Path(cache_dir or os.environ.get("SR_RAY_CACHE") or Path.home() / ".cache" / "sr_ray") / "bundles"
    import hashlib

    from mlflow.tracking import get_tracking_uri

    store = hashlib.sha256((tracking_uri or get_tracking_uri()).encode()).hexdigest()[:12]  # versions are per store
    final = cache / store / name / version
    if (final / "MLmodel").exists():
        return _bundle_in(final, uri, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=final.parent))
    try:
        # Through the version's storage location: `models:/` downloads consult the global registry URI.
        source = mlflow_client(tracking_uri).get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri))
        _bundle_in(local, uri, version)
        try:
            os.rename(local, final)
        except OSError:  # another process finished the same download first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _bundle_in(final, uri, version)


def bundle_path(model_dir: str | Path) -> Path:
    """The bundle directory inside a pyfunc model directory (its MLmodel's `data`)."""
    from mlflow.models import Model

    conf = Model.load(str(model_dir)).flavors["python_function"]
    return Path(model_dir) / conf["data"]


def _bundle_in(model_dir: Path, uri: str, version: str) -> Path:
    if not (model_dir / "MLmodel").exists():
        raise ValueError(f"{uri} (version {version}) is not a reminder bundle model: no MLmodel")
    bundle = bundle_path(model_dir)
    if not (bundle / "bundle.json").exists():
        raise ValueError(f"{uri} (version {version}) is not a reminder bundle: no bundle.json in {bundle}")
    return bundle
