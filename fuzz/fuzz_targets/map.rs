//! The endpoint map the filter fetches from kvab serve: arbitrary bytes never panic, and an
//! accepted map answers consistently.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvab_fuzz::check_map(data);
});
