"""Ray job entrypoint: SAPT on Ray Train + DeepSpeed -> a reminder bundle registered in MLflow.

    ray job submit --working-dir . -- python pipelines/train_sapt.py --config configs/train_sapt.yaml [--preset NAME]

Inside a Ray job the stage joins the job's cluster (data and work dirs must be visible to every node); run
directly, it starts a local Ray. Same flags as `sr-ray train`.
"""

from __future__ import annotations

from sr_ray.train.cli import pipeline_main

if __name__ == "__main__":
    raise SystemExit(pipeline_main("train"))
