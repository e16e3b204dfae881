#!/usr/bin/env bash
# Step time and steady-state memory of the process's allocator choices (issue 12: memory freed by
# one step serves the next without growth, and no step-time regression beyond noise). Prints a
# table; asserts nothing.
#
# Variants: glibc's malloc (a `train` built with --no-default-features), jemalloc as built in
# (narenas:1, oversize_threshold:0, dirty_decay_ms:5000, muzzy_decay_ms:0, and its freed pages
# purged at each step's start), and jemalloc with a MALLOC_CONF variant on top. They run interleaved, ROUNDS times, so that drift of this shared
# machine falls on all of them alike. Each run: `train run` of recipes/memory-check-cpu.toml for
# STEPS steps; tokens/s is the median of steps 2.., steady = the largest per-step peak RSS of steps 2...
#
#   scripts/bench-allocator.sh                          # 4096 tokens resident, 8192 NVMe; 3 rounds
#   CASES="8192:nvme" ROUNDS=2 scripts/bench-allocator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-"4096:resident 8192:nvme"}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-5}
[ "$STEPS" -ge 2 ] || { echo "STEPS must be at least 2 (step 1 is not measured)"; exit 1; }
export LIBTORCH_USE_PYTORCH=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
build() { cargo build --release --bin train "$@" > "$tmp/build.log" 2>&1 || { tail -20 "$tmp/build.log"; exit 1; }; }
build --no-default-features
cp target/release/train target/release/train-glibc
build
mkdir -p "$tmp/nvme"
VARIANTS=("glibc|" "jemalloc (built in)|" "jemalloc, freed pages kept|dirty_decay_ms:-1,muzzy_decay_ms:-1")
for case in $CASES; do
  t=${case%%:*}; place=${case##*:}
  extra=()
  [ "$place" = nvme ] && extra+=("offload.tiers=[\"nvme\"]" "offload.nvme_dir=$tmp/nvme" "offload.keep_last=0")
  for r in $(seq "$ROUNDS"); do
    for i in "${!VARIANTS[@]}"; do
      name=${VARIANTS[$i]%%|*}; conf=${VARIANTS[$i]#*|}
      bin=target/release/train; [ "$name" = glibc ] && bin=target/release/train-glibc
      run="$tmp/run-$t-$place-$i-$r"
      MALLOC_CONF=$conf "$bin" run --recipe recipes/memory-check-cpu.toml "run.dir=$run" "train.steps=$STEPS" \
        "data.tokens_per_batch=$t" "data.max_tokens=$t" "data.synth.words=[$((t / 4 - 32))]" "${extra[@]}" > "$run.log" 2>&1 \
        || { echo "run failed: $run.log"; tail -3 "$run.log"; exit 1; }
      echo "$t $place $i $r $(python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if "\"train/loss\"" in l]
print(statistics.median(r["train/tokens_per_sec"] for r in rows[1:]), int(max(r["memory/step_peak_rss_bytes"] for r in rows[1:])))' "$run")" >> "$tmp/results"
    done
  done
done
python3 - "$tmp/results" "${VARIANTS[@]}" <<'PY'
import statistics, sys
names = [v.split("|")[0] for v in sys.argv[2:]]
confs = [v.split("|")[1] for v in sys.argv[2:]]
rows = [l.split() for l in open(sys.argv[1])]
print("| tokens | activations | allocator | MALLOC_CONF added | tokens/s per round (median of steps 2..) | vs glibc | steady peak RSS per round | vs glibc |")
print("|---:|---|---|---|---|---:|---|---:|")
for case in dict.fromkeys((r[0], r[1]) for r in rows):
    got = {i: [(float(r[4]), float(r[5])) for r in rows if (r[0], r[1]) == case and int(r[2]) == i] for i in range(len(names))}
    base_tps = statistics.median(x[0] for x in got[0])
    base_rss = statistics.median(x[1] for x in got[0])
    for i, n in enumerate(names):
        tps = [x[0] for x in got[i]]
        rss = [x[1] for x in got[i]]
        print(f"| {case[0]} | {case[1]} | {n} | {confs[i] or '-'} | {', '.join(f'{x:.0f}' for x in tps)} | {statistics.median(tps) / base_tps:.2f} | "
              f"{', '.join(f'{x / 2**30:.2f}' for x in rss)} GiB | {statistics.median(rss) / base_rss:.2f} |")
PY
