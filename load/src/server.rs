//! The server under test: a child process the harness starts (so its memory and CPU are measured
//! apart from the load generator's), or one already running elsewhere.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use sqlx::{Connection, Executor};

/// Memory and CPU of a local process, from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcSample {
    /// Resident set now (VmRSS), bytes.
    pub rss_bytes: u64,
    /// Peak resident set since the process started (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// User + system CPU time so far, seconds.
    pub cpu_secs: f64,
}

/// Reads VmRSS, VmHWM and utime+stime of `pid` (Linux); `None` if the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime
    // are fields 14 and 15.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // /proc reports CPU time in USER_HZ ticks, fixed at 100 by the Linux ABI.
    let hz = 100.0;
    Some(ProcSample {
        rss_bytes: kib("VmRSS:")?,
        peak_rss_bytes: kib("VmHWM:")?,
        cpu_secs: ticks as f64 / hz,
    })
}

/// A PostgreSQL database created for one run and dropped after it.
pub struct FreshPostgres {
    admin_url: String,
    name: String,
    pub url: String,
}

impl FreshPostgres {
    /// Creates `fedhive_load_<random>` on the server at `server_url` (`postgres://user@host:port`).
    pub async fn create(server_url: &str) -> anyhow::Result<FreshPostgres> {
        let server_url = server_url.trim_end_matches('/');
        let name = format!("fedhive_load_{:012x}", rand::random::<u64>() >> 16);
        let admin_url = format!("{server_url}/postgres");
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {server_url}"))?;
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await?;
        conn.close().await?;
        Ok(FreshPostgres {
            admin_url,
            url: format!("{server_url}/{name}"),
            name,
        })
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        conn.execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .await?;
        conn.close().await?;
        Ok(())
    }
}

/// How to start the server.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Where it listens (127.0.0.1); `None`: a free port.
    pub port: Option<u16>,
    /// Flags after the harness's own (e.g. `--replica-name`).
    pub extra_flags: Vec<String>,
    /// A `fedhive` binary; `None` runs this binary's `serve` subcommand (the same server library).
    pub binary: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub admin_token: String,
    pub max_concurrent_uploads: usize,
    pub max_queued_uploads: usize,
    pub checkin_retry_ms: u64,
    pub tick_ms: u64,
    /// `RUST_LOG` of the server; its stderr goes to `log_path`.
    pub log_filter: String,
    pub log_path: PathBuf,
    /// Serve HTTPS with this certificate and key (PEM files); the harness's clients trust its CA.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `--blob-store` (the server inherits the harness's `AWS_*` environment).
    pub blob_store: Option<String>,
}

/// A server process the harness started; killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` (the name in the run's certificate).
    pub base_url: String,
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ServerProcess {
    /// Starts the server and waits until `http` gets an answer from it.
    pub async fn spawn(options: &SpawnOptions, http: &reqwest::Client) -> anyhow::Result<ServerProcess> {
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut cmd = match &options.binary {
            Some(bin) => Command::new(bin),
            None => Command::new(std::env::current_exe().context("locating this executable")?),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&options.data_dir)
            .arg("--max-concurrent-uploads")
            .arg(options.max_concurrent_uploads.to_string())
            .arg("--max-queued-uploads")
            .arg(options.max_queued_uploads.to_string())
            .arg("--checkin-retry-ms")
            .arg(options.checkin_retry_ms.to_string())
            .arg("--tick-ms")
            .arg(options.tick_ms.to_string())
            .env("FEDHIVE_ADMIN_TOKEN", &options.admin_token)
            .env("RUST_LOG", &options.log_filter)
            // As deploy/Dockerfile sets it (see there), unless the caller's environment says otherwise.
            .env(
                "MALLOC_MMAP_THRESHOLD_",
                std::env::var("MALLOC_MMAP_THRESHOLD_").unwrap_or_else(|_| "1048576".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Appended to: a restarted replica logs after its killed predecessor.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&options.log_path)
                    .context("opening the server log")?,
            );
        if let Some(url) = &options.database_url {
            cmd.arg("--database-url").arg(url);
        }
        if let Some((cert, key)) = &options.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        if let Some(url) = &options.blob_store {
            cmd.arg("--blob-store").arg(url);
        }
        cmd.args(&options.extra_flags);
        let child = cmd.spawn().context("starting the server")?;
        let base_url = match options.tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        let mut server = ServerProcess {
            child,
            addr,
            base_url,
        };
        server.wait_ready(&options.log_path, http).await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&mut self, log: &Path, http: &reqwest::Client) -> anyhow::Result<()> {
        let started = Instant::now();
        let url = format!("{}/healthz", self.base_url);
        loop {
            if let Ok(resp) = http.get(&url).send().await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                bail!("the server exited during start-up ({status}):\n{tail}");
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the server did not answer /healthz within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0 && s.peak_rss_bytes >= s.rss_bytes);
        assert!(s.cpu_secs >= 0.0);
        assert!(sample(u32::MAX).is_none());
    }
}
