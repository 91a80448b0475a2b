//! DC-CCL's routes: the cloud worker's (its round, its contribution, publishing control models;
//! all with the task's own worker token or a named `cloud-worker` token for the task) and the
//! devices' control model download. A contribution and a control model are operator actions in the
//! audit log: they change the model devices get.

use axum::{Json, body::Body, extract::State, http::HeaderMap, response::Response};
use fedhive_shared::wire::{ArtifactReceipt, CloudStatus, ErrorBody};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{ApiPath, ApiQuery, AppState, authorize_worker, read_body, versioned_blob};
use crate::{
    access::{Action, Principal},
    db::TaskRow,
    error::ApiError,
    strategy::dc_ccl::DcCcl,
};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(cloud_status))
        .routes(routes!(cloud_update))
        .routes(routes!(publish_control))
        .routes(routes!(control_model))
}

/// The DC-CCL task, if the request is its cloud worker's (see [`authorize_worker`]).
async fn worker_task(
    state: &AppState,
    dc: &DcCcl,
    task_id: &str,
    headers: &HeaderMap,
) -> Result<(TaskRow, Principal), ApiError> {
    let task = dc.task(state.coordinator.store(), task_id).await?;
    let who = authorize_worker(state, task_id, headers).await?;
    Ok((task, who))
}

/// What the cloud worker needs: the round in progress, whether it contributed to it, the latest
/// control model version.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/cloud", tag = "dc_ccl", security(("worker_token" = [])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, body = CloudStatus),
        (status = 401, description = "`worker_unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: a named token of another scope or task", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_dc_ccl`", body = ErrorBody),
    ))]
async fn cloud_status(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<CloudStatus>, ApiError> {
    let dc = state.strategy::<DcCcl>()?;
    let (task, _) = worker_task(&state, dc, &task_id, &headers).await?;
    Ok(Json(dc.cloud_status(state.coordinator.store(), &task).await?))
}

/// The cloud's delta of `F_s` for a round (safetensors, checked like a device's update), once per
/// round: a retry with the same bytes gets the stored receipt.
#[utoipa::path(put, path = "/v1/tasks/{task_id}/rounds/{round_id}/cloud-update", tag = "dc_ccl",
    security(("worker_token" = [])),
    params(("task_id" = String, Path), ("round_id" = i64, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "safetensors"),
    responses(
        (status = 200, body = ArtifactReceipt),
        (status = 400, description = "`invalid_request` (the path), `bad_body`", body = ErrorBody),
        (status = 401, description = "`worker_unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: a named token of another scope or task", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_dc_ccl`, `unknown_round`", body = ErrorBody),
        (status = 408, description = "`body_timeout`", body = ErrorBody),
        (status = 409, description = "`round_closed`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`conflicting_retry` or a tensor code (`missing_tensor`, `shape_mismatch`, ...)", body = ErrorBody),
    ))]
async fn cloud_update(
    State(state): State<AppState>,
    ApiPath((task_id, round_id)): ApiPath<(String, i64)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ArtifactReceipt>, ApiError> {
    let dc = state.strategy::<DcCcl>()?;
    let (task, who) = worker_task(&state, dc, &task_id, &headers).await?;
    let limit = crate::strategy::Strategy::upload_limit(dc, &task.config);
    let submitted = async {
        let body = read_body(body, &headers, limit, state.body_read_timeout).await?;
        dc.submit_cloud_update(state.coordinator.store(), &task, round_id, body)
            .await
    }
    .await;
    let target = format!("{task_id}/{round_id}");
    state
        .audit_after(&who, Action::CloudUpdate, &target, &submitted, true)
        .await;
    let (receipt, full) = submitted?;
    if full {
        state.coordinator.finalize_in_background(round_id);
    }
    Ok(Json(receipt))
}

/// A new control model version `F_m` (safetensors of the task's `control_tensors`); versions are
/// published in order and never change.
#[utoipa::path(put, path = "/v1/tasks/{task_id}/control-model/{version}", tag = "dc_ccl",
    security(("worker_token" = [])),
    params(("task_id" = String, Path), ("version" = i64, Path, description = "the next version (1 first)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "safetensors"),
    responses(
        (status = 200, body = ArtifactReceipt),
        (status = 400, description = "`invalid_request` (the path), `bad_body`", body = ErrorBody),
        (status = 401, description = "`worker_unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: a named token of another scope or task", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_dc_ccl`", body = ErrorBody),
        (status = 408, description = "`body_timeout`", body = ErrorBody),
        (status = 409, description = "`control_version_out_of_order`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`conflicting_retry` or a tensor code (`missing_tensor`, `shape_mismatch`, ...)", body = ErrorBody),
    ))]
async fn publish_control(
    State(state): State<AppState>,
    ApiPath((task_id, version)): ApiPath<(String, i64)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ArtifactReceipt>, ApiError> {
    let dc = state.strategy::<DcCcl>()?;
    let (task, who) = worker_task(&state, dc, &task_id, &headers).await?;
    let limit = dc.control_limit(&task.config);
    let published = async {
        let body = read_body(body, &headers, limit, state.body_read_timeout).await?;
        dc.publish_control_model(state.coordinator.store(), &task, version, body)
            .await
    }
    .await;
    let target = format!("{task_id}/{version}");
    state
        .audit_after(&who, Action::CloudControlModel, &target, &published, true)
        .await;
    Ok(Json(published?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct VersionQuery {
    /// A published version (default: the latest); a pinned version may be cached for good.
    version: Option<i64>,
}

/// The control model `F_m` devices train beside (latest, or `?version=N`, cacheable for good).
#[utoipa::path(get, path = "/v1/tasks/{task_id}/control-model", tag = "dc_ccl",
    params(("task_id" = String, Path), VersionQuery),
    responses(
        (status = 200, description = "the control model (safetensors)", body = Vec<u8>, content_type = "application/octet-stream",
            headers(("ETag" = String), ("fedhive-control-version" = String), ("Cache-Control" = String))),
        (status = 304, description = "not modified (`If-None-Match` matched)"),
        (status = 400, description = "`invalid_request` (the query)", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_dc_ccl`, `unknown_control_model`", body = ErrorBody),
    ))]
async fn control_model(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<VersionQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
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
