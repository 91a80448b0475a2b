//! The API's error type: every refusal is an HTTP status plus a JSON [`ErrorBody`] with a stable code
//! and a message naming the offending field and value.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use fedhive_shared::{
    TensorError, anon::SamplesError, fedavg::AggregateError, sparse::SparseError, wire::ErrorBody,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing, unknown or revoked operator token")]
    Unauthorized,
    #[error("{who} may not do this: it needs {needed}")]
    Forbidden { who: String, needed: String },
    #[error("no operator token is named `{0}`")]
    UnknownOperatorToken(String),
    #[error("the token name `{0}` is taken (names are not reused, even after a revocation)")]
    TokenNameTaken(String),
    #[error("no route {method} {path}: the API's routes are in /openapi.json")]
    NoRoute { method: String, path: String },
    #[error("{path} does not answer {method}: the API's routes are in /openapi.json")]
    MethodNotAllowed { method: String, path: String },
    #[error("task `{0}` does not exist")]
    UnknownTask(String),
    #[error("model version {version} of task `{task}` does not exist")]
    UnknownModelVersion { task: String, version: i64 },
    #[error("upload token is not valid for any round")]
    UnknownToken,
    #[error("missing `Authorization: Bearer <upload token>` header")]
    MissingToken,
    #[error("device not recognised: {0}")]
    DeviceUnauthorized(String),
    #[error("device `{0}` was revoked by an operator; its credential is refused")]
    DeviceRevoked(String),
    #[error(
        "missing or unknown enrolment key: send `Authorization: Bearer <key_id>:<secret>` as the operator issued it"
    )]
    EnrolmentKeyUnauthorized,
    #[error("enrolment key `{0}` was revoked: it enrols no device and the devices it enrolled are refused")]
    EnrolmentKeyRevoked(String),
    #[error("enrolment key `{0}` does not exist")]
    UnknownEnrolmentKey(String),
    #[error("device `{0}` does not exist")]
    UnknownDevice(String),
    #[error("round {0} no longer accepts uploads (committed, abandoned, full or past its deadline)")]
    RoundClosed(i64),
    #[error("an upload with this token is still being processed; retry when it has finished")]
    UploadInFlight,
    #[error("this token already uploaded a different update (sha256 {stored}); a token uploads once")]
    ConflictingRetry { stored: String },
    #[error("body of {size} bytes exceeds the limit of {limit} bytes for this task")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("could not read the request body: {0}")]
    BadBody(String),
    #[error("the request body did not arrive within {secs} s; retry on a faster connection")]
    BodyTimeout { secs: u64 },
    #[error("{0}")]
    Tensor(#[from] TensorError),
    #[error("{0}")]
    Aggregate(#[from] AggregateError),
    #[error("{0}")]
    Sparse(#[from] SparseError),
    #[error("task `{0}` does not use FedSubAvg (no sparse tables)")]
    NotSparse(String),
    #[error("model version {requested} is no longer served (current: {current}); check in again")]
    StaleModelVersion { requested: i64, current: i64 },
    #[error("round {0} is being finalised; feature sets are frozen until it ends, retry shortly")]
    RoundClosing(i64),
    #[error("task `{0}` has no block schedule (only MM-PSGD and MC-PSGD tasks have blocks)")]
    NotBlockCyclic(String),
    #[error("task `{task}` has no block `{block}`")]
    UnknownBlock { task: String, block: String },
    #[error("block `{block}` has no chain version {version}")]
    UnknownChainVersion { block: String, version: i64 },
    #[error("task `{0}` does not use DC-CCL (no cloud worker or control model)")]
    NotDcCcl(String),
    #[error("task `{0}` does not use anonymous embeddings (no anonymous samples or batches)")]
    NotAnonEmbeddings(String),
    #[error("task `{0}` takes anonymous samples (POST /v1/tasks/{{id}}/anonymous/samples), not check-ins")]
    AnonymousTask(String),
    #[error("{0}")]
    Samples(#[from] SamplesError),
    #[error("`Idempotency-Key` {0}: send 32 lowercase hex characters, fresh for each submission")]
    BadIdempotencyKey(&'static str),
    #[error("the task's sample budget is spent for now; retry in {retry_after_ms} ms")]
    SampleBudgetExhausted { retry_after_ms: u64 },
    #[error("task `{task}` has no batch {number}")]
    UnknownBatch { task: String, number: i64 },
    #[error("round {round} already has a model (sha256 {stored}); a round takes one model")]
    RoundModelConflict { round: i64, stored: String },
    #[error("missing or wrong cloud-worker token for task `{0}`")]
    WorkerUnauthorized(String),
    #[error(
        "this route is for operators and the cloud worker, who must present a client certificate signed by the server's client CA (--tls-client-ca)"
    )]
    ClientCertificateRequired,
    #[error("round {round} is not a round of task `{task}`")]
    UnknownRound { task: String, round: i64 },
    #[error("task `{task}` has no control model{}", .version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownControlModel { task: String, version: Option<i64> },
    #[error("control model versions are published in order: the next is {next}, got {got}")]
    ControlVersionOutOfOrder { next: i64, got: i64 },
    #[error("task `{task}` is {state}: cannot {action} it")]
    TaskStateConflict {
        task: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("invalid task config: {0}")]
    InvalidConfig(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the server is processing as many uploads as it can queue; retry in {retry_after_ms} ms")]
    ServerBusy { retry_after_ms: u64 },
    #[error("too many requests from this {from}; retry in {retry_after_ms} ms")]
    RateLimited {
        retry_after_ms: u64,
        /// What the limit counts: `address` or `device`.
        from: &'static str,
    },
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            // An upload token that names no assignment is a wrong credential, like a wrong admin
            // token (it was 404 before 2026-12-04; the code `unknown_token` is unchanged).
            Unauthorized
            | MissingToken
            | UnknownToken
            | DeviceUnauthorized(_)
            | WorkerUnauthorized(_)
            | ClientCertificateRequired
            | EnrolmentKeyUnauthorized => StatusCode::UNAUTHORIZED,
            Forbidden { .. } => StatusCode::FORBIDDEN,
            UnknownOperatorToken(_) => StatusCode::NOT_FOUND,
            TokenNameTaken(_) => StatusCode::CONFLICT,
            // The credential is genuine but withdrawn: enrolling or retrying again will not help.
            DeviceRevoked(_) | EnrolmentKeyRevoked(_) => StatusCode::FORBIDDEN,
            UnknownEnrolmentKey(_) | UnknownDevice(_) => StatusCode::NOT_FOUND,
            NotDcCcl(_) | UnknownRound { .. } | UnknownControlModel { .. } => StatusCode::NOT_FOUND,
            NotAnonEmbeddings(_) | UnknownBatch { .. } => StatusCode::NOT_FOUND,
            AnonymousTask(_) | RoundModelConflict { .. } => StatusCode::CONFLICT,
            Samples(_) | BadIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            SampleBudgetExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            ControlVersionOutOfOrder { .. } | TaskStateConflict { .. } => StatusCode::CONFLICT,
            UnknownTask(_) | UnknownModelVersion { .. } | NoRoute { .. } => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RoundClosed(_) | UploadInFlight | StaleModelVersion { .. } | RoundClosing(_) => {
                StatusCode::CONFLICT
            }
            NotSparse(_) => StatusCode::BAD_REQUEST,
            NotBlockCyclic(_) | UnknownBlock { .. } | UnknownChainVersion { .. } => StatusCode::NOT_FOUND,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            BadBody(_) | InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ConflictingRetry { .. } | Tensor(_) | Sparse(_) | Aggregate(_) | InvalidConfig(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ServerBusy { .. } | NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable, greppable code.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            Unauthorized => "unauthorized",
            Forbidden { .. } => "forbidden",
            UnknownOperatorToken(_) => "unknown_operator_token",
            TokenNameTaken(_) => "token_name_taken",
            MissingToken => "missing_token",
            DeviceUnauthorized(_) => "device_unauthorized",
            DeviceRevoked(_) => "device_revoked",
            EnrolmentKeyUnauthorized => "enrolment_key_unauthorized",
            EnrolmentKeyRevoked(_) => "enrolment_key_revoked",
            UnknownEnrolmentKey(_) => "unknown_enrolment_key",
            UnknownDevice(_) => "unknown_device",
            NoRoute { .. } => "no_route",
            MethodNotAllowed { .. } => "method_not_allowed",
            UnknownTask(_) => "unknown_task",
            UnknownModelVersion { .. } => "unknown_model_version",
            UnknownToken => "unknown_token",
            RoundClosed(_) => "round_closed",
            UploadInFlight => "upload_in_flight",
            ConflictingRetry { .. } => "conflicting_retry",
            BodyTooLarge { .. } => "body_too_large",
            BadBody(_) => "bad_body",
            BodyTimeout { .. } => "body_timeout",
            Tensor(e) => e.code(),
            Sparse(e) => e.code(),
            NotSparse(_) => "not_fedsubavg",
            StaleModelVersion { .. } => "stale_model_version",
            RoundClosing(_) => "round_closing",
            Aggregate(AggregateError::BadSampleCount(_)) => "bad_num_samples",
            Aggregate(AggregateError::RoundSampleLimit(..)) => "round_sample_limit",
            NotBlockCyclic(_) => "not_block_cyclic",
            UnknownBlock { .. } => "unknown_block",
            UnknownChainVersion { .. } => "unknown_chain_version",
            NotDcCcl(_) => "not_dc_ccl",
            NotAnonEmbeddings(_) => "not_anon_embeddings",
            AnonymousTask(_) => "anonymous_task",
            Samples(e) => e.code(),
            BadIdempotencyKey(_) => "bad_idempotency_key",
            SampleBudgetExhausted { .. } => "sample_budget_exhausted",
            UnknownBatch { .. } => "unknown_batch",
            RoundModelConflict { .. } => "round_model_conflict",
            WorkerUnauthorized(_) => "worker_unauthorized",
            ClientCertificateRequired => "client_certificate_required",
            UnknownRound { .. } => "unknown_round",
            UnknownControlModel { .. } => "unknown_control_model",
            ControlVersionOutOfOrder { .. } => "control_version_out_of_order",
            TaskStateConflict { .. } => "task_state_conflict",
            InvalidConfig(_) => "invalid_config",
            InvalidRequest(_) => "invalid_request",
            ServerBusy { .. } => "server_busy",
            RateLimited { .. } => "rate_limited",
            NotReady(_) => "not_ready",
            Internal(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(format!("database: {e}"))
    }
}

/// Partial sums a replica published that do not fit the round's accumulator.
impl From<fedhive_shared::fedavg::BadPartial> for ApiError {
    fn from(e: fedhive_shared::fedavg::BadPartial) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// A blocking task (decode, fold, model step) that panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::Internal(format!("blob store: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after_ms = match self {
            ApiError::ServerBusy { retry_after_ms }
            | ApiError::RateLimited { retry_after_ms, .. }
            | ApiError::SampleBudgetExhausted { retry_after_ms } => Some(retry_after_ms),
            _ => None,
        };
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request refused");
        }
        let body = ErrorBody {
            error: self.code().to_string(),
            message: self.to_string(),
            retry_after_ms,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(ms) = retry_after_ms {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
        }
        response
    }
}
