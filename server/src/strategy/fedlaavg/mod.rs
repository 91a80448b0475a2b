//! FedLaAvg on the server (Yan et al., "Federated Optimization under Intermittent Client
//! Availability", INFORMS JoC; arXiv 2002.07399): enrolment, the selection window, and the round
//! step `T += G_new - G_old; x -= gamma * T / N` (see [`fedhive_shared::fedlaavg`]).
//!
//! Identity. Devices check in with a device credential ([`crate::devices`]). One enrolled with a key
//! joins the task's population (N) at its first check-in under a pseudonym of this task (a device
//! takes part in several FedLaAvg tasks, each with its own id and `R_i`); one enrolled through this
//! task's own route (`POST /v1/tasks/{id}/devices`, no key) is in this task only, with its
//! credential's id. A task that requires enrolled devices admits only the former.
//!
//! Selection. Least-recently-participated selection needs to see who is available before choosing,
//! while check-ins arrive one request at a time. So each round opens with a *selection window*
//! (`selection_window_ms`): an enrolled device that checks in during it is recorded as available and
//! told to come back when the window ends. The first check-in after the window makes the round's
//! selection once, in one transaction: it freezes N and marks the `ceil(K * over_selection)`
//! available devices with the smallest `R_i` (never-participated first; ties by device id,
//! ascending). A selected device gets its one upload token of the round when it comes back; the
//! others are told to retry later (`not_selected`). A device that first shows up after the window
//! counts as available only if the selection has not been made yet (so a round nobody checked in
//! for during its window still selects the first device that comes). The round is due when K updates
//! arrived, or every selected device uploaded, or its deadline passed.
//!
//! Durability. Uploads go through the common exactly-once path (one token per device and round, so
//! at most one update per device and round). Finalising reads the stored `T` of the base model
//! version and each accepted device's `G_i_old`, writes `G_i_new` and the new `T` under keys named by
//! round and version (a re-run after a crash rewrites the same bytes), and the commit transaction
//! switches every pointer: `R_i` and the latest `G_i` derive from the latest committed round that
//! accepted the device's update, and `T` is keyed by the task's model version. Memory stays
//! O(model size): one device's `G_i_new` and `G_i_old` are read at a time, never all N.

mod db;

use bytes::Bytes;
use fedhive_shared::{
    LatestAverage, NamedTensors,
    fedlaavg::GRADIENT_LIMIT,
    wire::{CheckinResponse, DeviceCredentials, DeviceInfo, StrategyConfig, TaskConfig, UploadKind},
};
use tracing::{info, warn};

use super::interface::{
    AssignmentParts, CheckinClock, CommitHold, Strategy, Sums, assignment, async_trait, new_token, token_cap,
};
use crate::{
    db::{RoundRow, TaskRow},
    devices::Device,
    error::ApiError,
    store::{Store, model_key, now_ms},
};

pub struct FedLaAvg;

/// How long after the window's end a device is told to come back (so it arrives after it).
const WINDOW_MARGIN_MS: i64 = 20;

fn grad_key(task_id: &str, device_id: &str, seq: i64) -> String {
    format!("fedlaavg/{task_id}/grads/{device_id}/{seq}.safetensors")
}

fn sum_key(task_id: &str, version: i64) -> String {
    format!("fedlaavg/{task_id}/sums/{version}.i64")
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("stored FedLaAvg blob `{key}` is unreadable: {e}"))
}

fn credentials_required(task_id: &str) -> ApiError {
    ApiError::DeviceUnauthorized(format!(
        "task `{task_id}` uses FedLaAvg, which selects devices by identity: enrol (POST /v1/devices \
         with an enrolment key, or POST /v1/tasks/{task_id}/devices) and check in with \
         `Authorization: Bearer <device_id>:<device_secret>`"
    ))
}

fn unknown_device(task_id: &str) -> ApiError {
    ApiError::DeviceUnauthorized(format!(
        "this device enrolled for another task, not `{task_id}`: enrol with an enrolment key to take part in every task"
    ))
}

impl FedLaAvg {
    /// Enrols a new device in a FedLaAvg task: a pseudonymous id and a secret shown only now.
    pub async fn enrol_device(&self, store: &Store, task_id: &str) -> Result<DeviceCredentials, ApiError> {
        let task = store.task(task_id).await?;
        if !self.handles(&task.config.strategy) {
            return Err(ApiError::InvalidRequest(format!(
                "task `{task_id}` does not use FedLaAvg; its devices check in without enrolling"
            )));
        }
        if task.config.require_enrolled_device {
            // Open enrolment would let anyone past the enrolment keys.
            return Err(ApiError::DeviceUnauthorized(format!(
                "task `{task_id}` requires devices enrolled with an enrolment key: POST /v1/devices"
            )));
        }
        let device_id = format!("d-{}", hex::encode(rand::random::<[u8; 12]>()));
        let (device_secret, secret_hash) = crate::devices::new_secret();
        store
            .db
            .fedlaavg_enrol(&device_id, task_id, &secret_hash, now_ms())
            .await?;
        info!(task = %task_id, device = %device_id, "device enrolled");
        Ok(DeviceCredentials {
            device_id,
            device_secret,
        })
    }

    /// The task's enrolled devices with their last participation (operators, tests).
    pub async fn devices(&self, store: &Store, task_id: &str) -> Result<Vec<DeviceInfo>, ApiError> {
        store.task(task_id).await?;
        Ok(store
            .db
            .fedlaavg_devices(task_id)
            .await?
            .into_iter()
            .map(|d| DeviceInfo {
                enrolled_as: (d.credential != d.device_id).then_some(d.credential),
                device_id: d.device_id,
                last_round_seq: d.last_seq,
            })
            .collect())
    }

    /// Whether every device selected for this round has uploaded (it need not wait for K then).
    async fn all_uploaded(&self, store: &Store, round: &RoundRow) -> Result<bool, ApiError> {
        Ok(store
            .db
            .fedlaavg_selection(round.id)
            .await?
            .is_some_and(|s| s.selected > 0 && round.accepted >= s.selected))
    }

    /// The round's new model: folds each accepted device's `G_i_new` into `T` in place of its
    /// `G_i_old`, stores `G_i_new` and the new `T` under idempotent keys, and steps
    /// `x -= gamma * T / N` unless the task is still warming up. Deterministic given the accepted set.
    async fn step(&self, store: &Store, task: &TaskRow, round: &RoundRow) -> Result<Bytes, ApiError> {
        let StrategyConfig::FedLaAvg { warmup_rounds, .. } = task.config.strategy else {
            unreachable!("the registry hands FedLaAvg its own tasks");
        };
        let specs = task.config.tensors.clone();
        // The rate the round's devices were given (the task's schedule applied).
        let gamma = task
            .config
            .training
            .for_round(round.base_version.max(0) as u64)
            .learning_rate;
        let population = match store.db.fedlaavg_selection(round.id).await? {
            Some(s) => s.population,
            None => store.db.fedlaavg_population(&task.id).await?,
        };
        let mut sum = if round.base_version == 0 {
            LatestAverage::zeros(&specs)
        } else {
            let key = sum_key(&task.id, round.base_version);
            let bytes = store.blobs.get(&key).await?;
            LatestAverage::decode(&specs, &bytes).map_err(|e| corrupt(&key, e))?
        };
        for device in store.db.fedlaavg_round_devices(round.id, round.seq).await? {
            let new_bytes = store.blobs.get(&device.blob_key).await?;
            let old = match device.previous_seq {
                Some(seq) => {
                    let key = grad_key(&task.id, &device.device_id, seq);
                    Some((key.clone(), store.blobs.get(&key).await?))
                }
                None => None,
            };
            let (specs, checked) = (specs.clone(), new_bytes.clone());
            sum = tokio::task::spawn_blocking(move || {
                let new = NamedTensors::decode_checked(&checked, &specs, GRADIENT_LIMIT)?;
                let old = old
                    .map(|(key, bytes)| {
                        NamedTensors::decode_checked(&bytes, &specs, GRADIENT_LIMIT)
                            .map_err(|e| corrupt(&key, e))
                    })
                    .transpose()?;
                sum.replace(old.as_ref(), &new);
                Ok::<_, ApiError>(sum)
            })
            .await??;
            store
                .blobs
                .put(&grad_key(&task.id, &device.device_id, round.seq), new_bytes)
                .await?;
        }
        let (_, base) = store.model(&task.id, Some(round.base_version)).await?;
        let warming_up = task.committed_rounds < i64::from(warmup_rounds);
        let (sum_bytes, model) = tokio::task::spawn_blocking(move || {
            let mut model = NamedTensors::decode(&base)?;
            if !warming_up {
                sum.step(&mut model, gamma, population.max(1) as u64)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            }
            Ok::<_, ApiError>((Bytes::from(sum.encode()), Bytes::from(model.encode())))
        })
        .await??;
        store
            .blobs
            .put(&sum_key(&task.id, round.base_version + 1), sum_bytes)
            .await?;
        info!(task = %task.id, round = round.id, population, warming_up, "fedlaavg step computed");
        Ok(model)
    }

    /// After a commit: removes the blobs the round superseded (each accepted device's previous
    /// `G_i` and the previous `T`). Best effort; a crash here only leaves files behind.
    async fn remove_superseded(&self, store: &Store, task: &TaskRow, round: &RoundRow) {
        let mut stale = vec![sum_key(&task.id, round.base_version)];
        match store.db.fedlaavg_round_devices(round.id, round.seq).await {
            Ok(devices) => stale.extend(
                devices
                    .iter()
                    .filter_map(|d| d.previous_seq.map(|seq| grad_key(&task.id, &d.device_id, seq))),
            ),
            Err(e) => warn!(round = round.id, error = %e, "could not list superseded gradient sums"),
        }
        for key in stale {
            if let Err(e) = store.blobs.delete(&key).await {
                warn!(key = %key, error = %e, "could not remove a superseded FedLaAvg blob");
            }
        }
    }
}

#[async_trait]
impl Strategy for FedLaAvg {
    fn handles(&self, config: &StrategyConfig) -> bool {
        matches!(config, StrategyConfig::FedLaAvg { .. })
    }

    fn validate(&self, c: &TaskConfig) -> Result<(), ApiError> {
        let StrategyConfig::FedLaAvg {
            selection_window_ms, ..
        } = c.strategy
        else {
            unreachable!("the registry hands FedLaAvg its own tasks");
        };
        if selection_window_ms >= c.round_deadline_secs * 1000 {
            return Err(ApiError::InvalidConfig(format!(
                "`strategy.selection_window_ms` ({selection_window_ms}) must be shorter than the round deadline ({} s)",
                c.round_deadline_secs
            )));
        }
        Ok(())
    }

    /// The device's id in this task: a device enrolled with a key joins at its first check-in; one
    /// enrolled through a task's own route belongs to that task only.
    async fn authenticate(
        &self,
        store: &Store,
        task: &TaskRow,
        device: Option<&Device>,
    ) -> Result<Option<String>, ApiError> {
        let device = device.ok_or_else(|| credentials_required(&task.id))?;
        if let Some(id) = store.db.fedlaavg_member(&task.id, &device.id).await? {
            return Ok(Some(id));
        }
        if device.key_id.is_none() {
            return Err(unknown_device(&task.id));
        }
        let pseudonym = format!("d-{}", hex::encode(rand::random::<[u8; 12]>()));
        let id = store
            .db
            .fedlaavg_join(&task.id, &device.id, &pseudonym, now_ms())
            .await?;
        if id == pseudonym {
            info!(task = %task.id, device = %id, "enrolled device joined the task");
        }
        Ok(Some(id))
    }

    /// The selection window, the round's one least-recently-participated selection, then one token
    /// per selected device.
    async fn checkin(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        device: Option<&str>,
        clock: CheckinClock,
    ) -> Result<CheckinResponse, ApiError> {
        let StrategyConfig::FedLaAvg {
            selection_window_ms, ..
        } = task.config.strategy
        else {
            unreachable!("the registry hands FedLaAvg its own tasks");
        };
        let device_id = device.expect("authenticate names every FedLaAvg device");
        let now = clock.now_ms;
        let window_end = round.opened_ms + selection_window_ms as i64;
        if now < window_end {
            store.db.fedlaavg_check_in(round.id, device_id, now).await?;
            return Ok(clock.retry("selection_window", window_end - now + WINDOW_MARGIN_MS));
        }
        if store.db.fedlaavg_selection(round.id).await?.is_none() {
            store.db.fedlaavg_check_in(round.id, device_id, now).await?;
            let selected = store
                .db
                .fedlaavg_select(round.id, round.seq, &task.id, token_cap(&task.config), now)
                .await?;
            if !selected.is_empty() {
                info!(task = %task.id, round = round.id, selected = selected.len(), "fedlaavg selection made");
            }
        }
        if store.db.fedlaavg_is_selected(round.id, device_id).await? != Some(true) {
            return Ok(clock.retry_in_round("not_selected", round));
        }
        let (token, token_hash) = new_token();
        if !store
            .db
            .fedlaavg_assign(round.id, device_id, &token_hash, now)
            .await?
        {
            // Its one token of this round was already issued (or the round just stopped taking
            // check-ins): it takes part again in a later round.
            return Ok(clock.retry_in_round("already_assigned", round));
        }
        let parts = AssignmentParts {
            upload: UploadKind::GradientSum,
            ..AssignmentParts::default()
        };
        Ok(assignment(task, round, token, parts))
    }

    /// FedLaAvg reads each accepted `G_i` from the blob store when the round commits.
    fn new_sums(&self, _config: &TaskConfig) -> Option<Sums> {
        None
    }

    /// K updates arrived, or every selected device uploaded.
    async fn round_full(&self, store: &Store, task: &TaskRow, round: &RoundRow) -> Result<bool, ApiError> {
        Ok(round.accepted >= i64::from(task.config.devices_per_round)
            || self.all_uploaded(store, round).await?)
    }

    async fn commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        _sums: Option<Sums>,
        new_version: i64,
    ) -> Result<CommitHold, ApiError> {
        let model = self.step(store, task, round).await?;
        store.blobs.put(&model_key(&task.id, new_version), model).await?;
        Ok(None)
    }

    async fn after_commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        _hold: CommitHold,
        first: bool,
    ) -> Result<(), ApiError> {
        if first {
            self.remove_superseded(store, task, round).await;
        }
        Ok(())
    }
}
