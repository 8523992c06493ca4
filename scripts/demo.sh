#!/usr/bin/env bash
# Installs everything into ./.venv and runs the main job on embedded defaults:
# the example MovieLens-1M job, replayed -> joiner process -> online DeepFM
# trainer, through librdkafka's built-in Kafka cluster (nothing to start by
# hand). It names the job as a user names theirs: --job MODULE:NAME.
# Options: see `.venv/bin/monolith demo --help` (e.g. --limit 1000209).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/monolith demo --job monolith_jax.examples.movielens.job:job "$@"
