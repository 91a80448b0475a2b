//! A task's cloud worker: the program beside the server that strategies with a cloud side (DC-CCL,
//! anonymous embeddings) hand part of a round to. Its token is issued once at task creation and
//! stored hashed (table `task_workers`); a named `cloud-worker` token for the task works too (see
//! [`crate::access`], checked by the routes).

use bytes::Bytes;
use fedhive_shared::wire::ArtifactReceipt;
use sqlx::Row;

use super::interface::new_token;
use crate::{
    db::{Db, DbError, RoundRow, TaskRow},
    error::ApiError,
    store::{Store, constant_time_eq, now_ms, sha256_hex},
};

/// Issues the worker token of a new task: returned once, stored only as its SHA-256.
pub async fn issue_token(store: &Store, task_id: &str) -> Result<String, ApiError> {
    let (token, hash) = new_token();
    store.db.set_worker(task_id, &hash).await?;
    Ok(token)
}

/// Whether `bearer` is the task's own worker token (compared in constant time, by hash).
pub async fn is_task_worker(store: &Store, task_id: &str, bearer: Option<&str>) -> Result<bool, ApiError> {
    let stored = store.db.worker(task_id).await?;
    let given = bearer.map(|b| sha256_hex(b.as_bytes()));
    Ok(match (stored, given) {
        (Some(stored), Some(given)) => constant_time_eq(stored.as_bytes(), given.as_bytes()),
        _ => false,
    })
}

/// The round `round_id` of `task` that a worker sends its once-per-round artefact for (DC-CCL's
/// cloud contribution, anonymous embeddings' round model), and the SHA-256 of `body` (hashed off
/// the async threads), by which a retry is told from a conflicting second body.
pub async fn artifact_round(
    store: &Store,
    task: &TaskRow,
    round_id: i64,
    body: &Bytes,
) -> Result<(RoundRow, String), ApiError> {
    let round = store
        .db
        .round(round_id)
        .await?
        .filter(|r| r.task_id == task.id)
        .ok_or_else(|| ApiError::UnknownRound {
            task: task.id.clone(),
            round: round_id,
        })?;
    let hashed = body.clone();
    let sha256 = tokio::task::spawn_blocking(move || sha256_hex(&hashed)).await?;
    Ok((round, sha256))
}

/// A new artefact (not a retry of a stored one) is taken only while its round is open.
pub fn check_open(round: &RoundRow) -> Result<(), ApiError> {
    if !round.open_at(now_ms()) {
        return Err(ApiError::RoundClosed(round.id));
    }
    Ok(())
}

/// A stored worker artefact: a DC-CCL control model version, or the one artefact a round takes
/// from its worker (DC-CCL's cloud contribution, anonymous embeddings' round model).
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRow {
    /// The version, or the round.
    pub id: i64,
    pub sha256: String,
    pub blob_key: String,
}

impl ArtifactRow {
    /// From a row with columns `sha256`, `blob_key` and `id_column`.
    pub fn from_row(r: &sqlx::any::AnyRow, id_column: &str) -> Result<Self, sqlx::Error> {
        Ok(ArtifactRow {
            id: r.try_get(id_column)?,
            sha256: r.try_get("sha256")?,
            blob_key: r.try_get("blob_key")?,
        })
    }

    /// What the worker is answered, the first time and for every identical retry.
    pub fn receipt(&self) -> ArtifactReceipt {
        ArtifactReceipt {
            id: self.id,
            sha256: self.sha256.clone(),
        }
    }
}

/// The tables of once-per-round worker artefacts; each has the columns `round_id` (primary key),
/// `sha256`, `blob_key` and `created_ms`.
#[derive(Debug, Clone, Copy)]
pub enum RoundArtifacts {
    DcCclCloudUpdates,
    AnonRoundModels,
}

impl RoundArtifacts {
    /// The lookup of a round's artefact (`$1` = round).
    fn select(self) -> &'static str {
        match self {
            RoundArtifacts::DcCclCloudUpdates => {
                "SELECT round_id, sha256, blob_key FROM dc_ccl_cloud_updates WHERE round_id = $1"
            }
            RoundArtifacts::AnonRoundModels => {
                "SELECT round_id, sha256, blob_key FROM anon_round_models WHERE round_id = $1"
            }
        }
    }

    /// The insert of a round's artefact, a no-op if the round has one.
    fn insert(self) -> &'static str {
        match self {
            RoundArtifacts::DcCclCloudUpdates => {
                "INSERT INTO dc_ccl_cloud_updates (round_id, sha256, blob_key, created_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (round_id) DO NOTHING"
            }
            RoundArtifacts::AnonRoundModels => {
                "INSERT INTO anon_round_models (round_id, sha256, blob_key, created_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (round_id) DO NOTHING"
            }
        }
    }
}

impl Db {
    /// Round `round_id`'s artefact in `table`, if stored.
    pub async fn round_artifact(
        &self,
        table: RoundArtifacts,
        round_id: i64,
    ) -> Result<Option<ArtifactRow>, DbError> {
        let row = sqlx::query(table.select())
            .bind(round_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| ArtifactRow::from_row(&r, "round_id")).transpose()?)
    }

    /// Stores round `row.id`'s artefact in `table` if the round is still open and has none; false
    /// otherwise. The guard updates the round's row, so in PostgreSQL it waits for (and then sees)
    /// a concurrent close, as [`Db::accept_updates`] does: a closing round's set is frozen.
    pub async fn insert_round_artifact(
        &self,
        table: RoundArtifacts,
        row: &ArtifactRow,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool().begin().await?;
        let open =
            sqlx::query("UPDATE rounds SET state = state WHERE id = $1 AND state = 'open' RETURNING id")
                .bind(row.id)
                .fetch_optional(&mut *tx)
                .await?;
        if open.is_none() {
            return Ok(false);
        }
        let done = sqlx::query(table.insert())
            .bind(row.id)
            .bind(&row.sha256)
            .bind(&row.blob_key)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_worker(&self, task_id: &str, token_hash: &str) -> Result<(), DbError> {
        sqlx::query("INSERT INTO task_workers (task_id, token_hash) VALUES ($1, $2)")
            .bind(task_id)
            .bind(token_hash)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn worker(&self, task_id: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT token_hash FROM task_workers WHERE task_id = $1")
            .bind(task_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("token_hash")).transpose()?)
    }
}
