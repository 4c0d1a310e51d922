#!/usr/bin/env bash
# Submit a training job to a Ray cluster:   launch/submit.sh [ADDRESS] -- TRAIN ARGS...
#   launch/submit.sh http://127.0.0.1:8265 -- --config configs/quickstart.yaml --workers 2 --out /tmp/runs/q
# ADDRESS defaults to $RAY_ADDRESS, then to a local head (see launch/local_head.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [ "${1:-}" != "--" ] && [ $# -gt 0 ]; then address="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
exec ray job submit --address "$address" --working-dir . \
    --runtime-env-json '{"excludes": [".venv", "runs", ".git", "benchmarks/results"]}' \
    -- python -m scale_diffrec train "$@"
