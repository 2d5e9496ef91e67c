//! The optional `allowChoice` policy: who may choose an arm with the arm header. Without it every
//! request may (the runbook's setup). With it, only requests from the configured source ranges,
//! or carrying the configured header (with one of the configured values), may; the arm header of
//! any other request is ignored and the request is assigned as if it had none (`onMissing`).

use std::net::{IpAddr, SocketAddr};

/// One CIDR range, kept as a 128-bit network and mask (IPv4 in its own family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    v4: bool,
    network: u128,
    mask: u128,
    prefix: u32,
}

/// Bounds the per-request scan and the configuration.
pub const MAX_RANGES: usize = 64;
pub const MAX_HEADER_VALUES: usize = 16;
pub const MAX_HEADER_VALUE_LEN: usize = 256;

impl IpRange {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a single host). Host bits must be zero,
    /// so that a typo (`10.1.0.0/8`) is refused rather than silently widened.
    pub fn parse(text: &str) -> Result<IpRange, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("\"{text}\" is not an IP address or CIDR range"))?;
        let (v4, bits, value) = match ip {
            IpAddr::V4(a) => (true, 32u32, u128::from(u32::from(a))),
            IpAddr::V6(a) => (false, 128u32, u128::from(a)),
        };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u32>() {
                Ok(n)
                    if n <= bits
                        && !p.is_empty()
                        && p.len() <= 3
                        && p.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    n
                }
                _ => return Err(format!("\"{text}\": the prefix length must be 0 to {bits}")),
            },
        };
        let host_bits = bits - prefix;
        let family_mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        let mask = family_mask
            .checked_shr(host_bits)
            .and_then(|m| m.checked_shl(host_bits))
            .unwrap_or(0);
        if value & !mask != 0 {
            return Err(format!(
                "\"{text}\" has host bits set; the range starts at {}/{prefix}",
                network_text(v4, value & mask)
            ));
        }
        Ok(IpRange {
            v4,
            network: value,
            mask,
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v4, value) = match ip {
            IpAddr::V4(a) => (true, u128::from(u32::from(a))),
            // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a4) => (true, u128::from(u32::from(a4))),
                None => (false, u128::from(a)),
            },
        };
        v4 == self.v4 && value & self.mask == self.network
    }
}

fn network_text(v4: bool, value: u128) -> String {
    if v4 {
        std::net::Ipv4Addr::from(u32::try_from(value).unwrap_or(0)).to_string()
    } else {
        std::net::Ipv6Addr::from(value).to_string()
    }
}

/// Envoy's `source.address` attribute: `ip:port`, `[ipv6]:port`, or a bare address. Anything
/// else (a pipe, garbage) is no address.
pub fn parse_source_address(bytes: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(bytes).ok()?;
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    text.parse::<IpAddr>().ok()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoicePolicy {
    ranges: Vec<IpRange>,
    header: Option<String>,
    /// Accepted values of `header` (exact bytes, blanks around ignored); empty: any non-empty value.
    values: Vec<Box<[u8]>>,
}

impl ChoicePolicy {
    pub(crate) fn new(ranges: Vec<IpRange>, header: Option<String>, values: Vec<String>) -> Self {
        ChoicePolicy {
            ranges,
            header,
            values: values
                .into_iter()
                .map(|v| v.into_bytes().into_boxed_slice())
                .collect(),
        }
    }

    /// The header that lets a request choose, if configured.
    pub fn header(&self) -> Option<&str> {
        self.header.as_deref()
    }

    pub fn has_ranges(&self) -> bool {
        !self.ranges.is_empty()
    }

    /// Whether one occurrence of the policy header grants the choice.
    pub fn allows_header_value(&self, value: &[u8]) -> bool {
        let value = crate::field::trim_ows(value);
        if self.values.is_empty() {
            !value.is_empty()
        } else {
            self.values.iter().any(|v| **v == *value)
        }
    }

    /// Whether a source address (Envoy's `source.address`) is in one of the ranges.
    pub fn allows_source(&self, address: &[u8]) -> bool {
        parse_source_address(address).is_some_and(|ip| self.ranges.iter().any(|r| r.contains(ip)))
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.ranges.is_empty() {
            let ranges: Vec<String> = self
                .ranges
                .iter()
                .map(|r| format!("{}/{}", network_text(r.v4, r.network), r.prefix))
                .collect();
            parts.push(format!("from {}", ranges.join(", ")));
        }
        if let Some(h) = &self.header {
            parts.push(format!("with header {h}"));
        }
        parts.join(" or ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_contain_their_addresses_only() {
        let r = IpRange::parse("10.0.0.0/8").unwrap();
        assert!(r.contains(ip("10.0.0.0")));
        assert!(r.contains(ip("10.255.255.255")));
        assert!(!r.contains(ip("11.0.0.0")));
        assert!(!r.contains(ip("9.255.255.255")));
        // IPv4 clients of a dual-stack listener, and no IPv6 address otherwise.
        assert!(r.contains(ip("::ffff:10.1.2.3")));
        assert!(!r.contains(ip("::a01:203")));
        assert!(!r.contains(ip("10::")));

        let host = IpRange::parse(" 192.168.1.7 ").unwrap();
        assert!(host.contains(ip("192.168.1.7")));
        assert!(!host.contains(ip("192.168.1.8")));

        let v6 = IpRange::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::")));
        assert!(!v6.contains(ip("32.1.13.184")));

        let all4 = IpRange::parse("0.0.0.0/0").unwrap();
        assert!(all4.contains(ip("255.255.255.255")) && !all4.contains(ip("::1")));
        let all6 = IpRange::parse("::/0").unwrap();
        assert!(all6.contains(ip("::1")) && !all6.contains(ip("1.2.3.4")));
        assert!(IpRange::parse("::1/128").unwrap().contains(ip("::1")));
    }

    #[test]
    fn bad_ranges_are_refused_with_a_reason() {
        for (text, why) in [
            ("10.0.0.0/33", "prefix length must be 0 to 32"),
            ("::/129", "prefix length must be 0 to 128"),
            ("10.0.0.0/", "prefix length"),
            ("10.0.0.0/+8", "prefix length"),
            ("10.0.0.0/-1", "prefix length"),
            ("10.0.0.0/0008", "prefix length"),
            (
                "10.1.0.0/8",
                "host bits set; the range starts at 10.0.0.0/8",
            ),
            ("2001:db8::1/32", "the range starts at 2001:db8::/32"),
            ("10.0.0", "not an IP address"),
            ("localhost", "not an IP address"),
            ("", "not an IP address"),
            ("10.0.0.0/8/8", "prefix length"),
        ] {
            let e = IpRange::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn source_addresses_as_envoy_writes_them() {
        assert_eq!(
            parse_source_address(b"127.0.0.1:54321"),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(parse_source_address(b"[::1]:80"), Some(ip("::1")));
        assert_eq!(parse_source_address(b"10.0.0.1"), Some(ip("10.0.0.1")));
        for bad in [
            &b""[..],
            b"/tmp/sock",
            b"\xff\xfe",
            b"10.0.0.1:",
            b"[::1]",
            b"1.2.3.4:99999",
        ] {
            assert_eq!(parse_source_address(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_values_match_exactly() {
        let open = ChoicePolicy::new(vec![], Some("x-ab".into()), vec![]);
        assert!(open.allows_header_value(b"anything"));
        assert!(!open.allows_header_value(b" \t"));
        let p = ChoicePolicy::new(
            vec![],
            Some("x-ab".into()),
            vec!["Team-A".into(), "b c".into()],
        );
        assert!(p.allows_header_value(b"Team-A"));
        assert!(p.allows_header_value(b" Team-A\t"));
        assert!(p.allows_header_value(b"b c"));
        assert!(!p.allows_header_value(b"team-a"));
        assert!(!p.allows_header_value(b"Team-A,Team-A"));
        assert!(!p.allows_header_value(b""));
        assert!(
            !p.allows_source(b"127.0.0.1:1"),
            "no ranges: no address allowed"
        );
    }
}
