#!/usr/bin/env bash
# Collects what scripts/gpu-check.sh needs on a GPU machine that has no Rust toolchain: the
# release `train` binary, the CUDA test executables, and a tiny HF checkpoint written by the tests.
# Output: .gpu-bin/ (git-ignored). Run after `make test` (which builds everything).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-bin && mkdir -p .gpu-bin
cp target/release/train .gpu-bin/
# Oldest first, so that the newest build of each crate's CUDA test is the one that stays.
for t in $(ls -tr $(find target/release/deps -maxdepth 1 -type f -executable -name 'cuda-*')); do
  crate=$(strings "$t" | grep -o -m1 -E '(kernels|trainer)/tests/cuda.rs' | cut -d/ -f1 || true)
  cp "$t" ".gpu-bin/cuda-test-${crate:-$(basename "$t")}"
done
model=$(ls -d target/tmp/eval-qwen2-*/model 2>/dev/null | head -1)
[ -n "$model" ] || { echo "no tiny checkpoint under target/tmp: run the tests first" >&2; exit 1; }
cp -r "$model" .gpu-bin/tiny-qwen2
cp "$(dirname "$model")/data.jsonl" .gpu-bin/tiny-data.jsonl
du -sh .gpu-bin; ls .gpu-bin
