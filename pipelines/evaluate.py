"""Ray job entrypoint: every system on every benchmark -> metrics.json, CSVs, plots, report, MLflow run.

    ray job submit --working-dir . -- python pipelines/evaluate.py --config configs/evaluate.yaml \
        --bundle models:/safety-reminder/latest --data-dir /mnt/shared/data --out /mnt/shared/runs/eval

Inside a Ray job it joins the job's cluster (inference actors spread over its nodes); run directly, it
starts a local Ray. Same flags as `sr-ray evaluate`.
"""

from __future__ import annotations

from sr_ray.cli import pipeline_main
from sr_ray.eval.cli import add_evaluate_arguments, cmd_evaluate


def main(argv: list[str] | None = None) -> int:
    return pipeline_main("evaluate.py", __doc__.splitlines()[0], add_evaluate_arguments, cmd_evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
