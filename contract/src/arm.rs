//! Arm names: one grammar for the filter's configuration, `kvab serve`'s configuration and every CLI.
//!
//! An arm name travels unchanged through HTTPRoute header matches, pod label selectors, the endpoint map,
//! reports and Prometheus labels, all of which compare exactly. So no part may change a name (lowercase
//! it, trim it): a name one part would change is refused everywhere, with the same message.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::report::RESERVED_ARM_NAMES;

/// Longest arm name (it ends up in metric labels and header values).
pub const MAX_ARM_NAME_LEN: usize = 32;

/// The grammar, as every refusal states it.
pub const ARM_NAME_RULE: &str = "an arm name is 1 to 32 characters of a-z, 0-9, '.', '_', '-', \
starting and ending with a letter or digit (a label value Kubernetes and Prometheus keep as is), \
and not \"none\" or \"unknown\"";

/// The same grammar as a regular expression (the JSON Schemas use it; the reserved names are checked apart).
pub const ARM_NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9._-]{0,30}[a-z0-9])?$";

/// At most this many characters of a refused name are quoted back.
const MAX_QUOTED_CHARS: usize = 64;

/// A valid arm name: see [`ARM_NAME_RULE`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ArmName(String);

impl ArmName {
    /// Checks `name` against the grammar; it is never changed (no lowercasing, no trimming).
    pub fn parse(name: &str) -> Result<ArmName, ArmNameError> {
        problem(name).map_or_else(
            || Ok(ArmName(name.to_owned())),
            |problem| Err(ArmNameError::new(name, problem)),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn problem(name: &str) -> Option<Problem> {
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() {
        Some(Problem::Empty)
    } else if let Some(c) = name.chars().find(|c| c.is_ascii_uppercase()) {
        Some(Problem::Uppercase(c))
    } else if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)))
    {
        Some(Problem::Character(c))
    } else if name.len() > MAX_ARM_NAME_LEN {
        Some(Problem::TooLong(name.len()))
    } else if !edge_ok(bytes.first()) || !edge_ok(bytes.last()) {
        Some(Problem::Edge)
    } else if RESERVED_ARM_NAMES.contains(&name) {
        Some(Problem::Reserved)
    } else {
        None
    }
}

impl fmt::Display for ArmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ArmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ArmName {
    type Error = ArmNameError;

    fn try_from(name: String) -> Result<ArmName, ArmNameError> {
        match problem(&name) {
            None => Ok(ArmName(name)),
            Some(problem) => Err(ArmNameError::new(&name, problem)),
        }
    }
}

impl From<ArmName> for String {
    fn from(name: ArmName) -> String {
        name.0
    }
}

impl PartialEq<str> for ArmName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ArmName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Why a name is not an [`ArmName`]. Its message quotes the name (at most 64 characters of it, control
/// characters escaped: one printable line) and states [`ARM_NAME_RULE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmNameError {
    /// The refused name, cut to 64 characters.
    name: String,
    cut: bool,
    problem: Problem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    Empty,
    Uppercase(char),
    Character(char),
    TooLong(usize),
    Edge,
    Reserved,
}

impl ArmNameError {
    fn new(name: &str, problem: Problem) -> ArmNameError {
        let cut = name.chars().count() > MAX_QUOTED_CHARS;
        ArmNameError {
            name: name.chars().take(MAX_QUOTED_CHARS).collect(),
            cut,
            problem,
        }
    }
}

impl fmt::Display for ArmNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problem == Problem::Empty {
            return write!(f, "empty arm name: {ARM_NAME_RULE}");
        }
        // Quoted with control characters and quotes escaped; a cut name shows where it was cut.
        let cut = if self.cut { "..." } else { "" };
        write!(f, "arm name \"{}{cut}\"", self.name.escape_debug())?;
        match self.problem {
            Problem::Empty => Ok(()),
            Problem::Uppercase(c) => write!(
                f,
                " has the uppercase letter {c:?} (refused, never lowercased): {ARM_NAME_RULE}"
            ),
            Problem::Character(c) => write!(f, " has the character {c:?}: {ARM_NAME_RULE}"),
            Problem::TooLong(len) => write!(f, " is {len} characters long: {ARM_NAME_RULE}"),
            Problem::Edge => write!(
                f,
                " must start and end with a letter or digit: {ARM_NAME_RULE}"
            ),
            Problem::Reserved => write!(
                f,
                " is reserved: the counters use it for untagged or unmapped traffic"
            ),
        }
    }
}

impl std::error::Error for ArmNameError {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refusal(name: &str) -> String {
        ArmName::parse(name).unwrap_err().to_string()
    }

    #[test]
    fn valid_names_are_kept_as_written() {
        let longest = "a".repeat(MAX_ARM_NAME_LEN);
        for name in [
            "nvlink",
            "fs",
            "a",
            "7",
            "lm-cache.v1_2",
            "0a",
            longest.as_str(),
        ] {
            let arm = ArmName::parse(name).unwrap();
            assert_eq!(arm.as_str(), name);
            assert_eq!(arm.to_string(), name);
        }
    }

    #[test]
    fn uppercase_is_refused_not_lowercased() {
        let e = refusal("NVLink");
        assert_eq!(
            e,
            format!(
                "arm name \"NVLink\" has the uppercase letter 'N' (refused, never lowercased): {ARM_NAME_RULE}"
            )
        );
        assert!(ArmName::parse("nvLink").is_err());
    }

    #[test]
    fn every_refusal_names_the_arm_and_the_rule() {
        let long = "a".repeat(MAX_ARM_NAME_LEN + 1);
        for (name, problem) in [
            (long.as_str(), "is 33 characters long"),
            ("-a", "must start and end with a letter or digit"),
            ("a-", "must start and end with a letter or digit"),
            (".", "must start and end with a letter or digit"),
            ("_x_", "must start and end with a letter or digit"),
            ("nv link", "has the character ' '"),
            (" fs", "has the character ' '"),
            ("a;b", "has the character ';'"),
            ("a/b", "has the character '/'"),
            ("nvlinké", "has the character 'é'"),
            ("ａ", "has the character 'ａ'"),
            ("a\nb", "has the character '\\n'"),
        ] {
            let e = refusal(name);
            assert!(e.contains(problem), "{name:?}: {e}");
            assert!(e.ends_with(ARM_NAME_RULE), "{name:?}: {e}");
            assert!(!e.contains('\n'), "{name:?}: {e}");
        }
        assert_eq!(refusal(""), format!("empty arm name: {ARM_NAME_RULE}"));
    }

    #[test]
    fn reserved_names_are_refused() {
        for name in RESERVED_ARM_NAMES {
            assert!(refusal(name).contains("is reserved"), "{name}");
        }
        assert!(ArmName::parse("nones").is_ok());
    }

    #[test]
    fn a_huge_name_is_quoted_cut() {
        let e = refusal(&"b".repeat(10_000));
        assert!(e.len() < 400, "{e}");
        assert!(e.contains(&format!("\"{}...\"", "b".repeat(64))), "{e}");
    }

    #[test]
    fn serde_validates() {
        let arm: ArmName = serde_json::from_str("\"fs\"").unwrap();
        assert_eq!(arm, "fs");
        assert_eq!(serde_json::to_string(&arm).unwrap(), "\"fs\"");
        let e = serde_json::from_str::<ArmName>("\"NVLink\"").unwrap_err();
        assert!(e.to_string().contains("arm name \"NVLink\""), "{e}");
    }
}
