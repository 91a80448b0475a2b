//! Anonymous embeddings' routes: the devices' submission of samples, which takes no credential
//! and reads nothing that could name its sender (no `Authorization`, no `Fedhive-Device`, not the
//! peer address, so no per-address rate limit either), and the cloud worker's (its status, the
//! shuffled batches, the model of each round; with the task's worker token or a named
//! `cloud-worker` token for the task).

use axum::{
    Json,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use fedhive_shared::wire::{AnonStatus, ArtifactReceipt, ErrorBody, SamplesAccepted};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{ApiPath, AppState, authorize_worker, discard_body, read_body};
use crate::{
    access::{Action, Principal},
    db::TaskRow,
    error::ApiError,
    strategy::anon_embeddings::{AnonEmbeddings, check_idempotency_key},
};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit_samples))
        .routes(routes!(anon_status))
        .routes(routes!(batch))
        .routes(routes!(round_model))
}

/// The anonymous-embeddings task, if the request is its cloud worker's.
async fn worker_task(
    state: &AppState,
    anon: &AnonEmbeddings,
    task_id: &str,
    headers: &HeaderMap,
) -> Result<(TaskRow, Principal), ApiError> {
    let task = anon.task(state.coordinator.store(), task_id).await?;
    let who = authorize_worker(state, task_id, headers).await?;
    Ok((task, who))
}

/// Labelled samples with their embeddings, from no one in particular: no credential is read, and
/// nothing about the request is stored beside the samples. Stored exactly once per
/// `Idempotency-Key` (a retry answers `duplicate: true` and stores nothing).
#[utoipa::path(post, path = "/v1/tasks/{task_id}/anonymous/samples", tag = "anon_embeddings",
    params(("task_id" = String, Path),
        ("Idempotency-Key" = String, Header, description = "32 lowercase hex characters, fresh and random for each submission (repeated by its retries)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "safetensors: `inputs` [n, features], `embeddings` [n, embedding_dim], `labels` [n] (F32)"),
    responses(
        (status = 200, body = SamplesAccepted),
        (status = 400, description = "`bad_idempotency_key`, `bad_body`, or a samples code (`malformed_tensors`, `missing_tensor`, `shape_mismatch`, `non_finite_value`, `value_out_of_range`, `no_samples`, `too_many_samples`, `bad_label`, ...)", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_anon_embeddings`", body = ErrorBody),
        (status = 408, description = "`body_timeout`", body = ErrorBody),
        (status = 409, description = "`task_state_conflict`: the task is not running", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 429, description = "`sample_budget_exhausted`: the task's global budget", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
        (status = 503, description = "`server_busy`: as many bodies as the server reads at once (uploads included); send the same submission again after `retry_after_ms`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
    ))]
async fn submit_samples(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<SamplesAccepted>, ApiError> {
    let result = submit(&state, &task_id, &headers, body).await;
    // An unknown task id is not a label: anyone can send any number of them.
    let known = !matches!(result, Err(ApiError::UnknownTask(_)));
    let outcome = result
        .as_ref()
        .map(|a| if a.duplicate { "duplicate" } else { "accepted" });
    state
        .coordinator
        .telemetry()
        .anon_submission(if known { &task_id } else { "" }, outcome);
    Ok(Json(result?))
}

async fn submit(
    state: &AppState,
    task_id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<SamplesAccepted, ApiError> {
    let anon = state.strategy::<AnonEmbeddings>()?;
    let store = state.coordinator.store();
    let key = headers.get("idempotency-key").map(|v| v.to_str().unwrap_or(""));
    let key = check_idempotency_key(key)?.to_string();
    let task = anon.task(store, task_id).await?;
    if task.state != fedhive_shared::wire::TaskState::Running {
        return Err(ApiError::TaskStateConflict {
            task: task.id.clone(),
            state: task.state.name(),
            action: "submit samples to",
        });
    }
    let limit = anon.samples_limit(&task.config);
    // Held until the submission is stored: sample bodies share the uploads' bound on bodies in
    // memory (the slot's queue is first come, first served: it knows no sender).
    let _slot = match state.coordinator.upload_slot().await {
        Ok(slot) => slot,
        Err(busy) => {
            discard_body(body, headers, limit, state.body_read_timeout).await;
            return Err(busy);
        }
    };
    let body = read_body(body, headers, limit, state.body_read_timeout).await?;
    let config = task.config.clone();
    let samples =
        tokio::task::spawn_blocking(move || AnonEmbeddings::decode_samples(&config, &body)).await??;
    anon.spend_budget(&task, samples.len())?;
    anon.submit(store, &task, &key, &samples).await
}

/// What the cloud worker needs: batches so far, samples waiting to be mixed, the round in progress
/// and whether it holds the worker's model.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/anonymous", tag = "anon_embeddings",
    security(("worker_token" = [])),
    params(("task_id" = String, Path)),
    responses(
        (status = 200, body = AnonStatus),
        (status = 401, description = "`worker_unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: a named token of another scope or task", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_anon_embeddings`", body = ErrorBody),
    ))]
async fn anon_status(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<AnonStatus>, ApiError> {
    let anon = state.strategy::<AnonEmbeddings>()?;
    let (task, _) = worker_task(&state, anon, &task_id, &headers).await?;
    Ok(Json(anon.status(state.coordinator.store(), &task).await?))
}

/// Shuffled batch `number` (1, 2, ...) of the task's samples, as safetensors of the submissions'
/// layout. Batches never change.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/anonymous/batches/{number}", tag = "anon_embeddings",
    security(("worker_token" = [])),
    params(("task_id" = String, Path), ("number" = i64, Path, description = "from 1")),
    responses(
        (status = 200, description = "the batch (safetensors)", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "`invalid_request` (the path)", body = ErrorBody),
        (status = 401, description = "`worker_unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: a named token of another scope or task", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_anon_embeddings`, `unknown_batch`", body = ErrorBody),
    ))]
async fn batch(
    State(state): State<AppState>,
    ApiPath((task_id, number)): ApiPath<(String, i64)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let anon = state.strategy::<AnonEmbeddings>()?;
    let (task, _) = worker_task(&state, anon, &task_id, &headers).await?;
    let bytes = anon.batch(state.coordinator.store(), &task, number).await?;
    let content_type = HeaderValue::from_static("application/octet-stream");
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}

/// The model the worker fine-tuned for a round (whole weights of the task's tensors), which the
/// round commits as the task's next version; once per round: the same bytes again get the stored
/// receipt, other bytes `409 round_model_conflict`.
#[utoipa::path(put, path = "/v1/tasks/{task_id}/anonymous/rounds/{round_id}/model", tag = "anon_embeddings",
    security(("worker_token" = [])),
    params(("task_id" = String, Path), ("round_id" = i64, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "safetensors"),
    responses(
        (status = 200, body = ArtifactReceipt),
        (status = 400, description = "`invalid_request` (the path), `bad_body`", body = ErrorBody),
        (status = 401, description = "`worker_unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: a named token of another scope or task", body = ErrorBody),
        (status = 404, description = "`unknown_task`, `not_anon_embeddings`, `unknown_round`", body = ErrorBody),
        (status = 408, description = "`body_timeout`", body = ErrorBody),
        (status = 409, description = "`round_closed`, `round_model_conflict`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "a tensor code (`missing_tensor`, `shape_mismatch`, `non_finite_value`, ...)", body = ErrorBody),
    ))]
async fn round_model(
    State(state): State<AppState>,
    ApiPath((task_id, round_id)): ApiPath<(String, i64)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ArtifactReceipt>, ApiError> {
    let anon = state.strategy::<AnonEmbeddings>()?;
    let (task, who) = worker_task(&state, anon, &task_id, &headers).await?;
    let limit = crate::strategy::Strategy::upload_limit(anon, &task.config);
    let submitted = async {
        let body = read_body(body, &headers, limit, state.body_read_timeout).await?;
        anon.submit_round_model(state.coordinator.store(), &task, round_id, body)
            .await
    }
    .await;
    let target = format!("{task_id}/{round_id}");
    state
        .audit_after(&who, Action::CloudRoundModel, &target, &submitted, true)
        .await;
    let (receipt, full) = submitted?;
    if full {
        state.coordinator.finalize_in_background(round_id);
    }
    Ok(Json(receipt))
}
