//! The filter's link to the sidecar: two worker VMs sharing one store, driven by arbitrary ticks,
//! clock steps, answers and records, against the sidecar's ledger. See `check_link`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kvab_fuzz::check_link(data));
