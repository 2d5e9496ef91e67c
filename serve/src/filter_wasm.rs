//! `GET /v1/filter.wasm`: the kvab filter module this sidecar image ships, so that an Istio `WasmPlugin` can
//! load it over plain HTTP from inside the cluster (no OCI registry needed). The file named by the `filter_wasm`
//! key is read once at startup and its SHA-256 computed then; the same bytes are served until the process exits,
//! so the digest in the `WasmPlugin` and the bytes Envoy loads cannot drift apart while the pod runs.

use bytes::Bytes;
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};

pub const PATH: &str = "/v1/filter.wasm";
pub const CONTENT_TYPE: &str = "application/wasm";
/// Response header carrying the hex SHA-256 of the body: the value `WasmPlugin.spec.sha256` must have.
pub const SHA256_HEADER: &str = "x-kvab-sha256";

/// The module served, with its digest.
#[derive(Debug)]
pub struct FilterWasm {
    pub path: String,
    pub body: Bytes,
    /// Lowercase hex SHA-256 of `body`.
    pub sha256: String,
}

impl FilterWasm {
    /// Reads and hashes the file. The error names the configuration key, so a missing file is a clear startup
    /// failure rather than a 404 discovered by the gateway later.
    pub fn load(path: &str) -> anyhow::Result<FilterWasm> {
        let body = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!("cannot read the filter module named by `filter_wasm` ({path}): {e}")
        })?;
        // Every wasm module starts with "\0asm"; anything else would only fail later inside Envoy.
        if !body.starts_with(b"\0asm") {
            anyhow::bail!("`filter_wasm` ({path}) is not a WebAssembly module (no \\0asm header)");
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(FilterWasm {
            path: path.to_string(),
            body: Bytes::from(body),
            sha256,
        })
    }
}

/// The answer to `GET /v1/filter.wasm`: the module with `ETag` and `x-kvab-sha256`, `304` when `If-None-Match`
/// names it, or a JSON `404` with code `filter_wasm_not_configured` when the key is unset.
pub fn respond(module: Option<&FilterWasm>, headers: &HeaderMap) -> Response<Bytes> {
    let Some(module) = module else {
        return crate::answer::error(
            StatusCode::NOT_FOUND,
            "filter_wasm_not_configured",
            "this sidecar serves no filter module: set the `filter_wasm` key to the path of kvab_filter.wasm",
        );
    };
    let etag = format!("\"{}\"", module.sha256);
    let (status, body) = if crate::answer::if_none_match(headers, &etag) {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else {
        (StatusCode::OK, module.body.clone())
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&module.sha256) {
        h.insert(SHA256_HEADER, value);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The smallest valid module: magic and version.
    const EMPTY_MODULE: &[u8] = b"\0asm\x01\0\0\0";
    /// `sha256sum` of those 8 bytes.
    const EMPTY_MODULE_SHA256: &str =
        "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476";

    fn module_file(bytes: &[u8]) -> (tempdir::Dir, String) {
        let dir = tempdir::Dir::new();
        let path = dir.path.join("kvab_filter.wasm");
        std::fs::write(&path, bytes).unwrap();
        let path = path.to_string_lossy().into_owned();
        (dir, path)
    }

    /// A throwaway directory under the system temp dir, removed on drop (no extra crate for one test).
    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "kvab-filter-wasm-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn serves_the_module_with_its_sha256() {
        let (_dir, path) = module_file(EMPTY_MODULE);
        let module = FilterWasm::load(&path).unwrap();
        assert_eq!(module.sha256, EMPTY_MODULE_SHA256);
        let response = respond(Some(&module), &HeaderMap::new());
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body().as_ref(), EMPTY_MODULE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(response.headers()[SHA256_HEADER], EMPTY_MODULE_SHA256);
        assert_eq!(
            response.headers()[header::ETAG],
            format!("\"{EMPTY_MODULE_SHA256}\"").as_str()
        );
    }

    #[test]
    fn answers_304_when_the_etag_matches() {
        let (_dir, path) = module_file(EMPTY_MODULE);
        let module = FilterWasm::load(&path).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"{EMPTY_MODULE_SHA256}\"")).unwrap(),
        );
        let response = respond(Some(&module), &headers);
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert!(response.body().is_empty());
    }

    #[test]
    fn unset_key_is_a_json_404_with_a_code() {
        let response = respond(None, &HeaderMap::new());
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body: kvab_contract::ErrorBody = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body.error.code, "filter_wasm_not_configured");
    }

    #[test]
    fn missing_or_foreign_file_is_an_error_naming_the_key() {
        let e = FilterWasm::load("/nonexistent/kvab_filter.wasm").unwrap_err();
        assert!(e.to_string().contains("`filter_wasm`"), "{e}");
        assert!(
            e.to_string().contains("/nonexistent/kvab_filter.wasm"),
            "{e}"
        );
        let (_dir, path) = module_file(b"#!/bin/sh\n");
        let e = FilterWasm::load(&path).unwrap_err();
        assert!(e.to_string().contains("not a WebAssembly module"), "{e}");
    }
}
