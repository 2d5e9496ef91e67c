//! Weighted assignment of requests that arrive without an arm (`onMissing: split`).
//!
//! With a key (e.g. `x-session-id`) the arm is a pure function of the key, so a session stays on
//! one arm across requests, workers and Envoy restarts. Without a key, the caller supplies a
//! random draw. Both map a 64-bit value onto the cumulative weights with a multiply-shift, which
//! has no modulo bias worth measuring for weights up to 1e6.

use crate::arm::ArmId;
use crate::field::trim_ows;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// `(arm, cumulative upper bound)`, ascending; the last bound is the weight total.
    bounds: Vec<(ArmId, u64)>,
    total: u64,
    key_header: Option<String>,
}

impl Split {
    pub(crate) fn new(weights: Vec<(ArmId, u32)>, key_header: Option<String>) -> Self {
        let mut total = 0u64;
        let bounds = weights
            .into_iter()
            .map(|(arm, w)| {
                total += u64::from(w);
                (arm, total)
            })
            .collect();
        Split {
            bounds,
            total,
            key_header,
        }
    }

    /// The header whose value pins a request to an arm, if configured.
    pub fn key_header(&self) -> Option<&str> {
        self.key_header.as_deref()
    }

    /// Arm for a 64-bit draw (a key hash or a random number).
    pub fn pick(&self, draw: u64) -> ArmId {
        let point = ((u128::from(draw) * u128::from(self.total)) >> 64) as u64;
        self.bounds
            .iter()
            .find(|(_, upper)| point < *upper)
            .or(self.bounds.last())
            .map_or(ArmId(0), |(arm, _)| *arm)
    }

    /// Arm for a session key: stable for the same key bytes (surrounding spaces and tabs
    /// ignored, as documented; other bytes are part of the key).
    pub fn pick_for_key(&self, key: &[u8]) -> ArmId {
        self.pick(key_hash(trim_ows(key)))
    }

    /// The configured weights, for reports and tests: `(arm, weight)`.
    pub fn weights(&self) -> impl Iterator<Item = (ArmId, u64)> + '_ {
        let mut previous = 0;
        self.bounds.iter().map(move |&(arm, upper)| {
            let w = upper - previous;
            previous = upper;
            (arm, w)
        })
    }
}

/// FNV-1a 64 of the key, finished with the SplitMix64 mixer so that the high bits (which the
/// multiply-shift uses) depend on every input byte. Part of the public contract: changing it
/// moves sessions between arms.
pub fn key_hash(key: &[u8]) -> u64 {
    mix64(kvab_contract::fnv1a_64(key))
}

/// SplitMix64 finalizer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast generator for key-less split draws (one per worker VM; not for security).
#[derive(Debug, Clone)]
pub struct Draws {
    state: u64,
}

impl Draws {
    pub fn seeded(seed: u64) -> Self {
        Draws { state: seed }
    }

    /// SplitMix64 step.
    pub fn next_draw(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn split(weights: &[(usize, u32)]) -> Split {
        Split::new(weights.iter().map(|&(a, w)| (ArmId(a), w)).collect(), None)
    }

    #[test]
    fn draw_extremes_map_to_first_and_last_arm() {
        let s = split(&[(0, 1), (1, 3)]);
        assert_eq!(s.pick(0), ArmId(0));
        assert_eq!(s.pick(u64::MAX), ArmId(1));
        // The first quarter of the draw space belongs to the weight-1 arm.
        assert_eq!(s.pick(u64::MAX / 4 - 1), ArmId(0));
        assert_eq!(s.pick(u64::MAX / 4 + 1), ArmId(1));
    }

    #[test]
    fn weights_are_reported_back() {
        let s = split(&[(1, 70), (0, 30)]);
        assert_eq!(
            s.weights().collect::<Vec<_>>(),
            [(ArmId(1), 70), (ArmId(0), 30)]
        );
    }

    #[test]
    fn key_hash_is_the_documented_function() {
        // Known values pin the contract: a change here moves sessions between arms.
        assert_eq!(key_hash(b""), mix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(key_hash(b"session-42"), 0x666a_2654_7240_5471);
        assert_ne!(key_hash(b"session-42"), key_hash(b"session-43"));
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
    }

    #[test]
    fn keys_are_sticky_and_blanks_do_not_matter() {
        let s = split(&[(0, 1), (1, 1)]);
        for i in 0..200 {
            let key = format!("user-{i}");
            let arm = s.pick_for_key(key.as_bytes());
            assert_eq!(s.pick_for_key(format!("  {key}\t").as_bytes()), arm);
        }
    }

    /// The documented contract (docs/filter.md): only surrounding spaces and tabs are ignored. Other bytes that
    /// `trim_ascii` would drop (CR, LF, form feed) are part of the key.
    #[test]
    fn only_blanks_around_a_key_are_ignored() {
        let s = split(&[(0, 1), (1, 1), (2, 1), (3, 1)]);
        for i in 0..100 {
            for key in [format!("k{i}\x0c"), format!("\rk{i}"), format!("k{i}\n")] {
                assert_eq!(
                    s.pick_for_key(key.as_bytes()),
                    s.pick(key_hash(key.as_bytes())),
                    "{key:?}"
                );
            }
            let key = format!("k{i}");
            assert_eq!(
                s.pick_for_key(format!(" \t{key} ").as_bytes()),
                s.pick(key_hash(key.as_bytes()))
            );
        }
    }

    #[test]
    fn keyed_and_random_draws_follow_the_weights() {
        // 20,000 draws at 1:3; the count of arm 0 is binomial(n, 0.25): sd ≈ 61, allow 5 sd.
        let s = split(&[(0, 1), (1, 3)]);
        let n = 20_000u32;
        let mut draws = Draws::seeded(7);
        let random = (0..n)
            .filter(|_| s.pick(draws.next_draw()) == ArmId(0))
            .count();
        let keyed = (0..n)
            .filter(|i| s.pick_for_key(format!("k{i}").as_bytes()) == ArmId(0))
            .count();
        for count in [random, keyed] {
            assert!((4_695..=5_305).contains(&count), "arm 0 got {count} of {n}");
        }
    }
}
