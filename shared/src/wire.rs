//! JSON bodies of the fedhive HTTP API, shared by the server and the device SDK.
//!
//! Binary bodies (models and updates) are safetensors, see [`crate::tensors`].

use serde::{Deserialize, Serialize};

use crate::{
    blocks::{BlockAssignment, BlockSchedule, PredictorAverage},
    tensors::TensorSpec,
};

/// Aggregation strategy of a task and its hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StrategyConfig {
    /// FedAvg: `x += server_lr * sum_i (n_i/m) Delta_i`.
    FedAvg {
        #[serde(default = "one")]
        server_lr: f32,
    },
    /// FedSubAvg (see [`crate::fedsubavg`]): the named 2-D tensors are row-addressable tables that
    /// devices download and update row by row; the other tensors are dense.
    FedSubAvg {
        #[serde(default = "one")]
        server_lr: f32,
        #[serde(default)]
        form: crate::fedsubavg::SubAvgForm,
        tables: Vec<String>,
    },
    /// FedLaAvg (`crate::fedlaavg`): least-recently-participated selection among the devices that
    /// check in during the round's selection window; `x -= gamma * S` with `S` the average of every
    /// enrolled device's latest gradient sum. `gamma` is `training.learning_rate`, the same on
    /// devices and server. Devices enrol first and check in with their credentials.
    FedLaAvg {
        /// The first W committed rounds only collect gradient sums; `x` moves from round W+1 on.
        #[serde(default)]
        warmup_rounds: u32,
        /// Milliseconds from a round's opening during which available devices check in (and are
        /// told to come back when it ends); then the K least recently participated are assigned.
        #[serde(default = "default_selection_window_ms")]
        selection_window_ms: u64,
    },
    /// MM-PSGD: FedAvg on `x` plus a running-mean predictor per block of `schedule` (see
    /// [`crate::blocks`]).
    MmPsgd {
        #[serde(default = "one")]
        server_lr: f32,
        schedule: BlockSchedule,
        /// Which rounds of a block its predictor averages (default: all, the paper's rule).
        #[serde(default)]
        predictor_average: PredictorAverage,
    },
    /// MC-PSGD: MM-PSGD plus a block-separate chain `y_m` per block; devices train both and report
    /// the loss of each, and the lower mean loss picks which one feeds the predictor.
    McPsgd {
        #[serde(default = "one")]
        server_lr: f32,
        schedule: BlockSchedule,
        /// Device step size `eta` on the chains `y_m` (default: `training.learning_rate`).
        #[serde(default)]
        chain_learning_rate: Option<f32>,
        #[serde(default)]
        predictor_average: PredictorAverage,
    },
    /// DC-CCL device-cloud fusion (see [`crate::dc_ccl`]): the task's model is the small co-model
    /// `F_s`; devices train it against a frozen control model `F_m` that the task's cloud worker
    /// publishes, and each round fuses the worker's copy of `F_s` with the devices' average.
    DcCcl {
        /// `w`: `F_s_new = w * F_s_cloud + (1 - w) * device average` (0.5 in the authors' code).
        #[serde(default = "half")]
        cloud_weight: f32,
        /// What a round does when its deadline passes without the cloud's contribution.
        #[serde(default)]
        without_cloud: WithoutCloud,
        /// Model family of `F_m` (devices instantiate it, frozen, beside `F_s`).
        control_model: String,
        /// Every tensor of `F_m`; the worker's published control models must match exactly.
        control_tensors: Vec<TensorSpec>,
    },
    /// Personalisation without user identifiers (see [`crate::anon`]): devices send labelled
    /// samples, each with a fresh embedding drawn from their private `N(mu_u, sigma^2 I)`, to a
    /// route that takes no credential; the task's cloud worker fine-tunes the model on the
    /// server's shuffled batches of them, and each round commits the model it submits.
    AnonEmbeddings {
        /// Width of `e`, fed to the model beside the input.
        embedding_dim: u32,
        /// `sigma` of every device's `q_u` (larger: less linkable, less personal).
        sigma: f32,
        /// Width of an input.
        input_features: u32,
        num_classes: u32,
        /// Most samples in one submission.
        #[serde(default = "default_max_samples_per_submission")]
        max_samples_per_submission: u32,
        /// Samples per shuffled batch the server stores (the worker sees full batches only).
        #[serde(default = "default_mix_batch_samples")]
        mix_batch_samples: u32,
        /// The task's global sample budget: samples per second over all submitters, and its burst.
        #[serde(default = "default_samples_per_second")]
        samples_per_second: f32,
        #[serde(default = "default_samples_burst")]
        samples_burst: u32,
    },
}

/// DC-CCL: what a round whose deadline passed without the cloud worker's contribution does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum WithoutCloud {
    /// Abandon the round (the model stays; the next round opens).
    #[default]
    Abandon,
    /// Commit the devices' average alone (`w = 0` for this round).
    DevicesOnly,
}

impl StrategyConfig {
    /// The block schedule of a block-cyclic strategy (MM-PSGD, MC-PSGD).
    pub fn block_schedule(&self) -> Option<&BlockSchedule> {
        match self {
            StrategyConfig::MmPsgd { schedule, .. } | StrategyConfig::McPsgd { schedule, .. } => {
                Some(schedule)
            }
            _ => None,
        }
    }

    /// The predictor averaging window of a block-cyclic strategy (MM-PSGD, MC-PSGD).
    pub fn predictor_average(&self) -> Option<PredictorAverage> {
        match self {
            StrategyConfig::MmPsgd {
                predictor_average, ..
            }
            | StrategyConfig::McPsgd {
                predictor_average, ..
            } => Some(*predictor_average),
            _ => None,
        }
    }
}

fn one() -> f32 {
    1.0
}

fn half() -> f32 {
    0.5
}

fn default_max_samples_per_submission() -> u32 {
    1024
}

fn default_mix_batch_samples() -> u32 {
    256
}

fn default_samples_per_second() -> f32 {
    2000.0
}

fn default_samples_burst() -> u32 {
    20_000
}

fn default_selection_window_ms() -> u64 {
    10_000
}

/// What a device uploads for its assignment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum UploadKind {
    /// `x_after - x_before` (FedAvg).
    #[default]
    Delta,
    /// FedLaAvg's `G = (x_before - x_after) / learning_rate`.
    GradientSum,
}

/// How a device encodes a dense update (FedAvg tasks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum UpdateEncoding {
    /// Every value as f32 (safetensors).
    #[default]
    F32,
    /// int8 values with one f32 scale per 256, stochastically rounded (`fedhive_shared::int8`):
    /// 3.9x fewer bytes, unbiased.
    Int8,
    /// The `percent` (1 to 100) of each tensor's values largest in magnitude, with their
    /// positions (`fedhive_shared::topk`): 8 bytes a kept value; the rest read as 0.
    TopK { percent: u8 },
}

impl UpdateEncoding {
    pub fn is_f32(&self) -> bool {
        *self == UpdateEncoding::F32
    }

    /// Whether a task may ask for it: a top-k percent is 1 to 100.
    pub fn is_valid(&self) -> bool {
        match self {
            UpdateEncoding::TopK { percent } => (1..=100).contains(percent),
            _ => true,
        }
    }

    /// The encoding's name without its parameters (`f32`, `int8`, `top_k`).
    pub fn kind(&self) -> &'static str {
        match self {
            UpdateEncoding::F32 => "f32",
            UpdateEncoding::Int8 => "int8",
            UpdateEncoding::TopK { .. } => "top_k",
        }
    }
}

/// `f32`, `int8` or `top_k:PERCENT` (command-line flags).
impl std::str::FromStr for UpdateEncoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let encoding = match s {
            "f32" => UpdateEncoding::F32,
            "int8" => UpdateEncoding::Int8,
            _ => match s.strip_prefix("top_k:").map(str::parse) {
                Some(Ok(percent)) => UpdateEncoding::TopK { percent },
                _ => {
                    return Err(format!(
                        "unknown update encoding `{s}` (expected f32, int8 or top_k:PERCENT)"
                    ));
                }
            },
        };
        if !encoding.is_valid() {
            return Err(format!("`{s}`: a top-k percent is 1 to 100"));
        }
        Ok(encoding)
    }
}

/// A device's pseudonymous identity: from `POST /v1/devices` with an enrolment key (valid for every
/// task), or from FedLaAvg's per-task enrolment (that task only). The secret is shown once; the
/// device presents `device_id:device_secret` as its bearer token when it checks in, and in the
/// `Fedhive-Device` header when it uploads to a task that requires enrolled devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceCredentials {
    pub device_id: String,
    pub device_secret: String,
}

/// An enrolled device as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceInfo {
    /// The device's id in this task (the selection's tie-break).
    pub device_id: String,
    /// `seq` of the latest committed round that applied this device's update (`R_i`); `None` if
    /// none did yet.
    pub last_round_seq: Option<i64>,
    /// Its credential's id (`GET /v1/devices`, what an operator revokes) where it differs from
    /// `device_id`: a device enrolled with a key gets a pseudonym of its own in each FedLaAvg task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_as: Option<String>,
}

/// What an operator sends to create an enrolment key (`POST /v1/enrolment-keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrolmentKeyRequest {
    /// A label for the operators, e.g. the app release that ships the key (1 to 100 characters).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 100))]
    pub name: String,
}

/// A new enrolment key: the key itself is shown only here (the server keeps its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrolmentKeyCreated {
    pub key_id: String,
    pub name: String,
    /// `<key_id>:<secret>`: what a device sends as `Authorization: Bearer` to `POST /v1/devices`.
    pub enrolment_key: String,
}

/// An enrolment key as operators see it (never its secret or hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrolmentKey {
    pub key_id: String,
    pub name: String,
    /// Unix milliseconds.
    pub created_ms: i64,
    /// When it was revoked (Unix milliseconds): it enrols no device, and the devices it enrolled
    /// are refused.
    pub revoked_ms: Option<i64>,
    /// Devices enrolled with it (revoked ones included).
    pub devices: i64,
}

/// An enrolled device as operators see it (`GET /v1/devices`; never its secret or hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrolledDevice {
    pub device_id: String,
    /// The enrolment key it enrolled with; `None`: FedLaAvg's per-task enrolment (no key).
    pub key_id: Option<String>,
    /// Unix milliseconds.
    pub enrolled_ms: i64,
    /// When it was revoked (Unix milliseconds); its credential is refused from then on.
    pub revoked_ms: Option<i64>,
}

impl DeviceCredentials {
    /// The check-in bearer token.
    pub fn bearer(&self) -> String {
        format!("{}:{}", self.device_id, self.device_secret)
    }
}

/// Hyperparameters handed to every device of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TrainingParams {
    /// Local epochs over the device's data.
    pub local_epochs: u32,
    /// Optional cap on local steps (0 = no cap).
    #[serde(default)]
    pub max_local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    /// How the server lowers `learning_rate` as the task's rounds commit (none: constant). The
    /// server applies it: a round's assignment carries that round's rate and no schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate_schedule: Option<LearningRateSchedule>,
}

/// A learning-rate schedule over a task's committed rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LearningRateSchedule {
    /// Step decay (PyTorch's `MultiStepLR`): the rate is multiplied by `factor` (0 < factor <= 1)
    /// once for each milestone reached, a milestone being a count of committed rounds, in
    /// increasing order. `{"kind": "step", "milestones": [30], "factor": 0.2}` trains rounds 0-29 at
    /// the full rate and the rest at a fifth of it, as the DC-CCL authors halve theirs for the last
    /// rounds.
    Step { milestones: Vec<u32>, factor: f32 },
}

impl LearningRateSchedule {
    /// Why the schedule cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        match self {
            LearningRateSchedule::Step { milestones, factor } => {
                if !(factor.is_finite() && *factor > 0.0 && *factor <= 1.0) {
                    return Some(format!("`factor` must be in (0, 1], got {factor}"));
                }
                if milestones.is_empty() || milestones.windows(2).any(|w| w[0] >= w[1]) {
                    return Some(format!(
                        "`milestones` must be increasing and not empty, got {milestones:?}"
                    ));
                }
                None
            }
        }
    }
}

impl TrainingParams {
    /// The parameters of a round trained after `committed_rounds` commits: the schedule's rate for
    /// that round, and no schedule (what a device is sent).
    pub fn for_round(&self, committed_rounds: u64) -> TrainingParams {
        let learning_rate = match &self.learning_rate_schedule {
            None => self.learning_rate,
            Some(LearningRateSchedule::Step { milestones, factor }) => {
                let reached = milestones
                    .iter()
                    .filter(|&&m| u64::from(m) <= committed_rounds)
                    .count();
                self.learning_rate * factor.powi(reached as i32)
            }
        };
        TrainingParams {
            learning_rate,
            learning_rate_schedule: None,
            ..self.clone()
        }
    }
}

/// What an operator sends to create a task (the initial weights travel beside it as safetensors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskConfig {
    /// Model family the devices instantiate (e.g. `"mlp"`, `"cnn"`).
    pub model: String,
    /// Every tensor of the model; updates must match exactly.
    pub tensors: Vec<TensorSpec>,
    pub strategy: StrategyConfig,
    pub training: TrainingParams,
    /// K: the round commits as soon as this many updates are accepted.
    pub devices_per_round: u32,
    /// The round commits at its deadline if at least this many updates were accepted.
    pub min_devices_per_round: u32,
    /// Assignments handed out per round = ceil(K * over_selection), to absorb dropouts.
    pub over_selection: f32,
    /// Seconds from a round's opening to its deadline.
    pub round_deadline_secs: u64,
    /// The task finishes after this many committed rounds.
    pub rounds: u32,
    /// Check-ins need a device enrolled with an enrolment key (`Authorization: Bearer
    /// device_id:device_secret`), and uploads and metrics the credential of the device the upload
    /// token was issued to (`Fedhive-Device`). Default false: anonymous devices may take part.
    #[serde(default)]
    pub require_enrolled_device: bool,
    /// How devices encode their updates (default f32; int8 for FedAvg tasks).
    #[serde(default, skip_serializing_if = "UpdateEncoding::is_f32")]
    pub update_encoding: UpdateEncoding,
}

/// Answer to a check-in: train now, come back later, or stop.
#[expect(
    clippy::large_enum_variant,
    reason = "an answer lives for one request; boxing the assignment would change every match on it"
)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CheckinResponse {
    Assigned(Assignment),
    RetryAfter { retry_after_ms: u64, reason: String },
    Finished { model_version: i64 },
}

/// A device's place in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub task_id: String,
    pub round_id: i64,
    /// Version of the model to train from (also the model download's ETag).
    pub model_version: i64,
    pub model: String,
    pub training: TrainingParams,
    /// Bearer token for this device's upload (single use per round).
    pub upload_token: String,
    /// Unix seconds after which uploads are refused.
    pub deadline_unix: i64,
    /// What to upload (absent from older servers: a delta).
    #[serde(default)]
    pub upload: UploadKind,
    /// How to encode the upload (absent: f32).
    #[serde(default, skip_serializing_if = "UpdateEncoding::is_f32")]
    pub encoding: UpdateEncoding,
    /// Block-cyclic strategies: the round's block, and in MC-PSGD the chain to train as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockAssignment>,
    /// DC-CCL: the frozen control model `F_m` to train beside (its version is its download's ETag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlModelRef>,
}

/// DC-CCL: which control model `F_m` a device trains the co-model against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ControlModelRef {
    /// Model family of `F_m`.
    pub model: String,
    /// Version to download from `GET /v1/tasks/{id}/control-model?version=N`.
    pub version: i64,
}

/// Acknowledgement of an accepted update (returned again, unchanged, for a retried identical upload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UploadReceipt {
    pub round_id: i64,
    pub accepted_updates: i64,
    pub num_samples: u64,
    pub sha256: String,
}

/// Training metrics a device reports after its upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsReport {
    pub loss: f32,
    /// 1 to 2^24, like an update's.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 16_777_216))]
    pub num_samples: u64,
    #[serde(default)]
    pub accuracy: Option<f32>,
}

/// Error body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// Stable, greppable code (`"shape_mismatch"`, `"round_closed"`, ...).
    pub error: String,
    /// Human-readable message naming the offending field and value.
    pub message: String,
    /// When to try again (`503 server_busy`), also sent as the `Retry-After` header in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TaskState {
    Running,
    /// Paused by an operator: no assignments until resumed.
    Paused,
    /// Ran all its rounds.
    Finished,
    /// Stopped by an operator; its model stays at the last committed version.
    Cancelled,
}

impl TaskState {
    /// True when no more rounds will run (finished or cancelled).
    pub fn is_over(&self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Cancelled)
    }

    /// The state as the API spells it.
    pub fn name(&self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Paused => "paused",
            TaskState::Finished => "finished",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl StrategyConfig {
    /// The shapes of an anonymous-embeddings task's samples.
    pub fn sample_shape(&self) -> Option<crate::anon::SampleShape> {
        match self {
            StrategyConfig::AnonEmbeddings {
                embedding_dim,
                input_features,
                num_classes,
                ..
            } => Some(crate::anon::SampleShape {
                features: *input_features as usize,
                embedding_dim: *embedding_dim as usize,
                num_classes: *num_classes as usize,
            }),
            _ => None,
        }
    }

    /// The strategy's `name` as the config spells it.
    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::FedAvg { .. } => "fed_avg",
            StrategyConfig::FedSubAvg { .. } => "fed_sub_avg",
            StrategyConfig::FedLaAvg { .. } => "fed_la_avg",
            StrategyConfig::MmPsgd { .. } => "mm_psgd",
            StrategyConfig::McPsgd { .. } => "mc_psgd",
            StrategyConfig::DcCcl { .. } => "dc_ccl",
            StrategyConfig::AnonEmbeddings { .. } => "anon_embeddings",
        }
    }
}

/// One task in the operator's list (`GET /v1/tasks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskSummary {
    pub task_id: String,
    pub state: TaskState,
    /// The task config's `model` name and strategy.
    pub model: String,
    pub strategy: String,
    pub model_version: i64,
    pub committed_rounds: i64,
    /// Rounds to commit in all (the config's `rounds`).
    pub rounds: u32,
    /// Unix milliseconds.
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RoundState {
    Open,
    Committed,
    Abandoned,
}

/// A round as the status endpoints report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoundInfo {
    pub round_id: i64,
    /// 1-based attempt number within the task (abandoned attempts count too).
    pub seq: i64,
    pub state: RoundState,
    pub base_version: i64,
    pub assigned: i64,
    pub accepted: i64,
    pub total_samples: i64,
    pub opened_unix: i64,
    pub deadline_unix: i64,
    /// When the round was committed or abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_unix: Option<i64>,
    /// What its devices reported about their training, if any did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports: Option<RoundReports>,
}

/// The training metrics a round's devices reported (`POST /v1/metrics`), weighted by their sample
/// counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoundReports {
    pub devices: i64,
    pub loss: f64,
    /// Over the devices that reported an accuracy.
    pub accuracy: Option<f64>,
}

/// Task status for operators and dashboards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskStatus {
    pub task_id: String,
    pub state: TaskState,
    pub model_version: i64,
    pub committed_rounds: i64,
    pub config: TaskConfig,
    pub current_round: Option<RoundInfo>,
}

/// Returned when a task is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskCreated {
    pub task_id: String,
    pub model_version: i64,
    /// DC-CCL: the task's cloud-worker token, shown once. It can only read the task's round,
    /// submit the cloud's contribution and publish control models, for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_token: Option<String>,
}

/// DC-CCL: what the cloud worker needs to know about its task (`GET /v1/tasks/{id}/cloud`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CloudStatus {
    pub task_id: String,
    pub state: TaskState,
    /// The current model version (of `F_s`).
    pub model_version: i64,
    /// Model family of `F_s` and of `F_m`.
    pub model: String,
    pub control_model: String,
    /// The devices' training parameters (the worker trains its copy of `F_s` with the same).
    pub training: TrainingParams,
    /// The round now open or closing, if any.
    pub round: Option<RoundInfo>,
    /// Whether that round already holds the cloud's contribution.
    pub cloud_submitted: bool,
    /// Latest published control model version (`None`: none yet; devices wait for one).
    pub control_version: Option<i64>,
}

/// Anonymous embeddings: the answer to a submission of samples
/// (`POST /v1/tasks/{id}/anonymous/samples`). It names nothing the device could be known by again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SamplesAccepted {
    pub accepted_samples: u32,
    /// True when this answers a retry of a submission already stored (same `Idempotency-Key`):
    /// nothing was stored again.
    pub duplicate: bool,
}

/// Anonymous embeddings: what the task's cloud worker needs to know
/// (`GET /v1/tasks/{id}/anonymous`, worker token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AnonStatus {
    pub task_id: String,
    pub state: TaskState,
    pub model_version: i64,
    pub model: String,
    pub training: TrainingParams,
    /// Width of an input, of `e`, and the class count (the shape of every sample).
    pub input_features: u32,
    pub embedding_dim: u32,
    pub num_classes: u32,
    /// Shuffled batches stored so far, numbered 1..=batches (`GET .../anonymous/batches/{n}`).
    pub batches: i64,
    /// Samples accepted and not yet in a batch (they wait for `mix_batch_samples` more).
    pub pending_samples: i64,
    /// The round now open or closing, if any.
    pub round: Option<RoundInfo>,
    /// Whether that round already holds the worker's model.
    pub round_model_submitted: bool,
}

impl AnonStatus {
    pub fn sample_shape(&self) -> crate::anon::SampleShape {
        crate::anon::SampleShape {
            features: self.input_features as usize,
            embedding_dim: self.embedding_dim as usize,
            num_classes: self.num_classes as usize,
        }
    }
}

/// Acknowledgement of the cloud's contribution to a round, or of a published control model
/// (returned again, unchanged, for a retried identical body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactReceipt {
    /// The round (cloud contribution) or the version (control model) it was stored as.
    pub id: i64,
    pub sha256: String,
}

/// What a named operator token may do (see `docs/threat-model.md`, "Who is who").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TokenScope {
    /// Read what operators read: tasks, rounds, devices, blocks, heat, `/metrics`, the audit log.
    ReadOnly,
    /// What the admin token can do, except creating, listing and revoking tokens.
    Operator,
    /// One DC-CCL task's cloud-worker routes, as the task's own worker token can.
    CloudWorker,
}

impl TokenScope {
    /// The scope as the API spells it.
    pub fn name(&self) -> &'static str {
        match self {
            TokenScope::ReadOnly => "read-only",
            TokenScope::Operator => "operator",
            TokenScope::CloudWorker => "cloud-worker",
        }
    }

    /// The scope the API spells `name`.
    pub fn from_name(name: &str) -> Option<TokenScope> {
        [
            TokenScope::ReadOnly,
            TokenScope::Operator,
            TokenScope::CloudWorker,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// `POST /v1/tokens`: a named operator token to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewToken {
    /// Letters, digits, `.`, `_` and `-` (at most 64, the first a letter or digit); taken for good,
    /// even after its token is revoked, so the audit log's names keep meaning one credential.
    /// `admin` and `insecure-dev` are reserved.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"))]
    pub name: String,
    pub scope: TokenScope,
    /// The DC-CCL task of a `cloud-worker` token (required for that scope, refused for the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

/// A named token as listed (`GET /v1/tokens`): never the token or its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    pub name: String,
    pub scope: TokenScope,
    /// The task of a `cloud-worker` token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Who created it (`admin`: the bootstrap token).
    pub created_by: String,
    pub created_ms: i64,
    /// When it was revoked; a revoked token is refused from the next request on.
    pub revoked_ms: Option<i64>,
    /// Its last accepted request, to the minute (refreshed at most once a minute).
    pub last_used_ms: Option<i64>,
}

/// Returned once when a token is created: the only time the token itself is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenCreated {
    /// `Authorization: Bearer <token>`. Only its SHA-256 is stored: it cannot be shown again.
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// One operator action (`GET /v1/audit`): who did what to which target, how it ended, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Increasing with time; `?before=` pages back from one.
    pub id: i64,
    pub at_ms: i64,
    /// A token's name; `admin` (the bootstrap token), `insecure-dev` (no token configured) or
    /// `task-worker:<task id>` (a DC-CCL task's own worker token).
    pub actor: String,
    /// `task.create`, `task.pause`, `task.resume`, `task.cancel`, `token.create`, `token.revoke`,
    /// `enrolment_key.create`, `enrolment_key.revoke`, `device.revoke`, `cloud.update`,
    /// `cloud.control_model`.
    pub action: String,
    /// The task id, token name, or `<task id>/<round or version>`; empty when a task creation failed.
    pub target: String,
    /// `ok`, or the error code the action was refused with.
    pub outcome: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_schedule_multiplies_the_rate_at_each_milestone_reached() {
        let params = TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 32,
            learning_rate: 0.05,
            learning_rate_schedule: Some(LearningRateSchedule::Step {
                milestones: vec![30, 35],
                factor: 0.2,
            }),
        };
        let rate = |round| params.for_round(round).learning_rate;
        assert_eq!((rate(0), rate(29)), (0.05, 0.05));
        assert_eq!((rate(30), rate(34)), (0.05 * 0.2, 0.05 * 0.2));
        assert_eq!((rate(35), rate(1000)), (0.05 * 0.2 * 0.2, 0.05 * 0.2 * 0.2));
        assert_eq!(params.for_round(31).learning_rate_schedule, None);
        let constant = TrainingParams {
            learning_rate_schedule: None,
            ..params.clone()
        };
        assert_eq!(constant.for_round(50), constant);
        // JSON: absent when constant (older devices and servers read the same body), tagged by kind.
        assert!(!serde_json::to_string(&constant).unwrap().contains("schedule"));
        let json = serde_json::to_value(&params).unwrap();
        assert_eq!(
            json["learning_rate_schedule"],
            serde_json::json!({"kind": "step", "milestones": [30, 35], "factor": 0.2f32})
        );
        assert_eq!(serde_json::from_value::<TrainingParams>(json).unwrap(), params);
    }

    #[test]
    fn schedules_that_cannot_apply_name_their_problem() {
        let step = |milestones: Vec<u32>, factor| LearningRateSchedule::Step { milestones, factor };
        assert_eq!(step(vec![1, 5], 0.5).problem(), None);
        assert_eq!(step(vec![3], 1.0).problem(), None);
        for (bad, named) in [
            (step(vec![5, 5], 0.5), "milestones"),
            (step(vec![], 0.5), "milestones"),
            (step(vec![1], 0.0), "factor"),
            (step(vec![1], -0.5), "factor"),
            (step(vec![1], f32::INFINITY), "factor"),
        ] {
            assert!(bad.problem().is_some_and(|p| p.contains(named)), "{bad:?}");
        }
    }

    #[test]
    fn strategy_names_are_the_config_tags() {
        let configs = [
            StrategyConfig::FedAvg { server_lr: 1.0 },
            StrategyConfig::FedSubAvg {
                server_lr: 1.0,
                form: Default::default(),
                tables: vec![],
            },
            StrategyConfig::FedLaAvg {
                warmup_rounds: 0,
                selection_window_ms: 1,
            },
            StrategyConfig::DcCcl {
                cloud_weight: 0.5,
                without_cloud: WithoutCloud::Abandon,
                control_model: "m".into(),
                control_tensors: vec![],
            },
            StrategyConfig::AnonEmbeddings {
                embedding_dim: 8,
                sigma: 0.3,
                input_features: 784,
                num_classes: 10,
                max_samples_per_submission: 1024,
                mix_batch_samples: 256,
                samples_per_second: 2000.0,
                samples_burst: 20_000,
            },
        ];
        for config in configs {
            let json = serde_json::to_value(&config).unwrap();
            assert_eq!(json["name"], config.name(), "{config:?}");
        }
    }

    #[test]
    fn token_scope_names_are_the_wire_names() {
        for scope in [
            TokenScope::ReadOnly,
            TokenScope::Operator,
            TokenScope::CloudWorker,
        ] {
            assert_eq!(serde_json::to_value(scope).unwrap(), scope.name());
            assert_eq!(TokenScope::from_name(scope.name()), Some(scope));
        }
        assert_eq!(TokenScope::from_name("admin"), None);
    }

    #[test]
    fn task_state_names_are_the_wire_names() {
        for state in [
            TaskState::Running,
            TaskState::Paused,
            TaskState::Finished,
            TaskState::Cancelled,
        ] {
            assert_eq!(serde_json::to_value(&state).unwrap(), state.name());
        }
    }
}
