//! One round at a time, for an app's scheduler.
//!
//! A phone gets time to train when the OS grants it (charging, idle, unmetered) and loses it
//! without notice. [`Session::run_round`] does one round's worth of work when it is called: it
//! resumes the round in progress if the last run was killed, or checks in for a new one; then it
//! downloads the model (cached by version), trains the app's [`FederatedModel`] on its
//! [`LocalData`], uploads and reports, and returns what happened ([`RoundOutcome`]). Every step
//! that a later run needs is recorded in the [`DeviceState`] before the next one starts, so a
//! process killed anywhere resumes without a second upload: the assignment is kept (an enrolled
//! device gets one upload token per round), and the encoded update is kept and sent again byte
//! for byte (the server answers a repeat with the stored receipt and counts it once).
//!
//! [`RoundConditions`] carries what the app allows this call: a [`CancelToken`] to trip when the
//! OS takes the time back, a wall-time limit, a byte limit for a metered network, and a progress
//! callback. A stopped round keeps what was done and the next call goes on from there.
//!
//! Strategies: FedAvg, FedLaAvg and MM-PSGD rounds (an update of the whole model); MC-PSGD (the
//! model trained from `x` and from the block's chain `y_m`, both trained models' losses reported,
//! as [`crate::block_cyclic`]; progress counts through the two trainings in turn); and FedSubAvg
//! when the app declares its rows ([`Session::with_submodel`]: the module holds local tables, see
//! [`crate::submodel`]); DC-CCL when the app's module holds the control model beside the co-model
//! ([`Session::with_control_model`]: the control model is downloaded once per version and kept in
//! the state, only the co-model trains, see [`crate::dc_ccl::ControlLayout`]). A round a session
//! cannot run is refused with [`SessionError::Unsupported`] before anything is downloaded.
//! Anonymous embeddings have no rounds: a device fits its embedding with
//! [`crate::anon::fit_embedding_with`] and submits samples when it likes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use bytes::Bytes;
use fedhive_shared::sparse::{FeatureSet, RowsRequest, SparseTensors, split_specs};
use fedhive_shared::wire::{
    Assignment, CheckinResponse, DeviceCredentials, MetricsReport, TrainingParams, UploadReceipt,
};
use fedhive_shared::{NamedTensors, fedlaavg};

use crate::block_cyclic;
use crate::client::{ClientError, FedhiveClient};
use crate::dc_ccl::{self, ControlLayout};
use crate::federated::{FederatedModel, LocalData};
use crate::local_work::{LocalWork, encode_update};
use crate::model;
use crate::state::{DeviceState, EnrolledFeatures, RoundStage, StateError};
use crate::submodel::{self, SubmodelError};
use crate::training::{self, StepProgress, TrainError};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Submodel(#[from] SubmodelError),
    #[error("the server sent a model this device cannot read: {0}")]
    BadModel(String),
    #[error("this session cannot take part in the round: {0}")]
    Unsupported(&'static str),
}

/// Trip it to stop a round at the next step (the OS revoked the app's time). Clones share it.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where a round is, as [`RoundConditions::progress`] hears it.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A new assignment, recorded.
    CheckedIn {
        round_id: i64,
    },
    /// A round left by an earlier run, picked up at its recorded stage.
    Resumed {
        round_id: i64,
        stage: &'static str,
    },
    Downloaded {
        round_id: i64,
        bytes: u64,
    },
    Training {
        round_id: i64,
        step: usize,
        total_steps: usize,
    },
    /// The encoded update, recorded and ready to send.
    Trained {
        round_id: i64,
        bytes: u64,
    },
    /// The server accepted the update (heard before the receipt is recorded).
    UploadAcknowledged {
        round_id: i64,
    },
    /// The metrics went out (heard before the round is cleared).
    Reported {
        round_id: i64,
    },
}

impl Progress {
    /// A stable name of the stage (`"checked_in"`, `"training"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Progress::CheckedIn { .. } => "checked_in",
            Progress::Resumed { .. } => "resumed",
            Progress::Downloaded { .. } => "downloaded",
            Progress::Training { .. } => "training",
            Progress::Trained { .. } => "trained",
            Progress::UploadAcknowledged { .. } => "upload_acknowledged",
            Progress::Reported { .. } => "reported",
        }
    }
}

/// Hears each [`Progress`] of a round, on the thread that makes it (training runs on a blocking
/// thread of the runtime).
pub type ProgressCallback = Arc<dyn Fn(&Progress) + Send + Sync>;

/// What the app allows one [`Session::run_round`] call.
#[derive(Clone, Default)]
pub struct RoundConditions {
    pub cancel: CancelToken,
    /// Stop when this much time has passed since the call began.
    pub max_wall_time: Option<Duration>,
    /// Body bytes this call may move (model download plus update upload), for a metered network.
    pub max_network_bytes: Option<u64>,
    pub progress: Option<ProgressCallback>,
}

/// Why a round stopped before its end (what it did is kept for the next call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    WallTime,
    NetworkBytes,
}

/// What one call did.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundOutcome {
    /// The update was accepted and its metrics reported.
    Contributed(RoundReport),
    /// The round closed before the update arrived (too slow, or already full); nothing counted.
    Late { round_id: i64 },
    /// No round for this device now: ask again after `retry_after`.
    NotNow { retry_after: Duration, reason: String },
    /// The task is over.
    Finished { model_version: i64 },
    /// Stopped before the round's end; the next call resumes it.
    Stopped { round_id: i64, reason: StopReason },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    pub receipt: UploadReceipt,
    pub num_samples: u64,
    pub loss: f32,
    /// Body bytes this call moved.
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    /// The round was begun by an earlier run.
    pub resumed: bool,
}

type ModelFactory<M> = Arc<dyn Fn(&burn::tensor::Device) -> M + Send + Sync>;

/// A device's place in one task: the app's model and data, the server, and the state directory.
pub struct Session<M, D> {
    client: FedhiveClient,
    task_id: String,
    state: DeviceState,
    device: burn::tensor::Device,
    model: ModelFactory<M>,
    data: Arc<D>,
    seed: u64,
    credentials: Option<DeviceCredentials>,
    /// FedSubAvg: the rows of each table the device's data touches (ascending).
    submodel: Option<BTreeMap<String, Vec<u64>>>,
    /// DC-CCL: where the module keeps the control model and the co-model.
    control: Option<ControlLayout>,
}

/// The round's starting point: the whole model, or (FedSubAvg) this device's submodel.
enum RoundModel {
    Whole(NamedTensors),
    Submodel(SparseTensors),
}

/// One call's running limits.
struct Budget<'a> {
    conditions: &'a RoundConditions,
    started: Instant,
    downloaded: u64,
    uploaded: u64,
}

impl Budget<'_> {
    fn stop_reason(&self) -> Option<StopReason> {
        if self.conditions.cancel.is_cancelled() {
            return Some(StopReason::Cancelled);
        }
        match self.conditions.max_wall_time {
            Some(max) if self.started.elapsed() >= max => Some(StopReason::WallTime),
            _ => None,
        }
    }

    fn bytes_left(&self) -> Option<u64> {
        self.conditions
            .max_network_bytes
            .map(|max| max.saturating_sub(self.downloaded + self.uploaded))
    }

    fn tell(&self, progress: Progress) {
        if let Some(callback) = &self.conditions.progress {
            callback(&progress);
        }
    }
}

impl<M, D> Session<M, D>
where
    M: FederatedModel + 'static,
    D: LocalData<Batch = M::Batch> + Send + Sync + 'static,
{
    /// A session for `task_id`: `model` builds the app's module on a compute device (burn's lazy
    /// initialisation is enough: the round's weights replace every parameter), `data` is the
    /// device's samples. A credential stored in `state` by an earlier [`Session::enrol`] is used.
    pub fn new(
        client: FedhiveClient,
        task_id: &str,
        state: DeviceState,
        device: burn::tensor::Device,
        model: impl Fn(&burn::tensor::Device) -> M + Send + Sync + 'static,
        data: Arc<D>,
    ) -> Result<Self, SessionError> {
        let credentials = state.credentials()?;
        Ok(Session {
            client,
            task_id: task_id.to_string(),
            state,
            device,
            model: Arc::new(model),
            data,
            seed: rand::random(),
            credentials,
            submodel: None,
            control: None,
        })
    }

    /// Takes part in a FedSubAvg task with the rows `rows` of each sparse table (ids ascending):
    /// the module's table tensors hold just those rows, in that order, and the app's batches index
    /// them locally ([`crate::submodel`]). The session enrols the feature set before its first
    /// check-in, and again whenever it changes.
    pub fn with_submodel(mut self, rows: BTreeMap<String, Vec<u64>>) -> Result<Self, SessionError> {
        submodel::check_rows(&rows)?;
        self.submodel = Some(rows);
        Ok(self)
    }

    /// Takes part in a DC-CCL task: the app's module holds the control model `F_m` and the
    /// co-model `F_s` in the two fields `layout` names and computes its loss on their summed
    /// outputs. Each round trains only `F_s` (the task's model) beside the published `F_m`.
    pub fn with_control_model(mut self, layout: ControlLayout) -> Self {
        self.control = Some(layout);
        self
    }

    /// Seeds the local step's shuffles (mixed with each round's id); random by default.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn credentials(&self) -> Option<&DeviceCredentials> {
        self.credentials.as_ref()
    }

    /// Enrols with an enrolment key, once: the credential is stored before this returns (the
    /// server shows its secret only once), and a device that enrolled before keeps its own.
    pub async fn enrol(&mut self, enrolment_key: &str) -> Result<&DeviceCredentials, SessionError> {
        if self.credentials.is_none() {
            let credentials = self.client.enrol_device(enrolment_key).await?;
            self.state.save_credentials(&credentials)?;
            self.credentials = Some(credentials);
        }
        Ok(self.credentials.as_ref().expect("set above"))
    }

    /// Does one round's work (see the module's documentation).
    pub async fn run_round(&mut self, conditions: &RoundConditions) -> Result<RoundOutcome, SessionError> {
        let mut budget = Budget {
            conditions,
            started: Instant::now(),
            downloaded: 0,
            uploaded: 0,
        };
        let mut pending = self.state.pending_round(&self.task_id)?;
        if pending
            .as_ref()
            .is_some_and(|(round, _)| round.assignment.deadline_unix < now_unix())
        {
            // Its upload would be refused; a fresh check-in may find the next round.
            self.state.clear_round(&self.task_id)?;
            pending = None;
        }
        let resumed = pending.is_some();
        if !resumed {
            self.enrol_features().await?;
        }
        let (assignment, mut stage, mut update) = match pending {
            Some((round, update)) => {
                budget.tell(Progress::Resumed {
                    round_id: round.assignment.round_id,
                    stage: match round.stage {
                        RoundStage::Assigned => "assigned",
                        RoundStage::Trained { .. } => "trained",
                        RoundStage::Uploaded { .. } => "uploaded",
                    },
                });
                (round.assignment, round.stage, update)
            }
            None => match self.check_in(&budget).await? {
                Ok(assignment) => (assignment, RoundStage::Assigned, None),
                Err(outcome) => return Ok(outcome),
            },
        };
        let round_id = assignment.round_id;
        loop {
            if let Some(reason) = budget.stop_reason() {
                return Ok(RoundOutcome::Stopped { round_id, reason });
            }
            stage = match stage {
                RoundStage::Assigned => match self.train(&assignment, &mut budget).await? {
                    Ok((bytes, num_samples, loss)) => {
                        self.state.save_update(&assignment, &bytes, num_samples, loss)?;
                        budget.tell(Progress::Trained {
                            round_id,
                            bytes: bytes.len() as u64,
                        });
                        update = Some(bytes);
                        RoundStage::Trained {
                            num_samples,
                            loss,
                            update_sha256: String::new(),
                        }
                    }
                    Err(reason) => return Ok(RoundOutcome::Stopped { round_id, reason }),
                },
                RoundStage::Trained {
                    num_samples, loss, ..
                } => {
                    let body = update.take().expect("a trained round has its update");
                    if budget.bytes_left().is_some_and(|left| (body.len() as u64) > left) {
                        return Ok(RoundOutcome::Stopped {
                            round_id,
                            reason: StopReason::NetworkBytes,
                        });
                    }
                    budget.uploaded += body.len() as u64;
                    let sent = self
                        .client
                        .upload_update_as(
                            &assignment.upload_token,
                            self.credentials.as_ref(),
                            num_samples,
                            Bytes::from(body),
                        )
                        .await;
                    let receipt = match sent {
                        Ok(receipt) => receipt,
                        Err(e) if e.code() == Some("round_closed") => {
                            self.state.clear_round(&self.task_id)?;
                            return Ok(RoundOutcome::Late { round_id });
                        }
                        Err(e) => return Err(e.into()),
                    };
                    budget.tell(Progress::UploadAcknowledged { round_id });
                    self.state
                        .save_receipt(&assignment, &receipt, num_samples, loss)?;
                    RoundStage::Uploaded {
                        receipt,
                        num_samples,
                        loss,
                    }
                }
                RoundStage::Uploaded {
                    receipt,
                    num_samples,
                    loss,
                } => {
                    let metrics = MetricsReport {
                        loss,
                        num_samples,
                        accuracy: None,
                    };
                    let reported = self
                        .client
                        .report_metrics_as(&assignment.upload_token, self.credentials.as_ref(), &metrics)
                        .await;
                    match reported {
                        // A report is best effort once the round has closed: the update counted.
                        Err(e) if e.code() != Some("round_closed") => return Err(e.into()),
                        _ => {}
                    }
                    budget.tell(Progress::Reported { round_id });
                    self.state.clear_round(&self.task_id)?;
                    return Ok(RoundOutcome::Contributed(RoundReport {
                        receipt,
                        num_samples,
                        loss,
                        bytes_downloaded: budget.downloaded,
                        bytes_uploaded: budget.uploaded,
                        resumed,
                    }));
                }
            };
        }
    }

    /// Checks in: a new assignment (recorded), or the outcome that there is none.
    async fn check_in(&self, budget: &Budget<'_>) -> Result<Result<Assignment, RoundOutcome>, SessionError> {
        let answer = match &self.credentials {
            Some(c) => self.client.checkin_as(&self.task_id, c).await?,
            None => self.client.checkin(&self.task_id).await?,
        };
        match answer {
            CheckinResponse::Finished { model_version } => Ok(Err(RoundOutcome::Finished { model_version })),
            CheckinResponse::RetryAfter {
                retry_after_ms,
                reason,
            } => Ok(Err(RoundOutcome::NotNow {
                retry_after: Duration::from_millis(retry_after_ms),
                reason,
            })),
            CheckinResponse::Assigned(assignment) => {
                self.state.save_assignment(&assignment)?;
                budget.tell(Progress::CheckedIn {
                    round_id: assignment.round_id,
                });
                Ok(Ok(assignment))
            }
        }
    }

    /// FedSubAvg: tells the server this device's feature set, unless it already acknowledged
    /// this one (recorded in the state).
    async fn enrol_features(&self) -> Result<(), SessionError> {
        let Some(rows) = &self.submodel else {
            return Ok(());
        };
        let features = FeatureSet {
            num_samples: self.data.num_samples() as u64,
            rows: rows.clone(),
        };
        let enrolled = self.state.enrolled_features(&self.task_id)?;
        if enrolled.as_ref().is_some_and(|e| e.features == features) {
            return Ok(());
        }
        // The same id as before, so a changed feature set replaces the old one in the heat.
        let device_id = match (&enrolled, &self.credentials) {
            (Some(e), _) => e.device_id.clone(),
            (None, Some(c)) => c.device_id.clone(),
            (None, None) => format!("{:032x}", rand::random::<u128>()),
        };
        self.client
            .enrol_features(&self.task_id, &device_id, &features)
            .await?;
        let enrolled = EnrolledFeatures { device_id, features };
        Ok(self.state.save_enrolled_features(&self.task_id, &enrolled)?)
    }

    /// The model the assignment names (this device's submodel of it in FedSubAvg), from the cache
    /// or the server (then cached).
    async fn round_model(
        &self,
        a: &Assignment,
        budget: &mut Budget<'_>,
    ) -> Result<Result<RoundModel, StopReason>, SessionError> {
        let cached = match self.state.cached_model(&self.task_id, a.model_version)? {
            Some(bytes) => self.decode(&bytes).ok(),
            None => None,
        };
        if let Some(model) = cached {
            return Ok(Ok(model));
        }
        let limit = budget.bytes_left();
        let fetched = match &self.submodel {
            None => {
                self.client
                    .download_model_within(&self.task_id, Some(a.model_version), limit)
                    .await
            }
            Some(rows) => {
                let request = RowsRequest {
                    version: Some(a.model_version),
                    rows: rows.clone(),
                };
                self.client
                    .download_submodel_within(&self.task_id, &request, limit)
                    .await
            }
        };
        let (_, bytes) = match fetched {
            Err(ClientError::TooLarge { .. }) => return Ok(Err(StopReason::NetworkBytes)),
            other => other?,
        };
        budget.downloaded += bytes.len() as u64;
        let model = self.decode(&bytes)?;
        self.state.save_model(&self.task_id, a.model_version, &bytes)?;
        budget.tell(Progress::Downloaded {
            round_id: a.round_id,
            bytes: bytes.len() as u64,
        });
        Ok(Ok(model))
    }

    /// MC-PSGD: version `version` of `block`'s chain `y_m` (downloaded each round that needs it).
    async fn chain(
        &self,
        block: &str,
        version: i64,
        budget: &mut Budget<'_>,
    ) -> Result<Result<NamedTensors, StopReason>, SessionError> {
        let fetched = self
            .client
            .download_chain_within(&self.task_id, block, version, budget.bytes_left())
            .await;
        let bytes = match fetched {
            Err(ClientError::TooLarge { .. }) => return Ok(Err(StopReason::NetworkBytes)),
            other => other?,
        };
        budget.downloaded += bytes.len() as u64;
        NamedTensors::decode(&bytes)
            .map(Ok)
            .map_err(|e| SessionError::BadModel(format!("chain of block `{block}`: {e}")))
    }

    /// DC-CCL: version `version` of the control model, from the state or the server (then kept).
    async fn control_model(
        &self,
        version: i64,
        budget: &mut Budget<'_>,
    ) -> Result<Result<NamedTensors, StopReason>, SessionError> {
        let bad = |e: fedhive_shared::TensorError| SessionError::BadModel(format!("control model: {e}"));
        if let Some(bytes) = self.state.cached_control(&self.task_id, version)? {
            return NamedTensors::decode(&bytes).map(Ok).map_err(bad);
        }
        let fetched = self
            .client
            .download_control_model_within(&self.task_id, Some(version), budget.bytes_left())
            .await;
        let (_, bytes) = match fetched {
            Err(ClientError::TooLarge { .. }) => return Ok(Err(StopReason::NetworkBytes)),
            other => other?,
        };
        budget.downloaded += bytes.len() as u64;
        let control = NamedTensors::decode(&bytes).map_err(bad)?;
        self.state.save_control(&self.task_id, version, &bytes)?;
        Ok(Ok(control))
    }

    /// Parses a downloaded (or cached) model; a submodel must carry exactly this device's rows
    /// with the widths and dense tensors of the app's module.
    fn decode(&self, bytes: &[u8]) -> Result<RoundModel, SessionError> {
        let bad = |e: String| SessionError::BadModel(e);
        let Some(rows) = &self.submodel else {
            return NamedTensors::decode(bytes)
                .map(RoundModel::Whole)
                .map_err(|e| bad(e.to_string()));
        };
        let specs = model::specs_of(&(self.model)(&self.device));
        let tables: Vec<String> = rows.keys().cloned().collect();
        let (dense, mut shapes) = split_specs(&specs, &tables);
        if let Some(table) = tables.iter().find(|t| !shapes.contains_key(*t)) {
            return Err(SubmodelError::NotATable(table.clone()).into());
        }
        for shape in shapes.values_mut() {
            // The module holds |R_i| rows; the submodel names them by their global ids.
            shape.rows = u64::MAX;
        }
        let sub = SparseTensors::decode_checked(bytes, &dense, &shapes, f32::MAX)
            .map_err(|e| bad(e.to_string()))?;
        for (table, ids) in rows {
            let held = sub.tables.get(table).map(|r| r.sorted().ids);
            if held.as_ref() != Some(ids) {
                return Err(bad(format!(
                    "the submodel's rows of `{table}` are not this device's"
                )));
            }
        }
        Ok(RoundModel::Submodel(sub))
    }

    /// Trains the round's update: its encoded bytes, sample count and loss.
    async fn train(
        &self,
        a: &Assignment,
        budget: &mut Budget<'_>,
    ) -> Result<Result<(Vec<u8>, u64, f32), StopReason>, SessionError> {
        let work = LocalWork::of(a);
        match work {
            LocalWork::WithControl { .. } if self.control.is_none() => {
                return Err(SessionError::Unsupported(
                    "a DC-CCL round needs a module that holds the control model (Session::with_control_model)",
                ));
            }
            LocalWork::WithControl { .. } | LocalWork::Chains { .. } if self.submodel.is_some() => {
                return Err(SessionError::Unsupported(
                    "a FedSubAvg submodel takes part in FedSubAvg rounds only",
                ));
            }
            _ => {}
        }
        let (global, sub) = match self.round_model(a, budget).await? {
            Ok(RoundModel::Whole(global)) => (global, None),
            Ok(RoundModel::Submodel(sub)) => (submodel::local_weights(&sub), Some(sub)),
            Err(reason) => return Ok(Err(reason)),
        };
        // MC-PSGD: the block's chain `y_m`, trained beside `x` on the same data.
        let chain = match &work {
            LocalWork::Chains {
                block,
                version,
                chain_learning_rate,
            } => match self.chain(block, *version, budget).await? {
                Ok(chain) => Some((chain, *chain_learning_rate)),
                Err(reason) => return Ok(Err(reason)),
            },
            _ => None,
        };
        // DC-CCL: the control model `F_m`, trained beside.
        let control = match (&work, &self.control) {
            (LocalWork::WithControl { version, .. }, Some(layout)) => {
                match self.control_model(*version, budget).await? {
                    Ok(control) => Some((layout.clone(), control)),
                    Err(reason) => return Ok(Err(reason)),
                }
            }
            _ => None,
        };
        let (model, data, device) = (self.model.clone(), self.data.clone(), self.device.clone());
        let (params, round_id) = (a.training.clone(), a.round_id);
        let seed = self.seed ^ (round_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let conditions = budget.conditions.clone();
        let (started, stopped) = (budget.started, Arc::new(std::sync::Mutex::new(None)));
        let stopped_in = stopped.clone();
        let trained = tokio::task::spawn_blocking(move || {
            let view = Budget {
                conditions: &conditions,
                started,
                downloaded: 0,
                uploaded: 0,
            };
            let mut on_step = |p: StepProgress| {
                view.tell(Progress::Training {
                    round_id,
                    step: p.step,
                    total_steps: p.total_steps,
                });
                match view.stop_reason() {
                    Some(reason) => {
                        *stopped_in.lock().expect("not poisoned") = Some(reason);
                        false
                    }
                    None => true,
                }
            };
            let mut train = |start: &NamedTensors, params: &TrainingParams| {
                training::train_model(|d| model(d), &device, start, &*data, params, seed, &mut on_step)
            };
            if let Some((layout, control)) = control {
                let on_co = dc_ccl::train_controlled(
                    |d| model(d),
                    &device,
                    &layout,
                    &control,
                    &global,
                    &*data,
                    &params,
                    seed,
                    &mut on_step,
                )?;
                return Ok((on_co, None));
            }
            let on_x = train(&global, &params)?;
            let Some((chain, chain_learning_rate)) = chain else {
                return Ok((on_x, None));
            };
            let chain_params = TrainingParams {
                learning_rate: chain_learning_rate,
                ..params.clone()
            };
            let on_chain = train(&chain, &chain_params)?;
            // The losses of the two trained models on the block's data pick the predictor's chain.
            let loss_x = training::mean_loss(|d| model(d), &device, &global.add(&on_x.delta), &*data)?;
            let loss_chain = training::mean_loss(|d| model(d), &device, &chain.add(&on_chain.delta), &*data)?;
            let body = block_cyclic::mc_body(on_x.delta.clone(), on_chain.delta, loss_x, loss_chain);
            Ok((on_x, Some(body)))
        })
        .await
        .expect("training task panicked");
        let (update, mc_body) = match trained {
            Err(TrainError::Cancelled) => {
                let reason = stopped
                    .lock()
                    .expect("not poisoned")
                    .unwrap_or(StopReason::Cancelled);
                return Ok(Err(reason));
            }
            other => other?,
        };
        let body = match (sub, mc_body, work) {
            (Some(sub), _, _) => submodel::rows_update(update.delta, &sub)?.encode(),
            (None, Some(body), _) => encode_update(&body, a.encoding),
            (None, None, LocalWork::GradientSum) => encode_update(
                &fedlaavg::gradient_sum(&update.delta, a.training.learning_rate),
                a.encoding,
            ),
            (None, None, _) => encode_update(&update.delta, a.encoding),
        };
        Ok(Ok((body, update.num_samples, update.loss)))
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
