"""Reads the Prometheus text exposition format into {(name, labels): value}."""

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def parse(text: str) -> dict:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"not a sample line: {line!r}")
        labels = tuple(sorted((k, bytes(v, "utf-8").decode("unicode_escape")) for k, v in _LABEL.findall(m.group(3) or "")))
        samples[(m.group(1), labels)] = float(m.group(4))
    return samples


def select(samples: dict, name: str, **labels) -> dict:
    """Samples of metric `name` whose labels include `labels`, keyed by their full label dict."""
    out = {}
    for (n, ls), v in samples.items():
        d = dict(ls)
        if n == name and all(d.get(k) == want for k, want in labels.items()):
            out[ls] = v
    return out


def value(samples: dict, name: str, **labels) -> float:
    """The one sample of `name` with exactly `labels` (0 when absent)."""
    key = (name, tuple(sorted(labels.items())))
    return samples.get(key, 0.0)
