//! Command line of the `fedhive` binary.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand};

use crate::{CoordinatorOptions, ServerConfig, coordinator::default_upload_slots};

#[derive(Debug, Parser)]
#[command(
    name = "fedhive",
    version,
    about = "fedhive federated-learning aggregation server",
    // A flag given twice takes its last value: `--config` values go first, the command line after.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the aggregation server.
    Serve(ServeArgs),
    /// Create, list, inspect, pause, resume or cancel tasks on a running server.
    Task(crate::operator::TaskArgs),
    /// Download a task's model from a running server.
    Model(crate::operator::ModelArgs),
    /// Create, list or revoke named operator tokens on a running server (admin token only).
    Token(crate::operator::TokenArgs),
    /// Create, list or revoke enrolment keys (one per app release) on a running server.
    EnrolmentKey(crate::operator::EnrolmentKeyArgs),
    /// List or revoke enrolled devices on a running server.
    Device(crate::operator::DeviceArgs),
    /// Show a running server's audit log of operator actions, newest first.
    Audit(crate::operator::AuditArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML file of serve flags, keys named like the flags (`max_connections = 100` or
    /// `max-connections = 100`). The command line, then the flags' environment variables, win over it.
    #[arg(long, env = "FEDHIVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "FEDHIVE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for the SQLite database and the blob store.
    #[arg(long, env = "FEDHIVE_DATA_DIR", default_value = "fedhive-data")]
    pub data_dir: PathBuf,
    /// Database URL (sqlite://PATH or postgres://USER@HOST/DB); default: SQLite under --data-dir.
    #[arg(long, env = "FEDHIVE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Blob store for models and updates: `s3://BUCKET/PREFIX` (any S3-compatible store; endpoint
    /// and credentials from the `AWS_*` environment variables); default: `<data-dir>/blobs`.
    #[arg(long, env = "FEDHIVE_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// The bootstrap admin token: every operator endpoint, and the only credential that creates,
    /// lists and revokes named tokens (`fedhive token ...`).
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
    /// This replica's name when several share one database and blob store (default: the host
    /// name); see docs/replicas.md.
    #[arg(long, env = "FEDHIVE_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// Milliseconds a replica's claim to finalise a round holds unless renewed: how long a round
    /// waits after its finaliser dies before another replica finishes it.
    #[arg(long, default_value_t = 30_000)]
    pub finalise_lease_ms: u64,
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
    /// Load balancers in front (addresses or CIDR ranges, comma-separated, e.g.
    /// `10.0.0.0/8,192.0.2.7`): for a request from one of them, the per-address rate limit takes
    /// the client's address from `X-Forwarded-For` (the nearest entry not itself in this list).
    /// Without it, behind a balancer, every device shares the balancer's address.
    #[arg(long, env = "FEDHIVE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Serve HTTPS with this PEM certificate chain (leaf first); SIGHUP reloads it and the key.
    #[arg(long, env = "FEDHIVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "FEDHIVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates of operators' and the cloud worker's client certificates: their routes
    /// then need one (devices need none).
    #[arg(long, env = "FEDHIVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback address (behind a TLS-terminating proxy); without it,
    /// TLS, or --insecure-dev, the server refuses to start there.
    #[arg(long, env = "FEDHIVE_ALLOW_PLAIN_HTTP")]
    pub allow_plain_http: bool,
    /// Check-ins and uploads per second from one enrolled device, by its authenticated id (0: no
    /// limit). Unlike an address, a device id is one device: set it near one device's own rate.
    #[arg(long, default_value_t = 0.0)]
    pub rate_limit_per_device: f64,
    /// Requests one device may send at once before its rate applies (default: 2 s of the rate).
    #[arg(long)]
    pub rate_limit_device_burst: Option<f64>,
}

impl ServeArgs {
    pub fn into_config(self) -> ServerConfig {
        let mut config = ServerConfig::new(self.listen, self.data_dir);
        config.database_url = self.database_url;
        config.blob_store = self.blob_store;
        config.admin_token = self.admin_token;
        config.insecure_dev = self.insecure_dev;
        config.coordinator = CoordinatorOptions {
            checkin_retry_ms: self.checkin_retry_ms,
            max_concurrent_uploads: self.max_concurrent_uploads.unwrap_or_else(default_upload_slots),
            max_queued_uploads: self.max_queued_uploads,
            device_rate_limit: rate_limit(self.rate_limit_per_device, self.rate_limit_device_burst),
            replica_name: self.replica_name,
            finalise_lease: Duration::from_millis(self.finalise_lease_ms.max(1)),
            ..CoordinatorOptions::default()
        };
        config.tick = Duration::from_millis(self.tick_ms);
        config.connections = crate::http::ConnectionLimits {
            max_connections: self.max_connections.max(1),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
        };
        config.body_read_timeout = Duration::from_secs(self.body_read_timeout_secs.max(1));
        config.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsSettings {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            _ => None,
        };
        config.allow_plain_http = self.allow_plain_http;
        config.rate_limit = rate_limit(self.rate_limit_per_address, self.rate_limit_burst);
        config.trusted_proxies = self.trusted_proxies;
        config
    }
}

/// A CIDR range, or one address (as a range of one).
fn parse_proxy(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is neither an IP address nor a CIDR range"))
}

/// A limit of `per_second` (none when 0) with bursts of `burst` (default: 2 s of the rate).
fn rate_limit(per_second: f64, burst: Option<f64>) -> Option<crate::rate_limit::RateLimit> {
    (per_second > 0.0).then(|| crate::rate_limit::RateLimit {
        per_second,
        burst: burst.unwrap_or(2.0 * per_second).max(1.0),
    })
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

/// The command line with the `--config` file's flags put before the user's own: each file key as
/// `--key=value` (a `true` boolean as `--key`), skipped when the flag's environment variable is
/// set. An unknown key, or a value that is not a string, number or boolean, is an error.
pub fn with_config_file(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Ok(Cli {
        command: Command::Serve(serve),
    }) = Cli::try_parse_from(&args)
    else {
        return Ok(args); // clap reports what is wrong with the command line itself
    };
    let Some(path) = serve.config else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| format!("{}: {e}", path.display()))?;
    let command = Cli::command();
    let serve_command = command.find_subcommand("serve").expect("the serve subcommand");
    let mut flags = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = serve_command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| format!("{}: unknown key `{key}`", path.display()))?;
        if arg.get_env().is_some_and(|env| std::env::var_os(env).is_some()) {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) if !arg.get_action().takes_values() => {
                if b {
                    flags.push(OsString::from(format!("--{long}")));
                }
                continue;
            }
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "{}: `{key}` = {other} is not a flag value",
                    path.display()
                ));
            }
        };
        flags.push(OsString::from(format!("--{long}={value}")));
    }
    let at = args.iter().position(|a| a == "serve").expect("parsed as serve") + 1;
    let mut out = args[..at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[at..]);
    Ok(out)
}

/// Entry point of the `fedhive` binary.
pub fn main() -> ExitCode {
    let args = match with_config_file(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("fedhive: --config: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    match &cli.command {
        Command::Serve(args) => init_tracing_as(args.log_format),
        // The operator commands print their results; logs only on request.
        Command::Task(_)
        | Command::Model(_)
        | Command::Token(_)
        | Command::EnrolmentKey(_)
        | Command::Device(_)
        | Command::Audit(_) => init_tracing_with_default("warn"),
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let grace = Duration::from_secs(args.shutdown_grace_secs);
                let mut server = crate::start(args.into_config()).await?;
                if let Some(tls) = server.tls.clone() {
                    tokio::spawn(tls.reload_on_sighup());
                }
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
            Command::Task(args) => crate::operator::task(args).await,
            Command::Model(args) => crate::operator::model(args).await,
            Command::Token(args) => crate::operator::token(args).await,
            Command::EnrolmentKey(args) => crate::operator::enrolment_key(args).await,
            Command::Device(args) => crate::operator::device(args).await,
            Command::Audit(args) => crate::operator::audit(args).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(config: &str, flags: &[&str]) -> Result<ServeArgs, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fedhive.toml");
        std::fs::write(&path, config).unwrap();
        let mut args: Vec<OsString> = vec!["fedhive".into(), "serve".into(), "--config".into(), path.into()];
        args.extend(flags.iter().map(OsString::from));
        match Cli::try_parse_from(with_config_file(args)?).map_err(|e| e.to_string())? {
            Cli {
                command: Command::Serve(serve),
            } => Ok(serve),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let serve = serve_args(
            "max_connections = 7\nheader-read-timeout-secs = 5\nrate_limit_per_address = 2.5\n\
             insecure_dev = true\nlog_format = \"json\"\nadmin_token = \"from-file\"\n\
             trusted_proxies = \"10.0.0.0/8, 192.0.2.7\"\n",
            &["--header-read-timeout-secs", "9"],
        )
        .unwrap();
        assert_eq!(serve.max_connections, 7);
        assert_eq!(serve.header_read_timeout_secs, 9);
        assert_eq!(serve.rate_limit_per_address, 2.5);
        assert!(serve.insecure_dev);
        assert_eq!(serve.log_format, LogFormat::Json);
        assert_eq!(serve.admin_token.as_deref(), Some("from-file"));
        let proxies: Vec<String> = serve.trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(proxies, ["10.0.0.0/8", "192.0.2.7/32"]);
    }

    #[test]
    fn unknown_keys_and_odd_values_are_named() {
        let e = serve_args("max_conections = 7\n", &[]).unwrap_err();
        assert!(e.contains("unknown key `max_conections`"), "{e}");
        let e = serve_args("max_connections = [1, 2]\n", &[]).unwrap_err();
        assert!(e.contains("`max_connections`"), "{e}");
        let e = serve_args("max_connections = \"many\"\n", &[]).unwrap_err();
        assert!(e.contains("many"), "{e}");
        let e = serve_args("trusted_proxies = \"10.0.0.0/8,balancer\"\n", &[]).unwrap_err();
        assert!(
            e.contains("`balancer` is neither an IP address nor a CIDR range"),
            "{e}"
        );
    }
}
