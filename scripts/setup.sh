#!/usr/bin/env bash
# One idempotent set-up step for `make demo` / `make test`: apt packages, the pinned torch in .venv.
# Re-running it is cheap: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=5.23.0
PEFT_VERSION=0.21.2
TENSORBOARD_VERSION=2.21.0
# g++ builds tch's C++ glue; pkg-config and python3-venv for the venv; cmake and libclang-dev build
# HiGHS (the planner's MIP solver, through good_lp) and its bindings; libgloo-dev has the gloo
# headers the c10d shim (dist/) compiles against (the torch wheel ships none).
APT_PACKAGES=(g++ make pkg-config python3-venv cmake libclang-dev libgloo-dev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "setup: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x .venv/bin/python3 ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
have=$(.venv/bin/python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
case "$have" in
  "$TORCH_VERSION"|"$TORCH_VERSION"+*) ;;
  *)
    echo "setup: installing torch==$TORCH_VERSION into .venv (~2.6 GB download, ~1.5 min)"
    .venv/bin/python3 -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    ;;
esac
# The independent references the tests compare with: transformers (losses, RoPE tables), peft
# (exported adapters), tensorboard (event files).
PY_REFS=("transformers==$TRANSFORMERS_VERSION" "peft==$PEFT_VERSION" "tensorboard==$TENSORBOARD_VERSION" numpy)
if ! .venv/bin/python3 - <<PY 2>/dev/null
import transformers, peft, tensorboard, numpy
assert transformers.__version__ == "$TRANSFORMERS_VERSION" and peft.__version__ == "$PEFT_VERSION"
assert tensorboard.__version__ == "$TENSORBOARD_VERSION"
PY
then
  echo "setup: installing ${PY_REFS[*]} (test references)"
  .venv/bin/python3 -m pip install -q --disable-pip-version-check "${PY_REFS[@]}"
fi
# The CUDA runtime headers that the torch wheel's nvidia-cuda-runtime lacks (crt/, libcu++'s
# nv/target), so that the c10d shim compiles ProcessGroupNCCL (dist/build.rs); headers only.
CUDA_HEADERS=("nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85")
if [ ! -e .venv/lib/python3*/site-packages/nvidia/cu13/include/nv/target ] || [ ! -e .venv/lib/python3*/site-packages/nvidia/cu13/include/crt/host_config.h ]; then
  echo "setup: installing ${CUDA_HEADERS[*]} (CUDA headers for the NCCL process group)"
  .venv/bin/python3 -m pip install -q --disable-pip-version-check --no-deps "${CUDA_HEADERS[@]}"
fi
echo "setup: ok (torch $(.venv/bin/python3 -c 'import torch; print(torch.__version__)'))"
