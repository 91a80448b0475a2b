//! What the coordinator and every strategy read and write: the database, the blob store, the
//! row-addressable tables, and the one cache every download goes through (the latest model bytes).
//!
//! Architecture invariant: only caches live here in memory; the database and the blob store hold
//! all state, so a restart rebuilds everything in this struct from them.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::{
    blobs::BlobStore,
    db::{Db, TaskRow},
    error::ApiError,
    tables::TableStore,
};

pub struct Store {
    pub db: Db,
    pub blobs: BlobStore,
    /// Row-addressable tensors (FedSubAvg's sparse tables), beside the blobs.
    pub tables: TableStore,
    /// Held while a round is finalised. A strategy whose inputs must not move during a
    /// finalisation (FedSubAvg's heat) takes it before changing them.
    pub finalize_lock: tokio::sync::Mutex<()>,
    /// Latest model bytes per task, so downloads do not hit the blob store.
    models: Mutex<HashMap<String, (i64, Bytes)>>,
    /// Held while a current model is read into that cache.
    model_loads: tokio::sync::Mutex<()>,
}

impl Store {
    pub fn new(db: Db, blobs: BlobStore) -> Self {
        let tables = TableStore::new(blobs.root().join("tables"));
        Store {
            db,
            blobs,
            tables,
            finalize_lock: tokio::sync::Mutex::new(()),
            models: Mutex::default(),
            model_loads: tokio::sync::Mutex::new(()),
        }
    }

    pub async fn task(&self, task_id: &str) -> Result<TaskRow, ApiError> {
        self.db
            .task(task_id)
            .await?
            .ok_or_else(|| ApiError::UnknownTask(task_id.to_string()))
    }

    /// Model bytes of `version` (the current one when `None`).
    pub async fn model(&self, task_id: &str, version: Option<i64>) -> Result<(i64, Bytes), ApiError> {
        let task = self.task(task_id).await?;
        let version = version.unwrap_or(task.model_version);
        if version < 0 || version > task.model_version {
            return Err(ApiError::UnknownModelVersion {
                task: task_id.to_string(),
                version,
            });
        }
        let cached = || {
            let models = self.models.lock().expect("model cache");
            models
                .get(task_id)
                .filter(|(v, _)| *v == version)
                .map(|(_, bytes)| bytes.clone())
        };
        if let Some(bytes) = cached() {
            return Ok((version, bytes));
        }
        if version != task.model_version {
            return Ok((version, self.blobs.get(&model_key(task_id, version)).await?));
        }
        // When a round opens, thousands of devices ask for the new model at once: one of them reads
        // it and the others wait for the cached copy, instead of each holding its own.
        let _one_reader = self.model_loads.lock().await;
        if let Some(bytes) = cached() {
            return Ok((version, bytes));
        }
        let bytes = self.blobs.get(&model_key(task_id, version)).await?;
        self.models
            .lock()
            .expect("model cache")
            .insert(task_id.to_string(), (version, bytes.clone()));
        Ok((version, bytes))
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Compares secrets (or their hashes) in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// An upload's body with its SHA-256 (hex), which the reader computes chunk by chunk as the bytes
/// arrive, so no stage after the read waits on a pass over a model-sized buffer to learn it.
pub struct HashedBody {
    pub bytes: Bytes,
    pub sha256: String,
}

impl HashedBody {
    /// Hashes bytes already in hand (tests, and callers that did not stream them).
    pub fn of(bytes: Bytes) -> Self {
        let sha256 = sha256_hex(&bytes);
        Self { bytes, sha256 }
    }
}

/// An upload's body as the coordinator takes it: read only once the upload holds a slot, or
/// drained unread when the upload is refused before it needs the bytes.
pub trait UploadBody: Send {
    /// The whole body, at most `limit` bytes (`413` past it), with its digest.
    fn read(self, limit: usize) -> impl Future<Output = Result<HashedBody, ApiError>> + Send;

    /// Reads the rest of the body (at most `limit` bytes) and drops it, holding none of it: the
    /// refusal then reaches a client that is still sending, on a connection kept open, where an
    /// unread body would make the server close it and the client see a transport error.
    fn discard(self, limit: usize) -> impl Future<Output = ()> + Send;
}

/// Bytes already in hand (tests, and callers that did not stream them).
impl UploadBody for HashedBody {
    async fn read(self, limit: usize) -> Result<HashedBody, ApiError> {
        match self.bytes.len() {
            size if size > limit => Err(ApiError::BodyTooLarge { size, limit }),
            _ => Ok(self),
        }
    }

    async fn discard(self, _limit: usize) {}
}

/// Blob key of a task's model version (the dense tensors, for strategies with sparse tables).
pub fn model_key(task_id: &str, version: i64) -> String {
    format!("models/{task_id}/{version}.safetensors")
}
