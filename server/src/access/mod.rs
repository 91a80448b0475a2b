//! Who may call the operator and cloud-worker routes, and the audit log of what they changed.
//!
//! Credentials: the bootstrap admin token (`--admin-token`, compared in constant time, never
//! stored), named tokens with one [`TokenScope`] each (`fedhive token create`; 256 random bits,
//! only their SHA-256 in the `operator_tokens` table, looked up on every request so a revocation
//! holds from the next one), and a DC-CCL task's own worker token (see
//! [`crate::strategy::dc_ccl`]). A [`Principal`] is who a request's credential names; a [`Need`]
//! is what a route requires of it.
//!
//! Only the admin creates, lists and revokes tokens: an `operator` token cannot mint itself a
//! lasting credential or revoke the one investigating it. Every operator action (task create,
//! pause, resume, cancel; token create, revoke; a cloud worker's contribution and control model)
//! is written to `audit_log`, a success in the transaction that makes the change where the change
//! is one transaction, a refusal right after it. Requests refused for their credential (`401`,
//! `403`) are counted in `/metrics` and logged, not written to the table: anyone can send them, and
//! a row per request would let them fill the database.

pub(crate) mod db;

use fedhive_shared::wire::TokenScope;

use crate::{error::ApiError, store::sha256_hex};

pub use db::AuditRecord;

/// Who a request's credential names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The bootstrap `--admin-token`: everything.
    Admin,
    /// No admin token configured (`--insecure-dev`): every operator route, without a token.
    InsecureDev,
    /// A named token that is not revoked.
    Token {
        name: String,
        scope: TokenScope,
        /// The task of a `cloud-worker` token.
        task_id: Option<String>,
    },
    /// The worker token a DC-CCL task was created with, valid for that task only.
    TaskWorker(String),
}

/// What a route requires of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Read operator data (`GET` routes, FedSubAvg heat, `/metrics`, the audit log).
    Read,
    /// Change tasks, and who may take part in them (enrolment keys, devices).
    Operate,
    /// Create, list or revoke named tokens.
    Admin,
    /// Act as this DC-CCL task's cloud worker.
    Worker(&'a str),
}

impl Need<'_> {
    /// The scope that grants it, for the `403 forbidden` message.
    pub fn scope_needed(&self) -> String {
        match self {
            Need::Read => "read-only or operator".into(),
            Need::Operate => "operator".into(),
            Need::Admin => "the admin token".into(),
            Need::Worker(task) => format!("cloud-worker for task `{task}`"),
        }
    }
}

impl Principal {
    /// Whether this caller may do what `need` names.
    pub fn allows(&self, need: Need<'_>) -> bool {
        use TokenScope::*;
        match (self, need) {
            // The admin is an operator, not a task's worker: workers keep their own credential.
            (Principal::Admin | Principal::InsecureDev, Need::Worker(_)) => false,
            (Principal::Admin | Principal::InsecureDev, _) => true,
            (Principal::TaskWorker(own), Need::Worker(task)) => own == task,
            (Principal::TaskWorker(_), _) => false,
            (Principal::Token { scope, task_id, .. }, need) => match (scope, need) {
                (ReadOnly | Operator, Need::Read) => true,
                (Operator, Need::Operate) => true,
                (CloudWorker, Need::Worker(task)) => task_id.as_deref() == Some(task),
                _ => false,
            },
        }
    }

    /// How the audit log names this caller: never a token, only a name.
    pub fn actor(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::InsecureDev => "insecure-dev".into(),
            Principal::Token { name, .. } => name.clone(),
            Principal::TaskWorker(task) => format!("task-worker:{task}"),
        }
    }

    /// `Ok` if this caller may do what `need` names, else `403 forbidden` naming the scope.
    pub fn require(&self, need: Need<'_>) -> Result<(), ApiError> {
        if self.allows(need) {
            return Ok(());
        }
        let who = match self {
            Principal::Token { name, scope, .. } => format!("token `{name}` (scope {})", scope.name()),
            other => format!("`{}`", other.actor()),
        };
        Err(ApiError::Forbidden {
            who,
            needed: need.scope_needed(),
        })
    }
}

/// An operator action, as the audit log spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    TaskCreate,
    TaskPause,
    TaskResume,
    TaskCancel,
    TokenCreate,
    TokenRevoke,
    /// A DC-CCL cloud worker's contribution to a round.
    CloudUpdate,
    /// A DC-CCL cloud worker's new control model version, which every device then trains against.
    CloudControlModel,
    /// An anonymous-embeddings cloud worker's model for a round, which the round commits.
    CloudRoundModel,
    EnrolmentKeyCreate,
    EnrolmentKeyRevoke,
    DeviceRevoke,
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::TaskCreate => "task.create",
            Action::TaskPause => "task.pause",
            Action::TaskResume => "task.resume",
            Action::TaskCancel => "task.cancel",
            Action::TokenCreate => "token.create",
            Action::TokenRevoke => "token.revoke",
            Action::CloudUpdate => "cloud.update",
            Action::CloudControlModel => "cloud.control_model",
            Action::CloudRoundModel => "cloud.round_model",
            Action::EnrolmentKeyCreate => "enrolment_key.create",
            Action::EnrolmentKeyRevoke => "enrolment_key.revoke",
            Action::DeviceRevoke => "device.revoke",
        }
    }
}

/// Names that the audit log uses for callers without a named token.
const RESERVED_NAMES: [&str; 2] = ["admin", "insecure-dev"];

/// Checks a new token's name: 1 to 64 of `[A-Za-z0-9._-]`, the first a letter or digit, not reserved.
pub fn check_token_name(name: &str) -> Result<(), ApiError> {
    let well_formed = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !well_formed {
        return Err(ApiError::InvalidRequest(format!(
            "token name `{name}`: use 1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        )));
    }
    if RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(ApiError::InvalidRequest(format!(
            "token name `{name}` is reserved (the audit log uses it for callers without a named token)"
        )));
    }
    Ok(())
}

/// A new named token and the hash stored for it: 256 random bits, hex, after a `fho_` prefix that
/// secret scanners and people can recognise.
pub fn new_operator_token() -> (String, String) {
    let token = format!("fho_{}", hex::encode(rand::random::<[u8; 32]>()));
    let hash = sha256_hex(token.as_bytes());
    (token, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(scope: TokenScope, task: Option<&str>) -> Principal {
        Principal::Token {
            name: "t".into(),
            scope,
            task_id: task.map(str::to_string),
        }
    }

    #[test]
    fn each_scope_allows_what_it_names_and_nothing_more() {
        let read_only = token(TokenScope::ReadOnly, None);
        let operator = token(TokenScope::Operator, None);
        let worker = token(TokenScope::CloudWorker, Some("t-a"));
        let own_worker = Principal::TaskWorker("t-a".into());
        let needs = [
            Need::Read,
            Need::Operate,
            Need::Admin,
            Need::Worker("t-a"),
            Need::Worker("t-b"),
        ];
        let allowed = |p: &Principal| needs.map(|n| p.allows(n));
        assert_eq!(allowed(&Principal::Admin), [true, true, true, false, false]);
        assert_eq!(allowed(&Principal::InsecureDev), [true, true, true, false, false]);
        assert_eq!(allowed(&read_only), [true, false, false, false, false]);
        assert_eq!(allowed(&operator), [true, true, false, false, false]);
        assert_eq!(allowed(&worker), [false, false, false, true, false]);
        assert_eq!(allowed(&own_worker), [false, false, false, true, false]);
    }

    #[test]
    fn a_missing_scope_is_a_403_naming_it() {
        let e = token(TokenScope::ReadOnly, None)
            .require(Need::Operate)
            .unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (403, "forbidden"));
        let message = e.to_string();
        assert!(
            message.contains("read-only") && message.contains("needs operator"),
            "{message}"
        );
        let e = token(TokenScope::CloudWorker, Some("t-a"))
            .require(Need::Worker("t-b"))
            .unwrap_err();
        assert!(e.to_string().contains("cloud-worker for task `t-b`"), "{e}");
    }

    #[test]
    fn the_audit_log_names_callers_without_secrets() {
        assert_eq!(Principal::Admin.actor(), "admin");
        assert_eq!(Principal::TaskWorker("t-a".into()).actor(), "task-worker:t-a");
        assert_eq!(token(TokenScope::Operator, None).actor(), "t");
    }

    #[test]
    fn token_names() {
        for good in ["ci", "alice.ro", "grafana_1", "A-9"] {
            check_token_name(good).unwrap();
        }
        let too_long = "a".repeat(65);
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a:b",
            "admin",
            "Admin",
            "insecure-dev",
            too_long.as_str(),
        ] {
            assert!(check_token_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn new_tokens_are_256_random_bits_stored_hashed() {
        let (a, hash) = new_operator_token();
        let (b, _) = new_operator_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(hash, sha256_hex(a.as_bytes()));
        assert!(!hash.contains(&a[4..]));
    }
}
