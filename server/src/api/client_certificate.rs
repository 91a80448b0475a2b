//! With `--tls-client-ca`, operators and the cloud worker prove themselves twice: their bearer token
//! and a client certificate from the operators' CA. Which routes need the certificate is read from
//! the OpenAPI description: every operation whose security names the `admin` or `worker_token`
//! scheme. A route cannot be added for operators without saying so there, so none is left unguarded.

use std::{collections::HashSet, sync::Arc};

use axum::{
    extract::{MatchedPath, Request, State},
    http::Method,
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{error::ApiError, tls::ClientCertificate};

/// The security schemes of operators and the cloud worker (see `openapi.rs`).
const GUARDED_SCHEMES: [&str; 2] = ["admin", "worker_token"];

/// (method, route template) of every operation that a guarded scheme protects.
pub(super) type GuardedRoutes = HashSet<(Method, String)>;

pub(super) fn guarded_routes(document: &utoipa::openapi::OpenApi) -> GuardedRoutes {
    let document = serde_json::to_value(document).expect("the OpenAPI document serialises");
    let mut guarded = HashSet::new();
    let Some(paths) = document["paths"].as_object() else {
        return guarded;
    };
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().into_iter().flatten() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let secured = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|requirement| requirement.as_object())
                .any(|requirement| {
                    GUARDED_SCHEMES
                        .iter()
                        .any(|scheme| requirement.contains_key(*scheme))
                });
            if secured {
                guarded.insert((method, path.clone()));
            }
        }
    }
    guarded
}

/// Refuses a guarded route's request whose connection presented no verified client certificate.
pub(super) async fn require(
    State(guarded): State<Arc<GuardedRoutes>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
    let needs_certificate =
        route.is_some_and(|route| guarded.contains(&(request.method().clone(), route.to_string())));
    if needs_certificate && request.extensions().get::<ClientCertificate>().is_none() {
        return ApiError::ClientCertificateRequired.into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_and_worker_routes_are_guarded_and_device_routes_are_not() {
        let (_, document) = super::super::described_routes().split_for_parts();
        let guarded = guarded_routes(&document);
        let has = |method: Method, path: &str| guarded.contains(&(method, path.to_string()));
        assert!(has(Method::POST, "/v1/tasks"), "{guarded:?}");
        assert!(has(Method::GET, "/v1/tasks/{task_id}"), "{guarded:?}");
        assert!(has(Method::POST, "/v1/tasks/{task_id}/cancel"), "{guarded:?}");
        assert!(
            has(Method::PUT, "/v1/tasks/{task_id}/rounds/{round_id}/cloud-update"),
            "{guarded:?}"
        );
        assert!(!has(Method::POST, "/v1/tasks/{task_id}/checkin"), "{guarded:?}");
        assert!(!has(Method::GET, "/v1/tasks/{task_id}/model"), "{guarded:?}");
        assert!(!has(Method::PUT, "/v1/updates"), "{guarded:?}");
    }
}
