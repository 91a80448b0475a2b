//! The routes every task has: tasks, check-in, model download, upload and metrics.

use std::net::SocketAddr;

use axum::{
    Extension, Json,
    body::Body,
    extract::{ConnectInfo, Multipart, State, multipart::MultipartRejection},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use bytes::Bytes;
use fedhive_shared::wire::{
    CheckinResponse, ErrorBody, MetricsReport, RoundInfo, TaskConfig, TaskCreated, TaskStatus, TaskSummary,
    UploadReceipt,
};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{
    ApiJson, ApiPath, ApiQuery, AppState, RequestBody, authorize, bearer, device_header, versioned_blob,
};
use crate::{
    access::{Action, Need},
    error::ApiError,
};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(create_task, list_tasks))
        .routes(routes!(task_status))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(cancel))
        .routes(routes!(task_rounds))
        .routes(routes!(checkin))
        .routes(routes!(model))
        .routes(routes!(upload))
        .routes(routes!(metrics))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// `200 ready` when the database answers and the blob store is usable; `503 not_ready` naming
/// which is not (for load balancers and orchestrators).
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "`ready`", body = String, content_type = "text/plain"),
    (status = 503, description = "`not_ready`: the database or the blob store does not answer", body = ErrorBody),
))]
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.coordinator.ready().await?;
    Ok("ready")
}

/// The multipart body of `POST /v1/tasks`.
#[derive(ToSchema)]
#[allow(dead_code)] // describes the multipart fields; the handler reads them one by one
struct CreateTaskForm {
    /// The task's configuration (JSON).
    config: TaskConfig,
    /// The initial model: safetensors with exactly the config's `tensors`.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    model: Vec<u8>,
}

/// Creates a task from its config and initial model; both are checked with the same rules as
/// `fedhive task create` applies before uploading.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", security(("admin" = ["operator"])),
    request_body(content = inline(CreateTaskForm), content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "created", body = TaskCreated),
        (status = 400, description = "`invalid_request` (a field missing or unexpected), `bad_body` (not multipart)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`invalid_config`, `missing_tensor`, `unexpected_tensor`, `shape_mismatch`, `dtype_mismatch`, `non_finite_value`, `malformed_tensors`", body = ErrorBody),
    ))]
async fn create_task(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<TaskCreated>), ApiError> {
    let who = authorize(&state, &headers, Need::Operate).await?;
    let mut multipart = multipart.map_err(|e| ApiError::BadBody(e.body_text()))?;
    let mut config: Option<TaskConfig> = None;
    let mut model: Option<Bytes> = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::BadBody(e.to_string()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::BadBody(e.to_string()))?;
        match name.as_str() {
            "config" => {
                config =
                    Some(serde_json::from_slice(&data).map_err(|e| ApiError::InvalidConfig(e.to_string()))?)
            }
            "model" => model = Some(data),
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unexpected multipart field `{other}`"
                )));
            }
        }
    }
    let config =
        config.ok_or_else(|| ApiError::InvalidRequest("multipart field `config` is missing".into()))?;
    let model = model.ok_or_else(|| ApiError::InvalidRequest("multipart field `model` is missing".into()))?;
    let created = state.coordinator.create_task(config, model, &who).await;
    state
        .audit_after(&who, Action::TaskCreate, "", &created, false)
        .await;
    Ok((StatusCode::CREATED, Json(created?)))
}

/// A task's state, model version, config and open round.
#[utoipa::path(get, path = "/v1/tasks/{task_id}", tag = "tasks", security(("admin" = ["read-only"])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, body = TaskStatus),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
    ))]
async fn task_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    authorize(&state, &headers, Need::Read).await?;
    Ok(Json(state.coordinator.status(&task_id).await?))
}

/// Every task, newest first.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", security(("admin" = ["read-only"])),
    responses(
        (status = 200, body = Vec<TaskSummary>),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
    ))]
async fn list_tasks(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<TaskSummary>>, ApiError> {
    authorize(&state, &headers, Need::Read).await?;
    Ok(Json(state.coordinator.tasks().await?))
}

/// Stops handing out work (check-ins are told to come back); the open round runs to its end.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/pause", tag = "tasks", security(("admin" = ["operator"])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, description = "the task after the change", body = TaskStatus),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
        (status = 409, description = "`task_state_conflict`: the task is not running", body = ErrorBody),
    ))]
async fn pause(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    let who = authorize(&state, &headers, Need::Operate).await?;
    let status = state.coordinator.set_paused(&task_id, true, &who).await;
    state
        .audit_after(&who, Action::TaskPause, &task_id, &status, false)
        .await;
    Ok(Json(status?))
}

/// Hands out work again after a pause.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/resume", tag = "tasks", security(("admin" = ["operator"])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, description = "the task after the change", body = TaskStatus),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
        (status = 409, description = "`task_state_conflict`: the task is not paused", body = ErrorBody),
    ))]
async fn resume(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    let who = authorize(&state, &headers, Need::Operate).await?;
    let status = state.coordinator.set_paused(&task_id, false, &who).await;
    state
        .audit_after(&who, Action::TaskResume, &task_id, &status, false)
        .await;
    Ok(Json(status?))
}

/// Ends the task now: the open round is abandoned, the model stays at its last committed version.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/cancel", tag = "tasks", security(("admin" = ["operator"])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, description = "the task after the change", body = TaskStatus),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
        (status = 409, description = "`task_state_conflict`: the task is already over", body = ErrorBody),
    ))]
async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    let who = authorize(&state, &headers, Need::Operate).await?;
    let status = state.coordinator.cancel(&task_id, &who).await;
    state
        .audit_after(&who, Action::TaskCancel, &task_id, &status, false)
        .await;
    Ok(Json(status?))
}

/// Every round of the task with its counts and the metrics its devices reported.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/rounds", tag = "tasks", security(("admin" = ["read-only"])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, body = Vec<RoundInfo>),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
    ))]
async fn task_rounds(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
) -> Result<Json<Vec<RoundInfo>>, ApiError> {
    authorize(&state, &headers, Need::Read).await?;
    Ok(Json(state.coordinator.rounds(&task_id).await?))
}

/// A device asks for work: an assignment (train this model version, upload with this token before
/// the deadline), a time to come back, or the news that the task is over. A device credential, if
/// sent, is always checked; an enrolled device gets at most one upload token per round.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/checkin", tag = "devices",
    security((), ("device" = [])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, body = CheckinResponse),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 401, description = "`device_unauthorized`: a credential that is wrong, or none where the task needs one (FedLaAvg, or a task with `require_enrolled_device`: enrol first, then check in with the credential)", body = ErrorBody),
        (status = 403, description = "`device_revoked`, `enrolment_key_revoked` (the device's enrolment key)", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
        (status = 409, description = "`anonymous_task`: an anonymous-embeddings task takes samples (`POST /v1/tasks/{task_id}/anonymous/samples`), not check-ins", body = ErrorBody),
        (status = 429, description = "`rate_limited` (with `--rate-limit-per-address` or `--rate-limit-per-device`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
    ))]
async fn checkin(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ApiPath(task_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<CheckinResponse>, ApiError> {
    state.check_rate(peer.map(|Extension(ConnectInfo(p))| p), &headers)?;
    Ok(Json(state.coordinator.checkin(&task_id, bearer(&headers)).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ModelQuery {
    /// A committed model version (default: the latest). A pinned version may be cached for good.
    #[param(minimum = 0)]
    version: Option<i64>,
}

/// The task's model as safetensors. `ETag` is the version: `If-None-Match` with it answers `304`.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/model", tag = "devices",
    params(("task_id" = String, Path), ModelQuery),
    responses(
        (status = 200, description = "the model (safetensors)", body = Vec<u8>, content_type = "application/octet-stream",
            headers(("ETag" = String), ("fedhive-model-version" = String), ("Cache-Control" = String))),
        (status = 304, description = "not modified (`If-None-Match` matched)"),
        (status = 400, description = "`invalid_request` (the query)", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `unknown_model_version`", body = ErrorBody),
    ))]
async fn model(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ModelQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (version, bytes) = state.coordinator.model(&task_id, query.version).await?;
    let pinned = query.version.is_some();
    Ok(versioned_blob(
        "fedhive-model-version",
        version,
        pinned,
        bytes,
        &headers,
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    /// Samples the device trained on (the update's FedAvg weight), 1 to 2^24.
    #[param(minimum = 1, maximum = 16_777_216)]
    num_samples: u64,
}

/// A device's update for its assignment: safetensors of `Delta = x_after - x_before` (FedSubAvg:
/// the sparse rows; MC-PSGD: also the chain and the two losses). Counted exactly once: a retry with
/// the same token and bytes gets the stored receipt.
#[utoipa::path(put, path = "/v1/updates", tag = "devices", security(("upload_token" = [])),
    params(UploadQuery,
        ("Fedhive-Device" = Option<String>, Header, description = "`device_id:device_secret` of the device the upload token was issued to: required by a task with `require_enrolled_device`, checked whenever sent")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "safetensors"),
    responses(
        (status = 200, description = "accepted (or the receipt of the same upload before)", body = UploadReceipt),
        (status = 400, description = "`invalid_request` (the query), `bad_body`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `unknown_token` (the token names no assignment), `device_unauthorized` (a wrong `Fedhive-Device`, or a task with `require_enrolled_device` and not the credential of the device the token was issued to)", body = ErrorBody),
        (status = 403, description = "`device_revoked`, `enrolment_key_revoked`", body = ErrorBody),
        (status = 408, description = "`body_timeout`: nothing was recorded; send it again", body = ErrorBody),
        (status = 409, description = "`round_closed` (late, full, abandoned or past its deadline), `upload_in_flight` (the same token is still uploading), `stale_model_version`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`missing_tensor`, `unexpected_tensor`, `shape_mismatch`, `dtype_mismatch`, `non_finite_value`, `value_out_of_range`, `bad_position`, `malformed_tensors`, `bad_num_samples`, `round_sample_limit`, `conflicting_retry`", body = ErrorBody),
        (status = 429, description = "`rate_limited` (with `--rate-limit-per-address` or `--rate-limit-per-device`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
        (status = 503, description = "`server_busy`: send the same upload again after `retry_after_ms`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
    ))]
async fn upload(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<Json<UploadReceipt>, ApiError> {
    state.check_rate(peer.map(|Extension(ConnectInfo(p))| p), &headers)?;
    let token = bearer(&headers).ok_or(ApiError::MissingToken)?.to_string();
    let device = device_header(&headers).map(str::to_string);
    let coordinator = state.coordinator.clone();
    let timeout = state.body_read_timeout;
    let buffers = coordinator.body_buffers();
    let body = RequestBody {
        body,
        headers: &headers,
        timeout,
        buffers,
    };
    let (receipt, full) = coordinator
        .upload(&token, device.as_deref(), query.num_samples, body)
        .await?;
    if full {
        state.coordinator.finalize_in_background(receipt.round_id);
    }
    Ok(Json(receipt))
}

/// The training metrics of the device's assignment (its loss and accuracy on its own data), for
/// the round's report.
#[utoipa::path(post, path = "/v1/metrics", tag = "devices", security(("upload_token" = [])),
    params(("Fedhive-Device" = Option<String>, Header, description = "`device_id:device_secret` of the device the upload token was issued to: required by a task with `require_enrolled_device`, checked whenever sent")),
    request_body = MetricsReport,
    responses(
        (status = 204, description = "recorded"),
        (status = 400, description = "`invalid_request` (the JSON body)", body = ErrorBody),
        (status = 401, description = "`missing_token`, `unknown_token` (the token names no assignment), `device_unauthorized` (as for uploads)", body = ErrorBody),
        (status = 403, description = "`device_revoked`, `enrolment_key_revoked`", body = ErrorBody),
        (status = 422, description = "`bad_num_samples`", body = ErrorBody),
    ))]
async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(report): ApiJson<MetricsReport>,
) -> Result<StatusCode, ApiError> {
    let token = bearer(&headers).ok_or(ApiError::MissingToken)?;
    state
        .coordinator
        .report_metrics(
            token,
            device_header(&headers),
            report.loss,
            report.num_samples,
            report.accuracy,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
