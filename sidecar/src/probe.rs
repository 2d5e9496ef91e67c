//! Periodic `GET <address><probe.path>` of every endpoint in the map: the runbook's prerequisite 3 ("proxy
//! metrics are exposed", needed by the active-request-scorer). A 404 is failure signal 2 and shows as
//! `kvab_proxy_metrics_up 0` with `kvab_proxy_metrics_status_code 404`.
//!
//! Only the status line is read, over a plain HTTP/1.1 connection; the proxies serve plain HTTP in-cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch as signal;

use crate::config::Probe;
use crate::state::{ProbeResult, State};

/// Returns the HTTP status code of `GET http://{address}{path}`, or an error message.
pub async fn status_of(address: &str, path: &str, timeout: Duration) -> Result<u16, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: kvab-probe\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        // The status line is at most a few dozen bytes; stop at the first line end.
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 128];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        parse_status_line(&head)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

fn parse_status_line(head: &[u8]) -> Result<u16, String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(version), Some(Ok(code))) if version.starts_with("HTTP/") => Ok(code),
        _ => Err(format!("not an HTTP answer: {:?}", line.trim())),
    }
}

/// Probes every endpoint of the current map each `interval` until `shutdown` fires.
pub async fn run(
    probe: Probe,
    interval: Duration,
    state: Arc<State>,
    mut shutdown: signal::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = ticker.tick() => {}
        }
        let Some(snapshot) = state.snapshot() else {
            continue;
        };
        let rounds = snapshot.endpoints.iter().map(|(arm, endpoint)| {
            let path = probe.path.as_str();
            async move {
                let outcome = status_of(&endpoint.address, path, probe.timeout).await;
                (
                    (arm.clone(), endpoint.pod.clone()),
                    endpoint.address.as_str(),
                    outcome,
                )
            }
        });
        let outcomes = join_all(rounds).await;
        let previous = state.probe_results();
        let mut results = BTreeMap::new();
        for (key, address, outcome) in outcomes {
            let result = ProbeResult {
                status: outcome.as_ref().ok().copied(),
            };
            // Log changes only, so a proxy that stays down does not flood the log.
            if previous.get(&key) != Some(&result) {
                let (arm, pod) = &key;
                match &outcome {
                    Ok(200) => log::info!("proxy {pod} ({arm}) GET http://{address}{} -> 200", probe.path),
                    Ok(code) => log::warn!(
                        "proxy {pod} ({arm}) GET http://{address}{} -> {code}; the active-request-scorer cannot score it{}",
                        probe.path,
                        if *code == 404 { " (runbook failure signal 2)" } else { "" }
                    ),
                    Err(e) => log::warn!("proxy {pod} ({arm}) GET http://{address}{} failed: {e}", probe.path),
                }
            }
            results.insert(key, result);
        }
        state.set_probe_results(results);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status_line(b"HTTP/1.1 404 Not Found\r\n"), Ok(404));
        assert_eq!(parse_status_line(b"HTTP/1.0 200\r\n"), Ok(200));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status_line(b"").is_err());
    }

    #[tokio::test]
    async fn reads_the_status_of_a_real_socket_and_times_out_on_silence() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            // First connection: answer 404. Second: accept and say nothing.
            let (mut first, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = first.read(&mut buf).await.unwrap();
            first
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let (_silent, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert_eq!(
            status_of(&address, "/metrics", Duration::from_secs(2)).await,
            Ok(404)
        );
        let silent = status_of(&address, "/metrics", Duration::from_millis(100)).await;
        assert!(silent.unwrap_err().contains("no answer"));
    }
}
