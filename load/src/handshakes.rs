//! `fedhive-load handshakes`: how many new connections a second the server takes, each one
//! connect, (TLS handshake,) `GET /healthz` and close. Devices keep their connections open between
//! requests, so this is the cost a fleet pays when it reconnects at once (a server restart, a
//! network change), not per update.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{RunArgs, start_target};

/// Runs the measurement and prints a table line and one JSON line.
pub async fn measure(args: &RunArgs) -> anyhow::Result<()> {
    let target = start_target(args).await?;
    let url = format!("{}/healthz", target.base_url);
    // No idle connections kept: every request opens its own.
    let http = target
        .client_tls
        .configure(
            reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(args.request_timeout_secs)),
        )?
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..args.devices.max(1))
        .map(|_| {
            let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match http.get(&url).send().await {
                        Ok(answer) if answer.status().is_success() => {
                            latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for client in clients {
        let (l, e) = client.await?;
        latencies.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    if latencies.is_empty() {
        bail!("no connection succeeded ({errors} errors)");
    }
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let (p50, p99) = (quantile(0.5), quantile(0.99));
    let rate = latencies.len() as f64 / secs;
    let tls = target.base_url.starts_with("https://");
    println!(
        "connections: {} in {secs:.1} s = {rate:.0}/s (tls: {tls}, clients: {}), p50 {p50:.2} ms, p99 {p99:.2} ms, errors {errors}",
        latencies.len(),
        args.devices
    );
    println!(
        "{}",
        serde_json::json!({
            "tls": tls,
            "clients": args.devices,
            "connections": latencies.len(),
            "connections_per_sec": rate,
            "p50_ms": p50,
            "p99_ms": p99,
            "errors": errors,
        })
    );
    target.cleanup().await
}
