#!/usr/bin/env bash
# Installs everything into ./.venv and runs the main job on embedded defaults:
# MovieLens-1M replay -> joiner process -> online DeepFM trainer, through
# librdkafka's built-in Kafka cluster (nothing to start by hand).
# Options: see `python -m monolith_jax.examples.movielens.loop --help` (e.g. --limit 1000209).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m monolith_jax.examples.movielens.loop "$@"
