#!/usr/bin/env python3
"""fakekube: a fake Kubernetes API server for integration tests (pods only, stdlib only).

It serves discovery, LIST/GET/WATCH of v1 Pods with the wire format and the
resourceVersion / selector / bookmark / 410 semantics of a real kube-apiserver, plus a
test control API under /_fake/. See README.md next to this file.

    python3 fakekube.py --port 0 --port-file F --kubeconfig-out K
"""

from __future__ import annotations

import argparse
import base64
import collections
import copy
import datetime
import hashlib
import http.server
import itertools
import json
import os
import queue
import re
import select
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

# ============================================================ selectors
# Label and field selectors with the grammar and errors of k8s.io/apimachinery
# (pkg/labels, pkg/fields).

class SelectorError(ValueError):
    """A selector that the real API server would reject with 400 BadRequest."""


# ---------------------------------------------------------------- validation

_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _validate_key(key: str) -> None:
    """Qualified name: optional DNS-subdomain prefix and '/', then a 63-char name."""
    parts = key.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            raise SelectorError(f'key: Invalid value: "{key}": prefix part must be non-empty')
        if len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix):
            raise SelectorError(
                f'key: Invalid value: "{key}": prefix part a lowercase RFC 1123 subdomain must consist of '
                "lower case alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character"
            )
    else:
        raise SelectorError(
            f'key: Invalid value: "{key}": a qualified name must consist of alphanumeric characters, '
            "'-', '_' or '.', and must start and end with an alphanumeric character with an optional "
            "DNS subdomain prefix and '/'"
        )
    if not name:
        raise SelectorError(f'key: Invalid value: "{key}": name part must be non-empty')
    if len(name) > 63:
        raise SelectorError(f'key: Invalid value: "{key}": name part must be no more than 63 characters')
    if not _NAME_RE.match(name):
        raise SelectorError(
            f'key: Invalid value: "{key}": name part must consist of alphanumeric characters, '
            "'-', '_' or '.', and must start and end with an alphanumeric character"
        )


def _validate_value(value: str, index: int) -> None:
    if len(value) > 63 or not _LABEL_VALUE_RE.match(value):
        raise SelectorError(
            f'values[{index}][{value}]: Invalid value: "{value}": a valid label must be an empty string or '
            "consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for "
            "validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        )


# --------------------------------------------------------------------- lexer

_IDENT, _IN, _NOTIN, _EQ, _DEQ, _NEQ, _NOT, _GT, _LT, _OPEN, _CLOSE, _COMMA, _EOS = (
    "identifier", "in", "notin", "=", "==", "!=", "!", ">", "<", "(", ")", ",", "end of string",
)
_SPECIAL = set("!=<>(),")


def _lex(s: str) -> list[tuple[str, str]]:
    toks: list[tuple[str, str]] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c.isspace():
            i += 1
            continue
        if c in _SPECIAL:
            two = s[i:i + 2]
            if two in ("==", "!="):
                toks.append((two, two))
                i += 2
                continue
            toks.append((c, c))
            i += 1
            continue
        j = i
        while j < n and not s[j].isspace() and s[j] not in _SPECIAL:
            j += 1
        word = s[i:j]
        if word == "in":
            toks.append((_IN, word))
        elif word == "notin":
            toks.append((_NOTIN, word))
        else:
            toks.append((_IDENT, word))
        i = j
    toks.append((_EOS, ""))
    return toks


# --------------------------------------------------------------- requirements

class Requirement:
    __slots__ = ("key", "op", "values")

    def __init__(self, key: str, op: str, values: list[str]):
        self.key, self.op, self.values = key, op, values

    def matches(self, labels: dict) -> bool:
        has = self.key in labels
        val = labels.get(self.key)
        op = self.op
        if op in ("=", "==", "in"):
            return has and val in self.values
        if op in ("!=", "notin"):
            return (not has) or val not in self.values
        if op == "exists":
            return has
        if op == "!":
            return not has
        if op in (">", "<"):
            if not has:
                return False
            try:
                lv = int(val)
            except (TypeError, ValueError):
                return False
            rv = int(self.values[0])
            return lv > rv if op == ">" else lv < rv
        return False

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Requirement({self.key!r}, {self.op!r}, {self.values!r})"


class LabelSelector:
    """A parsed label selector; empty selector matches everything."""

    def __init__(self, reqs: list[Requirement], text: str = ""):
        self.requirements = reqs
        self.text = text

    def empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: dict | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)


class _Parser:
    def __init__(self, text: str):
        self.toks = _lex(text)
        self.pos = 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.pos]

    def take(self) -> tuple[str, str]:
        t = self.toks[self.pos]
        if t[0] != _EOS:
            self.pos += 1
        return t

    def parse(self) -> list[Requirement]:
        reqs: list[Requirement] = []
        while True:
            kind, lit = self.peek()
            if kind in (_IDENT, _NOT):
                reqs.append(self.requirement())
                kind, lit = self.take()
                if kind == _EOS:
                    return reqs
                if kind == _COMMA:
                    nk, nl = self.peek()
                    if nk not in (_IDENT, _NOT):
                        raise SelectorError(f"found '{nl or _EOS}', expected: identifier after ','")
                    continue
                raise SelectorError(f"found '{lit}', expected: ',' or 'end of string'")
            if kind == _EOS:
                return reqs
            raise SelectorError(f"found '{lit}', expected: !, identifier, or 'end of string'")

    def requirement(self) -> Requirement:
        kind, lit = self.take()
        if kind == _NOT:
            kind, lit = self.take()
            if kind != _IDENT:
                raise SelectorError(f"found '{lit or _EOS}', expected: identifier")
            _validate_key(lit)
            nk, nl = self.peek()
            if nk not in (_EOS, _COMMA):
                raise SelectorError(f"found '{nl}', expected: ',' or 'end of string'")
            return Requirement(lit, "!", [])
        key = lit
        _validate_key(key)
        nk, nl = self.peek()
        if nk in (_EOS, _COMMA):
            return Requirement(key, "exists", [])
        kind, lit = self.take()
        if kind not in (_EQ, _DEQ, _NEQ, _IN, _NOTIN, _GT, _LT):
            raise SelectorError(f"found '{lit}', expected: {', '.join(['=', '!=', '==', 'in', 'notin', '>', '<'])}")
        op = kind
        if op in (_IN, _NOTIN):
            values = self.value_set()
            if not values:
                raise SelectorError("for 'in', 'notin' operators, values set can't be empty")
        else:
            vk, vl = self.peek()
            if vk == _IDENT:
                self.take()
                values = [vl]
            elif vk in (_EOS, _COMMA):
                values = [""]
            else:
                raise SelectorError(f"found '{vl}', expected: identifier")
            if op in (_GT, _LT):
                try:
                    int(values[0])
                except ValueError:
                    raise SelectorError(
                        f"for 'Gt', 'Lt' operators, the value must be an integer: {values[0]!r}"
                    ) from None
        for i, v in enumerate(values):
            if op not in (_GT, _LT):
                _validate_value(v, i)
        return Requirement(key, op, values)

    def value_set(self) -> list[str]:
        kind, lit = self.take()
        if kind != _OPEN:
            raise SelectorError(f"found '{lit or _EOS}', expected: '('")
        values: list[str] = []
        kind, lit = self.peek()
        if kind == _CLOSE:
            self.take()
            return values
        while True:
            kind, lit = self.take()
            if kind in (_IDENT, _IN, _NOTIN):
                values.append(lit)
                kind, lit = self.take()
                if kind == _CLOSE:
                    return values
                if kind == _COMMA:
                    nk, _ = self.peek()
                    if nk == _CLOSE:  # "(a,)" -> {"a", ""}
                        self.take()
                        values.append("")
                        return values
                    continue
                raise SelectorError(f"found '{lit or _EOS}', expected: ',' or ')'")
            if kind == _COMMA:  # "(,a)" -> {"", "a"}
                values.append("")
                continue
            raise SelectorError(f"found '{lit or _EOS}', expected: ',', or identifier")


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse a labelSelector query value. Raises SelectorError on invalid input."""
    text = text or ""
    reqs = _Parser(text).parse()
    return LabelSelector(reqs, text)


# ------------------------------------------------------------ field selectors

def _pod_field(pod: dict, field: str) -> str:
    md = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    st = pod.get("status") or {}
    if field == "metadata.name":
        return md.get("name", "")
    if field == "metadata.namespace":
        return md.get("namespace", "")
    if field == "spec.nodeName":
        return spec.get("nodeName", "") or ""
    if field == "spec.restartPolicy":
        return spec.get("restartPolicy", "") or ""
    if field == "spec.schedulerName":
        return spec.get("schedulerName", "") or ""
    if field == "spec.serviceAccountName":
        return spec.get("serviceAccountName", "") or ""
    if field == "spec.hostNetwork":
        return "true" if spec.get("hostNetwork") else "false"
    if field == "status.phase":
        return st.get("phase", "") or ""
    if field == "status.podIP":
        return st.get("podIP", "") or ""
    if field == "status.nominatedNodeName":
        return st.get("nominatedNodeName", "") or ""
    raise KeyError(field)


# The pod field labels the real API server accepts (pkg/registry/core/pod/strategy.go),
# minus status.podIPs which is multi-valued.
POD_FIELDS = (
    "metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
    "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
    "status.podIP", "status.nominatedNodeName",
)


class FieldSelector:
    def __init__(self, terms: list[tuple[str, str, str]], text: str = ""):
        self.terms = terms  # (field, op '='|'!=', value)
        self.text = text

    def empty(self) -> bool:
        return not self.terms

    def matches(self, pod: dict) -> bool:
        for field, op, value in self.terms:
            actual = _pod_field(pod, field)
            if (actual == value) != (op == "="):
                return False
        return True


def _split_unescaped(s: str, sep: str) -> list[str]:
    out, cur, i = [], [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _unescape_field_value(v: str) -> str:
    out, i = [], 0
    while i < len(v):
        c = v[i]
        if c == "\\":
            if i + 1 >= len(v):
                raise SelectorError(f"invalid field selector: {v!r}: trailing backslash")
            nxt = v[i + 1]
            if nxt not in "\\,=":
                raise SelectorError(f"invalid field selector: {v!r}: invalid escape sequence")
            out.append(nxt)
            i += 2
            continue
        if c in ",=":
            raise SelectorError(f"invalid field selector: {v!r}: unescaped {c!r}")
        out.append(c)
        i += 1
    return "".join(out)


def parse_field_selector(text: str | None, supported=POD_FIELDS) -> FieldSelector:
    """Parse a fieldSelector (k=v, k==v, k!=v, comma = AND). Unsupported fields are
    rejected like the real server does ('field label not supported: ...')."""
    text = (text or "").strip()
    terms: list[tuple[str, str, str]] = []
    if not text:
        return FieldSelector(terms, text)
    for part in _split_unescaped(text, ","):
        part = part.strip()
        if not part:
            continue
        for op in ("!=", "==", "="):
            idx = _find_unescaped(part, op)
            if idx >= 0:
                field = part[:idx].strip()
                value = _unescape_field_value(part[idx + len(op):].strip())
                terms.append((field, "!=" if op == "!=" else "=", value))
                break
        else:
            raise SelectorError(f"invalid selector: '{part}'; can't understand '{part}'")
    for field, _, _ in terms:
        if field not in supported:
            raise SelectorError(f'field label not supported: {field}')
    return FieldSelector(terms, text)


def _find_unescaped(s: str, op: str) -> int:
    i = 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s.startswith(op, i):
            return i
        i += 1
    return -1

# =================================================================== pods

def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp_metadata(md: dict, prev: dict | None, rv: int) -> dict:
    """What the API server sets on a write: uid and creationTimestamp kept from the stored object
    (new ones on create), and the new resourceVersion."""
    if prev is not None:
        md.setdefault("uid", prev["metadata"]["uid"])
        md.setdefault("creationTimestamp", prev["metadata"]["creationTimestamp"])
    else:
        md.setdefault("uid", str(uuid.uuid4()))
        md.setdefault("creationTimestamp", _now_rfc3339())
    md["resourceVersion"] = str(rv)
    return md


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _norm_ports(container_ports) -> list[dict]:
    ports = []
    for i, p in enumerate(container_ports or []):
        if isinstance(p, dict):
            d = dict(p)
            d.setdefault("protocol", "TCP")
        elif isinstance(p, (list, tuple)):
            d = {"name": str(p[0]), "containerPort": int(p[1]), "protocol": "TCP"}
        else:
            d = {"name": "http" if i == 0 else f"port-{int(p)}", "containerPort": int(p), "protocol": "TCP"}
        ports.append(d)
    return ports


def build_pod(name, ns="default", labels=None, ip=None, phase="Running", ready=True,
              terminating=False, container_ports=None, annotations=None, node="fake-node-1",
              container="main", image="registry.example/fake:latest", host_ip="192.168.0.10"):
    """A realistic v1 Pod (as kubelet would have reported it). Server-managed metadata
    (uid, resourceVersion, creationTimestamp) is filled in by the store."""
    if container_ports is None:
        container_ports = [{"name": "http", "containerPort": 8000}]
    ports = _norm_ports(container_ports)
    now = _now_rfc3339()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": dict(labels or {}),
        },
        "spec": {
            "containers": [{
                "name": container,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "ports": ports,
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            }],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": True,
            "nodeName": node,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "default",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        },
        "status": {"phase": phase, "qosClass": "BestEffort"},
    }
    if annotations:
        pod["metadata"]["annotations"] = dict(annotations)
    st = pod["status"]
    if phase != "Pending" or ip:
        st["hostIP"] = host_ip
        st["hostIPs"] = [{"ip": host_ip}]
    if ip:
        st["podIP"] = ip
        st["podIPs"] = [{"ip": ip}]
    st["startTime"] = now
    _set_ready(pod, ready, now)
    if terminating:
        _set_terminating(pod, True)
    return pod


def _set_ready(pod: dict, ready: bool, now: str | None = None) -> None:
    now = now or _now_rfc3339()
    st = pod.setdefault("status", {})
    phase = st.get("phase", "Running")
    val = "True" if ready else "False"
    conds = [
        {"type": "PodReadyToStartContainers", "status": "True" if phase != "Pending" else "False"},
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": val},
        {"type": "ContainersReady", "status": val},
        {"type": "PodScheduled", "status": "True"},
    ]
    for c in conds:
        c["lastProbeTime"] = None
        c["lastTransitionTime"] = now
        if c["type"] in ("Ready", "ContainersReady") and not ready:
            c["reason"] = "ContainersNotReady"
            c["message"] = "containers with unready status: [%s]" % ",".join(
                ct.get("name", "main") for ct in pod.get("spec", {}).get("containers", []))
    st["conditions"] = conds
    statuses = []
    for ct in pod.get("spec", {}).get("containers", []):
        cs = {
            "name": ct.get("name", "main"),
            "image": ct.get("image", ""),
            "imageID": "",
            "containerID": "containerd://" + hashlib.sha256(
                (pod["metadata"].get("name", "") + ct.get("name", "")).encode()).hexdigest(),
            "ready": bool(ready),
            "restartCount": 0,
            "started": phase == "Running",
        }
        if phase == "Running":
            cs["state"] = {"running": {"startedAt": now}}
        elif phase in ("Succeeded", "Failed"):
            cs["state"] = {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1,
                                          "reason": "Completed" if phase == "Succeeded" else "Error",
                                          "startedAt": now, "finishedAt": now}}
        else:
            cs["state"] = {"waiting": {"reason": "ContainerCreating"}}
        statuses.append(cs)
    st["containerStatuses"] = statuses


def _set_terminating(pod: dict, terminating: bool) -> None:
    md = pod.setdefault("metadata", {})
    if terminating:
        md.setdefault("deletionTimestamp", _now_rfc3339())
        md.setdefault("deletionGracePeriodSeconds", 30)
    else:
        md.pop("deletionTimestamp", None)
        md.pop("deletionGracePeriodSeconds", None)


_COMPACT_KEYS = {"name", "namespace", "ns", "labels", "annotations", "ip", "phase", "ready",
                 "terminating", "container_ports", "ports", "node"}


def pod_from_body(ns: str, name: str, body: dict) -> dict:
    """PUT /_fake/pods/{ns}/{name} body: a full Pod, or the compact form
    {"labels", "ip", "phase", "ready", "terminating", "ports"|"container_ports", "annotations", "node"}."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    if "metadata" in body or "spec" in body or "kind" in body:
        pod = copy.deepcopy(body)
        pod.setdefault("apiVersion", "v1")
        pod.setdefault("kind", "Pod")
        md = pod.setdefault("metadata", {})
        md["name"], md["namespace"] = name, ns
        return pod
    unknown = set(body) - _COMPACT_KEYS
    if unknown:
        raise ValueError(f"unknown compact pod keys: {sorted(unknown)}")
    return build_pod(
        name, ns, labels=body.get("labels"), ip=body.get("ip"), phase=body.get("phase", "Running"),
        ready=body.get("ready", True), terminating=body.get("terminating", False),
        container_ports=body.get("ports", body.get("container_ports")),
        annotations=body.get("annotations"), node=body.get("node", "fake-node-1"),
    )


def apply_patch(pod: dict, patch: dict) -> dict:
    """PATCH /_fake/pods body: JSON merge patch of the Pod, plus shorthand keys
    labels / annotations (merged into metadata, null removes a key), phase, ip, ready,
    terminating (bool) and deletionTimestamp (string or null)."""
    if not isinstance(patch, dict):
        raise ValueError("patch must be a JSON object")
    patch = dict(patch)
    short = {k: patch.pop(k) for k in list(patch) if k in
             ("labels", "annotations", "phase", "ip", "ready", "terminating", "deletionTimestamp")}
    out = _merge_patch(pod, patch)
    md = out.setdefault("metadata", {})
    for k in ("labels", "annotations"):
        if k in short:
            if short[k] is None:
                md.pop(k, None)
            else:
                md[k] = _merge_patch(md.get(k) or {}, short[k])
    st = out.setdefault("status", {})
    if "phase" in short:
        st["phase"] = short["phase"]
    if "ip" in short:
        if short["ip"]:
            st["podIP"] = short["ip"]
            st["podIPs"] = [{"ip": short["ip"]}]
        else:
            st.pop("podIP", None)
            st.pop("podIPs", None)
    if "ready" in short or "phase" in short:
        ready = short.get("ready")
        if ready is None:
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in st.get("conditions", []))
        _set_ready(out, bool(ready))
    if "terminating" in short:
        _set_terminating(out, bool(short["terminating"]))
    if "deletionTimestamp" in short:
        if short["deletionTimestamp"] is None:
            _set_terminating(out, False)
        else:
            md["deletionTimestamp"] = short["deletionTimestamp"]
            md.setdefault("deletionGracePeriodSeconds", 30)
    return out


# ================================================================== store

class Event:
    __slots__ = ("rv", "type", "obj", "prev")

    def __init__(self, rv: int, type_: str, obj: dict, prev: dict | None):
        self.rv, self.type, self.obj, self.prev = rv, type_, obj, prev


class Expired(Exception):
    pass


class Store:
    """Pods keyed by (namespace, name), a global resourceVersion counter and a bounded
    history of change events (the fake's "etcd + watch cache")."""

    def __init__(self, history: int = 1000, start_rv: int = 1):
        self.cond = threading.Condition()
        self.objects: dict[tuple[str, str], dict] = {}
        self.rv = max(1, int(start_rv))
        self.floor = self.rv  # events with rv > floor are all in history
        self.history: collections.deque[Event] = collections.deque()
        self.history_max = max(1, int(history))
        self.watchers: set["Watcher"] = set()

    # -- mutations (all under the lock) --
    def _record(self, type_: str, obj: dict, prev: dict | None) -> Event:
        ev = Event(self.rv, type_, obj, prev)
        while len(self.history) >= self.history_max:
            self.floor = self.history.popleft().rv
        self.history.append(ev)
        for w in list(self.watchers):
            w.queue.put(ev)
        self.cond.notify_all()
        return ev

    def put(self, pod: dict) -> tuple[dict, bool]:
        md = pod.setdefault("metadata", {})
        key = (md["namespace"], md["name"])
        with self.cond:
            prev = self.objects.get(key)
            self.rv += 1
            new = copy.deepcopy(pod)
            new.pop("kind", None)
            new.pop("apiVersion", None)
            stamp_metadata(new["metadata"], prev, self.rv)
            self.objects[key] = new
            self._record("MODIFIED" if prev is not None else "ADDED", new, prev)
            return new, prev is None

    def patch(self, ns: str, name: str, patch: dict) -> dict | None:
        with self.cond:
            cur = self.objects.get((ns, name))
            if cur is None:
                return None
            new = apply_patch(copy.deepcopy(cur), patch)
            md = new.setdefault("metadata", {})
            md["name"], md["namespace"] = name, ns
            md["uid"] = cur["metadata"]["uid"]
            md["creationTimestamp"] = cur["metadata"]["creationTimestamp"]
            return self.put(new)[0]

    def delete(self, ns: str, name: str) -> dict | None:
        with self.cond:
            prev = self.objects.pop((ns, name), None)
            if prev is None:
                return None
            self.rv += 1
            gone = copy.deepcopy(prev)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", gone, prev)
            return gone

    def compact(self) -> None:
        with self.cond:
            self.history.clear()
            self.floor = self.rv

    # -- reads --
    def snapshot(self, at_rv: int | None = None) -> tuple[int, dict]:
        """State as of at_rv (None = now). Raises Expired if at_rv precedes the history window."""
        with self.cond:
            objs = dict(self.objects)
            if at_rv is None or at_rv >= self.rv:
                return self.rv, objs
            if at_rv < self.floor:
                raise Expired(at_rv)
            for ev in reversed(self.history):
                if ev.rv <= at_rv:
                    break
                key = (ev.obj["metadata"]["namespace"], ev.obj["metadata"]["name"])
                if ev.prev is None:
                    objs.pop(key, None)
                else:
                    objs[key] = ev.prev
            return at_rv, objs

    def wait_for_rv(self, rv: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.rv >= rv, timeout)


def _with_type(obj: dict) -> dict:
    out = {"kind": "Pod", "apiVersion": "v1"}
    out.update(obj)
    return out


# ================================================================= status

_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict", 410: "Expired",
    422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
    504: "Timeout",
}


def status_obj(code: int, message: str, reason: str | None = None, details: dict | None = None) -> dict:
    st = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else _REASONS.get(code, ""),
        "code": code,
    }
    if details:
        st["details"] = details
    return st


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None,
                 details: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status_obj(code, message, reason, details)
        self.code = code
        self.headers = headers or {}


_INVALID = 'ListOptions.meta.k8s.io "" is invalid: '


def _parse_bool(v: str | None, name: str) -> bool | None:
    if v is None:
        return None
    if v in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if v in ("", "0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ApiError(400, f'{name}: Invalid value: "{v}": strconv.ParseBool: parsing "{v}": invalid syntax')


def _parse_rv(v: str, name: str = "resourceVersion") -> int:
    try:
        n = int(v)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise ApiError(400, f'{name}: Invalid value: "{v}": strconv.ParseUint: parsing "{v}": invalid syntax',
                       reason="BadRequest") from None


# ======================================================= continue tokens

def encode_continue(rv: int, start_key: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start_key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continue(tok: str) -> tuple[int, str]:
    try:
        pad = "=" * (-len(tok) % 4)
        d = json.loads(base64.urlsafe_b64decode(tok + pad).decode())
        if d.get("v") != "meta.k8s.io/v1":
            raise ValueError("unsupported version")
        rv = int(d["rv"])
        start = str(d["start"])
        if rv <= 0 or not start:
            raise ValueError("invalid fields")
        return rv, start
    except Exception as e:  # noqa: BLE001 - any decode failure is the same 400
        raise ApiError(400, f"continue key is not valid: {e}", reason="BadRequest") from None


def _obj_key(obj: dict) -> str:
    md = obj["metadata"]
    return f"{md['namespace']}/{md['name']}"


# ================================================================ watches

class Watcher:
    _ids = itertools.count(1)

    def __init__(self, path: str, lsel: LabelSelector, fsel: FieldSelector, conn: socket.socket):
        self.id = next(self._ids)
        self.path = path
        self.lsel, self.fsel = lsel, fsel
        self.conn = conn
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.started = time.time()
        self.ns: str | None = None

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        md = obj.get("metadata", {})
        if self.ns is not None and md.get("namespace") != self.ns:
            return False
        return self.lsel.matches(md.get("labels")) and self.fsel.matches(obj)

    def translate(self, ev: Event) -> tuple[str, dict] | None:
        """Watch-cache semantics: an update that makes an object leave the selector is a
        DELETED (carrying the new state), one that makes it enter is ADDED."""
        new_m = self.matches(ev.obj)
        if ev.type == "ADDED":
            return ("ADDED", ev.obj) if new_m else None
        if ev.type == "DELETED":
            return ("DELETED", ev.obj) if self.matches(ev.prev) or new_m else None
        old_m = self.matches(ev.prev)
        if old_m and new_m:
            return ("MODIFIED", ev.obj)
        if new_m:
            return ("ADDED", ev.obj)
        if old_m:
            return ("DELETED", ev.obj)
        return None


class _Signal:
    def __init__(self, kind: str):
        self.kind = kind


# ========================================================== other kinds
# Namespaced objects of the kinds `kvab check` reads besides pods. Served read-only (GET by
# name, LIST) with the real server's paths, list kinds and NotFound Status; changed only
# through /_fake/objects/. They share the global resourceVersion counter with the pods.

RESOURCES = {
    # key (kubectl's resource.group spelling) -> how the real server serves it
    "configmaps": {"group": "", "version": "v1", "plural": "configmaps", "kind": "ConfigMap",
                   "singular": "configmap", "shortNames": ["cm"]},
    "services": {"group": "", "version": "v1", "plural": "services", "kind": "Service",
                 "singular": "service", "shortNames": ["svc"], "categories": ["all"]},
    "deployments.apps": {"group": "apps", "version": "v1", "plural": "deployments", "kind": "Deployment",
                         "singular": "deployment", "shortNames": ["deploy"], "categories": ["all"]},
    "httproutes.gateway.networking.k8s.io": {
        "group": "gateway.networking.k8s.io", "version": "v1", "plural": "httproutes", "kind": "HTTPRoute",
        "singular": "httproute", "categories": ["gateway-api"]},
    "inferencepools.inference.networking.k8s.io": {
        "group": "inference.networking.k8s.io", "version": "v1", "plural": "inferencepools",
        "kind": "InferencePool", "singular": "inferencepool", "shortNames": ["infpool"]},
}
# Kinds whose spec changes bump metadata.generation (the real server does it for these).
_GENERATION_KINDS = {"Deployment", "HTTPRoute", "InferencePool"}


def resource_key(group: str, plural: str) -> str:
    return f"{plural}.{group}" if group else plural


def resource_for(api_version: str, kind: str) -> str | None:
    group, _, version = api_version.rpartition("/")
    for key, r in RESOURCES.items():
        if (r["group"], r["version"], r["kind"]) == (group, version, kind):
            return key
    return None


def _api_version(r: dict) -> str:
    return f"{r['group']}/{r['version']}" if r["group"] else r["version"]


def _typed(resource: str, obj: dict) -> dict:
    r = RESOURCES[resource]
    out = {"kind": r["kind"], "apiVersion": _api_version(r)}
    out.update(obj)
    return out


def _resource_list_entry(r: dict) -> dict:
    entry = {"name": r["plural"], "singularName": r["singular"], "namespaced": True, "kind": r["kind"],
             "verbs": ["get", "list"]}
    for k in ("shortNames", "categories"):
        if r.get(k):
            entry[k] = list(r[k])
    return entry


# Pod subresources the fake serves (discovery lists them as the real server does).
POD_SUBRESOURCES = [
    {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
    {"name": "pods/portforward", "singularName": "", "namespaced": True, "group": "", "version": "",
     "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
]

_API_CORE_PATH = re.compile(
    r"^/api/v1(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>configmaps|services)(?:/(?P<name>[^/]+))?/?$")
_API_GROUP_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+))?/?$")
_API_POD_SUB_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/(?P<sub>[^/]+)/?$")


def object_from_body(resource: str, ns: str, name: str, body: dict) -> dict:
    """PUT /_fake/objects/{resource}/{ns}/{name} body: the object; kind and apiVersion, when
    given, must be the resource's; name and namespace come from the URL."""
    if resource not in RESOURCES:
        raise ValueError(f"unknown resource {resource!r}; served: {sorted(RESOURCES)} (pods: /_fake/pods)")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    r = RESOURCES[resource]
    if body.get("kind", r["kind"]) != r["kind"] or body.get("apiVersion", _api_version(r)) != _api_version(r):
        raise ValueError(f"{resource} holds {_api_version(r)} {r['kind']}, not "
                         f"{body.get('apiVersion')} {body.get('kind')}")
    obj = copy.deepcopy(body)
    obj.pop("kind", None)
    obj.pop("apiVersion", None)
    md = obj.setdefault("metadata", {})
    if not isinstance(md, dict):
        raise ValueError("metadata must be an object")
    md["name"], md["namespace"] = name, ns
    return obj


# =============================================================== pod logs
# Lines a test appended to a pod's container (the kubelet's log files), served by
# GET /api/v1/namespaces/{ns}/pods/{name}/log with the PodLogOptions the real server takes.

def _parse_time(value) -> float:
    """Epoch seconds from a number or an RFC 3339 string (Z or an offset, optional fraction)."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"not an RFC 3339 time: {value!r}") from None


def _rfc3339_nano(t: float) -> str:
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond:06d}000Z"


def log_lines_from_body(body: dict, now: float) -> list[tuple[float, str]]:
    """POST /_fake/logs body: {"lines": ["text" | {"text", "time"?, "ago"?}], "time"?, "ago"?}.
    Without a time a line is stamped now; "ago" is seconds before now."""
    if not isinstance(body, dict) or not isinstance(body.get("lines"), list):
        raise ValueError('body must be {"lines": [...], "container"?, "time"?, "ago"?}')
    unknown = set(body) - {"lines", "container", "time", "ago"}
    if unknown:
        raise ValueError(f"unknown keys: {sorted(unknown)}")

    def stamp(d: dict, default: float) -> float:
        if d.get("time") is not None:
            return _parse_time(d["time"])
        if d.get("ago") is not None:
            return now - float(d["ago"])
        return default

    base = stamp(body, now)
    out = []
    for line in body["lines"]:
        if isinstance(line, str):
            out.append((base, line))
        elif isinstance(line, dict) and isinstance(line.get("text"), str):
            out.append((stamp(line, base), line["text"]))
        else:
            raise ValueError(f"a line is a string or {{\"text\", \"time\"?, \"ago\"?}}, not {line!r}")
    for _, text in out:
        if "\n" in text:
            raise ValueError("one line per entry (no newline inside a line)")
    return out


def _container_names(pod: dict) -> list[str]:
    return [c.get("name", "") for c in pod.get("spec", {}).get("containers", [])]


def _log_int(q: dict, name: str) -> int | None:
    if name not in q:
        return None
    try:
        return int(q[name])
    except ValueError:
        raise ApiError(400, f'{name}: Invalid value: "{q[name]}": strconv.ParseInt: parsing "{q[name]}": '
                            "invalid syntax", reason="BadRequest") from None


# ============================================================ port-forward
# The WebSocket port-forward the kubelet serves behind the API server (what kube-rs'
# Api::portforward speaks): subprotocol v4.channel.k8s.io, channel 2i = data of the i-th
# port, 2i+1 = its errors, each channel's first frame the port as 2 bytes little-endian.
# The fake connects each pod port to a local TCP address set through /_fake/portforward/.

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PORTFORWARD_PROTOCOL = "v4.channel.k8s.io"
# What the kubelet's port-forward handler accepts ("" = no subprotocol asked for).
_KUBELET_PF_PROTOCOLS = ["", PORTFORWARD_PROTOCOL, "v4.base64.channel.k8s.io"]
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def ws_frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One final frame; servers send unmasked frames, clients masked ones."""
    n = len(payload)
    head = bytearray([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class WsProtocolError(Exception):
    pass


def ws_read_frame(rfile, require_mask: bool = True) -> tuple[bool, int, bytes] | None:
    """(fin, opcode, payload) of the next frame, None at the end of the stream."""
    head = rfile.read(2)
    if len(head) < 2:
        return None
    fin, opcode = bool(head[0] & 0x80), head[0] & 0x0F
    masked, n = bool(head[1] & 0x80), head[1] & 0x7F
    if head[0] & 0x70:
        raise WsProtocolError("reserved bits set")
    if require_mask and not masked:
        raise WsProtocolError("client frame not masked")
    if n == 126:
        ext = rfile.read(2)
        n = int.from_bytes(ext, "big") if len(ext) == 2 else -1
    elif n == 127:
        ext = rfile.read(8)
        n = int.from_bytes(ext, "big") if len(ext) == 8 else -1
    if n < 0:
        return None
    key = rfile.read(4) if masked else b""
    payload = rfile.read(n) if n else b""
    if len(payload) < n or (masked and len(key) < 4):
        return None
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return fin, opcode, payload


def _parse_forward_target(value) -> tuple[str, int]:
    """A pod port's local stand-in: a port number (on 127.0.0.1) or "host:port"."""
    if isinstance(value, int) and not isinstance(value, bool):
        host, port = "127.0.0.1", value
    elif isinstance(value, str) and value.rpartition(":")[2].isdigit():
        host, _, p = value.rpartition(":")
        host, port = host or "127.0.0.1", int(p)
    else:
        raise ValueError(f"a forward target is a port or \"host:port\", not {value!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return host, port


class PortForwardSession:
    """One upgraded port-forward connection: initial port frames, a TCP connection per port
    to its target, then frames <-> bytes until either side ends (as the kubelet does)."""

    def __init__(self, conn: socket.socket, rfile, ports: list[int], targets: dict, sandbox: str):
        self.conn, self.rfile, self.ports = conn, rfile, ports
        self.targets, self.sandbox = targets, sandbox
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self.upstreams: list[socket.socket | None] = []
        self.bytes_in = self.bytes_out = 0
        self.errors: list[str] = []

    def _send(self, opcode: int, payload: bytes) -> None:
        with self.send_lock:
            if self.closed.is_set() and opcode != _OP_CLOSE:
                return
            self.conn.sendall(ws_frame(opcode, payload))

    def _close(self, code: int = 1000) -> None:
        with self.send_lock:
            if self.closed.is_set():
                return
            self.closed.set()
            try:
                self.conn.sendall(ws_frame(_OP_CLOSE, code.to_bytes(2, "big")))
            except OSError:
                pass
        for up in self.upstreams:
            if up is not None:
                try:
                    up.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def run(self) -> None:
        for i, port in enumerate(self.ports):
            le = port.to_bytes(2, "little")
            self._send(_OP_BINARY, bytes([2 * i]) + le)
            self._send(_OP_BINARY, bytes([2 * i + 1]) + le)
        pumps = []
        for i, port in enumerate(self.ports):
            target = self.targets.get(port)
            up = None
            try:
                if target is None:
                    raise ConnectionRefusedError("connect: connection refused")
                up = socket.create_connection(target, timeout=5)
                up.settimeout(None)
            except OSError as e:
                why = getattr(e, "strerror", None) or str(e) or "connection refused"
                msg = (f"error forwarding port {port} to pod {self.sandbox}, uid : failed to execute portforward "
                       f"in network namespace \"/var/run/netns/cni-{self.sandbox[:8]}\": failed to connect to "
                       f"localhost:{port} inside namespace \"{self.sandbox}\", IPv4: dial tcp4 127.0.0.1:{port}: "
                       f"connect: {why.lower()} IPv6 dial tcp6: address localhost: no suitable address found ")
                self.errors.append(msg)
                self._send(_OP_BINARY, bytes([2 * i + 1]) + msg.encode())
            self.upstreams.append(up)
            if up is not None:
                t = threading.Thread(target=self._pump, args=(i, up), daemon=True, name=f"pf-{port}")
                t.start()
                pumps.append(t)
        if not pumps:
            # nothing to forward: the kubelet ends the connection after the error message
            self._close()
            return
        threading.Thread(target=self._wait_pumps, args=(pumps,), daemon=True).start()
        self._read_client()
        self._close()

    def _wait_pumps(self, pumps) -> None:
        # The kubelet closes the WebSocket once every port's copy has ended.
        for t in pumps:
            t.join()
        self._close()

    def _pump(self, i: int, up: socket.socket) -> None:
        """Pod port -> client, as data frames on channel 2i."""
        try:
            while not self.closed.is_set():
                data = up.recv(65536)
                if not data:
                    break
                self.bytes_out += len(data)
                self._send(_OP_BINARY, bytes([2 * i]) + data)
        except OSError:
            pass

    def _read_client(self) -> None:
        """Client -> pod port: binary frames whose first byte names the data channel."""
        message, message_op = b"", None
        try:
            while not self.closed.is_set():
                frame = ws_read_frame(self.rfile)
                if frame is None:
                    return
                fin, opcode, payload = frame
                if opcode == _OP_CLOSE:
                    return
                if opcode == _OP_PING:
                    self._send(_OP_PONG, payload)
                    continue
                if opcode == _OP_PONG:
                    continue
                if opcode == _OP_CONT:
                    message += payload
                else:
                    message, message_op = payload, opcode
                if not fin:
                    continue
                data, op = message, message_op
                message, message_op = b"", None
                if op != _OP_BINARY or len(data) < 2:
                    continue
                ch = data[0]
                index = ch // 2
                if ch % 2 or index >= len(self.upstreams):
                    continue
                up = self.upstreams[index]
                if up is not None:
                    self.bytes_in += len(data) - 1
                    up.sendall(data[1:])
        except WsProtocolError:
            self._close(1002)
        except OSError:
            pass


# ============================================================ request info
# What the real server's RequestInfoFactory derives from a request, and what RBAC authorizes:
# verb, API group, resource[/subresource], namespace, name.

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def request_info(method: str, raw_path: str) -> dict:
    url = urllib.parse.urlsplit(raw_path)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    parts = [p for p in url.path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return {"verb": method.lower(), "nonResourceURL": url.path}
    watch = False
    if rest[:1] == ["watch"]:
        watch, rest = True, rest[1:]
    namespace = ""
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    sub = rest[2] if len(rest) > 2 else ""
    if method in ("GET", "HEAD"):
        verb = "get" if name else "list"
        if verb == "list" and (watch or query.get("watch", ["false"])[-1] in ("1", "true", "True")):
            verb = "watch"
        elif watch:
            verb = "watch"
    elif method == "DELETE" and not name:
        verb = "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    verbs = [verb]
    if verb == "get" and resource == "pods" and sub in ("exec", "attach", "portforward"):
        # A WebSocket upgrade is a GET, authorized as `get`; since 1.35 the API server also checks
        # `create` (feature gate AuthorizePodWebsocketUpgradeCreatePermission, on by default).
        verbs.append("create")
    return {"verb": verb, "verbs": verbs, "apiGroup": group,
            "resource": f"{resource}/{sub}" if sub else resource, "namespace": namespace, "name": name}


def _groups() -> dict:
    groups: dict[str, list[dict]] = {}
    for r in RESOURCES.values():
        if r["group"]:
            groups.setdefault(r["group"], []).append(r)
    return groups


def _api_group(item) -> dict:
    name, resources = item if isinstance(item, tuple) else (item, _groups()[item])
    versions = sorted({r["version"] for r in resources})
    gv = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": gv, "preferredVersion": gv[0]}


def _group_discovery(path: str) -> dict | None:
    """/apis/{group} (APIGroup) and /apis/{group}/{version} (APIResourceList) for the kinds served."""
    parts = [p for p in path.split("/") if p]
    groups = _groups()
    if len(parts) not in (2, 3) or parts[0] != "apis" or parts[1] not in groups:
        return None
    if len(parts) == 2:
        return {"kind": "APIGroup", "apiVersion": "v1", **_api_group((parts[1], groups[parts[1]]))}
    resources = [r for r in groups[parts[1]] if r["version"] == parts[2]]
    if not resources:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{parts[1]}/{parts[2]}",
            "resources": [_resource_list_entry(r) for r in resources]}


# ==================================================================== app

API_VERSION_INFO = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-fakekube",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T00:00:00Z",
    "goVersion": "go1.23.3",
    "compiler": "gc",
    "platform": "linux/amd64",
}

POD_RESOURCE = {
    "name": "pods",
    "singularName": "pod",
    "namespaced": True,
    "kind": "Pod",
    "verbs": ["get", "list", "watch"],
    "shortNames": ["po"],
    "categories": ["all"],
    "storageVersionHash": "xPOwRZ+Yhw8=",
}


class App:
    def __init__(self, args):
        self.args = args
        self.store = Store(history=args.history, start_rv=args.start_rv)
        self.bookmark_interval = float(args.bookmark_interval)
        self.too_large_wait = float(args.too_large_wait)
        self.token = args.token
        self.require_token = args.require_token
        self.lock = threading.Lock()
        self.lifecycle = threading.RLock()
        self.failures: list[dict] = []
        self.log: collections.deque = collections.deque(maxlen=args.log_size)
        self.api_server: ThreadingServer | None = None
        self.ctl_server: ThreadingServer | None = None
        self.port = args.port
        self.conns: set[socket.socket] = set()
        self.up = False
        self.stopping = threading.Event()
        # other kinds: (resource, ns, name) -> object; pod logs: (ns, pod, container) -> [(t, line)];
        # port-forward targets: (ns, pod) -> {pod port: (host, port)}
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.logs: dict[tuple[str, str, str], list[tuple[float, str]]] = {}
        self.forwards: dict[tuple[str, str], dict[int, tuple[str, int]]] = {}
        self.pf_sessions: list[dict] = []

    # -- listener lifecycle --
    def start_api(self) -> None:
        with self.lifecycle:
            with self.lock:
                if self.up:
                    return
            srv = ThreadingServer(("127.0.0.1", self.port), ApiHandler, self, api=True)
            with self.lock:
                self.port = srv.server_address[1]
                self.api_server = srv
                self.up = True
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                             name="api-listener", daemon=True).start()

    def stop_api(self, keep: socket.socket | None = None) -> None:
        with self.lifecycle:
            with self.lock:
                srv, self.api_server = self.api_server, None
                self.up = False
            if srv is not None:
                srv.shutdown()
                srv.server_close()
            with self.lock:
                conns = [c for c in self.conns if c is not keep]
            for c in conns:
                _abort(c)

    def start_ctl(self) -> None:
        srv = ThreadingServer(("127.0.0.1", self.args.control_port), ApiHandler, self, api=False)
        self.ctl_server = srv
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                         name="ctl-listener", daemon=True).start()

    # -- failure injection --
    def take_failure(self, path: str) -> dict | None:
        with self.lock:
            for f in self.failures:
                if f["count"] > 0 and (not f.get("paths") or f["paths"] in path):
                    f["count"] -= 1
                    rule = dict(f)
                    self.failures = [x for x in self.failures if x["count"] > 0]
                    return rule
        return None

    def record(self, method: str, path: str, headers) -> dict:
        entry = {
            "time": time.time(),
            "method": method,
            "path": path,
            "status": 0,
            "watch": False,
            "userAgent": headers.get("User-Agent", ""),
            "auth": bool(headers.get("Authorization")),
            # No user database: the bearer token stands for the user (the audit log's user).
            "user": headers.get("Authorization", "").removeprefix("Bearer "),
        }
        entry.update(request_info(method, path))
        with self.lock:
            self.log.append(entry)
        return entry

    def log_entries(self) -> list[dict]:
        with self.lock:
            return [dict(e) for e in self.log]

    def watch_count(self) -> int:
        with self.store.cond:
            return len(self.store.watchers)

    def signal_watches(self, kind: str) -> int:
        with self.store.cond:
            ws = list(self.store.watchers)
        for w in ws:
            w.queue.put(_Signal(kind))
            if kind == "drop":
                _abort(w.conn)
        return len(ws)


def _abort(conn: socket.socket) -> None:
    """Cut a connection without a final chunk (RST-free but abrupt)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, handler, app: App, api: bool):
        self.app = app
        self.api = api
        super().__init__(addr, handler)

    def server_bind(self):
        # HTTPServer.server_bind would do a reverse DNS lookup (getfqdn); not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


_API_POD_PATH = re.compile(
    r"^/api/v1(?:/watch)?(?:/namespaces/(?P<ns>[^/]+))?/pods(?:/(?P<name>[^/]+))?/?$")


class ApiHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakekube"
    sys_version = ""
    server: ThreadingServer

    # -- plumbing --
    def setup(self):
        super().setup()
        self.app: App = self.server.app
        if self.server.api:
            with self.app.lock:
                self.app.conns.add(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        with self.app.lock:
            self.app.conns.discard(self.connection)

    def log_message(self, fmt, *args):
        if self.app.args.verbose:
            sys.stderr.write("fakekube: %s %s\n" % (self.address_string(), fmt % args))

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, OSError):
            pass

    def _send_json(self, code: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        return json.loads(raw)

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def _dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path.startswith("/_fake/") or path == "/_fake":
            return self._control(path, url.query)
        if not self.server.api:
            return self._send_json(404, {"error": "control port serves /_fake/ only"})
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        q = {k: v[-1] for k, v in query.items()}
        # logged when the request arrives; "status" is filled in once the response starts
        # (so a long-running watch shows up in /_fake/requests while it is open)
        state = self.app.record(self.command, self.path, self.headers)
        try:
            self._api(path, q, state)
        except ApiError as e:
            if not state["status"]:
                state["status"] = e.code
                self._send_json(e.code, e.status, e.headers)
        except (ConnectionError, OSError):
            self.close_connection = True

    # ================================================================ API
    def _api(self, path: str, q: dict, state: dict) -> None:
        app = self.app
        is_watch = False
        if path.startswith("/api/v1/watch/"):
            is_watch = True
        elif "watch" in q:
            is_watch = bool(_parse_bool(q["watch"], "watch"))
        state["watch"] = is_watch

        if app.require_token:
            if self.headers.get("Authorization", "") != f"Bearer {app.token}":
                raise ApiError(401, "Unauthorized")
        rule = app.take_failure(self.path)
        if rule is not None:
            code = int(rule.get("status", 500))
            msg = rule.get("message") or f"fakekube injected failure ({code})"
            headers = {"Retry-After": str(rule.get("retryAfter", 1))} if code in (429, 503) else {}
            details = {"retryAfterSeconds": int(rule.get("retryAfter", 1))} if code in (429, 503, 504) else None
            raise ApiError(code, msg, details=details, headers=headers)

        if self.command not in ("GET", "HEAD"):
            m = _API_POD_PATH.match(path) or _API_CORE_PATH.match(path) or _API_GROUP_PATH.match(path)
            sub = _API_POD_SUB_PATH.match(path)
            if sub and sub.group("sub") == "portforward":
                raise ApiError(400, "fakekube serves port-forward over WebSocket only (GET with "
                                    f"Sec-WebSocket-Protocol: {PORTFORWARD_PROTOCOL}); SPDY is not served")
            if m or sub:
                raise ApiError(405, f"fakekube serves the API read-only; {self.command} is not supported "
                                    "(use the /_fake/ control API to change objects)")
            raise ApiError(404, "the server could not find the requested resource")

        if path in ("/version", "/version/"):
            state["status"] = 200
            return self._send_json(200, API_VERSION_INFO)
        if path in ("/api", "/api/"):
            state["status"] = 200
            return self._send_json(200, {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{app.port}"}],
            })
        if path in ("/api/v1", "/api/v1/"):
            state["status"] = 200
            return self._send_json(200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "v1",
                "resources": [POD_RESOURCE, *POD_SUBRESOURCES,
                              *(_resource_list_entry(r) for r in RESOURCES.values() if not r["group"])],
            })
        if path in ("/apis", "/apis/"):
            state["status"] = 200
            return self._send_json(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                         "groups": [_api_group(g) for g in _groups()]})
        discovery = _group_discovery(path)
        if discovery is not None:
            state["status"] = 200
            return self._send_json(200, discovery)
        if path in ("/healthz", "/livez", "/readyz"):
            state["status"] = 200
            return self._send_text(200, "ok")

        m = _API_POD_SUB_PATH.match(path)
        if m and m.group("sub") == "log":
            return self._pod_log(m.group("ns"), m.group("name"), q, state)
        if m and m.group("sub") == "portforward":
            return self._portforward(m.group("ns"), m.group("name"), state)
        m = _API_CORE_PATH.match(path)
        if m:
            return self._objects(resource_key("", m.group("plural")), m.group("ns"), m.group("name"),
                                 q, is_watch, state)
        m = _API_GROUP_PATH.match(path)
        if m:
            key = resource_key(m.group("group"), m.group("plural"))
            r = RESOURCES.get(key)
            if r is not None and r["version"] == m.group("version"):
                return self._objects(key, m.group("ns"), m.group("name"), q, is_watch, state)
        m = _API_POD_PATH.match(path)
        if not m:
            if path.startswith("/api/v1/") or path.startswith("/apis/"):
                raise ApiError(404, "the server could not find the requested resource",
                               details={})
            state["status"] = 404
            return self._send_text(404, "404 page not found\n")
        ns, name = m.group("ns"), m.group("name")
        if name is not None and not is_watch:
            return self._get(ns, name, state)
        if name is not None and is_watch:
            # /api/v1/watch/namespaces/ns/pods/name: a single-object watch
            q = dict(q)
            extra = f"metadata.name={name}"
            q["fieldSelector"] = f"{q['fieldSelector']},{extra}" if q.get("fieldSelector") else extra
        lsel, fsel = self._selectors(q)
        if is_watch:
            return self._watch(ns, q, lsel, fsel, state)
        return self._list(ns, q, lsel, fsel, state)

    def _selectors(self, q: dict) -> tuple[LabelSelector, FieldSelector]:
        try:
            lsel = parse_label_selector(q.get("labelSelector", ""))
        except SelectorError as e:
            raise ApiError(400, f"unable to parse requirement: {e}", reason="BadRequest") from None
        try:
            fsel = parse_field_selector(q.get("fieldSelector", ""))
        except SelectorError as e:
            raise ApiError(400, str(e), reason="BadRequest") from None
        return lsel, fsel

    def _get(self, ns: str | None, name: str, state: dict) -> None:
        if ns is None:
            raise ApiError(404, "the server could not find the requested resource")
        with self.app.store.cond:
            obj = self.app.store.objects.get((ns, name))
            obj = copy.deepcopy(obj) if obj is not None else None
        if obj is None:
            raise ApiError(404, f'pods "{name}" not found', details={"name": name, "kind": "pods"})
        state["status"] = 200
        if _wants_table(self.headers.get("Accept", "")):
            return self._send_json(200, _table({"items": [obj]}, {"resourceVersion": obj["metadata"].get(
                "resourceVersion", "")}))
        self._send_json(200, _with_type(obj))

    # ------------------------------------------------- other kinds (read-only)
    def _objects(self, resource: str, ns: str | None, name: str | None, q: dict, is_watch: bool,
                 state: dict) -> None:
        r = RESOURCES[resource]
        store = self.app.store
        if is_watch:
            raise ApiError(405, f"fakekube serves watches of pods only, not of {resource}")
        if name is not None:
            if ns is None:
                raise ApiError(404, "the server could not find the requested resource")
            with store.cond:
                obj = copy.deepcopy(self.app.objects.get((resource, ns, name)))
            if obj is None:
                details = {"name": name, "kind": r["plural"]}
                if r["group"]:
                    details["group"] = r["group"]
                raise ApiError(404, f'{resource} "{name}" not found', details=details)
            state["status"] = 200
            return self._send_json(200, _typed(resource, obj))
        try:
            lsel = parse_label_selector(q.get("labelSelector", ""))
            fsel = parse_field_selector(q.get("fieldSelector", ""), supported=("metadata.name", "metadata.namespace"))
        except SelectorError as e:
            raise ApiError(400, f"unable to parse requirement: {e}", reason="BadRequest") from None
        with store.cond:
            rv = store.rv
            items = [copy.deepcopy(o) for (res, ons, _), o in sorted(self.app.objects.items())
                     if res == resource and (ns is None or ons == ns)]
        items = [o for o in items if lsel.matches(o["metadata"].get("labels")) and fsel.matches(o)]
        state["status"] = 200
        self._send_json(200, {"kind": f"{r['kind']}List", "apiVersion": _api_version(r),
                              "metadata": {"resourceVersion": str(rv)}, "items": items})

    # ------------------------------------------------------------- pod logs
    def _pod_log(self, ns: str, name: str, q: dict, state: dict) -> None:
        app = self.app
        with app.store.cond:
            pod = copy.deepcopy(app.store.objects.get((ns, name)))
        if pod is None:
            raise ApiError(404, f'pods "{name}" not found', details={"name": name, "kind": "pods"})
        since_seconds = _log_int(q, "sinceSeconds")
        tail = _log_int(q, "tailLines")
        limit_bytes = _log_int(q, "limitBytes")
        since_time = None
        if "sinceTime" in q:
            try:
                since_time = _parse_time(q["sinceTime"])
            except ValueError:
                raise ApiError(400, f'parsing time "{q["sinceTime"]}" as "2006-01-02T15:04:05Z07:00": cannot parse',
                               reason="BadRequest") from None
        timestamps = bool(_parse_bool(q.get("timestamps"), "timestamps"))
        previous = bool(_parse_bool(q.get("previous"), "previous"))
        _parse_bool(q.get("follow"), "follow")
        problems = []  # ValidatePodLogOptions, in its order
        if tail is not None and tail < 0:
            problems.append(f"tailLines: Invalid value: {tail}: must be greater than or equal to 0")
        if limit_bytes is not None and limit_bytes < 1:
            problems.append(f"limitBytes: Invalid value: {limit_bytes}: must be greater than 0")
        if since_seconds is not None and since_time is not None:
            problems.append("Forbidden: at most one of `sinceTime` or `sinceSeconds` may be specified")
        elif since_seconds is not None and since_seconds < 1:
            problems.append(f"sinceSeconds: Invalid value: {since_seconds}: must be greater than 0")
        if problems:
            joined = problems[0] if len(problems) == 1 else "[" + ", ".join(problems) + "]"
            raise ApiError(422, f'PodLogOptions "{name}" is invalid: {joined}', reason="Invalid",
                           details={"name": name, "kind": "PodLogOptions",
                                    "causes": [{"message": p} for p in problems]})
        names = _container_names(pod)
        container = q.get("container", "")
        if not container:
            if len(names) == 1:
                container = names[0]
            elif not names:
                raise ApiError(400, f"a container name must be specified for pod {name}")
            else:
                raise ApiError(400, f"a container name must be specified for pod {name}, "
                                    f"choose one of: [{' '.join(names)}]")
        elif container not in names:
            raise ApiError(400, f"container {container} is not valid for pod {name}")
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if cs.get("name") == container and waiting is not None:
                raise ApiError(400, f'container "{container}" in pod "{name}" is waiting to start: '
                                    f'{waiting.get("reason", "ContainerCreating")}')
        if previous:
            raise ApiError(400, f'previous terminated container "{container}" in pod "{name}" not found')
        now = time.time()
        with app.lock:
            lines = list(app.logs.get((ns, name, container), []))
        if since_seconds is not None:
            lines = [(t, s) for t, s in lines if t >= now - since_seconds]
        elif since_time is not None:
            lines = [(t, s) for t, s in lines if t >= since_time]
        if tail is not None:
            lines = lines[len(lines) - tail:] if tail else []
        data = "".join((_rfc3339_nano(t) + " " if timestamps else "") + s + "\n" for t, s in lines).encode()
        if limit_bytes is not None:
            data = data[:limit_bytes]
        state["status"] = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # ---------------------------------------------------------- port-forward
    def _portforward(self, ns: str, name: str, state: dict) -> None:
        app = self.app
        with app.store.cond:
            pod = copy.deepcopy(app.store.objects.get((ns, name)))
        if pod is None:
            raise ApiError(404, f'pods "{name}" not found', details={"name": name, "kind": "pods"})
        if not pod.get("spec", {}).get("nodeName"):
            raise ApiError(400, f"pod {name} does not have a host assigned")

        # From here on the kubelet answers (through the API server's proxy): plain-text errors.
        def refuse(message: str) -> None:
            state["status"] = 400
            self.close_connection = True
            self._send_text(400, message + "\n")

        upgrade = self.headers.get("Upgrade", "").lower()
        connection = [t.strip().lower() for t in self.headers.get("Connection", "").split(",")]
        if upgrade != "websocket" or "upgrade" not in connection:
            return refuse("unable to upgrade: missing upgrade headers in request")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query, keep_blank_values=True)
        ports = []
        for value in query.get("ports", []):
            if not value:
                return refuse('query parameter "port" cannot be empty')
            for p in value.split(","):
                try:
                    port = int(p)
                except ValueError:
                    return refuse(f'unable to parse "{value}" as a port: strconv.ParseUint: parsing "{p}": '
                                  "invalid syntax")
                if not 0 < port < 65536:
                    return refuse(f'port "{value}" must be > 0')
                ports.append(port)
        if not ports:
            return refuse('query parameter "port" is required')
        offered = [p.strip() for h in self.headers.get_all("Sec-WebSocket-Protocol", [])
                   for p in h.split(",") if p.strip()]
        served = [p for p in _KUBELET_PF_PROTOCOLS if p != "v4.base64.channel.k8s.io"]
        chosen = next((p for p in (offered or [""]) if p in served), None)
        if chosen is None:
            return refuse(f"requested protocol(s) are not supported: [{' '.join(offered)}]; supports "
                          f"[{' '.join(_KUBELET_PF_PROTOCOLS)}] (fakekube: base64 not served)")
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Sec-WebSocket-Version", "") != "13" or not key:
            return refuse("websocket: handshake error: missing Sec-WebSocket-Key or Sec-WebSocket-Version 13")

        state["status"] = 101
        self.close_connection = True
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ws_accept_key(key))
        if chosen:
            self.send_header("Sec-WebSocket-Protocol", chosen)
        self.end_headers()
        self.wfile.flush()
        with app.lock:
            targets = dict(app.forwards.get((ns, name), {}))
        uid = pod.get("metadata", {}).get("uid", name)
        session = PortForwardSession(self.connection, self.rfile, ports, targets,
                                     hashlib.sha256(uid.encode()).hexdigest())
        record = {"namespace": ns, "pod": name, "ports": ports, "protocol": chosen, "started": time.time(),
                  "ended": None, "bytesIn": 0, "bytesOut": 0, "errors": []}
        with app.lock:
            app.pf_sessions.append(record)
            del app.pf_sessions[:-app.args.log_size]
        try:
            session.run()
        finally:
            with app.lock:
                record.update(ended=time.time(), bytesIn=session.bytes_in, bytesOut=session.bytes_out,
                              errors=list(session.errors))

    # -------------------------------------------------------------- LIST
    def _list(self, ns, q, lsel, fsel, state) -> None:
        store = self.app.store
        rv_s = q.get("resourceVersion")
        match = q.get("resourceVersionMatch", "")
        cont = q.get("continue", "")
        limit_s = q.get("limit", "")
        limit = 0
        if limit_s:
            try:
                limit = int(limit_s)
            except ValueError:
                raise ApiError(400, f'limit: Invalid value: "{limit_s}": must be an integer') from None
            if limit < 0:
                raise ApiError(400, f"limit: Invalid value: {limit}: must be greater than or equal to 0")
        if match and match not in ("NotOlderThan", "Exact"):
            raise ApiError(422, _INVALID + f'resourceVersionMatch: Unsupported value: "{match}": supported values: '
                                '"Exact", "NotOlderThan"', reason="Invalid")
        if match and not rv_s:
            raise ApiError(422, _INVALID + "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless "
                                "resourceVersion is provided", reason="Invalid")
        if match == "Exact" and rv_s == "0":
            raise ApiError(422, _INVALID + 'resourceVersionMatch: Forbidden: resourceVersionMatch "exact" is forbidden '
                                'for resourceVersion "0"', reason="Invalid")
        if cont and match:
            raise ApiError(422, _INVALID + "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when "
                                "continue is provided", reason="Invalid")

        start_after = ""
        if cont:
            if rv_s and rv_s != "0":
                raise ApiError(400, "specifying resource version is not allowed when using continue")
            at, start_after = decode_continue(cont)
            try:
                at, objs = store.snapshot(at)
            except Expired:
                raise ApiError(410, "The provided continue parameter is too old to display a consistent "
                                    "list result. You can start a new list without the continue parameter, "
                                    "or use the continue token in this response to retrieve the remainder "
                                    "of the results. Continuing with the provided token results in an "
                                    "inconsistent list - objects that were created, modified, or deleted "
                                    "between the time the first chunk was returned and now may show up in "
                                    "the list.", reason="Expired") from None
        elif rv_s and rv_s != "0":
            want = _parse_rv(rv_s)
            if want > store.rv and not store.wait_for_rv(want, self.app.too_large_wait):
                raise ApiError(504, f"Too large resource version: {want}, current: {store.rv}",
                               reason="Timeout",
                               details={"causes": [{"reason": "ResourceVersionTooLarge",
                                                    "message": "Too large resource version"}],
                                        "retryAfterSeconds": 1})
            if match == "Exact":
                try:
                    at, objs = store.snapshot(want)
                except Expired:
                    raise ApiError(410, "The resourceVersion for the provided list is too old.",
                                   reason="Expired") from None
            else:
                at, objs = store.snapshot()
        else:
            at, objs = store.snapshot()

        items = []
        for key in sorted(objs, key=lambda k: f"{k[0]}/{k[1]}"):
            if ns is not None and key[0] != ns:
                continue
            obj = objs[key]
            if start_after and f"{key[0]}/{key[1]}" < start_after:
                continue
            if lsel.matches(obj.get("metadata", {}).get("labels")) and fsel.matches(obj):
                items.append(obj)
        meta = {"resourceVersion": str(at)}
        if limit and len(items) > limit:
            rest = len(items) - limit
            items = items[:limit]
            meta["continue"] = encode_continue(at, _obj_key(items[-1]) + "\x00")
            if lsel.empty() and fsel.empty():
                meta["remainingItemCount"] = rest
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": meta,
                "items": [copy.deepcopy(o) for o in items]}
        if _wants_table(self.headers.get("Accept", "")):
            body = _table(body, meta)
        state["status"] = 200
        self._send_json(200, body)

    # ------------------------------------------------------------- WATCH
    def _watch(self, ns, q, lsel, fsel, state) -> None:
        app, store = self.app, self.app.store
        rv_s = q.get("resourceVersion", "")
        match = q.get("resourceVersionMatch", "")
        bookmarks = bool(_parse_bool(q.get("allowWatchBookmarks"), "allowWatchBookmarks"))
        sie = _parse_bool(q.get("sendInitialEvents"), "sendInitialEvents")
        timeout_s = q.get("timeoutSeconds", "")
        if timeout_s:
            try:
                timeout = int(timeout_s)
            except ValueError:
                raise ApiError(400, f'timeoutSeconds: Invalid value: "{timeout_s}": must be an integer') from None
        else:
            timeout = 1800
        if sie is not None:
            if match != "NotOlderThan":
                raise ApiError(422, _INVALID + "resourceVersionMatch: Forbidden: sendInitialEvents requires setting "
                                    "resourceVersionMatch to NotOlderThan", reason="Invalid")
            if sie and not bookmarks:
                raise ApiError(422, _INVALID + "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting "
                                    "allowWatchBookmarks to true", reason="Invalid")
        elif match:
            raise ApiError(422, _INVALID + "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch "
                                "unless sendInitialEvents is provided", reason="Invalid")
        table = _wants_table(self.headers.get("Accept", ""))

        w = Watcher(self.path, lsel, fsel, self.connection)
        w.ns = ns
        initial: list[dict] = []
        replay: list[Event] = []
        expired_msg = None
        send_end_bookmark = bool(sie)
        want = None
        if rv_s not in ("", "0"):
            want = _parse_rv(rv_s)
            if want > store.rv and not store.wait_for_rv(want, app.too_large_wait):
                raise ApiError(504, f"Too large resource version: {want}, current: {store.rv}",
                               reason="Timeout",
                               details={"causes": [{"reason": "ResourceVersionTooLarge",
                                                    "message": "Too large resource version"}],
                                        "retryAfterSeconds": 1})
        with store.cond:
            synthetic = sie if sie is not None else (rv_s in ("", "0"))
            if synthetic:
                start_rv = store.rv
                for key in sorted(store.objects, key=lambda k: f"{k[0]}/{k[1]}"):
                    obj = store.objects[key]
                    if w.matches(obj):
                        initial.append(obj)
            elif want is None:
                start_rv = store.rv  # sendInitialEvents=false with no RV: from now
            elif want < store.floor:
                expired_msg = f"too old resource version: {want} ({store.floor + 1})"
                start_rv = want
            else:
                start_rv = want
                replay = [ev for ev in store.history if ev.rv > want]
            if expired_msg is None:
                store.watchers.add(w)
        state["status"] = 200
        self._start_stream()
        try:
            if expired_msg is not None:
                self._emit({"type": "ERROR",
                            "object": status_obj(410, expired_msg, "Expired")})
                self._end_stream()
                return
            seen = start_rv
            for obj in initial:
                self._emit({"type": "ADDED", "object": self._out(obj, table)})
            if send_end_bookmark:
                self._emit(_bookmark(seen, initial_end=True))
            for ev in replay:
                seen = ev.rv
                t = w.translate(ev)
                if t:
                    self._emit({"type": t[0], "object": self._out(t[1], table)})
            deadline = time.monotonic() + timeout
            next_bm = time.monotonic() + app.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    self._end_stream()
                    return
                if bookmarks and now >= next_bm:
                    self._emit(_bookmark(seen))
                    next_bm = now + app.bookmark_interval
                wait = min(deadline - now, 0.2)
                if bookmarks:
                    wait = min(wait, max(0.0, next_bm - now))
                try:
                    item = w.queue.get(timeout=max(wait, 0.001))
                except queue.Empty:
                    if _peer_closed(self.connection):
                        self.close_connection = True
                        return
                    continue
                if isinstance(item, _Signal):
                    if item.kind == "expire":
                        self._emit({"type": "ERROR", "object": status_obj(
                            410, f"too old resource version: {seen} ({store.rv})", "Expired")})
                        self._end_stream()
                        return
                    # drop / down: connection already shut down by the control thread
                    self.close_connection = True
                    return
                ev = item
                if ev.rv <= seen:
                    continue
                seen = ev.rv
                t = w.translate(ev)
                if t:
                    self._emit({"type": t[0], "object": self._out(t[1], table)})
        except (ConnectionError, OSError):
            self.close_connection = True
        finally:
            with store.cond:
                store.watchers.discard(w)

    def _out(self, obj: dict, table: bool) -> dict:
        if table:
            return _table({"items": [obj]}, {"resourceVersion": obj["metadata"].get("resourceVersion", "")})
        return _with_type(copy.deepcopy(obj))

    def _start_stream(self) -> None:
        self.chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()

    def _emit(self, ev: dict) -> None:
        data = json.dumps(ev, separators=(",", ":")).encode() + b"\n"
        if self.chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    def _end_stream(self) -> None:
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")

    # ============================================================ control
    def _control(self, path: str, query: str) -> None:
        app = self.app
        store = app.store
        parts = [p for p in path.split("/") if p][1:]  # drop "_fake"
        try:
            body = self._body() if self.command in ("PUT", "POST", "PATCH") else {}
        except ValueError as e:
            return self._send_json(400, {"error": f"invalid JSON: {e}"})
        cmd = self.command
        try:
            if parts[:1] == ["pods"]:
                if len(parts) == 1 and cmd == "GET":
                    with store.cond:
                        items = [_with_type(copy.deepcopy(o)) for _, o in sorted(store.objects.items())]
                        rv = store.rv
                    return self._send_json(200, {"resourceVersion": str(rv), "items": items})
                if len(parts) != 3:
                    return self._send_json(404, {"error": "use /_fake/pods/{namespace}/{name}"})
                ns, name = parts[1], parts[2]
                if cmd == "PUT":
                    pod = pod_from_body(ns, name, body)
                    obj, created = store.put(pod)
                    return self._send_json(201 if created else 200, _with_type(obj))
                if cmd == "PATCH":
                    obj = store.patch(ns, name, body)
                    if obj is None:
                        return self._send_json(404, {"error": f"pod {ns}/{name} not found"})
                    return self._send_json(200, _with_type(obj))
                if cmd == "DELETE":
                    obj = store.delete(ns, name)
                    if obj is None:
                        return self._send_json(404, {"error": f"pod {ns}/{name} not found"})
                    return self._send_json(200, _with_type(obj))
                if cmd == "GET":
                    with store.cond:
                        obj = store.objects.get((ns, name))
                        obj = copy.deepcopy(obj) if obj else None
                    if obj is None:
                        return self._send_json(404, {"error": f"pod {ns}/{name} not found"})
                    return self._send_json(200, _with_type(obj))
                return self._send_json(405, {"error": f"{cmd} not supported here"})
            if parts[:1] == ["objects"]:
                return self._control_objects(parts[1:], cmd, body)
            if parts[:1] == ["logs"]:
                return self._control_logs(parts[1:], cmd, body)
            if parts[:1] == ["portforward"]:
                return self._control_portforward(parts[1:], cmd, body)
            op = "/".join(parts)
            if cmd == "GET" and op == "state":
                return self._send_json(200, self._state())
            if cmd == "GET" and op == "watches":
                with store.cond:
                    ws = [{"id": w.id, "path": w.path, "since": w.started} for w in store.watchers]
                return self._send_json(200, {"count": len(ws), "watches": ws})
            if cmd == "GET" and op == "requests":
                return self._send_json(200, {"requests": app.log_entries()})
            if cmd == "POST" and op == "reset-log":
                with app.lock:
                    app.log.clear()
                return self._send_json(200, {"ok": True})
            if cmd == "POST" and op == "compact":
                store.compact()
                return self._send_json(200, {"resourceVersion": str(store.rv), "floor": str(store.floor)})
            if cmd == "POST" and op == "expire-watches":
                return self._send_json(200, {"expired": app.signal_watches("expire")})
            if cmd == "POST" and op == "drop-watches":
                return self._send_json(200, {"dropped": app.signal_watches("drop")})
            if op == "fail":
                if cmd == "DELETE":
                    with app.lock:
                        app.failures = []
                    return self._send_json(200, {"ok": True, "failures": []})
                if cmd == "POST":
                    rule = {"status": int(body.get("status", 500)), "count": int(body.get("count", 1))}
                    for k in ("paths", "message", "retryAfter"):
                        if body.get(k) is not None:
                            rule[k] = body[k]
                    with app.lock:
                        if rule["count"] > 0:
                            app.failures.append(rule)
                        fs = list(app.failures)
                    return self._send_json(200, {"ok": True, "failures": fs})
                if cmd == "GET":
                    with app.lock:
                        return self._send_json(200, {"failures": list(app.failures)})
            if cmd == "POST" and op == "down":
                on_api = self.server.api
                # close the listener first, so the caller sees a closed port once answered
                app.stop_api(keep=self.connection if on_api else None)
                if on_api:
                    self.close_connection = True
                return self._send_json(200, {"up": False, "port": app.port})
            if cmd == "POST" and op == "up":
                try:
                    app.start_api()
                except OSError as e:
                    return self._send_json(500, {"error": f"cannot bind 127.0.0.1:{app.port}: {e}"})
                return self._send_json(200, {"up": True, "port": app.port})
            if cmd == "POST" and op == "config":
                if "bookmark_interval" in body:
                    app.bookmark_interval = float(body["bookmark_interval"])
                if "history" in body:
                    with store.cond:
                        store.history_max = max(1, int(body["history"]))
                        while len(store.history) > store.history_max:
                            store.floor = store.history.popleft().rv
                if "too_large_wait" in body:
                    app.too_large_wait = float(body["too_large_wait"])
                return self._send_json(200, self._state())
            return self._send_json(404, {"error": f"unknown control endpoint {cmd} {path}"})
        except (ValueError, KeyError, TypeError) as e:
            return self._send_json(400, {"error": str(e)})

    def _control_objects(self, parts: list[str], cmd: str, body) -> None:
        app, store = self.app, self.app.store
        if not parts and cmd == "GET":
            with store.cond:
                items = [_typed(res, copy.deepcopy(o)) for (res, _, _), o in sorted(app.objects.items())]
                rv = store.rv
            return self._send_json(200, {"resourceVersion": str(rv), "items": items})
        if len(parts) != 3:
            return self._send_json(404, {"error": "use /_fake/objects/{resource}/{namespace}/{name}, "
                                                  f"resource one of {sorted(RESOURCES)}"})
        resource, ns, name = parts
        if resource not in RESOURCES:
            return self._send_json(404, {"error": f"unknown resource {resource!r}; served: {sorted(RESOURCES)} "
                                                  "(pods: /_fake/pods)"})
        key = (resource, ns, name)
        if cmd == "PUT":
            obj = object_from_body(resource, ns, name, body)
            with store.cond:
                prev = app.objects.get(key)
                store.rv += 1
                md = stamp_metadata(obj["metadata"], prev, store.rv)
                if RESOURCES[resource]["kind"] in _GENERATION_KINDS:
                    generation = (prev or {}).get("metadata", {}).get("generation", 0)
                    changed = prev is None or prev.get("spec") != obj.get("spec")
                    md["generation"] = generation + 1 if changed else generation
                app.objects[key] = obj
                store.cond.notify_all()
            return self._send_json(201 if prev is None else 200, _typed(resource, copy.deepcopy(obj)))
        if cmd in ("GET", "DELETE"):
            with store.cond:
                obj = app.objects.get(key)
                if obj is not None and cmd == "DELETE":
                    del app.objects[key]
                    store.rv += 1
                obj = copy.deepcopy(obj)
            if obj is None:
                return self._send_json(404, {"error": f"{resource} {ns}/{name} not found"})
            return self._send_json(200, _typed(resource, obj))
        return self._send_json(405, {"error": f"{cmd} not supported here"})

    def _control_logs(self, parts: list[str], cmd: str, body) -> None:
        app = self.app
        if len(parts) != 2:
            return self._send_json(404, {"error": "use /_fake/logs/{namespace}/{pod}"})
        ns, name = parts
        if cmd == "POST":
            container = body.get("container") if isinstance(body, dict) else None
            if not container:
                with app.store.cond:
                    pod = app.store.objects.get((ns, name))
                    names = _container_names(pod) if pod else []
                if len(names) != 1:
                    return self._send_json(400, {"error": "name the container: the pod "
                                                          + ("has " + str(names) if pod else "does not exist")})
                container = names[0]
            lines = log_lines_from_body(body, time.time())
            with app.lock:
                stored = app.logs.setdefault((ns, name, container), [])
                stored.extend(lines)
                stored.sort(key=lambda line: line[0])
                count = len(stored)
            return self._send_json(200, {"container": container, "lines": count})
        if cmd == "GET":
            with app.lock:
                out = {c: [{"time": _rfc3339_nano(t), "text": s} for t, s in lines]
                       for (lns, lname, c), lines in app.logs.items() if (lns, lname) == (ns, name)}
            return self._send_json(200, {"containers": out})
        if cmd == "DELETE":
            with app.lock:
                for k in [k for k in app.logs if k[:2] == (ns, name)]:
                    del app.logs[k]
            return self._send_json(200, {"ok": True})
        return self._send_json(405, {"error": f"{cmd} not supported here"})

    def _control_portforward(self, parts: list[str], cmd: str, body) -> None:
        app = self.app
        if not parts and cmd == "GET":
            with app.lock:
                targets = [{"namespace": ns, "pod": pod, "ports": {str(p): f"{h}:{hp}" for p, (h, hp) in m.items()}}
                           for (ns, pod), m in sorted(app.forwards.items())]
                sessions = [dict(s) for s in app.pf_sessions]
            return self._send_json(200, {"targets": targets, "sessions": sessions})
        if len(parts) != 2:
            return self._send_json(404, {"error": "use /_fake/portforward/{namespace}/{pod}"})
        key = (parts[0], parts[1])
        if cmd == "PUT":
            if not isinstance(body, dict) or not isinstance(body.get("ports"), dict) or set(body) != {"ports"}:
                return self._send_json(400, {"error": 'body must be {"ports": {"<pod port>": <local port or "host:port">}}'})
            mapping = {}
            for pod_port, target in body["ports"].items():
                if not str(pod_port).isdigit() or not 0 < int(pod_port) < 65536:
                    return self._send_json(400, {"error": f"not a pod port: {pod_port!r}"})
                mapping[int(pod_port)] = _parse_forward_target(target)
            with app.lock:
                app.forwards[key] = mapping
            return self._send_json(200, {"namespace": key[0], "pod": key[1],
                                         "ports": {str(p): f"{h}:{hp}" for p, (h, hp) in mapping.items()}})
        if cmd == "DELETE":
            with app.lock:
                app.forwards.pop(key, None)
            return self._send_json(200, {"ok": True})
        return self._send_json(405, {"error": f"{cmd} not supported here"})

    def _state(self) -> dict:
        app, store = self.app, self.app.store
        with store.cond:
            return {
                "resourceVersion": str(store.rv),
                "floor": str(store.floor),
                "history": len(store.history),
                "historyMax": store.history_max,
                "pods": len(store.objects),
                "objects": len(app.objects),
                "watches": len(store.watchers),
                "up": app.up,
                "port": app.port,
                "bookmarkInterval": app.bookmark_interval,
            }


def _peer_closed(conn: socket.socket) -> bool:
    try:
        r, _, _ = select.select([conn], [], [], 0)
        if not r:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _bookmark(rv: int, initial_end: bool = False) -> dict:
    md: dict = {"resourceVersion": str(rv)}
    if initial_end:
        md["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": md}}


# ---------------------------------------------------- server-side printing

def _wants_table(accept: str) -> bool:
    """kubectl's human-readable output asks for meta.k8s.io Table (server-side printing)."""
    for part in accept.split(","):
        params = {p.split("=", 1)[0].strip(): p.split("=", 1)[1].strip()
                  for p in part.split(";")[1:] if "=" in p}
        if params.get("as") == "Table" and params.get("g") == "meta.k8s.io" and params.get("v") in ("v1", "v1beta1"):
            return True
    return False


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        t = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return "<unknown>"
    s = int((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds())
    if s < 120:
        return f"{max(s, 0)}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _table(listbody: dict, meta: dict) -> dict:
    cols = [
        ("Name", "string", "name", 0), ("Ready", "string", "", 0), ("Status", "string", "", 0),
        ("Restarts", "string", "", 0), ("Age", "string", "", 0), ("IP", "string", "", 1),
        ("Node", "string", "", 1),
    ]
    rows = []
    for o in listbody.get("items", []):
        md = o.get("metadata", {})
        st = o.get("status", {})
        css = st.get("containerStatuses") or []
        total = len(o.get("spec", {}).get("containers", []))
        ready = sum(1 for c in css if c.get("ready"))
        status = st.get("phase", "Unknown")
        if md.get("deletionTimestamp"):
            status = "Terminating"
        restarts = sum(int(c.get("restartCount", 0)) for c in css)
        rows.append({
            "cells": [md.get("name", ""), f"{ready}/{total}", status, str(restarts),
                      _age(md.get("creationTimestamp")), st.get("podIP") or "<none>",
                      o.get("spec", {}).get("nodeName") or "<none>"],
            "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                       "metadata": copy.deepcopy(md)},
        })
    tmeta = {"resourceVersion": meta.get("resourceVersion", "")}
    if meta.get("continue"):
        tmeta["continue"] = meta["continue"]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": tmeta,
        "columnDefinitions": [{"name": n, "type": t, "format": f, "description": n, "priority": p}
                              for n, t, f, p in cols],
        "rows": rows,
    }


# =================================================================== main

KUBECONFIG_TEMPLATE = """\
apiVersion: v1
kind: Config
clusters:
- name: fakekube
  cluster:
    server: http://127.0.0.1:{port}
contexts:
- name: fakekube
  context:
    cluster: fakekube
    namespace: {namespace}
    user: fakekube
current-context: fakekube
users:
- name: fakekube
  user:
    token: {token}
preferences: {{}}
"""


def kubeconfig_text(port: int, token: str = "fakekube-token", namespace: str = "default") -> str:
    return KUBECONFIG_TEMPLATE.format(port=int(port), token=token, namespace=namespace)


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fakekube-", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fake Kubernetes API server (pods only) for tests.")
    p.add_argument("--port", type=int, default=0, help="API port on 127.0.0.1 (0 = pick a free one)")
    p.add_argument("--port-file", help="write the API port number here once listening")
    p.add_argument("--control-port", type=int, default=0,
                   help="extra port serving only /_fake/ (stays up during /_fake/down); 0 = pick")
    p.add_argument("--control-port-file", help="write the control port number here")
    p.add_argument("--kubeconfig-out", help="write a kubeconfig for this server here")
    p.add_argument("--namespace", default="default", help="namespace of the kubeconfig context")
    p.add_argument("--token", default="fakekube-token", help="bearer token put in the kubeconfig")
    p.add_argument("--require-token", action="store_true",
                   help="answer 401 to API requests without 'Authorization: Bearer TOKEN'")
    p.add_argument("--history", type=int, default=1000, help="events retained for watch resumption")
    p.add_argument("--start-rv", type=int, default=1, help="initial global resourceVersion")
    p.add_argument("--bookmark-interval", type=float, default=1.0, help="seconds between BOOKMARK events")
    p.add_argument("--too-large-wait", type=float, default=3.0,
                   help="seconds to wait for a resourceVersion newer than the current one before 504")
    p.add_argument("--log-size", type=int, default=2000, help="API requests kept for /_fake/requests")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = p.parse_args(argv)

    app = App(args)
    app.start_ctl()
    app.start_api()
    ctl_port = app.ctl_server.server_address[1]
    if args.kubeconfig_out:
        _write_atomic(args.kubeconfig_out, kubeconfig_text(app.port, args.token, args.namespace))
    if args.control_port_file:
        _write_atomic(args.control_port_file, f"{ctl_port}\n")
    if args.port_file:
        _write_atomic(args.port_file, f"{app.port}\n")
    print(f"fakekube: listening on http://127.0.0.1:{app.port} (control port {ctl_port})", flush=True)

    def _term(signum, frame):
        app.stopping.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    while not app.stopping.wait(0.05):
        pass
    app.signal_watches("drop")
    app.stop_api()
    if app.ctl_server is not None:
        app.ctl_server.shutdown()
        app.ctl_server.server_close()
    print("fakekube: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
