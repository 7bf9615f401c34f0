"""MLflow plumbing: the default sqlite store, experiments with a fixed artifact root, and the reminder bundle
as a registered model version that Serve and evaluation resolve with `resolve_bundle`.

The bundle is registered as an MLflow 3 LoggedModel holding the bundle directory as plain artifacts (no
flavor, no pickled Python object), then as a version of a registered model: `models:/<name>/<version>`,
`models:/<name>/latest` and `models:/<name>@<alias>` all download to the same safetensors + JSON layout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BUNDLE_MODEL_TYPE = "sr_ray.reminder_bundle"


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
    Ray worker land in that worker's temporary directory (environment.md §5).
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


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict | None = None, tags: dict | None = None) -> str:
    """Create a run (not made active in this process) and log flattened `params`; returns its id."""
    from mlflow.entities import Param

    client = mlflow_client(tracking_uri)
    run = client.create_run(ensure_experiment(experiment, tracking_uri), run_name=run_name, tags=tags or {})
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


def log_bundle(bundle_dir: str | Path, name: str, *, run_id: str | None = None, tracking_uri: str | None = None,
               tags: dict | None = None) -> str:
    """Log `bundle_dir` as a LoggedModel (linked to `run_id`) and register it under `name`; returns the version."""
    import mlflow

    client = mlflow_client(tracking_uri)
    run_id = run_id or mlflow.active_run().info.run_id
    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name="reminder_bundle", source_run_id=run_id,
                                       model_type=BUNDLE_MODEL_TYPE, tags=tags)
    client.log_model_artifacts(model.model_id, str(bundle_dir))
    client.finalize_logged_model(model.model_id, "READY")
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    # The source is the model's artifact location, not `models:/<model_id>`: the sqlite registry resolves the
    # latter through the process-global tracking URI, which may point at another store.
    version = client.create_model_version(name, source=client.get_logged_model(model.model_id).artifact_location,
                                          run_id=run_id, model_id=model.model_id, tags=tags)
    return str(version.version)


def _registry_version(uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """(name, version number) of a `models:/name/<version|latest>` or `models:/name@alias` URI."""
    client = mlflow_client(tracking_uri)
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = ref.rpartition("/")
    if not name:
        raise ValueError(f"{uri}: expected models:/<name>/<version|latest> or models:/<name>@<alias>")
    if version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"{uri}: no versions of registered model {name!r}")
        version = str(max(int(v.version) for v in versions))
    return name, version


def resolve_bundle(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local bundle directory for `uri`: a directory as is, or `models:/...` downloaded (and cached).

    The download is verified later by `ReminderBundle.load` (pinned checksums of both parts).
    """
    import mlflow

    if Path(uri).expanduser().is_dir():
        return Path(uri).expanduser().resolve()
    if not uri.startswith("models:/"):
        raise FileNotFoundError(f"reminder bundle {uri!r}: not a directory and not a models:/ URI")
    name, version = _registry_version(uri, tracking_uri)
    cache = Path(cache_dir or os.environ.get("SR_RAY_CACHE") or Path.home() / ".cache" / "sr_ray") / "bundles"
    import hashlib

    from mlflow.tracking import get_tracking_uri

    store = hashlib.sha256((tracking_uri or get_tracking_uri()).encode()).hexdigest()[:12]  # versions are per store
    final = cache / store / name / version
    if (final / "bundle.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=final.parent))
    try:
        # Through the version's storage location: `models:/` downloads consult the global registry URI.
        source = mlflow_client(tracking_uri).get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri))
        if not (local / "bundle.json").exists():
            raise ValueError(f"{uri} (version {version}) is not a reminder bundle: no bundle.json")
        try:
            os.rename(local, final)
        except OSError:  # another process finished the same download first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
