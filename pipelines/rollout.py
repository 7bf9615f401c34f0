"""Ray job entrypoint: On-policy rollouts of the base VLM -> preference rows (Ray Data actor pool).

    ray job submit --working-dir . -- python pipelines/rollout.py --config configs/rollout.yaml [--preset NAME]

Inside a Ray job the stage joins the job's cluster (data and work dirs must be visible to every node); run
directly, it starts a local Ray. Same flags as `sr-ray rollout`.
"""

from __future__ import annotations

from sr_ray.train.cli import pipeline_main

if __name__ == "__main__":
    raise SystemExit(pipeline_main("rollout"))
