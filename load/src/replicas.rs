//! Several replicas of the server under test on one database and blob store, behind a load
//! balancer (HAProxy, round-robin, no stickiness: a device's check-in and upload may reach
//! different replicas), and the fault mode that kills a random replica with SIGKILL at random
//! moments and restarts it after a delay.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use tokio::sync::{Mutex, watch};

use crate::server::{self, ServerProcess, SpawnOptions, free_port};

/// HAProxy in front of the replicas (`--haproxy`, default Debian's `/usr/sbin/haproxy`). A replica
/// that stops answering `/readyz` is out within about half a second; a request whose connection
/// is refused is sent to another replica.
pub struct Balancer {
    child: Child,
    pub addr: SocketAddr,
    _config: tempfile::TempDir,
}

impl Balancer {
    pub async fn start(binary: &str, ports: &[u16], http: &reqwest::Client) -> anyhow::Result<Balancer> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let servers: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("    server r{i} 127.0.0.1:{p} check\n"))
            .collect();
        // Long client and server timeouts: a queued upload may wait minutes for a slot.
        let config = format!(
            "global
    maxconn 8000
defaults
    mode http
    timeout connect 2s
    # A killed replica fails its check at once (connection refused); a busy one may answer
    # /readyz slowly, and is not taken out for it (the default, `inter`, is 200 ms).
    timeout check 2s
    timeout client 600s
    timeout server 600s
    retries 3
    option redispatch 1
    option forwardfor
frontend devices
    bind {addr}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    default-server inter 200ms fall 2 rise 1 maxconn 5000
{servers}"
        );
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary} (Debian's haproxy)"))?;
        let mut balancer = Balancer {
            child,
            addr,
            _config: dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(resp) = http.get(format!("http://{addr}/healthz")).send().await
                && resp.status().is_success()
            {
                return Ok(balancer);
            }
            if let Some(status) = balancer.child.try_wait()? {
                bail!("haproxy exited during start-up: {status}");
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("haproxy passed no request within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One replica over the run, all its processes (a killed one and its restarts) together.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplicaUsage {
    pub name: String,
    /// The largest peak resident set (VmHWM) of its processes.
    pub peak_rss_bytes: u64,
    /// CPU seconds of its processes (a killed one's up to its last sample).
    pub cpu_secs: f64,
    pub kills: u64,
}

/// The replicas the harness started.
pub struct Replicas {
    processes: Vec<ServerProcess>,
    options: Vec<SpawnOptions>,
    /// What the killed processes used.
    past: Vec<ReplicaUsage>,
    /// The last sample of each running process.
    last: Vec<server::ProcSample>,
}

impl Replicas {
    /// Starts a replica for each of `options` (each with its own port and `--replica-name`).
    pub async fn start(options: Vec<SpawnOptions>, http: &reqwest::Client) -> anyhow::Result<Replicas> {
        let mut processes = Vec::new();
        for o in &options {
            processes.push(ServerProcess::spawn(o, http).await?);
        }
        let past = (0..options.len())
            .map(|i| ReplicaUsage {
                name: format!("r{i}"),
                ..ReplicaUsage::default()
            })
            .collect();
        Ok(Replicas {
            last: vec![server::ProcSample::default(); processes.len()],
            processes,
            options,
            past,
        })
    }

    pub fn ports(&self) -> Vec<u16> {
        self.processes.iter().map(|p| p.addr.port()).collect()
    }

    pub fn first(&self) -> &ServerProcess {
        &self.processes[0]
    }

    pub fn base_urls(&self) -> Vec<String> {
        self.processes.iter().map(|p| p.base_url.clone()).collect()
    }

    /// Samples every running replica; false if one has exited that the harness did not kill.
    pub fn sample(&mut self) -> bool {
        let mut all_alive = true;
        for (i, p) in self.processes.iter_mut().enumerate() {
            match server::sample(p.pid()) {
                Some(s) if p.alive() => self.last[i] = s,
                _ => all_alive = false,
            }
        }
        all_alive
    }

    /// Usage so far: the killed processes' and the running ones' last samples.
    pub fn usage(&mut self) -> Vec<ReplicaUsage> {
        self.sample();
        self.past
            .iter()
            .zip(&self.last)
            .map(|(past, now)| ReplicaUsage {
                peak_rss_bytes: past.peak_rss_bytes.max(now.peak_rss_bytes),
                cpu_secs: past.cpu_secs + now.cpu_secs,
                ..past.clone()
            })
            .collect()
    }

    fn kill(&mut self, i: usize) {
        self.sample();
        let last = std::mem::take(&mut self.last[i]);
        let past = &mut self.past[i];
        past.peak_rss_bytes = past.peak_rss_bytes.max(last.peak_rss_bytes);
        past.cpu_secs += last.cpu_secs;
        past.kills += 1;
        self.processes[i].kill();
    }

    async fn restart(&mut self, i: usize, http: &reqwest::Client) -> anyhow::Result<()> {
        self.processes[i] = ServerProcess::spawn(&self.options[i], http).await?;
        Ok(())
    }
}

/// The fault mode: until `stop`, every `every` on average (uniform within ±50%) kills a random
/// replica with SIGKILL and restarts it `restart_after` later. Returns the kills.
pub async fn inject_faults(
    replicas: Arc<Mutex<Replicas>>,
    every: Duration,
    restart_after: Duration,
    http: reqwest::Client,
    mut stop: watch::Receiver<bool>,
    seed: u64,
) -> anyhow::Result<u64> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xfa17);
    let n = replicas.lock().await.processes.len();
    let mut kills = 0;
    loop {
        let wait = every.mul_f64(rng.random_range(0.5..1.5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return Ok(kills);
        }
        let i = rng.random_range(0..n);
        replicas.lock().await.kill(i);
        kills += 1;
        tokio::time::sleep(restart_after).await;
        replicas.lock().await.restart(i, &http).await?;
    }
}
