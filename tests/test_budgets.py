"""Deterministic budgets guarded on every run (speed figures live in BENCHMARKS.md, not here)."""

import os
from pathlib import Path

from kvablocal import wasmfile
from kvablocal.envoy import wasm_path

REPO = Path(__file__).resolve().parents[1]
WASM_BUDGET_BYTES = 200_000

# What the shipped module exports (filter/wasm/src/exports.rs): Envoy enters the VM only for these, and
# answers every other callback's default itself without entering it.
EXPORTS = {
    "memory",
    "_initialize",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    "proxy_on_configure",
    "proxy_on_context_create",
    "proxy_on_tick",
    "proxy_on_http_call_response",
    "proxy_on_request_headers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_log",
    "proxy_on_delete",
}


def test_release_wasm_fits_its_size_budget():
    size = os.path.getsize(wasm_path())
    assert size <= WASM_BUDGET_BYTES, f"{wasm_path()} is {size} bytes, budget {WASM_BUDGET_BYTES}"


def test_release_wasm_exports_only_the_callbacks_the_filter_implements():
    exports = wasmfile.exports(wasm_path())
    assert exports == EXPORTS, f"unexpected: {sorted(exports - EXPORTS)}, missing: {sorted(EXPORTS - exports)}"


