//! MM-PSGD and MC-PSGD's routes: the predictor of a block, a block's chain, the schedule status.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use fedhive_shared::{blocks::BlockStatus, wire::ErrorBody};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{ApiPath, ApiQuery, AppState, authorize, etag_matches};
use crate::{error::ApiError, strategy::block_cyclic::BlockCyclic};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(predictor))
        .routes(routes!(chain))
        .routes(routes!(block_status))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PredictorQuery {
    /// A block of the schedule (default: the block meant for now).
    block: Option<String>,
}

/// The predictor of the block meant for now (or of `?block=`), as safetensors. Headers name the block
/// (`fedhive-block`) and its `r_m` (`fedhive-block-rounds`; 0 means the block has no committed round
/// yet and the current global model stands in); the ETag changes whenever the predictor does.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/predictor", tag = "block_cyclic",
    params(("task_id" = String, Path), PredictorQuery),
    responses(
        (status = 200, description = "the predictor (safetensors)", body = Vec<u8>, content_type = "application/octet-stream",
            headers(("ETag" = String), ("fedhive-block" = String), ("fedhive-block-rounds" = String))),
        (status = 304, description = "not modified (`If-None-Match` matched)"),
        (status = 400, description = "`invalid_request` (the query)", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_block_cyclic`, `unknown_block`", body = ErrorBody),
    ))]
async fn predictor(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PredictorQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
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
    if etag_matches(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    )];
    Ok((common, content_type, served.bytes).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ChainQuery {
    /// The chain version of the device's assignment (0: the task's initial model).
    version: i64,
}

/// MC-PSGD: a version of a block's chain `y_m` (safetensors), for a device assigned to train it.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/blocks/{block}/chain", tag = "block_cyclic",
    params(("task_id" = String, Path), ("block" = String, Path), ChainQuery),
    responses(
        (status = 200, description = "the chain (safetensors)", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "`invalid_request` (the query)", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_block_cyclic`, `unknown_block`, `unknown_chain_version`", body = ErrorBody),
    ))]
async fn chain(
    State(state): State<AppState>,
    ApiPath((task_id, block)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<ChainQuery>,
) -> Result<Response, ApiError> {
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

/// The schedule's position, `r_m` of every block and the history of committed rounds.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/blocks", tag = "block_cyclic", security(("admin" = ["read-only"])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, body = BlockStatus),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_block_cyclic`", body = ErrorBody),
    ))]
async fn block_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
) -> Result<Json<BlockStatus>, ApiError> {
    authorize(&state, &headers, crate::access::Need::Read).await?;
    let status = state
        .strategy::<BlockCyclic>()?
        .block_status(state.coordinator.store(), &task_id)
        .await?;
    Ok(Json(status))
}
