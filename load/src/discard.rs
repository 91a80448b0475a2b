//! The "speed of light" baseline: a minimal hyper server that reads every request body and drops
//! it, in a child process like the server under test, and the same virtual devices uploading the
//! same bodies to it back to back. What it moves is what this machine's loopback, TCP and HTTP/1.1
//! stack can carry with nothing stored, hashed or checked, so a run's ingest rate divided by it says
//! how far fedhive is from the machine's limit.
//!
//! With `--durable-dir` the discard server also writes each body to a new file there and fsyncs
//! it before answering (then removes it): the limit of an ingest that must not acknowledge
//! anything before it is on disk, which is what this machine's disk allows fedhive at best.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::server::{ProcSample, sample};

/// The line the child prints once it listens; the harness reads the address from it.
const LISTENING: &str = "discard: listening on ";

/// Serves `POST` bodies into nothing on `listen` until killed: `200` with an empty body once the
/// whole body is read (and, with `durable_dir`, written there and fsynced). Per connection, like the
/// server: HTTP/1.1 keep-alive, `TCP_NODELAY`.
pub async fn serve(listen: SocketAddr, durable_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{LISTENING}{}", listener.local_addr()?);
    serve_on(listener, durable_dir.map(Arc::new)).await
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    durable_dir: Option<Arc<PathBuf>>,
) -> anyhow::Result<()> {
    let files = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (durable_dir, files) = (durable_dir.clone(), files.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (durable_dir, files) = (durable_dir.clone(), files.clone());
                async move {
                    let mut body = req.into_body();
                    let mut kept = Vec::new();
                    while let Some(frame) = body.frame().await {
                        match frame.map(|f| f.into_data()) {
                            Ok(Ok(data)) if durable_dir.is_some() => kept.extend_from_slice(&data),
                            Ok(_) => {}
                            Err(e) => return Err(std::io::Error::other(e)),
                        }
                    }
                    if let Some(dir) = durable_dir {
                        let path = dir.join(format!("body-{}", files.fetch_add(1, Ordering::Relaxed)));
                        tokio::task::spawn_blocking(move || write_durably(&path, &kept))
                            .await
                            .map_err(std::io::Error::other)??;
                    }
                    Ok::<_, std::io::Error>(Response::new(Empty::<Bytes>::new()))
                }
            });
            // A client that goes away mid-request is not the baseline's concern.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A body on disk as fedhive's directory store puts it there (a new file, written, fsynced), then
/// gone again so that a long baseline does not fill the disk.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create_new(path)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::remove_file(path)
}

/// The discard server as a child process of this binary (`fedhive-load discard`), killed on drop.
pub struct DiscardProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl DiscardProcess {
    /// With `durable_dir`, bodies are written and fsynced there before the answer.
    pub fn spawn(durable_dir: Option<&Path>) -> anyhow::Result<DiscardProcess> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["discard", "--listen", "127.0.0.1:0"]);
        if let Some(dir) = durable_dir {
            command.arg("--durable-dir").arg(dir);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the discard server")?;
        let stdout = child.stdout.take().context("the discard server's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix(LISTENING) else {
            let _ = child.kill();
            bail!("the discard server did not start (it printed {line:?})");
        };
        let addr = addr.parse().context("the discard server's address")?;
        Ok(DiscardProcess { child, addr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for DiscardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the discard server took in.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Baseline {
    /// Concurrent uploaders (the run's `--devices`).
    pub devices: usize,
    pub seconds: f64,
    pub uploads: u64,
    pub uploads_per_sec: f64,
    pub megabytes_per_sec: f64,
    /// Failed uploads (transport errors or non-2xx); none is expected.
    pub failed: u64,
    /// The discard server's CPU over the measurement (cores) and its peak RSS.
    pub server_cpu_cores: f64,
    pub server_peak_rss_bytes: u64,
}

/// Uploads `bodies` (round-robin) from `devices` concurrent clients to the discard server at `addr`
/// (process `pid`, for its CPU and memory) for `duration`, each client sending its next body as soon
/// as the last one was answered, and counts the completed uploads. Plain HTTP whatever the run used
/// (the baseline measures the machine).
pub async fn measure(
    http: &reqwest::Client,
    (addr, pid): (SocketAddr, u32),
    bodies: Arc<Vec<Bytes>>,
    devices: usize,
    duration: Duration,
) -> anyhow::Result<Baseline> {
    let url = format!("http://{addr}/discard");
    let first: ProcSample = sample(pid).unwrap_or_default();
    let (uploads, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let deadline = started + duration;
    let clients: Vec<_> = (0..devices.max(1))
        .map(|i| {
            let (http, url, bodies) = (http.clone(), url.clone(), bodies.clone());
            let (uploads, failed) = (uploads.clone(), failed.clone());
            tokio::spawn(async move {
                let mut next = i;
                while Instant::now() < deadline {
                    let body = bodies[next % bodies.len()].clone();
                    next += 1;
                    match http.post(&url).body(body).send().await {
                        Ok(resp) if resp.status().is_success() => {
                            uploads.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let last = sample(pid).unwrap_or_default();
    let uploads = uploads.load(Ordering::Relaxed);
    let bytes = bodies[0].len() as f64 * uploads as f64;
    Ok(Baseline {
        devices,
        seconds,
        uploads,
        uploads_per_sec: uploads as f64 / seconds,
        megabytes_per_sec: bytes / 1e6 / seconds,
        failed: failed.load(Ordering::Relaxed),
        server_cpu_cores: (last.cpu_secs - first.cpu_secs) / seconds,
        server_peak_rss_bytes: last.peak_rss_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The discard server answers every upload after reading it, and `measure` counts them.
    #[tokio::test]
    async fn the_baseline_counts_uploads_the_discard_server_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_on(listener, None));
        let bodies = Arc::new(vec![
            Bytes::from(vec![7u8; 1 << 20]),
            Bytes::from(vec![9u8; 1 << 20]),
        ]);
        let http = reqwest::Client::new();
        let baseline = measure(
            &http,
            (addr, std::process::id()),
            bodies,
            3,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        server.abort();
        let _ = server.await;
        assert_eq!(baseline.failed, 0);
        assert!(baseline.uploads >= 3, "{baseline:?}");
        let expected = baseline.uploads as f64 * (1 << 20) as f64 / 1e6 / baseline.seconds;
        assert!((baseline.megabytes_per_sec - expected).abs() < 1e-6 * expected);
        // A server that is gone: every upload fails, none is counted.
        let gone = measure(
            &reqwest::Client::new(),
            (addr, std::process::id()),
            Arc::new(vec![Bytes::new()]),
            1,
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        assert_eq!(gone.uploads, 0);
        assert!(gone.failed > 0);
    }

    /// The durable discard server answers only once the body was written: into a folder it takes
    /// every upload and leaves no file behind; into a folder that does not exist it fails them all.
    #[tokio::test]
    async fn the_durable_baseline_writes_every_body_before_answering() {
        let dir = tempfile::tempdir().unwrap();
        let bodies = Arc::new(vec![Bytes::from(vec![3u8; 1 << 16])]);
        let http = reqwest::Client::new();
        for (folder, works) in [
            (dir.path().to_path_buf(), true),
            (dir.path().join("missing"), false),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(serve_on(listener, Some(Arc::new(folder))));
            let baseline = measure(
                &http,
                (addr, std::process::id()),
                bodies.clone(),
                2,
                Duration::from_millis(200),
            )
            .await
            .unwrap();
            server.abort();
            let _ = server.await;
            if works {
                assert_eq!(baseline.failed, 0);
                assert!(baseline.uploads >= 2, "{baseline:?}");
            } else {
                assert_eq!(baseline.uploads, 0, "{baseline:?}");
                assert!(baseline.failed > 0);
            }
        }
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, 0, "the bodies' files are removed once written");
    }
}
