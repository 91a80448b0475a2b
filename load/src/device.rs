//! One virtual device: check in, download the model, "train" (sleep), upload a synthetic update of
//! the task's shapes, repeat; with dropouts, retries and duplicate deliveries as configured.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fedhive_shared::wire::{Assignment, CheckinResponse, ErrorBody, UploadReceipt};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use reqwest::{StatusCode, header};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::watch,
};

use crate::stats::{Counters, Endpoint, PendingUpload, Stats};

/// Behaviour shared by all virtual devices.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Mean simulated training time; each round draws uniformly from ±50% of it.
    pub train_time: Duration,
    /// Probability that a device vanishes after an assignment (never comes back for that round).
    pub dropout: f64,
    /// Share of the dropouts that vanish in the middle of their upload (the rest right after
    /// check-in).
    pub mid_upload_share: f64,
    /// Extra attempts per request after a transport error, a 5xx or `409 upload_in_flight`.
    pub retries: u32,
    /// First retry backoff; doubles per attempt (with jitter), capped at 5 s.
    pub retry_backoff: Duration,
    /// Probability that an accepted upload is sent again with the same token and bytes (a device
    /// that lost the answer); the server must return the same receipt and count it once.
    pub duplicate_rate: f64,
}

/// How a raw connection to an HTTPS server starts its TLS session.
pub struct RawTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// What every device task shares.
pub struct Fleet {
    pub http: reqwest::Client,
    pub base_url: String,
    pub addr: SocketAddr,
    /// Set when the server speaks HTTPS: how a raw connection starts its TLS session.
    pub raw_tls: Option<RawTls>,
    pub task_id: String,
    pub bodies: Arc<Vec<Bytes>>,
    pub options: DeviceOptions,
    pub stats: Arc<Stats>,
    pub stop: watch::Receiver<bool>,
}

enum Answer {
    /// A status and the (start of the) body, read in full.
    Http(StatusCode, Bytes),
    Transport(String),
}

fn label(status: StatusCode, body: &[u8]) -> String {
    if status.is_client_error() || status.is_server_error() {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => format!("{} {}", status.as_u16(), e.error),
            Err(_) => status.as_u16().to_string(),
        }
    } else {
        status.as_u16().to_string()
    }
}

fn retryable(answer: &Answer) -> bool {
    match answer {
        Answer::Transport(_) => true,
        Answer::Http(status, body) => {
            status.is_server_error()
                || (*status == StatusCode::CONFLICT
                    && serde_json::from_slice::<ErrorBody>(body).is_ok_and(|e| e.error == "upload_in_flight"))
        }
    }
}

/// How often one request may be told `503 server_busy` before it counts as failed.
const MAX_BUSY_WAITS: u32 = 1000;

/// The wait a `503 server_busy` answer asks for.
fn busy_retry(answer: &Answer) -> Option<Duration> {
    match answer {
        Answer::Http(StatusCode::SERVICE_UNAVAILABLE, body) => serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .filter(|e| e.error == "server_busy")
            .and_then(|e| e.retry_after_ms)
            .map(Duration::from_millis),
        _ => None,
    }
}

impl Fleet {
    /// Sends `build()`'s request, reads the whole answer, and records it; retries as configured.
    async fn call(
        &self,
        endpoint: Endpoint,
        sent: u64,
        rng: &mut SmallRng,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Answer {
        let mut attempt = 0;
        let mut busy_waits = 0;
        loop {
            let started = Instant::now();
            let mut received = 0;
            let answer = match build().send().await {
                Ok(resp) => {
                    let status = resp.status();
                    match read_body(resp).await {
                        Ok((body, len)) => {
                            received = len;
                            Answer::Http(status, body)
                        }
                        Err(e) => Answer::Transport(e.to_string()),
                    }
                }
                Err(e) => Answer::Transport(e.to_string()),
            };
            let outcome = match &answer {
                Answer::Http(status, body) => label(*status, body),
                Answer::Transport(_) => "transport".to_string(),
            };
            self.stats
                .record(endpoint, started.elapsed(), &outcome, sent, received);
            // `503 server_busy` is the server pacing its uploads, not a failure: come back when it
            // says, without using up a retry.
            if let Some(wait) = busy_retry(&answer)
                && busy_waits < MAX_BUSY_WAITS
            {
                busy_waits += 1;
                Counters::bump(&self.stats.counters.busy_waits);
                tokio::time::sleep(wait).await;
                continue;
            }
            if attempt >= self.options.retries || !retryable(&answer) {
                return answer;
            }
            attempt += 1;
            Counters::bump(&self.stats.counters.retries);
            let backoff = self.options.retry_backoff.saturating_mul(1 << attempt.min(8));
            let backoff = backoff
                .min(Duration::from_secs(5))
                .mul_f64(rng.random_range(0.5..1.5));
            tokio::time::sleep(backoff).await;
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`, or less when the run is stopped. True if the run was stopped.
    async fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => self.stopped(),
            _ = stop.wait_for(|s| *s) => true,
        }
    }

    fn bump(&self, counter: impl Fn(&Counters) -> &AtomicU64) {
        Counters::bump(counter(&self.stats.counters));
    }

    async fn checkin(&self, rng: &mut SmallRng) -> Option<CheckinResponse> {
        let url = format!("{}/v1/tasks/{}/checkin", self.base_url, self.task_id);
        match self
            .call(Endpoint::Checkin, 0, rng, || self.http.post(&url))
            .await
        {
            Answer::Http(StatusCode::OK, body) => serde_json::from_slice(&body).ok(),
            _ => None,
        }
    }

    /// Downloads the model unless `cached` already is that version (then the server answers 304).
    async fn download(&self, a: &Assignment, cached: Option<i64>, rng: &mut SmallRng) -> bool {
        let url = format!(
            "{}/v1/tasks/{}/model?version={}",
            self.base_url, a.task_id, a.model_version
        );
        let answer = self
            .call(Endpoint::Model, 0, rng, || {
                let req = self.http.get(&url);
                match cached {
                    Some(v) => req.header(header::IF_NONE_MATCH, format!("\"{v}\"")),
                    None => req,
                }
            })
            .await;
        matches!(answer, Answer::Http(s, _) if s == StatusCode::OK || s == StatusCode::NOT_MODIFIED)
    }

    async fn upload(&self, token: &str, variant: usize, num_samples: u64, rng: &mut SmallRng) -> Answer {
        let url = format!("{}/v1/updates", self.base_url);
        let body = self.bodies[variant].clone();
        self.call(Endpoint::Upload, body.len() as u64, rng, || {
            self.http
                .put(&url)
                .query(&[("num_samples", num_samples)])
                .bearer_auth(token)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
        })
        .await
    }

    /// Sends the headers and half of the body on a raw connection, then closes it: a device that
    /// lost its network mid-upload. The server must not count it.
    async fn vanish_mid_upload(&self, token: &str, variant: usize, num_samples: u64) {
        let body = &self.bodies[variant];
        let started = Instant::now();
        let head = format!(
            "PUT /v1/updates?num_samples={num_samples} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let half = &body[..body.len() / 2];
        let sent = async {
            let tcp = tokio::net::TcpStream::connect(self.addr).await?;
            let mut stream: Box<dyn AsyncWrite + Unpin + Send> = match &self.raw_tls {
                None => Box::new(tcp),
                Some(tls) => Box::new(tls.connector.connect(tls.server_name.clone(), tcp).await?),
            };
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(half).await?;
            stream.flush().await?;
            std::io::Result::Ok(())
        }
        .await;
        let outcome = match sent {
            Ok(()) => "vanished mid-upload",
            Err(_) => "transport",
        };
        self.stats
            .record(Endpoint::Upload, started.elapsed(), outcome, half.len() as u64, 0);
    }

    /// Asks once more, at the end of the run, for an upload whose outcome was never learnt.
    pub async fn reconcile(&self, pending: &PendingUpload, rng: &mut SmallRng) -> Result<bool, String> {
        match self
            .upload(&pending.token, pending.variant, pending.num_samples, rng)
            .await
        {
            Answer::Http(StatusCode::OK, body) => {
                let receipt: UploadReceipt = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                self.stats.receipt(&pending.token, receipt);
                Ok(true)
            }
            // An accepted token would get its stored receipt: round_closed means never accepted.
            Answer::Http(status, body) if label(status, &body) == "409 round_closed" => Ok(false),
            Answer::Http(status, body) => Err(label(status, &body)),
            Answer::Transport(e) => Err(e),
        }
    }

    /// The device's life until the run stops or the task finishes.
    pub async fn run(self: Arc<Self>, index: usize, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut cached_version: Option<i64> = None;
        // Devices do not all start at the same instant.
        if self
            .sleep(self.options.train_time.mul_f64(rng.random_range(0.0..1.0)))
            .await
        {
            return;
        }
        while !self.stopped() {
            let assignment = match self.checkin(&mut rng).await {
                Some(CheckinResponse::Assigned(a)) => a,
                Some(CheckinResponse::RetryAfter { retry_after_ms, .. }) => {
                    self.bump(|c| &c.retry_after);
                    let wait = Duration::from_millis(retry_after_ms).mul_f64(rng.random_range(0.5..1.5));
                    if self.sleep(wait).await {
                        return;
                    }
                    continue;
                }
                Some(CheckinResponse::Finished { .. }) => return,
                None => {
                    if self.sleep(self.options.retry_backoff * 4).await {
                        return;
                    }
                    continue;
                }
            };
            self.bump(|c| &c.assignments);
            let train = self.options.train_time.mul_f64(rng.random_range(0.5..1.5));
            let dropout = rng.random_bool(self.options.dropout.clamp(0.0, 1.0));
            let mid_upload = dropout && rng.random_bool(self.options.mid_upload_share.clamp(0.0, 1.0));
            if dropout && !mid_upload {
                // Gone after check-in: the assignment is never used. The device returns later.
                self.bump(|c| &c.dropped_after_checkin);
                if self.sleep(train * 2).await {
                    return;
                }
                continue;
            }
            if !self.download(&assignment, cached_version, &mut rng).await {
                self.bump(|c| &c.download_failed);
                continue;
            }
            cached_version = Some(assignment.model_version);
            // Training is not interrupted by the end of the run: the upload still goes out, so
            // every assignment that was trained ends with a definite outcome.
            tokio::time::sleep(train).await;
            let variant = rng.random_range(0..self.bodies.len());
            let num_samples = rng.random_range(50..=500u64);
            let token = assignment.upload_token.as_str();
            if mid_upload {
                self.bump(|c| &c.dropped_mid_upload);
                self.vanish_mid_upload(token, variant, num_samples).await;
                continue;
            }
            match self.upload(token, variant, num_samples, &mut rng).await {
                Answer::Http(StatusCode::OK, body) => match serde_json::from_slice::<UploadReceipt>(&body) {
                    Ok(receipt) => {
                        self.stats.receipt(token, receipt.clone());
                        if rng.random_bool(self.options.duplicate_rate.clamp(0.0, 1.0)) {
                            self.send_duplicate(token, variant, num_samples, &receipt, &mut rng)
                                .await;
                        }
                    }
                    Err(_) => self.bump(|c| &c.rejected),
                },
                Answer::Http(status, body) if label(status, &body) == "409 round_closed" => {
                    self.bump(|c| &c.late)
                }
                answer if retryable(&answer) => self.stats.pending(PendingUpload {
                    token: token.to_string(),
                    variant,
                    num_samples,
                }),
                Answer::Http(..) | Answer::Transport(_) => self.bump(|c| &c.rejected),
            }
        }
    }

    async fn send_duplicate(
        &self,
        token: &str,
        variant: usize,
        num_samples: u64,
        first: &UploadReceipt,
        rng: &mut SmallRng,
    ) {
        self.bump(|c| &c.duplicates_sent);
        if let Answer::Http(StatusCode::OK, body) = self.upload(token, variant, num_samples, rng).await
            && let Ok(again) = serde_json::from_slice::<UploadReceipt>(&body)
        {
            if again == *first {
                self.bump(|c| &c.duplicates_identical);
            } else {
                self.bump(|c| &c.duplicates_different);
            }
            // A different receipt for the same token is kept as a conflict and fails the check.
            self.stats.receipt(token, again);
            return;
        }
        // The repeat itself was refused: the server must hand back the stored receipt instead.
        self.bump(|c| &c.duplicates_different);
    }
}

/// Largest part of an answer kept in memory (JSON bodies); the rest of a model download is only
/// counted, never held.
const KEEP_BYTES: usize = 64 * 1024;

/// Reads the whole answer in chunks: the first [`KEEP_BYTES`] and the total length.
async fn read_body(mut resp: reqwest::Response) -> reqwest::Result<(Bytes, u64)> {
    let mut kept = Vec::new();
    let mut len = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        len += chunk.len() as u64;
        let take = (KEEP_BYTES - kept.len()).min(chunk.len());
        kept.extend_from_slice(&chunk[..take]);
    }
    Ok((Bytes::from(kept), len))
}
