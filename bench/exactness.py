"""Counter exactness under load: N requests at concurrency C without the header, so the filter's
`split` assigns every one; then the client's count, the filter's counters (Envoy stats), the
sidecar's `kvab_routed_requests_total` and the two upstreams' own request counts must agree
exactly, and the split must be within binomial tolerance of its weights.

    python bench/exactness.py                    # the `make bench` run: 100,032 requests at -c 64
    python bench/exactness.py --requests 20000   # shorter

The client is hey (Debian): it sends N/C requests per worker and reports every status and error,
so N is rounded up to a multiple of C. The upstreams are two Envoys answering by themselves
(direct_response), so the arms are not the bottleneck; the gateway runs 2 workers, i.e. two
filter VMs reporting separately. Exits 1 when any count disagrees.
"""

import argparse
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))
sys.path.insert(0, str(REPO / "bench"))

from filterbench import BODY, Envoy, machine, render_upstream  # noqa: E402
from kvablocal import prom  # noqa: E402
from kvablocal.envoy import Gateway  # noqa: E402
from kvablocal.net import free_port, request, wait_until  # noqa: E402
from kvablocal.sidecar import Sidecar, static_config  # noqa: E402

WEIGHTS = {"nvlink": 3, "fs": 1}
SPLIT = ", ".join(f"{arm} {weight}" for arm, weight in WEIGHTS.items())
PODS = {"nvlink": "bench/vllm-p2p-proxy", "fs": "bench/vllm-fs-proxy"}
REFRESH_MS = 200
# |z| beyond this for the split share would happen by chance about once in 15,000 runs.
Z_LIMIT = 4.0


def hey(port: int, requests: int, concurrency: int, timeout_s: int) -> dict:
    binary = shutil.which("hey")
    if not binary:
        raise SystemExit("hey not found: `apt-get install -y hey` (make bench does this)")
    out = subprocess.run(
        [binary, "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "application/json",
         "-d", BODY.decode(), "-t", "10", f"http://127.0.0.1:{port}/v1/completions"],
        capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"hey failed ({out.returncode}): {out.stderr}{out.stdout}")
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out.stdout)}
    errors = sum(int(n) for n in re.findall(r"\[(\d+)\]\s+[^\n]*\n", out.stdout.split("Error distribution:")[1])) \
        if "Error distribution:" in out.stdout else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))
    return {"statuses": statuses, "errors": errors, "rps": rps}


def upstream_2xx(upstream: Envoy) -> int:
    samples = prom.parse(upstream.admin("/stats/prometheus"))
    return int(prom.value(samples, "envoy_http_downstream_rq_xx", envoy_response_code_class="2",
                          envoy_http_conn_manager_prefix="upstream"))


def filter_counts(gateway: Gateway) -> dict:
    s = gateway.stats()
    return {
        "requests": {arm: prom.value(s, "kvab_requests_total", backend=arm, source="split") for arm in WEIGHTS},
        "responses": sum(prom.select(s, "kvab_responses_total").values()),
        "served": {arm: prom.value(s, "kvab_served_total", requested=arm, served=arm) for arm in WEIGHTS},
        "misrouted": sum(v for (name, labels), v in s.items()
                         if name == "kvab_served_total" and dict(labels)["requested"] != dict(labels)["served"]),
    }


def routed(sidecar: Sidecar) -> dict:
    samples = sidecar.samples()
    return {arm: prom.value(samples, "kvab_routed_requests_total", requested=arm, served=arm, pod=PODS[arm],
                            code_class="2xx") for arm in WEIGHTS}


def run(args) -> int:
    requests_n = math.ceil(args.requests / args.concurrency) * args.concurrency
    workdir = Path(tempfile.mkdtemp(prefix="kvab-exactness-"))
    upstreams = {}
    for arm in WEIGHTS:
        admin, port = free_port(), free_port()
        upstreams[arm] = Envoy(f"upstream-{arm}", render_upstream(workdir / f"upstream-{arm}.yaml", admin, port),
                               admin, port, workdir, workers=1)
    endpoints = [(arm, f"127.0.0.1:{u.port}", PODS[arm]) for arm, u in upstreams.items()]
    # No probes of the upstreams' /metrics: their request counters must count only the load.
    sidecar = Sidecar(static_config(endpoints, extra="[probe]\ninterval_seconds = 0"), workdir=workdir)
    config = {"onMissing": "split", "split": {"weights": WEIGHTS}, "responseEndpointHeader": True,
              "sidecar": {"cluster": "kvab-sidecar", "refreshMs": REFRESH_MS}}
    gateway = None
    try:
        for u in upstreams.values():
            u.start()
        for u in upstreams.values():
            u.wait_ready(60)
        sidecar.start()
        gateway = Gateway(config, upstreams["nvlink"].port, upstreams["fs"].port, sidecar_port=sidecar.port,
                          concurrency=2, workdir=workdir / "gateway").start()
        # The filter has a map once a response names the arm that served it.
        wait_until(lambda: request(gateway.port, "POST", "/v1/completions", [], BODY).header(
            "x-kv-backend-endpoint") is not None and routed(sidecar)["nvlink"] + routed(sidecar)["fs"] > 0,
            15, what="the filter linked to the sidecar")
        wait_until(lambda: sum(routed(sidecar).values()) == filter_counts(gateway)["responses"], 10,
                   what="warm-up requests reported")
        before = {"filter": filter_counts(gateway), "routed": routed(sidecar),
                  "upstream": {arm: upstream_2xx(u) for arm, u in upstreams.items()}}

        started = time.monotonic()
        client = hey(gateway.port, requests_n, args.concurrency, args.timeout)
        elapsed = time.monotonic() - started
        answered = sum(client["statuses"].values())
        ok = client["statuses"].get(200, 0)

        def delta():
            f, r = filter_counts(gateway), routed(sidecar)
            return {
                "filter_requests": {a: int(f["requests"][a] - before["filter"]["requests"][a]) for a in WEIGHTS},
                "filter_responses": int(f["responses"] - before["filter"]["responses"]),
                "filter_served": {a: int(f["served"][a] - before["filter"]["served"][a]) for a in WEIGHTS},
                "misrouted": int(f["misrouted"] - before["filter"]["misrouted"]),
                "routed": {a: int(r[a] - before["routed"][a]) for a in WEIGHTS},
                "upstream": {a: upstream_2xx(u) - before["upstream"][a] for a, u in upstreams.items()},
            }

        # Reports go out every refresh: wait until the sidecar has them all (or time out and show).
        try:
            wait_until(lambda: sum(delta()["routed"].values()) >= answered, 15, what="the sidecar's counts to settle")
        except TimeoutError:
            pass
        time.sleep(3 * REFRESH_MS / 1000)  # anything counted twice would show up now
        d = delta()
        gateway.assert_healthy()
    finally:
        if gateway:
            gateway.stop()
        sidecar.stop()
        for u in upstreams.values():
            u.stop()

    share = WEIGHTS["nvlink"] / sum(WEIGHTS.values())
    k = d["upstream"]["nvlink"]
    n = sum(d["upstream"].values())
    z = (k - n * share) / math.sqrt(n * share * (1 - share)) if n else float("inf")
    checks = [
        ("client: every request answered 200", answered == requests_n and ok == requests_n and client["errors"] == 0,
         f"{ok} of {requests_n} answered 200, other statuses {dict((c, v) for c, v in client['statuses'].items() if c != 200)}, errors {client['errors']}"),
        ("upstreams served = client's 200s", n == ok, f"{d['upstream']} sum {n}"),
        ("filter kvab_requests_total{source=split} = client's count", sum(d["filter_requests"].values()) == requests_n,
         f"{d['filter_requests']}"),
        ("filter kvab_responses_total = client's count", d["filter_responses"] == answered, str(d['filter_responses'])),
        ("filter per arm = upstream per arm", all(d["filter_requests"][a] == d["upstream"][a] == d["filter_served"][a]
                                                  for a in WEIGHTS), f"served {d['filter_served']}"),
        ("no misroutes", d["misrouted"] == 0, str(d['misrouted'])),
        ("sidecar kvab_routed_requests_total per pod = upstream per arm",
         all(d["routed"][a] == d["upstream"][a] for a in WEIGHTS), f"{d['routed']}"),
        (f"split ({SPLIT}) within binomial tolerance (|z| < {Z_LIMIT})", abs(z) < Z_LIMIT,
         f"nvlink share {k / n if n else 0:.4f} (expected {share:.4f}), z = {z:+.2f}"),
    ]
    print(f"# counter exactness: {requests_n} requests, hey -c {args.concurrency}, gateway 2 workers, "
          f"split {SPLIT}; {elapsed:.1f} s, {client['rps']:.0f} req/s; {machine()}")
    print("| check | result | measured |\n|---|---|---|")
    for name, passed, measured in checks:
        print(f"| {name} | {'ok' if passed else 'FAILED'} | {measured} |")
    return 0 if all(passed for _, passed, _ in checks) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000, help="requests to send (rounded up to a multiple of -c)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=600, help="bound on the whole load run, seconds")
    sys.exit(run(ap.parse_args()))


if __name__ == "__main__":
    main()
