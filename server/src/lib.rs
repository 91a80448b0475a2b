//! fedhive aggregation server.
//!
//! Principal types: [`ServerConfig`] (what the `fedhive` binary parses), [`start`] (binds and runs
//! the server, returning its address), [`coordinator::Coordinator`] (the round lifecycle),
//! [`strategy::Strategy`] (what an algorithm adds to it, one module per algorithm),
//! [`db::Db`] (round state in SQLite or PostgreSQL) and [`blobs::BlobStore`] (tensor blobs).
//!
//! Architecture invariant: the database and the blob store hold all state; memory holds only caches
//! that a restart rebuilds. burn is not a dependency: aggregation runs on plain slices from
//! `fedhive-shared`.

pub mod access;
pub mod admission;
pub mod api;
pub mod blobs;
pub mod body_buffers;
pub mod cli;
pub mod coordinator;
pub mod db;
pub mod devices;
pub mod error;
pub mod group_commit;
pub mod group_fold;
pub mod http;
pub mod known_rounds;
pub mod memory;
pub mod operator;
pub mod rate_limit;
pub mod replicas;
pub mod store;
pub mod strategy;
pub mod tables;
pub mod telemetry;
pub mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, task::JoinHandle};

pub use coordinator::{Coordinator, CoordinatorOptions};

/// Everything needed to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Holds the SQLite file (unless `database_url` is given) and the blob directory.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; default: `sqlite://<data_dir>/fedhive.db`.
    pub database_url: Option<String>,
    /// `s3://bucket/prefix` (see [`blobs::BlobStore::connect`]); default: `<data_dir>/blobs`.
    pub blob_store: Option<String>,
    /// Bearer token for operator endpoints; `None` only together with `insecure_dev`.
    pub admin_token: Option<String>,
    pub insecure_dev: bool,
    pub coordinator: CoordinatorOptions,
    /// How often deadlines and interrupted rounds are checked.
    pub tick: Duration,
    /// Largest initial model accepted at task creation.
    pub max_model_bytes: usize,
    /// Open connections and header-read time (see [`http::ConnectionLimits`]).
    pub connections: http::ConnectionLimits,
    /// Time an upload's body has to arrive once its upload slot is granted (`408 body_timeout`).
    pub body_read_timeout: Duration,
    /// Per-address limit on check-ins and uploads (`None`: off; see [`rate_limit`]).
    pub rate_limit: Option<rate_limit::RateLimit>,
    /// Load balancers whose `X-Forwarded-For` the per-address limit reads the client's address
    /// from (without them it sees the balancer's).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Serve HTTPS with this certificate (`None`: plain HTTP).
    pub tls: Option<tls::TlsSettings>,
    /// Serve plain HTTP on an address other than loopback: for a server behind a TLS-terminating
    /// proxy. Without it (or `insecure_dev`) such a server does not start.
    pub allow_plain_http: bool,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            data_dir,
            database_url: None,
            blob_store: None,
            admin_token: None,
            insecure_dev: false,
            coordinator: CoordinatorOptions::default(),
            tick: Duration::from_millis(200),
            max_model_bytes: 1 << 30,
            connections: http::ConnectionLimits::default(),
            body_read_timeout: Duration::from_secs(60),
            rate_limit: None,
            trusted_proxies: Vec::new(),
            tls: None,
            allow_plain_http: false,
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", self.data_dir.join("fedhive.db").display()))
    }
}

/// A started server: its bound address and the task serving it.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub coordinator: Arc<Coordinator>,
    pub handle: JoinHandle<std::io::Result<()>>,
    /// The round ticker (deadlines, finalisation), which runs beside the HTTP server.
    pub ticker: JoinHandle<()>,
    /// The TLS certificate being served, to reload (SIGHUP); `None` for plain HTTP.
    pub tls: Option<Arc<tls::ServerTls>>,
    /// Tells the accept loop to stop accepting and drain (see [`RunningServer::drain`]).
    stop: tokio::sync::oneshot::Sender<()>,
}

impl RunningServer {
    /// Stops serving and ticking, then closes the database, for a server embedded in another
    /// program (the simulator starts one per run). The ticker stops first, so it never meets the
    /// closed pool.
    pub async fn shutdown(self) {
        self.handle.abort();
        self.ticker.abort();
        let _ = self.ticker.await;
        self.coordinator.db().close().await;
    }

    /// Graceful shutdown (SIGTERM): stops accepting connections, lets each open one finish the
    /// request it is serving, for at most `grace`, then stops the ticker and closes the database.
    /// False if connections were still open at the deadline (their requests are cut off; an
    /// upload that was not acknowledged is retried by its device and counted once).
    pub async fn drain(mut self, grace: Duration) -> bool {
        let _ = self.stop.send(());
        let drained = tokio::time::timeout(grace, &mut self.handle).await.is_ok();
        if !drained {
            self.handle.abort();
        }
        self.ticker.abort();
        let _ = self.ticker.await;
        self.coordinator.db().close().await;
        drained
    }
}

/// Opens the state, recovers interrupted rounds, binds, and serves in the background.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    if config.admin_token.is_none() && !config.insecure_dev {
        anyhow::bail!(
            "no admin token: pass --admin-token (or FEDHIVE_ADMIN_TOKEN), or --insecure-dev for a local demo"
        );
    }
    if config.tls.is_none()
        && !config.listen.ip().is_loopback()
        && !config.allow_plain_http
        && !config.insecure_dev
    {
        anyhow::bail!(
            "refusing plain HTTP on {}, which is not a loopback address: pass --tls-cert and --tls-key, or \
             --allow-plain-http behind a TLS-terminating proxy (or --insecure-dev for a local demo)",
            config.listen
        );
    }
    let tls = match &config.tls {
        None => None,
        Some(settings) => Some(Arc::new(
            tls::ServerTls::load(settings.clone()).context("loading the TLS certificate")?,
        )),
    };
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let url = config.database_url();
    let db = db::Db::connect(&url)
        .await
        .with_context(|| format!("opening database {}", redact(&url)))?;
    let local_blobs = config.data_dir.join("blobs");
    let blobs = match &config.blob_store {
        None => blobs::BlobStore::open(&local_blobs).context("opening blob store")?,
        Some(url) => blobs::BlobStore::connect(url, &local_blobs)?,
    };
    blobs.check().await.with_context(|| {
        format!(
            "reaching blob store {}",
            config.blob_store.as_deref().unwrap_or("(directory)")
        )
    })?;
    let coordinator = Arc::new(Coordinator::new(db, blobs, config.coordinator.clone()));
    coordinator.tick().await.context("recovering rounds")?;
    tokio::spawn({
        let coordinator = coordinator.clone();
        async move {
            if let Err(e) = coordinator.sweep_ended_rounds().await {
                tracing::warn!(error = %e, "could not remove the update blobs of ended rounds");
            }
        }
    });
    // The ticker task also returns freed memory to the system every few seconds (see `memory`).
    let ticker = tokio::spawn({
        let rounds = coordinator.clone().run_ticker(config.tick);
        async move {
            tokio::join!(rounds, memory::trim_every(Duration::from_secs(5)));
        }
    });

    let state = api::AppState {
        coordinator: coordinator.clone(),
        admin_token: config.admin_token.clone(),
        body_read_timeout: config.body_read_timeout,
        rate_limit: config
            .rate_limit
            .map(|limit| Arc::new(rate_limit::RateLimiter::new(limit))),
        trusted_proxies: config.trusted_proxies.clone().into(),
        client_certificates: tls.as_ref().is_some_and(|tls| tls.verifies_clients()),
    };
    let app = api::router(state, config.max_model_bytes);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, database = %redact(&url), "fedhive server listening");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let open_connections = coordinator.telemetry().open_connections();
    let handle = tokio::spawn(http::serve(
        listener,
        app,
        tls.as_ref().map(|tls| tls.acceptor()),
        config.connections,
        open_connections,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(RunningServer {
        addr,
        coordinator,
        handle,
        ticker,
        tls,
        stop,
    })
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}
