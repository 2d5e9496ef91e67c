"""Hostile and malformed input against the real Envoy with the filter: docs/operations.md's "Bad input"
matrix, the allowChoice policy, and the counts afterwards.

Requests are written to a raw socket, byte for byte, so that values http.client refuses (control
characters, obs-text, bare CR, obs-fold, names with spaces) reach Envoy as given. Some never reach
the filter: Envoy's HTTP/1 codec answers them itself (400 http1.invalid_characters, 431), and that
observed outcome is what the matrix asserts. After the whole matrix Envoy still serves, no request
got 503 wasm_fail_stream (checked here and by the `gateways` fixture), and every request the
filter saw is counted exactly once.
"""

import http.client
import json
import socket
from pathlib import Path

import pytest


from kvablocal import prom
from kvablocal.envoy import Gateway
from kvablocal.net import wait_until

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


class Reply:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = [(k.lower(), v) for k, v in headers]
        self.body = body

    def header(self, name):
        return next((v for k, v in self.headers if k == name), None)

    def forwarded(self, name):
        """Values of request header `name` as the arm received it (the arm echoes them)."""
        return [v for k, v in json.loads(self.body)["headers"] if k == name]


def raw_request(port, header_lines, source_ip="127.0.0.1", body=b'{"prompt":"Hello"}'):
    """POST /v1/completions with `header_lines` (bytes, without CRLF) written exactly as given."""
    head = b"POST /v1/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
    head += b"".join(line + b"\r\n" for line in header_lines)
    head += b"content-length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source_ip, 0)) as s:
        s.sendall(head + body)
        r = http.client.HTTPResponse(s)
        r.begin()
        return Reply(r.status, r.getheaders(), r.read())


def h(value: bytes, name: bytes = b"x-kv-backend") -> bytes:
    return name + b": " + value


# Outcomes. Arm(arm, source): 200 from that arm, forwarded with the canonical tag.
# Untagged(): 200 from the pool, no tag forwarded. Reject(code): the filter's JSON 400.
# Codec(status, details): Envoy's HTTP/1 codec answered; the filter never saw the request.
class Arm(tuple):
    def __new__(cls, arm, source):
        return super().__new__(cls, ("arm", arm, source))


def Untagged():
    return ("untagged",)


def Reject(code):
    return ("reject", code)


def Codec(status, details):
    return ("codec", status, details)


FORGED = [h(b"header", b"x-kv-backend-source"), h(b"6.6.6.6:1", b"x-kv-backend-endpoint")]

# (id as in the docs/operations.md table, header lines, outcome)
MATRIX = [
    ("empty value", [h(b"")], Untagged()),
    ("whitespace only", [h(b" \t  \t")], Untagged()),
    ("mixed case value", [h(b"NvLiNk")], Arm("nvlink", "header")),
    ("mixed case name", [b"X-KV-Backend: FS"], Arm("fs", "header")),
    ("leading/trailing spaces and tabs", [h(b"\t  fs \t ")], Arm("fs", "header")),
    ("alias with blanks", [h(b" \tP2P\t ")], Arm("nvlink", "alias")),
    ("repeated, equal values", [h(b"fs"), h(b"fs")], Arm("fs", "header")),
    ("repeated, same arm by alias", [h(b"fs"), h(b"FILE")], Arm("fs", "alias")),
    ("repeated, different values", [h(b"fs"), h(b"nvlink")], Reject("ambiguous_kv_backend")),
    ("repeated, arm and unknown", [h(b"fs"), h(b"bogus")], Reject("ambiguous_kv_backend")),
    ("comma list, one arm", [h(b"nvlink, p2p,,")], Arm("nvlink", "alias")),
    ("comma list, two arms", [h(b"nvlink,fs")], Reject("ambiguous_kv_backend")),
    ("comma list, only commas", [h(b" , ,")], Untagged()),
    ("8 KiB value", [h(b"a" * 8192)], Reject("unknown_kv_backend")),
    ("8 KiB comma list of one arm", [h(b"nvlink," * 1170)], Arm("nvlink", "header")),
    ("70 KB value", [h(b"a" * 70000)], Codec(431, "http1.headers_too_large")),
    ("non-UTF-8 bytes", [h(b"\xff\xfenvlink")], Reject("unknown_kv_backend")),
    ("obs-text (Latin-1 NBSP after fs)", [h(b"fs\xa0")], Reject("unknown_kv_backend")),
    ("UTF-8 (NBSP after fs)", [h(b"fs\xc2\xa0")], Reject("unknown_kv_backend")),
    ("UTF-8 (café)", [h("café".encode())], Reject("unknown_kv_backend")),
    ("tab inside", [h(b"nv\tlink")], Reject("unknown_kv_backend")),
    ("obs-fold continuation line", [h(b"nv"), b" link"], Reject("unknown_kv_backend")),
    ("control character 0x01", [h(b"nv\x01link")], Codec(400, "http1.invalid_characters")),
    ("control character ESC", [h(b"\x1b[31mfs")], Codec(400, "http1.invalid_characters")),
    ("DEL", [h(b"nvlink\x7f")], Codec(400, "http1.invalid_characters")),
    ("NUL", [h(b"nv\x00link")], Codec(400, "http1.invalid_characters")),
    ("bare CR inside", [h(b"nv\rlink")], Arm("nvlink", "header")),
    ("bare CR before a forged header", [h(b"p2p\rx-kv-backend-source: forged")], Reject("unknown_kv_backend")),
    ("nvlink2", [h(b"nvlink2")], Reject("unknown_kv_backend")),
    ("fs with a trailing space", [h(b"fs ")], Arm("fs", "header")),
    ("f s", [h(b"f s")], Reject("unknown_kv_backend")),
    ("none", [h(b"none")], Reject("unknown_kv_backend")),
    ("a source label as value (split)", [h(b"split")], Reject("unknown_kv_backend")),
    ("name with a space before the colon", [b"x-kv-backend : fs"], Codec(400, "http1.codec_error")),
    ("name close to the real one", [h(b"fs", b"x-kv-backends")], Untagged()),
    ("alias plus forged source tag", [h(b"p2p"), FORGED[0]], Arm("nvlink", "alias")),
    ("forged source and endpoint tags, no arm", FORGED, Untagged()),
    ("forged tags, repeated, with an arm", FORGED + FORGED + [h(b"fs")], Arm("fs", "header")),
    ("forged tags with an unknown value", FORGED + [h(b"bogus")], Reject("unknown_kv_backend")),
    ("95 occurrences of one arm", [h(b"fs")] * 95, Arm("fs", "header")),
    ("94 occurrences of one arm, one of another", [h(b"fs")] * 94 + [h(b"nvlink")], Reject("ambiguous_kv_backend")),
    ("150 headers", [h(b"v", b"x-h%d" % i) for i in range(150)] + [h(b"fs")], Codec(431, "http1.too_many_headers")),
]


def wasm_vm_stats(gateway):
    """Envoy's own counters of the filter's VMs: a trap would reload or re-create one."""
    return {k: v for k, v in (l.split(": ", 1) for l in gateway.admin("/stats").splitlines() if l.startswith("wasm.") and ": " in l) if "vm_reload" in k or k.endswith((".v8.created", ".v8.active", "wasm_vm_count"))}


# check_outcome reads the response endpoint tag, so every gateway here turns it on explicitly.
ENDPOINT_TAG = {"responseEndpointHeader": True}


@pytest.fixture(scope="module")
def matrix_gateway(gateways):
    g = gateways(ENDPOINT_TAG)
    g.vm_stats_at_start = wasm_vm_stats(g)
    return g


# What the filter was shown, tallied by the matrix tests for the final count check.
SEEN = {"requests": 0, "rejected": {}, "invalid": {}}


def check_outcome(reply, outcome, arms):
    kind = outcome[0]
    if kind == "arm":
        _, arm, source = outcome
        assert reply.status == 200, reply.body[:300]
        assert reply.header("x-served-by") == arm
        assert reply.forwarded("x-kv-backend") == [arm]
        assert reply.forwarded("x-kv-backend-source") == [source]
        assert reply.forwarded("x-kv-backend-endpoint") == []
        assert reply.header("x-kv-backend") == arm
        assert reply.header("x-kv-backend-endpoint") == f"127.0.0.1:{arms[arm].port}"
    elif kind == "untagged":
        assert reply.status == 200, reply.body[:300]
        assert reply.header("x-served-by") in ("nvlink", "fs")
        assert reply.forwarded("x-kv-backend") == []
        assert reply.forwarded("x-kv-backend-source") == []
        assert reply.forwarded("x-kv-backend-endpoint") == []
        assert reply.header("x-kv-backend") is None
        served = reply.header("x-served-by")
        assert reply.header("x-kv-backend-endpoint") == f"127.0.0.1:{arms[served].port}"
    elif kind == "reject":
        assert reply.status == 400
        assert reply.header("x-served-by") is None
        assert reply.header("content-type") == "application/json"
        error = json.loads(reply.body)["error"]
        assert error["code"] == outcome[1]
        assert error["type"] == "invalid_request_error"
    else:
        _, status, _details = outcome
        assert reply.status == status
        assert b"kv_backend" not in reply.body, "the codec, not the filter, should answer"


def tally(outcome):
    kind = outcome[0]
    if kind == "codec":
        return
    SEEN["requests"] += 1
    if kind == "reject":
        code = outcome[1]
        SEEN["rejected"][code] = SEEN["rejected"].get(code, 0) + 1
        reason = {"unknown_kv_backend": "unknown", "ambiguous_kv_backend": "ambiguous"}[code]
        SEEN["invalid"][reason] = SEEN["invalid"].get(reason, 0) + 1


@pytest.mark.parametrize("name,lines,outcome", MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_matrix(matrix_gateway, arms, name, lines, outcome):
    before = {n: a.requests for n, a in arms.items()}
    reply = raw_request(matrix_gateway.port, lines)
    tally(outcome)
    check_outcome(reply, outcome, arms)
    reached = sum(a.requests for a in arms.values()) - sum(before.values())
    assert reached == (1 if outcome[0] in ("arm", "untagged") else 0)
    if outcome[0] == "codec":
        details = outcome[2]
        wait_until(lambda: any(l.split()[1] == details for l in matrix_gateway.access_log() if l.strip()), 5, what=details)


def test_after_the_matrix_envoy_serves_and_every_request_is_counted(matrix_gateway, arms):
    """Runs after the matrix (file order): Envoy still answers, no VM trapped, and the filter's
    counters add up to exactly the requests it saw (plus this one)."""
    reply = raw_request(matrix_gateway.port, [h(b"nvlink")])
    check_outcome(reply, Arm("nvlink", "header"), arms)
    seen = SEEN["requests"] + 1
    assert SEEN["requests"] > 0, "run together with the matrix"
    matrix_gateway.assert_healthy()
    assert not [l for l in matrix_gateway.access_log() if "wasm_fail_stream" in l or l.startswith("503")]

    def totals():
        s = matrix_gateway.stats()
        total = lambda name: sum(v for (n, _), v in s.items() if n == name)
        responses, admitted, rejected = total("kvab_responses_total"), total("kvab_requests_total"), total("kvab_rejected_total")
        return (responses, admitted + rejected) == (seen, seen) and s

    s = wait_until(totals, 5, what=f"{seen} requests counted once each")
    for code, n in SEEN["rejected"].items():
        assert prom.value(s, "kvab_rejected_total", reason=code) == n
    for reason, n in SEEN["invalid"].items():
        assert prom.value(s, "kvab_invalid_values_total", reason=reason) == n
    assert prom.value(s, "kvab_invalid_values_total", reason="not_allowed") == 0
    # Envoy's own view of the VMs: none reloaded or re-created since the start.
    vm = wasm_vm_stats(matrix_gateway)
    assert vm == matrix_gateway.vm_stats_at_start
    assert vm["wasm.kvab.vm_reload"] == "0" and vm["wasm.kvab.vm_reload_failure"] == "0"


def test_every_matrix_row_is_in_the_docs():
    text = OPERATIONS.read_text()
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    missing = [name for name, _, _ in MATRIX if f"| {name} |" not in section]
    assert missing == [], f"rows missing from docs/operations.md 'Bad input': {missing}"


# --- allowChoice: who may choose an arm --------------------------------------------------------

ALLOWED_IP, OTHER_IP = "127.0.0.2", "127.0.0.1"


@pytest.fixture(scope="module")
def policy_gateway(gateways):
    return gateways(
        {
            "onMissing": "default",
            "defaultArm": "fs",
            "allowChoice": {"sourceRanges": [f"{ALLOWED_IP}/32", "10.0.0.0/8"], "header": "x-kvab-ab-tester", "headerValues": ["team-kv"]},
            **ENDPOINT_TAG,
        }
    )


def test_a_request_from_an_allowed_range_chooses(policy_gateway, arms):
    for value, source in [(b"nvlink", "header"), (b"P2P", "alias")]:
        check_outcome(raw_request(policy_gateway.port, [h(value)], source_ip=ALLOWED_IP), Arm("nvlink", source), arms)
    reply = raw_request(policy_gateway.port, [h(b"bogus")], source_ip=ALLOWED_IP)
    check_outcome(reply, Reject("unknown_kv_backend"), arms)


def test_a_request_from_elsewhere_is_assigned_by_policy(policy_gateway, arms):
    """Its value, valid or not, is ignored and replaced: it gets onMissing's arm (fs, default),
    is never rejected (the arms are not even listed to it), and is counted as not_allowed."""
    before = prom.value(policy_gateway.stats(), "kvab_invalid_values_total", reason="not_allowed")
    values = [[h(b"nvlink")], [h(b"p2p")], [h(b"bogus")], [h(b"nvlink"), h(b"fs")], [h(b"nvlink"), *FORGED]]
    for lines in values:
        check_outcome(raw_request(policy_gateway.port, lines, source_ip=OTHER_IP), Arm("fs", "default"), arms)
    # Nothing chosen: nothing denied.
    check_outcome(raw_request(policy_gateway.port, [], source_ip=OTHER_IP), Arm("fs", "default"), arms)
    wait_until(
        lambda: prom.value(policy_gateway.stats(), "kvab_invalid_values_total", reason="not_allowed") == before + len(values),
        5,
        what="not_allowed counted",
    )


def test_the_configured_header_grants_the_choice(policy_gateway, arms):
    grant = h(b"team-kv", b"x-kvab-ab-tester")
    check_outcome(raw_request(policy_gateway.port, [h(b"nvlink"), grant], source_ip=OTHER_IP), Arm("nvlink", "header"), arms)
    for wrong in [b"TEAM-KV", b"team-kv2", b"", b"team-kv,team-kv"]:
        lines = [h(b"nvlink"), h(wrong, b"x-kvab-ab-tester")]
        check_outcome(raw_request(policy_gateway.port, lines, source_ip=OTHER_IP), Arm("fs", "default"), arms)


def test_source_address_follows_envoys_trusted_client_address(arms, tmp_path):
    """sourceRanges checks Envoy's `source.address`, the *trusted client address*. With the HTTP
    connection manager's default `use_remote_address: false` that address comes from the last
    x-forwarded-for entry, which any client can write; with `use_remote_address: true` (what
    Istio gateways run with) it is the peer's address. docs/filter.md says so; this shows it."""
    config = {"onMissing": "default", "defaultArm": "fs", "allowChoice": {"sourceRanges": ["10.0.0.0/8"]}, **ENDPOINT_TAG}
    forged_xff = [h(b"nvlink"), h(b"10.1.2.3", b"x-forwarded-for")]
    for use_remote_address, expected in [(False, Arm("nvlink", "header")), (True, Arm("fs", "default"))]:
        g = Gateway(config, arms["nvlink"].port, arms["fs"].port, workdir=tmp_path / f"ura-{use_remote_address}")
        if use_remote_address:
            text = g.config_path.read_text()
            assert text.count("stat_prefix: gateway\n") == 1
            g.config_path.write_text(text.replace("stat_prefix: gateway\n", "stat_prefix: gateway\n          use_remote_address: true\n"))
        g.start()
        try:
            check_outcome(raw_request(g.port, forged_xff), expected, arms)
            check_outcome(raw_request(g.port, [h(b"nvlink")]), Arm("fs", "default"), arms)
        finally:
            g.stop()
            g.assert_healthy()
