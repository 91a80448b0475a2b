//! Command line of the `fedhive` binary.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{CoordinatorOptions, ServerConfig, coordinator::default_upload_slots};

#[derive(Debug, Parser)]
#[command(
    name = "fedhive",
    version,
    about = "fedhive federated-learning aggregation server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the aggregation server.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FEDHIVE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for the SQLite database and the blob store.
    #[arg(long, env = "FEDHIVE_DATA_DIR", default_value = "fedhive-data")]
    pub data_dir: PathBuf,
    /// Database URL (sqlite://PATH or postgres://USER@HOST/DB); default: SQLite under --data-dir.
    #[arg(long, env = "FEDHIVE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Bearer token required by operator endpoints.
    #[arg(long, env = "FEDHIVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Serve operator endpoints without a token (local demos only).
    #[arg(long)]
    pub insecure_dev: bool,
    /// Milliseconds a device is told to wait when the round is full or between rounds.
    #[arg(long, default_value_t = 1000)]
    pub checkin_retry_ms: u64,
    /// Uploads read and validated at once (bounds memory to this many model-sized buffers);
    /// default: one per CPU core, at least 2.
    #[arg(long)]
    pub max_concurrent_uploads: Option<usize>,
    /// Uploads that may wait for a processing slot; beyond them devices get `503 server_busy` with a
    /// retry time (keeps thousands of unread model-sized bodies out of the kernel's socket buffers).
    #[arg(long, default_value_t = 64)]
    pub max_queued_uploads: usize,
    /// Milliseconds between checks for round deadlines.
    #[arg(long, default_value_t = 200)]
    pub tick_ms: u64,
    /// Open connections at most; past it the server stops accepting until one closes.
    #[arg(long, default_value_t = 50_000)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's header block before its connection is closed.
    #[arg(long, default_value_t = 30)]
    pub header_read_timeout_secs: u64,
    /// Log lines as human-readable text or as one JSON object per line (for log collectors).
    #[arg(long, env = "FEDHIVE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// On SIGTERM or SIGINT: seconds to let requests in flight (uploads included) finish after the
    /// server stops accepting connections.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Seconds an upload's body has to arrive once its upload slot is granted (`408 body_timeout`).
    #[arg(long, default_value_t = 60)]
    pub body_read_timeout_secs: u64,
    /// Check-ins and uploads per second from one IP address (0: no limit). Phones behind a
    /// carrier's NAT share addresses: set it well above one device's rate.
    #[arg(long, default_value_t = 0.0)]
    pub rate_limit_per_address: f64,
    /// Requests one address may send at once before the rate applies (default: 2 s of the rate).
    #[arg(long)]
    pub rate_limit_burst: Option<f64>,
}

impl ServeArgs {
    pub fn into_config(self) -> ServerConfig {
        let mut config = ServerConfig::new(self.listen, self.data_dir);
        config.database_url = self.database_url;
        config.admin_token = self.admin_token;
        config.insecure_dev = self.insecure_dev;
        config.coordinator = CoordinatorOptions {
            checkin_retry_ms: self.checkin_retry_ms,
            max_concurrent_uploads: self.max_concurrent_uploads.unwrap_or_else(default_upload_slots),
            max_queued_uploads: self.max_queued_uploads,
        };
        config.tick = Duration::from_millis(self.tick_ms);
        config.connections = crate::http::ConnectionLimits {
            max_connections: self.max_connections.max(1),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
        };
        config.body_read_timeout = Duration::from_secs(self.body_read_timeout_secs.max(1));
        config.rate_limit = (self.rate_limit_per_address > 0.0).then(|| crate::rate_limit::RateLimit {
            per_second: self.rate_limit_per_address,
            burst: self
                .rate_limit_burst
                .unwrap_or(2.0 * self.rate_limit_per_address)
                .max(1.0),
        });
        config
    }
}

/// Resolves on SIGTERM (how orchestrators stop a service) or SIGINT (Ctrl-C), naming which.
async fn shutdown_signal() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`), `target`, `span`.
    Json,
}

/// Sets up human-readable logs on stderr (`RUST_LOG` filters; default `info`).
pub fn init_tracing() {
    init_tracing_with_default("info")
}

/// Sets up logs on stderr in `format` (`RUST_LOG` filters; default `info`).
pub fn init_tracing_as(format: LogFormat) {
    if format == LogFormat::Text {
        return init_tracing();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Like [`init_tracing`] with another default level (the demo keeps its progress bar clean).
pub fn init_tracing_with_default(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Entry point of the `fedhive` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(args) => init_tracing_as(args.log_format),
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let grace = Duration::from_secs(args.shutdown_grace_secs);
                let mut server = crate::start(args.into_config()).await?;
                let signal = tokio::select! {
                    served = &mut server.handle => return Ok(served??),
                    signal = shutdown_signal() => signal,
                };
                tracing::info!(
                    signal,
                    grace_secs = grace.as_secs(),
                    "shutting down: finishing requests in flight"
                );
                if server.drain(grace).await {
                    tracing::info!("every connection closed; exiting");
                } else {
                    tracing::warn!("connections still open at the grace deadline; exiting");
                }
                anyhow::Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedhive: {e:#}");
            ExitCode::FAILURE
        }
    }
}
