//! The seam between the round lifecycle ([`crate::coordinator`]) and the algorithms.
//!
//! The coordinator owns what every task shares: rounds opening and closing, upload tokens,
//! exactly-once acceptance, upload admission, freezing the accepted set, and the commit transaction.
//! A [`Strategy`] supplies what differs, one hook per phase of a round (the shape of Flower's
//! `Strategy` with its configure/aggregate hooks):
//!
//! | phase | hooks | default (FedAvg's behaviour) |
//! |---|---|---|
//! | task creation | [`validate`](Strategy::validate), [`check_initial_model`](Strategy::check_initial_model), [`store_initial_model`](Strategy::store_initial_model), [`issue_task_credentials`](Strategy::issue_task_credentials) | every tensor given; model version 0 is the weights; no credentials |
//! | check-in | [`authenticate`](Strategy::authenticate), [`checkin`](Strategy::checkin), [`assignment_parts`](Strategy::assignment_parts) | the enrolled device if any (else anonymous); first come, up to `ceil(K * over_selection)` tokens, one per enrolled device |
//! | upload gate | [`update_encodings`](Strategy::update_encodings), [`upload_specs`](Strategy::upload_specs), [`upload_limit`](Strategy::upload_limit), [`decode_update`](Strategy::decode_update), [`check_update`](Strategy::check_update) | a dense update of the model's tensors, f32 only |
//! | folding | [`new_sums`](Strategy::new_sums), then [`Sums::add`] per accepted update | fixed-point FedAvg sums |
//! | round due | [`round_full`](Strategy::round_full) | K accepted |
//! | commit or abandon | [`commits`](Strategy::commits) | at least `min_devices_per_round` accepted |
//! | finalisation | [`commit`](Strategy::commit) (required) | - |
//! | after the commit | [`after_commit`](Strategy::after_commit) | nothing |
//!
//! Rules every strategy keeps: `commit` depends only on the frozen accepted set and the state
//! committed before the round (so a re-run after a crash writes the same bytes) and writes only
//! under keys named by round or version, never over a committed artefact; nothing a strategy
//! keeps in memory is more than a cache.

use std::{any::Any, borrow::Cow};

use bytes::Bytes;
use fedhive_shared::{
    FedAvgAccumulator, NamedTensors, TensorLayout,
    blocks::BlockAssignment,
    fedavg::{AggregateError, BadPartial, DELTA_LIMIT},
    fedsubavg::SubAvgAccumulator,
    int8::Int8Layout,
    sparse::SparseTensors,
    tensors::TensorSpec,
    topk::TopKUpdate,
    wire::{
        Assignment, CheckinResponse, ControlModelRef, StrategyConfig, TaskConfig, UpdateEncoding, UploadKind,
    },
};

use crate::{
    db::{Assigned, RoundRow, TaskRow},
    devices::Device,
    error::ApiError,
    store::{Store, model_key, sha256_hex},
};

pub use async_trait::async_trait;

/// One accepted update, checked for its task's strategy. A dense update keeps its body and is
/// read in place (see [`TensorLayout`]), an int8 one is read back a tensor at a time as it is
/// folded; a sparse one is decoded (it is a few rows).
pub enum Update {
    Dense { body: Bytes, layout: TensorLayout },
    Int8 { body: Bytes, layout: Int8Layout },
    TopK(TopKUpdate),
    Sparse(SparseTensors),
}

/// A round's running sums: fixed point, so they depend only on the set of updates folded in.
pub enum Sums {
    Dense(FedAvgAccumulator),
    Sparse(SubAvgAccumulator),
}

impl Sums {
    pub fn add(&mut self, num_samples: u64, update: &Update) -> Result<(), AggregateError> {
        let [result] = self
            .add_many(&[(num_samples, update)])
            .try_into()
            .expect("one result per update");
        result
    }

    /// Folds a batch of updates, each with its sample count; dense sums take the batch in one pass
    /// ([`FedAvgAccumulator::add_many`]). One result per update, as [`Sums::add`] would give in
    /// that order; a refused update changes nothing.
    pub fn add_many(&mut self, updates: &[(u64, &Update)]) -> Vec<Result<(), AggregateError>> {
        match self {
            Sums::Dense(acc) => {
                let counts: Vec<u64> = updates.iter().map(|(n, _)| *n).collect();
                acc.add_many(&counts, |i, name| dense_values(updates[i].1, name))
            }
            Sums::Sparse(acc) => updates
                .iter()
                .map(|(n, update)| match update {
                    Update::Sparse(s) => acc.add(*n, s),
                    _ => unreachable!("a strategy builds its sums and its updates from the same config"),
                })
                .collect(),
        }
    }

    /// The sums as bytes, for another replica to merge ([`Sums::merge_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Sums::Dense(acc) => acc.to_bytes(),
            Sums::Sparse(acc) => acc.to_bytes(),
        }
    }

    /// Adds sums that another replica folded (of other updates of the same round) to these.
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Result<(), BadPartial> {
        match self {
            Sums::Dense(acc) => acc.merge_bytes(bytes),
            Sums::Sparse(acc) => acc.merge_bytes(bytes),
        }
    }
}

/// The values of tensor `name` of a dense-summed update: read in place from a dense body, read
/// back from an int8 one, spread out from a top-k one.
fn dense_values<'a>(update: &'a Update, name: &str) -> Cow<'a, [f32]> {
    match update {
        Update::Dense { body, layout } => layout
            .values(body, name)
            .expect("the layout was checked against the accumulator's specs"),
        Update::Int8 { body, layout } => Cow::Owned(
            layout
                .values(body, name)
                .expect("the layout was checked against the accumulator's specs"),
        ),
        Update::TopK(update) => Cow::Owned(
            update
                .values(name)
                .expect("the update was checked against the accumulator's specs"),
        ),
        Update::Sparse(_) => unreachable!("a strategy builds its sums and its updates from the same config"),
    }
}

/// Held by a finalisation from its [`Strategy::commit`] until its [`Strategy::after_commit`] (for
/// example FedSubAvg's exclusive table lock); dropping it releases whatever it holds.
pub type CommitHold = Option<Box<dyn std::any::Any + Send + Sync>>;

/// What an assignment tells a device besides its round and token.
#[derive(Debug, Clone, Default)]
pub struct AssignmentParts {
    pub upload: UploadKind,
    pub block: Option<BlockAssignment>,
    pub control: Option<ControlModelRef>,
}

/// The coordinator's answer rules for a check-in in an open round.
#[derive(Debug, Clone, Copy)]
pub struct CheckinClock {
    pub now_ms: i64,
    /// How long a device is told to wait when the round is full or between rounds.
    pub retry_ms: u64,
}

impl CheckinClock {
    pub fn retry(&self, reason: &str, ms: i64) -> CheckinResponse {
        CheckinResponse::RetryAfter {
            retry_after_ms: ms.max(0) as u64,
            reason: reason.to_string(),
        }
    }

    /// Retry at the usual interval, but not past the round's deadline (at least 100 ms).
    pub fn retry_in_round(&self, reason: &str, round: &RoundRow) -> CheckinResponse {
        let until_deadline = (round.deadline_ms - self.now_ms).max(0);
        self.retry(reason, (self.retry_ms as i64).min(until_deadline).max(100))
    }
}

/// The default check-in: first come, first served, up to [`token_cap`] tokens per round and one per
/// enrolled `device`, with the strategy's [`assignment_parts`](Strategy::assignment_parts).
pub async fn first_come<S: Strategy + ?Sized>(
    strategy: &S,
    store: &Store,
    task: &TaskRow,
    round: &RoundRow,
    device: Option<&str>,
    clock: CheckinClock,
) -> Result<CheckinResponse, ApiError> {
    let cap = token_cap(&task.config);
    // Devices waiting for the next round poll here: answer them from the row already read,
    // without a write transaction (thousands of them would otherwise crowd out the uploads).
    if round.assigned >= cap {
        return Ok(clock.retry_in_round("round_full", round));
    }
    // Before taking a slot, so a failure here does not use one up.
    let parts = strategy.assignment_parts(store, task, round).await?;
    let (token, token_hash) = new_token();
    match store
        .db
        .assign(round.id, cap, &token_hash, device, clock.now_ms)
        .await?
    {
        Assigned::Issued => Ok(assignment(task, round, token, parts)),
        Assigned::RoundFull => Ok(clock.retry_in_round("round_full", round)),
        // Its one token of this round was issued already: it takes part again in a later round.
        Assigned::AlreadyAssigned => Ok(clock.retry_in_round("already_assigned", round)),
    }
}

/// An assignment in `round` with the given upload token.
pub fn assignment(
    task: &TaskRow,
    round: &RoundRow,
    token: String,
    parts: AssignmentParts,
) -> CheckinResponse {
    CheckinResponse::Assigned(Assignment {
        task_id: task.id.clone(),
        round_id: round.id,
        model_version: round.base_version,
        model: task.config.model.clone(),
        training: task.config.training.for_round(round.base_version.max(0) as u64),
        upload_token: token,
        deadline_unix: round.deadline_ms / 1000,
        upload: parts.upload,
        encoding: task.config.update_encoding,
        block: parts.block,
        control: parts.control,
    })
}

/// A fresh upload token and the hash the database keys it by.
pub fn new_token() -> (String, String) {
    let token = hex::encode(rand::random::<[u8; 32]>());
    let hash = sha256_hex(token.as_bytes());
    (token, hash)
}

/// The number of upload tokens a round hands out: `ceil(K * over_selection)`.
pub fn token_cap(config: &TaskConfig) -> i64 {
    (f64::from(config.devices_per_round) * f64::from(config.over_selection)).ceil() as i64
}

/// An algorithm's part of a round. See the module doc for the phases and the defaults.
#[async_trait]
pub trait Strategy: Any + Send + Sync {
    /// Whether this strategy runs tasks with this config (the registry asks each in turn).
    fn handles(&self, config: &StrategyConfig) -> bool;

    /// The strategy's own checks of a task config; the coordinator checks the common fields.
    fn validate(&self, config: &TaskConfig) -> Result<(), ApiError>;

    /// The update encodings its devices may be asked for (the task's `update_encoding`, matched by
    /// [`UpdateEncoding::kind`]: a top-k entry stands for every percent). Default: f32 only; a
    /// strategy whose uploads go through the default [`decode_update`](Strategy::decode_update)
    /// into dense sums can take int8 and top-k too.
    fn update_encodings(&self) -> &'static [UpdateEncoding] {
        &[UpdateEncoding::F32]
    }

    /// Checks a new task's initial weights (blocking: called off the async threads).
    fn check_initial_model(&self, config: &TaskConfig, weights: &[u8]) -> Result<(), ApiError> {
        NamedTensors::decode_checked(weights, &config.tensors, f32::MAX)?;
        Ok(())
    }

    /// Stores a new task's checked initial weights as its model version 0.
    async fn store_initial_model(
        &self,
        store: &Store,
        task_id: &str,
        _config: &TaskConfig,
        weights: Bytes,
    ) -> Result<(), ApiError> {
        store.blobs.put(&model_key(task_id, 0), weights).await?;
        Ok(())
    }

    /// The strategy's id for the device checking in, from its authenticated credential if it sent
    /// one (`None`: anonymous). Default: the credential's device id.
    async fn authenticate(
        &self,
        _store: &Store,
        _task: &TaskRow,
        device: Option<&Device>,
    ) -> Result<Option<String>, ApiError> {
        Ok(device.map(|d| d.id.clone()))
    }

    /// Credentials the strategy issues with a new task (DC-CCL's cloud-worker token), returned once
    /// in the creation answer; called before the task's row is written.
    async fn issue_task_credentials(
        &self,
        _store: &Store,
        _task_id: &str,
        _config: &TaskConfig,
    ) -> Result<Option<String>, ApiError> {
        Ok(None)
    }

    /// A check-in while `round` is open and before its deadline: an assignment or when to retry.
    /// Default: [`first_come`].
    async fn checkin(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        device: Option<&str>,
        clock: CheckinClock,
    ) -> Result<CheckinResponse, ApiError> {
        first_come(self, store, task, round, device, clock).await
    }

    /// What the default check-in's assignments carry besides the round and token.
    async fn assignment_parts(
        &self,
        _store: &Store,
        _task: &TaskRow,
        _round: &RoundRow,
    ) -> Result<AssignmentParts, ApiError> {
        Ok(AssignmentParts::default())
    }

    /// The tensors of a dense upload.
    fn upload_specs(&self, config: &TaskConfig) -> Vec<TensorSpec> {
        config.tensors.clone()
    }

    /// Largest upload body: the f32 data plus room for the safetensors header.
    fn upload_limit(&self, config: &TaskConfig) -> usize {
        let specs = self.upload_specs(config);
        let params: usize = specs.iter().map(TensorSpec::numel).sum();
        params * 4 + 64 * 1024 + specs.len() * 256
    }

    /// Checks an upload body (blocking: called off the async threads).
    fn decode_update(&self, config: &TaskConfig, body: &Bytes) -> Result<Update, ApiError> {
        let specs = self.upload_specs(config);
        Ok(match config.update_encoding {
            UpdateEncoding::F32 => Update::Dense {
                layout: TensorLayout::check(body, &specs, DELTA_LIMIT)?,
                body: body.clone(),
            },
            UpdateEncoding::Int8 => Update::Int8 {
                layout: Int8Layout::check(body, &specs, DELTA_LIMIT)?,
                body: body.clone(),
            },
            UpdateEncoding::TopK { percent } => {
                Update::TopK(TopKUpdate::check(body, &specs, percent, DELTA_LIMIT)?)
            }
        })
    }

    /// Checks a decoded update against the task's state before it is accepted.
    async fn check_update(&self, _store: &Store, _task: &TaskRow, _update: &Update) -> Result<(), ApiError> {
        Ok(())
    }

    /// Empty sums for a round, or `None` when the strategy folds nothing as uploads arrive (its
    /// [`commit`](Strategy::commit) reads the stored updates itself).
    fn new_sums(&self, config: &TaskConfig) -> Option<Sums> {
        Some(Sums::Dense(FedAvgAccumulator::new(&self.upload_specs(config))))
    }

    /// Whether an open round may finish before its deadline.
    async fn round_full(&self, _store: &Store, task: &TaskRow, round: &RoundRow) -> Result<bool, ApiError> {
        Ok(round.accepted >= i64::from(task.config.devices_per_round))
    }

    /// Whether a closing round with `accepted` updates commits (`false`: it is abandoned and the
    /// model stays). Depends only on the round's frozen state.
    async fn commits(
        &self,
        _store: &Store,
        task: &TaskRow,
        _round: &RoundRow,
        accepted: usize,
    ) -> Result<bool, ApiError> {
        Ok(accepted as u64 >= u64::from(task.config.min_devices_per_round))
    }

    /// Computes model `new_version` (and any side artefacts) from the round's frozen accepted set
    /// and stores it before the commit transaction. `sums` holds exactly the accepted updates
    /// (`None` when [`new_sums`](Strategy::new_sums) is `None`). Deterministic and idempotent.
    async fn commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        sums: Option<Sums>,
        new_version: i64,
    ) -> Result<CommitHold, ApiError>;

    /// After the commit transaction of a round whose `commit` ran; `first` when this process's
    /// transaction committed it (false when another finaliser got there first).
    async fn after_commit(
        &self,
        _store: &Store,
        _task: &TaskRow,
        _round: &RoundRow,
        _hold: CommitHold,
        _first: bool,
    ) -> Result<(), ApiError> {
        Ok(())
    }
}
