//! Round state in SQL: SQLite (a file under the data dir) or PostgreSQL, chosen by URL scheme.
//!
//! The database is the source of truth: which tasks exist, which round is open, which upload tokens
//! were handed out and which updates were accepted. Every state change is one transaction whose guard
//! (`WHERE state = 'open' AND accepted < $k`, primary keys on token hashes) makes it apply at most
//! once, whatever the number of concurrent requests or server replicas. Queries use `$n` placeholders,
//! which both databases accept, through sqlx's `Any` driver.

use std::collections::HashMap;

use fedhive_shared::wire::{RoundInfo, RoundReports, RoundState, TaskConfig, TaskState};
use sqlx::{
    AnyPool, Row,
    any::{AnyPoolOptions, AnyRow},
};

use crate::access::{AuditRecord, db::insert_audit};

/// Pool plus the dialect it speaks.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    latency: crate::telemetry::StorageLatency,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored task config is not valid JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// The group commit's transaction holding this update failed (nothing in it was recorded).
    #[error("group commit: {0}")]
    GroupCommit(std::sync::Arc<DbError>),
    #[error("the group commit holding this update stopped before it answered")]
    GroupCommitStopped,
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
}

#[derive(Debug, Clone)]
pub struct TaskRow {
    pub id: String,
    pub config: TaskConfig,
    pub state: TaskState,
    pub model_version: i64,
    pub committed_rounds: i64,
    pub created_ms: i64,
}

/// What [`Db::assign`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigned {
    Issued,
    /// The round handed out all its tokens, or stopped taking check-ins.
    RoundFull,
    /// The device already holds a token of this round.
    AlreadyAssigned,
}

#[derive(Debug, Clone)]
pub struct RoundRow {
    pub id: i64,
    pub task_id: String,
    pub seq: i64,
    pub state: String,
    pub base_version: i64,
    pub assigned: i64,
    pub accepted: i64,
    pub total_samples: i64,
    pub opened_ms: i64,
    pub deadline_ms: i64,
    pub closed_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRow {
    pub token_hash: String,
    pub round_id: i64,
    pub num_samples: i64,
    pub sha256: String,
    pub blob_key: String,
    pub accepted_seq: i64,
    /// The replica that accepted it and folded it into its sums (see [`crate::replicas`]).
    pub replica: Option<String>,
}

/// How a closing round ends.
#[derive(Debug, Clone, Copy)]
pub enum RoundOutcome {
    Committed { new_version: i64 },
    Abandoned,
}

/// The round to open after one ends.
#[derive(Debug, Clone, Copy)]
pub struct NextRound {
    pub seq: i64,
    pub base_version: i64,
    pub opened_ms: i64,
    pub deadline_ms: i64,
}

impl RoundRow {
    /// The round is open and before its deadline at `now_ms`: it may still take work (check-ins,
    /// updates up to K, a worker's artefacts). Once false, false for good: a round never reopens
    /// and its deadline does not move.
    pub fn open_at(&self, now_ms: i64) -> bool {
        self.state == "open" && now_ms < self.deadline_ms
    }

    pub fn info(&self) -> RoundInfo {
        let state = match self.state.as_str() {
            "committed" => RoundState::Committed,
            "abandoned" => RoundState::Abandoned,
            _ => RoundState::Open,
        };
        RoundInfo {
            round_id: self.id,
            seq: self.seq,
            state,
            base_version: self.base_version,
            assigned: self.assigned,
            accepted: self.accepted,
            total_samples: self.total_samples,
            opened_unix: self.opened_ms / 1000,
            deadline_unix: self.deadline_ms / 1000,
            closed_unix: self.closed_ms.map(|ms| ms / 1000),
            reports: None,
        }
    }
}

const ROUND_COLUMNS: &str = "id, task_id, seq, state, base_version, assigned, accepted, total_samples, opened_ms, deadline_ms, closed_ms";
const TASK_COLUMNS: &str = "id, config, state, halt, model_version, committed_rounds, created_ms";
const UPDATE_COLUMNS: &str = "token_hash, round_id, num_samples, sha256, blob_key, accepted_seq, replica";

fn round_row(r: &AnyRow) -> Result<RoundRow, sqlx::Error> {
    Ok(RoundRow {
        id: r.try_get("id")?,
        task_id: r.try_get("task_id")?,
        seq: r.try_get("seq")?,
        state: r.try_get("state")?,
        base_version: r.try_get("base_version")?,
        assigned: r.try_get("assigned")?,
        accepted: r.try_get("accepted")?,
        total_samples: r.try_get("total_samples")?,
        opened_ms: r.try_get("opened_ms")?,
        deadline_ms: r.try_get("deadline_ms")?,
        closed_ms: r.try_get("closed_ms")?,
    })
}

fn update_row(r: &AnyRow) -> Result<UpdateRow, sqlx::Error> {
    Ok(UpdateRow {
        token_hash: r.try_get("token_hash")?,
        round_id: r.try_get("round_id")?,
        num_samples: r.try_get("num_samples")?,
        sha256: r.try_get("sha256")?,
        blob_key: r.try_get("blob_key")?,
        accepted_seq: r.try_get("accepted_seq")?,
        replica: r.try_get("replica")?,
    })
}

fn task_row(r: &AnyRow) -> Result<TaskRow, DbError> {
    let config: String = r.try_get("config")?;
    let state: String = r.try_get("state")?;
    let halt: Option<String> = r.try_get("halt")?;
    Ok(TaskRow {
        id: r.try_get("id")?,
        config: serde_json::from_str(&config)?,
        state: match (state.as_str(), halt.as_deref()) {
            (_, Some("cancelled")) => TaskState::Cancelled,
            ("finished", _) => TaskState::Finished,
            (_, Some("paused")) => TaskState::Paused,
            _ => TaskState::Running,
        },
        model_version: r.try_get("model_version")?,
        committed_rounds: r.try_get("committed_rounds")?,
        created_ms: r.try_get("created_ms")?,
    })
}

/// SQL with a shared column list spliced in. Only compile-time constants are spliced.
fn sql(template: &'static str, columns: &'static str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(template.replace("{cols}", columns))
}

/// An accepted update to record, with its round's `devices_per_round`.
#[derive(Debug, Clone)]
pub struct Accept {
    pub k: i64,
    pub row: UpdateRow,
}

/// One update of [`Db::accept_updates`]: the counter first (its guard decides), then the row.
async fn accept_one(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    k: i64,
    update: &UpdateRow,
    now_ms: i64,
) -> Result<Option<UpdateRow>, DbError> {
    let row = sqlx::query(
        "UPDATE rounds SET accepted = accepted + 1, total_samples = total_samples + $1 \
         WHERE id = $2 AND state = 'open' AND accepted < $3 RETURNING accepted",
    )
    .bind(update.num_samples)
    .bind(update.round_id)
    .bind(k)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let stored = UpdateRow {
        accepted_seq: row.try_get("accepted")?,
        ..update.clone()
    };
    let inserted = sqlx::query(
        "INSERT INTO updates (token_hash, round_id, num_samples, sha256, blob_key, accepted_seq, created_ms, replica) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (token_hash) DO NOTHING",
    )
    .bind(&stored.token_hash)
    .bind(stored.round_id)
    .bind(stored.num_samples)
    .bind(&stored.sha256)
    .bind(&stored.blob_key)
    .bind(stored.accepted_seq)
    .bind(now_ms)
    .bind(&stored.replica)
    .execute(&mut **tx)
    .await?;
    if inserted.rows_affected() == 0 {
        sqlx::query(
            "UPDATE rounds SET accepted = accepted - 1, total_samples = total_samples - $1 WHERE id = $2",
        )
        .bind(update.num_samples)
        .bind(update.round_id)
        .execute(&mut **tx)
        .await?;
        return Ok(None);
    }
    Ok(Some(stored))
}

impl Db {
    /// Connects and runs the migrations of the URL's database.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let pool = if url.starts_with("sqlite:") {
            let pool = AnyPoolOptions::new()
                // SQLite has one writer; one connection avoids SQLITE_BUSY between our own transactions.
                .max_connections(1)
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        use sqlx::Executor;
                        // FULL: an acknowledged upload survives power loss too, not only kill -9.
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;")
                            .await?;
                        Ok(())
                    })
                })
                .connect(url)
                .await?;
            sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
            pool
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = AnyPoolOptions::new().max_connections(16).connect(url).await?;
            sqlx::migrate!("../migrations/postgres").run(&pool).await?;
            pool
        } else {
            return Err(DbError::UnsupportedUrl(url.to_string()));
        };
        Ok(Db {
            pool,
            latency: Default::default(),
        })
    }

    /// The pool, for strategy modules that keep their own tables (see [`crate::strategy`]).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A round trip to the database.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Times this database's hot queries into a server's metrics.
    pub fn with_latency(mut self, latency: crate::telemetry::StorageLatency) -> Self {
        self.latency = latency;
        self
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Inserts a task and opens its first round, with the audit line of its creation, atomically.
    pub async fn create_task(
        &self,
        id: &str,
        config: &TaskConfig,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tasks (id, config, state, model_version, committed_rounds, created_ms) \
             VALUES ($1, $2, 'running', 0, 0, $3)",
        )
        .bind(id)
        .bind(serde_json::to_string(config)?)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let deadline = now_ms + config.round_deadline_secs as i64 * 1000;
        insert_round(&mut tx, id, 1, 0, now_ms, deadline).await?;
        insert_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn task(&self, id: &str) -> Result<Option<TaskRow>, DbError> {
        self.latency
            .time("database", "task", async {
                let row = sqlx::query(sql("SELECT {cols} FROM tasks WHERE id = $1", TASK_COLUMNS))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(task_row).transpose()
            })
            .await
    }

    /// Every task, newest first.
    pub async fn tasks(&self) -> Result<Vec<TaskRow>, DbError> {
        let rows = sqlx::query(sql(
            "SELECT {cols} FROM tasks ORDER BY created_ms DESC, id",
            TASK_COLUMNS,
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(task_row).collect()
    }

    /// Pauses a running task or resumes a paused one, with the audit line, in one transaction;
    /// false (and nothing written) if it was in neither state.
    pub async fn set_paused(
        &self,
        id: &str,
        paused: bool,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        let query = if paused {
            "UPDATE tasks SET halt = 'paused' WHERE id = $1 AND state = 'running' AND halt IS NULL"
        } else {
            "UPDATE tasks SET halt = NULL WHERE id = $1 AND state = 'running' AND halt = 'paused'"
        };
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(query).bind(id).execute(&mut *tx).await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Cancels a task that has not finished, abandoning its open round, with the audit line, in one
    /// transaction; false (and nothing written) if it had already finished or been cancelled.
    pub async fn cancel_task(&self, id: &str, audit: &AuditRecord, now_ms: i64) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE tasks SET state = 'finished', halt = 'cancelled' WHERE id = $1 AND state = 'running'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE rounds SET state = 'abandoned', closed_ms = $1 \
             WHERE task_id = $2 AND state IN ('open', 'closing')",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Tasks whose rounds the ticker runs: running and not paused.
    pub async fn running_task_ids(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query("SELECT id FROM tasks WHERE state = 'running' AND halt IS NULL ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?)
    }

    /// The task's round that is open or closing, if any.
    pub async fn active_round(&self, task_id: &str) -> Result<Option<RoundRow>, DbError> {
        self.latency
            .time("database", "active_round", async {
                let row = sqlx::query(sql(
                    "SELECT {cols} FROM rounds WHERE task_id = $1 AND state IN ('open', 'closing')",
                    ROUND_COLUMNS,
                ))
                .bind(task_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.as_ref().map(round_row).transpose()?)
            })
            .await
    }

    pub async fn round(&self, id: i64) -> Result<Option<RoundRow>, DbError> {
        self.latency
            .time("database", "round", async {
                let row = sqlx::query(sql("SELECT {cols} FROM rounds WHERE id = $1", ROUND_COLUMNS))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.as_ref().map(round_row).transpose()?)
            })
            .await
    }

    pub async fn rounds(&self, task_id: &str) -> Result<Vec<RoundRow>, DbError> {
        let rows = sqlx::query(sql(
            "SELECT {cols} FROM rounds WHERE task_id = $1 ORDER BY seq",
            ROUND_COLUMNS,
        ))
        .bind(task_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(round_row).collect::<Result<_, _>>()?)
    }

    /// The task's device-reported metrics per round id, weighted by sample counts.
    pub async fn round_reports(&self, task_id: &str) -> Result<HashMap<i64, RoundReports>, DbError> {
        // Sums cast to floating point: PostgreSQL sums BIGINTs as NUMERIC, which `Any` cannot read.
        let rows = sqlx::query(
            "SELECT m.round_id, COUNT(*) AS devices, \
                CAST(SUM(m.loss * m.num_samples) AS DOUBLE PRECISION) AS loss_sum, \
                CAST(SUM(m.num_samples) AS DOUBLE PRECISION) AS samples, \
                CAST(SUM(m.accuracy * m.num_samples) AS DOUBLE PRECISION) AS accuracy_sum, \
                CAST(SUM(CASE WHEN m.accuracy IS NULL THEN 0 ELSE m.num_samples END) AS DOUBLE PRECISION) \
                    AS accuracy_samples \
             FROM metrics m JOIN rounds r ON r.id = m.round_id WHERE r.task_id = $1 GROUP BY m.round_id",
        )
        .bind(task_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for r in rows {
            let samples: f64 = r.try_get("samples")?;
            let accuracy_samples: f64 = r.try_get("accuracy_samples")?;
            let accuracy_sum: Option<f64> = r.try_get("accuracy_sum")?;
            let loss_sum: f64 = r.try_get("loss_sum")?;
            let reports = RoundReports {
                devices: r.try_get("devices")?,
                loss: if samples > 0.0 { loss_sum / samples } else { 0.0 },
                accuracy: accuracy_sum
                    .filter(|_| accuracy_samples > 0.0)
                    .map(|sum| sum / accuracy_samples),
            };
            out.insert(r.try_get("round_id")?, reports);
        }
        Ok(out)
    }

    /// Hands out one of the round's `cap` assignments; `None` when the round is full or not open.
    pub async fn assign(
        &self,
        round_id: i64,
        cap: i64,
        token_hash: &str,
        device: Option<&str>,
        now_ms: i64,
    ) -> Result<Assigned, DbError> {
        self.latency
            .time("database", "assign", async {
                let mut tx = self.pool.begin().await?;
                let row = sqlx::query(
                    "UPDATE rounds SET assigned = assigned + 1 \
                 WHERE id = $1 AND state = 'open' AND assigned < $2 AND deadline_ms > $3 RETURNING assigned",
                )
                .bind(round_id)
                .bind(cap)
                .bind(now_ms)
                .fetch_optional(&mut *tx)
                .await?;
                if row.is_none() {
                    return Ok(Assigned::RoundFull);
                }
                // The unique (round, device) index refuses a second token of the round for a device;
                // dropping the transaction then gives its slot back. No NULL is bound (see
                // `insert_metrics`): an anonymous check-in binds '' for no device.
                let inserted = sqlx::query(
                    "INSERT INTO assignments (token_hash, round_id, created_ms, device_id) \
                     VALUES ($1, $2, $3, NULLIF($4, '')) ON CONFLICT DO NOTHING",
                )
                .bind(token_hash)
                .bind(round_id)
                .bind(now_ms)
                .bind(device.unwrap_or_default())
                .execute(&mut *tx)
                .await?;
                if inserted.rows_affected() != 1 {
                    return Ok(Assigned::AlreadyAssigned);
                }
                tx.commit().await?;
                Ok(Assigned::Issued)
            })
            .await
    }

    /// The round an upload token belongs to, and the enrolled device it was issued to (`None`: an
    /// anonymous check-in).
    pub async fn assignment_round(&self, token_hash: &str) -> Result<Option<(i64, Option<String>)>, DbError> {
        let row = sqlx::query("SELECT round_id, device_id FROM assignments WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| Ok::<_, sqlx::Error>((r.try_get("round_id")?, r.try_get("device_id")?)))
            .transpose()?)
    }

    pub async fn update_for_token(&self, token_hash: &str) -> Result<Option<UpdateRow>, DbError> {
        let row = sqlx::query(sql(
            "SELECT {cols} FROM updates WHERE token_hash = $1",
            UPDATE_COLUMNS,
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(update_row).transpose()?)
    }

    /// Records accepted updates in one transaction (see [`crate::group_commit`]): each is stored if
    /// its round is still open and below its `k` updates. Returns, in the order given, each stored
    /// row, or `None` where the round no longer accepts uploads or the token already has a row (a
    /// retry that another replica stored first). Exactly once: each counter update and its row
    /// insert commit together, and the token hash is the row's primary key. A row the insert finds
    /// taken gives its counter update back in the same transaction, so no error aborts the others.
    /// The updates are recorded in (round, token hash) order, so replicas committing batches at
    /// once lock rows in one order and cannot deadlock; past a round's K, the later ones in that
    /// order are refused.
    pub async fn accept_updates(
        &self,
        updates: &[Accept],
        now_ms: i64,
    ) -> Result<Vec<Option<UpdateRow>>, DbError> {
        let mut order: Vec<usize> = (0..updates.len()).collect();
        order.sort_by_key(|&i| (updates[i].row.round_id, &updates[i].row.token_hash));
        self.latency
            .time("database", "accept_update", async {
                let mut tx = self.pool.begin().await?;
                let mut stored = vec![None; updates.len()];
                for i in order {
                    stored[i] = accept_one(&mut tx, updates[i].k, &updates[i].row, now_ms).await?;
                }
                tx.commit().await?;
                Ok(stored)
            })
            .await
    }

    /// The round's accepted updates, in token-hash order.
    pub async fn updates_of_round(&self, round_id: i64) -> Result<Vec<UpdateRow>, DbError> {
        let rows = sqlx::query(sql(
            "SELECT {cols} FROM updates WHERE round_id = $1 ORDER BY token_hash",
            UPDATE_COLUMNS,
        ))
        .bind(round_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(update_row).collect::<Result<_, _>>()?)
    }

    /// Stops a round taking uploads, freezing its set of accepted updates. False if it was not open.
    pub async fn close_round(&self, round_id: i64) -> Result<bool, DbError> {
        let done = sqlx::query("UPDATE rounds SET state = 'closing' WHERE id = $1 AND state = 'open'")
            .bind(round_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a closing round, moves the task's model version on a commit, and opens the next round
    /// (or finishes the task), in one transaction. False if another finaliser got there first.
    pub async fn finish_round(
        &self,
        round: &RoundRow,
        outcome: RoundOutcome,
        next: Option<NextRound>,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        self.latency
            .time("database", "finish_round", async {
            let mut tx = self.pool.begin().await?;
            let state = match outcome {
                RoundOutcome::Committed { .. } => "committed",
                RoundOutcome::Abandoned => "abandoned",
            };
            let done =
                sqlx::query("UPDATE rounds SET state = $1, closed_ms = $2 WHERE id = $3 AND state = 'closing'")
                    .bind(state)
                    .bind(now_ms)
                    .bind(round.id)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
            if let RoundOutcome::Committed { new_version } = outcome {
                sqlx::query(
                    "UPDATE tasks SET model_version = $1, committed_rounds = committed_rounds + 1 WHERE id = $2",
                )
                .bind(new_version)
                .bind(&round.task_id)
                .execute(&mut *tx)
                .await?;
            }
            match next {
                Some(n) => {
                    insert_round(
                        &mut tx,
                        &round.task_id,
                        n.seq,
                        n.base_version,
                        n.opened_ms,
                        n.deadline_ms,
                    )
                    .await?
                }
                None => {
                    sqlx::query("UPDATE tasks SET state = 'finished' WHERE id = $1")
                        .bind(&round.task_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(true)
            })
            .await
    }

    /// Stores a device's metrics for its round; a repeat for the same token is ignored.
    pub async fn insert_metrics(
        &self,
        token_hash: &str,
        round_id: i64,
        loss: f64,
        num_samples: i64,
        accuracy: Option<f64>,
        now_ms: i64,
    ) -> Result<(), DbError> {
        // No NULL is ever bound: through sqlx's Any driver on PostgreSQL, a statement first run with
        // `accuracy` NULL and then with a number on the same connection failed with "incorrect
        // binary data format in bind parameter 5" (found by schemathesis; tests/tests/metrics_reports.rs).
        let query = match accuracy {
            Some(accuracy) => sqlx::query(
                "INSERT INTO metrics (token_hash, round_id, loss, num_samples, accuracy, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (token_hash) DO NOTHING",
            )
            .bind(token_hash)
            .bind(round_id)
            .bind(loss)
            .bind(num_samples)
            .bind(accuracy)
            .bind(now_ms),
            None => sqlx::query(
                "INSERT INTO metrics (token_hash, round_id, loss, num_samples, created_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (token_hash) DO NOTHING",
            )
            .bind(token_hash)
            .bind(round_id)
            .bind(loss)
            .bind(num_samples)
            .bind(now_ms),
        };
        query.execute(&self.pool).await?;
        Ok(())
    }
}

async fn insert_round(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    task_id: &str,
    seq: i64,
    base_version: i64,
    opened_ms: i64,
    deadline_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO rounds (task_id, seq, state, base_version, opened_ms, deadline_ms) \
         VALUES ($1, $2, 'open', $3, $4, $5)",
    )
    .bind(task_id)
    .bind(seq)
    .bind(base_version)
    .bind(opened_ms)
    .bind(deadline_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
