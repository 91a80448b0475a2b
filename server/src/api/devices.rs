//! Device identity: enrolment keys (operators), device enrolment with a key, and the operators'
//! device list and revocation (see [`crate::devices`]).

use std::net::SocketAddr;

use axum::{
    Extension, Json,
    extract::{ConnectInfo, State},
    http::{HeaderMap, StatusCode},
};
use fedhive_shared::wire::{
    DeviceCredentials, EnrolledDevice, EnrolmentKey, EnrolmentKeyCreated, EnrolmentKeyRequest, ErrorBody,
};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{ApiJson, ApiPath, ApiQuery, AppState, authorize, bearer};
use crate::access::{Action, Need};
use crate::{devices, error::ApiError};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(enrol, list_devices))
        .routes(routes!(revoke_device))
}

/// Creates an enrolment key, for one app release say; the key is in this answer only (the server
/// keeps its SHA-256). Devices that hold it enrol with `POST /v1/devices`.
#[utoipa::path(post, path = "/v1/enrolment-keys", tag = "enrolment", security(("admin" = [])),
    request_body = EnrolmentKeyRequest,
    responses(
        (status = 201, description = "created; `enrolment_key` is shown only now", body = EnrolmentKeyCreated),
        (status = 400, description = "`invalid_request` (the JSON body, or a `name` that is empty, longer than 100 characters or has control characters)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
    ))]
async fn create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<EnrolmentKeyRequest>,
) -> Result<(StatusCode, Json<EnrolmentKeyCreated>), ApiError> {
    let who = authorize(&state, &headers, Need::Operate).await?;
    let created = devices::create_key(state.coordinator.db(), &request.name).await;
    let target = created
        .as_ref()
        .map_or(request.name.as_str(), |c| c.key_id.as_str());
    state
        .audit_after(&who, Action::EnrolmentKeyCreate, target, &created, true)
        .await;
    Ok((StatusCode::CREATED, Json(created?)))
}

/// Every enrolment key, oldest first, with how many devices it enrolled (never a secret or hash).
#[utoipa::path(get, path = "/v1/enrolment-keys", tag = "enrolment", security(("admin" = [])),
    responses(
        (status = 200, body = Vec<EnrolmentKey>),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
    ))]
async fn list_keys(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<EnrolmentKey>>, ApiError> {
    authorize(&state, &headers, Need::Read).await?;
    Ok(Json(state.coordinator.db().enrolment_keys().await?))
}

/// Revokes an enrolment key: it enrols no more devices, and every device it enrolled is refused
/// from its next request (`403 enrolment_key_revoked`). Revoking again changes nothing.
#[utoipa::path(delete, path = "/v1/enrolment-keys/{key_id}", tag = "enrolment", security(("admin" = [])),
    params(("key_id" = String, Path)),
    responses(
        (status = 200, description = "the key, revoked", body = EnrolmentKey),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_enrolment_key`", body = ErrorBody),
    ))]
async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(key_id): ApiPath<String>,
) -> Result<Json<EnrolmentKey>, ApiError> {
    let who = authorize(&state, &headers, Need::Operate).await?;
    let revoked = devices::revoke_key(state.coordinator.db(), &key_id).await;
    state
        .audit_after(&who, Action::EnrolmentKeyRevoke, &key_id, &revoked, true)
        .await;
    Ok(Json(revoked?))
}

/// Enrols a device with an enrolment key: a pseudonymous device id and a secret, shown only now,
/// valid for every task. The device checks in with `Authorization: Bearer <device_id>:<device_secret>`
/// and sends the same in `Fedhive-Device` with its uploads.
#[utoipa::path(post, path = "/v1/devices", tag = "enrolment", security(("enrolment_key" = [])),
    responses(
        (status = 201, body = DeviceCredentials),
        (status = 401, description = "`enrolment_key_unauthorized`: no key, or not one the server issued", body = ErrorBody),
        (status = 403, description = "`enrolment_key_revoked`", body = ErrorBody),
        (status = 429, description = "`rate_limited` (with `--rate-limit-per-address`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
    ))]
async fn enrol(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<DeviceCredentials>), ApiError> {
    state.check_rate(peer.map(|Extension(ConnectInfo(p))| p), &headers)?;
    let credentials = devices::enrol(state.coordinator.db(), bearer(&headers)).await?;
    Ok((StatusCode::CREATED, Json(credentials)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeviceQuery {
    /// Only the devices of this enrolment key.
    key_id: Option<String>,
    /// Only devices whose id sorts after this one (the last id of the previous page).
    after: Option<String>,
    /// At most this many (default 1000).
    #[param(minimum = 1, maximum = 10_000)]
    limit: Option<i64>,
}

/// Enrolled devices by id, a page at a time (never a secret or hash).
#[utoipa::path(get, path = "/v1/devices", tag = "enrolment", security(("admin" = [])),
    params(DeviceQuery),
    responses(
        (status = 200, body = Vec<EnrolledDevice>),
        (status = 400, description = "`invalid_request` (the query, or `limit` outside 1 to 10000)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
    ))]
async fn list_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<DeviceQuery>,
) -> Result<Json<Vec<EnrolledDevice>>, ApiError> {
    authorize(&state, &headers, Need::Read).await?;
    let limit = query.limit.unwrap_or(1000);
    if !(1..=devices::MAX_DEVICE_PAGE).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!(
            "`limit` must be between 1 and {}, got {limit}",
            devices::MAX_DEVICE_PAGE
        )));
    }
    let page = state
        .coordinator
        .db()
        .enrolled_devices(query.key_id.as_deref(), query.after.as_deref(), limit)
        .await?;
    Ok(Json(page))
}

/// Revokes a device: its credential is refused from its next request (`403 device_revoked`),
/// uploads of tokens it already holds included. Revoking again changes nothing.
#[utoipa::path(delete, path = "/v1/devices/{device_id}", tag = "enrolment", security(("admin" = [])),
    params(("device_id" = String, Path)),
    responses(
        (status = 200, description = "the device, revoked", body = EnrolledDevice),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_device`", body = ErrorBody),
    ))]
async fn revoke_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(device_id): ApiPath<String>,
) -> Result<Json<EnrolledDevice>, ApiError> {
    let who = authorize(&state, &headers, Need::Operate).await?;
    let revoked = devices::revoke_device(state.coordinator.db(), &device_id).await;
    state
        .audit_after(&who, Action::DeviceRevoke, &device_id, &revoked, true)
        .await;
    Ok(Json(revoked?))
}
