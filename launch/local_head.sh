#!/usr/bin/env bash
# Start a one-machine Ray head with the job server (needs ray[default]); stop with `ray stop`.
# Ray 2.60 asks for an auth token on job submission; a local head for testing runs without.
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
ray start --head --num-cpus "${NUM_CPUS:-2}" --dashboard-host 127.0.0.1 --dashboard-port 8265 \
    --include-dashboard true --disable-usage-stats
echo "submit with: RAY_AUTH_MODE=$RAY_AUTH_MODE launch/submit.sh -- --config configs/quickstart.yaml --workers 2 --out \$PWD/runs/job"
