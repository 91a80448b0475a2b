//! Device identity for every task (migration 0008): enrolment keys and device credentials.
//!
//! An operator creates an enrolment key per app release (`<key_id>:<secret>`, 256 random bits,
//! shown once); a device that holds one enrols (`POST /v1/devices`) and gets its own credential
//! `device_id:secret`, valid for every task. Only SHA-256 hashes of secrets are stored, and they
//! are compared in constant time. A task with `require_enrolled_device` admits only devices
//! enrolled with a key that is not revoked; revoking a key or a device holds from the next request,
//! because every check reads the database (nothing is cached).
//!
//! FedLaAvg's per-task enrolment (`POST /v1/tasks/{id}/devices`, no key) also issues a credential
//! here, with no key: that device belongs to that task only (see [`crate::strategy::fedlaavg`]).

use fedhive_shared::wire::{DeviceCredentials, EnrolledDevice, EnrolmentKey, EnrolmentKeyCreated};
use sqlx::{Row, any::AnyRow};
use tracing::info;

use crate::{
    db::{Db, DbError},
    error::ApiError,
    store::{constant_time_eq, now_ms, sha256_hex},
};

/// A device whose credential checked out: enrolled, not revoked, and its key (if any) not revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    /// The enrolment key it enrolled with; `None`: FedLaAvg's per-task enrolment.
    pub key_id: Option<String>,
}

/// Longest enrolment key name accepted.
const MAX_NAME_CHARS: usize = 100;

/// Most devices one `GET /v1/devices` answers with.
pub const MAX_DEVICE_PAGE: i64 = 10_000;

/// A fresh secret (256 random bits, hex) and its stored hash.
pub(crate) fn new_secret() -> (String, String) {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let hash = sha256_hex(secret.as_bytes());
    (secret, hash)
}

/// `id:secret`, split; `None` when there is no colon.
fn split_credential(credential: &str) -> Option<(&str, &str)> {
    credential.split_once(':')
}

/// Creates an enrolment key; the answer is the only place its secret appears.
pub async fn create_key(db: &Db, name: &str) -> Result<EnrolmentKeyCreated, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(format!(
            "`name` must be 1 to {MAX_NAME_CHARS} printable characters, got {name:?}"
        )));
    }
    let key_id = format!("ek-{}", hex::encode(rand::random::<[u8; 8]>()));
    let (secret, hash) = new_secret();
    db.insert_enrolment_key(&key_id, name, &hash, now_ms()).await?;
    info!(key = %key_id, name, "enrolment key created");
    Ok(EnrolmentKeyCreated {
        enrolment_key: format!("{key_id}:{secret}"),
        key_id,
        name: name.to_string(),
    })
}

/// Revokes a key (a repeat changes nothing): it enrols no more devices, and the devices it enrolled
/// are refused from their next request.
pub async fn revoke_key(db: &Db, key_id: &str) -> Result<EnrolmentKey, ApiError> {
    db.revoke_enrolment_key(key_id, now_ms()).await?;
    let key = db
        .enrolment_key(key_id)
        .await?
        .ok_or_else(|| ApiError::UnknownEnrolmentKey(key_id.to_string()))?;
    info!(key = %key_id, "enrolment key revoked");
    Ok(key)
}

/// Enrols a new device with an enrolment key (`<key_id>:<secret>`).
pub async fn enrol(db: &Db, enrolment_key: Option<&str>) -> Result<DeviceCredentials, ApiError> {
    let (key_id, secret) = enrolment_key
        .and_then(split_credential)
        .ok_or(ApiError::EnrolmentKeyUnauthorized)?;
    let key = db
        .enrolment_key_secret(key_id)
        .await?
        .ok_or(ApiError::EnrolmentKeyUnauthorized)?;
    if !constant_time_eq(sha256_hex(secret.as_bytes()).as_bytes(), key.hash.as_bytes()) {
        return Err(ApiError::EnrolmentKeyUnauthorized);
    }
    if key.revoked {
        return Err(ApiError::EnrolmentKeyRevoked(key_id.to_string()));
    }
    let device_id = format!("dv-{}", hex::encode(rand::random::<[u8; 12]>()));
    let (device_secret, hash) = new_secret();
    // Inserted only if the key is still not revoked, so a revocation racing this enrolment wins.
    if !db.insert_device(&device_id, key_id, &hash, now_ms()).await? {
        return Err(ApiError::EnrolmentKeyRevoked(key_id.to_string()));
    }
    info!(key = %key_id, device = %device_id, "device enrolled");
    Ok(DeviceCredentials {
        device_id,
        device_secret,
    })
}

/// Revokes a device (a repeat changes nothing): its credential is refused from its next request.
pub async fn revoke_device(db: &Db, device_id: &str) -> Result<EnrolledDevice, ApiError> {
    db.revoke_device(device_id, now_ms()).await?;
    let device = db
        .enrolled_device(device_id)
        .await?
        .ok_or_else(|| ApiError::UnknownDevice(device_id.to_string()))?;
    info!(device = %device_id, "device revoked");
    Ok(device)
}

/// The device behind a credential `device_id:secret` (`None` without one). A credential that is
/// presented is always checked: wrong is `401 device_unauthorized`, revoked (or enrolled with a
/// revoked key) `403 device_revoked` or `403 enrolment_key_revoked`.
pub async fn authenticate(db: &Db, credential: Option<&str>) -> Result<Option<Device>, ApiError> {
    let Some(credential) = credential else {
        return Ok(None);
    };
    let unknown = || ApiError::DeviceUnauthorized("unknown device or wrong secret".into());
    let (device_id, secret) = split_credential(credential).ok_or_else(|| {
        ApiError::DeviceUnauthorized("a device credential is `device_id:device_secret`".into())
    })?;
    let row = db.device_secret(device_id).await?.ok_or_else(unknown)?;
    if !constant_time_eq(sha256_hex(secret.as_bytes()).as_bytes(), row.hash.as_bytes()) {
        return Err(unknown());
    }
    if row.revoked {
        return Err(ApiError::DeviceRevoked(device_id.to_string()));
    }
    if let (Some(key_id), true) = (&row.key_id, row.key_revoked) {
        return Err(ApiError::EnrolmentKeyRevoked(key_id.clone()));
    }
    Ok(Some(Device {
        id: device_id.to_string(),
        key_id: row.key_id,
    }))
}

/// A stored hash with what decides whether it still counts.
struct StoredSecret {
    hash: String,
    revoked: bool,
    key_id: Option<String>,
    key_revoked: bool,
}

fn enrolment_key_row(r: &AnyRow) -> Result<EnrolmentKey, sqlx::Error> {
    Ok(EnrolmentKey {
        key_id: r.try_get("key_id")?,
        name: r.try_get("name")?,
        created_ms: r.try_get("created_ms")?,
        revoked_ms: r.try_get("revoked_ms")?,
        devices: r.try_get("devices")?,
    })
}

fn device_row(r: &AnyRow) -> Result<EnrolledDevice, sqlx::Error> {
    Ok(EnrolledDevice {
        device_id: r.try_get("device_id")?,
        key_id: r.try_get("key_id")?,
        enrolled_ms: r.try_get("enrolled_ms")?,
        revoked_ms: r.try_get("revoked_ms")?,
    })
}

const KEY_COLUMNS: &str = "k.key_id, k.name, k.created_ms, k.revoked_ms, \
     (SELECT COUNT(*) FROM devices d WHERE d.key_id = k.key_id) AS devices";

impl Db {
    async fn insert_enrolment_key(
        &self,
        key_id: &str,
        name: &str,
        key_hash: &str,
        now_ms: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO enrolment_keys (key_id, name, key_hash, created_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(key_id)
        .bind(name)
        .bind(key_hash)
        .bind(now_ms)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Every enrolment key, oldest first.
    pub async fn enrolment_keys(&self) -> Result<Vec<EnrolmentKey>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM enrolment_keys k ORDER BY k.created_ms, k.key_id"
        )))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(enrolment_key_row).collect::<Result<_, _>>()?)
    }

    async fn enrolment_key(&self, key_id: &str) -> Result<Option<EnrolmentKey>, DbError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM enrolment_keys k WHERE k.key_id = $1"
        )))
        .bind(key_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(enrolment_key_row).transpose()?)
    }

    async fn enrolment_key_secret(&self, key_id: &str) -> Result<Option<StoredSecret>, DbError> {
        let row = sqlx::query("SELECT key_hash, revoked_ms FROM enrolment_keys WHERE key_id = $1")
            .bind(key_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row
            .map(|r| {
                Ok::<_, sqlx::Error>(StoredSecret {
                    hash: r.try_get("key_hash")?,
                    revoked: r.try_get::<Option<i64>, _>("revoked_ms")?.is_some(),
                    key_id: None,
                    key_revoked: false,
                })
            })
            .transpose()?)
    }

    async fn revoke_enrolment_key(&self, key_id: &str, now_ms: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE enrolment_keys SET revoked_ms = $1 WHERE key_id = $2 AND revoked_ms IS NULL")
            .bind(now_ms)
            .bind(key_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Inserts a device of `key_id` only while that key is not revoked (`false` otherwise), in one
    /// statement, so an enrolment cannot slip past a revocation.
    async fn insert_device(
        &self,
        device_id: &str,
        key_id: &str,
        secret_hash: &str,
        now_ms: i64,
    ) -> Result<bool, DbError> {
        let inserted = sqlx::query(
            "INSERT INTO devices (device_id, key_id, secret_hash, enrolled_ms) \
             SELECT $1, key_id, $2, $3 FROM enrolment_keys WHERE key_id = $4 AND revoked_ms IS NULL",
        )
        .bind(device_id)
        .bind(secret_hash)
        .bind(now_ms)
        .bind(key_id)
        .execute(self.pool())
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn device_secret(&self, device_id: &str) -> Result<Option<StoredSecret>, DbError> {
        let row = sqlx::query(
            "SELECT d.secret_hash, d.revoked_ms, d.key_id, k.revoked_ms AS key_revoked_ms \
             FROM devices d LEFT JOIN enrolment_keys k ON k.key_id = d.key_id WHERE d.device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row
            .map(|r| {
                Ok::<_, sqlx::Error>(StoredSecret {
                    hash: r.try_get("secret_hash")?,
                    revoked: r.try_get::<Option<i64>, _>("revoked_ms")?.is_some(),
                    key_id: r.try_get("key_id")?,
                    key_revoked: r.try_get::<Option<i64>, _>("key_revoked_ms")?.is_some(),
                })
            })
            .transpose()?)
    }

    async fn enrolled_device(&self, device_id: &str) -> Result<Option<EnrolledDevice>, DbError> {
        let row = sqlx::query(
            "SELECT device_id, key_id, enrolled_ms, revoked_ms FROM devices WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(device_row).transpose()?)
    }

    /// Devices by id after `after`, at most `limit`, only those of `key_id` if given.
    pub async fn enrolled_devices(
        &self,
        key_id: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<EnrolledDevice>, DbError> {
        // `$1 IS NULL` on an untyped parameter is ambiguous to PostgreSQL: compare with '' instead.
        let rows = sqlx::query(
            "SELECT device_id, key_id, enrolled_ms, revoked_ms FROM devices \
             WHERE ($1 = '' OR key_id = $1) AND device_id > $2 ORDER BY device_id LIMIT $3",
        )
        .bind(key_id.unwrap_or_default())
        .bind(after.unwrap_or_default())
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(device_row).collect::<Result<_, _>>()?)
    }

    async fn revoke_device(&self, device_id: &str, now_ms: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE devices SET revoked_ms = $1 WHERE device_id = $2 AND revoked_ms IS NULL")
            .bind(now_ms)
            .bind(device_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
