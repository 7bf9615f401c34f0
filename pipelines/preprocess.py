"""Ray job entrypoint: benchmarks -> validated Parquet shards + manifest.

    ray job submit --working-dir . -- python pipelines/preprocess.py --config configs/preprocess.yaml \
        --data-dir /mnt/shared/data --out /mnt/shared/runs/data

Inside a Ray job the pipeline joins the job's cluster (the data dir must be visible to every node);
run directly, it starts a local Ray. Same flags as `sr-ray preprocess`.
"""

from __future__ import annotations

from sr_ray.cli import pipeline_main
from sr_ray.data.cli import add_preprocess_arguments, cmd_preprocess


def main(argv: list[str] | None = None) -> int:
    return pipeline_main("preprocess.py", __doc__.splitlines()[0], add_preprocess_arguments, cmd_preprocess, argv)


if __name__ == "__main__":
    raise SystemExit(main())
