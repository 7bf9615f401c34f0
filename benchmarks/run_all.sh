#!/usr/bin/env bash
# Runs the side-by-side benchmarks with the settings the docs report and writes their JSON to
# benchmarks/results/. Run it on a quiet machine (each JSON records the load average): every figure is a
# ratio of two variants timed in the same run, and a busy neighbour moves both, not the ratio alone.
#   bash benchmarks/run_all.sh [DATA_DIR]        # DATA_DIR defaults to ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
OUT=benchmarks/results
SR=${SR_RAY:-.venv/bin/sr-ray}
mkdir -p "$OUT"
"$SR" bench data --data-dir "$DATA_DIR" --trials 3 --out "$OUT/data.json"
"$SR" bench guard --model smol-llava --new-tokens 256 --interval 16 --image-tokens 576 --repeats 1 \
    --out "$OUT/guard_smol_llava.json"
"$SR" bench serve --model smol-llava --out "$OUT/serve_smol_llava.json"
"$SR" bench batch --model smol-llava --rows 16 --max-new-tokens 96 --repeats 1 --out "$OUT/batch_smol_llava.json"
"$SR" bench serve --workload mixed --model smol-llava --requests 24 --rate 0.15 \
    --out "$OUT/serve_mixed_smol_llava.json"
"$SR" bench serve --workload mixed --model smol-llava --requests 24 --rate 0.3 \
    --out "$OUT/serve_mixed_smol_llava_rate03.json"
"$(dirname "$SR")/python" benchmarks/cli_help.py --repeats 5 --out "$OUT/cli_help.json"
