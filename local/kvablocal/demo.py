"""`make demo` and `make demo-up` on the full local stack.

`make demo`: starts the stack on the public ports (gateway 127.0.0.1:18080, the runbook's
port-forward port; kvab serve 18090; Envoy admin 18001; arms 18101/18102), runs `kvab check` in
local mode, prints its report, stops everything it started and exits with the check's code.

`make demo-up` (`--up`): starts the same stack and a Prometheus scraping it (with the kvab alert
rules; 127.0.0.1:19090, KVAB_PROMETHEUS_PORT), prints their URLs and the runbook's curl lines, and
keeps them running until Ctrl-C.

KVAB_FS_DELAY_MS (default 40) is how much slower the FS arm is than the NVLink arm
(KVAB_NVLINK_DELAY_MS, default 10) before the first token: the A/B verdict should find it.
"""

import argparse
import signal
import subprocess
import sys
import threading

from .prometheus import DEMO_PORT, RULES, Prometheus, gateway_target, sidecar_target
from .sidecar import kvab_binary
from .stack import Stack, env_port, public_ports


def start() -> Stack:
    nvlink_ms = env_port("KVAB_NVLINK_DELAY_MS", 10)
    fs_extra_ms = env_port("KVAB_FS_DELAY_MS", 40)
    stack = Stack(ports=public_ports(), nvlink_delay=nvlink_ms / 1000, fs_delay=(nvlink_ms + fs_extra_ms) / 1000)
    return stack.start()


def describe(stack: Stack) -> str:
    u = stack.urls()
    return "\n".join([
        f"kvab local stack (the FS arm is {env_port('KVAB_FS_DELAY_MS', 40)} ms slower before the first token):",
        f"  gateway (Envoy + kvab filter)  {u['gateway']}",
        f"  kvab serve                     {u['sidecar']}  (/v1/endpoints, /metrics)",
        f"  Envoy admin                    {u['envoy_admin']}  (/stats/prometheus)",
        f"  nvlink arm (vllm-p2p-proxy)    {u['nvlink']}",
        f"  fs arm (vllm-fs-proxy)         {u['fs']}",
    ])


def demo() -> int:
    stack = start()
    try:
        print(describe(stack))
        command = ["kvab", "check", *stack.check_args()]
        print(f"\n$ {' '.join(command)}\n", flush=True)
        # stderr is inherited, so the burst's progress bar shows on a terminal.
        return subprocess.run([kvab_binary(), *command[1:]], stdout=sys.stdout, stderr=sys.stderr, timeout=300).returncode
    finally:
        stack.stop()


def up() -> int:
    stack = start()
    prometheus = None
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        prometheus = Prometheus(port=env_port("KVAB_PROMETHEUS_PORT", DEMO_PORT), rule_files=[RULES]).start(
            [gateway_target(stack.gateway.admin_port), sidecar_target(stack.sidecar.port)]
        )
        gateway = stack.urls()["gateway"]
        print(describe(stack))
        print(f"  Prometheus (kvab alert rules)  {prometheus.url}  (graph kvab_routed_requests_total, kvab_served_total)")
        print(f"""
Try the runbook's Step 3 and the whole check:
  curl -sS -X POST {gateway}/v1/completions -H "Content-Type: application/json" -H "x-kv-backend: nvlink" \\
    -d '{{"model":"Qwen/Qwen3-Coder-30B-A3B-Instruct","prompt":"Hello","max_tokens":5}}'
  {kvab_binary()} check {' '.join(stack.check_args())}

Ctrl-C stops everything.""", flush=True)
        stopped.wait()
        print("\nstopping", flush=True)
        return 0
    finally:
        if prometheus:
            prometheus.stop()
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--up", action="store_true", help="keep the stack running until Ctrl-C (make demo-up)")
    return up() if parser.parse_args().up else demo()


if __name__ == "__main__":
    sys.exit(main())
