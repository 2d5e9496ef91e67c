//! The listener: HTTP/1.1 only, with the limits a server on a shared network needs. warp's own
//! server has none of them (no header or idle timeout, no connection cap, HTTP/2 on by default), so
//! kvab runs warp's routes on hyper's HTTP/1 connection builder itself.
//!
//! - a client must send a request's headers within [`HEADER_READ_TIMEOUT`], including the next
//!   request on a kept-alive connection, so idle connections close after that long;
//! - a report body must arrive within [`BODY_READ_TIMEOUT`] (see `reports.rs`);
//! - at most [`MAX_CONNECTIONS`] are open at once; more wait in the kernel's accept queue;
//! - one shutdown signal closes the listener and lets open requests finish.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use warp::http::Response;
use warp::Filter;

/// Time for a client to send a request's headers, and the idle keep-alive time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a report body to arrive whole.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves `routes` on `listener` until `shutdown` resolves, then waits for open requests.
pub async fn run<F>(
    listener: TcpListener,
    routes: F,
    shutdown: impl std::future::Future<Output = ()>,
) where
    F: Filter<Extract = (Response<Bytes>,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    log::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(warp::service(routes.clone()));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Timeouts and clients that go away end up here; they are not the server's errors.
            if let Err(e) = connection.await {
                log::debug!("connection closed: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
