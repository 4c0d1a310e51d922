#!/usr/bin/env bash
# Submit a training job to a Ray cluster's job server:   launch/submit.sh [ADDRESS] -- TRAIN ARGS...
#   launch/submit.sh http://127.0.0.1:8265 -- --config configs/quickstart.yaml --workers 2 --out /tmp/runs/q
# ADDRESS is the job server (dashboard) address, http://HOST:8265; it defaults to
# $RAY_ADDRESS, then to a local head (launch/local_head.sh). The repository is uploaded as the
# job's working directory (without .venv, runs, .git, caches); the job runs
# `python -m scale_diffrec train TRAIN ARGS` on the head, whose python must have the
# package's dependencies (launch/install.sh), and joins the cluster from there.
# --out must be an absolute path on storage that every node sees (a local path for one node).
# Ray 2.60 authenticates job submission with a token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)
# unless the head was started with RAY_AUTH_MODE=disabled (launch/local_head.sh does that).
set -euo pipefail
cd "$(dirname "$0")/.."
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [ "${1:-}" != "--" ] && [ $# -gt 0 ]; then address="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
exec ray job submit --address "$address" --working-dir . \
    --runtime-env-json '{"excludes": [".venv", "runs", ".git", ".notes", "benchmarks/results", "**/__pycache__", "*.egg-info", ".pytest_cache"]}' \
    -- python -m scale_diffrec train "$@"
