//! kubers-probe: runs a kube-rs `watcher` on Pods and prints one line per event, so that
//! the fakekube tests can check the fake against the real client library.
//!
//! Usage: kubers-probe [--streaming] [--timeout SECS] [--seconds SECS] LABEL_SELECTOR
//! Uses `Config::infer()` (so `KUBECONFIG`). Output lines:
//!   CONFIG <cluster_url> | INIT | INITAPPLY ns/name rv | INITDONE | APPLY ns/name rv ip
//!   | DELETE ns/name rv | ERROR <message>

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, ResourceExt};

fn key(p: &Pod) -> String {
    format!("{}/{} {}", p.namespace().unwrap_or_default(), p.name_any(), p.resource_version().unwrap_or_default())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut selector = String::new();
    let mut streaming = false;
    let mut timeout: Option<u32> = None;
    let mut seconds: u64 = 30;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--streaming" => streaming = true,
            "--timeout" => timeout = args.next().and_then(|s| s.parse().ok()),
            "--seconds" => seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(seconds),
            _ => selector = a,
        }
    }
    let config = Config::infer().await?;
    println!("CONFIG {}", config.cluster_url);
    let client = Client::try_from(config)?;
    let api: Api<Pod> = Api::all(client);
    let mut wc = watcher::Config::default();
    if !selector.is_empty() {
        wc = wc.labels(&selector);
    }
    if let Some(t) = timeout {
        wc = wc.timeout(t);
    }
    if streaming {
        wc = wc.streaming_lists();
    }
    let stream = watcher(api, wc).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let deadline = tokio::time::sleep(Duration::from_secs(seconds));
    let mut deadline = std::pin::pin!(deadline);
    let mut out = std::io::stdout();
    loop {
        let line = tokio::select! {
            _ = &mut deadline => break,
            ev = stream.next() => match ev {
                None => break,
                Some(Ok(watcher::Event::Init)) => "INIT".to_string(),
                Some(Ok(watcher::Event::InitApply(p))) => format!("INITAPPLY {}", key(&p)),
                Some(Ok(watcher::Event::InitDone)) => "INITDONE".to_string(),
                Some(Ok(watcher::Event::Apply(p))) => {
                    let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
                    format!("APPLY {} {}", key(&p), ip)
                }
                Some(Ok(watcher::Event::Delete(p))) => format!("DELETE {}", key(&p)),
                Some(Err(e)) => format!("ERROR {e}"),
            },
        };
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}
