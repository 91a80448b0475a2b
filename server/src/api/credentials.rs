//! Named operator tokens (`/v1/tokens`, the admin's alone) and the audit log (`/v1/audit`).

use axum::{Json, extract::State, http::HeaderMap, http::StatusCode};
use fedhive_shared::wire::{AuditEntry, ErrorBody, NewToken, TokenCreated, TokenInfo, TokenScope};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{ApiJson, ApiPath, ApiQuery, AppState, authorize};
use crate::{
    access::{Action, AuditRecord, Need, Principal, check_token_name, new_operator_token},
    error::ApiError,
    store::now_ms,
    strategy::{anon_embeddings::AnonEmbeddings, dc_ccl::DcCcl},
};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
        .routes(routes!(audit_log))
}

/// Creates a named token with one scope; the answer holds the token, the only time it is shown
/// (only its SHA-256 is stored).
#[utoipa::path(post, path = "/v1/tokens", tag = "access", security(("admin" = ["admin"])),
    request_body = NewToken,
    responses(
        (status = 201, description = "created", body = TokenCreated),
        (status = 400, description = "`invalid_request`: the body, the name, or `task_id` missing for `cloud-worker` or given for another scope", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: only the admin token creates tokens", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_dc_ccl` (a `cloud-worker` token's task has no cloud worker: neither DC-CCL nor anonymous embeddings)", body = ErrorBody),
        (status = 409, description = "`token_name_taken`: names are not reused, even after a revocation", body = ErrorBody),
    ))]
async fn create_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(new): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let who = authorize(&state, &headers, Need::Admin).await?;
    let created = create(&state, &who, &new).await;
    state
        .audit_after(&who, Action::TokenCreate, &new.name, &created, false)
        .await;
    Ok((StatusCode::CREATED, Json(created?)))
}

async fn create(state: &AppState, who: &Principal, new: &NewToken) -> Result<TokenCreated, ApiError> {
    check_token_name(&new.name)?;
    match (new.scope, &new.task_id) {
        (TokenScope::CloudWorker, Some(task_id)) => {
            // A task with a cloud worker: anonymous embeddings, else DC-CCL (whose refusal,
            // `not_dc_ccl`, clients may already match on).
            let store = state.coordinator.store();
            match state.strategy::<AnonEmbeddings>()?.task(store, task_id).await {
                Ok(_) => {}
                Err(ApiError::NotAnonEmbeddings(_)) => {
                    state.strategy::<DcCcl>()?.task(store, task_id).await?;
                }
                Err(e) => return Err(e),
            }
        }
        (TokenScope::CloudWorker, None) => {
            return Err(ApiError::InvalidRequest(
                "`task_id` is required for scope cloud-worker".into(),
            ));
        }
        (scope, Some(task_id)) => {
            return Err(ApiError::InvalidRequest(format!(
                "`task_id` `{task_id}` is only for scope cloud-worker, not {}",
                scope.name()
            )));
        }
        (_, None) => {}
    }
    let (token, hash) = new_operator_token();
    let audit = AuditRecord::ok(who, Action::TokenCreate, &new.name);
    let info = state
        .coordinator
        .db()
        .create_operator_token(new, &hash, &audit, now_ms())
        .await?
        .ok_or_else(|| ApiError::TokenNameTaken(new.name.clone()))?;
    tracing::info!(name = %info.name, scope = info.scope.name(), by = %audit.actor, "operator token created");
    Ok(TokenCreated { token, info })
}

/// Every named token, revoked ones included, oldest first: names, scopes and times, never a token
/// or its hash.
#[utoipa::path(get, path = "/v1/tokens", tag = "access", security(("admin" = ["admin"])),
    responses(
        (status = 200, body = Vec<TokenInfo>),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: only the admin token lists tokens", body = ErrorBody),
    ))]
async fn list_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    authorize(&state, &headers, Need::Admin).await?;
    Ok(Json(state.coordinator.db().operator_tokens().await?))
}

/// Revokes a named token: it is refused from the next request on. Revoking it again changes
/// nothing; the name stays taken.
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "access", security(("admin" = ["admin"])),
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "the token, revoked", body = TokenInfo),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: only the admin token revokes tokens", body = ErrorBody),
        (status = 404, description = "`unknown_operator_token`", body = ErrorBody),
    ))]
async fn revoke_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let who = authorize(&state, &headers, Need::Admin).await?;
    let audit = AuditRecord::ok(&who, Action::TokenRevoke, &name);
    let revoked = state
        .coordinator
        .db()
        .revoke_operator_token(&name, &audit, now_ms())
        .await
        .map_err(ApiError::from)
        .and_then(|info| info.ok_or_else(|| ApiError::UnknownOperatorToken(name.clone())));
    state
        .audit_after(&who, Action::TokenRevoke, &name, &revoked, false)
        .await;
    let revoked = revoked?;
    tracing::info!(name = %revoked.name, by = %audit.actor, "operator token revoked");
    Ok(Json(revoked))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Entries to return, newest first (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only entries older than this id (the last `id` of the previous page).
    before: Option<i64>,
}

/// The audit log, newest first: who did what to which target, how it ended, when.
#[utoipa::path(get, path = "/v1/audit", tag = "access", security(("admin" = ["read-only"])),
    params(AuditQuery),
    responses(
        (status = 200, body = Vec<AuditEntry>),
        (status = 400, description = "`invalid_request` (the query; `limit` outside 1 to 1000)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
    ))]
async fn audit_log(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    authorize(&state, &headers, Need::Read).await?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!(
            "`limit` {limit} is outside 1 to 1000"
        )));
    }
    Ok(Json(state.coordinator.db().audit_log(limit, query.before).await?))
}
