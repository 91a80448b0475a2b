//! FedLaAvg's tables (migration 0003): the task's devices (its population, each mapped to its
//! credential in `devices` since migration 0008), who checked in for a round, the round's
//! least-recently-participated selection, and which device holds which upload token.
//!
//! A device's last participation `R_i` is the `seq` of the latest *committed* round that accepted
//! its update; its latest gradient sum `G_i` is the blob written for that round. Both are derived
//! here rather than stored, so `finish_round`'s transaction (which flips the round to committed)
//! moves every device's pointer at once, and a crash before it leaves all of them where they were.

use sqlx::Row;

use crate::db::{Db, DbError};

/// A round's frozen selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct SelectionRow {
    /// N when the selection was made: the round's `S = T / N` divides by it.
    pub(super) population: i64,
    /// How many devices were picked.
    pub(super) selected: i64,
}

/// A device with its last committed participation before some round (`None`: never).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DeviceParticipation {
    pub(super) device_id: String,
    /// Its credential's id in `devices`.
    pub(super) credential: String,
    pub(super) last_seq: Option<i64>,
}

/// An update a round accepted, with its device and that device's previous participation.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RoundDevice {
    pub(super) device_id: String,
    pub(super) blob_key: String,
    /// `seq` of the device's latest committed round before this one (where its `G_i_old` is).
    pub(super) previous_seq: Option<i64>,
}

/// `MAX(seq)` of the committed rounds, before `$2`, that accepted an update of device `{dev}`.
const LAST_SEQ: &str = "(SELECT MAX(r.seq) FROM fedlaavg_assignments fa \
     JOIN updates u ON u.token_hash = fa.token_hash \
     JOIN rounds r ON r.id = u.round_id \
     WHERE fa.device_id = {dev} AND r.state = 'committed' AND r.seq < $2)";

fn last_seq_sql(template: &'static str, dev: &'static str) -> sqlx::AssertSqlSafe<String> {
    // Only compile-time constants are spliced.
    sqlx::AssertSqlSafe(template.replace("{last_seq}", &LAST_SEQ.replace("{dev}", dev)))
}

impl Db {
    /// Enrols a device in this task only: its credential (no enrolment key) and its row of the
    /// task's population, with the same id, in one transaction.
    pub(super) async fn fedlaavg_enrol(
        &self,
        device_id: &str,
        task_id: &str,
        secret_hash: &str,
        now_ms: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("INSERT INTO devices (device_id, secret_hash, enrolled_ms) VALUES ($1, $2, $3)")
            .bind(device_id)
            .bind(secret_hash)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO fedlaavg_devices (device_id, task_id, enrolled_ms, device) VALUES ($1, $2, $3, $1)",
        )
        .bind(device_id)
        .bind(task_id)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The task's id for the device with credential `device` (`None`: not in the task).
    pub(super) async fn fedlaavg_member(
        &self,
        task_id: &str,
        device: &str,
    ) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT device_id FROM fedlaavg_devices WHERE task_id = $1 AND device = $2")
            .bind(task_id)
            .bind(device)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("device_id")).transpose()?)
    }

    /// Adds the device with credential `device` to the task's population under `pseudonym` (a
    /// repeat, or a race with another of its check-ins, keeps the first), and returns its id there.
    pub(super) async fn fedlaavg_join(
        &self,
        task_id: &str,
        device: &str,
        pseudonym: &str,
        now_ms: i64,
    ) -> Result<String, DbError> {
        sqlx::query(
            "INSERT INTO fedlaavg_devices (device_id, task_id, enrolled_ms, device) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (task_id, device) DO NOTHING",
        )
        .bind(pseudonym)
        .bind(task_id)
        .bind(now_ms)
        .bind(device)
        .execute(self.pool())
        .await?;
        self.fedlaavg_member(task_id, device)
            .await?
            .ok_or_else(|| DbError::Sql(sqlx::Error::RowNotFound))
    }

    /// N: the devices enrolled in the task.
    pub(super) async fn fedlaavg_population(&self, task_id: &str) -> Result<i64, DbError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM fedlaavg_devices WHERE task_id = $1")
            .bind(task_id)
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Every enrolled device of the task with its last committed participation, by device id.
    pub(super) async fn fedlaavg_devices(&self, task_id: &str) -> Result<Vec<DeviceParticipation>, DbError> {
        let rows = sqlx::query(last_seq_sql(
            "SELECT d.device_id, d.device, {last_seq} AS last_seq FROM fedlaavg_devices d \
             WHERE d.task_id = $1 ORDER BY d.device_id",
            "d.device_id",
        ))
        .bind(task_id)
        .bind(i64::MAX)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(DeviceParticipation {
                    device_id: r.try_get("device_id")?,
                    credential: r.try_get("device")?,
                    last_seq: r.try_get("last_seq")?,
                })
            })
            .collect::<Result<_, _>>()?)
    }

    /// Records that the device is available for the round (a repeat is a no-op).
    pub(super) async fn fedlaavg_check_in(
        &self,
        round_id: i64,
        device_id: &str,
        now_ms: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO fedlaavg_checkins (round_id, device_id, checked_in_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (round_id, device_id) DO NOTHING",
        )
        .bind(round_id)
        .bind(device_id)
        .bind(now_ms)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub(super) async fn fedlaavg_selection(&self, round_id: i64) -> Result<Option<SelectionRow>, DbError> {
        let row = sqlx::query("SELECT population, selected FROM fedlaavg_selections WHERE round_id = $1")
            .bind(round_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row
            .map(|r| {
                Ok::<_, sqlx::Error>(SelectionRow {
                    population: r.try_get("population")?,
                    selected: r.try_get("selected")?,
                })
            })
            .transpose()?)
    }

    /// Whether the device was picked for the round (`None`: it did not check in).
    pub(super) async fn fedlaavg_is_selected(
        &self,
        round_id: i64,
        device_id: &str,
    ) -> Result<Option<bool>, DbError> {
        let row =
            sqlx::query("SELECT selected FROM fedlaavg_checkins WHERE round_id = $1 AND device_id = $2")
                .bind(round_id)
                .bind(device_id)
                .fetch_optional(self.pool())
                .await?;
        Ok(row
            .map(|r| r.try_get::<i64, _>("selected").map(|s| s == 1))
            .transpose()?)
    }

    /// Makes the round's selection once: freezes N, and marks the `cap` checked-in devices with the
    /// smallest `R_i` (never participated first), ties broken by device id ascending. A no-op if
    /// the round already has its selection. Returns the selected device ids in selection order
    /// (empty if another caller made the selection).
    pub(super) async fn fedlaavg_select(
        &self,
        round_id: i64,
        round_seq: i64,
        task_id: &str,
        cap: i64,
        now_ms: i64,
    ) -> Result<Vec<String>, DbError> {
        let mut tx = self.pool().begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO fedlaavg_selections (round_id, population, selected, selected_ms) \
             VALUES ($1, (SELECT COUNT(*) FROM fedlaavg_devices WHERE task_id = $2), 0, $3) \
             ON CONFLICT (round_id) DO NOTHING",
        )
        .bind(round_id)
        .bind(task_id)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() != 1 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(last_seq_sql(
            "SELECT c.device_id, {last_seq} AS last_seq FROM fedlaavg_checkins c WHERE c.round_id = $1",
            "c.device_id",
        ))
        .bind(round_id)
        .bind(round_seq)
        .fetch_all(&mut *tx)
        .await?;
        let mut candidates = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<Option<i64>, _>("last_seq")?,
                    r.try_get::<String, _>("device_id")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        // None (never participated) sorts before every Some.
        candidates.sort();
        candidates.truncate(cap.max(0) as usize);
        for (_, device_id) in &candidates {
            sqlx::query("UPDATE fedlaavg_checkins SET selected = 1 WHERE round_id = $1 AND device_id = $2")
                .bind(round_id)
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE fedlaavg_selections SET selected = $1 WHERE round_id = $2")
            .bind(candidates.len() as i64)
            .bind(round_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(candidates.into_iter().map(|(_, d)| d).collect())
    }

    /// Issues the selected device its one upload token of the round, atomically with the round's
    /// assignment count. `false` if the device already holds one, or the round stopped taking
    /// check-ins.
    pub(super) async fn fedlaavg_assign(
        &self,
        round_id: i64,
        device_id: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool().begin().await?;
        let open = sqlx::query(
            "UPDATE rounds SET assigned = assigned + 1 WHERE id = $1 AND state = 'open' AND deadline_ms > $2",
        )
        .bind(round_id)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if open.rows_affected() != 1 {
            return Ok(false);
        }
        // The token's holder is the device's credential (what uploads to a task that requires
        // enrolled devices must present); a second token of the round for it is refused here too.
        let holder = sqlx::query(
            "INSERT INTO assignments (token_hash, round_id, created_ms, device_id) \
             SELECT $1, $2, $3, device FROM fedlaavg_devices WHERE device_id = $4 \
             ON CONFLICT DO NOTHING",
        )
        .bind(token_hash)
        .bind(round_id)
        .bind(now_ms)
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        if holder.rows_affected() != 1 {
            return Ok(false);
        }
        let issued = sqlx::query(
            "INSERT INTO fedlaavg_assignments (token_hash, round_id, device_id) VALUES ($1, $2, $3) \
             ON CONFLICT (round_id, device_id) DO NOTHING",
        )
        .bind(token_hash)
        .bind(round_id)
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        if issued.rows_affected() != 1 {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The round's accepted updates with their devices (by device id), and each device's latest
    /// committed participation before the round.
    pub(super) async fn fedlaavg_round_devices(
        &self,
        round_id: i64,
        round_seq: i64,
    ) -> Result<Vec<RoundDevice>, DbError> {
        let rows = sqlx::query(last_seq_sql(
            "SELECT f.device_id, u.blob_key, {last_seq} AS last_seq FROM updates u \
             JOIN fedlaavg_assignments f ON f.token_hash = u.token_hash \
             WHERE u.round_id = $1 ORDER BY f.device_id",
            "f.device_id",
        ))
        .bind(round_id)
        .bind(round_seq)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(RoundDevice {
                    device_id: r.try_get("device_id")?,
                    blob_key: r.try_get("blob_key")?,
                    previous_seq: r.try_get("last_seq")?,
                })
            })
            .collect::<Result<_, _>>()?)
    }
}
