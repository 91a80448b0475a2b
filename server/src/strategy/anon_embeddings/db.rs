//! Anonymous embeddings' tables (migration 0010): per-task state, pending samples, seen
//! idempotency keys, batches, and each round's model. A submission's statements run in one
//! transaction (the `tx_*` functions, on its connection).

use sqlx::{AnyConnection, Row};

use crate::db::{Db, DbError};

/// Rows per multi-row statement: far below either database's limit on bound parameters.
const CHUNK: usize = 256;

/// Locks the task's state row for the rest of the transaction (creating it at the first
/// submission) and returns the number of batches so far. In PostgreSQL a concurrent submission
/// waits here until this one commits, then sees its batches and pending rows.
pub(super) async fn tx_lock_state(conn: &mut AnyConnection, task_id: &str) -> Result<i64, DbError> {
    let row = sqlx::query(
        "INSERT INTO anon_state (task_id, batches) VALUES ($1, 0) \
         ON CONFLICT (task_id) DO UPDATE SET batches = anon_state.batches RETURNING batches",
    )
    .bind(task_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.try_get("batches")?)
}

/// Records a submission's key; false when it was seen before (a retry).
pub(super) async fn tx_insert_key(
    conn: &mut AnyConnection,
    task_id: &str,
    key_hash: &str,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "INSERT INTO anon_seen_keys (task_id, key_hash) VALUES ($1, $2) \
         ON CONFLICT (task_id, key_hash) DO NOTHING",
    )
    .bind(task_id)
    .bind(key_hash)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Stores samples as pending rows `(id, sample)`.
pub(super) async fn tx_insert_pending(
    conn: &mut AnyConnection,
    task_id: &str,
    rows: &[(String, Vec<u8>)],
) -> Result<(), DbError> {
    for chunk in rows.chunks(CHUNK) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
            .collect();
        let sql = format!(
            "INSERT INTO anon_pending (id, task_id, sample) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, sample) in chunk {
            query = query
                .bind(id.clone())
                .bind(task_id.to_string())
                .bind(sample.clone());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

pub(super) async fn tx_pending_count(conn: &mut AnyConnection, task_id: &str) -> Result<i64, DbError> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM anon_pending WHERE task_id = $1")
        .bind(task_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get("n")?)
}

/// Every pending row of the task, `(id, sample)`.
pub(super) async fn tx_pending(
    conn: &mut AnyConnection,
    task_id: &str,
) -> Result<Vec<(String, Vec<u8>)>, DbError> {
    let rows = sqlx::query("SELECT id, sample FROM anon_pending WHERE task_id = $1")
        .bind(task_id)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("sample")?)))
        .collect::<Result<_, sqlx::Error>>()?)
}

pub(super) async fn tx_delete_pending(conn: &mut AnyConnection, ids: &[&str]) -> Result<(), DbError> {
    for chunk in ids.chunks(CHUNK) {
        let params: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!("DELETE FROM anon_pending WHERE id IN ({})", params.join(", "));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id.to_string());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

pub(super) async fn tx_insert_batch(
    conn: &mut AnyConnection,
    task_id: &str,
    number: i64,
    blob_key: &str,
    samples: i64,
) -> Result<(), DbError> {
    sqlx::query("INSERT INTO anon_batches (task_id, number, blob_key, samples) VALUES ($1, $2, $3, $4)")
        .bind(task_id)
        .bind(number)
        .bind(blob_key)
        .bind(samples)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn tx_set_batches(
    conn: &mut AnyConnection,
    task_id: &str,
    batches: i64,
) -> Result<(), DbError> {
    sqlx::query("UPDATE anon_state SET batches = $2 WHERE task_id = $1")
        .bind(task_id)
        .bind(batches)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Db {
    /// `(batches, pending samples)` of the task.
    pub(super) async fn anon_counts(&self, task_id: &str) -> Result<(i64, i64), DbError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM anon_batches WHERE task_id = $1) AS batches, \
                    (SELECT COUNT(*) FROM anon_pending WHERE task_id = $1) AS pending",
        )
        .bind(task_id)
        .fetch_one(self.pool())
        .await?;
        Ok((row.try_get("batches")?, row.try_get("pending")?))
    }

    /// The blob key of batch `number` of the task.
    pub(super) async fn anon_batch(&self, task_id: &str, number: i64) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT blob_key FROM anon_batches WHERE task_id = $1 AND number = $2")
            .bind(task_id)
            .bind(number)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("blob_key")).transpose()?)
    }
}
