# The filter as an OCI image for Istio's WasmPlugin (url: oci://...): one layer holding /plugin.wasm, the layout
# the istio-agent understands. Alternative to serving the module from kvab serve; see
# manifests/alternatives/wasmplugin-oci.yaml.
#
#   make build
#   docker build -f deploy/filter-oci.Dockerfile -t REGISTRY/kvab-filter:0.1.0 .
FROM scratch
COPY target/filter/kvab_filter.wasm /plugin.wasm
