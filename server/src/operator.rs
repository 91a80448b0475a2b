//! The operator's commands of the `fedhive` binary: `fedhive task ...`, `fedhive model get`,
//! `fedhive token ...`, `fedhive enrolment-key ...`, `fedhive device ...` and `fedhive audit`, talking to a running server over its HTTP API with the
//! admin token or a named token (`--token`, `FEDHIVE_ADMIN_TOKEN`). Tables for people, `--json` for
//! scripts (the API's own JSON, one document per command).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use fedhive_shared::wire::{
    AuditEntry, EnrolledDevice, EnrolmentKey, EnrolmentKeyCreated, EnrolmentKeyRequest, ErrorBody, NewToken,
    RoundInfo, RoundState, TaskConfig, TaskCreated, TaskStatus, TaskSummary, TokenCreated, TokenInfo,
    TokenScope,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::{coordinator::check_task, strategy::Registry};

/// Where the server is and how to talk to it.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "FEDHIVE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// The admin token, or a named token with the scope the command needs.
    #[arg(long, global = true, env = "FEDHIVE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub tls: fedhive_tls::ClientTlsArgs,
}

#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: TaskCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Create a task from its config (JSON) and initial model (safetensors), both checked here
    /// with the server's own rules before anything is uploaded.
    Create {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        model: PathBuf,
    },
    /// Every task, newest first.
    List,
    /// One task's state, model version and round in progress.
    Show { task_id: String },
    /// Every round of a task.
    Rounds { task_id: String },
    /// Stop handing out work (devices are told to come back later).
    Pause { task_id: String },
    /// Hand out work again.
    Resume { task_id: String },
    /// End the task now; its model stays at the last committed version.
    Cancel { task_id: String },
}

#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Download a task's model (the current version unless --version) as safetensors.
    Get {
        task_id: String,
        #[arg(long)]
        version: Option<i64>,
        /// File to write (replaced atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a named token (admin token only); the token is printed once and cannot be shown again.
    Create {
        /// Letters, digits, `.`, `_`, `-`; never reused, even after a revocation.
        #[arg(long)]
        name: String,
        /// read-only: read tasks, rounds, metrics, the audit log; operator: also create, pause,
        /// resume and cancel tasks; cloud-worker: one DC-CCL task's worker routes (with --task).
        #[arg(long, value_parser = PossibleValuesParser::new(["read-only", "operator", "cloud-worker"])
            .map(|s| TokenScope::from_name(&s).expect("one of the possible values")))]
        scope: TokenScope,
        /// The DC-CCL task of a cloud-worker token.
        #[arg(long)]
        task: Option<String>,
    },
    /// Every named token (admin token only): names, scopes, times; never a token.
    List,
    /// Revoke a named token (admin token only): it is refused from its next request on.
    Revoke { name: String },
}

#[derive(Debug, clap::Args)]
pub struct EnrolmentKeyArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: EnrolmentKeyCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum EnrolmentKeyCommand {
    /// Create an enrolment key, one per app release say; the key is printed once and cannot be
    /// shown again (the server keeps its hash). Devices that hold it enrol themselves.
    Create {
        /// A label for operators, e.g. the app release that ships the key.
        #[arg(long)]
        name: String,
    },
    /// Every enrolment key, oldest first, with how many devices it enrolled; never a secret.
    List,
    /// Revoke a key: it enrols no more devices, and every device it enrolled is refused from its
    /// next request.
    Revoke { key_id: String },
}

#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: DeviceCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// Enrolled devices by id, a page at a time; never a secret.
    List {
        /// Only the devices of this enrolment key.
        #[arg(long)]
        key: Option<String>,
        /// Only devices whose id sorts after this one (the last id of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Revoke a device: its credential is refused from its next request.
    Revoke { device_id: String },
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Entries to show, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Only entries older than this id (the last id of the previous page).
    #[arg(long)]
    pub before: Option<i64>,
}

/// An HTTP client for the operator endpoints.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(connection: &Connection) -> anyhow::Result<Api> {
        let tls = connection.tls.load()?;
        let http = tls
            .configure(reqwest::Client::builder())?
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            base: connection.server.trim_end_matches('/').to_string(),
            token: connection.token.clone(),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends; a refusal becomes an error naming the server's code and message.
    async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) if status == StatusCode::UNAUTHORIZED => bail!(
                "{status} {}: {} (set FEDHIVE_ADMIN_TOKEN or --token)",
                body.error,
                body.message
            ),
            Ok(body) if status == StatusCode::FORBIDDEN => bail!(
                "{status} {}: {} (use a token with that scope)",
                body.error,
                body.message
            ),
            Ok(body) => bail!("{status} {}: {}", body.error, body.message),
            Err(_) => bail!("{status}: {text}"),
        }
    }

    async fn json<T: DeserializeOwned>(&self, method: Method, path: &str) -> anyhow::Result<T> {
        let response = self.send(self.request(method, path)).await?;
        response.json().await.context("reading the server's answer")
    }
}

/// Runs `fedhive task ...`.
pub async fn task(args: TaskArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.connection)?;
    let json = args.connection.json;
    match args.command {
        TaskCommand::Create { config, model } => {
            let (config, model) = read_task(&config, &model)?;
            let form = reqwest::multipart::Form::new()
                .text("config", serde_json::to_string(&config)?)
                .part("model", reqwest::multipart::Part::bytes(model));
            let response = api
                .send(api.request(Method::POST, "/v1/tasks").multipart(form))
                .await?;
            let created: TaskCreated = response.json().await?;
            if json {
                return print_json(&created);
            }
            println!("created task {} (model version 0)", created.task_id);
            if let Some(token) = &created.worker_token {
                println!("cloud-worker token (shown once; give it to the task's cloud worker): {token}");
            }
        }
        TaskCommand::List => {
            let tasks: Vec<TaskSummary> = api.json(Method::GET, "/v1/tasks").await?;
            if json {
                return print_json(&tasks);
            }
            let rows = tasks.iter().map(|t| {
                vec![
                    t.task_id.clone(),
                    t.state.name().into(),
                    t.strategy.clone(),
                    t.model.clone(),
                    t.model_version.to_string(),
                    format!("{}/{}", t.committed_rounds, t.rounds),
                    utc(t.created_ms / 1000),
                ]
            });
            print_table(
                &[
                    "TASK",
                    "STATE",
                    "STRATEGY",
                    "MODEL",
                    "VERSION",
                    "ROUNDS",
                    "CREATED (UTC)",
                ],
                rows,
            );
        }
        TaskCommand::Show { task_id } => {
            let status: TaskStatus = api.json(Method::GET, &format!("/v1/tasks/{task_id}")).await?;
            if json {
                return print_json(&status);
            }
            print_status(&status);
        }
        TaskCommand::Rounds { task_id } => {
            let rounds: Vec<RoundInfo> = api
                .json(Method::GET, &format!("/v1/tasks/{task_id}/rounds"))
                .await?;
            if json {
                return print_json(&rounds);
            }
            let rows = rounds.iter().map(|r| {
                vec![
                    r.seq.to_string(),
                    round_state_name(&r.state).into(),
                    r.base_version.to_string(),
                    r.assigned.to_string(),
                    r.accepted.to_string(),
                    r.total_samples.to_string(),
                    utc(r.opened_unix),
                    utc(r.deadline_unix),
                ]
            });
            print_table(
                &[
                    "SEQ", "STATE", "BASE", "ASSIGNED", "ACCEPTED", "SAMPLES", "OPENED", "DEADLINE",
                ],
                rows,
            );
        }
        TaskCommand::Pause { task_id } => change(&api, json, &task_id, "pause").await?,
        TaskCommand::Resume { task_id } => change(&api, json, &task_id, "resume").await?,
        TaskCommand::Cancel { task_id } => change(&api, json, &task_id, "cancel").await?,
    }
    Ok(())
}

/// Runs `fedhive model get`.
pub async fn model(args: ModelArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.connection)?;
    let ModelCommand::Get {
        task_id,
        version,
        output,
    } = args.command;
    let path = match version {
        Some(v) => format!("/v1/tasks/{task_id}/model?version={v}"),
        None => format!("/v1/tasks/{task_id}/model"),
    };
    let response = api.send(api.request(Method::GET, &path)).await?;
    let served = response
        .headers()
        .get("fedhive-model-version")
        .and_then(|v| v.to_str().ok()?.trim_matches('"').parse::<i64>().ok())
        .context("the server's answer has no fedhive-model-version header")?;
    let bytes = response.bytes().await?;
    write_atomically(&output, &bytes)?;
    if args.connection.json {
        return print_json(&serde_json::json!({
            "task_id": task_id,
            "version": served,
            "bytes": bytes.len(),
            "path": output,
        }));
    }
    println!(
        "task {task_id} model version {served}: {} bytes written to {}",
        bytes.len(),
        output.display()
    );
    Ok(())
}

/// Runs `fedhive token ...`.
pub async fn token(args: TokenArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.connection)?;
    let json = args.connection.json;
    match args.command {
        TokenCommand::Create { name, scope, task } => {
            let new = NewToken {
                name,
                scope,
                task_id: task,
            };
            let response = api
                .send(api.request(Method::POST, "/v1/tokens").json(&new))
                .await?;
            let created: TokenCreated = response.json().await?;
            if json {
                return print_json(&created);
            }
            let info = &created.info;
            match &info.task_id {
                Some(task) => println!(
                    "created token {} ({} for task {task})",
                    info.name,
                    info.scope.name()
                ),
                None => println!("created token {} ({})", info.name, info.scope.name()),
            }
            println!("token (shown once; only its hash is kept): {}", created.token);
        }
        TokenCommand::List => {
            let tokens: Vec<TokenInfo> = api.json(Method::GET, "/v1/tokens").await?;
            if json {
                return print_json(&tokens);
            }
            let rows = tokens.iter().map(|t| {
                vec![
                    t.name.clone(),
                    t.scope.name().into(),
                    t.task_id.clone().unwrap_or_else(|| "-".into()),
                    t.created_by.clone(),
                    utc(t.created_ms / 1000),
                    utc_or_dash(t.last_used_ms),
                    utc_or_dash(t.revoked_ms),
                ]
            });
            print_table(
                &[
                    "NAME",
                    "SCOPE",
                    "TASK",
                    "CREATED BY",
                    "CREATED (UTC)",
                    "LAST USED",
                    "REVOKED",
                ],
                rows,
            );
        }
        TokenCommand::Revoke { name } => {
            let info: TokenInfo = api.json(Method::DELETE, &format!("/v1/tokens/{name}")).await?;
            if json {
                return print_json(&info);
            }
            println!(
                "token {} revoked at {} UTC",
                info.name,
                utc(info.revoked_ms.unwrap_or_default() / 1000)
            );
        }
    }
    Ok(())
}

/// Runs `fedhive enrolment-key ...`.
pub async fn enrolment_key(args: EnrolmentKeyArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.connection)?;
    let json = args.connection.json;
    match args.command {
        EnrolmentKeyCommand::Create { name } => {
            let request = EnrolmentKeyRequest { name };
            let response = api
                .send(api.request(Method::POST, "/v1/enrolment-keys").json(&request))
                .await?;
            let created: EnrolmentKeyCreated = response.json().await?;
            if json {
                return print_json(&created);
            }
            println!("created enrolment key {} ({})", created.key_id, created.name);
            println!(
                "enrolment key (shown once; only its hash is kept): {}",
                created.enrolment_key
            );
        }
        EnrolmentKeyCommand::List => {
            let keys: Vec<EnrolmentKey> = api.json(Method::GET, "/v1/enrolment-keys").await?;
            if json {
                return print_json(&keys);
            }
            let rows = keys.iter().map(|k| {
                vec![
                    k.key_id.clone(),
                    k.name.clone(),
                    utc(k.created_ms / 1000),
                    k.devices.to_string(),
                    utc_or_dash(k.revoked_ms),
                ]
            });
            print_table(&["KEY", "NAME", "CREATED (UTC)", "DEVICES", "REVOKED"], rows);
        }
        EnrolmentKeyCommand::Revoke { key_id } => {
            let key: EnrolmentKey = api
                .json(Method::DELETE, &format!("/v1/enrolment-keys/{key_id}"))
                .await?;
            if json {
                return print_json(&key);
            }
            println!(
                "enrolment key {} ({}) revoked at {} UTC; the {} device(s) it enrolled are refused",
                key.key_id,
                key.name,
                utc_or_dash(key.revoked_ms),
                key.devices
            );
        }
    }
    Ok(())
}

/// Runs `fedhive device ...`.
pub async fn device(args: DeviceArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.connection)?;
    let json = args.connection.json;
    match args.command {
        DeviceCommand::List { key, after, limit } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(key.map(|k| ("key_id", k)));
            query.extend(after.map(|a| ("after", a)));
            let response = api
                .send(api.request(Method::GET, "/v1/devices").query(&query))
                .await?;
            let devices: Vec<EnrolledDevice> =
                response.json().await.context("reading the server's answer")?;
            if json {
                return print_json(&devices);
            }
            let rows = devices.iter().map(|d| {
                vec![
                    d.device_id.clone(),
                    d.key_id.clone().unwrap_or_else(|| "-".into()),
                    utc(d.enrolled_ms / 1000),
                    utc_or_dash(d.revoked_ms),
                ]
            });
            print_table(&["DEVICE", "KEY", "ENROLLED (UTC)", "REVOKED"], rows);
        }
        DeviceCommand::Revoke { device_id } => {
            let device: EnrolledDevice = api
                .json(Method::DELETE, &format!("/v1/devices/{device_id}"))
                .await?;
            if json {
                return print_json(&device);
            }
            println!(
                "device {} revoked at {} UTC",
                device.device_id,
                utc_or_dash(device.revoked_ms)
            );
        }
    }
    Ok(())
}

/// Runs `fedhive audit`.
pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.connection)?;
    let path = match args.before {
        Some(before) => format!("/v1/audit?limit={}&before={before}", args.limit),
        None => format!("/v1/audit?limit={}", args.limit),
    };
    let entries: Vec<AuditEntry> = api.json(Method::GET, &path).await?;
    if args.connection.json {
        return print_json(&entries);
    }
    let rows = entries.iter().map(|e| {
        let target = if e.target.is_empty() { "-" } else { &e.target };
        vec![
            e.id.to_string(),
            utc(e.at_ms / 1000),
            e.actor.clone(),
            e.action.clone(),
            target.to_string(),
            e.outcome.clone(),
        ]
    });
    print_table(&["ID", "WHEN (UTC)", "WHO", "ACTION", "TARGET", "OUTCOME"], rows);
    Ok(())
}

/// Reads a task's config and model and checks them as the server would.
fn read_task(config: &Path, model: &Path) -> anyhow::Result<(TaskConfig, Vec<u8>)> {
    let text = std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let config_value: TaskConfig =
        serde_json::from_str(&text).with_context(|| format!("{}: not a task config", config.display()))?;
    let weights = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let strategy = Registry::default()
        .for_config(&config_value)
        .with_context(|| format!("{}", config.display()))?;
    check_task(strategy.as_ref(), &config_value, &weights)
        .with_context(|| format!("{} with {} would be refused", config.display(), model.display()))?;
    Ok((config_value, weights))
}

async fn change(api: &Api, json: bool, task_id: &str, action: &str) -> anyhow::Result<()> {
    let status: TaskStatus = api
        .json(Method::POST, &format!("/v1/tasks/{task_id}/{action}"))
        .await?;
    if json {
        return print_json(&status);
    }
    println!(
        "task {} is {} (model version {})",
        status.task_id,
        status.state.name(),
        status.model_version
    );
    Ok(())
}

fn print_status(s: &TaskStatus) {
    let c = &s.config;
    println!("task        {}", s.task_id);
    println!("state       {}", s.state.name());
    println!("strategy    {}", c.strategy.name());
    println!("model       {} ({} tensors)", c.model, c.tensors.len());
    println!("version     {}", s.model_version);
    println!("rounds      {} of {} committed", s.committed_rounds, c.rounds);
    println!(
        "per round   K = {}, at least {}, deadline {} s",
        c.devices_per_round, c.min_devices_per_round, c.round_deadline_secs
    );
    match &s.current_round {
        Some(r) => println!(
            "this round  #{} {}: {} accepted of {} assigned, {} samples, deadline {}",
            r.seq,
            round_state_name(&r.state),
            r.accepted,
            r.assigned,
            r.total_samples,
            utc(r.deadline_unix)
        ),
        None => println!("this round  none"),
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Left-aligned columns as wide as their widest cell.
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

fn round_state_name(state: &RoundState) -> &'static str {
    match state {
        RoundState::Open => "open",
        RoundState::Committed => "committed",
        RoundState::Abandoned => "abandoned",
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` in UTC (days to civil date: Howard Hinnant's algorithm).
/// An optional time in Unix milliseconds as UTC, or `-`.
fn utc_or_dash(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_string(), |ms| utc(ms / 1000))
}

fn utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Writes `path` whole or not at all: a temporary file beside it, synced, then renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut file =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing in {}", dir.display()))?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_950_245), "2026-11-29 11:04:05");
    }
}
