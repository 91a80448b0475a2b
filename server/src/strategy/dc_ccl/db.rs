//! DC-CCL's control models (migration 0005). Each round's cloud contribution and the worker token
//! are stored by [`super::super::worker`], which anonymous embeddings share.

use super::super::worker::ArtifactRow;
use crate::db::{Db, DbError};

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
        Ok(row.map(|r| ArtifactRow::from_row(&r, "version")).transpose()?)
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
}
