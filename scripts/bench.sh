#!/usr/bin/env bash
# `make bench`: the numbers behind the README, printed (not pass/fail). About 9 minutes on 2 cores.
#   1. each offload tier's bandwidth through the engine beside the raw figure of this machine;
#   2. one training step of an 8-layer, hidden-512 Llama at 4096 tokens, all resident vs NVMe;
#   3. the planner on a Llama-3-8B-shaped config (no weights needed) at 32K, 128K and 512K tokens,
#      80 GB device, 100 GB host memory, 2 TB NVMe;
#   4. the plan's device peak against the per-step peak RSS of 5-step runs at 4096 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/train
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== train bench offload (1 GiB in 64 MiB slices)"
"$BIN" bench offload --bytes 1073741824 --slice-bytes 67108864 --nvme-dir "$tmp"

echo "== train bench step, 8 layers, hidden 512, 4096 tokens: resident, then NVMe (keep_last 1, α 1 and 0.3)"
"$BIN" bench step --tokens 4096 --iters 2
"$BIN" bench step --tokens 4096 --iters 2 --nvme-dir "$tmp" --keep-last 1
"$BIN" bench step --tokens 4096 --iters 2 --nvme-dir "$tmp" --keep-last 1 --alpha 0.3

echo "== train plan: Llama-3-8B-shaped, LoRA r16 (no dropout), bf16, 80 GB + 100 GB host + 2 TB NVMe"
mkdir -p "$tmp/llama3-8b"
cat > "$tmp/llama3-8b/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336, "model_type": "llama",
 "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
 "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false, "vocab_size": 128256}
JSON
echo '{"text": "unused"}' > "$tmp/unused.jsonl"
for t in 32768 131072 524288; do
  echo "-- $t tokens"
  "$BIN" plan --recipe recipes/lora-llama3-8b-long.toml "model.path=$tmp/llama3-8b" "data.train=[\"$tmp/unused.jsonl\"]" \
    data.tokens_per_batch=$t data.max_tokens=$t "offload.nvme_dir=$tmp" \
    --device-mem 80GB --host-mem 100GB --nvme 2TB --out "$tmp/plan-$t" | sed -n '/^plan /,$p'
done

echo "== memory over a whole run: plan vs per-step peak RSS, 5 steps at 4096 tokens (scripts/bench-memory.sh)"
TOKENS=4096 bash scripts/bench-memory.sh

echo "== the allocator: glibc vs jemalloc as built in vs jemalloc keeping freed pages, tokens/s and steady peak RSS (scripts/bench-allocator.sh)"
CASES="4096:resident" ROUNDS=2 STEPS=4 bash scripts/bench-allocator.sh

echo "== several processes: all-reduce GB/s (shim vs torch.distributed), tokens/s of 1 vs 2 processes (scripts/bench-dist.sh)"
bash scripts/bench-dist.sh

echo "== one sequence over 1, 2, 4 processes: memory per rank, step, all-to-all (scripts/bench-sequence.sh; the README's table is TOKENS=32768)"
TOKENS=8192 STEPS=2 bash scripts/bench-sequence.sh
