#!/usr/bin/env bash
# Installs everything into ./.venv and runs the whole test suite.
# pytest's "no tests collected" (exit 5) fails like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
