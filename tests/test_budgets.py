"""Deterministic budgets guarded on every run (speed figures live in BENCHMARKS.md, not here)."""

import os
import re
from pathlib import Path

from kvablocal import wasmfile
from kvablocal.envoy import wasm_path

REPO = Path(__file__).resolve().parents[1]
WASM_BUDGET_BYTES = 200_000

# What the shipped module exports after `make filter` removes the SDK callbacks the filter does not
# implement (filter/wasm/unused-exports.txt): Envoy calls only these.
KEPT_EXPORTS = {
    "memory",
    "_initialize",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    "proxy_on_vm_start",
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

# The SDK methods and host calls behind each removed export: the filter must use none of them, or the
# callback it implements would silently never run.
UNUSED_CALLBACK_USES = re.compile(
    r"fn on_http_request_(body|trailers)\b|fn on_http_response_trailers\b|fn on_(new_connection|downstream_data|"
    r"upstream_data|downstream_close|upstream_close|queue_ready|foreign_function|done)\b|fn on_grpc_|grpc_call|"
    r"grpc_stream|shared_queue|call_foreign_function"
)


def test_release_wasm_fits_its_size_budget():
    size = os.path.getsize(wasm_path())
    assert size <= WASM_BUDGET_BYTES, f"{wasm_path()} is {size} bytes, budget {WASM_BUDGET_BYTES}"


def test_release_wasm_exports_only_the_callbacks_the_filter_implements():
    removed = set((REPO / "filter" / "wasm" / "unused-exports.txt").read_text().split())
    exports = wasmfile.exports(wasm_path())
    assert exports == KEPT_EXPORTS, f"unexpected: {sorted(exports - KEPT_EXPORTS)}, missing: {sorted(KEPT_EXPORTS - exports)}"
    assert not removed & exports
    assert len(removed) == 15 and all(name.startswith("proxy_on_") for name in removed)


def test_the_filter_uses_no_callback_whose_export_is_removed():
    for path in sorted((REPO / "filter" / "wasm" / "src").glob("*.rs")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not UNUSED_CALLBACK_USES.search(line), (
                f"{path.relative_to(REPO)}:{number} uses a callback `make filter` removes from the module's exports; "
                f"take it out of filter/wasm/unused-exports.txt: {line.strip()}"
            )
