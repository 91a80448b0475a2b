//! `GET /ui`: a read-only dashboard. The page and its script are public and hold no data; the
//! script reads the operator endpoints (`/v1/tasks`, rounds, `/metrics`) with the operator token,
//! which the operator passes in the URL's fragment (`/ui#token=...`, never sent to the server or
//! written to its logs) or types into the page; it is kept for the browser tab only.

use axum::{
    http::{HeaderValue, header},
    response::IntoResponse,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::AppState;

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");

/// Only this server's own script and API; inline styles in the page.
const POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
                      img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(page)).routes(routes!(script))
}

/// The dashboard's page.
#[utoipa::path(get, path = "/ui", tag = "operations",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html; charset=utf-8")))]
async fn page() -> impl IntoResponse {
    asset("text/html; charset=utf-8", PAGE)
}

/// The dashboard's script.
#[utoipa::path(get, path = "/ui/app.js", tag = "operations",
    responses((status = 200, description = "JavaScript", body = String, content_type = "text/javascript; charset=utf-8")))]
async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY)),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
}
