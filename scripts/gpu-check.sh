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

echo "== train run on CUDA: LoRA, bfloat16, tiny Qwen2 (20 steps), then eval with the adapter"
run=$(mktemp -d)
cat > "$run/lora.toml" <<TOML
# train run --recipe lora.toml (written by scripts/gpu-check.sh)
[run]
dir = "$run/lora"
device = "cuda"
dtype = "bfloat16"
[model]
path = "$BIN/tiny-qwen2"
[data]
train = ["$BIN/tiny-data.jsonl"]
tokens_per_batch = 128
max_tokens = 64
[train]
mode = "lora"
steps = 20
lr = 1e-2
[lora]
rank = 4
alpha = 8.0
dropout = 0.1
targets = ["q_proj", "v_proj", "gate_proj"]
[checkpoint]
every = 10
[log]
every = 5
TOML
"$BIN/train" run --recipe "$run/lora.toml" || fail=1
"$BIN/train" eval --model "$BIN/tiny-qwen2" --adapter "$run/lora/final" --data "$BIN/tiny-data.jsonl" --device cuda --json || fail=1

echo "== the demo recipe on CUDA (first 300 steps: 128-word samples), for its tokens/s"
"$BIN/train" run --recipe recipes/demo-passkey-cpu.toml run.device=cuda "run.dir=$run/demo" train.steps=300 eval.every=0 eval.samples=4 log.every=100 || fail=1

echo "== one rank under train launch on CUDA: the NCCL process group with world size 1 (same code path as many ranks)"
"$BIN/train" launch --nproc-per-node 1 -- run --recipe recipes/demo-passkey-cpu.toml run.device=cuda "run.dir=$run/nccl" train.steps=20 eval.every=0 eval.samples=2 log.every=10 dist.backend=nccl || fail=1

echo "== the plan's device peak against libtorch's CUDA allocator over 6 steps of train run (issue 12):"
echo "   memory-check recipe on CUDA, bf16, hidden 2048 × 8 layers, 32K tokens, whole-sequence blocks (the plan of what runs: apply = false); resident, and every layer in host memory"
for place in resident host; do
  extra=()
  [ $place = host ] && extra=('offload.tiers=["host"]' offload.host_bytes=34359738368 offload.keep_last=0)
  "$BIN/train" run --recipe recipes/memory-check-cpu.toml run.device=cuda run.dtype=bfloat16 "run.dir=$run/mem-$place" \
    plan.device_memory=120GiB compute.tile_tokens=0 train.steps=6 data.tokens_per_batch=32768 data.max_tokens=32768 'data.synth.words=[8160]' model.init.hidden_size=2048 \
    model.init.intermediate_size=5632 model.init.num_attention_heads=16 model.init.num_key_value_heads=8 "${extra[@]}" || fail=1
  $PY - "$run/mem-$place" "$place" <<'PY' || fail=1
import json, sys
run, place = sys.argv[1:]
plan = json.load(open(run + "/plan.json"))["plan"]["device_peak"]
rows = [json.loads(l) for l in open(run + "/metrics.jsonl") if '"train/loss"' in l]
alloc = [r["memory/cuda_step_peak_allocated_bytes"] for r in rows]
res = [r["memory/cuda_step_peak_reserved_bytes"] for r in rows]
g = lambda b: f"{b / 2**30:.2f} GiB"
print(f"{place}: plan device peak {g(plan)}; per-step max_memory_allocated {[g(a) for a in alloc]}; max_memory_reserved {[g(r) for r in res]}")
print(f"{place}: steady (steps 2-6) allocated/plan {max(alloc[1:]) / plan:.3f}, reserved/plan {max(res[1:]) / plan:.3f}")
PY
done

echo "== bench: Llama-3-8B-shaped layers (hidden 4096, 32/8 heads, intermediate 14336, vocab 128256), bf16"
for tokens in 8192 32768; do
  "$BIN/train" bench step --device cuda --dtype bfloat16 --layers 4 --hidden 4096 --heads 32 --kv-heads 8 \
    --intermediate 14336 --vocab 128256 --tokens $tokens --iters 3 || fail=1
done
echo "== bench: the same layers with saved activations in page-locked host memory (copy stream, overlap), 8K and 32K tokens"
for tokens in 8192 32768; do
  "$BIN/train" bench step --device cuda --dtype bfloat16 --layers 4 --hidden 4096 --heads 32 --kv-heads 8 \
    --intermediate 14336 --vocab 128256 --tokens $tokens --iters 3 --tiers host --keep-last 1 || fail=1
done
echo "== bench: the same layers at 8192 tokens with saved activations on the NVMe tier (keep_last 1)"
"$BIN/train" bench step --device cuda --dtype bfloat16 --layers 4 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --tokens 8192 --iters 2 --nvme-dir /tmp --keep-last 1 || fail=1
echo "== bench: token tiles (16K) on the same layers: 32K resident (vs the whole-sequence line above), 128K with every layer in host memory, α 0"
"$BIN/train" bench step --device cuda --dtype bfloat16 --layers 4 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --tokens 32768 --iters 2 --tile-tokens 16384 || fail=1
"$BIN/train" bench step --device cuda --dtype bfloat16 --layers 4 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --tokens 131072 --iters 1 --tile-tokens 16384 --tiers host --keep-last 0 --alpha 0 || fail=1
echo "== bench offload: host tier D2H/H2D through the copy engine vs libtorch's pinned copy; NVMe vs raw O_DIRECT"
"$BIN/train" bench offload --device cuda --tiers host --bytes 4294967296 --slice-bytes 67108864 || fail=1
"$BIN/train" bench offload --device cpu --tiers host,numa,nvme --nvme-dir /tmp --bytes 2147483648 || fail=1
echo "gpu-check: $([ $fail = 0 ] && echo PASSED || echo FAILED)"
exit $fail
