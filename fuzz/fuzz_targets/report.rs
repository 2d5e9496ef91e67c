//! The routing reports between filter and sidecar: arbitrary bytes posted to `/v1/reports` (first
//! byte even), or a stream of requests tallied by the filter and reported to the sidecar's ledger
//! (first byte odd). See `check_report` and `check_report_round_trip`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        kvab_fuzz::check_report(rest);
    } else {
        kvab_fuzz::check_report_round_trip(rest);
    }
});
