"""Writes the sha256 of the built filter module into the WasmPlugin and TrafficExtension manifests
(`make manifests-sha`).

Their sha256 must be the digest of the exact bytes kvab serve ships and serves at GET /v1/filter.wasm;
tests/test_manifests.py fails when a manifest names another one, or holds the module without being listed here."""

import hashlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WASM = REPO / "target" / "filter" / "kvab_filter.wasm"
ALTERNATIVES = REPO / "manifests" / "alternatives"
PLUGINS = [
    REPO / "manifests" / "wasmplugin.yaml",
    ALTERNATIVES / "wasmplugin-oci.yaml",
    ALTERNATIVES / "trafficextension.yaml",
    ALTERNATIVES / "trafficextension-allow-choice-jwt.yaml",
]
# spec.sha256 of a WasmPlugin, spec.wasm.sha256 of a TrafficExtension.
SHA_LINE = re.compile(r"^( +sha256: )[0-9a-f]{64}$", re.M)


def main() -> int:
    if not WASM.exists():
        print(f"{WASM.relative_to(REPO)} is missing: run `make build` first", file=sys.stderr)
        return 1
    digest = hashlib.sha256(WASM.read_bytes()).hexdigest()
    for path in PLUGINS:
        text = path.read_text()
        new, count = SHA_LINE.subn(lambda m: m.group(1) + digest, text)
        if count != 1:
            print(f"{path.relative_to(REPO)}: expected one `sha256: <64 hex>` line, found {count}", file=sys.stderr)
            return 1
        if new != text:
            path.write_text(new)
        print(f"{path.relative_to(REPO)}: sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
