//! DC-CCL's tables (migration 0005): the task's control models and each round's cloud contribution
//! (its worker token is in [`super::super::worker`]).

use sqlx::Row;

use crate::db::{Db, DbError};

/// A stored artefact: a control model version or a round's cloud contribution.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ArtifactRow {
    pub(super) id: i64,
    pub(super) sha256: String,
    pub(super) blob_key: String,
}

fn artifact(r: &sqlx::any::AnyRow, id: &str) -> Result<ArtifactRow, sqlx::Error> {
    Ok(ArtifactRow {
        id: r.try_get(id)?,
        sha256: r.try_get("sha256")?,
        blob_key: r.try_get("blob_key")?,
    })
}

impl Db {
    /// Version `version` of the task's control model, or the latest when `None`.
    pub(super) async fn dc_ccl_control(
        &self,
        task_id: &str,
        version: Option<i64>,
    ) -> Result<Option<ArtifactRow>, DbError> {
        let query = match version {
            Some(v) => sqlx::query(
                "SELECT version, sha256, blob_key FROM dc_ccl_control_models WHERE task_id = $1 AND version = $2",
            )
            .bind(task_id)
            .bind(v),
            None => sqlx::query(
                "SELECT version, sha256, blob_key FROM dc_ccl_control_models WHERE task_id = $1 \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(task_id),
        };
        let row = query.fetch_optional(self.pool()).await?;
        Ok(row.map(|r| artifact(&r, "version")).transpose()?)
    }

    /// Stores control model `row.id` unless that version exists; false if it did.
    pub(super) async fn dc_ccl_insert_control(
        &self,
        task_id: &str,
        row: &ArtifactRow,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "INSERT INTO dc_ccl_control_models (task_id, version, sha256, blob_key, created_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (task_id, version) DO NOTHING",
        )
        .bind(task_id)
        .bind(row.id)
        .bind(&row.sha256)
        .bind(&row.blob_key)
        .bind(now_ms)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn dc_ccl_cloud_update(&self, round_id: i64) -> Result<Option<ArtifactRow>, DbError> {
        let row =
            sqlx::query("SELECT round_id, sha256, blob_key FROM dc_ccl_cloud_updates WHERE round_id = $1")
                .bind(round_id)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|r| artifact(&r, "round_id")).transpose()?)
    }

    /// Stores the cloud's contribution to round `row.id` if the round is still open and has none;
    /// false otherwise. The guard updates the round's row, so in PostgreSQL it waits for (and then
    /// sees) a concurrent close, as [`Db::accept_update`] does: a closing round's set is frozen.
    pub(super) async fn dc_ccl_insert_cloud_update(
        &self,
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
        let done = sqlx::query(
            "INSERT INTO dc_ccl_cloud_updates (round_id, sha256, blob_key, created_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (round_id) DO NOTHING",
        )
        .bind(row.id)
        .bind(&row.sha256)
        .bind(&row.blob_key)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }
}
