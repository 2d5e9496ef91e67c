//! Answers shared by every route and listener: JSON bodies, the JSON error body of the contract
//! (`{"error":{"code":…,"message":…}}`), and conditional GET.

use bytes::Bytes;
use kvab_contract::ErrorBody;
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};

pub const JSON: &str = "application/json";

/// `If-None-Match` uses weak comparison (RFC 9110 §13.1.2): `W/"x"` matches `"x"`; `*` matches any.
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// An answer with `status` and `body`.
pub fn with_status(status: StatusCode, body: Bytes) -> Response<Bytes> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

/// A JSON answer.
pub fn json(status: StatusCode, body: Bytes) -> Response<Bytes> {
    let mut response = with_status(status, body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

/// The contract's JSON error answer.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    // Serializing two strings cannot fail; fall back to a fixed body rather than panic.
    let body = serde_json::to_vec(&ErrorBody::new(code, message))
        .unwrap_or_else(|_| b"{\"error\":{\"code\":\"internal\",\"message\":\"\"}}".to_vec());
    json(status, Bytes::from(body))
}
