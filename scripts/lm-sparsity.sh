#!/usr/bin/env bash
# Token sparsity's language-modelling comparison (the README's table): a small Llama (6 layers,
# hidden 256, byte-level BPE of 4096) is trained dense on English text, then fine-tuned further
# for the same steps dense and with its upper layers sparse (keep 0.4, blocks of 64) under each
# scorer — exact, pooled, and the learned predictor fitted on the pretrained model — and with MLP
# channel sparsity 0.2 as well. Every run's final eval loss is scored dense on the held-out tenth.
# About an hour on 2 cores. Each finished stage is kept in runs/lm-text and not run again.
#
#   scripts/lm-sparsity.sh [TEXT ...]  # default: Vim's help files (~10 MB of English), else the
#                                      # Rust toolchain's release notes (~0.9 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/lm-text
R=recipes/lm-text-sparse-cpu.toml
BIN=target/release/train
if [ $# -eq 0 ]; then
  set -- /usr/share/vim/vim*/doc/*.txt
  [ -f "$1" ] || set -- "$(rustc --print sysroot)/share/doc/rust/html/releases.md"
fi
for t in "$@"; do [ -f "$t" ] || { echo "lm-sparsity: no text at $t (pass text files)" >&2; exit 2; }; done
[ -x "$BIN" ] || cargo build --release --bin train
mkdir -p "$OUT"
# The model's config is the last file the preparation writes.
[ -f "$OUT/data/model/config.json" ] || .venv/bin/python scripts/lm_text_prep.py "$OUT/data" "$@"

# run NAME OVERRIDES...: a `train run` of the recipe into $OUT/NAME, unless it finished before.
run() {
  local name=$1; shift
  if [ ! -f "$OUT/$name/final/config.json" ] && [ ! -f "$OUT/$name/final/adapter_config.json" ]; then
    rm -rf "${OUT:?}/$name"
    echo "== $name: $*"
    "$BIN" run --recipe "$R" run.dir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 || { echo "lm-sparsity: $name failed:" >&2; tail -5 "$OUT/$name.log" >&2; exit 1; }
    grep -E "^done" "$OUT/$name.log" || true
  fi
}

# 1. Dense pretraining from random weights (every layer dense: no sparse layers).
run pretrained model.path="$OUT/data/model" train.steps=600 train.lr=1e-3 train.warmup=30 eval.every=200 'sparsity.layers=[]'
# 2. The predictor of the sparse layers, fitted on the pretrained model against the exact scorer.
[ -f "$OUT/predictor.safetensors" ] || "$BIN" predictor --recipe "$R" --steps 400 | tee "$OUT/predictor.txt"
# 3. Fine-tuning, the same 200 steps from the pretrained model.
run dense 'sparsity.layers=[]'
run sparse-exact sparsity.scorer=exact
run sparse-pooled sparsity.scorer=pooled
run sparse-predictor sparsity.scorer=predictor
run sparse-exact-mlp sparsity.scorer=exact sparsity.mlp_keep_ratio=0.2

echo "== final eval loss (dense scoring of $OUT/data/val.jsonl)"
for name in pretrained dense sparse-exact sparse-pooled sparse-predictor sparse-exact-mlp; do
  m="$OUT/$name/metrics.jsonl"
  loss=$(grep '"eval/loss"' "$m" 2>/dev/null | tail -1 | sed -E 's/.*"eval\/loss":([0-9.eE+-]+).*/\1/' || true)
  kept=$(grep '"sparsity/kept_fraction"' "$m" 2>/dev/null | tail -1 | sed -E 's/.*"sparsity\/kept_fraction":([0-9.eE+-]+).*/\1/' || true)
  recall=$(grep '"sparsity/predictor_recall"' "$m" 2>/dev/null | tail -1 | sed -E 's/.*"sparsity\/predictor_recall":([0-9.eE+-]+).*/\1/' || true)
  printf '%-18s eval loss %s%s%s\n' "$name" "${loss:-missing}" "${kept:+  kept $kept}" "${recall:+  recall $recall}"
done
grep -A3 "^recall" "$OUT/predictor.txt" || true
