//! The round lifecycle: tasks, check-ins, uploads, and committing or abandoning rounds.
//!
//! A round is `open` (takes check-ins and uploads) until it has K accepted updates or reaches its
//! deadline; it is then `closing` (its set of accepted updates is frozen), and is finalised to
//! `committed` (new model version) or `abandoned` (fewer than the minimum; the model stays), and the
//! task's next round opens in the same transaction.
//!
//! Exactly-once uploads: an update is acknowledged only after its body is durably in the blob store
//! and its row committed in the database; a retry with the same token finds that row. A strategy's
//! fixed-point sums are folded into an in-memory accumulator as uploads arrive (O(model size) per
//! open round), but that accumulator is only a cache: finalising checks that it folded exactly the round's accepted set, and
//! otherwise (after a restart, or on another replica) rebuilds it from the stored updates. The
//! fixed-point sums make the result identical either way.
//!
//! What differs between algorithms (who gets a token, what an update looks like, how the sums
//! become the next model) is the task's [`Strategy`], found in the [`Registry`]; this module never
//! names one.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use fedhive_shared::{
    TensorSpec,
    fedavg::{AggregateError, MAX_ROUND_SAMPLES, check_sample_count},
    wire::{
        CheckinResponse, RoundInfo, TaskConfig, TaskCreated, TaskState, TaskStatus, TaskSummary,
        UpdateEncoding, UploadReceipt,
    },
};
use tracing::{info, warn};

use crate::{
    access::{Action, AuditRecord, Principal},
    admission::{UploadAdmission, UploadSlot},
    blobs::BlobStore,
    body_buffers::BodyBuffers,
    db::{Accept, Db, NextRound, RoundOutcome, RoundRow, TaskRow, UpdateRow},
    devices::{self, Device},
    error::ApiError,
    group_commit::GroupCommit,
    group_fold::{Accumulators, GroupFold, ToFold},
    known_rounds::{KnownRound, KnownRounds},
    rate_limit::{RateLimit, RateLimiter},
    replicas::{self, Replica},
    store::{HashedBody, Store, UploadBody, now_ms, sha256_hex},
    strategy::{
        Registry, Strategy,
        interface::{CheckinClock, Sums},
    },
    telemetry::{Telemetry, UploadStages},
};

/// Tunables of the coordinator (the rest lives in each task's config).
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// How long a device is told to wait when the round is full or between rounds.
    pub checkin_retry_ms: u64,
    /// Uploads whose bodies are read and validated at the same time; bounds memory to this many
    /// model-sized buffers however many devices upload at once. Default [`default_upload_slots`].
    pub max_concurrent_uploads: usize,
    /// Uploads that may wait for one of those slots; more get `503 server_busy` with a retry time
    /// (see [`crate::admission`]).
    pub max_queued_uploads: usize,
    /// Check-ins and uploads per enrolled device (`None`: no limit; see [`crate::rate_limit`]).
    pub device_rate_limit: Option<RateLimit>,
    /// This replica's name among several on one database (default: the host name).
    pub replica_name: Option<String>,
    /// How long a replica's claim to finalise a round holds before another may take over (it is
    /// renewed while the finalisation runs).
    pub finalise_lease: Duration,
    /// How long a finaliser waits for live replicas to hand over their sums of a closing round
    /// before it reads their updates from the blob store instead.
    pub partials_wait: Duration,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            checkin_retry_ms: 1000,
            max_concurrent_uploads: default_upload_slots(),
            max_queued_uploads: 64,
            device_rate_limit: None,
            replica_name: None,
            finalise_lease: Duration::from_secs(30),
            partials_wait: Duration::from_secs(3),
        }
    }
}

/// How long a device is told to wait when its task is paused.
const PAUSED_RETRY_MS: i64 = 60_000;

/// One upload slot per CPU core, at least 2. A slot holds a model-sized body while it hashes,
/// checks and folds it, mostly CPU work, so more slots buy little throughput for their memory
/// (1,000 per round, 1M parameters, 2 cores, when a slot also held a decoded copy: 8 slots peaked at
/// 225 MB for 76 updates/s, 2 slots at 136 MB for 64 updates/s).
pub fn default_upload_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)
}

pub struct Coordinator {
    store: Store,
    strategies: Registry,
    options: CoordinatorOptions,
    accumulators: Accumulators,
    /// Upload tokens whose upload is being processed by this process.
    in_flight: Mutex<HashSet<String>>,
    /// Per round, this process's uploads between their database commit and their fold: sums
    /// are handed over (or used by this replica's finalisation) only once these are in.
    folding: Arc<Mutex<HashMap<i64, usize>>>,
    /// This process among the replicas sharing the database (see [`crate::replicas`]).
    replica: Replica,
    /// When this replica last stamped its heartbeat.
    heartbeat: Mutex<Option<std::time::Instant>>,
    uploads: UploadAdmission,
    /// Buffers upload bodies are read into, one per upload slot, reused.
    body_buffers: Arc<BodyBuffers>,
    /// Rounds this process has taken uploads for: late uploads to those seen closed are refused
    /// before a slot, and bodies refused before a slot are drained up to the round's limit.
    known_rounds: KnownRounds,
    /// Records accepted updates, those that arrive together in one transaction.
    commits: GroupCommit,
    /// Accepted updates on their way into `accumulators`, folded together when they wait together.
    folds: GroupFold,
    /// Per-device limit on check-ins and uploads, keyed by the authenticated device id.
    device_rate: Option<RateLimiter<String>>,
    telemetry: Telemetry,
}

/// Time between successive calls, for per-stage timings in logs and metrics.
struct Lap(std::time::Instant);

impl Lap {
    fn start() -> Lap {
        Lap(std::time::Instant::now())
    }

    /// Time since the previous call (or the start).
    fn lap(&mut self) -> Duration {
        let now = std::time::Instant::now();
        let took = now - self.0;
        self.0 = now;
        took
    }
}

/// A task that requires enrolled devices takes an upload or a metrics report only with the
/// credential of the device the upload token was issued to, so a token that leaks is no use to
/// anyone else, and revoking the device stops its uploads at once.
fn check_holder(task: &TaskRow, holder: Option<&str>, device: Option<&Device>) -> Result<(), ApiError> {
    if !task.config.require_enrolled_device {
        return Ok(());
    }
    match (holder, device) {
        (Some(holder), Some(device)) if holder == device.id => Ok(()),
        (_, None) => Err(ApiError::DeviceUnauthorized(format!(
            "task `{}` requires enrolled devices: send the credential of the device this upload token \
             was issued to in the `Fedhive-Device` header",
            task.id
        ))),
        _ => Err(ApiError::DeviceUnauthorized(
            "this upload token was issued to another device".into(),
        )),
    }
}

/// An operator's action that the task's state does not allow.
fn conflict(state: &TaskState, task: String, action: &'static str) -> ApiError {
    ApiError::TaskStateConflict {
        task,
        state: state.name(),
        action,
    }
}

/// Milliseconds rounded to 0.1, for logs.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn receipt(u: &UpdateRow) -> UploadReceipt {
    UploadReceipt {
        round_id: u.round_id,
        accepted_updates: u.accepted_seq,
        num_samples: u.num_samples as u64,
        sha256: u.sha256.clone(),
    }
}

/// Largest upload body a task of fedhive's own strategies accepts.
pub fn upload_limit(config: &TaskConfig) -> Result<usize, ApiError> {
    Ok(Registry::default().for_config(config)?.upload_limit(config))
}

/// An upload the database did not take.
enum NotAccepted {
    /// Another replica stored the same token's upload, with the same bytes, first.
    StoredByAnother(UpdateRow),
    Refused(ApiError),
}

/// Counts an upload of this process as on its way into a round's sums (from before its database
/// commit until its fold), however it ends.
struct Folding {
    counts: Arc<Mutex<HashMap<i64, usize>>>,
    round_id: i64,
}

impl Folding {
    fn enter(counts: &Arc<Mutex<HashMap<i64, usize>>>, round_id: i64) -> Folding {
        *counts.lock().expect("folding lock").entry(round_id).or_default() += 1;
        Folding {
            counts: counts.clone(),
            round_id,
        }
    }

    /// Whether an upload of this process is on its way into the round's sums.
    fn any(counts: &Mutex<HashMap<i64, usize>>, round_id: i64) -> bool {
        counts.lock().expect("folding lock").contains_key(&round_id)
    }
}

impl Drop for Folding {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("folding lock");
        if let Some(n) = counts.get_mut(&self.round_id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.round_id);
            }
        }
    }
}

/// Removes a token from the in-flight set when its upload finishes, however it finishes.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    token_hash: String,
}

impl<'a> InFlight<'a> {
    fn enter(set: &'a Mutex<HashSet<String>>, token_hash: &str) -> Option<Self> {
        let fresh = set.lock().expect("in-flight lock").insert(token_hash.to_string());
        fresh.then(|| InFlight {
            set,
            token_hash: token_hash.to_string(),
        })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("in-flight lock").remove(&self.token_hash);
    }
}

/// Checks a list of tensors of a task config (`field` names it in errors): not empty, no name
/// twice, every dimension at least 1.
pub(crate) fn check_tensor_specs(field: &str, specs: &[TensorSpec]) -> Result<(), ApiError> {
    let bad = |msg: String| Err(ApiError::InvalidConfig(msg));
    if specs.is_empty() {
        return bad(format!("`{field}` is empty"));
    }
    let mut names = HashSet::new();
    for t in specs {
        if !names.insert(&t.name) {
            return bad(format!("tensor `{}` is listed twice in `{field}`", t.name));
        }
        if t.shape.is_empty() || t.shape.contains(&0) {
            return bad(format!(
                "tensor `{}` of `{field}` has shape {:?}; every dimension must be >= 1",
                t.name, t.shape
            ));
        }
    }
    Ok(())
}

/// Checks a task config for values no round could run with: the common fields here, the rest by
/// the task's strategy.
fn validate_config(strategy: &dyn Strategy, c: &TaskConfig) -> Result<(), ApiError> {
    let bad = |msg: String| Err(ApiError::InvalidConfig(msg));
    check_tensor_specs("tensors", &c.tensors)?;
    if c.devices_per_round == 0 {
        return bad("`devices_per_round` must be >= 1".into());
    }
    if c.min_devices_per_round == 0 || c.min_devices_per_round > c.devices_per_round {
        return bad(format!(
            "`min_devices_per_round` must be between 1 and devices_per_round ({}), got {}",
            c.devices_per_round, c.min_devices_per_round
        ));
    }
    if !(c.over_selection.is_finite() && c.over_selection >= 1.0) {
        return bad(format!("`over_selection` must be >= 1, got {}", c.over_selection));
    }
    if c.round_deadline_secs == 0 || c.rounds == 0 {
        return bad("`round_deadline_secs` and `rounds` must be >= 1".into());
    }
    strategy.validate(c)?;
    let encodings = strategy.update_encodings();
    if !encodings.iter().any(|e| e.kind() == c.update_encoding.kind()) {
        let takes: Vec<&str> = encodings.iter().map(UpdateEncoding::kind).collect();
        return bad(format!(
            "`update_encoding` {} is not available for this strategy (it takes {})",
            serde_json::to_string(&c.update_encoding).unwrap_or_default(),
            takes.join(", ")
        ));
    }
    if !c.update_encoding.is_valid() {
        return bad("`update_encoding` top_k needs a `percent` from 1 to 100".into());
    }
    let t = &c.training;
    if t.batch_size == 0 || !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
        return bad("`training.batch_size` must be >= 1 and `training.learning_rate` positive".into());
    }
    if t.local_epochs == 0 && t.max_local_steps == 0 {
        return bad("`training` needs local_epochs >= 1 or max_local_steps >= 1".into());
    }
    if let Some(problem) = t.learning_rate_schedule.as_ref().and_then(|s| s.problem()) {
        return bad(format!("`training.learning_rate_schedule`: {problem}"));
    }
    Ok(())
}

/// Checks a task's config and initial model (safetensors) as task creation does: what the
/// operator CLI runs before it uploads anything.
pub fn check_task(strategy: &dyn Strategy, config: &TaskConfig, model: &[u8]) -> Result<(), ApiError> {
    validate_config(strategy, config)?;
    strategy.check_initial_model(config, model)
}

impl Coordinator {
    pub fn new(db: Db, blobs: BlobStore, options: CoordinatorOptions) -> Self {
        Coordinator::with_strategies(db, blobs, options, Registry::default())
    }

    /// A coordinator that runs the given strategies (fedhive's own are [`Registry::default`]).
    pub fn with_strategies(
        db: Db,
        blobs: BlobStore,
        options: CoordinatorOptions,
        strategies: Registry,
    ) -> Self {
        let uploads = UploadAdmission::new(options.max_concurrent_uploads, options.max_queued_uploads);
        let telemetry = Telemetry::new();
        let (db, blobs) = (
            db.with_latency(telemetry.storage_latency()),
            blobs.with_latency(telemetry.storage_latency()),
        );
        let accumulators = Accumulators::default();
        Coordinator {
            replica: Replica::new(options.replica_name.as_deref()),
            folds: GroupFold::new(accumulators.clone(), telemetry.group_fold_updates()),
            commits: GroupCommit::new(db.clone(), telemetry.group_commit_updates()),
            body_buffers: BodyBuffers::new(options.max_concurrent_uploads.max(1)),
            known_rounds: KnownRounds::default(),
            store: Store::new(db, blobs),
            strategies,
            device_rate: options.device_rate_limit.map(RateLimiter::new),
            options,
            accumulators,
            in_flight: Mutex::default(),
            folding: Arc::default(),

            heartbeat: Mutex::default(),
            uploads,
            telemetry,
        }
    }

    pub fn db(&self) -> &Db {
        &self.store.db
    }

    /// This server's metrics (`GET /metrics`).
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The metrics in the Prometheus text format, upload admission read now.
    pub fn render_metrics(&self) -> String {
        let u = &self.uploads;
        self.telemetry.render(u.slots(), u.busy(), u.waiting())
    }

    /// Whether this process can serve: the database answers and the blob store is usable.
    pub async fn ready(&self) -> Result<(), ApiError> {
        if let Err(e) = self.store.db.ping().await {
            return Err(ApiError::NotReady(format!("database: {e}")));
        }
        if let Err(e) = self.store.blobs.check().await {
            return Err(ApiError::NotReady(format!("blob store: {e}")));
        }
        Ok(())
    }

    /// The database, blobs and caches that strategies' own routes read and write.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn strategies(&self) -> &Registry {
        &self.strategies
    }

    async fn task(&self, task_id: &str) -> Result<TaskRow, ApiError> {
        self.store.task(task_id).await
    }

    /// Creates a task from its config and initial weights (safetensors), and opens round 1;
    /// `by`'s audit line commits with it.
    pub async fn create_task(
        &self,
        config: TaskConfig,
        model: Bytes,
        by: &Principal,
    ) -> Result<TaskCreated, ApiError> {
        let strategy = self.strategies.for_config(&config)?;
        let (checker, checked, for_check) = (strategy.clone(), model.clone(), config.clone());
        tokio::task::spawn_blocking(move || check_task(checker.as_ref(), &for_check, &checked)).await??;
        let task_id = format!("t-{:012x}", rand::random::<u64>() >> 16);
        strategy
            .store_initial_model(&self.store, &task_id, &config, model)
            .await?;
        let worker_token = strategy
            .issue_task_credentials(&self.store, &task_id, &config)
            .await?;
        let audit = AuditRecord::ok(by, Action::TaskCreate, &task_id);
        self.store
            .db
            .create_task(&task_id, &config, &audit, now_ms())
            .await?;
        self.telemetry.round_opened(&task_id);
        info!(task = %task_id, model = %config.model, rounds = config.rounds, k = config.devices_per_round, "task created");
        Ok(TaskCreated {
            task_id,
            model_version: 0,
            worker_token,
        })
    }

    pub async fn status(&self, task_id: &str) -> Result<TaskStatus, ApiError> {
        let task = self.task(task_id).await?;
        let current_round = self.store.db.active_round(task_id).await?.map(|r| r.info());
        Ok(TaskStatus {
            task_id: task.id,
            state: task.state,
            model_version: task.model_version,
            committed_rounds: task.committed_rounds,
            config: task.config,
            current_round,
        })
    }

    /// Every task, newest first.
    pub async fn tasks(&self) -> Result<Vec<TaskSummary>, ApiError> {
        Ok(self
            .store
            .db
            .tasks()
            .await?
            .into_iter()
            .map(|t| TaskSummary {
                task_id: t.id,
                state: t.state,
                model: t.config.model.clone(),
                strategy: t.config.strategy.name().to_string(),
                model_version: t.model_version,
                committed_rounds: t.committed_rounds,
                rounds: t.config.rounds,
                created_ms: t.created_ms,
            })
            .collect())
    }

    /// Pauses a running task: check-ins are told to come back later and the ticker leaves its
    /// round alone (uploads for assignments already handed out are still taken until the round's
    /// deadline). On resume a round past its deadline is finalised at once and the next opens.
    /// `by`'s audit line commits with the change.
    pub async fn set_paused(
        &self,
        task_id: &str,
        paused: bool,
        by: &Principal,
    ) -> Result<TaskStatus, ApiError> {
        let task = self.task(task_id).await?;
        let (action, audited) = if paused {
            ("pause", Action::TaskPause)
        } else {
            ("resume", Action::TaskResume)
        };
        let audit = AuditRecord::ok(by, audited, task_id);
        if !self
            .store
            .db
            .set_paused(task_id, paused, &audit, now_ms())
            .await?
        {
            return Err(conflict(&self.task(task_id).await?.state, task.id, action));
        }
        info!(task = %task_id, paused, "task paused or resumed by an operator");
        self.status(task_id).await
    }

    /// Cancels a task: it finishes now with its last committed model, its open round is abandoned
    /// (its uploads are refused as late) and devices that check in are told it has finished.
    /// `by`'s audit line commits with it.
    pub async fn cancel(&self, task_id: &str, by: &Principal) -> Result<TaskStatus, ApiError> {
        let task = self.task(task_id).await?;
        // Not while a round of it is being finalised.
        let finalizing = self.store.finalize_lock.lock().await;
        let round = self.store.db.active_round(task_id).await?;
        let audit = AuditRecord::ok(by, Action::TaskCancel, task_id);
        if !self.store.db.cancel_task(task_id, &audit, now_ms()).await? {
            return Err(conflict(&self.task(task_id).await?.state, task.id, "cancel"));
        }
        drop(finalizing);
        info!(task = %task_id, "task cancelled by an operator");
        if let Some(round) = round {
            self.telemetry.round_finished(task_id, false);
            self.forget_round(round.id).await;
        }
        self.status(task_id).await
    }

    pub async fn rounds(&self, task_id: &str) -> Result<Vec<RoundInfo>, ApiError> {
        self.task(task_id).await?;
        let mut reports = self.store.db.round_reports(task_id).await?;
        Ok(self
            .store
            .db
            .rounds(task_id)
            .await?
            .iter()
            .map(|row| RoundInfo {
                reports: reports.remove(&row.id),
                ..row.info()
            })
            .collect())
    }

    /// A device asks for work, with its bearer credentials if it has any: an assignment in the
    /// open round, or when to come back. Who gets a token is the task's strategy's choice.
    pub async fn checkin(&self, task_id: &str, bearer: Option<&str>) -> Result<CheckinResponse, ApiError> {
        let result = self.assign(task_id, bearer).await;
        // An unknown task id is not a label: anyone can send any number of them.
        let known = !matches!(result, Err(ApiError::UnknownTask(_)));
        let outcome = result.as_ref().map(|response| match response {
            CheckinResponse::Assigned(_) => "assigned",
            CheckinResponse::RetryAfter { .. } => "retry",
            CheckinResponse::Finished { .. } => "finished",
        });
        self.telemetry.checkin(if known { task_id } else { "" }, outcome);
        result
    }

    async fn assign(&self, task_id: &str, bearer: Option<&str>) -> Result<CheckinResponse, ApiError> {
        let task = self.task(task_id).await?;
        let strategy = self.strategies.for_config(&task.config)?;
        let enrolled = self.device(bearer).await?;
        if task.config.require_enrolled_device && enrolled.as_ref().is_none_or(|d| d.key_id.is_none()) {
            return Err(ApiError::DeviceUnauthorized(format!(
                "task `{task_id}` requires a device enrolled with an enrolment key (POST /v1/devices): \
                 check in with `Authorization: Bearer <device_id>:<device_secret>`"
            )));
        }
        let device = strategy
            .authenticate(&self.store, &task, enrolled.as_ref())
            .await?;
        if task.state.is_over() {
            return Ok(CheckinResponse::Finished {
                model_version: task.model_version,
            });
        }
        let clock = CheckinClock {
            now_ms: now_ms(),
            retry_ms: self.options.checkin_retry_ms,
        };
        let usual = clock.retry_ms as i64;
        if task.state == TaskState::Paused {
            // A pause is an operator's decision: minutes, not the next round's seconds.
            return Ok(clock.retry("task_paused", usual.max(PAUSED_RETRY_MS)));
        }
        let Some(round) = self.store.db.active_round(task_id).await? else {
            return Ok(clock.retry("between_rounds", usual));
        };
        if !round.open_at(clock.now_ms) {
            return Ok(clock.retry("round_closing", usual));
        }
        strategy
            .checkin(&self.store, &task, &round, device.as_deref(), clock)
            .await
    }

    /// The buffers device updates' bodies are read into (see [`crate::body_buffers`]).
    pub fn body_buffers(&self) -> &Arc<BodyBuffers> {
        &self.body_buffers
    }

    /// A processing slot for a body that is not a device update (anonymous samples), so that
    /// those bodies count against the same bound on what is read at once; `503 server_busy` past
    /// the queue.
    pub async fn upload_slot(&self) -> Result<UploadSlot<'_>, ApiError> {
        self.uploads
            .enter()
            .await
            .map_err(|retry_after_ms| ApiError::ServerBusy { retry_after_ms })
    }

    /// Model bytes of `version` (the current one when `None`).
    pub async fn model(&self, task_id: &str, version: Option<i64>) -> Result<(i64, Bytes), ApiError> {
        self.store.model(task_id, version).await
    }

    /// The device behind a credential (`None` without one), counted against its rate. Read from
    /// the database every time, so a revocation holds from the next request.
    async fn device(&self, credential: Option<&str>) -> Result<Option<Device>, ApiError> {
        let device = devices::authenticate(&self.store.db, credential).await?;
        if let (Some(limiter), Some(device)) = (&self.device_rate, &device) {
            limiter
                .check(device.id.as_str(), std::time::Instant::now())
                .map_err(|wait| ApiError::RateLimited {
                    retry_after_ms: (wait.as_millis() as u64).max(1),
                    from: "device",
                })?;
        }
        Ok(device)
    }

    /// The round an upload token was issued for, and the enrolled device it was issued to.
    async fn token_round(&self, token: &str) -> Result<(String, i64, Option<String>), ApiError> {
        let token_hash = sha256_hex(token.as_bytes());
        let (round_id, holder) = self
            .store
            .db
            .assignment_round(&token_hash)
            .await?
            .ok_or(ApiError::UnknownToken)?;
        Ok((token_hash, round_id, holder))
    }

    /// Accepts one device update. The body is only read (given the task's upload limit) once an
    /// upload slot is held, so at most `max_concurrent_uploads` bodies are in memory at once; past
    /// the queue limit the device is told to come back later, its body drained unread (when this
    /// process knows the round's limit). An upload too late for its round is refused with its body
    /// drained unread, before a slot when this process has seen the round close. The flag says the
    /// round is now full and should be finalised.
    pub async fn upload(
        &self,
        token: &str,
        device: Option<&str>,
        num_samples: u64,
        body: impl UploadBody,
    ) -> Result<(UploadReceipt, bool), ApiError> {
        // The task, once the token has named one, for the refusal's metric.
        let mut task_id = String::new();
        let result = self
            .accept_upload(token, device, num_samples, body, &mut task_id)
            .await;
        if let Err(e) = &result {
            self.telemetry.upload(&task_id, Err(e));
        }
        result
    }

    async fn accept_upload(
        &self,
        token: &str,
        device: Option<&str>,
        num_samples: u64,
        mut body: impl UploadBody,
        task_id: &mut String,
    ) -> Result<(UploadReceipt, bool), ApiError> {
        let device = self.device(device).await?;
        let (token_hash, round_id, holder) = self.token_round(token).await?;
        let _flight = InFlight::enter(&self.in_flight, &token_hash).ok_or(ApiError::UploadInFlight)?;
        let db = &self.store.db;
        // Late for a round seen closed, and not a retry of a stored update (that gets its receipt):
        // refused without waiting for a slot. The holder check comes first, as on the slow path
        // (a token issued to no enrolled device belongs to a task that does not require one).
        let known = self.known_rounds.get(round_id);
        if let Some(closed) = known.as_ref().filter(|round| round.closed) {
            task_id.clone_from(&closed.task_id);
            if holder.is_some() {
                check_holder(
                    &self.task(&closed.task_id).await?,
                    holder.as_deref(),
                    device.as_ref(),
                )?;
            }
            (_, body) = self
                .stored_or_late(&token_hash, round_id, body, closed.upload_limit)
                .await?;
        }
        // Where an upload's time goes, logged with its acceptance (the load harness's profile).
        let mut lap = Lap::start();
        let _slot = match self.uploads.enter().await {
            Ok(slot) => slot,
            Err(retry_after_ms) => {
                // Drained (without a slot), so that a client still sending gets the answer and its
                // retry time rather than a reset, on a connection that stays open. A round this
                // process has not taken an upload for has no known limit: left unread.
                if let Some(round) = known {
                    body.discard(round.upload_limit).await;
                }
                return Err(ApiError::ServerBusy { retry_after_ms });
            }
        };
        let queue = lap.lap();
        let round = db.round(round_id).await?.ok_or(ApiError::UnknownToken)?;
        task_id.clone_from(&round.task_id);
        let task = self.task(&round.task_id).await?;
        check_holder(&task, holder.as_deref(), device.as_ref())?;
        let strategy = self.strategies.for_config(&task.config)?;
        let upload_limit = strategy.upload_limit(&task.config);
        let k = i64::from(task.config.devices_per_round);
        let round_closed = !round.open_at(now_ms()) || round.accepted >= k;
        self.known_round(round_id, &task.id, upload_limit, round_closed);
        let mut stored = None;
        if round_closed {
            // The token's row is read here only for a closed round, so an upload in time pays no
            // query for this.
            let (prev, unread) = self
                .stored_or_late(&token_hash, round_id, body, upload_limit)
                .await?;
            (stored, body) = (Some(prev), unread);
        }
        let HashedBody { bytes: body, sha256 } = body.read(upload_limit).await?;
        let read = lap.lap();

        // For a round still open, whether this token's update is stored is asked once its body is
        // in, as near the commit as it can be.
        if !round_closed {
            stored = db.update_for_token(&token_hash).await?;
        }
        if let Some(prev) = stored {
            if prev.sha256 == sha256 && prev.num_samples as u64 == num_samples {
                self.telemetry.upload(&task.id, Ok("replayed"));
                return Ok((receipt(&prev), false));
            }
            return Err(ApiError::ConflictingRetry { stored: prev.sha256 });
        }
        check_sample_count(num_samples)?;

        // The key names the body's digest, so a replica taking the same token with other bytes at
        // the same moment writes elsewhere, and one with the same bytes finds them written.
        let blob_key = format!("updates/{round_id}/{token_hash}-{sha256}.safetensors");
        // The check (a CPU pass) and the durable write (mostly waiting on the disk or the object
        // store) overlap; a body the check refuses has its blob removed again, so a refusal still
        // leaves nothing behind.
        let (decoder, config, checked) = (strategy.clone(), task.config.clone(), body.clone());
        let checking = async {
            let started = std::time::Instant::now();
            let update =
                tokio::task::spawn_blocking(move || decoder.decode_update(&config, &checked)).await??;
            strategy.check_update(&self.store, &task, &update).await?;
            Ok::<_, ApiError>((update, started.elapsed()))
        };
        let storing = async {
            let started = std::time::Instant::now();
            let wrote = self.store.blobs.put_new(&blob_key, body).await;
            (wrote, started.elapsed())
        };
        let (checked, (wrote_blob, store)) = tokio::join!(checking, storing);
        lap.lap();
        let (update, decode) = match checked {
            Ok(checked) => checked,
            Err(refused) => {
                if let Ok(true) = wrote_blob {
                    // The refusal is the answer; if the row cannot be read, the blob is kept.
                    match db.update_for_token(&token_hash).await {
                        Ok(stored) => {
                            self.remove_unstored_blob(round_id, &blob_key, stored.as_ref())
                                .await
                        }
                        Err(e) => warn!(round = round_id, error = %e, "kept a refused update's blob"),
                    }
                }
                return Err(refused);
            }
        };
        let wrote_blob = wrote_blob?;
        let row = UpdateRow {
            token_hash: token_hash.clone(),
            round_id,
            num_samples: num_samples as i64,
            sha256,
            blob_key,
            accepted_seq: 0,
            replica: Some(self.replica.id().to_string()),
        };
        let folding = Folding::enter(&self.folding, round_id);
        let Some(stored) = self.commits.accept(Accept { k, row: row.clone() }).await? else {
            return match self.not_accepted(&row, wrote_blob).await? {
                NotAccepted::StoredByAnother(prev) => {
                    self.telemetry.upload(&task.id, Ok("replayed"));
                    Ok((receipt(&prev), false))
                }
                NotAccepted::Refused(why) => Err(why),
            };
        };
        let accept = lap.lap();
        let round_full = stored.accepted_seq >= k;
        if round_full {
            self.known_round(round_id, &task.id, upload_limit, true);
        }
        // Into the round's in-memory sums (at most once per token), for strategies that keep them.
        self.folds
            .fold(ToFold {
                round_id,
                strategy,
                config: task.config.clone(),
                row: stored.clone(),
                update,
            })
            .await?;
        drop(folding);
        let stages = UploadStages {
            queue,
            read,
            decode,
            store,
            accept,
            fold: lap.lap(),
        };
        self.telemetry.upload(&task.id, Ok("accepted"));
        self.telemetry.upload_stages(&stages);
        info!(
            round = round_id,
            accepted = stored.accepted_seq,
            samples = num_samples,
            queue_ms = ms(queue),
            read_ms = ms(read),
            decode_ms = ms(decode),
            store_ms = ms(store),
            accept_ms = ms(accept),
            fold_ms = ms(stages.fold),
            "update accepted"
        );
        Ok((receipt(&stored), round_full))
    }

    /// For an upload to a closed round: the token's stored update, whose retry needs the body (to
    /// compare it) and is given back unread; without one the upload is late, refused `409
    /// round_closed` with its body drained.
    async fn stored_or_late<B: UploadBody>(
        &self,
        token_hash: &str,
        round_id: i64,
        body: B,
        upload_limit: usize,
    ) -> Result<(UpdateRow, B), ApiError> {
        match self.store.db.update_for_token(token_hash).await? {
            Some(prev) => Ok((prev, body)),
            None => {
                body.discard(upload_limit).await;
                Err(ApiError::RoundClosed(round_id))
            }
        }
    }

    /// Remembers a round this process took an upload for, and whether it takes no more updates
    /// (see [`crate::known_rounds`]).
    fn known_round(&self, round_id: i64, task_id: &str, upload_limit: usize, closed: bool) {
        self.known_rounds.insert(
            round_id,
            KnownRound {
                task_id: task_id.to_string(),
                upload_limit,
                closed,
            },
        );
    }

    /// What became of an update the database did not take, once its blob is dealt with. Another
    /// replica may have stored the same token's upload meanwhile: the same bytes get that receipt
    /// (and keep their blob, which is also that row's), other bytes `conflicting_retry`. Otherwise
    /// the round has ended, and a blob this upload wrote is removed (the round's folder may have
    /// gone while it was written); one it found written is another upload's to remove.
    async fn not_accepted(&self, row: &UpdateRow, wrote_blob: bool) -> Result<NotAccepted, ApiError> {
        let stored = self.store.db.update_for_token(&row.token_hash).await?;
        if let Some(prev) = stored.clone()
            && prev.sha256 == row.sha256
            && prev.num_samples == row.num_samples
        {
            return Ok(NotAccepted::StoredByAnother(prev));
        }
        if wrote_blob {
            self.remove_unstored_blob(row.round_id, &row.blob_key, stored.as_ref())
                .await;
        }
        Ok(NotAccepted::Refused(match stored {
            Some(prev) => ApiError::ConflictingRetry { stored: prev.sha256 },
            None => self.why_refused(row.round_id, row.num_samples as u64).await?,
        }))
    }

    /// Removes a blob this upload wrote and did not store, unless the token's stored row names it:
    /// then another replica stored the same bytes meanwhile (with its own sample count, perhaps),
    /// and the blob is that row's. A failure leaves an orphan, logged, not a failed request.
    async fn remove_unstored_blob(&self, round_id: i64, blob_key: &str, stored: Option<&UpdateRow>) {
        if stored.is_some_and(|prev| prev.blob_key == blob_key) {
            return;
        }
        if let Err(e) = self.store.blobs.delete(blob_key).await {
            warn!(round = round_id, error = %e, "could not remove a refused update's blob");
        }
    }

    async fn why_refused(&self, round_id: i64, num_samples: u64) -> Result<ApiError, ApiError> {
        let round = self
            .store
            .db
            .round(round_id)
            .await?
            .ok_or(ApiError::UnknownToken)?;
        if round.state == "open" && round.total_samples as u64 + num_samples > MAX_ROUND_SAMPLES {
            return Ok(AggregateError::RoundSampleLimit(round.total_samples as u64, num_samples).into());
        }
        Ok(ApiError::RoundClosed(round_id))
    }

    /// Stores a device's training metrics for its round.
    pub async fn report_metrics(
        &self,
        token: &str,
        device: Option<&str>,
        loss: f32,
        num_samples: u64,
        accuracy: Option<f32>,
    ) -> Result<(), ApiError> {
        if !loss.is_finite() || accuracy.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            return Err(ApiError::InvalidRequest(format!(
                "`loss` must be finite and `accuracy` within [0, 1]; got loss {loss}, accuracy {accuracy:?}"
            )));
        }
        // The report weighs the round's mean loss and accuracy, like an update's count weighs it.
        check_sample_count(num_samples)?;
        let device = devices::authenticate(&self.store.db, device).await?;
        let (token_hash, round_id, holder) = self.token_round(token).await?;
        // Only a token issued to an enrolled device can belong to a task that requires one.
        if holder.is_some() {
            let round = self
                .store
                .db
                .round(round_id)
                .await?
                .ok_or(ApiError::UnknownToken)?;
            check_holder(
                &self.task(&round.task_id).await?,
                holder.as_deref(),
                device.as_ref(),
            )?;
        }
        self.store
            .db
            .insert_metrics(
                &token_hash,
                round_id,
                f64::from(loss),
                num_samples as i64,
                accuracy.map(f64::from),
                now_ms(),
            )
            .await?;
        Ok(())
    }

    /// Finalises every round that is due: full, past its deadline, or left closing by a crash;
    /// stamps this replica's heartbeat, and hands over its sums of rounds another replica
    /// finalises.
    pub async fn tick(&self) -> Result<(), ApiError> {
        self.keep_in_touch().await?;
        self.finalize_due().await
    }

    /// Finalises every round that is due (or hands this replica's sums to the replica that does).
    async fn finalize_due(&self) -> Result<(), ApiError> {
        for task_id in self.store.db.running_task_ids().await? {
            if let Some(round) = self.store.db.active_round(&task_id).await? {
                self.finalize_if_due(round.id).await?;
            }
        }
        Ok(())
    }

    /// What a replica owes the others, apart from finalising: its heartbeat, and its sums of the
    /// rounds that have closed. Never waits on a finalisation, so two replicas finalising one round
    /// each never wait on each other's sums.
    async fn keep_in_touch(&self) -> Result<(), ApiError> {
        let beat = {
            let mut last = self.heartbeat.lock().expect("heartbeat lock");
            let due = last.is_none_or(|t| t.elapsed() >= replicas::HEARTBEAT_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if beat {
            replicas::heartbeat(&self.store.db, &self.replica, now_ms()).await?;
        }
        self.hand_over_sums().await
    }

    /// This replica, as the database knows it.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// For every round this replica holds sums of that has stopped taking uploads: hands them to
    /// its finaliser if it is closing and another replica holds the lease, and drops them. (While
    /// no replica holds it, this one may be about to: its finalisation takes its own sums, and
    /// handing them over meanwhile would race it into reading every update again.)
    async fn hand_over_sums(&self) -> Result<(), ApiError> {
        let held: Vec<i64> = self
            .accumulators
            .lock()
            .expect("accumulator lock")
            .keys()
            .copied()
            .collect();
        for round_id in held {
            match self.store.db.round(round_id).await?.map(|r| r.state).as_deref() {
                Some("open") => {}
                Some("closing") => {
                    let finaliser = replicas::finaliser(&self.store.db, round_id).await?;
                    if finaliser.is_some_and(|f| f != self.replica.id()) {
                        self.hand_over(round_id).await?;
                    }
                }
                // Finalised without them (or gone): nothing will read them.
                _ => {
                    self.accumulators
                        .lock()
                        .expect("accumulator lock")
                        .remove(&round_id);
                }
            }
        }
        Ok(())
    }

    /// Hands this replica's sums of a closing round (if it has any) to the round's finaliser,
    /// once the uploads it accepted are folded in (else at a later tick).
    async fn hand_over(&self, round_id: i64) -> Result<(), ApiError> {
        if Folding::any(&self.folding, round_id) {
            return Ok(());
        }
        let Some(held) = self
            .accumulators
            .lock()
            .expect("accumulator lock")
            .remove(&round_id)
        else {
            return Ok(());
        };
        let published = replicas::publish_partial(
            &self.store,
            round_id,
            &self.replica,
            &held.acc,
            &held.folded,
            now_ms(),
        )
        .await?;
        if published {
            info!(
                round = round_id,
                updates = held.folded.len(),
                "handed this replica's round sums to the finaliser"
            );
        }
        Ok(())
    }

    /// [`Coordinator::finalize_if_due`] without waiting for it: the request that filled a round is
    /// answered at once, and a failure is left to the ticker, which retries every due round.
    pub fn finalize_in_background(self: &Arc<Self>, round_id: i64) {
        let coordinator = self.clone();
        tokio::spawn(async move {
            if let Err(e) = coordinator.finalize_if_due(round_id).await {
                tracing::warn!(round = round_id, error = %e, "finalising a full round failed; the ticker retries");
            }
        });
    }

    /// Commits or abandons the round if it is due; does nothing otherwise. Idempotent and safe to
    /// repeat after a crash at any point: the closing flag freezes the accepted set, the new model
    /// is a deterministic function of that set, and `finish_round` applies once.
    pub async fn finalize_if_due(&self, round_id: i64) -> Result<(), ApiError> {
        let _one_at_a_time = self.store.finalize_lock.lock().await;
        let started = std::time::Instant::now();
        let db = &self.store.db;
        let Some(round) = db.round(round_id).await? else {
            return Ok(());
        };
        let task = self.task(&round.task_id).await?;
        let strategy = self.strategies.for_config(&task.config)?;
        let config = &task.config;
        if round.state == "open" {
            let full = strategy.round_full(&self.store, &task, &round).await?;
            if !full && now_ms() < round.deadline_ms {
                return Ok(());
            }
            db.close_round(round_id).await?;
        } else if round.state != "closing" {
            return Ok(());
        }
        // One replica finalises; the others hand it their sums.
        if !self.renew_lease(round_id).await? {
            return self.hand_over(round_id).await;
        }
        let round = db.round(round_id).await?.expect("round exists");
        let updates = db.updates_of_round(round_id).await?;
        let now = now_ms();
        let deadline = now + config.round_deadline_secs as i64 * 1000;
        // What the strategy's commit holds until its after-commit step (e.g. a table lock).
        let mut hold = None;
        let commits = strategy
            .commits(&self.store, &task, &round, updates.len())
            .await?;
        let (outcome, next) = if commits {
            let new_version = round.base_version + 1;
            let sums = self
                .round_sums(strategy.clone(), &round, config, &updates)
                .await?;
            if !self.renew_lease(round_id).await? {
                warn!(
                    round = round_id,
                    "another replica took over this round's finalisation"
                );
                return Ok(());
            }
            hold = Some(
                strategy
                    .commit(&self.store, &task, &round, sums, new_version)
                    .await?,
            );
            let more = task.committed_rounds + 1 < i64::from(config.rounds);
            let next = more.then_some(NextRound {
                seq: round.seq + 1,
                base_version: new_version,
                opened_ms: now,
                deadline_ms: deadline,
            });
            (RoundOutcome::Committed { new_version }, next)
        } else {
            let next = NextRound {
                seq: round.seq + 1,
                base_version: round.base_version,
                opened_ms: now,
                deadline_ms: deadline,
            };
            (RoundOutcome::Abandoned, Some(next))
        };
        let opens_next = next.is_some();
        let first = db.finish_round(&round, outcome, next, now).await?;
        if first {
            let committed = matches!(outcome, RoundOutcome::Committed { .. });
            self.telemetry.round_finished(&task.id, committed);
            if opens_next {
                self.telemetry.round_opened(&task.id);
            }
            self.telemetry.round_finalized(started.elapsed());
            match outcome {
                RoundOutcome::Committed { new_version } => info!(
                    task = %task.id, round = round.id, seq = round.seq, accepted = updates.len(),
                    samples = round.total_samples, version = new_version, "round committed"
                ),
                RoundOutcome::Abandoned => warn!(
                    task = %task.id, round = round.id, accepted = updates.len(),
                    min = config.min_devices_per_round, "round abandoned: not enough by the deadline"
                ),
            }
        }
        if let Some(hold) = hold {
            strategy
                .after_commit(&self.store, &task, &round, hold, first)
                .await?;
        }
        self.forget_round(round_id).await;
        Ok(())
    }

    /// Removes the update folders of rounds that have ended: [`Self::forget_round`] removes them as
    /// a round ends, but a finaliser killed between its commit and that step leaves them (nobody
    /// finalises that round again). Run at start-up; returns how many folders went.
    pub async fn sweep_ended_rounds(&self) -> Result<usize, ApiError> {
        let mut swept = 0;
        for name in self.store.blobs.list_folders("updates").await? {
            let Ok(round_id) = name.parse::<i64>() else {
                continue;
            };
            let ended = match self.store.db.round(round_id).await? {
                Some(round) => round.state == "committed" || round.state == "abandoned",
                None => false,
            };
            if ended {
                self.store
                    .blobs
                    .delete_prefix(&format!("updates/{round_id}"))
                    .await?;
                swept += 1;
            }
        }
        if swept > 0 {
            info!(rounds = swept, "removed the update blobs of ended rounds");
        }
        Ok(swept)
    }

    /// Drops what an ended round no longer needs: its in-memory sums and its update blobs.
    async fn forget_round(&self, round_id: i64) {
        self.accumulators
            .lock()
            .expect("accumulator lock")
            .remove(&round_id);
        if let Err(e) = self
            .store
            .blobs
            .delete_prefix(&format!("updates/{round_id}"))
            .await
        {
            warn!(round = round_id, error = %e, "could not remove the round's update blobs");
        }
    }

    /// Takes or renews this replica's lease to finalise a closing round; false if another
    /// replica holds it.
    async fn renew_lease(&self, round_id: i64) -> Result<bool, ApiError> {
        let now = now_ms();
        let until = now + self.options.finalise_lease.as_millis() as i64;
        Ok(replicas::claim_finalisation(&self.store.db, round_id, &self.replica, now, until).await?)
    }

    /// The round's sums for the strategy's commit (`None` for strategies that keep no running
    /// sums): this replica's own, merged with the sums other replicas handed over, and the updates
    /// that neither covers (folded by a replica that died, or before a restart) decoded again from
    /// their stored blobs one at a time (O(model size) memory). Each accepted update counts once
    /// whichever way, and the fixed-point sums make the result the same bits either way.
    async fn round_sums(
        &self,
        strategy: Arc<dyn Strategy>,
        round: &RoundRow,
        config: &TaskConfig,
        updates: &[UpdateRow],
    ) -> Result<Option<Sums>, ApiError> {
        let accepted: BTreeSet<&str> = updates.iter().map(|u| u.token_hash.as_str()).collect();
        let give_up = std::time::Instant::now() + self.options.partials_wait;
        while Folding::any(&self.folding, round.id) && std::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let own = self
            .accumulators
            .lock()
            .expect("accumulator lock")
            .remove(&round.id)
            .filter(|own| own.folded.iter().all(|t| accepted.contains(t.as_str())));
        let (mut acc, mut covered) = match own {
            Some(own) => (own.acc, own.folded),
            None => match strategy.new_sums(config) {
                Some(acc) => (acc, BTreeSet::new()),
                None => return Ok(None),
            },
        };
        let local = covered.len() as u64;
        let mut partial = 0;
        for p in self.wait_for_partials(round, updates, &covered).await? {
            let fits =
                p.tokens.iter().all(|t| accepted.contains(t.as_str())) && p.tokens.is_disjoint(&covered);
            if !fits {
                warn!(round = round.id, replica = %p.replica, "partial sums that do not fit the accepted set; ignored");
                continue;
            }
            let bytes = self.store.blobs.get(&p.blob_key).await?;
            acc = tokio::task::spawn_blocking(move || acc.merge_bytes(&bytes).map(|()| acc)).await??;
            partial += p.tokens.len() as u64;
            covered.extend(p.tokens);
        }
        let rest: Vec<&UpdateRow> = updates
            .iter()
            .filter(|u| !covered.contains(&u.token_hash))
            .collect();
        if !rest.is_empty() {
            info!(
                round = round.id,
                updates = rest.len(),
                "rebuilding round sums from stored updates"
            );
        }
        let mut reread_bytes = 0;
        for u in &rest {
            let body = self.store.blobs.get(&u.blob_key).await?;
            reread_bytes += body.len() as u64;
            let (decoder, config) = (strategy.clone(), config.clone());
            let n = u.num_samples as u64;
            acc = tokio::task::spawn_blocking(move || {
                let update = decoder.decode_update(&config, &body)?;
                acc.add(n, &update)?;
                Ok::<_, ApiError>(acc)
            })
            .await??;
            self.renew_lease(round.id).await?;
        }
        self.telemetry
            .round_sums(local, partial, rest.len() as u64, reread_bytes);
        info!(
            round = round.id,
            local,
            partial,
            reread = rest.len(),
            reread_bytes,
            "round sums gathered"
        );
        Ok(Some(acc))
    }

    /// The sums other replicas handed over for the round, once every live replica that accepted
    /// updates the finaliser's own sums do not cover has handed its over, or
    /// [`CoordinatorOptions::partials_wait`] has passed.
    async fn wait_for_partials(
        &self,
        round: &RoundRow,
        updates: &[UpdateRow],
        covered: &BTreeSet<String>,
    ) -> Result<Vec<replicas::Partial>, ApiError> {
        let others: BTreeSet<&str> = updates
            .iter()
            .filter(|u| !covered.contains(&u.token_hash))
            .filter_map(|u| u.replica.as_deref())
            .filter(|r| *r != self.replica.id())
            .collect();
        let give_up = std::time::Instant::now() + self.options.partials_wait;
        loop {
            let partials = replicas::partials(&self.store.db, round.id).await?;
            if others.is_empty() {
                return Ok(partials);
            }
            let since = now_ms() - replicas::LIVE_WITHIN.as_millis() as i64;
            let live = replicas::live_replicas(&self.store.db, &self.replica, since).await?;
            let waiting: Vec<&&str> = others
                .iter()
                .filter(|r| live.contains(**r) && !partials.iter().any(|p| p.replica == ***r))
                .collect();
            if waiting.is_empty() || std::time::Instant::now() >= give_up {
                if !waiting.is_empty() {
                    warn!(round = round.id, replicas = ?waiting, "live replicas did not hand over their sums in time");
                }
                return Ok(partials);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Still finalising: a lease shorter than the wait must not run out meanwhile (if it
            // was lost, the check before the commit stops this finalisation).
            self.renew_lease(round.id).await?;
        }
    }

    /// Runs [`Coordinator::tick`]'s two halves forever at `every`, apart: a finalisation waiting
    /// for other replicas' sums does not hold up this replica's own hand-over. The halves are
    /// tasks of a set this future owns, so aborting it stops both (a detached half outlived an
    /// embedded server's shutdown and met its closed database every tick).
    pub async fn run_ticker(self: Arc<Self>, every: Duration) {
        let mut halves = tokio::task::JoinSet::new();
        let in_touch = self.clone();
        halves.spawn(async move {
            every_tick(
                every,
                || in_touch.keep_in_touch(),
                "replica heartbeat or hand-over failed",
            )
            .await
        });
        halves.spawn(async move {
            every_tick(every, || self.finalize_due(), "round ticker failed; retrying").await
        });
        // Neither half returns; a panic in either ends the ticker's task with that panic.
        while let Some(ended) = halves.join_next().await {
            if let Err(e) = ended
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

async fn every_tick<F, Fut>(every: Duration, step: F, failed: &'static str)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), ApiError>>,
{
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(e) = step().await {
            warn!(error = %e, "{failed}");
        }
    }
}
