//! Label selectors and label keys as the Kubernetes API server parses them, checked when the
//! configuration or the flags are read: a typo then fails at start with the reason, instead of
//! every list and watch being refused (400) while kvab retries forever.
//!
//! Grammar (apimachinery `labels.Parse`): requirements separated by commas, each `key`, `!key`,
//! `key=value`, `key==value`, `key!=value`, `key in (v1,v2)`, `key notin (v1,v2)`, `key>N` or
//! `key<N`. The empty selector selects everything.

/// Checks a label selector; the error names the requirement and what is wrong with it.
pub fn validate(selector: &str) -> Result<(), String> {
    if selector.trim().is_empty() {
        return Ok(());
    }
    for requirement in split_requirements(selector)? {
        check_requirement(requirement.trim())
            .map_err(|e| format!("{:?}: {e}", requirement.trim()))?;
    }
    Ok(())
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of at most 63 characters.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if !is_dns_subdomain(prefix) {
            return Err(format!(
                "key {key:?}: prefix {prefix:?} is not a DNS subdomain (lowercase alphanumerics, '-' and '.', at most 253 characters)"
            ));
        }
    }
    if !is_label_value(name) {
        return Err(format!(
            "key {key:?}: name {name:?} must be 1 to 63 characters: alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

/// Splits at the commas outside parentheses.
fn split_requirements(selector: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' at byte {i}"))?;
            }
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&selector[start..]);
    Ok(parts)
}

fn check_requirement(requirement: &str) -> Result<(), String> {
    if requirement.is_empty() {
        return Err("empty requirement (two commas in a row, or a comma at an end)".into());
    }
    if let Some(key) = requirement.strip_prefix('!') {
        return validate_key(key.trim());
    }
    if let Some(open) = requirement.find('(') {
        let (head, values) = requirement.split_at(open);
        let mut words = head.split_whitespace();
        let (Some(key), Some(operator), None) = (words.next(), words.next(), words.next()) else {
            return Err("expected `key in (values)` or `key notin (values)`".into());
        };
        if operator != "in" && operator != "notin" {
            return Err(format!(
                "unknown operator {operator:?} (set operators are `in` and `notin`)"
            ));
        }
        validate_key(key)?;
        let Some(inner) = values
            .strip_prefix('(')
            .and_then(|v| v.trim_end().strip_suffix(')'))
        else {
            return Err("nothing may follow the closing ')'".into());
        };
        if inner.trim().is_empty() {
            return Err(format!("`{operator}` needs at least one value"));
        }
        return inner.split(',').try_for_each(|v| check_value(v.trim()));
    }
    let Some(at) = requirement.find(['!', '=', '<', '>']) else {
        return validate_key(requirement);
    };
    let rest = &requirement[at..];
    let operator = ["!=", "==", "=", "<", ">"]
        .into_iter()
        .find(|op| rest.starts_with(op))
        .ok_or_else(|| format!("unknown operator at {rest:?}"))?;
    validate_key(requirement[..at].trim())?;
    let value = rest[operator.len()..].trim();
    if operator == "<" || operator == ">" {
        return value
            .parse::<i64>()
            .map(|_| ())
            .map_err(|_| format!("`{operator}` compares with an integer, not {value:?}"));
    }
    check_value(value)
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_value(value) {
        Ok(())
    } else {
        Err(format!(
            "value {value:?} must be at most 63 characters: alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ))
    }
}

/// A non-empty label value: at most 63 characters, alphanumerics, `-`, `_`, `.`, alphanumeric at
/// both ends (also the grammar of a key's name part).
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    value.len() <= 63
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

fn is_dns_subdomain(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 253
        && prefix.split('.').all(|part| {
            let bytes = part.as_bytes();
            let edge_ok =
                |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            part.len() <= 63
                && edge_ok(bytes.first())
                && edge_ok(bytes.last())
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn selectors_the_api_server_accepts_are_accepted() {
        for ok in [
            "",
            "role=proxy",
            "role==proxy",
            "role!=decode",
            "llm-d.ai/kv-backend",
            "!llm-d.ai/kv-backend",
            "role=proxy,llm-d.ai/kv-backend in (nvlink, fs)",
            "tier notin (a,b) , app.kubernetes.io/name=vllm",
            "gpu>3",
            "role=",
            "  role = proxy  ",
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn syntax_errors_name_the_requirement_and_the_problem() {
        for (bad, says) in [
            ("role=proxy,", "empty requirement"),
            ("role=pro xy", "value \"pro xy\""),
            ("role in (a,b", "unbalanced '('"),
            ("role in a,b)", "unbalanced ')'"),
            ("role within (a)", "unknown operator \"within\""),
            ("role in ()", "needs at least one value"),
            ("Role_/x=1", "prefix \"Role_\""),
            ("-role=proxy", "name \"-role\""),
            ("gpu>three", "compares with an integer"),
            ("role=proxy-", "value \"proxy-\""),
            ("role in (a) x", "nothing may follow"),
        ] {
            let e = validate(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn label_keys() {
        assert_eq!(validate_key("llm-d.ai/kv-backend"), Ok(()));
        assert!(validate_key("llm-d.ai/").is_err());
        assert!(validate_key(&"a".repeat(64)).is_err());
    }
}
