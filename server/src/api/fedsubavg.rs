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
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use fedhive_shared::{
    sparse::{Enrolment, FeatureSet, HeatReport, RowsRequest},
    wire::ErrorBody,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{ApiJson, ApiPath, AppState, authorize};
use crate::{error::ApiError, strategy::fedsubavg::FedSubAvg};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enrol))
        .routes(routes!(submodel))
        .routes(routes!(heat))
}

/// Enrols (or re-enrols) a device's feature set: the rows of each table its data touches and its
/// sample count. The heat of each row counts the devices that hold it.
#[utoipa::path(put, path = "/v1/tasks/{task_id}/devices/{device_id}/features", tag = "fedsubavg",
    params(("task_id" = String, Path), ("device_id" = String, Path, description = "the app's pseudonymous id of the device", pattern = "^[A-Za-z0-9._-]{1,128}$")),
    request_body = FeatureSet,
    responses(
        (status = 200, body = Enrolment),
        (status = 400, description = "`invalid_request` (the body, the device id or a row id), `not_fedsubavg`", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
        (status = 409, description = "`round_closing`: feature sets are frozen while a round is finalised; retry shortly", body = ErrorBody),
        (status = 422, description = "`bad_num_samples`, `unknown_row`, `duplicate_row`, `too_many_rows`, or a tensor code (an unknown table)", body = ErrorBody),
    ))]
async fn enrol(
    State(state): State<AppState>,
    ApiPath((task_id, device_id)): ApiPath<(String, String)>,
    ApiJson(features): ApiJson<FeatureSet>,
) -> Result<Json<Enrolment>, ApiError> {
    Ok(Json(
        state
            .strategy::<FedSubAvg>()?
            .enrol(state.coordinator.store(), &task_id, &device_id, features)
            .await?,
    ))
}

/// The dense tensors and the requested rows of each table, at the device's model version, as
/// sparse safetensors.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/submodel", tag = "fedsubavg",
    params(("task_id" = String, Path)),
    request_body = RowsRequest,
    responses(
        (status = 200, description = "sparse safetensors", body = Vec<u8>, content_type = "application/octet-stream",
            headers(("fedhive-model-version" = String))),
        (status = 400, description = "`invalid_request` (the body), `not_fedsubavg`", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `unknown_model_version`", body = ErrorBody),
        (status = 409, description = "`stale_model_version`: check in again", body = ErrorBody),
        (status = 422, description = "`unknown_row`, `duplicate_row`, `too_many_rows`, or a tensor code (an unknown table)", body = ErrorBody),
    ))]
async fn submodel(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    ApiJson(request): ApiJson<RowsRequest>,
) -> Result<Response, ApiError> {
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

/// The enrolled population and the heat of the requested rows (for operators and tests).
#[utoipa::path(post, path = "/v1/tasks/{task_id}/heat", tag = "fedsubavg", security(("admin" = ["read-only"])),
    params(("task_id" = String, Path)),
    request_body = RowsRequest,
    responses(
        (status = 200, body = HeatReport),
        (status = 400, description = "`invalid_request` (the body), `not_fedsubavg`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
        (status = 404, description = "`unknown_task`", body = ErrorBody),
        (status = 422, description = "`unknown_row`, `duplicate_row`, `too_many_rows`, or a tensor code (an unknown table)", body = ErrorBody),
    ))]
async fn heat(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(task_id): ApiPath<String>,
    ApiJson(request): ApiJson<RowsRequest>,
) -> Result<Json<HeatReport>, ApiError> {
    authorize(&state, &headers, crate::access::Need::Read).await?;
    Ok(Json(
        state
            .strategy::<FedSubAvg>()?
            .heat(state.coordinator.store(), &task_id, request)
            .await?,
    ))
}
