#!/usr/bin/env python3
"""Writes the observability pack from one definition (stdlib only):

  grafana/kvab-ab-dashboard.json             the Grafana dashboard (import it, or provision it)
  grafana/kvab-ab-dashboard-configmap.yaml   the same JSON in a ConfigMap for the Grafana sidecar
                                             (label grafana_dashboard: "1")
  prometheus/kvab-prometheusrule.yaml        prometheus/kvab-rules.yaml as a PrometheusRule

The rules are written by hand in prometheus/kvab-rules.yaml (that is the file promtool tests); the
PrometheusRule embeds its groups verbatim.

    python3 observability/build.py           # rewrite the files
    python3 observability/build.py --check   # exit 1 if a file is not what this script writes
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "kvab-ab-dashboard.json"
CONFIGMAP = HERE / "grafana" / "kvab-ab-dashboard-configmap.yaml"
RULES = HERE / "prometheus" / "kvab-rules.yaml"
PROMETHEUSRULE = HERE / "prometheus" / "kvab-prometheusrule.yaml"

UID = "kvab-ab"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Label filters: the filter's series come from the gateway pods, kvab serve's from its own pod.
GW = 'namespace=~"$namespace", pod=~"$gateway"'
KV = 'namespace=~"$kvab_namespace"'
RI = "$__rate_interval"


def rate(metric, selector, by=None, extra=""):
    inner = f"rate({metric}{{{selector}{extra}}}[{RI}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def error_ratio():
    errors = rate("kvab_responses_total", GW, "backend", ', backend!="none", code_class="5xx"')
    total = rate("kvab_responses_total", GW, "backend", ', backend!="none"')
    return f"{errors}\n/\n{total}"


def quantile(q, histogram):
    return f'histogram_quantile({q}, sum by (backend, le) (rate({histogram}_bucket{{{GW}, backend!="none"}}[{RI}])))'


def misroutes():
    # requested and served both arms and different: the diagonal is removed with `unless`.
    return (
        f'sum by (requested, served) (rate(kvab_served_total{{{GW}, requested!="none", served!~"none|unknown"}}[{RI}]))\n'
        "unless on (requested, served)\n"
        f'label_replace(sum by (requested) (kvab_served_total{{{GW}, requested!="none"}}), "served", "$1", "requested", "(.*)")'
    )


def target(ref, expr, legend="", instant=False, fmt=None):
    t = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend, "range": not instant, "instant": instant}
    if fmt:
        t["format"] = fmt
    return t


# (title, type, unit, description, targets); rows are ("row", title).
LAYOUT = [
    ("row", "Traffic per arm (kvab filter in the gateway)"),
    ("Request rate per arm", "timeseries", "reqps",
     "Requests admitted by the filter, by the arm they were tagged with (none = untagged, the scheduler's pick).",
     [target("A", rate("kvab_requests_total", GW, "backend"), "{{backend}}")]),
    ("5xx error ratio per arm", "timeseries", "percentunit",
     "Share of an arm's responses that were 5xx (the filter's own 503 kv_backend_unavailable included). Alert: KvabArmErrorRatioHigh.",
     [target("A", error_ratio(), "{{backend}}")]),
    ("Responses by status class", "timeseries", "reqps",
     "Responses by tagged arm and status class; backend=none includes the filter's own 400s.",
     [target("A", rate("kvab_responses_total", GW, "backend, code_class"), "{{backend}} {{code_class}}")]),
    ("Rejected and invalid x-kv-backend values", "timeseries", "reqps",
     "Requests the filter answered itself, by reason, and unusable header values whatever onUnknown did with them.",
     [target("A", rate("kvab_rejected_total", GW, "reason"), "rejected {{reason}}"),
      target("B", rate("kvab_invalid_values_total", GW, "reason"), "invalid {{reason}}")]),
    ("row", "Latency per arm (filter histograms)"),
    ("Request duration p50 / p95 / p99", "timeseries", "ms",
     "Request start to end of stream, per tagged arm.",
     [target(r, quantile(q, "kvab_request_duration_milliseconds"), f"{{{{backend}}}} p{int(q * 100)}")
      for r, q in (("A", 0.5), ("B", 0.95), ("C", 0.99))]),
    ("Time to first byte p50 / p95 / p99", "timeseries", "ms",
     "Request start to the first response body byte (a stream's first token), per tagged arm.",
     [target(r, quantile(q, "kvab_time_to_first_byte_milliseconds"), f"{{{{backend}}}} p{int(q * 100)}")
      for r, q in (("A", 0.5), ("B", 0.95), ("C", 0.99))]),
    ("row", "Routing: who asked, who served"),
    ("Misroutes (requested arm served by the other)", "timeseries", "reqps",
     "Requests tagged for one arm and answered by a proxy of another (runbook failure signal 4). Should be empty. Alert: KvabMisroutes.",
     [target("A", misroutes(), "{{requested}} served by {{served}}")]),
    ("Requested vs served arm", "timeseries", "reqps",
     "Every (requested, served) pair; served=unknown when the filter's endpoint map is stale, none when no upstream answered.",
     [target("A", rate("kvab_served_total", GW, "requested, served"), "{{requested}} → {{served}}")]),
    ("Routed requests per proxy pod (kvab serve)", "timeseries", "reqps",
     "The runbook's Step 4 counter: requests per proxy pod as the filters report them. Both proxies should rise during a burst.",
     [target("A", rate("kvab_routed_requests_total", KV, "pod, served"), "{{pod}} ({{served}})")]),
    ("Requests for an arm without ready endpoints", "timeseries", "reqps",
     "Requests for an arm the endpoint map said had no ready endpoint (refused with 503, or let through with onUnavailable=passthrough).",
     [target("A", rate("kvab_unavailable_total", GW, "backend"), "{{backend}}")]),
    ("row", "Arm health (kvab serve)"),
    ("Proxy endpoints per arm", "timeseries", "short",
     "Proxy pods per arm from kvab serve's map (runbook prerequisite 1). Alert: KvabArmNoReadyEndpoints.",
     [target("A", f'max by (backend) (kvab_backend_endpoints{{{KV}, state="ready"}})', "{{backend}} ready"),
      target("B", f'max by (backend) (kvab_backend_endpoints{{{KV}, state="not_ready"}})', "{{backend}} not ready")]),
    ("Proxy /metrics probes", "table", "short",
     "Last probe of each proxy's /metrics: up (1 = HTTP 200) and the status (0 = no answer). 404 is runbook failure signal 2. Alert: KvabProxyMetricsDown.",
     [target("A", f"max by (backend, pod) (kvab_proxy_metrics_up{{{KV}}})", "", instant=True, fmt="table"),
      target("B", f"max by (backend, pod) (kvab_proxy_metrics_status_code{{{KV}}})", "", instant=True, fmt="table")]),
    ("Unlabeled proxy pods", "stat", "short",
     "Pods matching the proxy selector that are not in the map (runbook prerequisite 2, failure signals 1 and 3).",
     [target("A", f"max by (reason) (kvab_unlabeled_proxies{{{KV}}})", "{{reason}}")]),
    ("row", "kvab health"),
    ("kvab serve ready, filter reporters", "stat", "short",
     "kvab serve /readyz (1 = ready; alert KvabSidecarNotReady) and the filter VMs whose reports it keeps.",
     [target("A", f"max(kvab_ready{{{KV}}})", "ready"),
      target("B", f"sum(kvab_reporters{{{KV}}})", "reporters")]),
    ("Reports: sent by the filter, received by kvab serve", "timeseries", "reqps",
     "POST /v1/reports by result. Alerts: KvabReportsFailing (sent error), KvabReportsRefused (received invalid or too_large).",
     [target("A", rate("kvab_reports_total", GW, "result"), "sent {{result}}"),
      target("B", rate("kvab_reports_received_total", KV, "result"), "received {{result}}")]),
    ("Endpoint map age in the filter", "timeseries", "s",
     "Seconds since kvab serve last confirmed the filter's map, per gateway pod. Past staleAfterMs (10 s by default) served arms are unknown. Alert: KvabEndpointMapStale.",
     [target("A", f"max by (pod) (kvab_endpoint_map_age_seconds{{{GW}}})", "{{pod}}")]),
    ("Endpoint map fetches", "timeseries", "reqps",
     "GET /v1/endpoints from the filter by result (ok, not_modified, error, timeout).",
     [target("A", rate("kvab_endpoint_map_fetches_total", GW, "result"), "{{result}}")]),
    ("kvab serve HTTP requests and watch errors", "timeseries", "reqps",
     "kvab serve's API by route and status, and Kubernetes watch errors (each retried with backoff).",
     [target("A", rate("kvab_http_requests_total", KV, "route, code"), "{{route}} {{code}}"),
      target("B", f"sum(rate(kvab_watch_errors_total{{{KV}}}[{RI}]))", "watch errors")]),
]


def panels():
    out, x, y, next_id = [], 0, 0, 1
    for item in LAYOUT:
        if item[0] == "row":
            if x:
                x, y = 0, y + 8
            out.append({"type": "row", "title": item[1], "id": next_id, "collapsed": False, "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            next_id, y = next_id + 1, y + 1
            continue
        title, kind, unit, description, targets = item
        panel = {
            "id": next_id,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}} if kind == "timeseries" else {},
            "targets": targets,
        }
        if kind == "table":
            panel["transformations"] = [{"id": "merge", "options": {}}, {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {"Value #A": "up", "Value #B": "status"}}}]
        out.append(panel)
        next_id += 1
        x = 12 - x
        if x == 0:
            y += 8
    return out


def query_variable(name, label, query, default, include_all=False):
    v = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "sort": 1,
        "multi": include_all,
        "includeAll": include_all,
        "current": {"selected": True, "text": default, "value": default},
        "hide": 0,
    }
    if include_all:
        v["allValue"] = ".*"
        v["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return v


def dashboard():
    return {
        "uid": UID,
        "title": "kvab A/B: NVLink vs FS KV-cache transfer",
        "description": "Per-arm traffic, errors, latency, misroutes and arm health from the kvab filter (gateway Envoy stats) and kvab serve.",
        "tags": ["kvab", "llm-d", "a/b"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "graphTooltip": 1,
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": ""},
                query_variable("namespace", "Gateway namespace", "label_values(kvab_requests_total, namespace)", "llm-d-inference-scheduler"),
                query_variable("gateway", "Gateway pod", 'label_values(kvab_requests_total{namespace=~"$namespace"}, pod)', None, include_all=True),
                query_variable("kvab_namespace", "kvab serve namespace", "label_values(kvab_backend_endpoints, namespace)", "llm-d-vllm"),
            ]
        },
        "panels": panels(),
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def configmap_yaml(text: str) -> str:
    body = "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())
    return (
        "# The kvab A/B dashboard for the Grafana sidecar (kube-prometheus-stack / grafana chart:\n"
        "# sidecar.dashboards.enabled, default label grafana_dashboard=\"1\"). Written by observability/build.py\n"
        "# from grafana/kvab-ab-dashboard.json; edit that script, not this file.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: kvab-ab-dashboard\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "    app.kubernetes.io/name: kvab\n"
        "    app.kubernetes.io/component: dashboard\n"
        "data:\n"
        "  kvab-ab-dashboard.json: |\n" + body
    )


def prometheusrule_yaml(rules_text: str) -> str:
    start = rules_text.index("groups:")
    groups = "".join(f"  {line}\n" if line else "\n" for line in rules_text[start:].splitlines())
    return (
        "# kvab alerts for the Prometheus Operator. Written by observability/build.py from\n"
        "# prometheus/kvab-rules.yaml (the file promtool tests); edit that file, not this one.\n"
        "# Your Prometheus' ruleSelector must match these labels (kube-prometheus-stack: release=<name>).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: kvab\n"
        "  labels:\n"
        "    app.kubernetes.io/name: kvab\n"
        "    app.kubernetes.io/component: alerts\n"
        "spec:\n" + groups
    )


def outputs() -> dict:
    text = dashboard_json()
    return {DASHBOARD: text, CONFIGMAP: configmap_yaml(text), PROMETHEUSRULE: prometheusrule_yaml(RULES.read_text())}


def main(argv) -> int:
    stale = []
    for path, text in outputs().items():
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
    for path in stale:
        print(f"{path.relative_to(HERE.parent)} is out of date: run python3 observability/build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
