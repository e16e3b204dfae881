#!/usr/bin/env bash
# The plan's device peak against a whole run (the README's table; prints numbers, asserts nothing).
# For each token count, full and LoRA, resident and offloaded (every layer through the NVMe
# tier), `train run` trains recipes/memory-check-cpu.toml for 5 steps; the table shows the plan's
# device peak (on CPU: the process's resident set), the measured peak of step 1 (allocators still
# growing), the steady state (the largest per-step peak of steps 2..5), their ratio to the plan,
# and the median step time.
#
#   scripts/bench-memory.sh                      # 4096 and 8192 tokens, the recipe's model
#   MODES=lora PLACES=nvme scripts/bench-memory.sh   # one mode, one placement
#   TOKENS="32768" SHAPE="model.init.num_hidden_layers=4 model.init.hidden_size=256 \
#     model.init.intermediate_size=688 model.init.num_attention_heads=4 model.init.num_key_value_heads=2" \
#     scripts/bench-memory.sh                    # 32K on a smaller model (8 layers × 512: ~5 min a step here)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/train}
TOKENS=${TOKENS:-"4096 8192"}
SHAPE=${SHAPE:-}
STEPS=${STEPS:-5}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/nvme"

printf '| tokens | model | mode | activations | plan device peak | step 1 peak | steady peak (steps 2-%s) | steady / plan | step (median) |\n' "$STEPS"
printf '|---:|---|---|---|---:|---:|---:|---:|---:|\n'
for t in $TOKENS; do
  for mode in ${MODES:-full lora}; do
    for place in ${PLACES:-resident nvme}; do
      run="$tmp/run-$t-$mode-$place"
      extra=()
      if [ "$place" = nvme ]; then
        extra+=("offload.tiers=[\"nvme\"]" "offload.nvme_dir=$tmp/nvme" "offload.keep_last=0")
      fi
      # shellcheck disable=SC2086
      "$BIN" run --recipe recipes/memory-check-cpu.toml "run.dir=$run" "train.mode=$mode" "train.steps=$STEPS" \
        "data.tokens_per_batch=$t" "data.max_tokens=$t" "data.synth.words=[$((t / 4 - 32))]" $SHAPE "${extra[@]}" \
        > "$run.log" 2>&1 || { echo "run failed: $run.log"; tail -5 "$run.log"; continue; }
      python3 - "$run" "$t" "$mode" "$place" <<'PY'
import json, sys, statistics
run, t, mode, place = sys.argv[1:]
doc = json.load(open(run + "/plan.json"))
plan, inv = doc["plan"], doc["inventory"]["model"]
rows = [json.loads(l) for l in open(run + "/metrics.jsonl") if '"train/loss"' in l]
peaks = [r["memory/step_peak_rss_bytes"] for r in rows]
secs = [r["train/tokens"] / r["train/tokens_per_sec"] for r in rows]
g = lambda b: f"{b / 2**30:.2f} GiB"
steady = max(peaks[1:])
model = inv.split(": ", 1)[1].split(", intermediate")[0]
print(f"| {t} | {model} | {mode} | {'resident' if place == 'resident' else 'NVMe, keep_last 0'} | {g(plan['device_peak'])} | {g(peaks[0])} "
      f"| {g(steady)} | {steady / plan['device_peak']:.2f} | {statistics.median(secs[1:]):.1f} s |")
PY
    done
  done
done
