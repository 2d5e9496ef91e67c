//! Periodic `GET <address><probe.path>` of every endpoint in the map: the runbook's prerequisite 3 ("proxy
//! metrics are exposed", needed by the active-request-scorer). A 404 is failure signal 2 and shows as
//! `kvab_proxy_metrics_up 0` with `kvab_proxy_metrics_status_code 404`.
//!
//! Only the status is read, over plain HTTP/1.1 (the proxies serve plain HTTP in-cluster), with
//! `probe.concurrency` probes in flight at most.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use tokio::sync::watch as signal;

use crate::client::HttpClient;
use crate::config::Probe;
use crate::published::ProbeResult;
use crate::state::State;

/// (arm, pod) of an endpoint.
type Key = (String, String);

/// One round: `GET http://<address><path>` of every target, at most `concurrency` at a time.
async fn probe_round(
    client: &HttpClient,
    targets: Vec<(Key, String)>,
    path: &str,
    concurrency: usize,
) -> Vec<(Key, String, Result<u16, String>)> {
    stream::iter(targets)
        .map(|(key, address)| async move {
            let outcome = client.status(&format!("http://{address}{path}")).await;
            (key, address, outcome)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Probes every endpoint of the current map each `interval` until `shutdown` fires.
pub async fn run(
    probe: Probe,
    interval: Duration,
    state: Arc<State>,
    mut shutdown: signal::Receiver<bool>,
) {
    let client = HttpClient::new(probe.timeout);
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
        let targets = snapshot
            .endpoints
            .iter()
            .map(|(arm, endpoint)| {
                (
                    (arm.clone(), endpoint.pod.clone()),
                    endpoint.address.clone(),
                )
            })
            .collect();
        let outcomes = probe_round(&client, targets, &probe.path, probe.concurrency).await;
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn key(pod: &str) -> Key {
        ("fs".to_string(), pod.to_string())
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
        let client = HttpClient::new(Duration::from_secs(2));
        assert_eq!(
            client.status(&format!("http://{address}/metrics")).await,
            Ok(404)
        );
        let client = HttpClient::new(Duration::from_millis(100));
        let silent = client.status(&format!("http://{address}/metrics")).await;
        assert!(silent.unwrap_err().contains("no answer"));
    }

    #[tokio::test]
    async fn a_round_keeps_at_most_concurrency_probes_in_flight() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let open = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (open_s, most_s) = (open.clone(), most.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let now = open_s.fetch_add(1, Ordering::SeqCst) + 1;
                most_s.fetch_max(now, Ordering::SeqCst);
                let open = open_s.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    let _ = socket.read(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        let targets: Vec<(Key, String)> = (0..24)
            .map(|i| (key(&format!("proxy-{i}")), address.clone()))
            .collect();
        let client = HttpClient::new(Duration::from_secs(5));
        let outcomes = probe_round(&client, targets, "/metrics", 4).await;
        assert_eq!(outcomes.len(), 24);
        assert!(outcomes.iter().all(|(_, _, outcome)| *outcome == Ok(200)));
        let most = most.load(Ordering::SeqCst);
        assert!(
            (1..=4).contains(&most),
            "{most} probes were in flight at once"
        );
    }
}
