#!/usr/bin/env bash
# Start a one-machine Ray head with the job server (needs ray[default]) for launch/submit.sh.
#   NUM_CPUS=4 launch/local_head.sh        # then: launch/submit.sh -- --config ... --workers 2
# Ray 2.60 asks for an auth token on job submission; this head, listening on 127.0.0.1
# only, runs without one (RAY_AUTH_MODE=disabled). Stop it with `ray stop` (which stops every
# Ray process of this user on the machine).
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
ray start --head --num-cpus "${NUM_CPUS:-2}" --node-ip-address 127.0.0.1 \
    --dashboard-host 127.0.0.1 --dashboard-port "${DASHBOARD_PORT:-8265}" \
    --include-dashboard true --disable-usage-stats
echo "submit with: launch/submit.sh http://127.0.0.1:${DASHBOARD_PORT:-8265} -- --config configs/quickstart.yaml --workers 2 --out \$PWD/runs/job"
