//! `fedhive-load`: load-tests a fedhive server with many simulated devices over real HTTP.
//!
//! `fedhive-load run` starts the server as a child process (temporary SQLite, or a fresh
//! PostgreSQL database with `--postgres`), or targets a running one (`--server-url`), creates a
//! FedAvg task with a synthetic model of `--params` parameters, and runs `--devices` virtual
//! devices for `--duration-secs`. It ends with a table and one JSON line (the last line on
//! stdout), and exits non-zero if the server's per-round accepted counts differ from the receipts
//! the devices got. `fedhive-load serve` is the `fedhive serve` server itself (what `run` spawns
//! unless `--server-bin` names another binary). `--tls` runs either over HTTPS; `fedhive-load
//! handshakes` measures new connections per second (docs/performance.md has both costs).

mod device;
mod discard;
mod handshakes;
mod profile;
mod replicas;
mod report;
mod server;
mod stats;
mod synth;
mod verify;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fedhive_server::coordinator::default_upload_slots;
use fedhive_shared::{
    NamedTensors,
    wire::{RoundInfo, RoundState, TaskCreated, TaskStatus, UpdateEncoding},
};
use fedhive_tls::{ClientTls, dev_ca::DevCa};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{SeedableRng, rngs::SmallRng};
use tokio::sync::{Mutex, watch};

use crate::{
    device::{DeviceOptions, Fleet},
    replicas::{Balancer, Replicas},
    report::{Events, ProcessUsage, Report, RoundTimes, Setup},
    server::{FreshPostgres, ProcSample, SpawnOptions},
    stats::Stats,
    synth::TaskShape,
};

#[derive(Parser)]
#[command(
    name = "fedhive-load",
    version,
    about = "Load-test harness for the fedhive server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run virtual devices against a server and report.
    Run(Box<RunArgs>),
    /// Run the fedhive server (same as `fedhive serve`; what `run` starts by default).
    Serve(Box<fedhive_server::cli::ServeArgs>),
    /// Measure new connections per second: `--devices` clients each open a connection, ask
    /// `/healthz` and close it, for `--duration-secs` (with `--tls`, a TLS handshake each).
    Handshakes(Box<RunArgs>),
    /// The baseline's discard server: reads request bodies and drops them (what `run` starts after
    /// the server under test, for `--baseline-secs`).
    Discard {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Write each body to a new file here and fsync it before answering (the durable baseline).
        #[arg(long)]
        durable_dir: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Virtual devices, all running at once.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// K: accepted updates that commit a round.
    #[arg(long, default_value_t = 100)]
    devices_per_round: u32,
    /// A round commits at its deadline with at least this many (default: half of K).
    #[arg(long)]
    min_devices_per_round: Option<u32>,
    /// Assignments per round = ceil(K * this).
    #[arg(long, default_value_t = 1.2)]
    over_selection: f32,
    #[arg(long, default_value_t = 120)]
    round_deadline_secs: u64,
    /// Stop after this many committed rounds (0: only --duration-secs stops the run).
    #[arg(long, default_value_t = 0)]
    rounds: u32,
    /// Model parameters (f32).
    #[arg(long, default_value_t = 1_000_000)]
    params: usize,
    /// How the devices encode their updates: f32, int8 or top_k:PERCENT (the task asks for it).
    #[arg(long, default_value = "f32", value_parser = str::parse::<UpdateEncoding>)]
    update_encoding: UpdateEncoding,
    /// Tensors the parameters are split into.
    #[arg(long, default_value_t = 4)]
    tensors: usize,
    /// Distinct synthetic update bodies, encoded once and shared by all devices.
    #[arg(long, default_value_t = 8)]
    update_variants: usize,
    /// Mean simulated training time per round (each draw uniform within ±50%).
    #[arg(long, default_value_t = 2000)]
    train_ms: u64,
    /// Probability that a device vanishes after getting an assignment.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Share of the dropouts that vanish in the middle of their upload (the others right after
    /// check-in).
    #[arg(long, default_value_t = 0.5)]
    mid_upload_share: f64,
    /// Extra attempts per request after a transport error, a 5xx or 409 upload_in_flight (0 = none).
    #[arg(long, default_value_t = 5)]
    retries: u32,
    #[arg(long, default_value_t = 200)]
    retry_backoff_ms: u64,
    /// Probability that an accepted upload is sent again (same token and bytes).
    #[arg(long, default_value_t = 0.0)]
    duplicate_rate: f64,
    /// How long devices keep starting new rounds.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Timeout of one HTTP request.
    #[arg(long, default_value_t = 300)]
    request_timeout_secs: u64,
    /// Worker threads of the load generator (the rest of the machine is left to the server).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// After the run, the same devices upload the same bodies back to back to a server that reads
    /// and drops them, for this long: the machine's own limit, which the report divides the run's
    /// ingest by (0: no baseline).
    #[arg(long, default_value_t = 10)]
    baseline_secs: u64,

    /// Target this running server instead of starting one (needs --admin-token).
    #[arg(long)]
    server_url: Option<String>,
    /// PID of the --server-url server, for its memory and CPU (local servers only).
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, env = "FEDHIVE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Start this `fedhive` binary (default: this binary's `serve`, the same server code).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// PostgreSQL server (`postgres://user@host:port`) to create a fresh database on for the run
    /// (dropped afterwards); default: SQLite in a temporary directory.
    #[arg(long)]
    postgres: Option<String>,
    /// The started server's --max-concurrent-uploads (default: the server's, one per CPU core).
    #[arg(long)]
    max_concurrent_uploads: Option<usize>,
    /// The started server's --max-queued-uploads.
    #[arg(long, default_value_t = 64)]
    max_queued_uploads: usize,
    /// The started server's --checkin-retry-ms.
    #[arg(long, default_value_t = 1000)]
    checkin_retry_ms: u64,
    /// The started server's RUST_LOG.
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// Keep the started server's data directory and log here instead of a temporary directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The started server's --blob-store (`s3://BUCKET/PREFIX`, the `AWS_*` environment passed on);
    /// default: its data directory.
    #[arg(long)]
    blob_store: Option<String>,
    /// Server replicas to start on one database and blob store (needs --postgres and an
    /// `s3://` --blob-store), behind HAProxy, round-robin (docs/replicas.md).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The HAProxy binary in front of --replicas > 1.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: String,
    /// Fault mode: SIGKILL a random started replica every this many seconds on average (uniform
    /// within ±50%) and restart it after --restart-after-ms (0: no faults).
    #[arg(long, default_value_t = 0.0)]
    kill_every_secs: f64,
    #[arg(long, default_value_t = 1000)]
    restart_after_ms: u64,
    /// The started servers' --finalise-lease-ms: how long a round waits after its finaliser is
    /// killed.
    #[arg(long, default_value_t = 5000)]
    finalise_lease_ms: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Start the server with HTTPS (a certificate for `localhost` from a CA made for the run) and
    /// talk to it over TLS.
    #[arg(long)]
    tls: bool,
    /// How to check an `https` --server-url.
    #[command(flatten)]
    client_tls: fedhive_tls::ClientTlsArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Handshakes(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads.max(1))
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(handshakes::measure(&args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fedhive-load: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Discard { listen, durable_dir } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(discard::serve(listen, durable_dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fedhive-load discard: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads.max(1))
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(run(*args)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("fedhive-load: the exactly-once check FAILED (see the report)");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("fedhive-load: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(args: fedhive_server::cli::ServeArgs) -> ExitCode {
    fedhive_server::cli::init_tracing();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        let server = fedhive_server::start(args.into_config()).await?;
        tokio::select! {
            served = server.handle => served??,
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedhive-load serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The server under test and what it takes to clean up after it.
struct Target {
    base_url: String,
    /// How the harness's clients check the server.
    client_tls: ClientTls,
    addr: std::net::SocketAddr,
    admin_token: String,
    pid: Option<u32>,
    database: String,
    blob_store: String,
    replicas: Option<Arc<Mutex<Replicas>>>,
    balancer: Option<Balancer>,
    postgres: Option<FreshPostgres>,
    _data_dir: Option<tempfile::TempDir>,
}

impl Target {
    /// Stops the started servers and drops their PostgreSQL database.
    async fn cleanup(mut self) -> anyhow::Result<()> {
        drop(self.balancer.take());
        drop(self.replicas.take());
        if let Some(pg) = self.postgres.take() {
            pg.drop_database().await?;
        }
        Ok(())
    }
}

async fn start_target(args: &RunArgs) -> anyhow::Result<Target> {
    if let Some(url) = &args.server_url {
        let admin_token = args
            .admin_token
            .clone()
            .context("--server-url needs --admin-token (or FEDHIVE_ADMIN_TOKEN)")?;
        let base_url = url.trim_end_matches('/').to_string();
        let host = base_url
            .strip_prefix("http://")
            .or_else(|| base_url.strip_prefix("https://"))
            .context("--server-url must be http://HOST:PORT or https://HOST:PORT")?;
        let addr = tokio::net::lookup_host(host)
            .await?
            .next()
            .context("resolving --server-url")?;
        return Ok(Target {
            client_tls: args.client_tls.load()?,
            base_url,
            addr,
            admin_token,
            pid: args.server_pid,
            database: "external".into(),
            blob_store: "external".into(),
            replicas: None,
            balancer: None,
            postgres: None,
            _data_dir: None,
        });
    }
    let (data_dir, tempdir) = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let t = tempfile::tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    if args.replicas > 1
        && !(args.postgres.is_some() && args.blob_store.as_deref().is_some_and(|b| b.starts_with("s3://")))
    {
        bail!(
            "--replicas {} needs --postgres and an s3:// --blob-store: replicas share the database and the blobs",
            args.replicas
        );
    }
    let postgres = match &args.postgres {
        Some(url) => Some(FreshPostgres::create(url).await?),
        None => None,
    };
    let admin_token = format!("{:032x}", rand::random::<u128>());
    let (tls_files, client_tls) = if args.tls {
        let ca = DevCa::new("fedhive-load CA");
        let issued = ca.issue(&["localhost"]);
        let (cert, key) = (data_dir.join("tls-cert.pem"), data_dir.join("tls-key.pem"));
        std::fs::write(&cert, &issued.cert_pem)?;
        std::fs::write(&key, &issued.key_pem)?;
        let trust = ClientTls {
            ca_pem: Some(ca.cert_pem()),
            ..ClientTls::default()
        };
        (Some((cert, key)), trust)
    } else {
        (None, ClientTls::default())
    };
    let mut options = Vec::new();
    for i in 0..args.replicas.max(1) {
        // One replica keeps the single server's names.
        let name = if args.replicas > 1 {
            format!("server-r{i}")
        } else {
            "server".into()
        };
        options.push(SpawnOptions {
            port: Some(server::free_port()?),
            extra_flags: vec![
                "--replica-name".into(),
                format!("r{i}"),
                "--finalise-lease-ms".into(),
                args.finalise_lease_ms.to_string(),
            ],
            binary: args.server_bin.clone(),
            data_dir: data_dir.join(&name),
            database_url: postgres.as_ref().map(|p| p.url.clone()),
            admin_token: admin_token.clone(),
            max_concurrent_uploads: args.max_concurrent_uploads.unwrap_or_else(default_upload_slots),
            max_queued_uploads: args.max_queued_uploads,
            checkin_retry_ms: args.checkin_retry_ms,
            tick_ms: 200,
            log_filter: args.server_log.clone(),
            log_path: data_dir.join(format!("{name}.log")),
            tls: tls_files.clone(),
            blob_store: args.blob_store.clone(),
        });
    }
    let http = client_tls.configure(reqwest::Client::builder())?.build()?;
    let replicas = Replicas::start(options, &http).await?;
    let first = replicas.first();
    eprintln!(
        "fedhive-load: {} server replica(s) from port {}, logs in {}",
        args.replicas.max(1),
        first.addr.port(),
        data_dir.display()
    );
    let (base_url, addr, pid) = (first.base_url.clone(), first.addr, first.pid());
    let balancer = match args.replicas > 1 {
        true => Some(Balancer::start(&args.haproxy, &replicas.ports(), &http).await?),
        false => None,
    };
    let (base_url, addr) = match &balancer {
        Some(b) => (format!("http://{}", b.addr), b.addr),
        None => (base_url, addr),
    };
    Ok(Target {
        base_url,
        client_tls,
        addr,
        admin_token,
        // One process the whole run: the report's `server` is it.
        pid: (args.replicas <= 1 && args.kill_every_secs <= 0.0).then_some(pid),
        database: if postgres.is_some() { "postgres" } else { "sqlite" }.into(),
        blob_store: args.blob_store.clone().unwrap_or_else(|| "directory".into()),
        replicas: Some(Arc::new(Mutex::new(replicas))),
        balancer,
        postgres,
        _data_dir: tempdir,
    })
}

/// For the devices that vanish mid-upload over a raw connection: the TLS connector and the
/// server's name, when the target speaks HTTPS.
fn raw_tls(target: &Target) -> anyhow::Result<Option<device::RawTls>> {
    let Some(rest) = target.base_url.strip_prefix("https://") else {
        return Ok(None);
    };
    let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host).to_string();
    Ok(Some(device::RawTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(target.client_tls.rustls_config()?)),
        server_name: rustls_pki_types::ServerName::try_from(host).context("the server's host name")?,
    }))
}

async fn create_task(
    http: &reqwest::Client,
    target: &Target,
    shape: &TaskShape,
) -> anyhow::Result<TaskCreated> {
    let config = serde_json::to_string(&synth::task_config(shape))?;
    let model = NamedTensors::zeros(&shape.specs).encode();
    let form = reqwest::multipart::Form::new()
        .text("config", config)
        .part("model", reqwest::multipart::Part::bytes(model));
    let resp = http
        .post(format!("{}/v1/tasks", target.base_url))
        .bearer_auth(&target.admin_token)
        .multipart(form)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("creating the task: {} {}", resp.status(), resp.text().await?);
    }
    Ok(resp.json().await?)
}

/// `GET path` with the admin token; a non-2xx answer is an error naming the path.
async fn admin_response(
    http: &reqwest::Client,
    target: &Target,
    path: &str,
) -> anyhow::Result<reqwest::Response> {
    let resp = http
        .get(format!("{}{path}", target.base_url))
        .bearer_auth(&target.admin_token)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("GET {path}: {} {}", resp.status(), resp.text().await?);
    }
    Ok(resp)
}

async fn admin_get<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    target: &Target,
    path: &str,
) -> anyhow::Result<T> {
    Ok(admin_response(http, target, path).await?.json().await?)
}

/// The server's Prometheus text (`GET /metrics`).
async fn server_metrics(http: &reqwest::Client, target: &Target) -> anyhow::Result<String> {
    Ok(admin_response(http, target, "/metrics").await?.text().await?)
}

/// Runs the load; `Ok(true)` when the exactly-once check passed.
async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let specs = synth::model_specs(args.params, args.tensors);
    let k = args.devices_per_round;
    let shape = TaskShape {
        specs: specs.clone(),
        devices_per_round: k,
        min_devices_per_round: args.min_devices_per_round.unwrap_or(k.div_ceil(2)),
        over_selection: args.over_selection,
        round_deadline_secs: args.round_deadline_secs,
        rounds: if args.rounds == 0 { u32::MAX } else { args.rounds },
        update_encoding: args.update_encoding,
    };
    let (variants, seed, encoding) = (args.update_variants, args.seed, args.update_encoding);
    let bodies = {
        let specs = specs.clone();
        tokio::task::spawn_blocking(move || synth::update_bodies(&specs, variants, seed, encoding)).await?
    };
    let update_bytes = bodies[0].len() as u64;

    let target = start_target(&args).await?;
    let admin_http = target.client_tls.configure(reqwest::Client::builder())?.build()?;
    let task = create_task(&admin_http, &target, &shape).await?;

    let http = target
        .client_tls
        .configure(
            reqwest::Client::builder()
                .timeout(Duration::from_secs(args.request_timeout_secs))
                .connect_timeout(Duration::from_secs(30))
                .tcp_nodelay(true),
        )?
        .build()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let fleet = Arc::new(Fleet {
        http,
        base_url: target.base_url.clone(),
        addr: target.addr,
        raw_tls: raw_tls(&target)?,
        task_id: task.task_id.clone(),
        bodies: Arc::new(bodies),
        options: DeviceOptions {
            train_time: Duration::from_millis(args.train_ms),
            dropout: args.dropout,
            mid_upload_share: args.mid_upload_share,
            retries: args.retries,
            retry_backoff: Duration::from_millis(args.retry_backoff_ms),
            duplicate_rate: args.duplicate_rate,
        },
        stats: stats.clone(),
        stop: stop_rx,
    });

    let started = Instant::now();
    let first_server = target.pid.and_then(server::sample).unwrap_or_default();
    let first_self = server::sample(std::process::id()).unwrap_or_default();
    let devices: Vec<_> = (0..args.devices)
        .map(|i| tokio::spawn(fleet.clone().run(i, args.seed)))
        .collect();
    let faults = match (&target.replicas, args.kill_every_secs > 0.0) {
        (Some(replicas), true) => Some(tokio::spawn(replicas::inject_faults(
            replicas.clone(),
            Duration::from_secs_f64(args.kill_every_secs),
            Duration::from_millis(args.restart_after_ms),
            admin_http.clone(),
            fleet.stop.clone(),
            args.seed,
        ))),
        (None, true) => bail!("--kill-every-secs needs servers the harness starts (no --server-url)"),
        _ => None,
    };

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(args.duration_secs), ProgressDrawTarget::stderr())
    };
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:20}] {msg}",
    )?);
    let mut server_samples: Vec<(f64, ProcSample)> = Vec::new();
    let mut self_samples: Vec<(f64, ProcSample)> = Vec::new();
    let mut commit_times: Vec<f64> = Vec::new();
    let mut committed_seen = 0i64;
    let duration = Duration::from_secs(args.duration_secs);
    let mut stopping_since: Option<Instant> = None;
    let grace = Duration::from_secs(args.request_timeout_secs) + Duration::from_millis(args.train_ms * 2);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = started.elapsed().as_secs_f64();
        if let Some(s) = target.pid.and_then(server::sample) {
            server_samples.push((t, s));
        }
        if let Some(s) = server::sample(std::process::id()) {
            self_samples.push((t, s));
        }
        if let Some(replicas) = &target.replicas
            && !replicas.lock().await.sample()
            && faults.is_none()
        {
            bail!("a server process exited during the run");
        }
        let status: Option<TaskStatus> =
            admin_get(&admin_http, &target, &format!("/v1/tasks/{}", task.task_id))
                .await
                .ok();
        if let Some(st) = &status {
            while committed_seen < st.committed_rounds {
                committed_seen += 1;
                commit_times.push(t);
            }
        }
        let finished = status.as_ref().is_some_and(|s| s.state.is_over());
        let (requests, errors) = stats.totals();
        bar.set_position(started.elapsed().as_secs().min(args.duration_secs));
        bar.set_message(format!(
            "{} rounds | {} accepted | {:.0} req/s | {} errors | server RSS {:.0} MB{}",
            committed_seen,
            stats.accepted(),
            requests as f64 / t.max(1e-9),
            errors,
            server_samples
                .last()
                .map_or(0.0, |s| s.1.rss_bytes as f64 / 1048576.0),
            if stopping_since.is_some() {
                " | finishing in-flight uploads"
            } else {
                ""
            }
        ));
        if stopping_since.is_none() && (started.elapsed() >= duration || finished) {
            stop_tx.send_replace(true);
            stopping_since = Some(Instant::now());
        }
        if let Some(since) = stopping_since
            && (devices.iter().all(|d| d.is_finished()) || since.elapsed() > grace)
        {
            break;
        }
    }
    bar.finish_and_clear();
    let unfinished = devices.iter().filter(|d| !d.is_finished()).count();
    for d in &devices {
        d.abort();
    }
    if unfinished > 0 {
        eprintln!("fedhive-load: {unfinished} devices were still busy after the grace period");
    }
    // Every replica runs again before the outcomes are reconciled.
    let replica_kills = match faults {
        Some(task) => task.await??,
        None => 0,
    };

    // Uploads whose outcome the devices never learnt: ask again with the same token and bytes,
    // several at once. While the server still holds the original in its upload queue it answers
    // `409 upload_in_flight`; keep asking until the request timeout has passed once more.
    let deadline = Instant::now() + Duration::from_secs(args.request_timeout_secs);
    let mut asking = tokio::task::JoinSet::new();
    let mut unresolved = 0;
    for (k, pending) in stats.take_pending().into_iter().enumerate() {
        if asking.len() >= RECONCILE_CONCURRENCY
            && let Some(done) = asking.join_next().await
        {
            unresolved += reconciled(&stats, done?);
        }
        let (fleet, seed) = (fleet.clone(), args.seed ^ k as u64);
        asking.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed);
            loop {
                match fleet.reconcile(&pending, &mut rng).await {
                    Err(e) if e.contains("upload_in_flight") && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    answer => return answer,
                }
            }
        });
    }
    while let Some(done) = asking.join_next().await {
        unresolved += reconciled(&stats, done?);
    }
    let seconds = started.elapsed().as_secs_f64();

    let rounds: Vec<RoundInfo> = admin_get(
        &admin_http,
        &target,
        &format!("/v1/tasks/{}/rounds", task.task_id),
    )
    .await?;
    let committed: Vec<&RoundInfo> = rounds
        .iter()
        .filter(|r| r.state == RoundState::Committed)
        .collect();
    let commits: Vec<(f64, i64)> = commit_times
        .iter()
        .zip(&committed)
        .map(|(t, r)| (*t, r.accepted))
        .collect();
    let conflicts = stats.conflicting_receipts().len();
    let exactly_once = verify::verify(&rounds, &stats.receipts(), conflicts, unresolved);

    let server_usage = target.pid.and_then(|pid| {
        let last = server::sample(pid)?;
        Some(ProcessUsage::new(
            pid,
            &server_samples,
            last,
            first_server.cpu_secs,
            seconds,
        ))
    });
    let self_last = server::sample(std::process::id()).unwrap_or_default();
    let generator = ProcessUsage::new(
        std::process::id(),
        &self_samples,
        self_last,
        first_self.cpu_secs,
        seconds,
    );
    let endpoints = stats.summaries(Duration::from_secs_f64(seconds));
    let c = &stats.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let mut report = Report {
        setup: Setup {
            devices: args.devices,
            devices_per_round: k,
            params: args.params,
            update_bytes,
            update_encoding: args.update_encoding,
            database: target.database.clone(),
            blob_store: target.blob_store.clone(),
            train_ms: args.train_ms,
            dropout: args.dropout,
            retries: args.retries,
            duplicate_rate: args.duplicate_rate,
            max_concurrent_uploads: args.max_concurrent_uploads.unwrap_or_else(default_upload_slots),
            max_queued_uploads: args.max_queued_uploads,
            duration_secs: args.duration_secs as f64,
            replicas: args.replicas.max(1),
        },
        seconds,
        task_id: task.task_id.clone(),
        rounds_committed: committed.len() as i64,
        rounds_abandoned: rounds.iter().filter(|r| r.state == RoundState::Abandoned).count() as i64,
        updates_accepted: stats.accepted(),
        updates_per_sec: stats.accepted() as f64 / seconds,
        round_times: RoundTimes::from_commits(&commits),
        errors: Report::errors_from(&endpoints),
        bytes_sent: endpoints.iter().map(|e| e.bytes_sent).sum(),
        bytes_received: endpoints.iter().map(|e| e.bytes_received).sum(),
        endpoints,
        events: Events {
            assignments: get(&c.assignments),
            retry_after: get(&c.retry_after),
            dropped_after_checkin: get(&c.dropped_after_checkin),
            dropped_mid_upload: get(&c.dropped_mid_upload),
            download_failed: get(&c.download_failed),
            late: get(&c.late),
            rejected: get(&c.rejected),
            retries: get(&c.retries),
            busy_waits: get(&c.busy_waits),
            duplicates_sent: get(&c.duplicates_sent),
            duplicates_identical: get(&c.duplicates_identical),
            duplicates_different: get(&c.duplicates_different),
            reconciled_accepted: get(&c.reconciled),
        },
        server: server_usage,
        generator,
        exactly_once,
        server_stages: match server_metrics(&admin_http, &target).await {
            Ok(text) => profile::stages(&text),
            Err(e) => {
                eprintln!("fedhive-load: no stage profile: {e:#}");
                Vec::new()
            }
        },
        baseline: None,
        durable_baseline: None,
        replicas: Vec::new(),
        server_cpu_ms_per_update: None,
        round_sums: None,
        replica_kills,
    };
    if let Some(replicas) = &target.replicas {
        let mut replicas = replicas.lock().await;
        report.replicas = replicas.usage();
        let cpu: f64 = report.replicas.iter().map(|r| r.cpu_secs).sum();
        report.server_cpu_ms_per_update =
            (report.updates_accepted > 0).then(|| cpu * 1e3 / report.updates_accepted as f64);
        let mut expositions = Vec::new();
        for url in replicas.base_urls() {
            let resp = admin_http
                .get(format!("{url}/metrics"))
                .bearer_auth(&target.admin_token)
                .send()
                .await?;
            expositions.push(resp.text().await?);
        }
        report.round_sums = Some(profile::round_sums(expositions.iter().map(String::as_str)));
    }
    // The server under test is gone before the baseline starts, so the two never share the CPU.
    target.cleanup().await?;
    if args.baseline_secs > 0 {
        // Then the same with every body fsynced, in a folder beside the server's data directory
        // (the same disk).
        let disk = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
        let durable_dir = tempfile::tempdir_in(disk)?;
        let mut baselines = Vec::new();
        for durable in [None, Some(durable_dir.path())] {
            let server = discard::DiscardProcess::spawn(durable)?;
            let baseline = discard::measure(
                &fleet.http,
                (server.addr, server.pid()),
                fleet.bodies.clone(),
                args.devices,
                Duration::from_secs(args.baseline_secs),
            )
            .await?;
            baselines.push(report::BaselineComparison::new(baseline, &report));
        }
        report.durable_baseline = baselines.pop();
        report.baseline = baselines.pop();
    }
    print!("{}", report.table());
    println!("{}", serde_json::to_string(&report)?);

    Ok(report.exactly_once.ok && report.events.duplicates_different == 0)
}

/// Unknown upload outcomes re-asked at once at the end of a run.
const RECONCILE_CONCURRENCY: usize = 16;

/// Counts one re-asked upload's answer; returns 1 if its outcome is still unknown.
fn reconciled(stats: &stats::Stats, answer: Result<bool, String>) -> usize {
    match answer {
        Ok(true) => {
            stats::Counters::bump(&stats.counters.reconciled);
            0
        }
        Ok(false) => 0,
        Err(e) => {
            eprintln!("fedhive-load: upload outcome still unknown: {e}");
            1
        }
    }
}
