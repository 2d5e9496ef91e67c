//! The HTTP client of `kvab check` and of the sidecar's proxy probes: plain HTTP/1.1 over hyper, with one
//! time limit per request and the two times the verdict needs, time to first byte (first body byte, or the
//! headers when there is no body) and total time (last body byte).

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One request, as planned (printed by `--dry-run`) and as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Request {
    pub fn get(url: String) -> Self {
        Self {
            method: Method::GET,
            url,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn post_json(url: String, body: &serde_json::Value) -> Self {
        Self {
            method: Method::POST,
            url,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

impl fmt::Display for Request {
    /// A curl line, so a person can replay it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "curl -sS -X {} {}", self.method, self.url)?;
        for (name, value) in &self.headers {
            write!(f, " -H '{name}: {value}'")?;
        }
        if !self.body.is_empty() {
            write!(f, " -d '{}'", String::from_utf8_lossy(&self.body))?;
        }
        Ok(())
    }
}

/// A completed exchange.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub time_to_first_byte: Duration,
    pub total: Duration,
}

impl Exchange {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The status line and headers of a response, as they arrived.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: HeaderMap,
    /// From the request's start to the response headers.
    pub headers_at: Duration,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A response whose body was handed to the caller chunk by chunk (`HttpClient::stream`).
#[derive(Debug, Clone)]
pub struct Streamed {
    pub head: Head,
    /// From the request's start to the last body byte.
    pub total: Duration,
}

/// A streamed exchange that failed: a transport error or the time limit, before the headers or while
/// the body was coming. `head` is the response's head when it had arrived, so the caller still knows
/// who answered.
#[derive(Debug, Clone)]
pub struct StreamFailure {
    pub head: Option<Head>,
    /// The client's time limit ran out (else a transport error).
    pub timed_out: bool,
    pub message: String,
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    max_time: Duration,
    /// A longer body is an error (`with_max_body`); `None`: no limit.
    max_body: Option<usize>,
}

impl HttpClient {
    /// `max_time` bounds each request from connect to the last body byte (curl's `--max-time`).
    pub fn new(max_time: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(max_time.min(Duration::from_secs(5))));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            max_time,
            max_body: None,
        }
    }

    /// The same client, with a body longer than `bytes` an error (the exchange stops there) instead of
    /// being read on.
    pub fn with_max_body(self, bytes: usize) -> Self {
        Self {
            max_body: Some(bytes),
            ..self
        }
    }

    /// The status of `GET url`; the body is not read (a probe needs only the status line).
    pub async fn status(&self, url: &str) -> Result<u16, String> {
        let request = http::Request::get(url)
            .header(http::header::USER_AGENT, "kvab-probe")
            .header(http::header::ACCEPT, "text/plain")
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("bad request {url}: {e}"))?;
        match tokio::time::timeout(self.max_time, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response.status().as_u16()),
            Ok(Err(e)) => Err(describe_error(&e)),
            Err(_) => Err(format!("no answer within {:?}", self.max_time)),
        }
    }

    pub async fn send(&self, request: &Request) -> Result<Exchange, String> {
        let mut collected = Vec::new();
        let mut first_byte = None;
        let streamed = self
            .stream(request, |data, at| {
                if first_byte.is_none() && !data.is_empty() {
                    first_byte = Some(at);
                }
                collected.extend_from_slice(data);
            })
            .await
            .map_err(|failure| failure.message)?;
        Ok(Exchange {
            status: streamed.head.status,
            headers: streamed.head.headers,
            body: Bytes::from(collected),
            time_to_first_byte: first_byte.unwrap_or(streamed.head.headers_at),
            total: streamed.total,
        })
    }

    /// Sends `request` and hands each body chunk to `on_chunk` with its arrival time since the request's
    /// start, as it arrives (nothing is collected here). Fails on a transport error, or when the whole
    /// exchange takes longer than the client's limit; the failure keeps the head if it had arrived.
    pub async fn stream(
        &self,
        request: &Request,
        mut on_chunk: impl FnMut(&[u8], Duration),
    ) -> Result<Streamed, StreamFailure> {
        let mut builder = http::Request::builder()
            .method(request.method.clone())
            .uri(&request.url);
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let failure = |head: Option<Head>, timed_out: bool, message: String| StreamFailure {
            head,
            timed_out,
            message,
        };
        let outgoing = builder
            .body(Full::new(request.body.clone()))
            .map_err(|e| failure(None, false, format!("bad request {}: {e}", request.url)))?;
        let started = tokio::time::Instant::now();
        let deadline = started + self.max_time;
        let timeout = || format!("no complete answer within {:?}", self.max_time);
        let response = match tokio::time::timeout_at(deadline, self.client.request(outgoing)).await
        {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(failure(None, false, describe_error(&e))),
            Err(_) => return Err(failure(None, true, timeout())),
        };
        let (parts, mut body) = response.into_parts();
        let head = Head {
            status: parts.status.as_u16(),
            headers: parts.headers,
            headers_at: started.elapsed(),
        };
        let mut received = 0usize;
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(None) => break,
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        received = received.saturating_add(data.len());
                        if let Some(max) = self.max_body.filter(|max| received > *max) {
                            let message = format!("the answer is longer than {max} bytes");
                            return Err(failure(Some(head), false, message));
                        }
                        on_chunk(data, started.elapsed());
                    }
                }
                Ok(Some(Err(e))) => {
                    let message = format!("reading the body: {}", describe_error(&e));
                    return Err(failure(Some(head), false, message));
                }
                Err(_) => return Err(failure(Some(head), true, timeout())),
            }
        }
        Ok(Streamed {
            head,
            total: started.elapsed(),
        })
    }
}

/// hyper's top-level error says little ("client error (Connect)"); the source chain says why.
fn describe_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A test server for one request, which answers as a test needs, broken answers included.
#[cfg(any(test, feature = "test-server"))]
#[allow(clippy::unwrap_used)]
pub mod one_shot {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What the test server does after reading the request.
    pub enum Then {
        /// Writes these bytes and closes the connection.
        Answer(Vec<u8>),
        /// Writes these bytes and keeps the connection open until the client hangs up.
        Stall(Vec<u8>),
    }

    /// A server for one `GET`: reads the request's head, then does `then`. Returns its URL.
    pub async fn serve_once(then: Then) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client hung up before its request's end");
                request.extend_from_slice(&buf[..n]);
            }
            match then {
                // A client may hang up before the end (an answer over its cap).
                Then::Answer(bytes) => {
                    let _ = socket.write_all(&bytes).await;
                }
                Then::Stall(bytes) => {
                    socket.write_all(&bytes).await.unwrap();
                    while socket.read(&mut buf).await.unwrap_or(0) > 0 {}
                }
            }
        });
        format!("http://{address}/")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::one_shot::{serve_once, Then};
    use super::*;

    #[test]
    fn requests_print_as_curl_lines() {
        let request = Request::post_json(
            "http://127.0.0.1:18080/v1/completions".into(),
            &serde_json::json!({"prompt": "Hello"}),
        )
        .with_header("x-kv-backend", "fs");
        assert_eq!(
            request.to_string(),
            "curl -sS -X POST http://127.0.0.1:18080/v1/completions -H 'content-type: application/json' \
             -H 'x-kv-backend: fs' -d '{\"prompt\":\"Hello\"}'"
        );
    }

    #[tokio::test]
    async fn measures_first_byte_and_total_separately() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kv-backend: fs\r\n\r\n3\r\nabc\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            socket.write_all(b"3\r\ndef\r\n0\r\n\r\n").await.unwrap();
        });
        let client = HttpClient::new(Duration::from_secs(5));
        let exchange = client
            .send(&Request::get(format!("http://{address}/")))
            .await
            .unwrap();
        assert_eq!(exchange.status, 200);
        assert_eq!(exchange.header("x-kv-backend"), Some("fs"));
        assert_eq!(&exchange.body[..], b"abcdef");
        assert!(exchange.total - exchange.time_to_first_byte >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_body_cut_or_stalled_after_the_headers_fails_with_the_head() {
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kv-backend: fs\r\n\r\n3\r\nabc\r\n";
        let client = HttpClient::new(Duration::from_millis(300));
        for (then, timed_out) in [
            (Then::Answer(head.to_vec()), false),
            (Then::Stall(head.to_vec()), true),
        ] {
            let url = serve_once(then).await;
            let mut received = Vec::new();
            let failure = client
                .stream(&Request::get(url), |data, _| {
                    received.extend_from_slice(data)
                })
                .await
                .unwrap_err();
            assert_eq!(failure.timed_out, timed_out, "{}", failure.message);
            let answered = failure.head.unwrap();
            assert_eq!(
                (answered.status, answered.header("x-kv-backend")),
                (200, Some("fs"))
            );
            assert_eq!(received, b"abc");
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_an_error() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789";
        let client = HttpClient::new(Duration::from_secs(5));
        let url = serve_once(Then::Answer(answer.to_vec())).await;
        let fits = client.clone().with_max_body(10);
        assert_eq!(
            &fits.send(&Request::get(url)).await.unwrap().body[..],
            b"0123456789"
        );
        let url = serve_once(Then::Answer(answer.to_vec())).await;
        let over = client
            .with_max_body(9)
            .send(&Request::get(url))
            .await
            .unwrap_err();
        assert_eq!(over, "the answer is longer than 9 bytes");
    }

    #[tokio::test]
    async fn a_refused_connection_and_a_silent_server_are_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let client = HttpClient::new(Duration::from_millis(300));
        let refused = client
            .send(&Request::get(format!("http://{address}/")))
            .await
            .unwrap_err();
        assert!(refused.contains("refused"), "{refused}");

        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let (_socket, _) = silent.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let timed_out = client
            .send(&Request::get(format!("http://{address}/")))
            .await
            .unwrap_err();
        assert!(timed_out.contains("no complete answer"), "{timed_out}");
    }
}
