"""Ray job entrypoint: deploy the guarded OpenAI-compatible VLM endpoint on the job's cluster.

    ray job submit --working-dir . -- python pipelines/serve.py --config configs/serve.yaml \
        --bundle models:/safety-reminder@champion --set tracking_uri=$MLFLOW_TRACKING_URI

Inside a Ray job it joins the job's cluster; Serve applications outlive the job's driver, so without
`--block` the entrypoint returns once the app is running (`serve status` / `serve shutdown` manage it
afterwards). Run directly, it starts a local Ray, which lives only as long as this process: it blocks
until Ctrl-C. Same flags as `sr-ray serve`.
"""

from __future__ import annotations

import argparse
import os

from sr_ray.runtime import quiet_third_party
from sr_ray.serve.cli import add_config_args, checked_config


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--address", default=None, help="Ray cluster (default: the job's, else a local one)")
    parser.add_argument("--block", action="store_true", help="keep the driver alive until Ctrl-C (always with a local Ray)")
    args = parser.parse_args(argv)
    cfg = checked_config(args)
    from sr_ray.serve.app import serve_forever, start

    if args.block or not (args.address or os.environ.get("RAY_ADDRESS")):
        serve_forever(cfg, args.address)
    else:
        print(f"serving {cfg.model_name!r} at {start(cfg, args.address)}/v1", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
