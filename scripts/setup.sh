#!/usr/bin/env bash
# Creates ./.venv (once) and installs monolith_jax into it from this folder,
# compiling the C++ engine in ffi/. Sourced by demo.sh and test.sh.
# A second run skips the install when nothing it depends on changed: the
# stamp covers pyproject.toml, every file under ffi/ and the names of the
# package's files (the editable install maps modules when it installs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=$( { cat pyproject.toml; echo "extras=${1:-test}"; find ffi -type f -not -path '*/build/*' | LC_ALL=C sort | xargs cat;
           find monolith_jax -type f \( -name '*.py' -o -name '*.proto' \) | LC_ALL=C sort; } | sha256sum | cut -d' ' -f1)
if [ -f .venv/.monolith-stamp ] && [ "$(cat .venv/.monolith-stamp)" = "$stamp" ] \
   && .venv/bin/python -c "import monolith_jax" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${1:-test}]"
echo "$stamp" > .venv/.monolith-stamp
