//! The HTTP API (axum). Handlers parse and authenticate; the [`Coordinator`] decides.
//!
//! | method | path | who | what |
//! |---|---|---|---|
//! | GET | /healthz | anyone | liveness |
//! | POST | /v1/tasks | admin | create a task: multipart `config` (JSON) + `model` (safetensors) |
//! | GET | /v1/tasks/{id} | admin | task status |
//! | GET | /v1/tasks/{id}/rounds | admin | every round with its counts |
//! | POST | /v1/tasks/{id}/checkin | device (FedLaAvg: `Bearer device_id:secret`) | an assignment, or retry-after, or finished |
//! | POST | /v1/tasks/{id}/devices | device | FedLaAvg enrolment: a pseudonymous device id and its secret |
//! | GET | /v1/tasks/{id}/devices | admin | FedLaAvg devices with their last participation |
//! | GET | /v1/tasks/{id}/model[?version=N] | device | model safetensors; ETag = version |
//! | PUT | /v1/updates?num_samples=N | device (upload token) | the update (safetensors of Delta) |
//! | POST | /v1/metrics | device (upload token) | loss, sample count, accuracy |
//! | GET | /v1/tasks/{id}/predictor[?block=NAME] | anyone | MM/MC-PSGD: predictor of the current (or named) block |
//! | GET | /v1/tasks/{id}/blocks/{name}/chain?version=N | device | MC-PSGD: the block's chain `y_m` |
//! | GET | /v1/tasks/{id}/blocks | admin | MM/MC-PSGD: schedule position, `r_m` per block, round history |
//!
//! FedSubAvg's submodel routes are in [`crate::api_sparse`].

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Multipart, Path, Query, State, rejection::JsonRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use bytes::Bytes;
use fedhive_shared::blocks::BlockStatus;
use fedhive_shared::wire::{
    CheckinResponse, DeviceCredentials, DeviceInfo, MetricsReport, RoundInfo, TaskConfig, TaskCreated,
    TaskStatus, UploadReceipt,
};
use serde::Deserialize;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::{
    coordinator::{Coordinator, upload_limit},
    error::ApiError,
};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub coordinator: Arc<Coordinator>,
    /// `None` only when started with `--insecure-dev`.
    pub admin_token: Option<String>,
}

pub fn router(state: AppState, max_model_bytes: usize) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{task_id}", get(task_status))
        .route("/v1/tasks/{task_id}/rounds", get(task_rounds))
        .route("/v1/tasks/{task_id}/checkin", post(checkin))
        .route(
            "/v1/tasks/{task_id}/devices",
            post(enrol_device).get(task_devices),
        )
        .route("/v1/tasks/{task_id}/model", get(model))
        .route("/v1/updates", put(upload))
        .route("/v1/metrics", post(metrics))
        .merge(crate::api_sparse::routes())
        .route("/v1/tasks/{task_id}/predictor", get(predictor))
        .route("/v1/tasks/{task_id}/blocks/{block}/chain", get(chain))
        .route("/v1/tasks/{task_id}/blocks", get(block_status))
        .layer(DefaultBodyLimit::max(max_model_bytes))
        // 5xx answers are logged where they arise (internal errors at `error`); `503 server_busy`
        // is routine pacing under load, not a failure to log thousands of times.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)))
        .with_state(state)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub(crate) fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.admin_token {
        None => Ok(()),
        Some(expected)
            if bearer(headers).is_some_and(|t| constant_time_eq(t.as_bytes(), expected.as_bytes())) =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::Unauthorized),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<CheckinResponse>, ApiError> {
    let response = match bearer(&headers) {
        Some(device) => state.coordinator.checkin_device(&task_id, device).await?,
        None => state.coordinator.checkin(&task_id).await?,
    };
    Ok(Json(response))
}

/// Open like check-in: a deployment that must restrict who enrols puts app attestation in front.
async fn enrol_device(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
) -> Result<(StatusCode, Json<DeviceCredentials>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.coordinator.enrol_device(&task_id).await?),
    ))
}

async fn task_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.devices(&task_id).await?))
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
    headers: HeaderMap,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Json<UploadReceipt>, ApiError> {
    let token = bearer(&headers).ok_or(ApiError::MissingToken)?.to_string();
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let coordinator = state.coordinator.clone();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let read_body = |limit: usize| async move {
        if let Some(size) = declared.filter(|&s| s > limit) {
            return Err(ApiError::BodyTooLarge { size, limit });
        }
        read_limited(body, declared.unwrap_or(0), limit).await
    };
    let (receipt, full) = coordinator
        .upload(&token, query.num_samples, |config| {
            read_body(upload_limit(config))
        })
        .await?;
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

#[derive(Deserialize)]
struct PredictorQuery {
    block: Option<String>,
}

/// The predictor of the block meant for now (or of `?block=`), as safetensors. Headers name the block
/// (`fedhive-block`) and its `r_m` (`fedhive-block-rounds`; 0 means the block has no committed round
/// yet and the current global model stands in); the ETag changes whenever the predictor does.
async fn predictor(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    query: Result<Query<PredictorQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let served = state
        .coordinator
        .predictor(&task_id, query.block.as_deref())
        .await?;
    let etag = format!("\"{}\"", served.etag);
    let header_value = |v: &str| HeaderValue::from_str(v).expect("block names and digits are valid headers");
    let common = [
        (header::ETAG, header_value(&etag)),
        (
            header::HeaderName::from_static("fedhive-block"),
            header_value(&served.block),
        ),
        (
            header::HeaderName::from_static("fedhive-block-rounds"),
            header_value(&served.rounds.to_string()),
        ),
    ];
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    )];
    Ok((common, content_type, served.bytes).into_response())
}

#[derive(Deserialize)]
struct ChainQuery {
    version: i64,
}

async fn chain(
    State(state): State<AppState>,
    Path((task_id, block)): Path<(String, String)>,
    query: Result<Query<ChainQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let bytes = state.coordinator.chain(&task_id, &block, query.version).await?;
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    )];
    Ok((content_type, bytes).into_response())
}

async fn block_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<BlockStatus>, ApiError> {
    require_admin(&state, &headers)?;
    Ok(Json(state.coordinator.block_status(&task_id).await?))
}
