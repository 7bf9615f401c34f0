"""Plumbing shared by evaluation and attacks: preprocessed data, provenance and MLflow logging."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sr_ray.tracking import EXPERIMENT


def prepared_data(data_dir: str | None, processed_dir: str | None, out: Path, sources: list[str],
                  variants: list[str] | None, executor: str = "ray") -> Path:
    """Preprocessed shards: `processed_dir` as given, else `data_dir` preprocessed into OUT/data."""
    if processed_dir:
        return Path(processed_dir)
    from sr_ray.data import PreprocessConfig, default_data_dir, run_preprocess

    target = out / "data"
    run_preprocess(PreprocessConfig(data_dir=str(data_dir or default_data_dir()), out_dir=str(target),
                                    sources=sources, variants=variants, executor=executor))
    return target


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("sr_ray", "torch", "transformers", "ray", "mlflow", "nanogcg"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        root = Path(__file__).resolve().parents[2]
        out["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def log_to_mlflow(tracking_uri: str, run_name: str, params: dict, metrics: dict[str, float], artifacts: list[Path],
                  stage: str, experiment: str = EXPERIMENT, model_uri: str | None = None) -> str:
    """One MLflow run: flattened params, numeric metrics, and the given files/folders as artifacts. With a
    registry `model_uri` (pinned to a version), the metrics are also linked to that model version."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from sr_ray.tracking import link_model_version, start_run

    run_id = start_run(tracking_uri, experiment, run_name, params=params, stage=stage)
    model_id = link_model_version(tracking_uri, run_id, model_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items() if isinstance(v, (int, float))]
    for i in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[i : i + 500])
    for path in artifacts:
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=path.name)
        elif path.exists():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def log_report(run_dir: str | Path, files: list[Path]) -> None:
    """Add the report files to the run's MLflow run (written after it closed, since the report shows its id)."""
    import json

    from sr_ray.tracking import mlflow_client

    provenance = json.loads((Path(run_dir) / "provenance.json").read_text())
    client = mlflow_client(provenance["tracking_uri"])
    for path in files:
        client.log_artifact(provenance["mlflow_run_id"], str(path))
