//! What every handler shares: the app state, credentials, and request extraction errors.

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    Json,
    body::Body,
    extract::{FromRequest, FromRequestParts, Path, Query, Request},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::{
    access::{Action, AuditRecord, Need, Principal},
    body_buffers::BodyBuffers,
    coordinator::Coordinator,
    error::ApiError,
    store::{HashedBody, UploadBody, constant_time_eq, now_ms, sha256_hex},
    strategy::Strategy,
};

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
    /// Proxies (load balancers) whose `X-Forwarded-For` names the address a request came from.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// Operator and cloud-worker routes need a verified client certificate (`--tls-client-ca`).
    pub client_certificates: bool,
}

/// The address a request came from: its peer's, unless the peer is a trusted proxy; then the
/// nearest address in `X-Forwarded-For` (read from the right, as each proxy appends the address it
/// saw) that is not a trusted proxy itself. Entries left of that one could be forged by the
/// client, so they are never read; an entry that is not an address ends the walk at the proxy
/// before it.
pub(crate) fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer;
    if !is_trusted(&client) {
        return client;
    }
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else {
            return client;
        };
        for hop in value.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if is_trusted(&ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
    }
    client
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The header that carries a device credential (`device_id:device_secret`) where `Authorization`
/// holds something else: the upload token of an upload or a metrics report.
pub(crate) const DEVICE_HEADER: &str = "fedhive-device";

/// The request's device credential from [`DEVICE_HEADER`], if any.
pub(crate) fn device_header(headers: &HeaderMap) -> Option<&str> {
    headers.get(DEVICE_HEADER)?.to_str().ok().map(str::trim)
}

/// The caller, if its credential allows `need`: the bootstrap admin token (compared in constant
/// time) or a named token that is not revoked. `401 unauthorized` for no token, an unknown or a
/// revoked one; `403 forbidden` for a token without the scope. Without an admin token
/// (`--insecure-dev`) every caller is [`Principal::InsecureDev`]. Refusals are counted, not audited
/// (see [`crate::access`]).
pub(crate) async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    need: Need<'_>,
) -> Result<Principal, ApiError> {
    let result = match identify(state, headers).await {
        Ok(who) => who.require(need).map(|()| who),
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        state.credential_refused(e);
    }
    result
}

async fn identify(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let Some(admin) = &state.admin_token else {
        return Ok(Principal::InsecureDev);
    };
    let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
    if constant_time_eq(token.as_bytes(), admin.as_bytes()) {
        return Ok(Principal::Admin);
    }
    named_token(state, token).await?.ok_or(ApiError::Unauthorized)
}

/// The task's cloud worker: the task's own worker token ([`crate::strategy::worker`]) or a named
/// `cloud-worker` token for the task. `401 worker_unauthorized` for no token, an unknown or a
/// revoked one; `403 forbidden` for a named token of another scope or task. (The admin token is not
/// a worker's.) The caller checks first that the task is one of its strategy's.
pub(crate) async fn authorize_worker(
    state: &AppState,
    task_id: &str,
    headers: &HeaderMap,
) -> Result<Principal, ApiError> {
    let token = bearer(headers);
    if crate::strategy::worker::is_task_worker(state.coordinator.store(), task_id, token).await? {
        return Ok(Principal::TaskWorker(task_id.to_string()));
    }
    let named = match token {
        Some(token) => named_token(state, token).await?,
        None => None,
    };
    match named {
        Some(who) => who.require(Need::Worker(task_id)).map(|()| who),
        None => Err(ApiError::WorkerUnauthorized(task_id.to_string())),
    }
    .inspect_err(|e| state.credential_refused(e))
}

/// The named token `token` is, unless it is unknown or revoked (read on every request, so a
/// revocation holds from the next one); notes its use at most once a minute. It is found by its
/// SHA-256: the lookup's timing depends only on that hash, which does not lead back to a token of
/// 256 random bits.
pub(crate) async fn named_token(state: &AppState, token: &str) -> Result<Option<Principal>, ApiError> {
    let db = state.coordinator.db();
    let Some(found) = db.active_operator_token(&sha256_hex(token.as_bytes())).await? else {
        return Ok(None);
    };
    let now = now_ms();
    if found.last_used_ms.is_none_or(|used| now - used >= 60_000) {
        db.touch_operator_token(&found.name, now).await?;
    }
    Ok(Some(Principal::Token {
        name: found.name,
        scope: found.scope,
        task_id: found.task_id,
    }))
}

/// axum's `Path`, `Query` and `Json` extractors refuse with a plain-text body; these wrap them so a
/// malformed path segment, query string or JSON body is a `400 invalid_request` JSON error like
/// every other refusal, naming what is wrong.
pub(crate) struct ApiPath<T>(pub T);

/// See [`ApiPath`].
pub(crate) struct ApiQuery<T>(pub T);

/// See [`ApiPath`].
pub(crate) struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError::InvalidRequest(e.body_text())),
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(ApiError::InvalidRequest(e.body_text())),
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(e) => Err(ApiError::InvalidRequest(e.body_text())),
        }
    }
}

impl AppState {
    /// Counts a request from `peer` against its client's address's rate, if limits are on.
    pub(crate) fn check_rate(
        &self,
        peer: Option<std::net::SocketAddr>,
        headers: &HeaderMap,
    ) -> Result<(), ApiError> {
        let (Some(limiter), Some(peer)) = (&self.rate_limit, peer) else {
            return Ok(());
        };
        let client = client_address(peer.ip(), headers, &self.trusted_proxies);
        limiter
            .check(&client, std::time::Instant::now())
            .map_err(|wait| ApiError::RateLimited {
                retry_after_ms: (wait.as_millis() as u64).max(1),
                from: "address",
            })
    }

    /// Counts (and, for a token without the scope, logs) a request refused for its credential.
    pub(crate) fn credential_refused(&self, error: &ApiError) {
        self.coordinator.telemetry().credential_refused(error);
        if matches!(error, ApiError::Forbidden { .. }) {
            tracing::warn!(%error, "request refused: token lacks the scope");
        }
    }

    /// Writes the audit line of an action that was not written with its change: its refusal
    /// (`Err`), or its success when `success_too` (an action that is not one transaction). A
    /// failure to write is logged, not answered: the action has already happened or not.
    pub(crate) async fn audit_after<T>(
        &self,
        who: &Principal,
        action: Action,
        target: &str,
        result: &Result<T, ApiError>,
        success_too: bool,
    ) {
        let record = match result {
            Ok(_) if !success_too => return,
            Ok(_) => AuditRecord::ok(who, action, target),
            Err(e) => AuditRecord::refused(who, action, target, e.code()),
        };
        if let Err(e) = self.coordinator.db().record_audit(&record, now_ms()).await {
            tracing::error!(error = %e, action = action.name(), target, "writing the audit log failed");
        }
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

/// Whether the request's `If-None-Match` lists `etag` (quoted, as sent in `ETag`).
pub(crate) fn etag_matches(request: &HeaderMap, etag: &str) -> bool {
    request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
}

/// A versioned, immutable blob (a model or control model): the version is its ETag (and the
/// `version_header`), `If-None-Match` with it answers `304`. A request for an explicit version may
/// be cached for good; the latest is revalidated.
pub(crate) fn versioned_blob(
    version_header: &'static str,
    version: i64,
    pinned: bool,
    bytes: Bytes,
    request: &HeaderMap,
) -> Response {
    let cache = if pinned {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let etag = format!("\"{version}\"");
    let etag_value = HeaderValue::from_str(&etag).expect("digits and quotes are a valid header");
    let not_modified = etag_matches(request, &etag);
    let common = [
        (header::ETAG, etag_value.clone()),
        (HeaderName::from_static(version_header), etag_value),
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
    ];
    if not_modified {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    )];
    (common, content_type, bytes).into_response()
}

/// Reads a request body of at most `limit` bytes within `timeout`: `413` at once when the declared
/// length is over the limit, or as soon as the bytes read pass it (chunked bodies), `408` when it
/// is too slow.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let mut buf = Vec::with_capacity(declared_length(headers, limit)?);
    read_body_into(body, limit, timeout, |chunk| buf.extend_from_slice(chunk)).await?;
    Ok(Bytes::from(buf))
}

/// An upload's request body, read by the coordinator once the upload holds a slot.
pub(crate) struct RequestBody<'a> {
    pub body: Body,
    pub headers: &'a HeaderMap,
    pub timeout: Duration,
    pub buffers: &'a Arc<BodyBuffers>,
}

impl UploadBody for RequestBody<'_> {
    /// [`read_body`] into a buffer of `buffers` (given back once the body's bytes are dropped),
    /// hashing each chunk as it arrives: the digest costs no pass of its own over the finished
    /// buffer, and is ready the moment the last byte is.
    async fn read(self, limit: usize) -> Result<HashedBody, ApiError> {
        let mut buf = self.buffers.take(declared_length(self.headers, limit)?);
        let mut hasher = Sha256::new();
        read_body_into(self.body, limit, self.timeout, |chunk| {
            hasher.update(chunk);
            buf.extend_from_slice(chunk);
        })
        .await?;
        Ok(HashedBody {
            bytes: buf.freeze(),
            sha256: hex::encode(hasher.finalize()),
        })
    }

    async fn discard(self, limit: usize) {
        discard_body(self.body, self.headers, limit, self.timeout).await
    }
}

/// Reads a refused request's body to its end and drops it, so that a client still sending gets the
/// answer (a server that answers and closes with bytes unread resets the connection) and can keep
/// the connection. A body over the limit, too slow or broken is left unread: the connection then
/// closes.
pub(crate) async fn discard_body(body: Body, headers: &HeaderMap, limit: usize, timeout: Duration) {
    if declared_length(headers, limit).is_ok() {
        let _ = read_body_into(body, limit, timeout, |_| {}).await;
    }
}

/// The body's declared length (0 when none is), refused with `413` when over `limit`.
fn declared_length(headers: &HeaderMap, limit: usize) -> Result<usize, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(size) if size > limit => Err(ApiError::BodyTooLarge { size, limit }),
        other => Ok(other.unwrap_or(0)),
    }
}

/// Reads a body of at most `limit` bytes within `timeout`, giving each chunk to `append` (which
/// copies it into a buffer sized beforehand from the declared length, so a model-sized upload is
/// held once: collecting the frames and then joining them would hold it twice).
async fn read_body_into(
    mut body: Body,
    limit: usize,
    timeout: Duration,
    mut append: impl FnMut(&[u8]),
) -> Result<(), ApiError> {
    use http_body_util::BodyExt;
    let read = async {
        let mut size = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::BadBody(e.to_string()))?;
            let Ok(chunk) = frame.into_data() else {
                continue; // trailers
            };
            size += chunk.len();
            if size > limit {
                return Err(ApiError::BodyTooLarge { size, limit });
            }
            append(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout {
            secs: timeout.as_secs(),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn the_client_address_is_read_only_through_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "192.0.2.7/32".parse().unwrap()];
        let from = |peer: &str, values: &[&str]| client_address(ip(peer), &forwarded(values), &trusted);
        // A peer that is not a proxy is the client, whatever it claims.
        assert_eq!(from("203.0.113.5", &["198.51.100.1"]), ip("203.0.113.5"));
        // Through one proxy: the address it appended.
        assert_eq!(from("10.1.2.3", &["198.51.100.1"]), ip("198.51.100.1"));
        // A forged entry left of the proxy's is not read; nor is anything past the first
        // untrusted hop, in one header or in several.
        assert_eq!(from("10.1.2.3", &["6.6.6.6, 198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(from("10.1.2.3", &["6.6.6.6", "198.51.100.1"]), ip("198.51.100.1"));
        // Two proxies in a row: the address the outer one saw.
        assert_eq!(from("10.1.2.3", &["198.51.100.1, 192.0.2.7"]), ip("198.51.100.1"));
        assert_eq!(from("10.1.2.3", &["2001:db8::1", "192.0.2.7"]), ip("2001:db8::1"));
        // No header, or junk: the nearest proxy (its own bucket, not a forged one).
        assert_eq!(from("10.1.2.3", &[]), ip("10.1.2.3"));
        assert_eq!(
            from("10.1.2.3", &["198.51.100.1, not-an-address"]),
            ip("10.1.2.3")
        );
        assert_eq!(from("10.1.2.3", &["6.6.6.6, junk, 192.0.2.7"]), ip("192.0.2.7"));
        // Without trusted proxies the header is never read.
        assert_eq!(
            client_address(ip("10.1.2.3"), &forwarded(&["198.51.100.1"]), &[]),
            ip("10.1.2.3")
        );
    }
}
