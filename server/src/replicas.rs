//! Several replicas of the server on one database and one blob store, any of them serving any
//! request: the database is the arbiter, and nothing that matters lives in one process.
//!
//! What each process holds, and why that is enough:
//! - **Acceptance** is the database's: an update's row (token hash as primary key) commits with the
//!   round's counter, and its blob is written before, under a key that names its digest, with a
//!   conditional put. Two replicas taking the same retried upload at once store one row; the other
//!   answers with the stored receipt or `conflicting_retry`. (Each process also refuses a token it is
//!   still uploading, `upload_in_flight`: a courtesy, not a guard.)
//! - **Running sums** are per replica: each folds the updates it accepted (the row names it). When a
//!   round closes, the replicas that are not finalising it hand their sums over ([`publish_partial`]:
//!   a blob of fixed-point sums and a row listing the tokens folded in). Integer sums are associative,
//!   so the finaliser's merge equals one process's fold bit for bit; it decodes again from the stored
//!   blobs only the updates that no live replica's sums cover (a replica that died, or restarted).
//! - **Finalising** takes a lease on the round's row ([`claim_finalisation`]): one replica finalises at
//!   a time, and when it dies, another takes over once the lease runs out and commits the same bits
//!   (the result is a function of the frozen accepted set; `finish_round` applies once).
//! - **Liveness**: each replica stamps its row in `replicas` every second ([`heartbeat`]); a
//!   finaliser waits for the sums of replicas seen within [`LIVE_WITHIN`] only.
//!
//! - **FedSubAvg's row tables**: each replica reads rows from its own copy ([`crate::tables`]), a
//!   cache that it brings up to the committed version from the table history in the blob store
//!   (snapshots and per-version journals) before it serves rows or finalises; heat is frozen by the
//!   round's row, which an enrolment's transaction takes.
//!
//! Rate limits and caches stay per process.

use std::{collections::BTreeSet, time::Duration};

use bytes::Bytes;
use sqlx::Row;

use crate::{
    db::{Db, DbError},
    error::ApiError,
    store::Store,
    strategy::interface::Sums,
};

/// A replica whose heartbeat is older than this is taken for dead: its sums are rebuilt from the
/// stored updates rather than waited for.
pub const LIVE_WITHIN: Duration = Duration::from_secs(3);

/// How often a replica stamps its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A replica not seen for this long is forgotten: its row is deleted, so restarts and scaling do
/// not grow the table without end. Nothing else refers to the row (a finaliser only asks which
/// replicas are live, and a dead one's updates are re-read whatever its row says).
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// This process among the replicas: the operator's name for it (`--replica-name`, default the
/// host name; distinct per replica) and a random incarnation, so a restarted replica is a new one
/// (its sums died with it).
#[derive(Debug, Clone)]
pub struct Replica {
    id: String,
    name: String,
}

impl Replica {
    pub fn new(name: Option<&str>) -> Replica {
        let name = name.map_or_else(default_name, str::to_string);
        // Blob keys carry the id: keep it to characters any store takes.
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Replica {
            id: format!("{safe}-{:08x}", rand::random::<u32>()),
            name,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fedhive".into())
}

/// Stamps this replica as alive now, and forgets the replicas not seen for [`FORGET_AFTER`].
pub async fn heartbeat(db: &Db, replica: &Replica, now_ms: i64) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO replicas (id, name, seen_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET seen_ms = excluded.seen_ms",
    )
    .bind(&replica.id)
    .bind(&replica.name)
    .bind(now_ms)
    .execute(db.pool())
    .await?;
    sqlx::query("DELETE FROM replicas WHERE seen_ms < $1")
        .bind(now_ms - FORGET_AFTER.as_millis() as i64)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Replicas seen since `since_ms`, except `me`'s earlier incarnations (a replica restarted under
/// its name knows its predecessor is dead, however recently it was seen).
pub async fn live_replicas(db: &Db, me: &Replica, since_ms: i64) -> Result<BTreeSet<String>, DbError> {
    let rows = sqlx::query("SELECT id FROM replicas WHERE seen_ms >= $1 AND (name <> $2 OR id = $3)")
        .bind(since_ms)
        .bind(&me.name)
        .bind(&me.id)
        .fetch_all(db.pool())
        .await?;
    Ok(rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?)
}

/// The replica that last took the lease to finalise the round (its lease may have run out).
pub async fn finaliser(db: &Db, round_id: i64) -> Result<Option<String>, DbError> {
    let row = sqlx::query("SELECT finaliser FROM rounds WHERE id = $1")
        .bind(round_id)
        .fetch_optional(db.pool())
        .await?;
    Ok(match row {
        Some(row) => row.try_get("finaliser")?,
        None => None,
    })
}

/// Takes or renews the lease to finalise a closing round until `until_ms`: true if this replica
/// holds it now (it was free, expired, or already this replica's).
pub async fn claim_finalisation(
    db: &Db,
    round_id: i64,
    replica: &Replica,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "UPDATE rounds SET finaliser = $1, finaliser_until = $2 \
         WHERE id = $3 AND state = 'closing' \
           AND (finaliser IS NULL OR finaliser = $1 OR finaliser_until < $4)",
    )
    .bind(&replica.id)
    .bind(until_ms)
    .bind(round_id)
    .bind(now_ms)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One replica's sums of a closing round, as it handed them over.
#[derive(Debug, Clone)]
pub struct Partial {
    pub replica: String,
    pub blob_key: String,
    pub tokens: BTreeSet<String>,
}

fn partial_key(round_id: i64, replica: &Replica) -> String {
    // Under the round's update folder, so they go when the round's updates go.
    format!("updates/{round_id}/partials/{}.sums", replica.id)
}

/// Hands this replica's sums of a closing round to its finaliser: the blob first, then the row that
/// names it and the tokens it holds, only while the round is still closing. False if nothing was
/// handed over (the round had moved on, or this replica had handed sums over already: the first
/// stands, and what a later one would have held is read from the stored updates).
pub async fn publish_partial(
    store: &Store,
    round_id: i64,
    replica: &Replica,
    sums: &Sums,
    tokens: &BTreeSet<String>,
    now_ms: i64,
) -> Result<bool, ApiError> {
    let bytes = sums.to_bytes();
    let key = partial_key(round_id, replica);
    if !store.blobs.put_new(&key, Bytes::from(bytes)).await? {
        return Ok(false);
    }
    let tokens_json = serde_json::to_string(tokens).expect("strings serialise");
    let inserted = sqlx::query(
        "INSERT INTO round_partials (round_id, replica, blob_key, tokens, created_ms) \
         SELECT CAST($1 AS BIGINT), $2, $3, $4, CAST($5 AS BIGINT) WHERE EXISTS (SELECT 1 FROM rounds WHERE id = $1 AND state = 'closing') \
         ON CONFLICT (round_id, replica) DO NOTHING",
    )
    .bind(round_id)
    .bind(&replica.id)
    .bind(&key)
    .bind(&tokens_json)
    .bind(now_ms)
    .execute(store.db.pool())
    .await?;
    if inserted.rows_affected() == 0 {
        // Finalised meanwhile: nothing will read the blob.
        store.blobs.delete(&key).await?;
        return Ok(false);
    }
    Ok(true)
}

/// The sums replicas handed over for a round, in replica order.
pub async fn partials(db: &Db, round_id: i64) -> Result<Vec<Partial>, ApiError> {
    let rows = sqlx::query(
        "SELECT replica, blob_key, tokens FROM round_partials WHERE round_id = $1 ORDER BY replica",
    )
    .bind(round_id)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let tokens: String = r.try_get("tokens")?;
            Ok(Partial {
                replica: r.try_get("replica")?,
                blob_key: r.try_get("blob_key")?,
                tokens: serde_json::from_str(&tokens)
                    .map_err(|e| ApiError::Internal(format!("partial sums' token list: {e}")))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn count(db: &Db) -> i64 {
        sqlx::query("SELECT COUNT(*) AS n FROM replicas")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .get("n")
    }

    #[tokio::test]
    async fn a_replica_unseen_for_an_hour_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("db.sqlite").display());
        let db = Db::connect(&url).await.unwrap();
        let (gone, stays, beating) = (
            Replica::new(Some("gone")),
            Replica::new(Some("stays")),
            Replica::new(Some("beating")),
        );
        let hour = FORGET_AFTER.as_millis() as i64;
        heartbeat(&db, &gone, 1_000).await.unwrap();
        heartbeat(&db, &stays, 2_000).await.unwrap();
        heartbeat(&db, &beating, 1_000 + hour).await.unwrap();
        // `gone` was last seen just over an hour before this beat, `stays` just under.
        heartbeat(&db, &beating, 1_001 + hour).await.unwrap();
        assert_eq!(count(&db).await, 2);
        let known = live_replicas(&db, &beating, 0).await.unwrap();
        assert_eq!(known, BTreeSet::from([stays.id.clone(), beating.id.clone()]));
    }
}
