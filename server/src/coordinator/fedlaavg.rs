//! FedLaAvg on the server (Yan et al., "Federated Optimization under Intermittent Client
//! Availability", INFORMS JoC; arXiv 2002.07399): enrolment, the selection window, and the round
//! step `T += G_new - G_old; x -= gamma * T / N` (see [`fedhive_shared::fedlaavg`]).
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

use bytes::Bytes;
use fedhive_shared::{
    LatestAverage, NamedTensors,
    fedlaavg::GRADIENT_LIMIT,
    wire::{
        Assignment, CheckinResponse, DeviceCredentials, DeviceInfo, StrategyConfig, TaskState, UploadKind,
    },
};
use tracing::{info, warn};

use super::{Coordinator, now_ms, sha256_hex};
use crate::{
    db::{RoundRow, TaskRow},
    error::ApiError,
};

/// How long after the window's end a device is told to come back (so it arrives after it).
const WINDOW_MARGIN_MS: i64 = 20;

fn grad_key(task_id: &str, device_id: &str, seq: i64) -> String {
    format!("fedlaavg/{task_id}/grads/{device_id}/{seq}.safetensors")
}

fn sum_key(task_id: &str, version: i64) -> String {
    format!("fedlaavg/{task_id}/sums/{version}.i64")
}

fn blocking_err(e: tokio::task::JoinError) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("stored FedLaAvg blob `{key}` is unreadable: {e}"))
}

pub(super) fn is_fedlaavg(task: &TaskRow) -> bool {
    matches!(task.config.strategy, StrategyConfig::FedLaAvg { .. })
}

pub(super) fn credentials_required(task_id: &str) -> ApiError {
    ApiError::DeviceUnauthorized(format!(
        "task `{task_id}` uses FedLaAvg, which selects devices by identity: enrol with POST \
         /v1/tasks/{task_id}/devices and check in with `Authorization: Bearer <device_id>:<device_secret>`"
    ))
}

impl Coordinator {
    /// Enrols a new device in a FedLaAvg task: a pseudonymous id and a secret shown only now.
    pub async fn enrol_device(&self, task_id: &str) -> Result<DeviceCredentials, ApiError> {
        let task = self.task(task_id).await?;
        if !is_fedlaavg(&task) {
            return Err(ApiError::InvalidRequest(format!(
                "task `{task_id}` does not use FedLaAvg; its devices check in without enrolling"
            )));
        }
        let device_id = format!("d-{}", hex::encode(rand::random::<[u8; 12]>()));
        let device_secret = hex::encode(rand::random::<[u8; 32]>());
        self.db
            .fedlaavg_enrol(
                &device_id,
                task_id,
                &sha256_hex(device_secret.as_bytes()),
                now_ms(),
            )
            .await?;
        info!(task = %task_id, device = %device_id, "device enrolled");
        Ok(DeviceCredentials {
            device_id,
            device_secret,
        })
    }

    /// The task's enrolled devices with their last participation (operators, tests).
    pub async fn devices(&self, task_id: &str) -> Result<Vec<DeviceInfo>, ApiError> {
        self.task(task_id).await?;
        Ok(self
            .db
            .fedlaavg_devices(task_id)
            .await?
            .into_iter()
            .map(|d| DeviceInfo {
                device_id: d.device_id,
                last_round_seq: d.last_seq,
            })
            .collect())
    }

    /// The device id behind `device_id:device_secret`, if it is enrolled in this task.
    async fn authenticate(&self, task_id: &str, bearer: &str) -> Result<String, ApiError> {
        let refused =
            || ApiError::DeviceUnauthorized(format!("unknown device or wrong secret for task `{task_id}`"));
        let (device_id, secret) = bearer.split_once(':').ok_or_else(refused)?;
        let device = self.db.fedlaavg_device(device_id).await?.ok_or_else(refused)?;
        let presented = sha256_hex(secret.as_bytes());
        let same = presented.len() == device.secret_hash.len()
            && presented
                .bytes()
                .zip(device.secret_hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if device.task_id != task_id || !same {
            return Err(refused());
        }
        Ok(device.device_id)
    }

    /// A check-in that presents device credentials. Tasks of other strategies ignore them.
    pub async fn checkin_device(&self, task_id: &str, bearer: &str) -> Result<CheckinResponse, ApiError> {
        let task = self.task(task_id).await?;
        let StrategyConfig::FedLaAvg {
            selection_window_ms, ..
        } = task.config.strategy
        else {
            return self.checkin(task_id).await;
        };
        let device_id = self.authenticate(task_id, bearer).await?;
        if task.state == TaskState::Finished {
            return Ok(CheckinResponse::Finished {
                model_version: task.model_version,
            });
        }
        let retry = |reason: &str, ms: i64| CheckinResponse::RetryAfter {
            retry_after_ms: ms.max(0) as u64,
            reason: reason.to_string(),
        };
        let base_retry = self.options.checkin_retry_ms as i64;
        let now = now_ms();
        let Some(round) = self.db.active_round(task_id).await? else {
            return Ok(retry("between_rounds", base_retry));
        };
        if round.state != "open" || now >= round.deadline_ms {
            return Ok(retry("round_closing", base_retry));
        }
        let window_end = round.opened_ms + selection_window_ms as i64;
        if now < window_end {
            self.db.fedlaavg_check_in(round.id, &device_id, now).await?;
            return Ok(retry("selection_window", window_end - now + WINDOW_MARGIN_MS));
        }
        let later = retry("not_selected", base_retry.min(round.deadline_ms - now).max(100));
        if self.db.fedlaavg_selection(round.id).await?.is_none() {
            self.db.fedlaavg_check_in(round.id, &device_id, now).await?;
            let cap =
                (f64::from(task.config.devices_per_round) * f64::from(task.config.over_selection)).ceil();
            let selected = self
                .db
                .fedlaavg_select(round.id, round.seq, task_id, cap as i64, now)
                .await?;
            if !selected.is_empty() {
                info!(task = %task_id, round = round.id, selected = selected.len(), "fedlaavg selection made");
            }
        }
        if self.db.fedlaavg_is_selected(round.id, &device_id).await? != Some(true) {
            return Ok(later);
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        if !self
            .db
            .fedlaavg_assign(round.id, &device_id, &sha256_hex(token.as_bytes()), now)
            .await?
        {
            // Its one token of this round was already issued (or the round just stopped taking
            // check-ins): it takes part again in a later round.
            return Ok(retry(
                "already_assigned",
                base_retry.min(round.deadline_ms - now).max(100),
            ));
        }
        Ok(CheckinResponse::Assigned(Assignment {
            task_id: task.id,
            round_id: round.id,
            model_version: round.base_version,
            model: task.config.model.clone(),
            training: task.config.training.clone(),
            upload_token: token,
            deadline_unix: round.deadline_ms / 1000,
            upload: UploadKind::GradientSum,
            block: None,
        }))
    }

    /// Whether every device selected for this round has uploaded (it need not wait for K then).
    pub(super) async fn fedlaavg_all_uploaded(&self, round: &RoundRow) -> Result<bool, ApiError> {
        Ok(self
            .db
            .fedlaavg_selection(round.id)
            .await?
            .is_some_and(|s| s.selected > 0 && round.accepted >= s.selected))
    }

    /// The round's new model: folds each accepted device's `G_i_new` into `T` in place of its
    /// `G_i_old`, stores `G_i_new` and the new `T` under idempotent keys, and steps
    /// `x -= gamma * T / N` unless the task is still warming up. Deterministic given the accepted set.
    pub(super) async fn fedlaavg_model(&self, task: &TaskRow, round: &RoundRow) -> Result<Bytes, ApiError> {
        let StrategyConfig::FedLaAvg { warmup_rounds, .. } = task.config.strategy else {
            unreachable!("called for fedlaavg tasks only");
        };
        let specs = task.config.tensors.clone();
        let gamma = task.config.training.learning_rate;
        let population = match self.db.fedlaavg_selection(round.id).await? {
            Some(s) => s.population,
            None => self.db.fedlaavg_population(&task.id).await?,
        };
        let mut sum = if round.base_version == 0 {
            LatestAverage::zeros(&specs)
        } else {
            let key = sum_key(&task.id, round.base_version);
            let bytes = self.blobs.get(&key).await?;
            LatestAverage::decode(&specs, &bytes).map_err(|e| corrupt(&key, e))?
        };
        for device in self.db.fedlaavg_round_devices(round.id, round.seq).await? {
            let new_bytes = self.blobs.get(&device.blob_key).await?;
            let old = match device.previous_seq {
                Some(seq) => {
                    let key = grad_key(&task.id, &device.device_id, seq);
                    Some((key.clone(), self.blobs.get(&key).await?))
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
            .await
            .map_err(blocking_err)??;
            self.blobs
                .put(&grad_key(&task.id, &device.device_id, round.seq), new_bytes)
                .await?;
        }
        let (_, base) = self.model(&task.id, Some(round.base_version)).await?;
        let warming_up = task.committed_rounds < i64::from(warmup_rounds);
        let (sum_bytes, model) = tokio::task::spawn_blocking(move || {
            let mut model = NamedTensors::decode(&base)?;
            if !warming_up {
                sum.step(&mut model, gamma, population.max(1) as u64)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            }
            Ok::<_, ApiError>((Bytes::from(sum.encode()), Bytes::from(model.encode())))
        })
        .await
        .map_err(blocking_err)??;
        self.blobs
            .put(&sum_key(&task.id, round.base_version + 1), sum_bytes)
            .await?;
        info!(task = %task.id, round = round.id, population, warming_up, "fedlaavg step computed");
        Ok(model)
    }

    /// After a commit: removes the blobs the round superseded (each accepted device's previous
    /// `G_i` and the previous `T`). Best effort; a crash here only leaves files behind.
    pub(super) async fn fedlaavg_after_commit(&self, task: &TaskRow, round: &RoundRow) {
        let mut stale = vec![sum_key(&task.id, round.base_version)];
        match self.db.fedlaavg_round_devices(round.id, round.seq).await {
            Ok(devices) => stale.extend(
                devices
                    .iter()
                    .filter_map(|d| d.previous_seq.map(|seq| grad_key(&task.id, &d.device_id, seq))),
            ),
            Err(e) => warn!(round = round.id, error = %e, "could not list superseded gradient sums"),
        }
        for key in stale {
            if let Err(e) = self.blobs.delete(&key).await {
                warn!(key = %key, error = %e, "could not remove a superseded FedLaAvg blob");
            }
        }
    }
}
