//! DC-CCL's routes: the cloud worker's (its round, its contribution, publishing control models;
//! all with the task's worker token) and the devices' control model download.

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::HeaderMap,
    response::Response,
    routing::{get, put},
};
use fedhive_shared::wire::{ArtifactReceipt, CloudStatus};
use serde::Deserialize;

use super::common::{AppState, bearer, read_body, versioned_blob};
use crate::{error::ApiError, strategy::dc_ccl::DcCcl};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tasks/{task_id}/cloud", get(cloud_status))
        .route(
            "/v1/tasks/{task_id}/rounds/{round_id}/cloud-update",
            put(cloud_update),
        )
        .route(
            "/v1/tasks/{task_id}/control-model/{version}",
            put(publish_control),
        )
        .route("/v1/tasks/{task_id}/control-model", get(control_model))
}

async fn cloud_status(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<CloudStatus>, ApiError> {
    let dc = state.strategy::<DcCcl>()?;
    let store = state.coordinator.store();
    let task = dc.authorize_worker(store, &task_id, bearer(&headers)).await?;
    Ok(Json(dc.cloud_status(store, &task).await?))
}

/// The cloud's delta of `F_s` for a round (safetensors, checked like a device's update).
async fn cloud_update(
    State(state): State<AppState>,
    Path((task_id, round_id)): Path<(String, i64)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ArtifactReceipt>, ApiError> {
    let dc = state.strategy::<DcCcl>()?;
    let store = state.coordinator.store();
    let task = dc.authorize_worker(store, &task_id, bearer(&headers)).await?;
    let limit = crate::strategy::Strategy::upload_limit(dc, &task.config);
    let body = read_body(body, &headers, limit, state.body_read_timeout).await?;
    let (receipt, full) = dc.submit_cloud_update(store, &task, round_id, body).await?;
    if full {
        let coordinator = state.coordinator.clone();
        tokio::spawn(async move {
            if let Err(e) = coordinator.finalize_if_due(round_id).await {
                tracing::warn!(round = round_id, error = %e, "finalising a full round failed; the ticker retries");
            }
        });
    }
    Ok(Json(receipt))
}

/// A new control model version `F_m` (safetensors of the task's `control_tensors`).
async fn publish_control(
    State(state): State<AppState>,
    Path((task_id, version)): Path<(String, i64)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ArtifactReceipt>, ApiError> {
    let dc = state.strategy::<DcCcl>()?;
    let store = state.coordinator.store();
    let task = dc.authorize_worker(store, &task_id, bearer(&headers)).await?;
    let body = read_body(
        body,
        &headers,
        dc.control_limit(&task.config),
        state.body_read_timeout,
    )
    .await?;
    Ok(Json(dc.publish_control_model(store, &task, version, body).await?))
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<i64>,
}

/// The control model `F_m` devices train beside (latest, or `?version=N`, cacheable for good).
async fn control_model(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    query: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let dc = state.strategy::<DcCcl>()?;
    let (version, bytes) = dc
        .control_model(state.coordinator.store(), &task_id, query.version)
        .await?;
    let pinned = query.version.is_some();
    Ok(versioned_blob(
        "fedhive-control-version",
        version,
        pinned,
        bytes,
        &headers,
    ))
}
