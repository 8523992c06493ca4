#!/usr/bin/env bash
# Installs everything into ./.venv and runs the whole test suite.
# pytest's "no tests collected" (exit 5) fails like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Two workers (pytest-xdist): most tests wait on processes, brokers and
# servers, so two run side by side even on a 2-core machine (measured: the
# suite in 16 min instead of ~26). MONOLITH_TEST_WORKERS=0 runs it serially.
exec .venv/bin/python -m pytest -q -n "${MONOLITH_TEST_WORKERS:-2}" "$@"
