#!/usr/bin/env bash
# Sequence parallelism on this machine (prints numbers, asserts nothing): one sequence of TOKENS
# split over P = 1, 2, 4 processes (`train launch`, Gloo on 127.0.0.1), recipes/memory-check-cpu.toml
# (8 layers, hidden 512, 8/4 heads), full fine-tuning, activations resident. Per configuration:
# rank 0's saved activations and peak resident set (the ranks are alike), the median step time,
# and the all-to-all bytes one rank sends per layer and their time. The machine's cores are shared
# by the ranks (OMP_NUM_THREADS = cores / P, at least 1), so step times compare total CPU work.
#
#   scripts/bench-sequence.sh                  # 32768 tokens, 2 steps
#   TOKENS=8192 STEPS=3 scripts/bench-sequence.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/train}
TOKENS=${TOKENS:-32768}
STEPS=${STEPS:-2}
RANKS=${RANKS:-"1 2 4"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cores=$(nproc)

echo "| P | tokens per rank | activations per rank | peak RSS rank 0 (steps 1..$STEPS) | step (median) | all-to-all per layer per rank | its time per layer |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for p in $RANKS; do
  run="$tmp/sp$p"
  threads=$(( cores / p > 0 ? cores / p : 1 ))
  common=(run --recipe recipes/memory-check-cpu.toml "run.dir=$run" "train.steps=$STEPS" "data.tokens_per_batch=$TOKENS" "data.max_tokens=$TOKENS"
    "data.synth.words=[$((TOKENS / 4 - 32))]" "log.tensorboard=false" "dist.sequence_parallel=$p")
  if [ "$p" = 1 ]; then
    OMP_NUM_THREADS=$threads "$BIN" "${common[@]}" > "$run.log" 2>&1 || { echo "P=$p failed: $(tail -3 "$run.log")"; continue; }
  else
    OMP_NUM_THREADS=$threads "$BIN" launch --nproc-per-node "$p" -- "${common[@]}" > "$run.log" 2>&1 || { echo "P=$p failed: $(tail -3 "$run.log")"; continue; }
  fi
  python3 - "$run" "$p" "$TOKENS" <<'PY'
import json, math, statistics, sys
run, p, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = [json.loads(l) for l in open(run + "/metrics.jsonl") if "train/loss" in l]
gib = lambda b: "%.2f GiB" % (b / 2**30)
layers = 8
step = statistics.median(x["train/tokens"] / x["train/tokens_per_sec"] for x in r)
a2a = r[-1].get("dist/all_to_all_bytes", 0) / layers
a2a_s = r[-1].get("dist/all_to_all_seconds", 0) / layers
print("| %d | %d | %s | %s | %.1f s | %s | %s |" % (p, math.ceil(t / p), gib(max(x["memory/activations_bytes"] for x in r)),
      gib(max(x["memory/host_peak_rss_bytes"] for x in r)), step, "%.1f MiB" % (a2a / 2**20) if p > 1 else "-", "%.3f s" % a2a_s if p > 1 else "-"))
PY
done
