"""Offline validation of Kubernetes objects against CustomResourceDefinitions, as the API server would do it:
the structural OpenAPI schema (turned into JSON Schema, strict about unknown fields like server-side field
validation) and the CEL rules (`x-kubernetes-validations`), which schema tools skip. CEL is evaluated with
cel-python; the few Kubernetes CEL library functions the rules here use (isURL, url().getScheme()) are
implemented below. A rule that cannot be evaluated is reported, never silently passed."""

import copy
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import celpy
import celpy.celtypes as celtypes
import jsonschema
import yaml


def load_crds(folder: Path) -> dict:
    """(group, kind, version) -> version entry of the CRD, from every CRD file in `folder`."""
    crds = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                crds[(spec["group"], spec["names"]["kind"], version["name"])] = {"file": path.name, **version}
    return crds


def to_json_schema(node, top: bool = True):
    """Structural OpenAPI v3 (CRD flavour) -> JSON Schema. Objects with declared properties refuse unknown ones
    (what `kubectl apply` with server-side field validation reports), except where the CRD preserves them."""
    if isinstance(node, list):
        return [to_json_schema(n, False) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: to_json_schema(v, False) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_json_schema(value, False) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v, False) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("description", "nullable", "format"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if top:
        # apiVersion, kind and metadata are checked by the API server itself, not by the CRD schema.
        props = out.setdefault("properties", {})
        props["metadata"] = {"type": "object"}
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
    return out


def schema_errors(obj: dict, version: dict) -> list:
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


# ---- CEL ----

class _URL:
    def __init__(self, text):
        self.parsed = urlparse(str(text))


def _is_url(text):
    """Kubernetes `isURL`: Go's url.Parse accepting an absolute URL (scheme and host, or a file path)."""
    parsed = urlparse(str(text))
    return celtypes.BoolType(bool(parsed.scheme) and (bool(parsed.netloc) or bool(parsed.path)))


KUBERNETES_CEL_FUNCTIONS = {
    "isURL": _is_url,
    "url": _URL,
    "getScheme": lambda u: celtypes.StringType(u.parsed.scheme),
    "getHost": lambda u: celtypes.StringType(u.parsed.netloc),
    "getEscapedPath": lambda u: celtypes.StringType(u.parsed.path),
    # Kubernetes strings library.
    "split": lambda s, sep: celtypes.ListType([celtypes.StringType(part) for part in str(s).split(str(sep))]),
}


@dataclass
class CelReport:
    evaluated: list = field(default_factory=list)  # (path, rule)
    failed: list = field(default_factory=list)  # (path, rule, message)
    unevaluated: list = field(default_factory=list)  # (path, rule, reason)


_ENV = celpy.Environment()
_PROGRAMS = {}


def _program(rule: str):
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule), functions=KUBERNETES_CEL_FUNCTIONS)
    return _PROGRAMS[rule]


def _walk(schema: dict, value, path: str, report: CelReport):
    if value is None or not isinstance(schema, dict):
        return
    for validation in schema.get("x-kubernetes-validations", []):
        rule = validation["rule"]
        if "oldSelf" in rule:
            report.unevaluated.append((path, rule, "transition rule (needs the stored object)"))
            continue
        try:
            result = _program(rule).evaluate({"self": celpy.json_to_cel(copy.deepcopy(value))})
        except Exception as e:  # compile or evaluation error: reported, not passed
            report.unevaluated.append((path, rule, f"{type(e).__name__}: {e}"))
            continue
        if isinstance(result, celpy.CELEvalError):
            report.unevaluated.append((path, rule, str(result)))
        elif result is True or result == celtypes.BoolType(True):
            report.evaluated.append((path, rule))
        else:
            report.evaluated.append((path, rule))
            report.failed.append((path, rule, validation.get("message", "")))
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                _walk(props[key], item, f"{path}.{key}", report)
            elif isinstance(schema.get("additionalProperties"), dict):
                _walk(schema["additionalProperties"], item, f"{path}.{key}", report)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _walk(schema["items"], item, f"{path}[{i}]", report)


def cel_report(obj: dict, version: dict) -> CelReport:
    report = CelReport()
    _walk(version["schema"]["openAPIV3Schema"], obj, "", report)
    return report
