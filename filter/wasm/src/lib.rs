//! kvab proxy-wasm HTTP filter: the host glue around `kvab_filter_core`.
//!
//! `abi` owns every host call; `root` parses the configuration once per VM; `http` runs one
//! request. The decisions themselves live in the core crate.
#![deny(clippy::indexing_slicing)]

mod abi;
mod http;
mod link;
mod root;
mod worker;

proxy_wasm::main! {{
    // A panic would trap the VM; leave one critical log line naming where, for the operator.
    std::panic::set_hook(Box::new(|info| {
        abi::log(abi::Level::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}}
