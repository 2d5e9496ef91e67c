//! The host calls the filter makes, each returning a `Result`.
//!
//! The few proxy-wasm imports the filter uses, declared here with the status read as a plain
//! integer: every host answer is an ordinary value, never a panic (a panic traps the VM, and every
//! later request on that worker would get a 503).

use std::ptr::{null, null_mut};

use kvab_filter_core::headers::serialize_pairs;
use kvab_filter_core::link::SharedValue;

/// A non-OK status returned by the host (proxy-wasm ABI 0.2.1 numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Headers {
    Request = 0,
    Response = 2,
    /// Of the answer to an `http_call`.
    CallResponse = 6,
}

#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Level {
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

#[derive(Clone, Copy)]
#[repr(u32)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

const HTTP_CALL_RESPONSE_BODY: u32 = 4;
/// An empty header map in the wire form (a zero count): the trailers of every call.
const NO_PAIRS: [u8; 4] = [0; 4];
const PLUGIN_CONFIGURATION: u32 = 7;

extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
}

// The host's random source. Envoy provides it to every module (proxy-wasm-cpp-host
// src/exports.cc, `wasi_unstable_random_get`, filled by BoringSSL's RAND_bytes).
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, buf_len: usize) -> u32;
}

fn status(code: u32) -> Result<(), HostError> {
    if code == OK {
        Ok(())
    } else {
        Err(HostError(code))
    }
}

/// Takes ownership of a buffer the host allocated through `proxy_on_memory_allocate`
/// (a boxed `[u8]` of exactly `size` bytes), so it is freed when dropped.
fn owned(data: *mut u8, size: usize) -> Box<[u8]> {
    if data.is_null() {
        return Box::default();
    }
    // SAFETY: `data` was returned by `proxy_on_memory_allocate(size)`, which leaks a
    // `Box<[MaybeUninit<u8>]>` of that length; the host has initialized all `size` bytes.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(data, size)) }
}

/// Calls a host function that returns a host-allocated buffer; `NotFound` is `None`.
fn fetch(
    call: impl FnOnce(*mut *mut u8, *mut usize) -> u32,
) -> Result<Option<Box<[u8]>>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match call(&mut data, &mut size) {
        OK => Ok(Some(owned(data, size))),
        NOT_FOUND => Ok(None),
        code => Err(HostError(code)),
    }
}

pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length describe a live string.
    // Nothing useful can be done if logging itself fails.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Wall-clock time in nanoseconds (the only clock ABI 0.2.1 offers); 0 if unavailable.
pub fn now_nanos() -> u64 {
    let mut t: u64 = 0;
    // SAFETY: `t` outlives the call.
    match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
        OK => t,
        _ => 0,
    }
}

/// 64 bits from the host's random source; the WASI errno when it fails.
pub fn random_u64() -> Result<u64, HostError> {
    let mut bytes = [0u8; 8];
    // SAFETY: `bytes` is a live buffer of the given length for the duration of the call.
    status(unsafe { random_get(bytes.as_mut_ptr(), bytes.len()) })?;
    Ok(u64::from_le_bytes(bytes))
}

pub fn plugin_configuration() -> Result<Option<Box<[u8]>>, HostError> {
    // SAFETY: out-pointers are valid for the duration of the call.
    fetch(|d, s| unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, d, s) })
}

/// All headers of a map in the serialized wire form (see `kvab_filter_core::headers`).
pub fn header_pairs(map: Headers) -> Result<Option<Box<[u8]>>, HostError> {
    // SAFETY: out-pointers are valid for the duration of the call.
    fetch(|d, s| unsafe { proxy_get_header_map_pairs(map as u32, d, s) })
}

/// Sets a header, replacing every existing occurrence.
pub fn replace_header(map: Headers, name: &str, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointers and lengths describe live buffers.
    status(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

pub fn remove_header(map: Headers, name: &str) -> Result<(), HostError> {
    // SAFETY: pointer and length describe a live string.
    status(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// Reads an Envoy attribute; `path` is the NUL-separated attribute path, e.g. `b"upstream\0address"`.
pub fn property(path: &[u8]) -> Result<Option<Box<[u8]>>, HostError> {
    // SAFETY: pointer and length describe a live buffer; out-pointers are valid for the call.
    fetch(|d, s| unsafe { proxy_get_property(path.as_ptr(), path.len(), d, s) })
}

/// Answers the request locally. `headers` is a serialized header map.
pub fn send_local_response(
    status_code: u32,
    details: &str,
    body: &[u8],
    headers: &[u8],
) -> Result<(), HostError> {
    let body_ptr = if body.is_empty() {
        null()
    } else {
        body.as_ptr()
    };
    // SAFETY: pointers and lengths describe live buffers.
    status(unsafe {
        proxy_send_local_response(
            status_code,
            details.as_ptr(),
            details.len(),
            body_ptr,
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

pub fn define_metric(kind: MetricKind, name: &str) -> Result<u32, HostError> {
    let mut id: u32 = 0;
    // SAFETY: pointer and length describe a live string; `id` outlives the call.
    status(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), HostError> {
    // SAFETY: plain values.
    status(unsafe { proxy_increment_metric(id, offset) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), HostError> {
    // SAFETY: plain values.
    status(unsafe { proxy_record_metric(id, value) })
}

pub fn set_tick_period_ms(period: u32) -> Result<(), HostError> {
    // SAFETY: plain value.
    status(unsafe { proxy_set_tick_period_milliseconds(period) })
}

/// Sends an HTTP request to an Envoy cluster; the answer arrives in `on_http_call_response`
/// with the returned token. An unknown cluster is `BadArgument` (2).
pub fn http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, HostError> {
    let headers: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
        .collect();
    let headers = serialize_pairs(&headers);
    let timeout_ms = u32::try_from(timeout_ms).unwrap_or(u32::MAX);
    let mut token: u32 = 0;
    // SAFETY: pointers and lengths describe live buffers; the out-pointer is valid for the call.
    status(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            NO_PAIRS.as_ptr(),
            NO_PAIRS.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

pub fn http_call_response_body(size: usize) -> Result<Option<Box<[u8]>>, HostError> {
    // SAFETY: out-pointers are valid for the duration of the call.
    fetch(|d, s| unsafe { proxy_get_buffer_bytes(HTTP_CALL_RESPONSE_BODY, 0, size, d, s) })
}

/// A value shared by every worker VM of this plugin, with its compare-and-swap token.
pub fn shared_data(key: &str) -> Result<Option<SharedValue>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: pointer and length describe a live string; out-pointers are valid for the call.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) }
    {
        OK => Ok(Some(SharedValue {
            value: owned(data, size),
            cas,
        })),
        NOT_FOUND => Ok(None),
        code => Err(HostError(code)),
    }
}

/// Writes a shared value; with `cas` other than 0 only if nobody wrote since it was read
/// (`CAS_MISMATCH` otherwise).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), HostError> {
    // SAFETY: pointers and lengths describe live buffers.
    status(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}
