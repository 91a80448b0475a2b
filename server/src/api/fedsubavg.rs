//! FedSubAvg's routes: feature-set enrolment, submodels and heat (merged into [`super::router`]).
//!
//! | method | path | who | what |
//! |---|---|---|---|
//! | PUT | /v1/tasks/{id}/devices/{device_id}/features | device | enrol or re-enrol a feature set (JSON `FeatureSet`) |
//! | POST | /v1/tasks/{id}/submodel | device | dense tensors + the requested rows (JSON `RowsRequest` -> sparse safetensors) |
//! | POST | /v1/tasks/{id}/heat | admin | population and per-row heat (JSON `RowsRequest` -> `HeatReport`) |
//!
//! Sparse updates go to `PUT /v1/updates` like dense ones; the task's strategy decides the format.

use axum::{
    Json, Router,
    extract::{Path, State, rejection::JsonRejection},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
    routing::{post, put},
};
use fedhive_shared::sparse::{Enrolment, FeatureSet, HeatReport, RowsRequest};

use super::common::{AppState, json, require_admin};
use crate::{error::ApiError, strategy::fedsubavg::FedSubAvg};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tasks/{task_id}/devices/{device_id}/features", put(enrol))
        .route("/v1/tasks/{task_id}/submodel", post(submodel))
        .route("/v1/tasks/{task_id}/heat", post(heat))
}

async fn enrol(
    State(state): State<AppState>,
    Path((task_id, device_id)): Path<(String, String)>,
    body: Result<Json<FeatureSet>, JsonRejection>,
) -> Result<Json<Enrolment>, ApiError> {
    let features = json(body)?;
    Ok(Json(
        state
            .strategy::<FedSubAvg>()?
            .enrol(state.coordinator.store(), &task_id, &device_id, features)
            .await?,
    ))
}

async fn submodel(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    body: Result<Json<RowsRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json(body)?;
    let (version, bytes) = state
        .strategy::<FedSubAvg>()?
        .submodel(state.coordinator.store(), &task_id, request)
        .await?;
    let version = HeaderValue::from_str(&format!("\"{version}\"")).expect("digits and quotes");
    let headers = [
        (header::HeaderName::from_static("fedhive-model-version"), version),
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
    ];
    Ok((headers, bytes).into_response())
}

async fn heat(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
    body: Result<Json<RowsRequest>, JsonRejection>,
) -> Result<Json<HeatReport>, ApiError> {
    require_admin(&state, &headers)?;
    let request = json(body)?;
    Ok(Json(
        state
            .strategy::<FedSubAvg>()?
            .heat(state.coordinator.store(), &task_id, request)
            .await?,
    ))
}
