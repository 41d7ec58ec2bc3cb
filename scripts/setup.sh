#!/usr/bin/env bash
# Prepare this checkout from nothing: system packages (redis-server, valgrind for
# the benchmarks' instruction counts, and chromium when asked with WITH_BROWSER=1), a virtualenv in .venv, the project installed
# editable with the extras in $EXTRAS (default: dev). Safe to run again: each step
# is skipped when already done. Source it or run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EXTRAS="${EXTRAS:-dev}"
PYTHON="${PYTHON:-python3}"

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)
if [ "${WITH_BROWSER:-0}" = "1" ] && [ ! -x /usr/bin/chromium ]; then need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.installed-$EXTRAS-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing redisq-lab[$EXTRAS] into .venv" >&2
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  rm -f .venv/.installed-"$EXTRAS"-*
  touch "$stamp"
fi
