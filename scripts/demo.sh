#!/usr/bin/env bash
# Installs everything into ./.venv and runs the end-to-end demo (embedded defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m monolith_jax.demo "$@"
