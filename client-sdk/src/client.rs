//! HTTP client for the fedhive server (reqwest, rustls) with retries and backoff.
//!
//! Retrying never double-submits: an upload is keyed by its single-use upload token, and the server
//! answers a repeat of the same bytes with the receipt it stored the first time. So the client retries
//! uploads freely on connection errors, timeouts, 5xx and `409 upload_in_flight`, and gives up at once
//! on every other 4xx (the request itself is wrong, or the round has closed).

use std::time::Duration;

use bytes::Bytes;
use fedhive_shared::anon::{SampleShape, Samples};
use fedhive_shared::blocks::BlockStatus;
use fedhive_shared::sparse::{Enrolment, FeatureSet, HeatReport, RowsRequest};
use fedhive_shared::wire::{
    AnonStatus, ArtifactReceipt, CheckinResponse, CloudStatus, DeviceCredentials, DeviceInfo, EnrolledDevice,
    EnrolmentKey, EnrolmentKeyCreated, EnrolmentKeyRequest, ErrorBody, MetricsReport, RoundInfo,
    SamplesAccepted, TaskConfig, TaskCreated, TaskStatus, UploadReceipt,
};

/// The header that carries a device credential beside an upload token.
pub const DEVICE_HEADER: &str = "fedhive-device";
use reqwest::{Method, RequestBuilder, StatusCode, header};

pub use fedhive_tls::{ClientTls, Identity, SpkiPin};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to the fedhive server failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server refused the request: {status} {}: {}", body.error, body.message)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("server answered {status} with an unreadable body: {text}")]
    Unexpected { status: StatusCode, text: String },
    #[error("TLS settings: {0}")]
    Tls(#[from] fedhive_tls::TlsError),
    #[error("server sent a body that does not check: {0}")]
    Malformed(String),
    #[error("the download is {bytes} bytes, over the {limit} allowed")]
    TooLarge { bytes: u64, limit: u64 },
}

impl ClientError {
    /// The server's stable error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.error),
            _ => None,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            ClientError::Http(e) => e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
            ClientError::Api { status, body } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || body.error == "upload_in_flight"
                    || body.error == "round_closing"
            }
            ClientError::Unexpected { status, .. } => status.is_server_error(),
            ClientError::Tls(_) | ClientError::Malformed(_) | ClientError::TooLarge { .. } => false,
        }
    }
}

/// How often and how patiently to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter, so devices that failed together do not retry together.
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .initial_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.max_backoff);
        cap.mul_f64(rand::random::<f64>())
    }
}

/// A client of one fedhive server.
#[derive(Debug, Clone)]
pub struct FedhiveClient {
    http: reqwest::Client,
    base: String,
    retry: RetryPolicy,
    admin_token: Option<String>,
}

/// Refuses a response whose announced body is over `max_bytes`, before the body is read.
fn within(resp: &reqwest::Response, max_bytes: Option<u64>) -> Result<(), ClientError> {
    match (max_bytes, resp.content_length()) {
        (Some(limit), Some(bytes)) if bytes > limit => Err(ClientError::TooLarge { bytes, limit }),
        _ => Ok(()),
    }
}

/// A download's body with the version its header `header` names (0 when absent).
async fn versioned_body(resp: reqwest::Response, header: &str) -> Result<(i64, Bytes), ClientError> {
    let version = resp
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_default();
    Ok((version, resp.bytes().await?))
}

impl FedhiveClient {
    /// `base_url` like `https://fl.example.com` or `http://127.0.0.1:8080`; an `https` server's
    /// certificate must chain to the public roots (see [`FedhiveClient::with_tls`] for others).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::with_tls(base_url, &ClientTls::default())
    }

    /// A client that checks the server's certificate as `tls` says: a CA of the deployment's own,
    /// pins on the server's key, a client certificate (the cloud worker's, an operator's).
    pub fn with_tls(base_url: &str, tls: &ClientTls) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120));
        Ok(FedhiveClient {
            http: tls.configure(http)?.build()?,
            base: base_url.trim_end_matches('/').to_string(),
            retry: RetryPolicy::default(),
            admin_token: None,
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Token sent on operator calls.
    pub fn with_admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{}", self.base, path))
    }

    fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.request(method, path);
        match &self.admin_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends `build()` until it succeeds, fails for good, or attempts run out.
    async fn send(&self, build: impl Fn() -> RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let mut attempt = 0;
        loop {
            let err = match build().send().await {
                Ok(resp) if resp.status().is_success() || resp.status() == StatusCode::NOT_MODIFIED => {
                    return Ok(resp);
                }
                Ok(resp) => error_from(resp).await,
                Err(e) => ClientError::Http(e),
            };
            attempt += 1;
            if attempt >= self.retry.max_attempts || !err.retryable() {
                return Err(err);
            }
            tracing::debug!(attempt, error = %err, "retrying request");
            // A busy server says when to come back (it spreads the devices it refuses).
            let asked = match &err {
                ClientError::Api { body, .. } => body.retry_after_ms.map(Duration::from_millis),
                _ => None,
            };
            tokio::time::sleep(asked.unwrap_or_else(|| self.retry.backoff(attempt))).await;
        }
    }

    pub async fn checkin(&self, task_id: &str) -> Result<CheckinResponse, ClientError> {
        let path = format!("/v1/tasks/{task_id}/checkin");
        Ok(self
            .send(|| self.request(Method::POST, &path))
            .await?
            .json()
            .await?)
    }

    /// Enrols this device with an enrolment key (`<key_id>:<secret>`, shipped with the app): a
    /// credential valid for every task. Keep it where the app keeps its state: it is the device's
    /// identity, and it is shown only once. Not retried (a lost answer would leave an orphan
    /// enrolment; enrol again instead).
    pub async fn enrol_device(&self, enrolment_key: &str) -> Result<DeviceCredentials, ClientError> {
        let resp = self
            .request(Method::POST, "/v1/devices")
            .bearer_auth(enrolment_key)
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        Ok(resp.json().await?)
    }

    /// Enrols this device in one task whose strategy tracks devices across rounds (FedLaAvg),
    /// without an enrolment key. Keep the credentials: they are the device's identity for the task.
    /// Not retried (a lost answer would leave an orphan enrolment; enrol again instead).
    pub async fn enrol(&self, task_id: &str) -> Result<DeviceCredentials, ClientError> {
        let path = format!("/v1/tasks/{task_id}/devices");
        let resp = self.request(Method::POST, &path).send().await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        Ok(resp.json().await?)
    }

    /// Check-in as an enrolled device.
    pub async fn checkin_as(
        &self,
        task_id: &str,
        credentials: &DeviceCredentials,
    ) -> Result<CheckinResponse, ClientError> {
        let path = format!("/v1/tasks/{task_id}/checkin");
        let bearer = credentials.bearer();
        Ok(self
            .send(|| self.request(Method::POST, &path).bearer_auth(&bearer))
            .await?
            .json()
            .await?)
    }

    /// Downloads a model version (the current one when `None`): `(version, safetensors bytes)`.
    pub async fn download_model(
        &self,
        task_id: &str,
        version: Option<i64>,
    ) -> Result<(i64, Bytes), ClientError> {
        self.download_model_within(task_id, version, None).await
    }

    /// [`download_model`](Self::download_model), refused with [`ClientError::TooLarge`] before
    /// its body is read when the server announces more than `max_bytes` (a metered network).
    pub async fn download_model_within(
        &self,
        task_id: &str,
        version: Option<i64>,
        max_bytes: Option<u64>,
    ) -> Result<(i64, Bytes), ClientError> {
        let path = match version {
            Some(v) => format!("/v1/tasks/{task_id}/model?version={v}"),
            None => format!("/v1/tasks/{task_id}/model"),
        };
        let resp = self.send(|| self.request(Method::GET, &path)).await?;
        within(&resp, max_bytes)?;
        versioned_body(resp, "fedhive-model-version").await
    }

    /// Uploads an update (safetensors of Delta) with its sample count. Safe to call again with the
    /// same arguments: the server counts it once.
    pub async fn upload_update(
        &self,
        upload_token: &str,
        num_samples: u64,
        body: Bytes,
    ) -> Result<UploadReceipt, ClientError> {
        self.upload_update_as(upload_token, None, num_samples, body).await
    }

    /// [`upload_update`](Self::upload_update) with the device's credential, which a task that
    /// requires enrolled devices needs (the one the assignment was issued to).
    pub async fn upload_update_as(
        &self,
        upload_token: &str,
        credentials: Option<&DeviceCredentials>,
        num_samples: u64,
        body: Bytes,
    ) -> Result<UploadReceipt, ClientError> {
        let device = credentials.map(DeviceCredentials::bearer);
        let resp = self
            .send(|| {
                let req = self
                    .request(Method::PUT, "/v1/updates")
                    .bearer_auth(upload_token)
                    .query(&[("num_samples", num_samples)])
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone());
                with_device(req, device.as_deref())
            })
            .await?;
        Ok(resp.json().await?)
    }

    pub async fn report_metrics(
        &self,
        upload_token: &str,
        report: &MetricsReport,
    ) -> Result<(), ClientError> {
        self.report_metrics_as(upload_token, None, report).await
    }

    /// [`report_metrics`](Self::report_metrics) with the device's credential (see
    /// [`upload_update_as`](Self::upload_update_as)).
    pub async fn report_metrics_as(
        &self,
        upload_token: &str,
        credentials: Option<&DeviceCredentials>,
        report: &MetricsReport,
    ) -> Result<(), ClientError> {
        let device = credentials.map(DeviceCredentials::bearer);
        self.send(|| {
            let req = self
                .request(Method::POST, "/v1/metrics")
                .bearer_auth(upload_token)
                .json(report);
            with_device(req, device.as_deref())
        })
        .await?;
        Ok(())
    }

    /// FedSubAvg: enrols (or re-enrols) this device's feature set `R_i` and sample count.
    pub async fn enrol_features(
        &self,
        task_id: &str,
        device_id: &str,
        features: &FeatureSet,
    ) -> Result<Enrolment, ClientError> {
        let path = format!("/v1/tasks/{task_id}/devices/{device_id}/features");
        Ok(self
            .send(|| self.request(Method::PUT, &path).json(features))
            .await?
            .json()
            .await?)
    }

    /// FedSubAvg: downloads the dense tensors and the rows `request.rows` of the model version
    /// `request.version` (sparse safetensors, see [`fedhive_shared::sparse`]).
    pub async fn download_submodel(
        &self,
        task_id: &str,
        request: &RowsRequest,
    ) -> Result<(i64, Bytes), ClientError> {
        self.download_submodel_within(task_id, request, None).await
    }

    /// [`download_submodel`](Self::download_submodel), refused with [`ClientError::TooLarge`]
    /// before its body is read when the server announces more than `max_bytes`.
    pub async fn download_submodel_within(
        &self,
        task_id: &str,
        request: &RowsRequest,
        max_bytes: Option<u64>,
    ) -> Result<(i64, Bytes), ClientError> {
        let path = format!("/v1/tasks/{task_id}/submodel");
        let resp = self
            .send(|| self.request(Method::POST, &path).json(request))
            .await?;
        within(&resp, max_bytes)?;
        versioned_body(resp, "fedhive-model-version").await
    }

    /// Operator: population and per-row heat of a FedSubAvg task.
    pub async fn heat(&self, task_id: &str, request: &RowsRequest) -> Result<HeatReport, ClientError> {
        let path = format!("/v1/tasks/{task_id}/heat");
        Ok(self
            .send(|| self.admin(Method::POST, &path).json(request))
            .await?
            .json()
            .await?)
    }

    /// Operator: creates a task from its config and initial weights (safetensors).
    pub async fn create_task(&self, config: &TaskConfig, model: Vec<u8>) -> Result<TaskCreated, ClientError> {
        let config = serde_json::to_string(config).expect("TaskConfig serialises");
        let resp = self
            .send(|| {
                let form = reqwest::multipart::Form::new()
                    .text("config", config.clone())
                    .part("model", reqwest::multipart::Part::bytes(model.clone()));
                self.admin(Method::POST, "/v1/tasks").multipart(form)
            })
            .await?;
        Ok(resp.json().await?)
    }

    pub async fn task_status(&self, task_id: &str) -> Result<TaskStatus, ClientError> {
        let path = format!("/v1/tasks/{task_id}");
        Ok(self.send(|| self.admin(Method::GET, &path)).await?.json().await?)
    }

    /// Operator: creates an enrolment key named `name` (an app release, say); the answer holds the
    /// key, shown only this once.
    pub async fn create_enrolment_key(&self, name: &str) -> Result<EnrolmentKeyCreated, ClientError> {
        let request = EnrolmentKeyRequest { name: name.into() };
        Ok(self
            .send(|| self.admin(Method::POST, "/v1/enrolment-keys").json(&request))
            .await?
            .json()
            .await?)
    }

    /// Operator: every enrolment key (without secrets).
    pub async fn enrolment_keys(&self) -> Result<Vec<EnrolmentKey>, ClientError> {
        Ok(self
            .send(|| self.admin(Method::GET, "/v1/enrolment-keys"))
            .await?
            .json()
            .await?)
    }

    /// Operator: revokes an enrolment key; the devices it enrolled are refused from then on.
    pub async fn revoke_enrolment_key(&self, key_id: &str) -> Result<EnrolmentKey, ClientError> {
        let path = format!("/v1/enrolment-keys/{key_id}");
        Ok(self
            .send(|| self.admin(Method::DELETE, &path))
            .await?
            .json()
            .await?)
    }

    /// Operator: enrolled devices (of `key_id` if given), up to 1000 by id.
    pub async fn enrolled_devices(&self, key_id: Option<&str>) -> Result<Vec<EnrolledDevice>, ClientError> {
        Ok(self
            .send(|| {
                let req = self.admin(Method::GET, "/v1/devices");
                match key_id {
                    Some(k) => req.query(&[("key_id", k)]),
                    None => req,
                }
            })
            .await?
            .json()
            .await?)
    }

    /// Operator: revokes a device; its credential is refused from its next request.
    pub async fn revoke_device(&self, device_id: &str) -> Result<EnrolledDevice, ClientError> {
        let path = format!("/v1/devices/{device_id}");
        Ok(self
            .send(|| self.admin(Method::DELETE, &path))
            .await?
            .json()
            .await?)
    }

    /// Operator: a FedLaAvg task's enrolled devices and their last participation.
    pub async fn devices(&self, task_id: &str) -> Result<Vec<DeviceInfo>, ClientError> {
        let path = format!("/v1/tasks/{task_id}/devices");
        Ok(self.send(|| self.admin(Method::GET, &path)).await?.json().await?)
    }

    pub async fn rounds(&self, task_id: &str) -> Result<Vec<RoundInfo>, ClientError> {
        let path = format!("/v1/tasks/{task_id}/rounds");
        Ok(self.send(|| self.admin(Method::GET, &path)).await?.json().await?)
    }

    /// MM/MC-PSGD: the predictor of `block` (the block meant for now when `None`) as safetensors.
    pub async fn download_predictor(
        &self,
        task_id: &str,
        block: Option<&str>,
    ) -> Result<ServedPredictor, ClientError> {
        let path = format!("/v1/tasks/{task_id}/predictor");
        let resp = self
            .send(|| {
                let req = self.request(Method::GET, &path);
                match block {
                    Some(b) => req.query(&[("block", b)]),
                    None => req,
                }
            })
            .await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (block, rounds, etag) = (
            header("fedhive-block"),
            header("fedhive-block-rounds").parse().unwrap_or_default(),
            header("etag").trim_matches('"').to_string(),
        );
        Ok(ServedPredictor {
            block,
            rounds,
            etag,
            bytes: resp.bytes().await?,
        })
    }

    /// MC-PSGD: version `version` of `block`'s chain `y_m` (0 = the task's initial model).
    pub async fn download_chain(
        &self,
        task_id: &str,
        block: &str,
        version: i64,
    ) -> Result<Bytes, ClientError> {
        self.download_chain_within(task_id, block, version, None).await
    }

    /// [`FedhiveClient::download_chain`], refused with [`ClientError::TooLarge`] before the body
    /// is read when the server announces more than `max_bytes`.
    pub async fn download_chain_within(
        &self,
        task_id: &str,
        block: &str,
        version: i64,
        max_bytes: Option<u64>,
    ) -> Result<Bytes, ClientError> {
        let path = format!("/v1/tasks/{task_id}/blocks/{block}/chain");
        let resp = self
            .send(|| self.request(Method::GET, &path).query(&[("version", version)]))
            .await?;
        within(&resp, max_bytes)?;
        Ok(resp.bytes().await?)
    }

    /// DC-CCL: version `version` of the task's control model `F_m` (the latest when `None`):
    /// `(version, safetensors bytes)`.
    pub async fn download_control_model(
        &self,
        task_id: &str,
        version: Option<i64>,
    ) -> Result<(i64, Bytes), ClientError> {
        self.download_control_model_within(task_id, version, None).await
    }

    /// [`FedhiveClient::download_control_model`], refused with [`ClientError::TooLarge`] before
    /// the body is read when the server announces more than `max_bytes`.
    pub async fn download_control_model_within(
        &self,
        task_id: &str,
        version: Option<i64>,
        max_bytes: Option<u64>,
    ) -> Result<(i64, Bytes), ClientError> {
        let path = format!("/v1/tasks/{task_id}/control-model");
        let resp = self
            .send(|| {
                let req = self.request(Method::GET, &path);
                match version {
                    Some(v) => req.query(&[("version", v)]),
                    None => req,
                }
            })
            .await?;
        within(&resp, max_bytes)?;
        versioned_body(resp, "fedhive-control-version").await
    }

    /// DC-CCL cloud worker: its task's round in progress (with the task's worker token).
    pub async fn cloud_status(&self, task_id: &str, worker_token: &str) -> Result<CloudStatus, ClientError> {
        let path = format!("/v1/tasks/{task_id}/cloud");
        let resp = self
            .send(|| self.request(Method::GET, &path).bearer_auth(worker_token))
            .await?;
        Ok(resp.json().await?)
    }

    /// DC-CCL cloud worker: the cloud's delta of `F_s` for `round_id`. Safe to repeat with the
    /// same body: the server stores it once.
    pub async fn submit_cloud_update(
        &self,
        task_id: &str,
        round_id: i64,
        worker_token: &str,
        body: Bytes,
    ) -> Result<ArtifactReceipt, ClientError> {
        let path = format!("/v1/tasks/{task_id}/rounds/{round_id}/cloud-update");
        self.put_artifact(&path, worker_token, body).await
    }

    /// DC-CCL cloud worker: publishes control model `version` (the next one). Safe to repeat with
    /// the same body.
    pub async fn publish_control_model(
        &self,
        task_id: &str,
        version: i64,
        worker_token: &str,
        body: Bytes,
    ) -> Result<ArtifactReceipt, ClientError> {
        let path = format!("/v1/tasks/{task_id}/control-model/{version}");
        self.put_artifact(&path, worker_token, body).await
    }

    /// Anonymous embeddings: submits labelled samples with their embeddings, with no credential
    /// of any kind. Each call takes a fresh random `Idempotency-Key`, which its retries repeat, so
    /// a retry after a lost answer stores nothing twice and two calls share nothing.
    pub async fn submit_anonymous_samples(
        &self,
        task_id: &str,
        samples: &Samples,
    ) -> Result<SamplesAccepted, ClientError> {
        let path = format!("/v1/tasks/{task_id}/anonymous/samples");
        let key = format!("{:032x}", rand::random::<u128>());
        let body = Bytes::from(samples.encode());
        let resp = self
            .send(|| {
                self.request(Method::POST, &path)
                    .header("idempotency-key", &key)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        Ok(resp.json().await?)
    }

    /// Anonymous embeddings' cloud worker: its task's batches and round (with the worker token).
    pub async fn anonymous_status(
        &self,
        task_id: &str,
        worker_token: &str,
    ) -> Result<AnonStatus, ClientError> {
        let path = format!("/v1/tasks/{task_id}/anonymous");
        let resp = self
            .send(|| self.request(Method::GET, &path).bearer_auth(worker_token))
            .await?;
        Ok(resp.json().await?)
    }

    /// Anonymous embeddings' cloud worker: shuffled batch `number` (from 1) of the task's samples.
    pub async fn anonymous_batch(
        &self,
        task_id: &str,
        number: i64,
        worker_token: &str,
        shape: SampleShape,
    ) -> Result<Samples, ClientError> {
        let path = format!("/v1/tasks/{task_id}/anonymous/batches/{number}");
        let resp = self
            .send(|| self.request(Method::GET, &path).bearer_auth(worker_token))
            .await?;
        let bytes = resp.bytes().await?;
        Samples::decode_checked(&bytes, shape, usize::MAX).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// Anonymous embeddings' cloud worker: the model fine-tuned for `round_id` (whole weights),
    /// which the round commits as the task's next version. Safe to repeat with the same body.
    pub async fn submit_round_model(
        &self,
        task_id: &str,
        round_id: i64,
        worker_token: &str,
        body: Bytes,
    ) -> Result<ArtifactReceipt, ClientError> {
        let path = format!("/v1/tasks/{task_id}/anonymous/rounds/{round_id}/model");
        self.put_artifact(&path, worker_token, body).await
    }

    async fn put_artifact(
        &self,
        path: &str,
        token: &str,
        body: Bytes,
    ) -> Result<ArtifactReceipt, ClientError> {
        let resp = self
            .send(|| {
                self.request(Method::PUT, path)
                    .bearer_auth(token)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        Ok(resp.json().await?)
    }

    /// Operator: schedule position, per-block counts and the history of a block-cyclic task.
    pub async fn block_status(&self, task_id: &str) -> Result<BlockStatus, ClientError> {
        let path = format!("/v1/tasks/{task_id}/blocks");
        Ok(self.send(|| self.admin(Method::GET, &path)).await?.json().await?)
    }
}

/// A predictor as the server served it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedPredictor {
    /// The block it belongs to.
    pub block: String,
    /// `r_m`: committed rounds averaged into it (0: the block has none yet, this is the global model).
    pub rounds: i64,
    /// Changes whenever the predictor does.
    pub etag: String,
    pub bytes: Bytes,
}

/// The request with the device's credential in [`DEVICE_HEADER`], if it has one.
fn with_device(req: RequestBuilder, device: Option<&str>) -> RequestBuilder {
    match device {
        Some(d) => req.header(DEVICE_HEADER, d),
        None => req,
    }
}

async fn error_from(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => ClientError::Api { status, body },
        Err(_) => ClientError::Unexpected { status, text },
    }
}
