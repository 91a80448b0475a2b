//! MM-PSGD and MC-PSGD's routes: the predictor of a block, a block's chain, the schedule status.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use fedhive_shared::blocks::BlockStatus;
use serde::Deserialize;

use super::common::{AppState, require_admin};
use crate::{error::ApiError, strategy::block_cyclic::BlockCyclic};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tasks/{task_id}/predictor", get(predictor))
        .route("/v1/tasks/{task_id}/blocks/{block}/chain", get(chain))
        .route("/v1/tasks/{task_id}/blocks", get(block_status))
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
        .strategy::<BlockCyclic>()?
        .predictor(state.coordinator.store(), &task_id, query.block.as_deref())
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
    let bytes = state
        .strategy::<BlockCyclic>()?
        .chain(state.coordinator.store(), &task_id, &block, query.version)
        .await?;
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
    let status = state
        .strategy::<BlockCyclic>()?
        .block_status(state.coordinator.store(), &task_id)
        .await?;
    Ok(Json(status))
}
