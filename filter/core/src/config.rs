//! Plugin configuration: the JSON users write (`pluginConfig` in Istio, a `StringValue` in plain
//! Envoy), validated once into the runtime [`Plan`] the request path reads.

use std::collections::BTreeMap;

use serde_json::Value;

use kvab_contract::report::{is_report_token, MAX_REPORT_TOKEN_LEN, MIN_REPORT_TOKEN_LEN};
use kvab_contract::ArmName;

use crate::assign::Split;
use crate::choice::{ChoicePolicy, IpRange, MAX_HEADER_VALUES, MAX_HEADER_VALUE_LEN, MAX_RANGES};
pub use crate::config_error::ConfigError;
use crate::json::{self, error, Fields};
use crate::plan::{ArmId, Missing, Plan, Unavailable, Unknown};
use crate::sidecar::Sidecar;

/// Aliases end up in header values: keep them to a safe, bounded alphabet (arm names: [`ArmName`]).
const MAX_ALIAS_LEN: usize = 32;
/// Bounds the label cardinality of every per-arm metric.
pub const MAX_ARMS: usize = 16;
/// Same cap as a Gateway API `backendRef` weight; keeps the weight sum far from overflow.
const MAX_WEIGHT: u32 = 1_000_000;

/// The configuration as written, before validation.
struct RawConfig {
    header: String,
    arms: Vec<RawArm>,
    on_missing: Missing<()>,
    on_unknown: Unknown<()>,
    default_arm: Option<String>,
    split: Option<RawSplit>,
    on_unavailable: Unavailable,
    sidecar: Option<RawSidecar>,
    allow_choice: Option<RawChoice>,
    response_endpoint_header: bool,
}

struct RawSidecar {
    cluster: String,
    authority: Option<String>,
    refresh_ms: u64,
    timeout_ms: Option<u64>,
    stale_after_ms: u64,
    report_token: Option<String>,
}

const DEFAULT_REFRESH_MS: u64 = 1_000;
/// Default call timeout, capped at the refresh interval.
const DEFAULT_TIMEOUT_MS: u64 = 500;
const DEFAULT_STALE_AFTER_MS: u64 = 10_000;

struct RawChoice {
    source_ranges: Vec<String>,
    header: Option<String>,
    header_values: Vec<String>,
}

struct RawArm {
    name: String,
    aliases: Vec<String>,
}

struct RawSplit {
    weights: BTreeMap<String, u32>,
    key_header: Option<String>,
}

impl RawConfig {
    fn read(value: &Value) -> Result<RawConfig, ConfigError> {
        let f = Fields::new(
            value,
            "",
            &[
                "header",
                "arms",
                "onMissing",
                "onUnknown",
                "defaultArm",
                "split",
                "onUnavailable",
                "sidecar",
                "allowChoice",
                "responseEndpointHeader",
            ],
        )?;
        f.finish()?;
        let arms = match f.array("arms")? {
            None => default_arms(),
            Some(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| RawArm::read(item, &format!("arms[{i}]")))
                .collect::<Result<_, _>>()?,
        };
        Ok(RawConfig {
            header: f.string("header")?.unwrap_or_else(default_header),
            arms,
            on_missing: match f.variant("onMissing", &["passthrough", "default", "split"])? {
                Some("default") => Missing::Default(()),
                Some("split") => Missing::Split,
                _ => Missing::Passthrough,
            },
            on_unknown: match f.variant("onUnknown", &["reject", "passthrough", "default"])? {
                Some("passthrough") => Unknown::Passthrough,
                Some("default") => Unknown::Default(()),
                _ => Unknown::Reject,
            },
            default_arm: f.string("defaultArm")?,
            split: f
                .get("split")
                .map(|v| RawSplit::read(v, &f.path_of("split")))
                .transpose()?,
            on_unavailable: match f.variant("onUnavailable", &["reject", "passthrough"])? {
                Some("passthrough") => Unavailable::Passthrough,
                _ => Unavailable::Reject,
            },
            sidecar: f
                .get("sidecar")
                .map(|v| RawSidecar::read(v, &f.path_of("sidecar")))
                .transpose()?,
            allow_choice: f
                .get("allowChoice")
                .map(|v| RawChoice::read(v, &f.path_of("allowChoice")))
                .transpose()?,
            // On unless turned off: configurations written before the field keep their tag.
            response_endpoint_header: f.bool("responseEndpointHeader")?.unwrap_or(true),
        })
    }
}

impl RawArm {
    fn read(value: &Value, path: &str) -> Result<RawArm, ConfigError> {
        let f = Fields::new(value, path, &["name", "aliases"])?;
        f.finish()?;
        Ok(RawArm {
            name: f
                .string("name")?
                .ok_or_else(|| error(path, "missing field `name`"))?,
            aliases: f.strings("aliases")?,
        })
    }
}

impl RawSplit {
    fn read(value: &Value, path: &str) -> Result<RawSplit, ConfigError> {
        let f = Fields::new(value, path, &["weights", "keyHeader"])?;
        f.finish()?;
        let weights_path = f.path_of("weights");
        let Some(weights) = f.get("weights") else {
            return Err(error(path, "missing field `weights`"));
        };
        let Value::Object(weights) = weights else {
            return Err(error(
                weights_path,
                "expected an object of arm name to weight",
            ));
        };
        let weights = weights
            .iter()
            .map(|(arm, w)| {
                let w = json::unsigned(w, &format!("{weights_path}.{arm}"), u64::from(u32::MAX))?;
                Ok((arm.clone(), u32::try_from(w).unwrap_or(u32::MAX)))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(RawSplit {
            weights,
            key_header: f.string("keyHeader")?,
        })
    }
}

impl RawSidecar {
    fn read(value: &Value, path: &str) -> Result<RawSidecar, ConfigError> {
        let f = Fields::new(
            value,
            path,
            &[
                "cluster",
                "authority",
                "refreshMs",
                "timeoutMs",
                "staleAfterMs",
                "reportToken",
            ],
        )?;
        f.finish()?;
        Ok(RawSidecar {
            cluster: f
                .string("cluster")?
                .ok_or_else(|| error(path, "missing field `cluster`"))?,
            authority: f.string("authority")?,
            refresh_ms: f.u64("refreshMs")?.unwrap_or(DEFAULT_REFRESH_MS),
            timeout_ms: f.u64("timeoutMs")?,
            stale_after_ms: f.u64("staleAfterMs")?.unwrap_or(DEFAULT_STALE_AFTER_MS),
            report_token: f.string("reportToken")?,
        })
    }
}

impl RawChoice {
    fn read(value: &Value, path: &str) -> Result<RawChoice, ConfigError> {
        let f = Fields::new(value, path, &["sourceRanges", "header", "headerValues"])?;
        f.finish()?;
        Ok(RawChoice {
            source_ranges: f.strings("sourceRanges")?,
            header: f.string("header")?,
            header_values: f.strings("headerValues")?,
        })
    }
}

fn default_header() -> String {
    kvab_contract::ARM_HEADER.to_owned()
}

fn default_arms() -> Vec<RawArm> {
    let arm = |name: &str, aliases: &[&str]| RawArm {
        name: name.to_owned(),
        aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
    };
    vec![
        arm("nvlink", &["p2p", "nccl"]),
        arm("fs", &["filesystem", "file"]),
    ]
}

/// Parses and validates the plugin configuration. Empty input means all defaults.
pub fn parse(json: &[u8]) -> Result<Plan, ConfigError> {
    let trimmed = json.trim_ascii();
    let input: &[u8] = if trimmed.is_empty() { b"{}" } else { trimmed };
    let value: Value = serde_json::from_slice(input).map_err(|e| error("", e.to_string()))?;
    if !value.is_object() {
        return Err(error("", "the configuration must be a JSON object"));
    }
    build(RawConfig::read(&value)?)
}

fn build(raw: RawConfig) -> Result<Plan, ConfigError> {
    let header = validate_header_name("header", &raw.header)?;
    if raw.arms.is_empty() {
        return Err(error("arms", "at least one arm is required"));
    }
    if raw.arms.len() > MAX_ARMS {
        return Err(error(
            "arms",
            format!(
                "at most {MAX_ARMS} arms are allowed, got {}",
                raw.arms.len()
            ),
        ));
    }

    let mut arms: Vec<String> = Vec::with_capacity(raw.arms.len());
    // Every name and alias (both lowercase) with the arm it selects: the table the request path scans.
    let mut spellings: Vec<(String, ArmId, bool)> = Vec::new();
    for (i, arm) in raw.arms.iter().enumerate() {
        let field = format!("arms[{i}].name");
        // Taken as written: the name is matched exactly by HTTPRoutes, pod labels and the sidecar's map.
        let name = arm_name(&field, &arm.name)?;
        let id = ArmId(i);
        claim(&mut spellings, &field, &name, id, true, &arms)?;
        arms.push(name);
        for (j, alias) in arm.aliases.iter().enumerate() {
            let field = format!("arms[{i}].aliases[{j}]");
            let alias = validate_alias(&field, alias)?;
            claim(&mut spellings, &field, &alias, id, false, &arms)?;
        }
    }
    let arm_id = |field: &str, name: &str| -> Result<ArmId, ConfigError> {
        let wanted = arm_name(field, name)?;
        arms.iter()
            .position(|a| *a == wanted)
            .map(ArmId)
            .ok_or_else(|| {
                error(
                    field,
                    format!(
                        "\"{name}\" is not a configured arm (arms: {})",
                        arms.join(", ")
                    ),
                )
            })
    };

    let default_arm = match &raw.default_arm {
        Some(name) => Some(arm_id("defaultArm", name)?),
        None => None,
    };
    let needs_default = |what: &str| {
        default_arm
            .ok_or_else(|| error("defaultArm", format!("required when {what} is \"default\"")))
    };
    let on_unknown = match raw.on_unknown {
        Unknown::Reject => Unknown::Reject,
        Unknown::Passthrough => Unknown::Passthrough,
        Unknown::Default(()) => Unknown::Default(needs_default("onUnknown")?),
    };
    let on_missing = match raw.on_missing {
        Missing::Passthrough => Missing::Passthrough,
        Missing::Default(()) => Missing::Default(needs_default("onMissing")?),
        Missing::Split => Missing::Split,
    };

    let split = match (&raw.split, on_missing) {
        (None, Missing::Split) => {
            return Err(error("split", "required when onMissing is \"split\""));
        }
        (None, _) => None,
        (Some(split), _) => Some(build_split(split, &arm_id)?),
    };

    let choice = match &raw.allow_choice {
        Some(choice) => Some(build_choice(choice, &header)?),
        None => None,
    };
    let sidecar = match &raw.sidecar {
        Some(sidecar) => Some(build_sidecar(sidecar)?),
        None => None,
    };
    let on_unavailable = raw.on_unavailable;

    Ok(Plan::new(crate::plan::Policies {
        header,
        arms,
        spellings,
        on_missing,
        on_unknown,
        on_unavailable,
        split,
        sidecar,
        choice,
        response_endpoint_header: raw.response_endpoint_header,
    }))
}

fn build_sidecar(raw: &RawSidecar) -> Result<Sidecar, ConfigError> {
    let cluster = raw.cluster.trim();
    if cluster.is_empty()
        || cluster.len() > 256
        || cluster.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(error(
            "sidecar.cluster",
            format!(
                "\"{}\" is not an Envoy cluster name (under Istio: outbound|PORT||SERVICE.NAMESPACE.svc.cluster.local)",
                raw.cluster
            ),
        ));
    }
    let valid_authority = |a: &str| {
        !a.is_empty() && a.is_ascii() && !a.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    let authority = match &raw.authority {
        Some(a) if valid_authority(a.trim()) => a.trim().to_owned(),
        Some(a) => {
            return Err(error(
                "sidecar.authority",
                format!("\"{a}\" is not a valid :authority"),
            ))
        }
        None => Sidecar::default_authority(cluster),
    };
    let in_range = |field: &str, value: u64, min: u64, max: u64| {
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(error(
                field,
                format!("must be between {min} and {max} milliseconds, got {value}"),
            ))
        }
    };
    let refresh_ms = in_range("sidecar.refreshMs", raw.refresh_ms, 100, 60_000)?;
    let timeout_ms = in_range(
        "sidecar.timeoutMs",
        raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS.min(refresh_ms)),
        10,
        refresh_ms,
    )?;
    // A worker that did not fetch learns of a confirmation at its next tick, up to one refresh
    // later, and confirmations come one refresh apart: below 3 refreshes (plus the call's time), a
    // healthy link could look stale on some workers now and then.
    let stale_after_ms = in_range(
        "sidecar.staleAfterMs",
        raw.stale_after_ms,
        3 * refresh_ms,
        3_600_000,
    )?;
    let report_token = match &raw.report_token {
        Some(t) if is_report_token(t) => Some(t.clone()),
        // The token itself is never echoed into the log.
        Some(_) => {
            return Err(error(
                "sidecar.reportToken",
                format!(
                "must be {MIN_REPORT_TOKEN_LEN} to {MAX_REPORT_TOKEN_LEN} printable ASCII characters without spaces"
            ),
            ))
        }
        None => None,
    };
    Ok(Sidecar {
        cluster: cluster.to_owned(),
        authority,
        refresh_ms,
        timeout_ms,
        stale_after_ms,
        report_token,
    })
}

fn build_choice(raw: &RawChoice, arm_header: &str) -> Result<ChoicePolicy, ConfigError> {
    if raw.source_ranges.is_empty() && raw.header.is_none() {
        return Err(error(
            "allowChoice",
            "needs sourceRanges, header, or both (omit allowChoice to let every request choose)",
        ));
    }
    if raw.source_ranges.len() > MAX_RANGES {
        return Err(error(
            "allowChoice.sourceRanges",
            format!(
                "at most {MAX_RANGES} ranges are allowed, got {}",
                raw.source_ranges.len()
            ),
        ));
    }
    let mut ranges = Vec::with_capacity(raw.source_ranges.len());
    for (i, text) in raw.source_ranges.iter().enumerate() {
        let range =
            IpRange::parse(text).map_err(|m| error(format!("allowChoice.sourceRanges[{i}]"), m))?;
        ranges.push(range);
    }
    let header = match &raw.header {
        Some(h) => {
            let h = validate_header_name("allowChoice.header", h)?;
            let tags = [
                arm_header.to_owned(),
                kvab_contract::source_header(arm_header),
                kvab_contract::endpoint_header(arm_header),
            ];
            if tags.contains(&h) {
                return Err(error(
                    "allowChoice.header",
                    format!("\"{h}\" is the arm header or one of its tags"),
                ));
            }
            Some(h)
        }
        None => None,
    };
    if !raw.header_values.is_empty() && header.is_none() {
        return Err(error(
            "allowChoice.headerValues",
            "requires allowChoice.header",
        ));
    }
    if raw.header_values.len() > MAX_HEADER_VALUES {
        return Err(error(
            "allowChoice.headerValues",
            format!(
                "at most {MAX_HEADER_VALUES} values are allowed, got {}",
                raw.header_values.len()
            ),
        ));
    }
    let mut values = Vec::with_capacity(raw.header_values.len());
    for (i, value) in raw.header_values.iter().enumerate() {
        let v = value.trim_matches([' ', '\t']);
        if v.is_empty()
            || v.len() > MAX_HEADER_VALUE_LEN
            || !v
                .bytes()
                .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        {
            return Err(error(
                format!("allowChoice.headerValues[{i}]"),
                format!("must be 1 to {MAX_HEADER_VALUE_LEN} printable ASCII characters"),
            ));
        }
        values.push(v.to_owned());
    }
    Ok(ChoicePolicy::new(ranges, header, values))
}

fn build_split(
    raw: &RawSplit,
    arm_id: &dyn Fn(&str, &str) -> Result<ArmId, ConfigError>,
) -> Result<Split, ConfigError> {
    if raw.weights.is_empty() {
        return Err(error("split.weights", "at least one arm needs a weight"));
    }
    let mut weights = Vec::with_capacity(raw.weights.len());
    for (name, &weight) in &raw.weights {
        let field = format!("split.weights.{name}");
        let id = arm_id(&field, name)?;
        if weights.iter().any(|(other, _)| *other == id) {
            return Err(error(field, "the same arm is weighted twice"));
        }
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(error(
                field,
                format!("weight must be between 1 and {MAX_WEIGHT}, got {weight}"),
            ));
        }
        weights.push((id, weight));
    }
    let key_header = match &raw.key_header {
        Some(h) => Some(validate_header_name("split.keyHeader", h)?),
        None => None,
    };
    Ok(Split::new(weights, key_header))
}

fn claim(
    spellings: &mut Vec<(String, ArmId, bool)>,
    field: &str,
    spelling: &str,
    id: ArmId,
    canonical: bool,
    arms: &[String],
) -> Result<(), ConfigError> {
    if let Some((_, owner, _)) = spellings.iter().find(|(s, _, _)| s == spelling) {
        let owner = arms.get(owner.0).map(String::as_str).unwrap_or(spelling);
        return Err(error(
            field,
            format!("\"{spelling}\" is already a name or alias of arm \"{owner}\""),
        ));
    }
    spellings.push((spelling.to_owned(), id, canonical));
    Ok(())
}

/// An arm name (`arms[].name`, `defaultArm`, a `split.weights` key): an [`ArmName`], taken as written;
/// refused with the contract's message (the same rule `kvab serve` and the CLIs state).
fn arm_name(field: &str, value: &str) -> Result<String, ConfigError> {
    ArmName::parse(value)
        .map(ArmName::into_string)
        .map_err(|e| error(field, e.to_string()))
}

/// Aliases are spellings clients may send (header values, matched case-insensitively), not arm
/// names: 1..=32 of `[a-z0-9._-]`, starting with a letter or digit, stored lowercase.
fn validate_alias(field: &str, value: &str) -> Result<String, ConfigError> {
    let v = value.trim().to_ascii_lowercase();
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    let first_ok = v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if v.is_empty() || v.len() > MAX_ALIAS_LEN || !first_ok || !v.chars().all(ok_char) {
        return Err(error(
            field,
            format!(
                "\"{value}\" must be 1 to {MAX_ALIAS_LEN} characters of a-z, 0-9, '.', '_', '-' starting with a letter or digit"
            ),
        ));
    }
    Ok(v)
}

/// HTTP header names as Envoy stores them: lowercase RFC 9110 tokens, no pseudo-headers.
fn validate_header_name(field: &str, value: &str) -> Result<String, ConfigError> {
    let v = value.trim().to_ascii_lowercase();
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if v.is_empty() || v.len() > 128 || !v.chars().all(tchar) {
        return Err(error(
            field,
            format!("\"{value}\" is not a valid HTTP header name"),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn err(json: &str) -> ConfigError {
        parse(json.as_bytes()).expect_err("config should be refused")
    }

    #[test]
    fn empty_config_gives_the_documented_defaults() {
        for input in ["", "  ", "{}"] {
            let plan = parse(input.as_bytes()).unwrap();
            assert_eq!(plan.header(), "x-kv-backend");
            assert_eq!(plan.source_header(), "x-kv-backend-source");
            assert_eq!(plan.endpoint_header(), "x-kv-backend-endpoint");
            assert_eq!(plan.arm_names(), ["nvlink", "fs"]);
            assert_eq!(plan.on_missing(), Missing::Passthrough);
            assert_eq!(plan.on_unknown(), Unknown::Reject);
            assert!(plan.response_endpoint_header());
        }
    }

    #[test]
    fn the_response_endpoint_tag_can_be_turned_off() {
        let plan = parse(br#"{"responseEndpointHeader":false}"#).unwrap();
        assert!(!plan.response_endpoint_header());
        assert!(plan.describe().ends_with(", responseEndpointHeader off"));
        let plan = parse(br#"{"responseEndpointHeader":true}"#).unwrap();
        assert!(plan.response_endpoint_header());
        assert!(!plan.describe().contains("responseEndpointHeader"));
        for json in [
            r#"{"responseEndpointHeader":"false"}"#,
            r#"{"responseEndpointHeader":0}"#,
            r#"{"responseEndpointHeader":null}"#,
        ] {
            let e = err(json);
            assert_eq!(e.field, "responseEndpointHeader", "{json}");
            assert!(e.message.contains("expected a boolean"), "{json}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = err(r#"{"arms":[{"name":"a","alias":["b"]}]}"#);
        assert_eq!(e.field, "arms[0].alias");
        assert!(e.message.contains("unknown field `alias`"), "{e}");
        let e = err(r#"{"onMisssing":"split"}"#);
        assert!(e.message.contains("unknown field `onMisssing`"), "{e}");
    }

    #[test]
    fn invalid_json_is_refused() {
        assert!(err("{").message.contains("EOF"));
        assert!(err("[]").message.contains("JSON object"));
        assert!(err("\"x\"").message.contains("JSON object"));
        assert!(err("{} {}").message.contains("trailing"));
    }

    #[test]
    fn empty_arm_set_is_refused() {
        assert_eq!(err(r#"{"arms":[]}"#).field, "arms");
    }

    #[test]
    fn too_many_arms_are_refused() {
        let arms: Vec<String> = (0..17).map(|i| format!(r#"{{"name":"a{i}"}}"#)).collect();
        let e = err(&format!(r#"{{"arms":[{}]}}"#, arms.join(",")));
        assert_eq!(e.field, "arms");
    }

    #[test]
    fn alias_conflicts_are_refused() {
        let e = err(
            r#"{"arms":[{"name":"nvlink","aliases":["p2p"]},{"name":"fs","aliases":["P2P"]}]}"#,
        );
        assert_eq!(e.field, "arms[1].aliases[0]");
        assert!(e.message.contains("arm \"nvlink\""), "{e}");
        let e = err(r#"{"arms":[{"name":"nvlink","aliases":["fs"]},{"name":"fs"}]}"#);
        assert_eq!(e.field, "arms[1].name");
        let e = err(r#"{"arms":[{"name":"nvlink","aliases":["nvlink"]}]}"#);
        assert_eq!(e.field, "arms[0].aliases[0]");
    }

    #[test]
    fn bad_names_are_refused() {
        for (json, field) in [
            (r#"{"arms":[{"name":""}]}"#, "arms[0].name"),
            (r#"{"arms":[{"name":"none"}]}"#, "arms[0].name"),
            (r#"{"arms":[{"name":"unknown"}]}"#, "arms[0].name"),
            (r#"{"arms":[{"name":"a;b"}]}"#, "arms[0].name"),
            (r#"{"arms":[{"name":"-a"}]}"#, "arms[0].name"),
            (
                r#"{"arms":[{"name":"a","aliases":["x y"]}]}"#,
                "arms[0].aliases[0]",
            ),
            (r#"{"header":"x kv"}"#, "header"),
            (r#"{"header":""}"#, "header"),
        ] {
            assert_eq!(err(json).field, field, "{json}");
        }
        let long = "a".repeat(33);
        assert_eq!(
            err(&format!(r#"{{"arms":[{{"name":"{long}"}}]}}"#)).field,
            "arms[0].name"
        );
    }

    #[test]
    fn header_names_are_normalized_arm_names_kept_as_written() {
        let plan =
            parse(br#"{"header":"X-KV-Arm","arms":[{"name":"nv.link-2","aliases":[" P2P "]}]}"#)
                .unwrap();
        assert_eq!(plan.header(), "x-kv-arm");
        assert_eq!(plan.source_header(), "x-kv-arm-source");
        assert_eq!(plan.arm_names(), ["nv.link-2"]);
    }

    /// `NVLink` is a valid label value but no arm name: lowercasing it would make the filter's arm differ
    /// from the sidecar's map and the HTTPRoute's match, so it is refused with the contract's rule (the
    /// same message `kvab serve` gives), not changed.
    #[test]
    fn an_uppercase_arm_name_is_refused_with_the_contract_rule() {
        let e = err(r#"{"arms":[{"name":"NVLink"},{"name":"fs"}]}"#);
        assert_eq!(e.field, "arms[0].name");
        assert_eq!(
            e.message,
            kvab_contract::ArmName::parse("NVLink")
                .unwrap_err()
                .to_string()
        );
        assert!(e.message.contains("\"NVLink\""), "{e}");
        assert!(e.message.contains(kvab_contract::ARM_NAME_RULE), "{e}");
        for (json, field) in [
            (r#"{"arms":[{"name":" fs"}]}"#, "arms[0].name"),
            (r#"{"arms":[{"name":"fs-"}]}"#, "arms[0].name"),
            (r#"{"onMissing":"default","defaultArm":"FS"}"#, "defaultArm"),
            (
                r#"{"onMissing":"split","split":{"weights":{"NVLINK":1}}}"#,
                "split.weights.NVLINK",
            ),
        ] {
            let e = err(json);
            assert_eq!(e.field, field, "{json}");
            assert!(e.message.contains(kvab_contract::ARM_NAME_RULE), "{e}");
        }
    }

    #[test]
    fn default_policies_need_a_configured_default_arm() {
        assert_eq!(err(r#"{"onMissing":"default"}"#).field, "defaultArm");
        assert_eq!(err(r#"{"onUnknown":"default"}"#).field, "defaultArm");
        let e = err(r#"{"onMissing":"default","defaultArm":"gpu"}"#);
        assert_eq!(e.field, "defaultArm");
        assert!(e.message.contains("nvlink, fs"), "{e}");
        let plan = parse(br#"{"onMissing":"default","defaultArm":"fs"}"#).unwrap();
        assert_eq!(plan.on_missing(), Missing::Default(ArmId(1)));
    }

    #[test]
    fn unknown_policy_values_are_refused() {
        let e = err(r#"{"onUnknown":"allow"}"#);
        assert_eq!(e.field, "onUnknown");
        assert!(e.message.contains("unknown variant `allow`"), "{e}");
    }

    #[test]
    fn bad_weights_are_refused() {
        for (weights, field) in [
            (r#"{"nvlink":0}"#, "split.weights.nvlink"),
            (r#"{"nvlink":-1}"#, "split.weights.nvlink"),
            (r#"{"nvlink":1.5}"#, "split.weights.nvlink"),
            (r#"{"nvlink":4294967296}"#, "split.weights.nvlink"),
            (r#"{"nvlink":1000001}"#, "split.weights.nvlink"),
            (r#"{"gpu":1}"#, "split.weights.gpu"),
            (r#"{"nvlink":1,"NVLINK":1}"#, "split.weights.NVLINK"),
            (r#"{}"#, "split.weights"),
        ] {
            let json = format!(r#"{{"onMissing":"split","split":{{"weights":{weights}}}}}"#);
            assert_eq!(err(&json).field, field, "{json}");
        }
        assert_eq!(err(r#"{"onMissing":"split"}"#).field, "split");
        let e = err(r#"{"split":{"weights":{"fs":1},"keyHeader":"bad header"}}"#);
        assert_eq!(e.field, "split.keyHeader");
    }

    /// The shipped fixtures (also checked against the JSON Schema by the Python tests).
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn fixtures_are_accepted_and_refused_as_filed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        let mut seen = 0;
        for (folder, should_parse) in [
            ("valid", true),
            ("invalid", false),
            ("invalid-semantic", false),
        ] {
            for entry in std::fs::read_dir(dir.join(folder)).unwrap() {
                let path = entry.unwrap().path();
                let result = parse(&std::fs::read(&path).unwrap());
                assert_eq!(
                    result.is_ok(),
                    should_parse,
                    "{}: {:?}",
                    path.display(),
                    result.err()
                );
                seen += 1;
            }
        }
        assert!(seen >= 15, "only {seen} fixtures found");
    }

    /// The JSON Schema states the contract's arm-name grammar (its pattern; the reserved names apart).
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn the_schema_states_the_contract_arm_name_pattern() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.schema.json");
        let schema: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let arm_name = &schema["$defs"]["armName"];
        assert_eq!(arm_name["pattern"], kvab_contract::ARM_NAME_PATTERN);
        assert_eq!(
            arm_name["not"]["enum"],
            serde_json::json!(kvab_contract::report::RESERVED_ARM_NAMES)
        );
    }

    /// The refusal is logged as one line: control characters from the input (a key or value
    /// with a newline, DEL, an escape sequence) must not break or forge log lines.
    #[test]
    fn refusals_are_one_printable_line() {
        for json in [
            "{\"a\\nb\":1}",
            "{\"split\":{\"\u{7f}eights\":{}}}",
            "{\"arms\":[{\"name\":\"x\\u001b[31my\"}]}",
            "{\"onMissing\":\"split\",\"split\":{\"weights\":{\"a\\r\\nkvab: forged\":1}}}",
        ] {
            let line = err(json).to_string();
            assert!(!line.chars().any(char::is_control), "{json} -> {line:?}");
        }
        let e = err("{\"a\\nb\":1}");
        assert!(e.to_string().contains("unknown field `a\\nb`"), "{e}");
    }

    #[test]
    fn allow_choice_is_validated() {
        for (choice, field, why) in [
            ("{}", "allowChoice", "needs sourceRanges, header, or both"),
            (
                r#"{"sourceRanges":[]}"#,
                "allowChoice",
                "needs sourceRanges",
            ),
            (
                r#"{"sourceRanges":["10.0.0.0/33"]}"#,
                "allowChoice.sourceRanges[0]",
                "prefix length",
            ),
            (
                r#"{"sourceRanges":["::1","10.1.0.0/8"]}"#,
                "allowChoice.sourceRanges[1]",
                "host bits",
            ),
            (
                r#"{"sourceRanges":"10.0.0.0/8"}"#,
                "allowChoice.sourceRanges",
                "invalid type",
            ),
            (
                r#"{"header":"x kv"}"#,
                "allowChoice.header",
                "not a valid HTTP header name",
            ),
            (
                r#"{"header":"X-KV-Backend"}"#,
                "allowChoice.header",
                "the arm header",
            ),
            (
                r#"{"header":"x-kv-backend-source"}"#,
                "allowChoice.header",
                "its tags",
            ),
            (
                r#"{"headerValues":["a"],"sourceRanges":["::1"]}"#,
                "allowChoice.headerValues",
                "requires allowChoice.header",
            ),
            (
                r#"{"header":"x-ab","headerValues":[" "]}"#,
                "allowChoice.headerValues[0]",
                "printable ASCII",
            ),
            (
                r#"{"header":"x-ab","headerValues":["a\u0000"]}"#,
                "allowChoice.headerValues[0]",
                "printable ASCII",
            ),
            (
                r#"{"header":"x-ab","headerValues":["é"]}"#,
                "allowChoice.headerValues[0]",
                "printable ASCII",
            ),
            (
                r#"{"header":"x-ab","sources":["::1"]}"#,
                "allowChoice.sources",
                "unknown field",
            ),
        ] {
            let e = err(&format!(r#"{{"allowChoice":{choice}}}"#));
            assert_eq!(e.field, field, "{choice}: {e}");
            assert!(e.message.contains(why), "{choice}: {e}");
        }
        let ranges: Vec<String> = (0..65).map(|i| format!("\"10.0.0.{i}\"")).collect();
        let e = err(&format!(
            r#"{{"allowChoice":{{"sourceRanges":[{}]}}}}"#,
            ranges.join(",")
        ));
        assert_eq!(e.field, "allowChoice.sourceRanges");
        let values: Vec<String> = (0..17).map(|i| format!("\"v{i}\"")).collect();
        let e = err(&format!(
            r#"{{"allowChoice":{{"header":"x-ab","headerValues":[{}]}}}}"#,
            values.join(",")
        ));
        assert_eq!(e.field, "allowChoice.headerValues");
        let long = "v".repeat(257);
        assert_eq!(
            err(&format!(
                r#"{{"allowChoice":{{"header":"x-ab","headerValues":["{long}"]}}}}"#
            ))
            .field,
            "allowChoice.headerValues[0]"
        );

        let plan = parse(br#"{"allowChoice":{"sourceRanges":["10.0.0.0/8"," ::1 "],"header":"X-AB-Tester","headerValues":[" team-a "]}}"#).unwrap();
        let choice = plan.choice().unwrap();
        assert_eq!(choice.header(), Some("x-ab-tester"));
        assert!(choice.allows_header_value(b"team-a"));
        assert!(choice.allows_source(b"[::1]:5"));
        assert!(
            plan.describe()
                .ends_with(", allowChoice from 10.0.0.0/8, ::1/128 or with header x-ab-tester"),
            "{}",
            plan.describe()
        );
        assert!(parse(b"{}").unwrap().choice().is_none());
    }

    #[test]
    fn sidecar_settings_are_checked() {
        let plan = parse(
            br#"{"sidecar":{"cluster":"outbound|18090||kvab.llm-d-vllm.svc.cluster.local"}}"#,
        )
        .unwrap();
        let sidecar = plan.sidecar().unwrap();
        assert_eq!(sidecar.authority, "kvab.llm-d-vllm.svc.cluster.local:18090");
        assert_eq!(
            (
                sidecar.refresh_ms,
                sidecar.timeout_ms,
                sidecar.stale_after_ms
            ),
            (1000, 500, 10_000)
        );
        assert_eq!(plan.on_unavailable(), Unavailable::Reject);
        let plan = parse(br#"{"sidecar":{"cluster":"kvab_sidecar","refreshMs":200}}"#).unwrap();
        assert_eq!(plan.sidecar().unwrap().authority, "kvab_sidecar");
        let plan =
            parse(br#"{"sidecar":{"cluster":"c","reportToken":"0123456789abcdef"}}"#).unwrap();
        assert_eq!(
            plan.sidecar().unwrap().report_token.as_deref(),
            Some("0123456789abcdef")
        );
        for (json, field) in [
            (r#"{"sidecar":{}}"#, "sidecar"),
            (r#"{"sidecar":{"cluster":""}}"#, "sidecar.cluster"),
            (r#"{"sidecar":{"cluster":"a b"}}"#, "sidecar.cluster"),
            (
                r#"{"sidecar":{"cluster":"c","refreshMs":50}}"#,
                "sidecar.refreshMs",
            ),
            (
                r#"{"sidecar":{"cluster":"c","timeoutMs":2000}}"#,
                "sidecar.timeoutMs",
            ),
            (
                r#"{"sidecar":{"cluster":"c","staleAfterMs":2500}}"#,
                "sidecar.staleAfterMs",
            ),
            (
                r#"{"sidecar":{"cluster":"c","authority":"a b"}}"#,
                "sidecar.authority",
            ),
            (
                r#"{"sidecar":{"cluster":"c","url":"http://x"}}"#,
                "sidecar.url",
            ),
            (r#"{"onUnavailable":"wait"}"#, "onUnavailable"),
            (
                r#"{"sidecar":{"cluster":"c","reportToken":"short"}}"#,
                "sidecar.reportToken",
            ),
            (
                r#"{"sidecar":{"cluster":"c","reportToken":"has a space in it, 123"}}"#,
                "sidecar.reportToken",
            ),
        ] {
            assert_eq!(err(json).field, field, "{json}");
        }
    }

    #[test]
    fn display_names_the_field() {
        let e = err(r#"{"arms":[]}"#);
        assert_eq!(e.to_string(), "arms: at least one arm is required");
    }
}
