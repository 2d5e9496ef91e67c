//! Step 1, direct backend sanity, and the arm identification it rests on: a completion's `id` carries the
//! KV transfer path, `cmpl-___prefill_addr_<prefill>___decode_addr_<decode>_<uuid>` (the vLLM P/D proxies'
//! request id), so the id names the prefill and decode pods that served it.

use super::options::Arm;
use super::report::{Check, Outcome};
use kvab_serve::client::Exchange;

const PREFILL_MARK: &str = "___prefill_addr_";
const DECODE_MARK: &str = "___decode_addr_";

/// The (prefill, decode) pair of an id, when it has the P/D markers.
pub fn id_path(id: &str) -> Option<(&str, &str)> {
    let start = id.find(PREFILL_MARK)? + PREFILL_MARK.len();
    let rest = &id[start..];
    let split = rest.find(DECODE_MARK)?;
    let after = &rest[split + DECODE_MARK.len()..];
    // The request's own id follows the last underscore.
    let decode = after.rsplit_once('_').map_or(after, |(decode, _)| decode);
    Some((&rest[..split], decode))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The id names this arm's prefill and decode pods.
    ThisArm,
    /// The id names another arm's pods.
    OtherArm(String),
    /// The id has a path naming nobody configured: (prefill, decode).
    Unknown(String, String),
    /// No P/D path in the id (or no id).
    NoPath,
    /// The arm has no configured names to compare with.
    NotConfigured,
}

fn names(arm: &Arm, prefill: &str, decode: &str) -> bool {
    arm.prefill.as_deref() == Some(prefill) && arm.decode.as_deref() == Some(decode)
}

/// Which arm the completion id says served it, judged for `arm`.
pub fn identify(id: Option<&str>, arm: &Arm, arms: &[Arm]) -> Identity {
    if arm.prefill.is_none() || arm.decode.is_none() {
        return Identity::NotConfigured;
    }
    let Some((prefill, decode)) = id.and_then(id_path) else {
        return Identity::NoPath;
    };
    if names(arm, prefill, decode) {
        return Identity::ThisArm;
    }
    match arms.iter().find(|a| names(a, prefill, decode)) {
        Some(other) => Identity::OtherArm(other.name.clone()),
        None => Identity::Unknown(prefill.to_string(), decode.to_string()),
    }
}

pub fn completion_id(exchange: &Exchange) -> Option<String> {
    exchange.json()?.get("id")?.as_str().map(str::to_string)
}

/// Judges the direct completion sent to one arm's proxy.
pub fn judge(arm: &Arm, arms: &[Arm], url: &str, outcome: &Result<Exchange, String>) -> Check {
    let name = format!("step1/direct-{}", arm.name);
    let expected = match (&arm.prefill, &arm.decode) {
        (Some(p), Some(d)) => format!("200; id path names {p} and {d}"),
        _ => "200 (no id path configured: --id-path)".to_string(),
    };
    let exchange = match outcome {
        Ok(e) => e,
        Err(e) => {
            return Check::new(&name, expected, format!("{url}: {e}"), Outcome::Fail).diagnosis(format!(
                "the {} proxy is down or unreachable: check `kubectl get pods -n llm-d-vllm` and the proxy's logs",
                arm.name
            ))
        }
    };
    let id = completion_id(exchange);
    let shown = id.clone().unwrap_or_else(|| "no id".into());
    let measured = format!("{} from {url}; id {shown}", exchange.status);
    if exchange.status != 200 {
        return Check::new(&name, expected, measured, Outcome::Fail).diagnosis(format!(
            "the {} proxy does not serve /v1/completions directly: check its prefill/decode pods and its logs",
            arm.name
        ));
    }
    match identify(id.as_deref(), arm, arms) {
        Identity::ThisArm => Check::new(&name, expected, measured, Outcome::Pass),
        Identity::NotConfigured => Check::new(&name, expected, measured, Outcome::Inconclusive)
            .diagnosis(format!("give the pods of {} with --id-path to identify its completions", arm.name)),
        Identity::OtherArm(other) => Check::new(&name, expected, measured, Outcome::Fail).diagnosis(format!(
            "the {} proxy transfers KV through {other}'s prefill/decode pods: its KV connector or its \
             prefill/decode targets are wired to the wrong backend",
            arm.name
        )),
        Identity::Unknown(p, d) => Check::new(&name, expected, measured, Outcome::Fail).diagnosis(format!(
            "the id names prefill {p} and decode {d}, which are not {}'s: fix the proxy's targets or --id-path",
            arm.name
        )),
        Identity::NoPath => Check::new(&name, expected, measured, Outcome::Fail).diagnosis(
            "the completion id has no ___prefill_addr_…___decode_addr_… path: the proxy is not the P/D proxy \
             the runbook expects",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::options::Options;

    #[test]
    fn id_paths_of_the_runbook() {
        assert_eq!(
            id_path("cmpl-___prefill_addr_vllm-prefill-p2p:14579___decode_addr_vllm-decode-p2p:14579_3f2a9c"),
            Some(("vllm-prefill-p2p:14579", "vllm-decode-p2p:14579"))
        );
        assert_eq!(
            id_path(
                "chatcmpl-___prefill_addr_vllm-prefill-fs___decode_addr_vllm-decode-fs_0d9e-11"
            ),
            Some(("vllm-prefill-fs", "vllm-decode-fs"))
        );
        assert_eq!(id_path("cmpl-8c1f"), None);
    }

    #[test]
    fn identification_tells_this_arm_another_arm_and_strangers_apart() {
        let arms = Options::default().arms;
        let (nvlink, fs) = (&arms[0], &arms[1]);
        let fs_id = "cmpl-___prefill_addr_vllm-prefill-fs___decode_addr_vllm-decode-fs_1";
        assert_eq!(identify(Some(fs_id), fs, &arms), Identity::ThisArm);
        assert_eq!(
            identify(Some(fs_id), nvlink, &arms),
            Identity::OtherArm("fs".into())
        );
        // A prefix of the right name is not the right name.
        let longer = "cmpl-___prefill_addr_vllm-prefill-fs-2___decode_addr_vllm-decode-fs_1";
        assert!(matches!(
            identify(Some(longer), fs, &arms),
            Identity::Unknown(..)
        ));
        assert_eq!(identify(Some("cmpl-1"), fs, &arms), Identity::NoPath);
        assert_eq!(identify(None, fs, &arms), Identity::NoPath);
    }
}
