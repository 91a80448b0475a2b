//! Harness for fedhive's end-to-end tests: start the real server binary on a fresh SQLite directory or
//! a fresh PostgreSQL database, talk to it over loopback HTTP, kill it with SIGKILL, restart it on
//! the same state.
//!
//! PostgreSQL: `FEDHIVE_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`) names the server;
//! every test creates its own database there and drops it at the end, so tests run in parallel.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use fedhive_client::client::{ClientTls, FedhiveClient, RetryPolicy};
use fedhive_shared::{
    NamedTensors, Tensor, TensorSpec,
    wire::{Assignment, CheckinResponse, StrategyConfig, TaskConfig, TrainingParams},
};
pub use fedhive_tls::dev_ca::DevCa;
use sqlx::{Connection, Executor};

pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// Defines each listed `async fn name(backend: Backend)` as two tests, `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name($crate::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name($crate::Backend::Postgres).await } )*
        }
    };
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test: a file under the test's data dir, or a PostgreSQL database of its own.
pub struct TestDb {
    pub url: Option<String>,
    pg_name: Option<String>,
}

fn pg_admin_url() -> String {
    std::env::var("FEDHIVE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TestDb {
    pub async fn create(backend: Backend) -> anyhow::Result<TestDb> {
        match backend {
            Backend::Sqlite => Ok(TestDb {
                url: None,
                pg_name: None,
            }),
            Backend::Postgres => {
                let name = format!("fedhive_test_{:016x}", rand::random::<u64>());
                let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", pg_admin_url()))
                    .await
                    .context("connecting to PostgreSQL (is it running? see .ci/run)")?;
                conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await?;
                conn.close().await?;
                Ok(TestDb {
                    url: Some(format!("{}/{name}", pg_admin_url())),
                    pg_name: Some(name),
                })
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else { return };
        // Drop runs outside any runtime guarantee: use a private one on a fresh thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", pg_admin_url()))
                    .await
                    .ok()?;
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .await
                .ok()
            })
        })
        .join();
    }
}

/// A running `fedhive serve` process.
pub struct ServerProcess {
    child: Child,
    pub base_url: String,
    pub data_dir: PathBuf,
    database_url: Option<String>,
    port: u16,
    /// How clients check this server (the test CA for an HTTPS server).
    pub client_tls: ClientTls,
    /// The flags it was started with (a restart keeps them).
    flags: Vec<String>,
    /// Where its log goes and at what `RUST_LOG` (a restart appends); `None`: the test's stderr at
    /// `warn`.
    log: Option<(PathBuf, String)>,
    /// Extra environment variables (a restart keeps them).
    env: Vec<(String, String)>,
}

/// A prefix of its own, for one test, in the test bucket of a real S3 server (SeaweedFS, which
/// `.ci/run` installs and starts like PostgreSQL): `FEDHIVE_TEST_S3_ENDPOINT` (default
/// `http://127.0.0.1:8333`), `FEDHIVE_TEST_S3_BUCKET` (default `fedhive-test`), and the credentials
/// `FEDHIVE_TEST_S3_KEY`/`FEDHIVE_TEST_S3_SECRET` (default `fedhive-test`/`fedhive-test-secret`).
#[derive(Debug, Clone)]
pub struct S3Prefix {
    /// `s3://bucket/prefix`, as `fedhive serve --blob-store` takes it.
    pub url: String,
    /// The server's `AWS_*` environment for it.
    pub env: Vec<(String, String)>,
}

impl S3Prefix {
    pub fn new() -> S3Prefix {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let bucket = var("FEDHIVE_TEST_S3_BUCKET", "fedhive-test");
        let prefix = format!("t{:016x}", rand::random::<u64>());
        S3Prefix {
            url: format!("s3://{bucket}/{prefix}"),
            env: vec![
                (
                    "AWS_ENDPOINT".into(),
                    var("FEDHIVE_TEST_S3_ENDPOINT", "http://127.0.0.1:8333"),
                ),
                (
                    "AWS_ACCESS_KEY_ID".into(),
                    var("FEDHIVE_TEST_S3_KEY", "fedhive-test"),
                ),
                (
                    "AWS_SECRET_ACCESS_KEY".into(),
                    var("FEDHIVE_TEST_S3_SECRET", "fedhive-test-secret"),
                ),
                ("AWS_ALLOW_HTTP".into(), "true".into()),
            ],
        }
    }

    /// The same store as the server's, for a test to look into (settings as `object_store`
    /// names them: the environment's names, lower-case).
    pub fn open(&self, local: &Path) -> fedhive_server::blobs::BlobStore {
        let settings: Vec<(String, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.clone()))
            .collect();
        fedhive_server::blobs::BlobStore::connect_with(&self.url, local, &settings)
            .expect("the test S3 store (SeaweedFS: .ci/run starts it)")
    }
}

impl Default for S3Prefix {
    fn default() -> Self {
        Self::new()
    }
}

/// The `fedhive-e2e-server` binary: cargo builds a package's binaries for its integration tests and
/// puts them one folder above the test executables (`target/<profile>/deps/..`).
fn server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("FEDHIVE_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    profile_dir.join(format!("fedhive-e2e-server{}", std::env::consts::EXE_SUFFIX))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ServerProcess {
    /// Starts the server on `data_dir` (and `db`'s URL) and waits until it answers.
    pub async fn start(data_dir: &Path, db: &TestDb) -> anyhow::Result<ServerProcess> {
        Self::start_on(
            data_dir,
            db.url.clone(),
            free_port(),
            &[],
            ClientTls::default(),
            None,
            &[],
        )
        .await
    }

    /// Like [`ServerProcess::start`], its blobs in `s3` (`--blob-store`, and the `AWS_*`
    /// environment).
    pub async fn start_on_s3(data_dir: &Path, db: &TestDb, s3: &S3Prefix) -> anyhow::Result<ServerProcess> {
        Self::start_on(
            data_dir,
            db.url.clone(),
            free_port(),
            &["--blob-store", &s3.url],
            ClientTls::default(),
            None,
            &s3.env,
        )
        .await
    }

    /// Like [`ServerProcess::start_on_s3`], with extra `fedhive serve` flags: one of several
    /// replicas on one database and one S3 prefix.
    pub async fn start_on_s3_with(
        data_dir: &Path,
        db: &TestDb,
        s3: &S3Prefix,
        flags: &[&str],
    ) -> anyhow::Result<ServerProcess> {
        let mut all = vec!["--blob-store", &s3.url];
        all.extend_from_slice(flags);
        Self::start_on(
            data_dir,
            db.url.clone(),
            free_port(),
            &all,
            ClientTls::default(),
            None,
            &s3.env,
        )
        .await
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Like [`ServerProcess::start_with`], its log (at `rust_log`, a `RUST_LOG` filter) written to
    /// `log_file` instead of the test's stderr, for a test to read ([`ServerProcess::log`]).
    pub async fn start_logged(
        data_dir: &Path,
        db: &TestDb,
        flags: &[&str],
        log_file: &Path,
        rust_log: &str,
    ) -> anyhow::Result<ServerProcess> {
        let log = Some((log_file.to_path_buf(), rust_log.to_string()));
        Self::start_on(
            data_dir,
            db.url.clone(),
            free_port(),
            flags,
            ClientTls::default(),
            log,
            &[],
        )
        .await
    }

    /// What the server has logged so far (started with [`ServerProcess::start_logged`]).
    pub fn log(&self) -> String {
        let (path, _) = self.log.as_ref().expect("started with start_logged");
        std::fs::read_to_string(path).expect("reading the server's log")
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Like [`ServerProcess::start`], with extra `fedhive serve` flags.
    pub async fn start_with(data_dir: &Path, db: &TestDb, flags: &[&str]) -> anyhow::Result<ServerProcess> {
        Self::start_on(
            data_dir,
            db.url.clone(),
            free_port(),
            flags,
            ClientTls::default(),
            None,
            &[],
        )
        .await
    }

    /// Like [`ServerProcess::start_with`], serving HTTPS as `https://localhost:PORT` with a
    /// certificate from `ca` (its files written under `data_dir`), which the clients trust.
    pub async fn start_https(
        data_dir: &Path,
        db: &TestDb,
        ca: &DevCa,
        flags: &[&str],
    ) -> anyhow::Result<ServerProcess> {
        let issued = ca.issue(&["localhost"]);
        let (cert, key) = (data_dir.join("tls-cert.pem"), data_dir.join("tls-key.pem"));
        std::fs::create_dir_all(data_dir)?;
        std::fs::write(&cert, &issued.cert_pem)?;
        std::fs::write(&key, &issued.key_pem)?;
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let mut all = vec!["--tls-cert", &cert, "--tls-key", &key];
        all.extend_from_slice(flags);
        let client_tls = ClientTls {
            ca_pem: Some(ca.cert_pem()),
            ..ClientTls::default()
        };
        Self::start_on(data_dir, db.url.clone(), free_port(), &all, client_tls, None, &[]).await
    }

    async fn start_on(
        data_dir: &Path,
        database_url: Option<String>,
        port: u16,
        flags: &[&str],
        client_tls: ClientTls,
        log: Option<(PathBuf, String)>,
        env: &[(String, String)],
    ) -> anyhow::Result<ServerProcess> {
        let https = flags.contains(&"--tls-cert");
        let mut cmd = Command::new(server_binary());
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--admin-token")
            .arg(ADMIN_TOKEN)
            .args(["--tick-ms", "50", "--checkin-retry-ms", "100"])
            .args(flags)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null());
        match &log {
            Some((path, filter)) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .context("opening the server's log file")?;
                cmd.env("RUST_LOG", filter).env("NO_COLOR", "1").stderr(file);
            }
            None => {
                cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
            }
        }
        if let Some(url) = &database_url {
            cmd.arg("--database-url").arg(url);
        }
        let child = cmd.spawn().context("spawning the server binary")?;
        let mut server = ServerProcess {
            child,
            base_url: if https {
                format!("https://localhost:{port}")
            } else {
                format!("http://127.0.0.1:{port}")
            },
            data_dir: data_dir.to_path_buf(),
            database_url,
            port,
            client_tls,
            flags: flags.iter().map(|flag| flag.to_string()).collect(),
            log,
            env: env.to_vec(),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let http = self.client_tls.configure(reqwest::Client::builder())?.build()?;
        loop {
            if let Ok(resp) = http.get(format!("{}/healthz", self.base_url)).send().await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("server exited during start-up: {status}");
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("server did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown hooks, no flushing; whatever was not durable is gone.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// SIGTERM: the server drains (stops accepting, finishes requests in flight) and exits.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit by itself (panics after `timeout`).
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the server") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "the server did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a new process on the same data dir, database and port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let fresh = Self::start_on(
            &self.data_dir,
            self.database_url.clone(),
            self.port,
            &flags,
            self.client_tls.clone(),
            self.log.clone(),
            &self.env,
        )
        .await?;
        *self = fresh;
        Ok(())
    }

    /// A client with the admin token.
    pub fn client(&self) -> FedhiveClient {
        FedhiveClient::with_tls(&self.base_url, &self.client_tls)
            .unwrap()
            .with_admin_token(ADMIN_TOKEN)
    }

    /// A client that does not retry, to observe every answer.
    pub fn raw_client(&self) -> FedhiveClient {
        self.client().with_retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A load balancer in front of several replicas: HAProxy (Debian's `haproxy`, which `.ci/run`
/// installs; `FEDHIVE_HAPROXY` names another binary), round-robin with no stickiness, so a
/// device's check-in and upload may reach different replicas. A replica that stops answering its
/// `/readyz` is taken out within about half a second, and a request whose connection is refused
/// goes to another replica.
pub struct Balancer {
    child: Child,
    pub base_url: String,
    _config: tempfile::TempDir,
}

impl Balancer {
    /// Starts HAProxy on a free loopback port in front of the servers on `ports` (127.0.0.1).
    pub async fn start(ports: &[u16]) -> anyhow::Result<Balancer> {
        let port = free_port();
        let servers: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("    server r{i} 127.0.0.1:{p} check\n"))
            .collect();
        let config = format!(
            "global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
    option forwardfor
frontend devices
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    default-server inter 200ms fall 2 rise 1
{servers}"
        );
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let binary = std::env::var("FEDHIVE_HAPROXY").unwrap_or_else(|_| "/usr/sbin/haproxy".into());
        let child = Command::new(&binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary} (Debian's haproxy: .ci/run installs it)"))?;
        let mut balancer = Balancer {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            _config: dir,
        };
        let started = Instant::now();
        let http = reqwest::Client::new();
        loop {
            if let Ok(resp) = http.get(format!("{}/healthz", balancer.base_url)).send().await
                && resp.status().is_success()
            {
                return Ok(balancer);
            }
            if let Some(status) = balancer.child.try_wait()? {
                bail!("haproxy exited during start-up: {status}");
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("haproxy did not pass a request within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client with the admin token, through the balancer.
    pub fn client(&self) -> FedhiveClient {
        FedhiveClient::new(&self.base_url)
            .unwrap()
            .with_admin_token(ADMIN_TOKEN)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny two-tensor model: `w` [2, 3] and `b` [3].
pub fn small_specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec {
            name: "b".into(),
            shape: vec![3],
        },
        TensorSpec {
            name: "w".into(),
            shape: vec![2, 3],
        },
    ]
}

/// Tensors with `small_specs()` shapes whose values are `f(index)` over the flattened model.
pub fn small_tensors(f: impl Fn(usize) -> f32) -> NamedTensors {
    let mut out = NamedTensors::default();
    let mut i = 0;
    for spec in small_specs() {
        let data = (0..spec.numel()).map(|_| {
            i += 1;
            f(i - 1)
        });
        out.0.insert(
            spec.name.clone(),
            Tensor {
                shape: spec.shape.clone(),
                data: data.collect(),
            },
        );
    }
    out
}

/// A FedAvg task config on `small_specs()`.
pub fn small_task(k: u32, min: u32, rounds: u32, deadline_secs: u64) -> TaskConfig {
    TaskConfig {
        model: "test".into(),
        tensors: small_specs(),
        strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
        training: TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 8,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        },
        devices_per_round: k,
        min_devices_per_round: min,
        over_selection: 2.0,
        round_deadline_secs: deadline_secs,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds,
    }
}

/// Checks in until assigned (panics on anything else).
pub async fn assign(client: &FedhiveClient, task_id: &str) -> Assignment {
    match client.checkin(task_id).await.expect("check-in") {
        CheckinResponse::Assigned(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

/// Polls the task until its model reaches `version` (or panics after `timeout`).
pub async fn wait_for_version(client: &FedhiveClient, task_id: &str, version: i64, timeout: Duration) {
    let started = Instant::now();
    loop {
        let status = client.task_status(task_id).await.expect("status");
        if status.model_version >= version {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "model version {version} not reached within {timeout:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
