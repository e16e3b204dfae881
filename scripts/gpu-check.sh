#!/usr/bin/env bash
# The CUDA checks: CUDA op and model tests against the float64 CPU reference, `train eval` on
# CUDA vs CPU, and a short step benchmark. On a machine with cargo it builds; on the lent GPU
# machine (no Rust toolchain) it runs the prebuilt binaries in .gpu-bin/ (scripts/gpu-bundle.sh).
# Results go to stdout and, when $OUT is set, to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu-check.log
exec > >(tee "$log") 2>&1

PY=${PYTHON:-python3}
[ -x .venv/bin/python3 ] && PY=.venv/bin/python3
TORCH_LIB=$($PY -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU: nothing to check"; exit 0; }

if command -v cargo >/dev/null && [ ! -d .gpu-bin ]; then
  export LIBTORCH_USE_PYTORCH=1
  cargo build --release --workspace --all-targets
  bash scripts/gpu-bundle.sh
fi
BIN=.gpu-bin
fail=0
for t in "$BIN"/cuda-test-*; do
  echo "== $t"
  "$t" --nocapture --test-threads 1 || fail=1
done

echo "== train eval: cuda vs cpu (tiny Qwen2, float32)"
"$BIN/train" eval --model "$BIN/tiny-qwen2" --data "$BIN/tiny-data.jsonl" --device cpu --json || fail=1
"$BIN/train" eval --model "$BIN/tiny-qwen2" --data "$BIN/tiny-data.jsonl" --device cuda --json || fail=1

echo "== bench: Llama-3-8B-shaped layers (hidden 4096, 32/8 heads, intermediate 14336, vocab 128256), bf16"
for tokens in 8192 32768; do
  "$BIN/train" bench step --device cuda --dtype bfloat16 --layers 4 --hidden 4096 --heads 32 --kv-heads 8 \
    --intermediate 14336 --vocab 128256 --tokens $tokens --iters 3 || fail=1
done
echo "gpu-check: $([ $fail = 0 ] && echo PASSED || echo FAILED)"
exit $fail
