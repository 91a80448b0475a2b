//! A task's cloud worker: the program beside the server that strategies with a cloud side (DC-CCL,
//! anonymous embeddings) hand part of a round to. Its token is issued once at task creation and
//! stored hashed (table `task_workers`); a named `cloud-worker` token for the task works too (see
//! [`crate::access`], checked by the routes).

use bytes::Bytes;
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
    if round.state != "open" || now_ms() >= round.deadline_ms {
        return Err(ApiError::RoundClosed(round.id));
    }
    Ok(())
}

impl Db {
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
