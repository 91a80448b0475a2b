//! FedLaAvg's routes: device enrolment and the operators' device list.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use fedhive_shared::wire::{DeviceCredentials, DeviceInfo};

use super::common::{AppState, require_admin};
use crate::{error::ApiError, strategy::fedlaavg::FedLaAvg};

pub(super) fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/tasks/{task_id}/devices",
        post(enrol_device).get(task_devices),
    )
}

/// Open like check-in: a deployment that must restrict who enrols puts app attestation in front.
async fn enrol_device(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
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

async fn task_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    require_admin(&state, &headers)?;
    let devices = state
        .strategy::<FedLaAvg>()?
        .devices(state.coordinator.store(), &task_id)
        .await?;
    Ok(Json(devices))
}
