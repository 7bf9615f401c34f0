"""Ray job entrypoint: every system on every benchmark -> metrics.json, CSVs, plots, report, MLflow run.

    ray job submit --working-dir . -- python pipelines/evaluate.py --config configs/evaluate.yaml \
        --bundle models:/safety-reminder/latest --data-dir /mnt/shared/data --out /mnt/shared/runs/eval

Inside a Ray job it joins the job's cluster (inference actors spread over its nodes); run directly, it
starts a local Ray. Same flags as `sr-ray evaluate`.
"""

from __future__ import annotations

import argparse

from sr_ray.eval.cli import add_evaluate_arguments, cmd_evaluate
from sr_ray.runtime import quiet_third_party


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_evaluate_arguments(parser)
    return cmd_evaluate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
