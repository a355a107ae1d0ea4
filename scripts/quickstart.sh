#!/usr/bin/env bash
# Set up .venv if missing, make CIFAR-10 available (download, or decode the bundled offline
# mirror), train configs/quickstart.yaml (a real run, a few minutes), then run the quick sweep
# configs/sweeps/quick.yaml (BN, GN and no-norm + AGC at batch 8 and 32) and print its report.
#   scripts/quickstart.sh --no-sweep     # only the single training run
# Other arguments go to `normbench train`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sweep=1
args=()
for a in "$@"; do
    if [ "$a" = "--no-sweep" ]; then sweep=0; else args+=("$a"); fi
done
venv=$("$repo/scripts/setup_env.sh" | tail -n 1)
cd "$repo"
"$venv/bin/normbench" data prepare
"$venv/bin/normbench" train --config configs/quickstart.yaml ${args[@]+"${args[@]}"}
if [ "$sweep" = 1 ]; then
    "$venv/bin/normbench" sweep configs/sweeps/quick.yaml
    "$venv/bin/normbench" report runs/sweeps/quick --plot runs/sweeps/quick/accuracy.png
fi
