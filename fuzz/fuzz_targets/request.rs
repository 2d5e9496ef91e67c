//! One request through the filter's decision logic: header map parsing, normalization of the arm
//! header, and assignment, against an independent model of the documented behaviour.
//!
//! Input: the first byte picks one of the configurations below; the next 8 bytes are the random
//! draw for a key-less split; the rest is either (first byte odd) a raw proxy-wasm header map
//! buffer, or (even) header lines `name: value` separated by `\n`, values arbitrary bytes.
#![no_main]

use kvab_fuzz::{check_request, Request, PLANS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let plan = &PLANS[usize::from(selector >> 1) % PLANS.len()];
    let (draw, rest) = rest.split_at(rest.len().min(8));
    let mut draw_bytes = [0u8; 8];
    draw_bytes[..draw.len()].copy_from_slice(draw);
    let request = if selector & 1 == 1 {
        Request::Raw(rest)
    } else {
        Request::lines(rest)
    };
    check_request(plan, &request, u64::from_le_bytes(draw_bytes));
});
