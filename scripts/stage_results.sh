#!/usr/bin/env bash
# Stage the FINISHED runs of a results folder for commit (completed, diverged or failed:
# summary.json, config.yaml, metrics.jsonl, train.log; .gitignore keeps checkpoints, event
# files and locks out). Runs still training, or interrupted, stay unstaged: committing half a
# run would make a fresh clone skip or restart it wrongly.
#
#   scripts/stage_results.sh [results/small_batch/runs]
set -euo pipefail
root="${1:-results/small_batch/runs}"
n=0
for dir in "$root"/*/; do
    summary="$dir/summary.json"
    [ -f "$summary" ] || continue
    status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("status", ""))' "$summary" 2>/dev/null || true)
    case "$status" in
        completed|diverged|failed) git add -- "$dir"; n=$((n + 1)) ;;
    esac
done
[ -f "$root/sweep.json" ] && git add -- "$root/sweep.json"
echo "staged $n finished run(s) under $root"
