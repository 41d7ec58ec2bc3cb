#!/usr/bin/env bash
# Set up from nothing and run every check: ruff, ruff format, mypy, the tests
# (each against a private redis-server the session starts) and the notebooks
# under nbval. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WITH_BROWSER="${WITH_BROWSER:-1}" bash scripts/setup.sh
PY=.venv/bin/python

echo "== ruff check"; $PY -m ruff check .
echo "== ruff format --check"; $PY -m ruff format --check .
echo "== mypy"; $PY -m mypy -p redisq_server -p redisq_lab
echo "== pytest"
set +e
$PY -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
