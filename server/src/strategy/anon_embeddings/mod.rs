//! Personalisation without user identifiers (Ding et al., "Personalized Language Model Learning on
//! Text Data Without User Identifiers", arXiv 2501.06062; `ALGORITHMS.md`, "Anonymous user
//! embeddings").
//!
//! A device keeps a private distribution over a user embedding and sends labelled samples, each
//! with a fresh draw from it, to a route that takes no credential of any kind. The server keeps
//! each sample as a row that names nothing (a random id, the task, the sample's bytes) and, once
//! `mix_batch_samples` are pending, shuffles them with OS randomness and cuts full batches for the
//! task's cloud worker, which sees only those. Each round the worker submits a whole fine-tuned
//! model ([`worker`] token); the round is full once it is stored and commits it as the next
//! version. Devices never check in: they download the model as for any task.
//!
//! Exactly once without identity: each submission carries a random `Idempotency-Key`; its SHA-256
//! goes into a table of its own (no link to the samples, no time) in the transaction that stores
//! the samples, so a retry stores nothing. Abuse is bounded by one sample budget per task (a token
//! bucket in memory), not per address or device: either would be an identifier.

mod db;

use std::{collections::HashMap, sync::Mutex, time::Instant};

use bytes::Bytes;
use fedhive_shared::{
    NamedTensors,
    anon::{SampleShape, Samples},
    wire::{AnonStatus, ArtifactReceipt, CheckinResponse, SamplesAccepted, StrategyConfig, TaskConfig},
};
use rand::seq::SliceRandom;

use super::{
    interface::{CheckinClock, CommitHold, Strategy, Sums, async_trait},
    worker::{self, ArtifactRow, RoundArtifacts},
};
use crate::{
    db::{RoundRow, TaskRow},
    devices::Device,
    error::ApiError,
    rate_limit::{Bucket, RateLimit},
    store::{Store, model_key, now_ms, sha256_hex},
};

/// The anonymous-embeddings strategy; its state is each task's sample budget (a cache: a restart
/// refills the buckets).
#[derive(Default)]
pub struct AnonEmbeddings {
    budgets: Mutex<HashMap<String, Bucket>>,
}

/// A task's anonymous-embeddings parameters.
struct Params {
    shape: SampleShape,
    sigma: f32,
    max_samples: usize,
    mix: usize,
    budget: RateLimit,
}

fn params(config: &TaskConfig) -> Params {
    let StrategyConfig::AnonEmbeddings {
        sigma,
        max_samples_per_submission,
        mix_batch_samples,
        samples_per_second,
        samples_burst,
        ..
    } = &config.strategy
    else {
        unreachable!("the registry hands anonymous embeddings its own tasks");
    };
    Params {
        shape: config.strategy.sample_shape().expect("an anon_embeddings config"),
        sigma: *sigma,
        max_samples: *max_samples_per_submission as usize,
        mix: *mix_batch_samples as usize,
        budget: RateLimit {
            per_second: f64::from(*samples_per_second),
            burst: f64::from(*samples_burst),
        },
    }
}

/// Most bytes a submission's body or a batch may take: a task's config must keep both below this,
/// as it bounds what one request reads and what one mixing holds in memory.
const MAX_BYTES: u64 = 256 << 20;

/// Bytes of one sample: its input, embedding and label as f32.
fn sample_width(shape: SampleShape) -> usize {
    (shape.features + shape.embedding_dim + 1) * 4
}

/// One sample as a pending row stores it: input, embedding and label, f32 little-endian.
fn sample_bytes(samples: &Samples, i: usize) -> Vec<u8> {
    let label = [samples.labels[i] as f32];
    let values = samples.input(i).iter().chain(samples.embedding(i)).chain(&label);
    values.flat_map(|v| v.to_le_bytes()).collect()
}

/// The samples of pending rows, in the rows' order.
fn samples_of(shape: SampleShape, rows: &[(String, Vec<u8>)]) -> Samples {
    let mut out = Samples::empty(shape);
    for (_, bytes) in rows {
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (input, rest) = values.split_at(shape.features);
        let (embedding, label) = rest.split_at(shape.embedding_dim);
        out.push(input, embedding, label[0] as u32);
    }
    out
}

/// Where a batch is stored: named by task and number, and by digest so nothing overwrites it.
fn batch_key(task_id: &str, number: i64, sha256: &str) -> String {
    format!("anon/{task_id}/batches/{number}-{sha256}.safetensors")
}

/// Where a round's model is stored until the round commits it: beside the round's uploads (removed
/// with them once the round ends).
fn round_model_key(round_id: i64, sha256: &str) -> String {
    format!("updates/{round_id}/anon-model-{sha256}.safetensors")
}

/// Whether an `Idempotency-Key` is well formed: 32 lowercase hex characters (128 random bits).
pub fn check_idempotency_key(key: Option<&str>) -> Result<&str, ApiError> {
    let key = key.ok_or(ApiError::BadIdempotencyKey("is missing"))?;
    if key.len() != 32 {
        return Err(ApiError::BadIdempotencyKey("must be 32 characters long"));
    }
    if !key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ApiError::BadIdempotencyKey(
            "holds a character other than 0-9 and a-f",
        ));
    }
    Ok(key)
}

impl AnonEmbeddings {
    /// The task, if it runs anonymous embeddings.
    pub async fn task(&self, store: &Store, task_id: &str) -> Result<TaskRow, ApiError> {
        let task = store.task(task_id).await?;
        if !self.handles(&task.config.strategy) {
            return Err(ApiError::NotAnonEmbeddings(task_id.to_string()));
        }
        Ok(task)
    }

    /// Largest body of samples: `max_samples_per_submission` full samples plus room for the
    /// safetensors header of three tensors.
    pub fn samples_limit(&self, config: &TaskConfig) -> usize {
        let p = params(config);
        p.max_samples * sample_width(p.shape) + 4096
    }

    /// Checks a body of samples against the task's shape and maximum (blocking).
    pub fn decode_samples(config: &TaskConfig, body: &[u8]) -> Result<Samples, ApiError> {
        let p = params(config);
        Ok(Samples::decode_checked(body, p.shape, p.max_samples)?)
    }

    /// Takes `n` samples from the task's global budget, or says when enough are back.
    pub fn spend_budget(&self, task: &TaskRow, n: usize) -> Result<(), ApiError> {
        let limit = params(&task.config).budget;
        let now = Instant::now();
        let mut budgets = self.budgets.lock().expect("sample budgets");
        let bucket = budgets
            .entry(task.id.clone())
            .or_insert_with(|| Bucket::full(limit, now));
        bucket
            .take(limit, n as f64, now)
            .map_err(|wait| ApiError::SampleBudgetExhausted {
                retry_after_ms: (wait.as_millis() as u64).max(1),
            })
    }

    /// Stores a submission once per `key`: in one transaction its key's hash and its samples as
    /// pending rows, and every full batch the pending rows now make. A repeated key stores nothing.
    pub async fn submit(
        &self,
        store: &Store,
        task: &TaskRow,
        key: &str,
        samples: &Samples,
    ) -> Result<SamplesAccepted, ApiError> {
        let accepted = SamplesAccepted {
            accepted_samples: samples.len() as u32,
            duplicate: false,
        };
        let key_hash = sha256_hex(key.as_bytes());
        let rows: Vec<(String, Vec<u8>)> = (0..samples.len())
            .map(|i| {
                (
                    format!("{:032x}", rand::random::<u128>()),
                    sample_bytes(samples, i),
                )
            })
            .collect();
        let mix = params(&task.config).mix;
        let mut tx = store.db.pool().begin().await?;
        let batches = db::tx_lock_state(&mut tx, &task.id).await?;
        if !db::tx_insert_key(&mut tx, &task.id, &key_hash).await? {
            tx.rollback().await?;
            return Ok(SamplesAccepted {
                duplicate: true,
                ..accepted
            });
        }
        db::tx_insert_pending(&mut tx, &task.id, &rows).await?;
        if db::tx_pending_count(&mut tx, &task.id).await? >= mix as i64 {
            let mut pending = db::tx_pending(&mut tx, &task.id).await?;
            pending.shuffle(&mut rand::rng());
            let full = pending.len() / mix * mix;
            let mut made = 0;
            for chunk in pending[..full].chunks(mix) {
                made += 1;
                let number = batches + made;
                let body = Bytes::from(samples_of(params(&task.config).shape, chunk).encode());
                let blob_key = batch_key(&task.id, number, &sha256_hex(&body));
                // Written before the transaction commits, so a stored row always has its blob; if
                // the transaction then fails, the blob is an orphan that no row names (harmless,
                // and overwritten by the same key only with the same bytes).
                store.blobs.put(&blob_key, body).await?;
                db::tx_insert_batch(&mut tx, &task.id, number, &blob_key, chunk.len() as i64).await?;
                let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
                db::tx_delete_pending(&mut tx, &ids).await?;
            }
            db::tx_set_batches(&mut tx, &task.id, batches + made).await?;
            tracing::info!(task = %task.id, batches = made, total = batches + made, "samples mixed into batches");
        }
        tx.commit().await?;
        Ok(accepted)
    }

    /// What the worker needs to know: batches so far, samples waiting, the round and its model.
    pub async fn status(&self, store: &Store, task: &TaskRow) -> Result<AnonStatus, ApiError> {
        let (batches, pending_samples) = store.db.anon_counts(&task.id).await?;
        let round = store.db.active_round(&task.id).await?;
        let round_model_submitted = match &round {
            Some(r) => store.db.round_artifact(ROUND_MODELS, r.id).await?.is_some(),
            None => false,
        };
        let shape = params(&task.config).shape;
        Ok(AnonStatus {
            task_id: task.id.clone(),
            state: task.state.clone(),
            model_version: task.model_version,
            model: task.config.model.clone(),
            training: task.config.training.for_round(task.model_version.max(0) as u64),
            input_features: shape.features as u32,
            embedding_dim: shape.embedding_dim as u32,
            num_classes: shape.num_classes as u32,
            batches,
            pending_samples,
            round: round.as_ref().map(RoundRow::info),
            round_model_submitted,
        })
    }

    /// The bytes of batch `number` (a `Samples` safetensors).
    pub async fn batch(&self, store: &Store, task: &TaskRow, number: i64) -> Result<Bytes, ApiError> {
        let key = store
            .db
            .anon_batch(&task.id, number)
            .await?
            .ok_or_else(|| ApiError::UnknownBatch {
                task: task.id.clone(),
                number,
            })?;
        Ok(store.blobs.get(&key).await?)
    }

    /// Accepts the worker's model for `round_id` (whole weights of the task's tensors), once: a
    /// retry with the same body gets the same receipt, another body a conflict. The flag says the
    /// round is now full.
    pub async fn submit_round_model(
        &self,
        store: &Store,
        task: &TaskRow,
        round_id: i64,
        body: Bytes,
    ) -> Result<(ArtifactReceipt, bool), ApiError> {
        let (round, sha256) = worker::artifact_round(store, task, round_id, &body).await?;
        if let Some(stored) = store.db.round_artifact(ROUND_MODELS, round_id).await? {
            return same_or_conflict(&stored, &sha256).map(|r| (r, false));
        }
        worker::check_open(&round)?;
        let (config, checked) = (task.config.clone(), body.clone());
        tokio::task::spawn_blocking(move || {
            NamedTensors::decode_checked(&checked, &config.tensors, f32::MAX)
        })
        .await??;
        let row = ArtifactRow {
            id: round_id,
            blob_key: round_model_key(round_id, &sha256),
            sha256,
        };
        store.blobs.put(&row.blob_key, body).await?;
        if !store
            .db
            .insert_round_artifact(ROUND_MODELS, &row, now_ms())
            .await?
        {
            // Closed meanwhile, or a concurrent retry stored first.
            return match store.db.round_artifact(ROUND_MODELS, round_id).await? {
                Some(stored) => same_or_conflict(&stored, &row.sha256).map(|r| (r, false)),
                None => Err(ApiError::RoundClosed(round_id)),
            };
        }
        tracing::info!(task = %task.id, round = round_id, "round model accepted");
        Ok((row.receipt(), true))
    }
}

/// Where a round's model is stored until the round commits it.
const ROUND_MODELS: RoundArtifacts = RoundArtifacts::AnonRoundModels;

/// A retry of a round's model: the same receipt for the same body, a conflict for another.
fn same_or_conflict(stored: &ArtifactRow, sha256: &str) -> Result<ArtifactReceipt, ApiError> {
    if stored.sha256 == sha256 {
        return Ok(stored.receipt());
    }
    Err(ApiError::RoundModelConflict {
        round: stored.id,
        stored: stored.sha256.clone(),
    })
}

#[async_trait]
impl Strategy for AnonEmbeddings {
    fn handles(&self, config: &StrategyConfig) -> bool {
        matches!(config, StrategyConfig::AnonEmbeddings { .. })
    }

    fn validate(&self, config: &TaskConfig) -> Result<(), ApiError> {
        let p = params(config);
        let bad = |msg: String| Err(ApiError::InvalidConfig(msg));
        if p.shape.embedding_dim == 0 || p.shape.features == 0 {
            return bad("`strategy.embedding_dim` and `strategy.input_features` must be >= 1".into());
        }
        if p.shape.num_classes < 2 {
            return bad(format!(
                "`strategy.num_classes` must be >= 2, got {}",
                p.shape.num_classes
            ));
        }
        if !(p.sigma.is_finite() && p.sigma >= 0.0) {
            return bad(format!(
                "`strategy.sigma` must be finite and >= 0, got {}",
                p.sigma
            ));
        }
        if p.max_samples == 0 || p.mix == 0 {
            return bad(
                "`strategy.max_samples_per_submission` and `strategy.mix_batch_samples` must be >= 1".into(),
            );
        }
        // From u32 fields: the width fits in u64, the product saturates.
        let width = (p.shape.features as u64 + p.shape.embedding_dim as u64 + 1) * 4;
        for (field, samples) in [
            ("max_samples_per_submission", p.max_samples),
            ("mix_batch_samples", p.mix),
        ] {
            let bytes = (samples as u64).saturating_mul(width);
            if bytes > MAX_BYTES {
                return bad(format!(
                    "`strategy.{field}` samples of {width} bytes take {bytes} bytes, more than {MAX_BYTES}"
                ));
            }
        }
        let RateLimit { per_second, burst } = p.budget;
        if !(per_second.is_finite() && per_second > 0.0) {
            return bad(format!(
                "`strategy.samples_per_second` must be positive, got {per_second}"
            ));
        }
        // A submission takes its whole size from the bucket at once: a burst below the largest
        // submission would refuse those for good.
        if burst < p.max_samples as f64 {
            return bad(format!(
                "`strategy.samples_burst` ({burst}) must be at least `max_samples_per_submission` ({})",
                p.max_samples
            ));
        }
        if config.require_enrolled_device {
            return bad(
                "`require_enrolled_device` does not apply: anonymous samples carry no credential".into(),
            );
        }
        Ok(())
    }

    async fn issue_task_credentials(
        &self,
        store: &Store,
        task_id: &str,
        _config: &TaskConfig,
    ) -> Result<Option<String>, ApiError> {
        Ok(Some(worker::issue_token(store, task_id).await?))
    }

    /// Refused before anything else: a check-in would tie a device to the task.
    async fn authenticate(
        &self,
        _store: &Store,
        task: &TaskRow,
        _device: Option<&Device>,
    ) -> Result<Option<String>, ApiError> {
        Err(ApiError::AnonymousTask(task.id.clone()))
    }

    async fn checkin(
        &self,
        _store: &Store,
        task: &TaskRow,
        _round: &RoundRow,
        _device: Option<&str>,
        _clock: CheckinClock,
    ) -> Result<CheckinResponse, ApiError> {
        Err(ApiError::AnonymousTask(task.id.clone()))
    }

    fn new_sums(&self, _config: &TaskConfig) -> Option<Sums> {
        None
    }

    async fn round_full(&self, store: &Store, _task: &TaskRow, round: &RoundRow) -> Result<bool, ApiError> {
        Ok(store.db.round_artifact(ROUND_MODELS, round.id).await?.is_some())
    }

    async fn commits(
        &self,
        store: &Store,
        _task: &TaskRow,
        round: &RoundRow,
        _accepted: usize,
    ) -> Result<bool, ApiError> {
        Ok(store.db.round_artifact(ROUND_MODELS, round.id).await?.is_some())
    }

    async fn commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        _sums: Option<Sums>,
        new_version: i64,
    ) -> Result<CommitHold, ApiError> {
        let row = store
            .db
            .round_artifact(ROUND_MODELS, round.id)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("round {} commits without its model", round.id)))?;
        let model = store.blobs.get(&row.blob_key).await?;
        store.blobs.put(&model_key(&task.id, new_version), model).await?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_row_holds_one_sample_and_reads_back() {
        let shape = SampleShape {
            features: 2,
            embedding_dim: 3,
            num_classes: 5,
        };
        let mut s = Samples::empty(shape);
        s.push(&[1.0, -2.0], &[0.5, 0.25, -0.125], 4);
        s.push(&[3.0, 4.0], &[1.0, 2.0, 3.0], 0);
        let rows: Vec<(String, Vec<u8>)> = (0..2).map(|i| (i.to_string(), sample_bytes(&s, i))).collect();
        assert_eq!(rows[0].1.len(), (2 + 3 + 1) * 4);
        assert_eq!(samples_of(shape, &rows), s);
        assert_eq!(samples_of(shape, &rows[1..]).labels, vec![0]);
    }

    #[test]
    fn the_largest_fields_are_refused_without_overflow() {
        let config = TaskConfig {
            model: "m".into(),
            tensors: vec![],
            strategy: StrategyConfig::AnonEmbeddings {
                embedding_dim: u32::MAX,
                sigma: 1.0,
                input_features: u32::MAX,
                num_classes: u32::MAX,
                max_samples_per_submission: u32::MAX,
                mix_batch_samples: u32::MAX,
                samples_per_second: f32::MAX,
                samples_burst: u32::MAX,
            },
            training: fedhive_shared::wire::TrainingParams {
                local_epochs: 1,
                max_local_steps: 0,
                batch_size: 1,
                learning_rate: 0.1,
                learning_rate_schedule: None,
            },
            devices_per_round: 1,
            min_devices_per_round: 1,
            over_selection: 1.0,
            round_deadline_secs: 1,
            require_enrolled_device: false,
            update_encoding: Default::default(),
            rounds: 1,
        };
        let refused = AnonEmbeddings::default().validate(&config).unwrap_err();
        assert!(
            refused.to_string().contains("max_samples_per_submission"),
            "{refused}"
        );
    }

    #[test]
    fn idempotency_keys_are_32_lowercase_hex() {
        assert!(check_idempotency_key(Some(&"0a".repeat(16))).is_ok());
        for bad in [
            None,
            Some("abc"),
            Some(&*"0A".repeat(16)),
            Some(&*"0g".repeat(16)),
        ] {
            assert_eq!(
                check_idempotency_key(bad).unwrap_err().code(),
                "bad_idempotency_key"
            );
        }
    }
}
