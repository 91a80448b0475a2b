//! The routes every task has: tasks, check-in, model download, upload and metrics.

use std::net::SocketAddr;

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{ConnectInfo, Multipart, Path, Query, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode},
    response::Response,
    routing::{get, post, put},
};
use bytes::Bytes;
use fedhive_shared::wire::{
    CheckinResponse, MetricsReport, RoundInfo, TaskConfig, TaskCreated, TaskStatus, TaskSummary,
    UploadReceipt,
};
use serde::Deserialize;

use super::common::{AppState, bearer, read_body, require_admin, versioned_blob};
use crate::error::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/tasks", post(create_task).get(list_tasks))
        .route("/v1/tasks/{task_id}", get(task_status))
        .route("/v1/tasks/{task_id}/pause", post(pause))
        .route("/v1/tasks/{task_id}/resume", post(resume))
        .route("/v1/tasks/{task_id}/cancel", post(cancel))
        .route("/v1/tasks/{task_id}/rounds", get(task_rounds))
        .route("/v1/tasks/{task_id}/checkin", post(checkin))
        .route("/v1/tasks/{task_id}/model", get(model))
        .route("/v1/updates", put(upload))
        .route("/v1/metrics", post(metrics))
}

/// `200 ready` when the database answers and the blob store is usable; `503 not_ready` naming
/// which is not (for load balancers and orchestrators).
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.coordinator.ready().await?;
    Ok("ready")
}

async fn create_task(
    State(state): State<AppState>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> Result<(StatusCode, Json<TaskCreated>), ApiError> {
    require_admin(&state, &headers)?;
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
    let created = state.coordinator.create_task(config, model).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn task_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.status(&task_id).await?))
}

async fn list_tasks(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<TaskSummary>>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.tasks().await?))
}

async fn pause(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.set_paused(&task_id, true).await?))
}

async fn resume(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.set_paused(&task_id, false).await?))
}

async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<TaskStatus>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.cancel(&task_id).await?))
}

async fn task_rounds(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<Vec<RoundInfo>>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.rounds(&task_id).await?))
}

async fn checkin(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<CheckinResponse>, ApiError> {
    state.check_rate(peer.map(|Extension(ConnectInfo(p))| p))?;
    Ok(Json(state.coordinator.checkin(&task_id, bearer(&headers)).await?))
}

#[derive(Deserialize)]
struct ModelQuery {
    version: Option<i64>,
}

async fn model(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    query: Result<Query<ModelQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
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

#[derive(Deserialize)]
struct UploadQuery {
    num_samples: u64,
}

async fn upload(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Json<UploadReceipt>, ApiError> {
    state.check_rate(peer.map(|Extension(ConnectInfo(p))| p))?;
    let token = bearer(&headers).ok_or(ApiError::MissingToken)?.to_string();
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let coordinator = state.coordinator.clone();
    let timeout = state.body_read_timeout;
    let read_body = |limit: usize| read_body(body, &headers, limit, timeout);
    let (receipt, full) = coordinator.upload(&token, query.num_samples, read_body).await?;
    if full {
        let coordinator = state.coordinator.clone();
        let round = receipt.round_id;
        tokio::spawn(async move {
            if let Err(e) = coordinator.finalize_if_due(round).await {
                tracing::warn!(round, error = %e, "finalising a full round failed; the ticker retries");
            }
        });
    }
    Ok(Json(receipt))
}

async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    report: Result<Json<MetricsReport>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let token = bearer(&headers).ok_or(ApiError::MissingToken)?;
    let Json(report) = report.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    state
        .coordinator
        .report_metrics(token, report.loss, report.num_samples, report.accuracy)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
