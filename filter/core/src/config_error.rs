//! The error a refused configuration is reported with (a leaf: it imports nothing).

use std::fmt;

/// A configuration error, naming the field it is about (`arms[1].aliases[0]`, `split.weights.fs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

/// Field paths and messages quote the input (unknown keys, bad names); control characters in it
/// are written escaped (`\n`, `\u{1b}`), so a refusal is always one printable log line.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.field.is_empty() {
            write_printable(f, &self.field)?;
            f.write_str(": ")?;
        }
        write_printable(f, &self.message)
    }
}

fn write_printable(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    for c in s.chars() {
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            fmt::Write::write_char(f, c)?;
        }
    }
    Ok(())
}

impl std::error::Error for ConfigError {}
