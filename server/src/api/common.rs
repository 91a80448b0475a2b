//! What every handler shares: the app state, credentials, and request extraction errors.

use std::sync::Arc;

use axum::{
    Json,
    extract::rejection::JsonRejection,
    http::{HeaderMap, header},
};

use crate::{coordinator::Coordinator, error::ApiError, strategy::Strategy};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub coordinator: Arc<Coordinator>,
    /// `None` only when started with `--insecure-dev`.
    pub admin_token: Option<String>,
    /// An upload's body must arrive within this time once its upload slot is granted, so a slow
    /// or stalled client cannot hold one of the few slots for longer.
    pub body_read_timeout: std::time::Duration,
    /// Per-address limit on check-ins and uploads (`None`: off).
    pub rate_limit: Option<Arc<crate::rate_limit::RateLimiter>>,
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub(crate) fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.admin_token {
        None => Ok(()),
        Some(expected)
            if bearer(headers).is_some_and(|t| constant_time_eq(t.as_bytes(), expected.as_bytes())) =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::Unauthorized),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON body, or `400 invalid_request` naming what is wrong with it.
pub(crate) fn json<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t)
        .map_err(|e| ApiError::InvalidRequest(e.body_text()))
}

impl AppState {
    /// Counts a request from `peer` against its address's rate, if limits are on.
    pub(crate) fn check_rate(&self, peer: Option<std::net::SocketAddr>) -> Result<(), ApiError> {
        let (Some(limiter), Some(peer)) = (&self.rate_limit, peer) else {
            return Ok(());
        };
        limiter
            .check(peer.ip(), std::time::Instant::now())
            .map_err(|wait| ApiError::RateLimited {
                retry_after_ms: (wait.as_millis() as u64).max(1),
            })
    }

    /// The server's instance of strategy `S`, for the routes that only `S` serves.
    pub(crate) fn strategy<S: Strategy>(&self) -> Result<&S, ApiError> {
        self.coordinator.strategies().get::<S>().ok_or_else(|| {
            ApiError::Internal(format!(
                "strategy {} is not registered",
                std::any::type_name::<S>()
            ))
        })
    }
}
