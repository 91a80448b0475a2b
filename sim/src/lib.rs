//! fedhive simulations: a real server and simulated devices that really train (burn) on real data,
//! talking over HTTP on loopback.

pub mod anon_embeddings;
pub mod availability;
pub mod availability_scenario;
pub mod bench_training;
pub mod block_cyclic;
pub mod dc_ccl;
pub mod demo;
pub mod hot_cold;
pub mod join;

/// The values clap gives a command's options when none is passed, so a scenario's `Default` and its
/// command line cannot disagree.
pub(crate) fn clap_defaults<T: clap::Args>(command: &'static str) -> T {
    let matches = T::augment_args(clap::Command::new(command)).get_matches_from([command]);
    T::from_arg_matches(&matches).expect("every option has a default")
}

/// A fedhive server started in this process for one simulated run: loopback, no admin token, state
/// in a temporary directory that lives as long as this value.
pub(crate) struct LocalServer {
    pub server: fedhive_server::RunningServer,
    pub client: fedhive_client::client::FedhiveClient,
    /// The database kind (`sqlite` or `postgres`), for the run's summary.
    pub database: String,
    _state_dir: tempfile::TempDir,
}

impl LocalServer {
    /// Starts one on `database_url` (a temporary SQLite file when `None`), telling devices to come
    /// back after `checkin_retry_ms` and ticking round deadlines every `tick`.
    pub(crate) async fn start(
        database_url: Option<String>,
        checkin_retry_ms: u64,
        tick: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let state_dir = tempfile::tempdir()?;
        let mut config =
            fedhive_server::ServerConfig::new("127.0.0.1:0".parse()?, state_dir.path().to_path_buf());
        config.database_url = database_url;
        config.insecure_dev = true;
        config.coordinator.checkin_retry_ms = checkin_retry_ms;
        config.tick = tick;
        let database = config
            .database_url()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let server = fedhive_server::start(config).await?;
        let client = fedhive_client::client::FedhiveClient::new(&format!("http://{}", server.addr))?;
        Ok(LocalServer {
            server,
            client,
            database,
            _state_dir: state_dir,
        })
    }
}
