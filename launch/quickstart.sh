#!/usr/bin/env bash
# The embedded default, end to end: install, train on the built-in synthetic catalogue,
# evaluate, export a FAISS bundle and print a sample recommendation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
run=runs/quickstart
.venv/bin/scale-diffrec train --config configs/quickstart.yaml --out "$run" --overwrite "$@"
.venv/bin/scale-diffrec evaluate --run "$run" --split test
.venv/bin/scale-diffrec export --run "$run" --out "$run/index"
.venv/bin/scale-diffrec recommend --index "$run/index" --items 1,2,3,5,8 -k 10
