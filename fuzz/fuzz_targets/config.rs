//! The plugin configuration parser: arbitrary bytes never panic; an accepted configuration keeps
//! the invariants the request path relies on; a refusal is one printable log line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvab_fuzz::check_config(data);
});
