//! The routes every task has: tasks, check-in, model download, upload and metrics.

use std::net::SocketAddr;

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{ConnectInfo, Multipart, Path, Query, State, rejection::JsonRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use bytes::Bytes;
use fedhive_shared::wire::{
    CheckinResponse, MetricsReport, RoundInfo, TaskConfig, TaskCreated, TaskStatus, UploadReceipt,
};
use serde::Deserialize;

use super::common::{AppState, bearer, require_admin};
use crate::error::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{task_id}", get(task_status))
        .route("/v1/tasks/{task_id}/rounds", get(task_rounds))
        .route("/v1/tasks/{task_id}/checkin", post(checkin))
        .route("/v1/tasks/{task_id}/model", get(model))
        .route("/v1/updates", put(upload))
        .route("/v1/metrics", post(metrics))
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
    let etag = format!("\"{version}\"");
    let etag_value = HeaderValue::from_str(&etag).expect("digits and quotes are a valid header");
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let common = [
        (header::ETAG, etag_value.clone()),
        (
            header::HeaderName::from_static("fedhive-model-version"),
            etag_value.clone(),
        ),
    ];
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    )];
    Ok((common, content_type, bytes).into_response())
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
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let timeout = state.body_read_timeout;
    let read_body = |limit: usize| async move {
        if let Some(size) = declared.filter(|&s| s > limit) {
            return Err(ApiError::BodyTooLarge { size, limit });
        }
        tokio::time::timeout(timeout, read_limited(body, declared.unwrap_or(0), limit))
            .await
            .map_err(|_| ApiError::BodyTimeout {
                secs: timeout.as_secs(),
            })?
    };
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

/// Reads a body of at most `limit` bytes into one buffer sized from its declared length, so a
/// model-sized upload is held once (collecting the frames and then joining them would hold it twice).
async fn read_limited(mut body: Body, declared: usize, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::with_capacity(declared.min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadBody(e.to_string()))?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge {
                size: buf.len() + chunk.len(),
                limit,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
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
