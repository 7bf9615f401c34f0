"""Ray job entrypoint: benchmarks -> validated Parquet shards + manifest.

    ray job submit --working-dir . -- python pipelines/preprocess.py --config configs/preprocess.yaml \
        --data-dir /mnt/shared/data --out /mnt/shared/runs/data

Inside a Ray job the pipeline joins the job's cluster (the data dir must be visible to every node);
run directly, it starts a local Ray. Same flags as `sr-ray preprocess`.
"""

from __future__ import annotations

import argparse

from sr_ray.data.cli import add_preprocess_arguments, cmd_preprocess
from sr_ray.runtime import quiet_third_party


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/preprocess.yaml")
    add_preprocess_arguments(parser)
    return cmd_preprocess(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
