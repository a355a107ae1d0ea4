#!/usr/bin/env bash
# Run, resume and collect the converged study from its pinned commit, outside this clone, so
# that a fresh work tree never touches a partial study.
#
#   scripts/study.sh start     # pinned checkout + venv (once), then both sweeps in the background;
#                              # resumes from the run folders' checkpoints; does nothing if running
#   scripts/study.sh status    # running or not, finished runs, the sweep log's last lines
#   scripts/study.sh collect   # copy finished runs (no checkpoints, no event files) into results/
#                              # and stage them for commit
#   scripts/study.sh stop      # SIGTERM: every cell checkpoints and the sweep exits
#   scripts/study.sh wall      # the wall time the study has used, by segment (scripts/study_wall_time.py)
#
# While the sweeps run, a heartbeat file holds the last time they were seen alive (every 30 s);
# the next start writes it into the log as "=== <time> last seen running", and the sweeps'
# own end writes "=== <time> sweeps ended", so every segment's length is known.
#
# The pinned commit is results/converged/PINNED_COMMIT; the study lives in
# ${NORMBENCH_STUDY_HOME:-~/normbench-study}: src/ (a clone checked out at that commit),
# converged/runs and converged_controls/runs (the run folders), study.log and study.pid.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${NORMBENCH_STUDY_HOME:-$HOME/normbench-study}
commit=$(cat "$repo/results/converged/PINNED_COMMIT")
src="$home/src"
pidfile="$home/study.pid"
studies=(converged converged_controls)

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

heartbeat() {  # write the time into $home/heartbeat every 30 s while process $1 lives
    while kill -0 "$1" 2>/dev/null; do
        date -u '+%Y-%m-%d %H:%M:%S' > "$home/heartbeat.tmp" && mv "$home/heartbeat.tmp" "$home/heartbeat"
        sleep 30
    done
}

checkout() {
    mkdir -p "$home"
    if [ -d "$src/.git" ] && [ "$(git -C "$src" rev-parse HEAD 2>/dev/null)" = "$commit" ] \
        && [ -z "$(git -C "$src" status --porcelain --untracked-files=no)" ]; then
        return
    fi
    echo "study: checking out $commit into $src" >&2
    rm -rf "$src"
    git clone --quiet --no-checkout "$repo" "$src"
    git -C "$src" checkout --quiet --detach "$commit"
}

case "${1:-status}" in
start)
    if running; then echo "study: already running (pid $(cat "$pidfile"))"; exit 0; fi
    checkout
    venv=$("$src/scripts/setup_env.sh" | tail -n 1)
    cmd="cd '$src' && '$venv/bin/normbench' sweep configs/sweeps/converged.yaml --out '$home/converged/runs' \
--pack 4 --pack-max-batch 8 --no-progress && '$venv/bin/normbench' sweep configs/sweeps/converged_controls.yaml \
--out '$home/converged_controls/runs' --no-progress; echo \"=== \$(date -u '+%Y-%m-%d %H:%M:%S') sweeps ended\""
    if [ -f "$home/heartbeat" ]; then
        echo "=== $(cat "$home/heartbeat") last seen running" >> "$home/study.log"
        rm -f "$home/heartbeat"
    fi
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') start at $commit" >> "$home/study.log"
    nohup setsid bash -c "$cmd" >> "$home/study.log" 2>&1 &
    pid=$!
    echo "$pid" > "$pidfile"
    nohup setsid "$0" heartbeat "$pid" > /dev/null 2>&1 &
    echo "study: started (pid $pid), log $home/study.log"
    ;;
heartbeat)
    heartbeat "$2"
    ;;
wall)
    python3 "$repo/scripts/study_wall_time.py" "$home/study.log" --runs "$home/converged/runs" \
        --runs "$home/converged_controls/runs"
    ;;
status)
    if running; then echo "study: running (pid $(cat "$pidfile"))"; else echo "study: not running"; fi
    for s in "${studies[@]}"; do
        n=$(find "$home/$s/runs" -mindepth 2 -maxdepth 2 -name summary.json 2>/dev/null | wc -l)
        echo "$s: $n run folder(s) with a summary"
    done
    tail -n 5 "$home/study.log" 2>/dev/null || true
    ;;
collect)
    for s in "${studies[@]}"; do
        [ -d "$home/$s/runs" ] || continue
        mkdir -p "$repo/results/$s/runs"
        for dir in "$home/$s/runs"/*/; do
            name=$(basename "$dir")
            status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("status", ""))' \
                "$dir/summary.json" 2>/dev/null || true)
            case "$status" in completed|diverged|failed) ;; *) continue ;; esac
            mkdir -p "$repo/results/$s/runs/$name"
            for f in summary.json config.yaml metrics.jsonl train.log error.log; do
                [ -f "$dir/$f" ] && cp -p "$dir/$f" "$repo/results/$s/runs/$name/$f"
            done
        done
        [ -f "$home/$s/runs/sweep.json" ] && cp -p "$home/$s/runs/sweep.json" "$repo/results/$s/runs/sweep.json"
        (cd "$repo" && scripts/stage_results.sh "results/$s/runs")
        python3 "$repo/scripts/check_study_runs.py" "$repo/results/$s/runs" \
            || echo "study: the runs above lack an evaluation; retrain them before they enter a table" >&2
    done
    if [ -f "$home/study.log" ]; then  # the wall-time ledger travels with the runs
        python3 "$repo/scripts/study_wall_time.py" "$home/study.log" --runs "$home/converged/runs" \
            --runs "$home/converged_controls/runs" --markdown "$repo/results/converged/wall_time.md" > /dev/null
        (cd "$repo" && git add results/converged/wall_time.md)
    fi
    ;;
stop)
    if running; then kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || kill -TERM "$(cat "$pidfile")"; echo "study: stopping"; \
    else echo "study: not running"; fi
    ;;
*)
    echo "usage: scripts/study.sh start|status|collect|stop|wall" >&2; exit 2 ;;
esac
