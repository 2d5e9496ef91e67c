# kvab sidecar image: the kvab binary plus the filter module it serves at GET /v1/filter.wasm.
#
#   make build                                   # target/filter/kvab_filter.wasm
#   docker build -f deploy/sidecar.Dockerfile -t kvab:0.1.0 .
#
# The module is copied from the build context, not rebuilt here: its bytes must be the ones whose sha256 is in
# manifests/wasmplugin.yaml (make manifests-sha). A rebuild under another CARGO_HOME embeds other paths in panic
# locations and changes the digest.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY contract contract
COPY filter filter
COPY judge judge
COPY ledger ledger
COPY serve serve
COPY sidecar sidecar
RUN cargo build --profile sidecar --locked -p kvab

# distroless/cc: glibc and libgcc only, no shell, runs as uid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/sidecar/kvab /kvab/kvab
COPY target/filter/kvab_filter.wasm /kvab/kvab_filter.wasm
USER 65532:65532
EXPOSE 18090 18091
ENTRYPOINT ["/kvab/kvab"]
CMD ["serve", "--config", "/etc/kvab/kvab.toml"]
