"""The full local stack: two OpenAI-compatible proxy arms, `kvab serve` (static endpoints) and the
real Envoy with the kvab filter linked to it. Used by `make demo`, `make demo-up` and the
`kvab check` end-to-end tests, which stage the runbook's failure signals through its knobs."""

import os
import subprocess
import tempfile
from pathlib import Path

from . import prom
from .arm import ArmServer
from .envoy import Gateway
from .net import wait_until
from .sidecar import Sidecar, kvab_binary, static_config

REPO = Path(__file__).resolve().parents[2]
WIRING = REPO / "local" / "wiring"
HTTPROUTE_FILE = WIRING / "httproute.yaml"
EPP_CONFIG_FILE = WIRING / "epp-config.yaml"

# Pod names the sidecar's map gives the local arms (they label the per-proxy counters).
PODS = {"nvlink": "local/vllm-p2p-proxy", "fs": "local/vllm-fs-proxy"}
# The filter fetches maps and reports every refresh; short so that counters settle quickly.
REFRESH_MS = 200


def env_port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def public_ports() -> dict:
    """The documented ports, each overridable by its environment variable."""
    return {
        "gateway": env_port("KVAB_GATEWAY_PORT", 18080),
        "sidecar": env_port("KVAB_SIDECAR_PORT", 18090),
        "admin": env_port("KVAB_ENVOY_ADMIN_PORT", 18001),
        "nvlink": env_port("KVAB_NVLINK_ARM_PORT", 18101),
        "fs": env_port("KVAB_FS_ARM_PORT", 18102),
    }


class Stack:
    """Arms, kvab serve and Envoy. Ports of 0 are picked free (tests); `public_ports()` for the demo.

    Knobs: `nvlink_delay`/`fs_delay` (extra fixed seconds before the first token, on top of the P/D
    model of `kvablocal.arm`), `nvlink_bandwidth`/`fs_bandwidth` (KV-transfer bytes/s; default 200e9 and
    20e9), `pd_model` (the other `PdModel` parameters, both arms), `metrics_status`
    ({arm: status} of `/metrics`), `swap_routes` (header routes to the wrong arm), `routes`
    ({header arm: the arm its route goes to}, e.g. {"nvlink": "fs"}), `filter_config` (the filter's
    configuration, e.g. a split; the sidecar link is added unless `link_sidecar` is False), `link_sidecar`
    (False: the filter runs without the sidecar, so no counters move), `sidecar_config`/`sidecar_env`
    (e.g. a Kubernetes-sourced sidecar instead of the static one), `drop` ({arm: (status, reason)}: that
    arm answers every completion as the EPP answers a request its flow control dropped), `fail_fraction`
    ({arm: fraction}: that fraction of the arm's completions are answered 503), `stall_fraction` and
    `stall_factor` ({arm: fraction}, {arm: factor}: that fraction of the arm's completions have their time
    to first token multiplied by the factor), `seed` (of which completions fail or stall; each arm draws
    from its own generator, seeded by `seed` and its name), `shared_link` (True: each arm's KV transfers
    share its link's bandwidth, so an arm's first tokens grow with its load; False: each transfer has the
    whole link, the unloaded model at any load), `nvlink_cache_tokens`/`fs_cache_tokens` (each arm's prefix-
    cache capacity, tokens; default 131,072 and 4,194,304; 0: no cache; a hit skips the prefill of the
    cached tokens, never their transfer).
    """

    def __init__(self, ports=None, nvlink_delay=0.010, fs_delay=0.050, jitter=0.003, metrics_status=None,
                 swap_routes=False, routes=None, link_sidecar=True, sidecar_config=None, sidecar_env=None, workdir=None,
                 nvlink_bandwidth=None, fs_bandwidth=None, pd_model=None, filter_config=None, drop=None,
                 fail_fraction=None, stall_fraction=None, stall_factor=None, seed=0, shared_link=True,
                 nvlink_cache_tokens=None, fs_cache_tokens=None):
        ports = ports or {}
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvab-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        metrics_status = metrics_status or {}
        drop = drop or {}
        fail_fraction, stall_fraction, stall_factor = fail_fraction or {}, stall_fraction or {}, stall_factor or {}
        cache_tokens = {"nvlink": nvlink_cache_tokens, "fs": fs_cache_tokens}

        def faults(arm: str) -> dict:
            return {"fail_fraction": fail_fraction.get(arm, 0.0), "stall_fraction": stall_fraction.get(arm, 0.0),
                    "stall_factor": stall_factor.get(arm, 1.0), "seed": seed, "shared_link": shared_link,
                    "prefix_cache_tokens": cache_tokens[arm]}

        self.arms = {
            "nvlink": ArmServer("nvlink", ports.get("nvlink", 0), delay=nvlink_delay, jitter=jitter,
                                metrics_status=metrics_status.get("nvlink", 200), bandwidth=nvlink_bandwidth,
                                pd_model=pd_model, drop=drop.get("nvlink"), **faults("nvlink")),
            "fs": ArmServer("fs", ports.get("fs", 0), delay=fs_delay, jitter=jitter,
                            metrics_status=metrics_status.get("fs", 200), bandwidth=fs_bandwidth, pd_model=pd_model,
                            drop=drop.get("fs"), **faults("fs")),
        }
        endpoints = [(arm, f"127.0.0.1:{server.port}", PODS[arm]) for arm, server in self.arms.items()]
        self.sidecar = Sidecar(
            sidecar_config or static_config(endpoints, extra="[probe]\ninterval_seconds = 1"),
            port=ports.get("sidecar", 0), workdir=self.workdir, env=sidecar_env,
        )
        filter_config = dict(filter_config or {})
        # The local stack shows the serving proxy in every response (kvab check reads it when the sidecar's
        # counters are not there); the shipped WasmPlugin turns it off.
        filter_config.setdefault("responseEndpointHeader", True)
        if link_sidecar:
            filter_config["sidecar"] = {"cluster": "kvab-sidecar", "refreshMs": REFRESH_MS}
        self.gateway = Gateway(
            filter_config, self.arms["nvlink"].port, self.arms["fs"].port,
            gateway_port=ports.get("gateway", 0), admin_port=ports.get("admin", 0),
            sidecar_port=self.sidecar.port, swap_routes=swap_routes, routes=routes, workdir=self.workdir / "envoy",
        )
        self.link_sidecar = link_sidecar

    def start(self) -> "Stack":
        try:
            for arm in self.arms.values():
                arm.start()
            self.sidecar.start()
            wait_until(lambda: self.sidecar.get("/readyz").status == 200, 15, what="kvab serve ready")
            self.gateway.start()
            if self.link_sidecar:
                fetched = lambda: prom.value(self.gateway.stats(), "kvab_endpoint_map_fetches_total", result="ok") >= 1
                wait_until(fetched, 10, what="the filter's first endpoint map")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        self.gateway.stop()
        if self.sidecar.proc:
            self.sidecar.stop()
        for arm in self.arms.values():
            try:
                arm.stop()
            except OSError:
                pass

    def urls(self) -> dict:
        return {
            "gateway": f"http://127.0.0.1:{self.gateway.port}",
            "sidecar": f"http://127.0.0.1:{self.sidecar.port}",
            "envoy_admin": f"http://127.0.0.1:{self.gateway.admin_port}",
            "nvlink": f"http://127.0.0.1:{self.arms['nvlink'].port}",
            "fs": f"http://127.0.0.1:{self.arms['fs'].port}",
        }

    def check_args(self) -> list:
        """`kvab check` flags pointing at this stack and the demo's Step 2 files."""
        u = self.urls()
        return [
            "--local", "--gateway-url", u["gateway"], "--sidecar-url", u["sidecar"],
            "--envoy-admin-url", u["envoy_admin"], "--proxy-url", f"nvlink={u['nvlink']}",
            "--proxy-url", f"fs={u['fs']}", "--httproute-file", str(HTTPROUTE_FILE),
            "--epp-config-file", str(EPP_CONFIG_FILE), "--require-label-selector",
        ]

    def check(self, *extra, timeout=120) -> subprocess.CompletedProcess:
        """Runs `kvab check` against this stack; returns the finished process (stdout, stderr, code)."""
        return subprocess.run([kvab_binary(), "check", *self.check_args(), *extra], capture_output=True, text=True, timeout=timeout)
