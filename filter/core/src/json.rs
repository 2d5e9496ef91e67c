//! Typed reads from a parsed JSON object that name the field on every error
//! (`arms[1].aliases[0]`, `split.weights.fs`) and refuse unknown fields.
//!
//! Reading through `serde_json::Value` with these few helpers, instead of derived deserializers
//! plus a path-tracking wrapper, keeps the `.wasm` small: one generic JSON parser serves the
//! plugin configuration and the endpoint map alike.

use serde_json::{Map, Value};

use crate::config_error::ConfigError;

pub fn error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// What a value is, in serde's words, for "invalid type" messages.
fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

/// The fields of one JSON object at `path`; [`Fields::finish`] refuses the ones nobody read.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: String,
    known: &'static [&'static str],
}

impl<'a> Fields<'a> {
    /// `known`: every field name this object may have (for the unknown-field check).
    pub fn new(
        value: &'a Value,
        path: &str,
        known: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        match value {
            Value::Object(map) => Ok(Fields {
                map,
                path: path.to_owned(),
                known,
            }),
            other => Err(error(
                path,
                format!("invalid type: {}, expected an object", kind(other)),
            )),
        }
    }

    /// The path of a field of this object.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        self.get(key)
            .map(|v| string(v, &self.path_of(key)))
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(error(
                self.path_of(key),
                format!("invalid type: {}, expected a boolean", kind(other)),
            )),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|v| unsigned(v, &self.path_of(key), u64::MAX))
            .transpose()
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(error(
                self.path_of(key),
                format!("invalid type: {}, expected a sequence", kind(other)),
            )),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let path = self.path_of(key);
        Ok(self
            .array(key)?
            .map(|items| {
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| string(v, &format!("{path}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default())
    }

    /// One of `variants` (a string), e.g. a policy name.
    pub fn variant(
        &self,
        key: &str,
        variants: &'static [&'static str],
    ) -> Result<Option<&'static str>, ConfigError> {
        let Some(value) = self.string(key)? else {
            return Ok(None);
        };
        match variants.iter().find(|v| **v == value) {
            Some(v) => Ok(Some(*v)),
            None => Err(error(
                self.path_of(key),
                format!(
                    "unknown variant `{value}`, expected one of {}",
                    quoted(variants)
                ),
            )),
        }
    }

    /// Refuses any field not in `known`.
    pub fn finish(&self) -> Result<(), ConfigError> {
        match self.map.keys().find(|k| !self.known.contains(&k.as_str())) {
            None => Ok(()),
            Some(unknown) => Err(error(
                self.path_of(unknown),
                format!(
                    "unknown field `{unknown}`, expected one of {}",
                    quoted(self.known)
                ),
            )),
        }
    }
}

/// Appends `s` as a JSON string literal (for the few documents the filter writes itself).
pub fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn string(value: &Value, path: &str) -> Result<String, ConfigError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(error(
            path,
            format!("invalid type: {}, expected a string", kind(other)),
        )),
    }
}

/// A whole number from 0 to `max`.
pub fn unsigned(value: &Value, path: &str, max: u64) -> Result<u64, ConfigError> {
    let expected = format!("expected a whole number from 0 to {max}");
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(v) if v <= max => Ok(v),
            _ if n.is_f64() => Err(error(
                path,
                format!("invalid type: floating point `{n}`, {expected}"),
            )),
            _ => Err(error(
                path,
                format!("invalid value: integer `{n}`, {expected}"),
            )),
        },
        other => Err(error(
            path,
            format!("invalid type: {}, {expected}", kind(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let v: Value =
            serde_json::from_str(r#"{"a":{"n":-1,"f":1.5,"s":3,"l":["x",2],"p":"maybe","z":1}}"#)
                .unwrap();
        let top = Fields::new(&v, "", &["a"]).unwrap();
        top.finish().unwrap();
        let a = Fields::new(
            top.get("a").unwrap(),
            &top.path_of("a"),
            &["n", "f", "s", "l", "p"],
        )
        .unwrap();
        let e = a.u64("n").unwrap_err();
        assert_eq!(
            (
                e.field.as_str(),
                e.message.starts_with("invalid value: integer `-1`")
            ),
            ("a.n", true)
        );
        assert!(a
            .u64("f")
            .unwrap_err()
            .message
            .starts_with("invalid type: floating point `1.5`"));
        assert_eq!(
            a.string("s").unwrap_err().message,
            "invalid type: integer `3`, expected a string"
        );
        assert_eq!(a.strings("l").unwrap_err().field, "a.l[1]");
        assert_eq!(
            a.bool("s").unwrap_err().message,
            "invalid type: integer `3`, expected a boolean"
        );
        assert_eq!(a.bool("missing").unwrap(), None);
        let e = a.variant("p", &["yes", "no"]).unwrap_err();
        assert_eq!(
            e.message,
            "unknown variant `maybe`, expected one of `yes`, `no`"
        );
        let e = a.finish().unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.starts_with("unknown field `z`")),
            ("a.z", true)
        );
        assert_eq!(
            unsigned(
                &serde_json::json!(4_294_967_296u64),
                "w",
                u64::from(u32::MAX)
            )
            .unwrap_err()
            .message,
            "invalid value: integer `4294967296`, expected a whole number from 0 to 4294967295"
        );
        assert!(Fields::new(&serde_json::json!([]), "x", &[]).is_err());
    }
}
