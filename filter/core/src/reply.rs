//! Bodies of the answers the filter gives itself, in the OpenAI error shape clients of an
//! OpenAI-compatible server already parse.

use crate::arm::ArmId;
use crate::json::push_string;

/// A request the filter answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    UnknownBackend,
    AmbiguousBackend,
    /// The requested arm has no ready endpoint (per a fresh endpoint map).
    Unavailable,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [
        Rejection::UnknownBackend,
        Rejection::AmbiguousBackend,
        Rejection::Unavailable,
    ];

    /// The JSON error `code`, also the label of `kvab_rejected_total{reason}`.
    pub fn code(self) -> &'static str {
        match self {
            Rejection::UnknownBackend => "unknown_kv_backend",
            Rejection::AmbiguousBackend => "ambiguous_kv_backend",
            Rejection::Unavailable => "kv_backend_unavailable",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            Rejection::UnknownBackend | Rejection::AmbiguousBackend => 400,
            Rejection::Unavailable => 503,
        }
    }

    /// Envoy's response code details for the local reply (shows in access logs).
    pub fn details(self) -> &'static str {
        match self {
            Rejection::UnknownBackend => "kvab_unknown_kv_backend",
            Rejection::AmbiguousBackend => "kvab_ambiguous_kv_backend",
            Rejection::Unavailable => "kvab_kv_backend_unavailable",
        }
    }
}

/// Builds the JSON body of a rejection. Called once per configuration, never per request.
pub(crate) fn rejection_body(
    rejection: Rejection,
    arm: Option<ArmId>,
    header: &str,
    arms: &[String],
    spellings: &[(Box<[u8]>, ArmId, bool)],
) -> Vec<u8> {
    let message = match rejection {
        Rejection::UnknownBackend => {
            let choices: Vec<String> = arms
                .iter()
                .enumerate()
                .map(|(i, arm)| {
                    let aliases: Vec<&str> = spellings
                        .iter()
                        .filter(|(_, id, canonical)| id.0 == i && !canonical)
                        .filter_map(|(s, _, _)| std::str::from_utf8(s).ok())
                        .collect();
                    if aliases.is_empty() {
                        arm.clone()
                    } else {
                        format!("{arm} (aliases: {})", aliases.join(", "))
                    }
                })
                .collect();
            format!("{header} must name one KV backend: {}", choices.join("; "))
        }
        Rejection::AmbiguousBackend => format!(
            "{header} names more than one KV backend; send exactly one of: {}",
            arms.join(", ")
        ),
        Rejection::Unavailable => {
            let name = arm
                .and_then(|a| arms.get(a.0))
                .map_or("the requested arm", String::as_str);
            format!(
                "KV backend {name} has no ready endpoint; retry later or choose another {header}"
            )
        }
    };
    let error_type = match rejection {
        Rejection::Unavailable => "service_unavailable_error",
        Rejection::UnknownBackend | Rejection::AmbiguousBackend => "invalid_request_error",
    };
    // Built by hand: every piece is configuration text from a restricted alphabet or a constant,
    // and this keeps a JSON serializer out of the .wasm.
    let mut body = String::with_capacity(message.len() + 128);
    body.push_str("{\"error\":{\"message\":");
    push_string(&mut body, &message);
    body.push_str(",\"type\":");
    push_string(&mut body, error_type);
    body.push_str(",\"code\":");
    push_string(&mut body, rejection.code());
    body.push_str(",\"param\":");
    push_string(&mut body, header);
    body.push_str("}}");
    body.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use serde_json::Value;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        crate::json::push_string(&mut out, "a\"b\\c\n");
        assert_eq!(out, r#""a\"b\\c\u000a""#);
        let parsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\n");
    }

    #[test]
    fn rejection_bodies_follow_the_openai_error_shape() {
        let plan = parse(b"{}").unwrap();
        let body: Value =
            serde_json::from_slice(plan.rejection_body(Rejection::UnknownBackend, None)).unwrap();
        assert_eq!(body["error"]["code"], "unknown_kv_backend");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "x-kv-backend");
        assert_eq!(
            body["error"]["message"],
            "x-kv-backend must name one KV backend: nvlink (aliases: p2p, nccl); fs (aliases: filesystem, file)"
        );
        let body: Value =
            serde_json::from_slice(plan.rejection_body(Rejection::AmbiguousBackend, None)).unwrap();
        assert_eq!(body["error"]["code"], "ambiguous_kv_backend");
        assert_eq!(
            body["error"]["message"],
            "x-kv-backend names more than one KV backend; send exactly one of: nvlink, fs"
        );
        let body: Value =
            serde_json::from_slice(plan.rejection_body(Rejection::Unavailable, Some(ArmId(1))))
                .unwrap();
        assert_eq!(body["error"]["code"], "kv_backend_unavailable");
        assert_eq!(body["error"]["type"], "service_unavailable_error");
        assert_eq!(
            body["error"]["message"],
            "KV backend fs has no ready endpoint; retry later or choose another x-kv-backend"
        );
    }
}
