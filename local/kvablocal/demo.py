"""`make demo`: the runbook's Step 3 (header A/B sanity) against the local gateway.

Starts the two local proxy arms and the real Envoy with the kvab filter on the runbook's
port-forward port, sends the Step 3 requests, prints who answered and the filter's counters,
then stops everything it started.
"""

import json
import os
import sys
import tempfile

from . import prom
from .arm import ArmServer
from .envoy import Gateway
from .net import request, wait_until

BODY = json.dumps({"model": "Qwen/Qwen3-Coder-30B-A3B-Instruct", "prompt": "Hello", "max_tokens": 5}).encode()

STEP3 = [
    ("x-kv-backend: nvlink", [("x-kv-backend", "nvlink")]),
    ("x-kv-backend: fs", [("x-kv-backend", "fs")]),
    ("x-kv-backend: P2P (alias)", [("x-kv-backend", "P2P")]),
    ("(no header)", []),
    ("x-kv-backend: nvlink2", [("x-kv-backend", "nvlink2")]),
]


def port(env: str, default: int) -> int:
    return int(os.environ.get(env, default))


def main() -> int:
    gateway_port = port("KVAB_GATEWAY_PORT", 18080)
    admin_port = port("KVAB_ENVOY_ADMIN_PORT", 18001)
    nvlink = ArmServer("nvlink", port("KVAB_NVLINK_ARM_PORT", 18101)).start()
    fs = ArmServer("fs", port("KVAB_FS_ARM_PORT", 18102)).start()
    gateway = Gateway({}, nvlink.port, fs.port, gateway_port=gateway_port, admin_port=admin_port, workdir=tempfile.mkdtemp(prefix="kvab-demo-"))
    try:
        gateway.start()
        print(f"kvab demo: Envoy + kvab filter on http://127.0.0.1:{gateway.port} (admin :{gateway.admin_port});")
        print(f"           arms nvlink (vllm-p2p-proxy) on :{nvlink.port}, fs (vllm-fs-proxy) on :{fs.port}\n")
        print("Step 3: header A/B through the gateway (POST /v1/completions)")
        for label, headers in STEP3:
            r = request(gateway.port, "POST", "/v1/completions", [("content-type", "application/json"), *headers], BODY)
            if r.status == 200:
                forwarded = dict((k, v) for k, v in r.json()["headers"] if k.startswith("x-kv-backend"))
                tag = forwarded.get("x-kv-backend", "untagged, scheduler's pick")
                source = forwarded.get("x-kv-backend-source", "-")
                outcome = f"served by {r.header('x-served-by'):6} (tag {tag}, source {source}, endpoint {r.header('x-kv-backend-endpoint')})"
            else:
                error = r.json()["error"]
                outcome = f"{error['code']}: {error['message']}"
            print(f"  {label:28} -> {r.status}  {outcome}")

        # Responses are counted when each stream ends, just after the client has its answer.
        answered = lambda: sum(prom.select(gateway.stats(), "kvab_responses_total").values()) == len(STEP3)
        wait_until(answered, 5, what="every response counted")
        print("\nFilter counters (Envoy /stats/prometheus, non-zero):")
        for (name, labels), value in sorted(gateway.stats().items()):
            if name.startswith("kvab_") and value and not name.endswith(("_bucket", "_sum", "_count")):
                rendered = ",".join(f'{k}="{v}"' for k, v in labels)
                print(f"  {name}{{{rendered}}} {value:g}")
        return 0
    finally:
        gateway.stop()
        nvlink.stop()
        fs.stop()


if __name__ == "__main__":
    sys.exit(main())
