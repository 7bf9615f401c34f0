"""Training: on-policy rollouts, the harm probe fit, and SAPT on Ray Train + DeepSpeed, tracked in MLflow.

    from sr_ray.train import RolloutConfig, ProbeFitConfig, SaptConfig, run_rollout, run_fit_probe, run_sapt
    rollout = run_rollout(RolloutConfig(data_dir="runs/data"))                 # -> parquet of preference rows
    probe_dir, metrics = run_fit_probe(ProbeFitConfig(data_dir="runs/data"))  # -> HarmProbe dir, val AUC
    bundle_dir, run_id, version = run_sapt(SaptConfig(train_data=[str(rollout)], probe=str(probe_dir)))
"""

from sr_ray.train.config import ProbeFitConfig, RecordSelection, RolloutConfig, SaptConfig
from sr_ray.train.probe_fit import run_fit_probe
from sr_ray.train.rollout import run_rollout
from sr_ray.train.pyfunc import log_bundle
from sr_ray.train.trainer import run_sapt

__all__ = [
    "ProbeFitConfig", "RecordSelection", "RolloutConfig", "SaptConfig", "log_bundle", "run_fit_probe", "run_rollout",
    "run_sapt",
]
