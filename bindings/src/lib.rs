//! The device SDK for apps written in Kotlin, Swift or Python, through UniFFI.
//!
//! A binding cannot hand Rust a burn module, so it chooses one of the SDK's built-in classifiers
//! ([`BuiltinModel`]) and passes its data as arrays (28x28 grey images as bytes, one class per
//! image). Everything else is the Rust [`fedhive_client::session::Session`]: one round per
//! [`DeviceSession::run_round`] call, progress callbacks, cancellation from another thread, wall-time
//! and network limits, and state in a directory the app chooses that survives the process being
//! killed. Calls block the calling thread (call them off the UI thread); each session runs its own
//! small tokio runtime.
//!
//! Generate the foreign code from the built library:
//! `cargo run -p fedhive-ffi --bin uniffi-bindgen -- generate --library <libfedhive_ffi.so>
//! --language python|kotlin|swift --out-dir <dir>`, or [`generate_bindings`] from Rust (the
//! end-to-end test `tests/tests/bindings.rs` does, then runs `bindings/python/test_session.py` and
//! `bindings/kotlin/TestSession.kt`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use camino::Utf8PathBuf;

use fedhive_client::client::{ClientError, FedhiveClient};
use fedhive_client::data::{Dataset, IMAGE_PIXELS, NUM_CLASSES};
use fedhive_client::model::{Cnn, Mlp, ModelKind, initial_weights};
use fedhive_client::session::{
    CancelToken, Progress, ProgressCallback, RoundConditions, RoundOutcome, Session, SessionError, StopReason,
};
use fedhive_client::state::{DeviceState, StateError};
use fedhive_shared::wire::{StrategyConfig, TaskConfig, TrainingParams};

uniffi::setup_scaffolding!();

/// Every failure, as one exception type whose message says what went wrong.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum FedhiveError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the session's runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The SDK's built-in classifiers of 28x28 grey images into 10 classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum BuiltinModel {
    /// 784-128-10 perceptron (task model name `mlp`).
    Mlp,
    /// Two conv + pool blocks and a linear head (task model name `cnn`).
    Cnn,
}

impl BuiltinModel {
    fn kind(self) -> ModelKind {
        match self {
            BuiltinModel::Mlp => ModelKind::Mlp,
            BuiltinModel::Cnn => ModelKind::Cnn,
        }
    }
}

/// What one round may use (absent: no limit).
#[derive(Debug, Clone, Default, uniffi::Record)]
pub struct RoundLimits {
    pub max_wall_time_ms: Option<u64>,
    /// Body bytes the round may move (model download plus update upload), for a metered network.
    pub max_network_bytes: Option<u64>,
}

/// What one [`DeviceSession::run_round`] call did.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum RoundResult {
    /// The update was accepted (counted once) and its metrics reported.
    Contributed {
        round_id: i64,
        num_samples: u64,
        loss: f32,
        bytes_downloaded: u64,
        bytes_uploaded: u64,
        /// The round was begun by an earlier run (killed or stopped).
        resumed: bool,
    },
    /// The round closed before the update arrived; nothing counted.
    Late { round_id: i64 },
    /// No round for this device now: call again after `retry_after_ms`.
    NotNow { retry_after_ms: u64, reason: String },
    /// The task is over.
    Finished { model_version: i64 },
    /// Stopped early (`cancelled`, `wall_time` or `network_bytes`); the next call resumes the round.
    Stopped { round_id: i64, reason: String },
}

impl From<RoundOutcome> for RoundResult {
    fn from(outcome: RoundOutcome) -> Self {
        match outcome {
            RoundOutcome::Contributed(r) => RoundResult::Contributed {
                round_id: r.receipt.round_id,
                num_samples: r.num_samples,
                loss: r.loss,
                bytes_downloaded: r.bytes_downloaded,
                bytes_uploaded: r.bytes_uploaded,
                resumed: r.resumed,
            },
            RoundOutcome::Late { round_id } => RoundResult::Late { round_id },
            RoundOutcome::NotNow { retry_after, reason } => RoundResult::NotNow {
                retry_after_ms: retry_after.as_millis() as u64,
                reason,
            },
            RoundOutcome::Finished { model_version } => RoundResult::Finished { model_version },
            RoundOutcome::Stopped { round_id, reason } => RoundResult::Stopped {
                round_id,
                reason: match reason {
                    StopReason::Cancelled => "cancelled",
                    StopReason::WallTime => "wall_time",
                    StopReason::NetworkBytes => "network_bytes",
                }
                .to_string(),
            },
        }
    }
}

/// Hears where a round is. `stage` is one of `checked_in`, `resumed`, `downloaded`, `training`
/// (after each step, with `step` of `total_steps`), `trained`, `upload_acknowledged`, `reported`.
#[uniffi::export(with_foreign)]
pub trait ProgressListener: Send + Sync {
    fn on_progress(&self, stage: String, round_id: i64, step: u64, total_steps: u64);
}

enum BuiltinSession {
    Mlp(Session<Mlp, Dataset>),
    Cnn(Session<Cnn, Dataset>),
}

/// A device's place in one task (see the module's documentation).
#[derive(uniffi::Object)]
pub struct DeviceSession {
    runtime: tokio::runtime::Runtime,
    session: Mutex<BuiltinSession>,
    /// The running round's token: [`DeviceSession::cancel`] trips it without waiting for the round.
    cancel: Mutex<CancelToken>,
}

#[uniffi::export]
impl DeviceSession {
    /// A session of `task_id` on the server at `server_url`, training `model` on the CPU with the
    /// images `pixels` (`labels.len()` images of 784 bytes, row-major) and their `labels` (0..9),
    /// keeping its state in `state_dir`. `seed` fixes the local shuffles (random when absent).
    #[uniffi::constructor]
    pub fn new(
        server_url: String,
        task_id: String,
        state_dir: String,
        model: BuiltinModel,
        pixels: Vec<u8>,
        labels: Vec<u8>,
        seed: Option<u64>,
    ) -> Result<Arc<Self>, FedhiveError> {
        let data = Arc::new(dataset(&pixels, labels)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let client = FedhiveClient::new(&server_url)?;
        let state = DeviceState::open(state_dir)?;
        let device = burn::tensor::Device::flex();
        let session = match model {
            BuiltinModel::Mlp => BuiltinSession::Mlp(with_seed(
                Session::new(client, &task_id, state, device, Mlp::new, data)?,
                seed,
            )),
            BuiltinModel::Cnn => BuiltinSession::Cnn(with_seed(
                Session::new(client, &task_id, state, device, Cnn::new, data)?,
                seed,
            )),
        };
        Ok(Arc::new(DeviceSession {
            runtime,
            session: Mutex::new(session),
            cancel: Mutex::new(CancelToken::default()),
        }))
    }

    /// Enrols with the app's enrolment key (once: later calls return the stored identity) and
    /// returns the device id.
    pub fn enrol(&self, enrolment_key: String) -> Result<String, FedhiveError> {
        let mut session = self.session.lock().expect("a session call panicked");
        let credentials = match &mut *session {
            BuiltinSession::Mlp(s) => self.runtime.block_on(s.enrol(&enrolment_key))?.clone(),
            BuiltinSession::Cnn(s) => self.runtime.block_on(s.enrol(&enrolment_key))?.clone(),
        };
        Ok(credentials.device_id)
    }

    /// Does one round's work: checks in (or resumes the round a killed or stopped run left),
    /// downloads, trains, uploads and reports.
    pub fn run_round(
        &self,
        limits: RoundLimits,
        listener: Option<Arc<dyn ProgressListener>>,
    ) -> Result<RoundResult, FedhiveError> {
        let cancel = CancelToken::default();
        *self.cancel.lock().expect("never poisoned") = cancel.clone();
        let conditions = RoundConditions {
            cancel,
            max_wall_time: limits.max_wall_time_ms.map(Duration::from_millis),
            max_network_bytes: limits.max_network_bytes,
            progress: listener.map(|l| {
                Arc::new(move |p: &Progress| {
                    let (round_id, step, total) = where_it_is(p);
                    l.on_progress(p.name().to_string(), round_id, step, total);
                }) as ProgressCallback
            }),
        };
        let mut session = self.session.lock().expect("a session call panicked");
        let outcome = match &mut *session {
            BuiltinSession::Mlp(s) => self.runtime.block_on(s.run_round(&conditions))?,
            BuiltinSession::Cnn(s) => self.runtime.block_on(s.run_round(&conditions))?,
        };
        Ok(outcome.into())
    }

    /// Stops the round in progress at its next step (from any thread); what it did is kept.
    pub fn cancel(&self) {
        self.cancel.lock().expect("never poisoned").cancel();
    }
}

/// An operator's step, for apps' tests and demos: creates a FedAvg task for a built-in model
/// (its deterministic initial weights) and returns its id.
#[uniffi::export]
pub fn create_builtin_task(
    server_url: String,
    admin_token: String,
    model: BuiltinModel,
    devices_per_round: u32,
    rounds: u32,
    require_enrolled_device: bool,
) -> Result<String, FedhiveError> {
    let weights = initial_weights(model.kind(), 0);
    let config = TaskConfig {
        model: model.kind().name().into(),
        tensors: weights.specs(),
        strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
        training: TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 32,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        },
        devices_per_round,
        min_devices_per_round: devices_per_round,
        over_selection: 1.0,
        round_deadline_secs: 600,
        rounds,
        require_enrolled_device,
        update_encoding: Default::default(),
    };
    let client = FedhiveClient::new(&server_url)?.with_admin_token(admin_token);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let created = runtime.block_on(client.create_task(&config, weights.encode()))?;
    Ok(created.task_id)
}

/// An operator's step: a new enrolment key (`<key_id>:<secret>`) to ship with an app release.
#[uniffi::export]
pub fn create_enrolment_key(
    server_url: String,
    admin_token: String,
    name: String,
) -> Result<String, FedhiveError> {
    let client = FedhiveClient::new(&server_url)?.with_admin_token(admin_token);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime
        .block_on(client.create_enrolment_key(&name))?
        .enrolment_key)
}

fn with_seed<M, D>(session: Session<M, D>, seed: Option<u64>) -> Session<M, D>
where
    M: fedhive_client::federated::FederatedModel + 'static,
    D: fedhive_client::federated::LocalData<Batch = M::Batch> + Send + Sync + 'static,
{
    match seed {
        Some(seed) => session.with_seed(seed),
        None => session,
    }
}

/// A language [`generate_bindings`] writes code for.
pub use uniffi::TargetLanguage;

/// Why foreign code could not be generated.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate {language:?} bindings from {}: {message}", library.display())]
pub struct BindgenError {
    pub library: PathBuf,
    pub language: TargetLanguage,
    pub message: String,
}

/// Writes the foreign code for `language` of the built library `library` (this crate's cdylib)
/// into `out_dir`: what `uniffi-bindgen generate --library` does, for tests and build scripts.
pub fn generate_bindings(
    library: &Path,
    language: TargetLanguage,
    out_dir: &Path,
) -> Result<(), BindgenError> {
    let fail = |message: String| BindgenError {
        library: library.to_path_buf(),
        language: language.clone(),
        message,
    };
    let utf8 = |p: &Path| {
        Utf8PathBuf::from_path_buf(p.to_path_buf()).map_err(|p| fail(format!("{} is not UTF-8", p.display())))
    };
    uniffi::generate(uniffi::GenerateOptions {
        languages: vec![language.clone()],
        source: utf8(library)?,
        out_dir: utf8(out_dir)?,
        config_override: None,
        format: false,
        crate_filter: None,
        metadata_no_deps: true,
    })
    .map_err(|e| fail(format!("{e:#}")))
}

/// The images as the SDK's dataset (pixels scaled to [0, 1]), refused unless they fit the labels.
fn dataset(pixels: &[u8], labels: Vec<u8>) -> Result<Dataset, FedhiveError> {
    if labels.is_empty() || pixels.len() != labels.len() * IMAGE_PIXELS {
        return Err(FedhiveError::InvalidArgument(format!(
            "{} pixels for {} labels; expected {IMAGE_PIXELS} per label and at least one image",
            pixels.len(),
            labels.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| usize::from(l) >= NUM_CLASSES) {
        return Err(FedhiveError::InvalidArgument(format!(
            "label {bad} is not a class (0..{NUM_CLASSES})"
        )));
    }
    Ok(Dataset {
        images: pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
        labels,
    })
}

/// `(round_id, step, total_steps)` of a progress event (steps 0 outside training).
fn where_it_is(p: &Progress) -> (i64, u64, u64) {
    match *p {
        Progress::Training {
            round_id,
            step,
            total_steps,
        } => (round_id, step as u64, total_steps as u64),
        Progress::CheckedIn { round_id }
        | Progress::Resumed { round_id, .. }
        | Progress::Downloaded { round_id, .. }
        | Progress::Trained { round_id, .. }
        | Progress::UploadAcknowledged { round_id }
        | Progress::Reported { round_id } => (round_id, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_that_do_not_fit_their_labels_are_refused() {
        let err = dataset(&[0; 784], vec![1, 2]).unwrap_err();
        assert!(err.to_string().contains("784 pixels for 2 labels"), "{err}");
        let err = dataset(&[0; 784], vec![10]).unwrap_err();
        assert!(err.to_string().contains("label 10 is not a class"), "{err}");
        let data = dataset(&[255; 784], vec![3]).unwrap();
        assert_eq!((data.images[0], data.labels.clone()), (1.0, vec![3]));
    }
}
