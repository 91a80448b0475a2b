//! The tables of migration 0007: named operator tokens and the audit log.

use fedhive_shared::wire::{AuditEntry, NewToken, TokenInfo, TokenScope};
use sqlx::{Row, any::AnyRow};

use super::{Action, Principal};
use crate::db::{Db, DbError};

/// Characters of a target kept in the audit log.
const TARGET_CHARS: usize = 200;

/// One line of the audit log, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub actor: String,
    pub action: Action,
    pub target: String,
    /// `ok`, or the error code the action was refused with.
    pub outcome: String,
}

impl AuditRecord {
    /// `who` did `action` to `target`.
    pub fn ok(who: &Principal, action: Action, target: &str) -> Self {
        AuditRecord {
            actor: who.actor(),
            action,
            // A target comes from a request path or body: its first characters are enough.
            target: target.chars().take(TARGET_CHARS).collect(),
            outcome: "ok".into(),
        }
    }

    /// `who` tried `action` on `target` and was refused with `code`.
    pub fn refused(who: &Principal, action: Action, target: &str, code: &str) -> Self {
        AuditRecord {
            outcome: code.to_string(),
            ..Self::ok(who, action, target)
        }
    }
}

/// Writes `record` within `tx`, so it commits with the change it describes, or not at all.
pub(crate) async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    record: &AuditRecord,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit_log (at_ms, actor, action, target, outcome) VALUES ($1, $2, $3, $4, $5)")
        .bind(at_ms)
        .bind(&record.actor)
        .bind(record.action.name())
        .bind(&record.target)
        .bind(&record.outcome)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A named token that is not revoked, as the request check reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveToken {
    pub name: String,
    pub token_hash: String,
    pub scope: TokenScope,
    pub task_id: Option<String>,
    pub last_used_ms: Option<i64>,
}

const TOKEN_COLUMNS: &str = "name, scope, task_id, created_by, created_ms, revoked_ms, last_used_ms";

fn scope(r: &AnyRow) -> Result<TokenScope, DbError> {
    let name: String = r.try_get("scope")?;
    TokenScope::from_name(&name).ok_or_else(|| {
        DbError::Sql(sqlx::Error::Decode(
            format!("unknown token scope `{name}`").into(),
        ))
    })
}

fn token_info(r: &AnyRow) -> Result<TokenInfo, DbError> {
    Ok(TokenInfo {
        name: r.try_get("name")?,
        scope: scope(r)?,
        task_id: r.try_get("task_id")?,
        created_by: r.try_get("created_by")?,
        created_ms: r.try_get("created_ms")?,
        revoked_ms: r.try_get("revoked_ms")?,
        last_used_ms: r.try_get("last_used_ms")?,
    })
}

impl Db {
    /// Writes `record` on its own, for an action that is not one transaction or was refused.
    pub async fn record_audit(&self, record: &AuditRecord, at_ms: i64) -> Result<(), DbError> {
        let mut tx = self.pool().begin().await?;
        insert_audit(&mut tx, record, at_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    /// At most `limit` audit entries, newest first, older than entry `before` if given.
    pub async fn audit_log(&self, limit: i64, before: Option<i64>) -> Result<Vec<AuditEntry>, DbError> {
        // Two statements rather than a NULL-able bind (see `Db::insert_metrics`).
        let query = match before {
            Some(before) => sqlx::query(
                "SELECT id, at_ms, actor, action, target, outcome FROM audit_log \
                 WHERE id < $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(before)
            .bind(limit),
            None => sqlx::query(
                "SELECT id, at_ms, actor, action, target, outcome FROM audit_log ORDER BY id DESC LIMIT $1",
            )
            .bind(limit),
        };
        let rows = query.fetch_all(self.pool()).await?;
        let entry = |r: &AnyRow| -> Result<AuditEntry, sqlx::Error> {
            Ok(AuditEntry {
                id: r.try_get("id")?,
                at_ms: r.try_get("at_ms")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                target: r.try_get("target")?,
                outcome: r.try_get("outcome")?,
            })
        };
        Ok(rows.iter().map(entry).collect::<Result<_, _>>()?)
    }

    /// Stores a new token (its hash only) and its audit line in one transaction; `None` if the
    /// name is taken (by a live or a revoked token).
    pub async fn create_operator_token(
        &self,
        new: &NewToken,
        token_hash: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<Option<TokenInfo>, DbError> {
        let mut tx = self.pool().begin().await?;
        // Two statements rather than a NULL-able bind (see `Db::insert_metrics`).
        let insert = match &new.task_id {
            Some(task_id) => sqlx::query(
                "INSERT INTO operator_tokens (name, token_hash, scope, task_id, created_by, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
            )
            .bind(&new.name)
            .bind(token_hash)
            .bind(new.scope.name())
            .bind(task_id)
            .bind(&audit.actor)
            .bind(now_ms),
            None => sqlx::query(
                "INSERT INTO operator_tokens (name, token_hash, scope, created_by, created_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
            )
            .bind(&new.name)
            .bind(token_hash)
            .bind(new.scope.name())
            .bind(&audit.actor)
            .bind(now_ms),
        };
        if insert.execute(&mut *tx).await?.rows_affected() != 1 {
            return Ok(None);
        }
        insert_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(Some(TokenInfo {
            name: new.name.clone(),
            scope: new.scope,
            task_id: new.task_id.clone(),
            created_by: audit.actor.clone(),
            created_ms: now_ms,
            revoked_ms: None,
            last_used_ms: None,
        }))
    }

    /// Every named token, revoked ones included, oldest first.
    pub async fn operator_tokens(&self) -> Result<Vec<TokenInfo>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM operator_tokens ORDER BY created_ms, name"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(token_info).collect()
    }

    /// Revokes the named token (again is a no-op that keeps the first time) with its audit line, in
    /// one transaction; `None` if no token has that name.
    pub async fn revoke_operator_token(
        &self,
        name: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<Option<TokenInfo>, DbError> {
        let mut tx = self.pool().begin().await?;
        let done =
            sqlx::query("UPDATE operator_tokens SET revoked_ms = COALESCE(revoked_ms, $1) WHERE name = $2")
                .bind(now_ms)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        insert_audit(&mut tx, audit, now_ms).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM operator_tokens WHERE name = $1"
        )))
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(token_info(&row)?))
    }

    /// The live (not revoked) token whose SHA-256 is `token_hash`.
    pub async fn active_operator_token(&self, token_hash: &str) -> Result<Option<ActiveToken>, DbError> {
        let row = sqlx::query(
            "SELECT name, token_hash, scope, task_id, last_used_ms FROM operator_tokens \
             WHERE token_hash = $1 AND revoked_ms IS NULL",
        )
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        Ok(Some(ActiveToken {
            name: r.try_get("name")?,
            token_hash: r.try_get("token_hash")?,
            scope: scope(&r)?,
            task_id: r.try_get("task_id")?,
            last_used_ms: r.try_get("last_used_ms")?,
        }))
    }

    /// Records that the named token was just used.
    pub async fn touch_operator_token(&self, name: &str, now_ms: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE operator_tokens SET last_used_ms = $1 WHERE name = $2")
            .bind(now_ms)
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
