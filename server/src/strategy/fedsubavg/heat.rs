//! FedSubAvg's SQL: device enrolments (`sparse_devices`), per-row heat (`sparse_heat`) and the
//! population (`sparse_population`).

use std::collections::{BTreeMap, HashMap};

use fedhive_shared::fedsubavg::Heat;
use sqlx::{AnyPool, Row};

use crate::db::DbError;

/// What an enrolment did.
pub(super) enum Enrolled {
    /// Whether anything changed, and the population afterwards.
    Done { changed: bool, population: Heat },
    /// Nothing: the task's round (this id) is being finalised, and heat is frozen until it ends.
    RoundClosing(i64),
}

/// Inserts or updates a device's enrolment and moves heat and population by the difference, in one
/// transaction, unless the task's round is closing.
pub(super) async fn enrol_device(
    pool: &AnyPool,
    task_id: &str,
    device_id: &str,
    num_samples: u64,
    rows: &BTreeMap<String, Vec<u64>>,
    now_ms: i64,
) -> Result<Enrolled, DbError> {
    let features = serde_json::to_string(rows)?;
    let mut tx = pool.begin().await?;
    // A finaliser reads heat after closing the round, on whichever replica: this no-op update takes
    // the round's row lock (PostgreSQL) or the write lock (SQLite), so an enrolment either commits
    // before the close or sees it.
    let round = sqlx::query(
        "UPDATE rounds SET state = state WHERE task_id = $1 AND state IN ('open', 'closing') RETURNING id, state",
    )
    .bind(task_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(round) = round
        && round.try_get::<String, _>("state")? == "closing"
    {
        return Ok(Enrolled::RoundClosing(round.try_get("id")?));
    }
    let old =
        sqlx::query("SELECT num_samples, features FROM sparse_devices WHERE task_id = $1 AND device_id = $2")
            .bind(task_id)
            .bind(device_id)
            .fetch_optional(&mut *tx)
            .await?;
    let old: Option<(i64, BTreeMap<String, Vec<u64>>)> = match old {
        Some(r) => Some((
            r.try_get("num_samples")?,
            serde_json::from_str(&r.try_get::<String, _>("features")?)?,
        )),
        None => None,
    };
    let new_n = num_samples as i64;
    if let Some((n, set)) = &old
        && *n == new_n
        && set == rows
    {
        tx.commit().await?;
        return Ok(Enrolled::Done {
            changed: false,
            population: read_population(pool, task_id).await?,
        });
    }
    // Per (table, row): change in devices and samples. A kept row only moves by the sample change.
    let mut delta: BTreeMap<(&str, u64), (i64, i64)> = BTreeMap::new();
    if let Some((n, set)) = &old {
        for (table, ids) in set {
            for &id in ids {
                let e = delta.entry((table.as_str(), id)).or_default();
                e.0 -= 1;
                e.1 -= n;
            }
        }
    }
    for (table, ids) in rows {
        for &id in ids {
            let e = delta.entry((table.as_str(), id)).or_default();
            e.0 += 1;
            e.1 += new_n;
        }
    }
    let changes: Vec<_> = delta.into_iter().filter(|(_, d)| *d != (0, 0)).collect();
    for chunk in changes.chunks(200) {
        // Only integers are spliced into the SQL; the task id and table names are bound.
        let mut values = Vec::with_capacity(chunk.len());
        let mut tables: Vec<&str> = Vec::new();
        for ((table, id), (d, s)) in chunk {
            let idx = match tables.iter().position(|t| t == table) {
                Some(i) => i,
                None => {
                    tables.push(*table);
                    tables.len() - 1
                }
            };
            values.push(format!("($1, ${}, {id}, {d}, {s})", idx + 2));
        }
        let statement = format!(
            "INSERT INTO sparse_heat (task_id, table_name, row_id, devices, samples) VALUES {} \
             ON CONFLICT (task_id, table_name, row_id) DO UPDATE SET \
             devices = sparse_heat.devices + excluded.devices, samples = sparse_heat.samples + excluded.samples",
            values.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statement)).bind(task_id);
        for t in tables {
            query = query.bind(t);
        }
        query.execute(&mut *tx).await?;
    }
    // Rows the device dropped may now be held by nobody: remove them (only those, not a scan).
    let mut dropped: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((table, id), (d, _)) in &changes {
        if *d < 0 {
            dropped.entry(table).or_default().push(id.to_string());
        }
    }
    for (table, ids) in dropped {
        for chunk in ids.chunks(500) {
            let statement = format!(
                "DELETE FROM sparse_heat WHERE task_id = $1 AND table_name = $2 AND devices = 0 AND row_id IN ({})",
                chunk.join(", ")
            );
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(task_id)
                .bind(table)
                .execute(&mut *tx)
                .await?;
        }
    }
    let (new_device, old_n) = match &old {
        Some((n, _)) => (0i64, *n),
        None => (1, 0),
    };
    sqlx::query(
        "INSERT INTO sparse_population (task_id, devices, samples) VALUES ($1, $2, $3) \
         ON CONFLICT (task_id) DO UPDATE SET devices = sparse_population.devices + excluded.devices, \
         samples = sparse_population.samples + excluded.samples",
    )
    .bind(task_id)
    .bind(new_device)
    .bind(new_n - old_n)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO sparse_devices (task_id, device_id, num_samples, features, updated_ms) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (task_id, device_id) DO UPDATE SET num_samples = excluded.num_samples, \
         features = excluded.features, updated_ms = excluded.updated_ms",
    )
    .bind(task_id)
    .bind(device_id)
    .bind(new_n)
    .bind(&features)
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Enrolled::Done {
        changed: true,
        population: read_population(pool, task_id).await?,
    })
}

pub(super) async fn read_population(pool: &AnyPool, task_id: &str) -> Result<Heat, DbError> {
    let row = sqlx::query("SELECT devices, samples FROM sparse_population WHERE task_id = $1")
        .bind(task_id)
        .fetch_optional(pool)
        .await?;
    Ok(match row {
        Some(r) => Heat {
            devices: r.try_get::<i64, _>("devices")? as u64,
            samples: r.try_get::<i64, _>("samples")? as u64,
        },
        None => Heat::default(),
    })
}

/// Heat of the given rows; rows nobody holds are absent from the map.
pub(super) async fn read_heat(
    pool: &AnyPool,
    task_id: &str,
    table: &str,
    ids: &[u64],
) -> Result<HashMap<u64, Heat>, DbError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
        // Only integers (row ids) are spliced into the SQL.
        let statement = format!(
            "SELECT row_id, devices, samples FROM sparse_heat WHERE task_id = $1 AND table_name = $2 AND row_id IN ({})",
            list.join(", ")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(task_id)
            .bind(table)
            .fetch_all(pool)
            .await?;
        for r in rows {
            let id = r.try_get::<i64, _>("row_id")? as u64;
            let heat = Heat {
                devices: r.try_get::<i64, _>("devices")? as u64,
                samples: r.try_get::<i64, _>("samples")? as u64,
            };
            out.insert(id, heat);
        }
    }
    Ok(out)
}
