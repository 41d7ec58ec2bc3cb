#!/usr/bin/env bash
# Set up from nothing and run the main job: a local stack (private redis-server and
# hub), mock GPU machines and a mixed workload, with a summary and an HTML report.
# Extra arguments go to `redisq demo` (see `redisq demo --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="${EXTRAS:-lab}" bash scripts/setup.sh
exec .venv/bin/redisq demo "$@"
