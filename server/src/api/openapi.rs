//! `GET /openapi.json`: the API described from the code. Each handler carries its `#[utoipa::path]`
//! (method, path, parameters, bodies, every status it answers) and the route table is built from
//! those descriptions (`utoipa_axum::routes!`), so a route cannot exist undescribed; the wire types'
//! schemas come from `fedhive-shared` (feature `openapi`). CI runs schemathesis against it
//! (`tests/tests/openapi.rs`).

use axum::{
    Router,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::get,
};
use bytes::Bytes;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};

/// The document's fixed parts; the paths and schemas are added from the routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fedhive",
        description = "Federated-learning aggregation server: tasks, rounds, device check-ins, model \
                       downloads and update uploads. Every refusal is a 4xx (or 503) with a JSON \
                       `ErrorBody` whose `error` is a stable code; binary bodies (models, updates) are \
                       safetensors."
    ),
    modifiers(&Credentials),
    tags(
        (name = "tasks", description = "Creating, listing and steering tasks (operators)."),
        (name = "devices", description = "What devices call: check-in, model download, upload, metrics."),
        (name = "enrolment", description = "Device identity: enrolment keys (operators), enrolment with a key (devices), device revocation."),
        (name = "fedsubavg", description = "FedSubAvg: feature sets, submodels and row heat."),
        (name = "fedlaavg", description = "FedLaAvg: per-task device enrolment and the task's devices."),
        (name = "block_cyclic", description = "MM-PSGD and MC-PSGD: predictors, chains, the block schedule."),
        (name = "dc_ccl", description = "DC-CCL: the cloud worker's routes and the control model."),
        (name = "anon_embeddings", description = "Anonymous embeddings: samples with no credential, the cloud worker's batches and round models."),
        (name = "access", description = "Named operator tokens (the admin's) and the audit log."),
        (name = "operations", description = "Health, readiness, metrics and the dashboard."),
    )
)]
pub(super) struct ApiDoc;

/// The credentials the routes name in their `security`: all are `Authorization: Bearer ...` (an
/// upload's device credential, beside its upload token, is the `Fedhive-Device` header parameter).
struct Credentials;

impl Modify for Credentials {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_string());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "admin",
            bearer(
                "The bootstrap admin token (`--admin-token`, `FEDHIVE_ADMIN_TOKEN`), or a named token \
                 (`POST /v1/tokens`) with the scope the route lists: `read-only` (or `operator`) to read, \
                 `operator` to change tasks, `admin` (the bootstrap token only) to manage tokens.",
            ),
        );
        components.add_security_scheme(
            "upload_token",
            bearer("The upload token of a device's assignment (from its check-in)."),
        );
        components.add_security_scheme(
            "device",
            bearer(
                "`device_id:device_secret` from `POST /v1/devices` (every task) or FedLaAvg's per-task \
                 enrolment (that task). Needed by FedLaAvg and by tasks with `require_enrolled_device`.",
            ),
        );
        components.add_security_scheme(
            "enrolment_key",
            bearer("An enrolment key `<key_id>:<secret>` (from `POST /v1/enrolment-keys`), shipped with the app."),
        );
        components.add_security_scheme(
            "worker_token",
            bearer(
                "DC-CCL and anonymous embeddings: the task's cloud-worker token (returned when the \
                 task is created), or a named `cloud-worker` token for the task.",
            ),
        );
    }
}

/// The route serving `document` (rendered once).
pub(super) fn route<S: Clone + Send + Sync + 'static>(document: &utoipa::openapi::OpenApi) -> Router<S> {
    // Rendered once; each answer shares the bytes.
    let json = Bytes::from(document.to_json().expect("the OpenAPI document serialises"));
    Router::new().route(
        "/openapi.json",
        get(move || {
            let json = json.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
                    json,
                )
                    .into_response()
            }
        }),
    )
}
