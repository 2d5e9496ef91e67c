//! Envoy's entry points into the module (proxy-wasm ABI 0.2.1): each `proxy_on_*` export finds its
//! context and hands it the call.
//!
//! Only the callbacks the filter implements are exported: Envoy's host checks for an export before
//! entering the VM (proxy-wasm-cpp-host `ContextBase::onDone`, `onRequestBody`, ...: without the
//! export it answers the default itself), and each entry costs instructions (BENCHMARKS.md).
//! `proxy_on_vm_start` and `proxy_on_done` are left out too: their defaults (`true`) are what the
//! filter would answer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use crate::abi::{self, Level};
use crate::http::{Action, RequestContext};
use crate::root;
use crate::worker::Worker;

/// Context ids are small consecutive integers: one multiplication spreads them over the hash
/// table's buckets and control bits (a hash of the id's bytes would cost more than the lookup).
#[derive(Default)]
struct ContextIdHasher(u64);

impl Hasher for ContextIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(GOLDEN_RATIO);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(GOLDEN_RATIO);
    }
}

const GOLDEN_RATIO: u64 = 0x9E37_79B9_7F4A_7C15;

/// A plugin configuration in this VM: several plugins with the same module and VM settings
/// share one VM, each under a root context of its own.
struct Root {
    id: u32,
    worker: Option<Rc<Worker>>,
}

#[derive(Default)]
struct Contexts {
    roots: Vec<Root>,
    /// Held inline: no allocation per request beyond the table's own growth.
    requests: HashMap<u32, RequestContext, BuildHasherDefault<ContextIdHasher>>,
}

impl Contexts {
    fn worker(&self, root_id: u32) -> Option<Rc<Worker>> {
        self.roots
            .iter()
            .find(|root| root.id == root_id)
            .and_then(|root| root.worker.clone())
    }
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = RefCell::default();
}

/// Runs `f` on the request context `id`; `default` when there is none, or when the table is in
/// use (a callback entered while another runs: Envoy defers its own, so this does not happen,
/// and skipping beats trapping the VM).
fn with_request<R>(id: u32, default: R, f: impl FnOnce(&mut RequestContext) -> R) -> R {
    CONTEXTS.with(|contexts| match contexts.try_borrow_mut() {
        Ok(mut contexts) => contexts.requests.get_mut(&id).map_or(default, f),
        Err(_) => default,
    })
}

/// The worker of root context `id`, taken out of the table so that what it does (host calls
/// that may answer at once) runs with the table free.
fn root_worker(id: u32) -> Option<Rc<Worker>> {
    CONTEXTS.with(|contexts| contexts.try_borrow().ok()?.worker(id))
}

extern "C" {
    /// wasi-libc's static constructors, which a reactor module runs once at start.
    fn __wasm_call_ctors();
}

#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: called once, by the host, before any other export.
    unsafe { __wasm_call_ctors() };
    // A panic would trap the VM; leave one critical log line naming where, for the operator.
    std::panic::set_hook(Box::new(|info| {
        abi::log(Level::Critical, &format!("panic: {info}"));
    }));
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Where the host places the data a host call returns; `abi` takes it back as a `Box<[u8]>` of
/// exactly `size` bytes.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    Box::into_raw(Box::<[u8]>::new_uninit_slice(size)).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, root_context_id: u32) {
    CONTEXTS.with(|contexts| {
        let Ok(mut contexts) = contexts.try_borrow_mut() else {
            return;
        };
        if root_context_id == 0 {
            contexts.roots.push(Root {
                id: context_id,
                worker: None,
            });
        } else {
            // Without a worker (configuration refused) Envoy does not run the filter; a
            // pass-through context answers should it ask anyway.
            let worker = contexts.worker(root_context_id);
            contexts
                .requests
                .insert(context_id, RequestContext::new(worker));
        }
    });
}

/// Returning false makes Envoy refuse the configuration (startup fails, an xDS update is
/// rejected), so a bad config never reaches the request path.
#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, _configuration_size: usize) -> bool {
    let Some(worker) = root::configure(context_id) else {
        return false;
    };
    CONTEXTS.with(|contexts| {
        let Ok(mut contexts) = contexts.try_borrow_mut() else {
            return false;
        };
        match contexts.roots.iter_mut().find(|root| root.id == context_id) {
            Some(root) => {
                root.worker = Some(Rc::new(worker));
                true
            }
            None => false,
        }
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    if let Some(worker) = root_worker(context_id) {
        root::tick(&worker);
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    context_id: u32,
    token: u32,
    _headers: usize,
    body_size: usize,
    _trailers: usize,
) {
    if let Some(worker) = root_worker(context_id) {
        root::on_http_call_response(&worker, token, body_size);
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _headers: usize,
    _end_of_stream: bool,
) -> Action {
    with_request(context_id, Action::Continue, |request| {
        request.on_request_headers()
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _headers: usize,
    end_of_stream: bool,
) -> Action {
    with_request(context_id, Action::Continue, |request| {
        request.on_response_headers(end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: bool,
) -> Action {
    with_request(context_id, Action::Continue, |request| {
        request.on_response_body(body_size, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    with_request(context_id, (), RequestContext::on_log);
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    CONTEXTS.with(|contexts| {
        if let Ok(mut contexts) = contexts.try_borrow_mut() {
            if contexts.requests.remove(&context_id).is_none() {
                contexts.roots.retain(|root| root.id != context_id);
            }
        }
    });
}
