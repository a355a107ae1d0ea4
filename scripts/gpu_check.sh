#!/usr/bin/env bash
# The CUDA smoke check for the first GPU normbench runs on (under ten minutes on one GPU):
#   scripts/gpu_check.sh            # from a clone; sets up .venv if missing
#   SCHEMES=bn,gn scripts/gpu_check.sh
# scripts/gpu_check.py: every scheme eager / compiled / reduce-overhead / bf16, no host sync in the
# step, a packed step, a resume, steps/s; then here: device=cuda without CUDA is one line, and
# 2-GPU torchrun + SyncBN where two GPUs are visible. One line per check, then the count.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/setup_env.sh" | tail -n 1)
py="$venv/bin/python"
log=$(mktemp -d)/gpu_check.out
cd "$repo"
"$py" scripts/gpu_check.py --schemes "${SCHEMES:-bn,ghost_bn,brn,gn,ln,in,ws_gn,frn,evonorm_s0,none,nf,syncbn}" \
    2> "${log%.out}.err" | tee "$log"

out=$(CUDA_VISIBLE_DEVICES= "$py" -m normbench train --dry-run --set device=cuda 2>&1); rc=$?
if [ "$rc" = 2 ] && [ "$(grep -c . <<<"$out")" = 1 ]; then r=PASS; else r=FAIL; fi
echo "$r device=cuda without a visible GPU: exit $rc, ${out:0:150}" | tee -a "$log"

gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$gpus" -ge 2 ]; then
    root=$(mktemp -d)
    "$py" -c "from normbench.data import synthetic_cifar; synthetic_cifar('$root/data', n_train=320, n_test=128)"
    timeout -k 10 300 "$py" -m normbench train --nproc 2 --no-progress --set device=cuda --set norm.kind=syncbn \
        --set data.root="$root/data" --set data.allow_download=false --set log.out_dir="$root/runs" \
        --set model.width=0.5 --set train.batch_size=16 --set train.epochs=1 --set train.log_every=4 \
        --set analysis.train_mode_eval=true > "$root/ddp.log" 2>&1
    rc=$?
    if [ "$rc" = 0 ] && grep -q '"status": "completed"' "$root"/runs/*/summary.json 2>/dev/null; then r=PASS; else r=FAIL; fi
    echo "$r torchrun 2 GPUs, nccl, syncbn: exit $rc $(grep -m1 -iE 'error|timeout' "$root/ddp.log" | cut -c1-150)" | tee -a "$log"
else
    echo "SKIP torchrun 2 GPUs, nccl, syncbn: $gpus GPU(s) visible"
fi
echo "$(grep -c '^PASS' "$log") / $(grep -cE '^(PASS|FAIL)' "$log") checks passed (tracebacks: ${log%.out}.err)"
