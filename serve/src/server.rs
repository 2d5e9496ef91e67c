//! The listeners: HTTP/1.1 only, with the limits a server on a shared network needs. warp's own
//! server has none of them (no header or idle timeout, no connection cap, HTTP/2 on by default), so
//! kvab runs warp's routes on hyper's HTTP/1 connection builder itself.
//!
//! - a client must send a request's headers within [`Limits::header_read_timeout`], including the
//!   next request on a kept-alive connection, so idle connections close after that long;
//! - a report body must arrive within [`BODY_READ_TIMEOUT`] (see `reports`);
//! - at most [`Limits::max_connections`] are served at once. When one more arrives at the cap, the
//!   connection that has been idle longest (no request in flight: between requests, or still sending
//!   its headers) is closed to admit it; only when every connection has a request in flight does it
//!   wait for one to end (and the ones behind it in the kernel's accept queue);
//! - a request target that is not a path (authority form `host:port`, asterisk form `*` other than
//!   `OPTIONS *`) is answered 400 before routing; absolute form (`http://host/path`) is routed by its
//!   path, as RFC 9112 §3.2.2 asks of a server;
//! - a panic while answering a request answers 500 (`internal`) and a panic while serving a
//!   connection closes that connection; both are counted (`kvab_http_panics_total`) and the process
//!   goes on (`fence.rs`);
//! - one shutdown signal closes the listener and lets open requests finish.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use warp::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use warp::Reply;

use crate::fence;
use crate::state::{lock, State};

/// How long a connection waiting at the cap waits for the one asked to close before asking the next.
const EVICTION_RETRY: Duration = Duration::from_millis(100);

/// Time for a report body to arrive whole.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One listener's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time for a client to send a request's headers, and the idle keep-alive time.
    pub header_read_timeout: Duration,
}

/// The API listener (`listen`).
pub const API: Limits = Limits {
    max_connections: 1024,
    header_read_timeout: Duration::from_secs(10),
};

/// The probe listener (`health_listen`): kubelet opens a connection per probe and sends at once.
pub const PROBES: Limits = Limits {
    max_connections: 64,
    header_read_timeout: Duration::from_secs(5),
};

type WarpResponse = warp::reply::Response;

/// A listener's routes as one type (`http::routes`, `http::probe_routes`).
pub type Routes = warp::filters::BoxedFilter<(Response<Bytes>,)>;

/// Serves `routes` on `listener` (named `name` in logs and metrics) until `shutdown` resolves, then waits
/// for open requests.
pub async fn run(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    routes: Routes,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let table = Arc::new(Table::default());
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    'accept: loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    log::warn!("cannot accept a connection on {name}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            // At the cap with a connection waiting: close the longest-idle one, then wait for a slot (its,
            // or any other). Only this one accepted connection waits beyond the cap.
            Err(_) => loop {
                if table.evict_longest_idle() {
                    state
                        .metrics
                        .http_connections_evicted
                        .with_label_values(&[name])
                        .inc();
                }
                tokio::select! {
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => break permit,
                        Err(_) => break 'accept,
                    },
                    // The one asked may have started a request meanwhile; ask the next.
                    () = tokio::time::sleep(EVICTION_RETRY) => continue,
                    () = &mut shutdown => break 'accept,
                }
            },
        };
        let (id, evict) = table.open();
        let service = Guarded {
            inner: TowerToHyperService::new(warp::service(routes.clone())),
            table: table.clone(),
            id,
            state: state.clone(),
        };
        let (table, state, mut closing) = (table.clone(), state.clone(), closing_rx.clone());
        tokio::spawn(async move {
            let served = fence::fenced(serve_connection(
                stream,
                limits,
                service,
                &table,
                id,
                &evict,
                &mut closing,
            ))
            .await;
            if served.is_err() {
                log::error!("a connection on {name} panicked; it is closed, the server goes on");
                state
                    .metrics
                    .http_panics
                    .with_label_values(&["connection"])
                    .inc();
            }
            table.close(id);
            drop(permit);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection gives its permit back when it ends.
    let _ = permits.acquire_many(limits.max_connections as u32).await;
}

async fn serve_connection<S>(
    stream: tokio::net::TcpStream,
    limits: Limits,
    service: Guarded<S>,
    table: &Table,
    id: u64,
    evict: &Notify,
    closing: &mut watch::Receiver<bool>,
) where
    S: hyper::service::Service<Request<Incoming>, Response = WarpResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = evict.notified() => {
                // Nothing polls the connection here, so no request can start between this check and the drop.
                if table.may_close(id) {
                    log::debug!("closing an idle connection at the connection cap");
                    return;
                }
            }
            () = closed(closing) => {
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            }
        }
    };
    // Timeouts and clients that go away end up here; they are not the server's errors.
    if let Err(e) = result {
        log::debug!("connection closed: {e}");
    }
}

/// Resolves when the listener closes (or its sender is gone).
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await.map(|_| ());
}

/// The open connections and since when each has had no request in flight.
#[derive(Default)]
struct Table {
    inner: Mutex<TableInner>,
}

#[derive(Default)]
struct TableInner {
    next_id: u64,
    open: HashMap<u64, Slot>,
}

struct Slot {
    /// `None` while a request is in flight.
    idle_since: Option<Instant>,
    /// Asked to close and not yet declined: not asked again.
    asked: bool,
    evict: Arc<Notify>,
}

impl Table {
    fn open(&self) -> (u64, Arc<Notify>) {
        let mut inner = lock(&self.inner);
        let id = inner.next_id;
        inner.next_id = inner.next_id.wrapping_add(1);
        let evict = Arc::new(Notify::new());
        inner.open.insert(
            id,
            Slot {
                idle_since: Some(Instant::now()),
                asked: false,
                evict: evict.clone(),
            },
        );
        (id, evict)
    }

    fn close(&self, id: u64) {
        lock(&self.inner).open.remove(&id);
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(slot) = lock(&self.inner).open.get_mut(&id) {
            slot.idle_since = if busy { None } else { Some(Instant::now()) };
        }
    }

    /// Whether the connection may be closed now; when it may not (a request started since it was asked),
    /// it can be asked again later.
    fn may_close(&self, id: u64) -> bool {
        let mut inner = lock(&self.inner);
        let Some(slot) = inner.open.get_mut(&id) else {
            return true;
        };
        slot.asked = slot.idle_since.is_some();
        slot.asked
    }

    /// Asks the connection idle the longest to close; false when every connection has a request in flight.
    fn evict_longest_idle(&self) -> bool {
        let mut inner = lock(&self.inner);
        let longest = inner
            .open
            .values_mut()
            .filter(|slot| !slot.asked)
            .filter_map(|slot| slot.idle_since.map(|since| (since, slot)))
            .min_by_key(|(since, _)| *since);
        match longest {
            Some((_, slot)) => {
                slot.asked = true;
                slot.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// warp's routes behind the request-target check, the panic fence and the connection's busy mark.
struct Guarded<S> {
    /// warp's service for the listener's routes.
    inner: S,
    table: Arc<Table>,
    id: u64,
    state: Arc<State>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Guarded<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = WarpResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = WarpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<WarpResponse, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        if let Some(refusal) = refuse_target(request.method(), request.uri()) {
            count(&self.state, "other", refusal.status());
            return Box::pin(std::future::ready(Ok(refusal.into_response())));
        }
        self.table.set_busy(self.id, true);
        let answer = fence::call(|| self.inner.call(request));
        let (table, id, state) = (self.table.clone(), self.id, self.state.clone());
        Box::pin(async move {
            let answer = match answer {
                Ok(future) => fence::fenced(future).await,
                Err(panicked) => Err(panicked),
            };
            table.set_busy(id, false);
            Ok(match answer {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(fence::Panicked) => {
                    log::error!("a request handler panicked; answered 500, the server goes on");
                    state
                        .metrics
                        .http_panics
                        .with_label_values(&["request"])
                        .inc();
                    let response = crate::answer::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "the request could not be answered; the server logged why",
                    );
                    count(&state, "other", response.status());
                    response.into_response()
                }
            })
        })
    }
}

fn count(state: &State, route: &str, status: StatusCode) {
    state
        .metrics
        .http_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
}

/// The answer to a request target that names no path (RFC 9112 §3.2): authority form (`host:port`, a
/// proxy's CONNECT target), asterisk form other than `OPTIONS *`, or anything else that does not start
/// with `/`. `None`: origin form, absolute form, or `OPTIONS *` (answered here with what the server allows).
pub fn refuse_target(method: &Method, uri: &warp::http::Uri) -> Option<Response<Bytes>> {
    let path = uri.path_and_query().map(|p| p.path());
    match path {
        Some(path) if path.starts_with('/') => None,
        Some("*") if method == Method::OPTIONS => {
            let mut response = Response::new(Bytes::new());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            Some(response)
        }
        Some("*") => Some(crate::answer::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_target",
            &format!(
                "{method} * is not a request this server answers; send a path such as /healthz"
            ),
        )),
        _ => Some(crate::answer::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_target",
            "the request target must be a path such as /healthz (origin form) or an absolute URI; \
             authority form (host:port) is for proxies",
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use warp::Filter;

    use super::*;

    /// A listener on an ephemeral port serving `/ok`, and `/boom`, whose handler panics.
    async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<State>) {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let ok = warp::path("ok").map(|| Response::new(Bytes::from_static(b"ok")));
        let boom = warp::path("boom").map(|| -> Response<Bytes> { panic!("a handler bug") });
        let routes = ok.or(boom).unify().boxed();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(run(
            "api",
            listener,
            limits,
            routes,
            state.clone(),
            std::future::pending(),
        ));
        (address, state)
    }

    /// One request on a new connection, read until the server closes it.
    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: kvab\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_server_goes_on() {
        let (address, state) = start(API).await;
        let answer = get(address, "/boom").await;
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(answer.contains("\"code\":\"internal\""), "{answer}");
        assert!(get(address, "/ok").await.starts_with("HTTP/1.1 200"));
        let panics = &state.metrics.http_panics;
        assert_eq!(panics.with_label_values(&["request"]).get(), 1);
        assert_eq!(panics.with_label_values(&["connection"]).get(), 0);
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_makes_room() {
        let (address, state) = start(Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(30),
        })
        .await;
        let mut first = TcpStream::connect(address).await.unwrap();
        let mut second = TcpStream::connect(address).await.unwrap();
        // The second is mid-request: its headers are not finished, so it counts as idle too, but later.
        second.write_all(b"GET /ok HTTP/1.1\r\n").await.unwrap();
        // Served although two connections hold the cap, for as long as their header timeout allows.
        let answer = get(address, "/ok").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let mut buffer = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), first.read(&mut buffer))
            .await
            .unwrap();
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "the longest idle is closed"
        );
        let evicted = &state.metrics.http_connections_evicted;
        assert_eq!(evicted.with_label_values(&["api"]).get(), 1);
        // The second still finishes its request.
        second
            .write_all(b"host: kvab\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        second.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
    }

    fn refused(method: Method, target: &str) -> Option<StatusCode> {
        let uri: warp::http::Uri = target.parse().unwrap();
        refuse_target(&method, &uri).map(|r| r.status())
    }

    #[test]
    fn only_paths_and_absolute_uris_reach_the_routes() {
        assert_eq!(refused(Method::GET, "/healthz"), None);
        assert_eq!(refused(Method::GET, "/v1/endpoints?x=1"), None);
        assert_eq!(refused(Method::GET, "http://kvab:18090/healthz"), None);
        // http::Uri gives an absolute URI without a path the path "/".
        assert_eq!(refused(Method::GET, "http://kvab:18090"), None);
        assert_eq!(refused(Method::GET, "a:1"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            refused(Method::CONNECT, "kvab:18090"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(refused(Method::GET, "*"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(refused(Method::OPTIONS, "*"), Some(StatusCode::NO_CONTENT));
    }

    #[test]
    fn the_longest_idle_connection_is_evicted_and_busy_ones_never() {
        let table = Table::default();
        let (first, first_evict) = table.open();
        let (second, _second_evict) = table.open();
        table.set_busy(first, true);
        assert!(table.evict_longest_idle(), "second is idle");
        table.set_busy(second, true);
        assert!(!table.evict_longest_idle(), "both busy");
        table.set_busy(first, false);
        assert!(table.evict_longest_idle());
        // The notification is stored for the first connection's task.
        let notified = first_evict.notified();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut notified = std::pin::pin!(notified);
        assert!(notified.as_mut().poll(&mut cx).is_ready());
        assert!(
            !table.evict_longest_idle(),
            "first was asked already, second is busy"
        );
        // A connection asked while a request started declines, and can be asked again once idle.
        table.set_busy(first, true);
        assert!(!table.may_close(first));
        table.set_busy(first, false);
        assert!(table.evict_longest_idle());
        assert!(table.may_close(first));
    }
}
