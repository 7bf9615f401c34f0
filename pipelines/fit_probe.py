"""Ray job entrypoint: Fit the harm probe (PCA-20 -> first 4 -> logistic regression) with val AUC and an ROC plot.

    ray job submit --working-dir . -- python pipelines/fit_probe.py --config configs/fit_probe.yaml [--preset NAME]

Inside a Ray job the stage joins the job's cluster (data and work dirs must be visible to every node); run
directly, it starts a local Ray. Same flags as `sr-ray fit-probe`.
"""

from __future__ import annotations

from sr_ray.train.cli import pipeline_main

if __name__ == "__main__":
    raise SystemExit(pipeline_main("fit-probe"))
