"""Ray job entrypoint: craft PGD / adaptive-PGD images or GCG suffixes -> a dataset `evaluate` reads.

    ray job submit --working-dir . -- python pipelines/attack.py pgd-adaptive --config configs/attack.yaml \
        --bundle models:/safety-reminder/latest --data-dir /mnt/shared/data --out /mnt/shared/runs/attack_pgd_adaptive

Attacks run in the driver process (one model, gradient steps); on a GPU node give the job a GPU
(`--entrypoint-num-gpus 1`). Same flags as `sr-ray attack`.
"""

from __future__ import annotations

from sr_ray.cli import pipeline_main
from sr_ray.eval.cli import add_attack_arguments, cmd_attack


def main(argv: list[str] | None = None) -> int:
    return pipeline_main("attack.py", __doc__.splitlines()[0], add_attack_arguments, cmd_attack, argv)


if __name__ == "__main__":
    raise SystemExit(main())
