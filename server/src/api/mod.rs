//! The HTTP API (axum). Handlers parse and authenticate; the [`Coordinator`] decides.
//!
//! Who: `anyone`; `device` (its upload token or FedLaAvg credentials); `read` (the admin token, or a
//! named token of scope `read-only` or `operator`); `operate` (the admin token or an `operator`
//! token); `admin` (the bootstrap admin token alone); `worker` (a DC-CCL or anonymous-embeddings
//! task's own worker token or a named `cloud-worker` token for that task). Without an admin token
//! (`--insecure-dev`) every `read`, `operate` and `admin` route is open. See [`crate::access`].
//!
//! | method | path | who | what |
//! |---|---|---|---|
//! | GET | /healthz | anyone | liveness |
//! | GET | /readyz | anyone | readiness: the database answers and the blob store is usable (`503 not_ready` otherwise) |
//! | GET | /metrics | read | Prometheus metrics of this server (see [`crate::telemetry`]) |
//! | GET | /ui | anyone (its data: read) | read-only dashboard (see [`ui`]) |
//! | GET | /openapi.json | anyone | this API's OpenAPI 3.1 description (see [`openapi`]) |
//! | POST | /v1/tasks | operate | create a task: multipart `config` (JSON) + `model` (safetensors) |
//! | GET | /v1/tasks | read | every task, newest first (`TaskSummary`) |
//! | GET | /v1/tasks/{id} | read | task status |
//! | POST | /v1/tasks/{id}/pause, /resume, /cancel | operate | stop handing out work, resume, or end the task now (`409 task_state_conflict` when its state does not allow it) |
//! | GET | /v1/tasks/{id}/rounds | read | every round with its counts |
//! | POST | /v1/enrolment-keys | operate | create an enrolment key (JSON `EnrolmentKeyRequest`); the key is shown once |
//! | GET | /v1/enrolment-keys | read | every enrolment key with its device count (no secrets) |
//! | DELETE | /v1/enrolment-keys/{key_id} | operate | revoke a key: no more enrolments, its devices refused at once |
//! | POST | /v1/devices | device (`Bearer <enrolment key>`) | enrol: a device id and secret valid for every task |
//! | GET | /v1/devices[?key_id=&after=&limit=] | read | enrolled devices by id, a page at a time (no secrets) |
//! | DELETE | /v1/devices/{device_id} | operate | revoke a device: refused from its next request |
//! | POST | /v1/tasks/{id}/checkin | device (`Bearer device_id:secret`: FedLaAvg and tasks with `require_enrolled_device`; optional, and checked when sent, elsewhere) | an assignment, or retry-after, or finished |
//! | POST | /v1/tasks/{id}/devices | device | FedLaAvg enrolment in this task only, no key (refused when the task requires enrolled devices) |
//! | GET | /v1/tasks/{id}/devices | read | FedLaAvg devices with their last participation |
//! | GET | /v1/tasks/{id}/model[?version=N] | device | model safetensors; ETag = version |
//! | PUT | /v1/updates?num_samples=N | device (upload token; `Fedhive-Device` where the task requires enrolled devices) | the update (safetensors of Delta) |
//! | POST | /v1/metrics | device (upload token; `Fedhive-Device` as for uploads) | loss, sample count, accuracy |
//! | GET | /v1/tasks/{id}/predictor[?block=NAME] | anyone | MM/MC-PSGD: predictor of the current (or named) block |
//! | GET | /v1/tasks/{id}/blocks/{name}/chain?version=N | device | MC-PSGD: the block's chain `y_m` |
//! | GET | /v1/tasks/{id}/blocks | read | MM/MC-PSGD: schedule position, `r_m` per block, round history |
//! | PUT | /v1/tasks/{id}/devices/{device_id}/features | device | FedSubAvg: enrol or re-enrol a feature set (JSON `FeatureSet`) |
//! | POST | /v1/tasks/{id}/submodel | device | FedSubAvg: dense tensors + the requested rows (JSON `RowsRequest` -> sparse safetensors) |
//! | POST | /v1/tasks/{id}/heat | read | FedSubAvg: population and per-row heat (JSON `RowsRequest` -> `HeatReport`; a POST that changes nothing) |
//! | GET | /v1/tasks/{id}/cloud | worker | DC-CCL: the round in progress, whether the cloud contributed, latest control version |
//! | PUT | /v1/tasks/{id}/rounds/{round}/cloud-update | worker | DC-CCL: the cloud's delta of `F_s` for the round (safetensors), once |
//! | PUT | /v1/tasks/{id}/control-model/{version} | worker | DC-CCL: publish control model `F_m` version N (the next one), immutable |
//! | GET | /v1/tasks/{id}/control-model[?version=N] | device | DC-CCL: control model safetensors; ETag = version |
//! | POST | /v1/tasks/{id}/anonymous/samples | anyone (no credential is read; `Idempotency-Key` required) | anonymous embeddings: labelled samples with their embeddings, stored once per key |
//! | GET | /v1/tasks/{id}/anonymous | worker | anonymous embeddings: batches, pending samples, the round and whether its model is in |
//! | GET | /v1/tasks/{id}/anonymous/batches/{n} | worker | anonymous embeddings: shuffled batch n (safetensors) |
//! | PUT | /v1/tasks/{id}/anonymous/rounds/{round}/model | worker | anonymous embeddings: the round's fine-tuned model (safetensors), once; the round commits it |
//! | POST | /v1/tokens | admin | create a named token (`NewToken` -> `TokenCreated`, the token shown once) |
//! | GET | /v1/tokens | admin | every named token (`TokenInfo`: names, scopes, times; never a token or hash) |
//! | DELETE | /v1/tokens/{name} | admin | revoke a named token: refused from the next request on |
//! | GET | /v1/audit[?limit=N&before=ID] | read | the audit log, newest first (`AuditEntry`) |
//!
//! A token that is missing, unknown or revoked is `401 unauthorized` (`worker_unauthorized` on the
//! worker's routes); a valid token without the scope is `403 forbidden`, naming the scope needed.
//!
//! One module per group of routes: [`tasks`] (every task), [`devices`] (enrolment keys and device
//! identity), one per strategy that has routes of its own ([`fedlaavg`], [`fedsubavg`],
//! [`block_cyclic`], [`dc_ccl`], [`anon_embeddings`]), which call that strategy directly, and
//! [`credentials`] (named tokens and the audit log).

mod anon_embeddings;
mod block_cyclic;
mod client_certificate;
mod common;
mod credentials;
mod dc_ccl;
mod devices;
mod fedlaavg;
mod fedsubavg;
mod observe;
mod openapi;
mod tasks;
mod ui;

use std::sync::Arc;

use axum::{Router, extract::DefaultBodyLimit};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use common::AppState;

/// Every route, each with its OpenAPI description.
fn described_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(tasks::routes())
        .merge(devices::routes())
        .merge(fedlaavg::routes())
        .merge(fedsubavg::routes())
        .merge(block_cyclic::routes())
        .merge(dc_ccl::routes())
        .merge(anon_embeddings::routes())
        .merge(credentials::routes())
        .merge(observe::routes())
        .merge(ui::routes())
}

pub fn router(state: AppState, max_model_bytes: usize) -> Router {
    let (routes, document) = described_routes().split_for_parts();
    let mut routes = routes.merge(openapi::route(&document));
    if state.client_certificates {
        let guarded = Arc::new(client_certificate::guarded_routes(&document));
        routes = routes.route_layer(axum::middleware::from_fn_with_state(
            guarded,
            client_certificate::require,
        ));
    }
    routes
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_model_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::track,
        ))
        // 5xx answers are logged where they arise (internal errors at `error`); `503 server_busy`
        // is routine pacing under load, not a failure to log thousands of times.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)))
        .with_state(state)
}

/// A path no route matches: a JSON error like every other refusal (axum's own answer has no body).
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> crate::error::ApiError {
    crate::error::ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// A route asked with a method it does not answer: a JSON error, as [`no_route`].
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> crate::error::ApiError {
    crate::error::ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
