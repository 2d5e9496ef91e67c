//! Reading the request header map in the proxy-wasm wire form, without copying it.
//!
//! The host hands over all headers as one buffer: `u32 count`, then `count` pairs of
//! `u32 key_len, u32 value_len`, then each key and value followed by a NUL byte (all little
//! endian). Reading the whole map in one host call is what lets the filter see a repeated header:
//! a single-header lookup returns only the first occurrence.

use crate::plan::{Plan, Reading};

/// Iterator over `(name, value)` pairs of a serialized header map. A truncated or inconsistent
/// buffer ends the iteration early rather than failing.
pub struct HeaderPairs<'a> {
    sizes: &'a [u8],
    data: &'a [u8],
    remaining: u32,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([
        *b.first()?,
        *b.get(1)?,
        *b.get(2)?,
        *b.get(3)?,
    ]))
}

impl<'a> HeaderPairs<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        let empty = HeaderPairs {
            sizes: &[],
            data: &[],
            remaining: 0,
        };
        let Some(count) = read_u32(buf, 0) else {
            return empty;
        };
        let Some(sizes_end) = (count as usize)
            .checked_mul(8)
            .and_then(|n| n.checked_add(4))
        else {
            return empty;
        };
        match (buf.get(4..sizes_end), buf.get(sizes_end..)) {
            (Some(sizes), Some(data)) => HeaderPairs {
                sizes,
                data,
                remaining: count,
            },
            _ => empty,
        }
    }
}

impl<'a> Iterator for HeaderPairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let key_len = read_u32(self.sizes, 0)? as usize;
        let value_len = read_u32(self.sizes, 4)? as usize;
        let key = self.data.get(..key_len)?;
        let value_start = key_len.checked_add(1)?;
        let value_end = value_start.checked_add(value_len)?;
        let value = self.data.get(value_start..value_end)?;
        self.data = self.data.get(value_end.checked_add(1)?..)?;
        self.sizes = self.sizes.get(8..)?;
        self.remaining -= 1;
        Some((key, value))
    }
}

/// What the filter needs from the request headers, gathered in one pass.
#[derive(Debug, Default)]
pub struct RequestScan<'a> {
    pub reading: Reading,
    /// Value of the split key header (first occurrence).
    pub split_key: Option<&'a [u8]>,
    /// The client sent one of our tag headers (`-source`, `-endpoint`); it must be stripped.
    pub forged_tags: bool,
    /// The `allowChoice` header arrived with an accepted value.
    pub choice_header: bool,
}

impl RequestScan<'_> {
    /// Whether this request may choose its arm. `source` yields Envoy's `source.address`; it is
    /// called only when the answer depends on it: a policy with source ranges is configured, the
    /// request names an arm, and the policy header did not already grant the choice. Without a
    /// policy this is one comparison.
    pub fn may_choose<S: AsRef<[u8]>>(
        &self,
        plan: &Plan,
        source: impl FnOnce() -> Option<S>,
    ) -> bool {
        let Some(policy) = plan.choice() else {
            return true;
        };
        if !self.reading.chooses() || self.choice_header {
            return true;
        }
        policy.has_ranges() && source().is_some_and(|a| policy.allows_source(a.as_ref()))
    }
}

/// Scans a serialized request header map for the arm header, the split key and forged tags.
pub fn scan_request_headers<'a>(plan: &Plan, map: &'a [u8]) -> RequestScan<'a> {
    let key_header = plan.split().and_then(|s| s.key_header()).map(str::as_bytes);
    let choice = plan.choice();
    let choice_header = choice.and_then(|c| c.header()).map(str::as_bytes);
    let mut scan = RequestScan::default();
    for (name, value) in HeaderPairs::new(map) {
        if name == plan.header().as_bytes() {
            plan.read(&mut scan.reading, value);
        } else if name == plan.source_header().as_bytes()
            || name == plan.endpoint_header().as_bytes()
        {
            scan.forged_tags = true;
        } else {
            if Some(name) == key_header && scan.split_key.is_none() {
                scan.split_key = Some(value);
            }
            if Some(name) == choice_header && !scan.choice_header {
                scan.choice_header = choice.is_some_and(|c| c.allows_header_value(value));
            }
        }
    }
    scan
}

/// Serializes header pairs in the proxy-wasm wire form (for tests and fuzzing).
pub fn serialize_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::plan::{ArmId, Decision, Rejection, Source};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn pairs_round_trip() {
        let pairs: [(&[u8], &[u8]); 3] = [
            (b":path", b"/v1"),
            (b"x-kv-backend", b""),
            (b"a", b"\xff\x00z"),
        ];
        let buf = serialize_pairs(&pairs);
        assert_eq!(HeaderPairs::new(&buf).collect::<Vec<_>>(), pairs);
    }

    #[test]
    fn malformed_buffers_end_early_without_panicking() {
        let buf = serialize_pairs(&[(b"k1", b"v1"), (b"k2", b"v2")]);
        for cut in 0..buf.len() {
            let n = HeaderPairs::new(&buf[..cut]).count();
            assert!(n <= 2);
        }
        // A count far larger than the buffer.
        let mut lying = buf.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs::new(&lying).count(), 0);
        // A pair length pointing past the end.
        let mut long = buf;
        long[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(HeaderPairs::new(&long).count(), 0);
    }

    #[test]
    fn scan_reads_every_occurrence_the_key_and_forged_tags() {
        let plan = parse(
            br#"{"onMissing":"split","split":{"weights":{"fs":1},"keyHeader":"x-session-id"}}"#,
        )
        .unwrap();
        let map = serialize_pairs(&[
            (b"x-kv-backend", b"nvlink"),
            (b"x-session-id", b"s-1"),
            (b"x-kv-backend", b"fs"),
            (b"x-session-id", b"s-2"),
        ]);
        let scan = scan_request_headers(&plan, &map);
        assert_eq!(scan.split_key, Some(&b"s-1"[..]));
        assert!(!scan.forged_tags);
        let verdict = plan.decide(&scan.reading, scan.split_key, || 0);
        assert_eq!(
            verdict.decision,
            Decision::Reject(Rejection::AmbiguousBackend)
        );

        let map = serialize_pairs(&[
            (b"x-kv-backend-source", b"header"),
            (b"x-kv-backend", b"P2P"),
        ]);
        let scan = scan_request_headers(&plan, &map);
        assert!(scan.forged_tags);
        let verdict = plan.decide(&scan.reading, scan.split_key, || 0);
        assert_eq!(
            verdict.decision,
            Decision::Tag {
                arm: ArmId(0),
                source: Source::Alias
            }
        );
        let map = serialize_pairs(&[(b"x-kv-backend-endpoint", b"1.2.3.4:80")]);
        assert!(scan_request_headers(&plan, &map).forged_tags);
    }

    /// The policy costs nothing unless configured, and the source address is read only when
    /// the answer depends on it.
    #[test]
    fn may_choose_reads_the_source_only_when_needed() {
        let no_source = || -> Option<&[u8]> { panic!("source address read") };
        let chooses = serialize_pairs(&[(b"x-kv-backend", b"nvlink")]);
        let blank = serialize_pairs(&[(b"x-kv-backend", b" ")]);

        let open = parse(b"{}").unwrap();
        assert!(scan_request_headers(&open, &chooses).may_choose(&open, no_source));

        let p = parse(
            br#"{"allowChoice":{"sourceRanges":["10.0.0.0/8"],"header":"x-ab","headerValues":["yes"]}}"#,
        )
        .unwrap();
        // Nothing chosen, or the header grants it: no need for the address.
        assert!(scan_request_headers(&p, &blank).may_choose(&p, no_source));
        assert!(scan_request_headers(&p, &serialize_pairs(&[])).may_choose(&p, no_source));
        let granted = serialize_pairs(&[
            (b"x-ab", b"no"),
            (b"x-kv-backend", b"fs"),
            (b"x-ab", b" yes "),
        ]);
        let scan = scan_request_headers(&p, &granted);
        assert!(scan.choice_header);
        assert!(scan.may_choose(&p, no_source));
        // Otherwise the source decides.
        let denied = serialize_pairs(&[(b"x-ab", b"YES"), (b"x-kv-backend", b"fs")]);
        let scan = scan_request_headers(&p, &denied);
        assert!(!scan.choice_header);
        assert!(scan.may_choose(&p, || Some(b"10.9.8.7:4000")));
        assert!(!scan.may_choose(&p, || Some(b"11.0.0.1:4000")));
        assert!(!scan.may_choose(&p, || None::<&[u8]>));
        assert!(!scan.may_choose(&p, || Some(b"garbage")));

        // Header only: the source is never read.
        let h = parse(br#"{"allowChoice":{"header":"x-ab"}}"#).unwrap();
        assert!(!scan_request_headers(&h, &chooses).may_choose(&h, no_source));
        let with = serialize_pairs(&[(b"x-kv-backend", b"fs"), (b"x-ab", b"1")]);
        assert!(scan_request_headers(&h, &with).may_choose(&h, no_source));
        let empty = serialize_pairs(&[(b"x-kv-backend", b"fs"), (b"x-ab", b"")]);
        assert!(!scan_request_headers(&h, &empty).may_choose(&h, no_source));
    }

    /// The choice header may also be the split key header; both are read.
    #[test]
    fn the_choice_header_can_double_as_the_split_key() {
        let p = parse(
            br#"{"allowChoice":{"header":"x-user"},"onMissing":"split","split":{"weights":{"fs":1},"keyHeader":"x-user"}}"#,
        )
        .unwrap();
        let map = serialize_pairs(&[(b"x-user", b"u1"), (b"x-kv-backend", b"nvlink")]);
        let scan = scan_request_headers(&p, &map);
        assert!(scan.choice_header);
        assert_eq!(scan.split_key, Some(&b"u1"[..]));
    }
}
