//! What the tools' flags take, shared by `kvab check`, `kvab experiment` and `kvab analyze`: the value
//! parsers (clap names the flag and the value in front of each message) and the documents a flag names.

use std::fmt;
use std::time::Duration;

use kvab_contract::ArmName;
use kvab_judge::sequential::Boundary;
use kvab_judge::sweep::Slo;
use serde_json::Value;

/// A Service and the port to forward to, from `NAME[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub port: u16,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

pub const MODEL: &str = "Qwen/Qwen3-Coder-30B-A3B-Instruct";

/// Port of the local stack from its environment variable, else the public default.
pub fn local_port(variable: &str, default: u16) -> u16 {
    std::env::var(variable)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn local_url(variable: &str, default: u16) -> String {
    format!("http://127.0.0.1:{}", local_port(variable, default))
}

pub fn http_url(value: &str) -> Result<String, String> {
    if value.starts_with("http://") && value.len() > "http://".len() {
        Ok(value.trim_end_matches('/').to_string())
    } else {
        Err("not an http:// URL".into())
    }
}

/// An arm name as the filter and `kvab serve` take it: an [`ArmName`], as written (never lowercased or
/// trimmed); a bad one is a usage error naming the arm and the rule.
pub fn arm_name(value: &str) -> Result<String, String> {
    ArmName::parse(value)
        .map(ArmName::into_string)
        .map_err(|e| e.to_string())
}

pub fn header_name(value: &str) -> Result<String, String> {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    {
        Ok(value.to_ascii_lowercase())
    } else {
        Err("not an HTTP header name (letters, digits, - and _)".into())
    }
}

pub fn absolute_path(value: &str) -> Result<String, String> {
    if value.starts_with('/') {
        Ok(value.to_string())
    } else {
        Err("must start with /".into())
    }
}

pub fn seconds(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| "must be seconds, more than 0 and at most 3600".into())
}

/// A boundary of the looks (`kvab_judge::sequential::Boundary`) by its name.
pub fn boundary(value: &str) -> Result<Boundary, String> {
    Boundary::parse(value).ok_or_else(|| {
        let names: Vec<&str> = Boundary::ALL.iter().map(|b| b.name()).collect();
        format!("must be one of {}", names.join(", "))
    })
}

pub fn fraction(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| "must be a number from 0 to 1".into())
}

/// `NAME` or `NAME:PORT`.
pub fn service(value: &str, default_port: u16) -> Result<ServiceRef, String> {
    let (name, port) = match value.split_once(':') {
        None => (value, default_port),
        Some((name, port)) => match port.parse::<u16>() {
            Ok(port) if port > 0 => (name, port),
            _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
        },
    };
    if name.is_empty() {
        return Err("empty Service name".into());
    }
    Ok(ServiceRef {
        name: name.to_string(),
        port,
    })
}

/// Parses a YAML (or JSON) document into a JSON value.
pub fn parse_document(text: &str) -> Result<Value, String> {
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| e.to_string().lines().next().unwrap_or("").to_string())
}

pub fn zipf(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| (0.0..=4.0).contains(s))
        .ok_or_else(|| "must be a number from 0 to 4".into())
}

pub fn slo(value: &str) -> Result<Slo, String> {
    Slo::parse(value)
}

pub fn rate(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|r| *r > 0.0 && *r <= 100_000.0)
        .ok_or_else(|| "must be requests per second, more than 0 and at most 100000".into())
}

pub fn open_fraction(value: &str) -> Result<f64, String> {
    fraction(value).and_then(|f| {
        if f > 0.0 && f < 1.0 {
            Ok(f)
        } else {
            Err("must be more than 0 and less than 1".into())
        }
    })
}

pub fn long_seconds(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= 7.0 * 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| "must be seconds, more than 0 and at most 604800 (a week)".into())
}

/// Seconds from 0 to 3600.
pub fn think_time(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| (0.0..=3600.0).contains(s))
        .ok_or_else(|| "must be seconds, from 0 to 3600".into())
}
