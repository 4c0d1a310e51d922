#!/usr/bin/env bash
# Install scale_diffrec and its test/benchmark tools into ./.venv from the package registries.
# CPU machines (default): torch is pinned to its CPU build and faiss-cpu is used.
# GPU machines: SCALE_DIFFREC_DEVICE=gpu installs the default (CUDA) torch and faiss-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${SCALE_DIFFREC_DEVICE:-cpu}" = gpu ]; then
    .venv/bin/python -m pip install -q -e ".[gpu,test,bench,tune,mlflow]"
else
    .venv/bin/python -m pip install -q torch==2.13.0 -e ".[cpu,test,bench,tune,mlflow]"
fi
