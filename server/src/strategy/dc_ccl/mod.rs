//! DC-CCL device-cloud fusion (Ding et al., "DC-CCL: Device-Cloud Collaborative Controlled Learning
//! for Large Vision Models", arXiv 2303.10361; `ALGORITHMS.md`, "DC-CCL"), for many devices.
//!
//! The large cloud model `F_c` lives only in the task's cloud worker (`fedhive-cloud`) and never
//! reaches this server. The worker publishes the control model `F_m` (distilled from `F_c`) as
//! immutable versions of the task; the task's model is the co-model `F_s` alone. Each round devices
//! train `F_s` against frozen `F_m` and upload deltas as in FedAvg, the worker submits its own
//! delta of `F_s` trained on cloud data (one per round, exactly once), and the commit fuses them
//! ([`fedhive_shared::dc_ccl::fuse`]).
//!
//! A round is full when it has K device updates *and* the cloud's contribution. At its deadline
//! without the contribution it is abandoned, or commits the devices' average alone, as the task's
//! `without_cloud` says. Devices are told to come back until a control model exists.
//!
//! The worker authenticates with a token issued at task creation ([`super::worker`]), or with a named
//! `cloud-worker` token for the task (see [`crate::access`]): it reads its task's round, submits
//! contributions and publishes control models for that task, nothing else.

mod db;

use bytes::Bytes;
use fedhive_shared::{
    FedAvgAccumulator, NamedTensors,
    dc_ccl::fuse,
    tensors::TensorSpec,
    wire::{
        ArtifactReceipt, CheckinResponse, CloudStatus, ControlModelRef, StrategyConfig, TaskConfig,
        WithoutCloud,
    },
};

use super::{
    interface::{AssignmentParts, CheckinClock, CommitHold, Strategy, Sums, async_trait, first_come},
    worker::{self, ArtifactRow, RoundArtifacts},
};
use crate::{
    coordinator::check_tensor_specs,
    db::{RoundRow, TaskRow},
    error::ApiError,
    store::{Store, model_key, now_ms, sha256_hex},
};

pub struct DcCcl;

/// The task's DC-CCL parameters: `(cloud_weight, without_cloud, control_model, control_tensors)`.
fn params(config: &TaskConfig) -> (f32, WithoutCloud, &str, &[TensorSpec]) {
    let StrategyConfig::DcCcl {
        cloud_weight,
        without_cloud,
        control_model,
        control_tensors,
    } = &config.strategy
    else {
        unreachable!("the registry hands DC-CCL its own tasks");
    };
    (*cloud_weight, *without_cloud, control_model, control_tensors)
}

/// Where a round's cloud contribution is stored: beside the round's device updates (removed with
/// them once the round ends), named by its digest so a different body never overwrites it.
fn cloud_key(round_id: i64, sha256: &str) -> String {
    format!("updates/{round_id}/cloud-{sha256}.safetensors")
}

fn control_key(task_id: &str, version: i64, sha256: &str) -> String {
    format!("dc_ccl/{task_id}/control/{version}-{sha256}.safetensors")
}

/// Where a round's cloud contribution is stored.
const CLOUD_UPDATES: RoundArtifacts = RoundArtifacts::DcCclCloudUpdates;

/// A retry of a stored artefact: the same receipt for the same body, a conflict for another.
fn same_or_conflict(stored: &ArtifactRow, sha256: &str) -> Result<ArtifactReceipt, ApiError> {
    if stored.sha256 == sha256 {
        return Ok(stored.receipt());
    }
    Err(ApiError::ConflictingRetry {
        stored: stored.sha256.clone(),
    })
}

impl DcCcl {
    /// The task, if it runs DC-CCL.
    pub async fn task(&self, store: &Store, task_id: &str) -> Result<TaskRow, ApiError> {
        let task = store.task(task_id).await?;
        if !self.handles(&task.config.strategy) {
            return Err(ApiError::NotDcCcl(task_id.to_string()));
        }
        Ok(task)
    }

    /// What the worker needs to know: the round in progress and whether it has contributed.
    pub async fn cloud_status(&self, store: &Store, task: &TaskRow) -> Result<CloudStatus, ApiError> {
        let round = store.db.active_round(&task.id).await?;
        let cloud_submitted = match &round {
            Some(r) => store.db.round_artifact(CLOUD_UPDATES, r.id).await?.is_some(),
            None => false,
        };
        let control_version = store.db.dc_ccl_control(&task.id, None).await?.map(|c| c.id);
        Ok(CloudStatus {
            task_id: task.id.clone(),
            state: task.state.clone(),
            model_version: task.model_version,
            model: task.config.model.clone(),
            control_model: params(&task.config).2.to_string(),
            // The rate of the round in progress (or of the next one), as its devices are told.
            training: task.config.training.for_round(
                round
                    .as_ref()
                    .map_or(task.model_version, |r| r.base_version)
                    .max(0) as u64,
            ),
            round: round.as_ref().map(RoundRow::info),
            cloud_submitted,
            control_version,
        })
    }

    /// Largest control model body: `F_m`'s f32 data plus room for the safetensors header.
    pub fn control_limit(&self, config: &TaskConfig) -> usize {
        let specs = params(config).3;
        specs.iter().map(TensorSpec::numel).sum::<usize>() * 4 + 64 * 1024 + specs.len() * 256
    }

    /// Accepts the cloud's contribution to `round_id` (a delta of `F_s`, checked like a device's),
    /// once: a retry with the same body gets the same receipt. The flag says the round is now full.
    pub async fn submit_cloud_update(
        &self,
        store: &Store,
        task: &TaskRow,
        round_id: i64,
        body: Bytes,
    ) -> Result<(ArtifactReceipt, bool), ApiError> {
        let (round, sha256) = worker::artifact_round(store, task, round_id, &body).await?;
        if let Some(stored) = store.db.round_artifact(CLOUD_UPDATES, round_id).await? {
            return same_or_conflict(&stored, &sha256).map(|r| (r, false));
        }
        worker::check_open(&round)?;
        let (config, checked) = (task.config.clone(), body.clone());
        tokio::task::spawn_blocking(move || DcCcl.decode_update(&config, &checked)).await??;
        let row = ArtifactRow {
            id: round_id,
            blob_key: cloud_key(round_id, &sha256),
            sha256,
        };
        store.blobs.put(&row.blob_key, body).await?;
        if !store
            .db
            .insert_round_artifact(CLOUD_UPDATES, &row, now_ms())
            .await?
        {
            // Closed meanwhile, or a concurrent retry stored first.
            return match store.db.round_artifact(CLOUD_UPDATES, round_id).await? {
                Some(stored) => same_or_conflict(&stored, &row.sha256).map(|r| (r, false)),
                None => Err(ApiError::RoundClosed(round_id)),
            };
        }
        tracing::info!(task = %task.id, round = round_id, "cloud contribution accepted");
        let full = round.accepted >= i64::from(task.config.devices_per_round);
        Ok((row.receipt(), full))
    }

    /// Publishes control model `version` (the next one after the latest), once: a retry with the
    /// same body gets the same receipt. Versions are immutable.
    pub async fn publish_control_model(
        &self,
        store: &Store,
        task: &TaskRow,
        version: i64,
        body: Bytes,
    ) -> Result<ArtifactReceipt, ApiError> {
        let hashed = body.clone();
        let sha256 = tokio::task::spawn_blocking(move || sha256_hex(&hashed)).await?;
        if let Some(stored) = store.db.dc_ccl_control(&task.id, Some(version)).await? {
            return same_or_conflict(&stored, &sha256);
        }
        let next = store
            .db
            .dc_ccl_control(&task.id, None)
            .await?
            .map_or(1, |latest| latest.id + 1);
        if version != next {
            return Err(ApiError::ControlVersionOutOfOrder { next, got: version });
        }
        let (config, checked) = (task.config.clone(), body.clone());
        tokio::task::spawn_blocking(move || {
            NamedTensors::decode_checked(&checked, params(&config).3, f32::MAX)
        })
        .await??;
        let row = ArtifactRow {
            id: version,
            blob_key: control_key(&task.id, version, &sha256),
            sha256,
        };
        store.blobs.put(&row.blob_key, body).await?;
        if !store.db.dc_ccl_insert_control(&task.id, &row, now_ms()).await? {
            let stored = store.db.dc_ccl_control(&task.id, Some(version)).await?;
            return same_or_conflict(&stored.expect("the insert found this version"), &row.sha256);
        }
        tracing::info!(task = %task.id, version, "control model published");
        Ok(row.receipt())
    }

    /// Control model `version` (the latest when `None`) and its bytes.
    pub async fn control_model(
        &self,
        store: &Store,
        task_id: &str,
        version: Option<i64>,
    ) -> Result<(i64, Bytes), ApiError> {
        self.task(store, task_id).await?;
        let row = store.db.dc_ccl_control(task_id, version).await?.ok_or_else(|| {
            ApiError::UnknownControlModel {
                task: task_id.to_string(),
                version,
            }
        })?;
        Ok((row.id, store.blobs.get(&row.blob_key).await?))
    }
}

#[async_trait]
impl Strategy for DcCcl {
    fn handles(&self, config: &StrategyConfig) -> bool {
        matches!(config, StrategyConfig::DcCcl { .. })
    }

    fn validate(&self, config: &TaskConfig) -> Result<(), ApiError> {
        let (w, _, control_model, control_tensors) = params(config);
        if !(w.is_finite() && (0.0..=1.0).contains(&w)) {
            return Err(ApiError::InvalidConfig(format!(
                "`strategy.cloud_weight` must be within [0, 1], got {w}"
            )));
        }
        if control_model.is_empty() {
            return Err(ApiError::InvalidConfig(
                "`strategy.control_model` is empty".into(),
            ));
        }
        check_tensor_specs("strategy.control_tensors", control_tensors)
    }

    async fn issue_task_credentials(
        &self,
        store: &Store,
        task_id: &str,
        _config: &TaskConfig,
    ) -> Result<Option<String>, ApiError> {
        Ok(Some(worker::issue_token(store, task_id).await?))
    }

    async fn checkin(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        device: Option<&str>,
        clock: CheckinClock,
    ) -> Result<CheckinResponse, ApiError> {
        if store.db.dc_ccl_control(&task.id, None).await?.is_none() {
            return Ok(clock.retry_in_round("control_model_pending", round));
        }
        first_come(self, store, task, round, device, clock).await
    }

    async fn assignment_parts(
        &self,
        store: &Store,
        task: &TaskRow,
        _round: &RoundRow,
    ) -> Result<AssignmentParts, ApiError> {
        let control =
            store
                .db
                .dc_ccl_control(&task.id, None)
                .await?
                .ok_or_else(|| ApiError::UnknownControlModel {
                    task: task.id.clone(),
                    version: None,
                })?;
        Ok(AssignmentParts {
            control: Some(ControlModelRef {
                model: params(&task.config).2.to_string(),
                version: control.id,
            }),
            ..AssignmentParts::default()
        })
    }

    async fn round_full(&self, store: &Store, task: &TaskRow, round: &RoundRow) -> Result<bool, ApiError> {
        Ok(round.accepted >= i64::from(task.config.devices_per_round)
            && store.db.round_artifact(CLOUD_UPDATES, round.id).await?.is_some())
    }

    async fn commits(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        accepted: usize,
    ) -> Result<bool, ApiError> {
        if (accepted as u64) < u64::from(task.config.min_devices_per_round) {
            return Ok(false);
        }
        Ok(match params(&task.config).1 {
            WithoutCloud::DevicesOnly => true,
            WithoutCloud::Abandon => store.db.round_artifact(CLOUD_UPDATES, round.id).await?.is_some(),
        })
    }

    async fn commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        sums: Option<Sums>,
        new_version: i64,
    ) -> Result<CommitHold, ApiError> {
        let Some(Sums::Dense(devices)) = sums else {
            unreachable!("DC-CCL folds dense sums");
        };
        let cloud = match store.db.round_artifact(CLOUD_UPDATES, round.id).await? {
            Some(row) => Some(store.blobs.get(&row.blob_key).await?),
            None => None,
        };
        let (_, base) = store.model(&task.id, Some(round.base_version)).await?;
        let config = task.config.clone();
        let model = tokio::task::spawn_blocking(move || {
            let cloud = match cloud {
                Some(body) => {
                    let mut sums = Sums::Dense(FedAvgAccumulator::new(&config.tensors));
                    sums.add(1, &DcCcl.decode_update(&config, &body)?)?;
                    let Sums::Dense(acc) = sums else { unreachable!() };
                    Some(acc)
                }
                None => None,
            };
            let mut model = NamedTensors::decode(&base)?;
            fuse(&mut model, &devices, cloud.as_ref(), params(&config).0);
            Ok::<_, ApiError>(Bytes::from(model.encode()))
        })
        .await??;
        store.blobs.put(&model_key(&task.id, new_version), model).await?;
        Ok(None)
    }
}
