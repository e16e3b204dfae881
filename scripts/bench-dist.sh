#!/usr/bin/env bash
# Several processes on this machine (prints numbers, asserts nothing):
# 1. all-reduce bandwidth of strata's c10d shim (Gloo) against torch.distributed's Gloo on the
#    same tensors (float32, 2 ranks on 127.0.0.1, median of 10);
# 2. tokens/s of `train run` as one process with grad_accum 2 against 2 ranks with grad_accum 1
#    (the same micro-batches per step), one thread each, recipes/memory-check-cpu.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/train}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
TOKENS=${TOKENS:-4096}
STEPS=${STEPS:-4}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "| all-reduce (2 ranks, float32) | strata shim | torch.distributed |"
echo "|---:|---:|---:|"
for bytes in 1048576 16777216 67108864; do
  ours=$("$BIN" launch --nproc-per-node 2 -- bench allreduce --bytes "$bytes" 2>/dev/null | sed 's/^\[rank 0\] //' | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["algorithm_gb_per_s"])')
  cat > "$tmp/ar.py" <<PY
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones($bytes // 4)
dist.all_reduce(t)
secs = []
for _ in range(10):
    t0 = time.perf_counter(); dist.all_reduce(t); secs.append(time.perf_counter() - t0)
secs.sort()
if dist.get_rank() == 0:
    print("%.2f" % ($bytes / secs[len(secs) // 2] / 1e9))
dist.destroy_process_group()
PY
  theirs=$(OMP_NUM_THREADS=1 "$TORCHRUN" --standalone --nproc-per-node 2 "$tmp/ar.py" 2>/dev/null | tail -1)
  echo "| $((bytes >> 20)) MiB | ${ours} GB/s | ${theirs} GB/s |"
done
echo
echo "| train run, ${TOKENS} tokens per micro-batch, 2 micro-batches per step | tokens/s (median of steps 2-${STEPS}) |"
echo "|---|---:|"
common=("--recipe" recipes/memory-check-cpu.toml "train.steps=$STEPS" "data.tokens_per_batch=$TOKENS" "data.max_tokens=$TOKENS" "data.synth.words=[$((TOKENS / 4 - 32))]" "log.tensorboard=false")
tps() { python3 -c 'import json,sys,statistics; r=[json.loads(l) for l in open(sys.argv[1]) if "train/loss" in l]; print("%.0f" % statistics.median(x["train/tokens_per_sec"] for x in r[1:]))' "$1/metrics.jsonl"; }
OMP_NUM_THREADS=1 "$BIN" run "${common[@]}" "run.dir=$tmp/one" train.grad_accum=2 > "$tmp/one.log" 2>&1
echo "| 1 process, grad_accum 2, 1 thread | $(tps "$tmp/one") |"
OMP_NUM_THREADS=1 "$BIN" launch --nproc-per-node 2 -- run "${common[@]}" "run.dir=$tmp/two" train.grad_accum=1 > "$tmp/two.log" 2>&1
echo "| 2 ranks (train launch), grad_accum 1, 1 thread each | $(tps "$tmp/two") |"
