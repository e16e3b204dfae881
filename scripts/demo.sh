#!/usr/bin/env bash
# `make demo`: trains the embedded default recipe (a tiny Llama learns passkey retrieval from
# scratch, up to 4096-token contexts) on CPU and prints its retrieval accuracy. Each run gets its
# own directory under runs/, so an earlier demo's outputs are never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="runs/demo-passkey-$(date +%Y%m%d-%H%M%S)"
echo "demo: training recipes/demo-passkey-cpu.toml into $dir"
SECONDS=0
target/release/train run --recipe recipes/demo-passkey-cpu.toml "run.dir=$dir"
echo "demo: wall time ${SECONDS} s"
