#!/usr/bin/env bash
# Set up .venv if missing, then run the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/setup_env.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
