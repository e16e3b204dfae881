# Two commands on a fresh machine: `make demo` and `make test`. Each runs the idempotent set-up first.
SHELL := /bin/bash
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# tch's build script asks this python for torch's location.
export PYTHON_SYS_EXECUTABLE := $(CURDIR)/.venv/bin/python3
CARGO_FLAGS ?= --release

.PHONY: setup build test demo bench gpu-check clean

setup:
	@bash scripts/setup.sh

build: setup
	cargo build $(CARGO_FLAGS) --workspace --all-targets

test: build
	cargo test $(CARGO_FLAGS) --workspace --no-fail-fast

demo: build
	bash scripts/demo.sh

bench: build
	bash scripts/bench.sh

gpu-check: build
	bash scripts/gpu-check.sh

clean:
	cargo clean
