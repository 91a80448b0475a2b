//! `GET /metrics`, and the middleware that times every request and counts its body bytes.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    body::Body,
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, HeaderValue, Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use fedhive_shared::wire::ErrorBody;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::common::{AppState, authorize};
use crate::{error::ApiError, telemetry};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// The server's metrics (operator token, like every operator endpoint: task ids and load are not
/// for the internet).
#[utoipa::path(get, path = "/metrics", tag = "operations", security(("admin" = ["read-only"])),
    responses(
        (status = 200, description = "Prometheus (OpenMetrics) text", body = String,
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the scope", body = ErrorBody),
    ))]
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, crate::access::Need::Read).await?;
    let text = state.coordinator.render_metrics();
    let content_type = HeaderValue::from_static(telemetry::CONTENT_TYPE);
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// The `method` label: the standard methods by name, any other (a client may send any token as its
/// method) as `other`, so clients cannot grow the number of series.
fn method_label(method: &Method) -> &'static str {
    static STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    STANDARD
        .iter()
        .find(|m| *m == method)
        .map_or("other", Method::as_str)
}

/// Times the request and counts its body bytes in and out, labelled by route template.
pub(super) async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let method = method_label(request.method()).to_string();
    let telemetry = state.coordinator.telemetry();
    let request = request.map(|body| {
        Body::new(Counted {
            inner: body,
            bytes: telemetry.request_body_counter(&route, &method),
        })
    });
    let response = next.run(request).await;
    telemetry.request(&route, &method, response.status().as_u16(), started.elapsed());
    response.map(|body| {
        Body::new(Counted {
            inner: body,
            bytes: telemetry.response_body_counter(&route, &method),
        })
    })
}

/// A body that adds the length of each data frame to a counter as it passes.
struct Counted {
    inner: Body,
    bytes: Counter,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_standard_ones_share_one_label() {
        assert_eq!(method_label(&Method::PUT), "PUT");
        assert_eq!(method_label(&Method::from_bytes(b"QUERY").unwrap()), "other");
        assert_eq!(
            method_label(&Method::from_bytes(b"X-ANYTHING-1").unwrap()),
            "other"
        );
    }
}
