//! The sidecar's endpoint map in the form the request path uses: which arm an upstream address
//! belongs to, and how many ready endpoints each arm has.

use serde_json::Value;

use crate::plan::{ArmId, Plan};

/// The arm that served a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Arm(ArmId),
    /// An upstream answered, but its address is not in the map (or there is no fresh map).
    Unknown,
    /// No upstream answered (a local reply, or the connection failed).
    None,
}

impl Served {
    /// Index among `arms + [unknown, none]`.
    pub(crate) fn index(self, arms: usize) -> usize {
        match self {
            Served::Arm(a) if a.0 < arms => a.0,
            Served::Arm(_) | Served::Unknown => arms,
            Served::None => arms + 1,
        }
    }

    /// Label: the arm name, `unknown` or `none`.
    pub fn label(self, plan: &Plan) -> &str {
        match self {
            Served::Arm(a) => plan.arm_label(Some(a)),
            Served::Unknown => kvab_contract::report::UNKNOWN_ARM,
            Served::None => kvab_contract::report::NO_ARM,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ArmMap {
    version: String,
    /// Every endpoint address (ready or not: one turning not-ready may still finish a response),
    /// sorted for binary search.
    addresses: Vec<(Box<[u8]>, ArmId)>,
    ready: Vec<u32>,
    /// Backends named in the map that are not configured arms.
    foreign_backends: usize,
}

impl ArmMap {
    /// Parses `GET /v1/endpoints` (the `kvab_contract::EndpointMap` shape; fields a newer
    /// sidecar adds are ignored). Backends that are not configured arms are ignored (and
    /// counted); an address claimed by two arms keeps the first (in arm order).
    pub fn parse(plan: &Plan, json: &[u8]) -> Result<ArmMap, String> {
        let map: Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let version = map
            .get("version")
            .and_then(Value::as_str)
            .ok_or("no string `version`")?;
        let backends = map
            .get("backends")
            .and_then(Value::as_object)
            .ok_or("no object `backends`")?;
        let mut out = ArmMap {
            version: version.to_owned(),
            addresses: Vec::new(),
            ready: vec![0; plan.arm_names().len()],
            foreign_backends: 0,
        };
        for (name, backend) in backends {
            let Some(arm) = plan.arm_by_name(name) else {
                out.foreign_backends += 1;
                continue;
            };
            let endpoints = backend
                .get("endpoints")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("backends.{name}: no array `endpoints`"))?;
            for (i, endpoint) in endpoints.iter().enumerate() {
                let address = endpoint.get("address").and_then(Value::as_str);
                let ready = endpoint.get("ready").and_then(Value::as_bool);
                let (Some(address), Some(ready)) = (address, ready) else {
                    return Err(format!("backends.{name}.endpoints[{i}]: needs a string `address` and a boolean `ready`"));
                };
                if ready {
                    if let Some(n) = out.ready.get_mut(arm.0) {
                        *n = n.saturating_add(1);
                    }
                }
                out.addresses
                    .push((address.as_bytes().to_vec().into_boxed_slice(), arm));
            }
        }
        out.addresses
            .sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        out.addresses
            .dedup_by(|later, earlier| later.0 == earlier.0);
        Ok(out)
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn arm_of(&self, address: &[u8]) -> Served {
        match self
            .addresses
            .binary_search_by(|(a, _)| a.as_ref().cmp(address))
        {
            Ok(i) => self
                .addresses
                .get(i)
                .map_or(Served::Unknown, |(_, arm)| Served::Arm(*arm)),
            Err(_) => Served::Unknown,
        }
    }

    pub fn ready_endpoints(&self, arm: ArmId) -> u32 {
        self.ready.get(arm.0).copied().unwrap_or(0)
    }

    pub fn foreign_backends(&self) -> usize {
        self.foreign_backends
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MAP: &str = r#"{"version":"v7","generated_at":"2026-11-23T00:00:00Z","backends":{
        "nvlink":{"endpoints":[{"address":"10.0.0.5:8080","pod":"llm-d-vllm/p2p-a","ready":true},
                               {"address":"10.0.0.6:8080","pod":"llm-d-vllm/p2p-b","ready":false}]},
        "fs":{"endpoints":[{"address":"10.0.0.7:8080","pod":"llm-d-vllm/fs-a","ready":true},
                           {"address":"10.0.0.5:8080","pod":"llm-d-vllm/dup","ready":true}]},
        "lmcache":{"endpoints":[{"address":"10.0.0.9:8080","pod":"x","ready":true}]}}}"#;

    #[test]
    fn addresses_resolve_to_arms_and_ready_endpoints_are_counted() {
        let plan = parse(b"{}").unwrap();
        let map = ArmMap::parse(&plan, MAP.as_bytes()).unwrap();
        assert_eq!(map.version(), "v7");
        assert_eq!(map.arm_of(b"10.0.0.6:8080"), Served::Arm(ArmId(0)));
        assert_eq!(map.arm_of(b"10.0.0.7:8080"), Served::Arm(ArmId(1)));
        assert_eq!(
            map.arm_of(b"10.0.0.5:8080"),
            Served::Arm(ArmId(0)),
            "first arm keeps a shared address"
        );
        assert_eq!(map.arm_of(b"10.0.0.9:8080"), Served::Unknown);
        assert_eq!(map.arm_of(b""), Served::Unknown);
        assert_eq!(map.ready_endpoints(ArmId(0)), 1);
        assert_eq!(map.ready_endpoints(ArmId(1)), 2);
        assert_eq!(map.ready_endpoints(ArmId(5)), 0);
        assert_eq!(map.foreign_backends(), 1);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let plan = parse(b"{}").unwrap();
        for body in [
            &b""[..],
            b"{",
            b"[]",
            b"null",
            b"{\"version\":1}",
            &[0xff; 64],
        ] {
            assert!(ArmMap::parse(&plan, body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn served_labels() {
        let plan = parse(b"{}").unwrap();
        assert_eq!(Served::Arm(ArmId(1)).label(&plan), "fs");
        assert_eq!(Served::Unknown.label(&plan), "unknown");
        assert_eq!(Served::None.label(&plan), "none");
    }
}
