#!/usr/bin/env bash
# Set up .venv if missing, make CIFAR-10 available (download, or decode the bundled
# offline mirror), then train configs/quickstart.yaml. Extra arguments go to `normbench train`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/setup_env.sh" | tail -n 1)
cd "$repo"
"$venv/bin/normbench" data prepare
exec "$venv/bin/normbench" train --config configs/quickstart.yaml "$@"
