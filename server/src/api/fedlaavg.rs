//! FedLaAvg's routes: device enrolment and the operators' device list.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use fedhive_shared::wire::{DeviceCredentials, DeviceInfo, ErrorBody};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{ApiPath, AppState, authorize};
use crate::{error::ApiError, strategy::fedlaavg::FedLaAvg};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(enrol_device, task_devices))
}

/// Enrols a new device in this task only: a pseudonymous id and a secret, shown only now; the
/// device checks in with `Authorization: Bearer <device_id>:<device_secret>`. Open like check-in, so
/// a task with `require_enrolled_device` refuses it: its devices enrol with a key (`POST /v1/devices`).
#[utoipa::path(post, path = "/v1/tasks/{task_id}/devices", tag = "fedlaavg",
    params(("task_id" = String, Path)),
    responses(
        (status = 201, body = DeviceCredentials),
        (status = 400, description = "`invalid_request`: the task does not use FedLaAvg", body = ErrorBody),
        (status = 401, description = "`device_unauthorized`: the task requires devices enrolled with a key", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
    ))]
async fn enrol_device(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
) -> Result<(StatusCode, Json<DeviceCredentials>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(
            state
                .strategy::<FedLaAvg>()?
                .enrol_device(state.coordinator.store(), &task_id)
                .await?,
        ),
    ))
}

/// The task's enrolled devices with the last round that applied each one's update.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/devices", tag = "fedlaavg", security(("admin" = ["read-only"])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, body = Vec<DeviceInfo>),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
    ))]
async fn task_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    authorize(&state, &headers, crate::access::Need::Read).await?;
    let devices = state
        .strategy::<FedLaAvg>()?
        .devices(state.coordinator.store(), &task_id)
        .await?;
    Ok(Json(devices))
}
