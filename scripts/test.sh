#!/usr/bin/env bash
# Set up .venv if missing, then run the whole pytest suite on two pytest-xdist workers (the
# Ray tests share one). Extra arguments go to pytest; NORMBENCH_TEST_WORKERS=0 runs it serially.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/setup_env.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/python" -m pytest -n "${NORMBENCH_TEST_WORKERS:-2}" --dist loadgroup "$@"
