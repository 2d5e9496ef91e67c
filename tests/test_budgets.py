"""Deterministic budgets guarded on every run (speed figures live in BENCHMARKS.md, not here)."""

import os

from kvablocal.envoy import wasm_path

WASM_BUDGET_BYTES = 256_000


def test_release_wasm_fits_its_size_budget():
    size = os.path.getsize(wasm_path())
    assert size <= WASM_BUDGET_BYTES, f"{wasm_path()} is {size} bytes, budget {WASM_BUDGET_BYTES}"
