//! The cloud side of anonymous user embeddings (Ding et al., "Personalized Language Model Learning
//! on Text Data Without User Identifiers", arXiv 2501.06062; `ALGORITHMS.md`, "Anonymous user
//! embeddings"), for a task with `strategy: anon_embeddings`.
//!
//! Each round of the task is one training cycle. The worker reads the shuffled batches of
//! anonymous `(input, e, label)` samples that the server stored since its last round (it never
//! sees a submission, only batches mixed from many), trains the whole model on them from the
//! task's current version, and submits the result as the round's model, which the round commits
//! as the next version; devices then re-fit their `mu_u` against it. The first round trains the
//! base model from the task's initial weights on samples sent with `e = 0` by devices that have no
//! distribution yet ([`AnonWorkerOptions::base`]); later rounds fine-tune
//! ([`AnonWorkerOptions::fine_tune`]).
//!
//! Thin clients that cannot run the model ask the worker: [`predict_router`] answers
//! `POST /v1/predict` with `(input, e)` rows (`fedhive-cloud --anon-embeddings --anon-serve ADDR`).
//!
//! Crash safety as in the DC-CCL worker: the round's model is written to the state directory
//! (write, fsync, rename) before it is sent and sent again unchanged after a restart; the server
//! stores one model per round and answers a repeat of the same bytes with the same receipt. The
//! batches a round used are recorded after its model is accepted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::{
    Json, Router,
    extract::{State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};

use bytes::Bytes;
use fedhive_client::{
    anon::{self, FitParams},
    client::FedhiveClient,
};
use fedhive_shared::{
    NamedTensors,
    anon::{SampleShape, Samples},
    wire::RoundState,
};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::{WorkerError, write_atomic};

/// How the worker trains.
#[derive(Debug, Clone)]
pub struct AnonWorkerOptions {
    /// The first round: the base model on samples with `e = 0`.
    pub base: FitParams,
    /// Every later round.
    pub fine_tune: FitParams,
    /// New batches a round waits for before the worker trains on them.
    pub min_new_batches: i64,
    pub seed: u64,
    /// How often [`AnonWorker::run`] asks the server for the task's state.
    pub poll: Duration,
}

/// What one look at the task did.
#[derive(Debug, Clone, PartialEq)]
pub enum AnonStep {
    /// The task is over.
    Finished,
    /// No open round without a model, or too few new batches yet.
    Waiting,
    /// The round's model was submitted (or submitted again after a restart).
    Submitted {
        round_id: i64,
        samples: usize,
        loss: f32,
    },
}

/// A worker bound to one anonymous-embeddings task.
pub struct AnonWorker {
    pub client: FedhiveClient,
    pub task_id: String,
    pub token: String,
    pub device: burn::tensor::Device,
    pub shape: SampleShape,
    pub state_dir: PathBuf,
    pub options: AnonWorkerOptions,
}

impl AnonWorker {
    fn round_file(&self, round_id: i64) -> PathBuf {
        self.state_dir.join(format!("anon-round-{round_id}.safetensors"))
    }

    fn cursor_file(&self) -> PathBuf {
        self.state_dir.join("anon-batches-used")
    }

    /// Batches already trained on (the last one's number).
    fn batches_used(&self) -> Result<i64, WorkerError> {
        match std::fs::read_to_string(self.cursor_file()) {
            Ok(s) => s.trim().parse().map_err(|_| {
                WorkerError::Io(std::io::Error::other(format!(
                    "{} is corrupt",
                    self.cursor_file().display()
                )))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Submits the open round's model if the round has none and enough new batches arrived.
    pub async fn step(&self) -> Result<AnonStep, WorkerError> {
        std::fs::create_dir_all(&self.state_dir)?;
        let status = self.client.anonymous_status(&self.task_id, &self.token).await?;
        if status.state.is_over() {
            return Ok(AnonStep::Finished);
        }
        let Some(round) = status.round.as_ref().filter(|r| r.state == RoundState::Open) else {
            return Ok(AnonStep::Waiting);
        };
        if status.round_model_submitted {
            return Ok(AnonStep::Waiting);
        }
        let used = self.batches_used()?;
        let path = self.round_file(round.round_id);
        let (body, samples, loss) = if path.exists() {
            // Trained before a restart: the same bytes again.
            (Bytes::from(std::fs::read(&path)?), 0, f32::NAN)
        } else {
            if status.batches - used < self.options.min_new_batches.max(1) {
                return Ok(AnonStep::Waiting);
            }
            let mut samples = Samples::empty(self.shape);
            for number in used + 1..=status.batches {
                let batch = self
                    .client
                    .anonymous_batch(&self.task_id, number, &self.token, self.shape)
                    .await?;
                samples.extend(&batch);
            }
            let (_, current) = self
                .client
                .download_model(&self.task_id, Some(round.base_version))
                .await?;
            let current = NamedTensors::decode(&current)?;
            let params = if round.base_version == 0 {
                self.options.base
            } else {
                self.options.fine_tune
            };
            let (shape, device, seed) = (
                self.shape,
                self.device.clone(),
                self.options.seed ^ round.round_id as u64,
            );
            let count = samples.len();
            let (trained, loss) = tokio::task::spawn_blocking(move || {
                anon::train_model(&current, shape, &samples, params, &device, seed)
            })
            .await
            .map_err(std::io::Error::other)??;
            let body = trained.encode();
            write_atomic(&path, &body)?;
            (Bytes::from(body), count, loss)
        };
        match self
            .client
            .submit_round_model(&self.task_id, round.round_id, &self.token, body)
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some("round_closed") => {
                tracing::warn!(round = round.round_id, "the round closed before its model");
                return Ok(AnonStep::Waiting);
            }
            Err(e) => return Err(e.into()),
        }
        write_atomic(&self.cursor_file(), status.batches.to_string().as_bytes())?;
        info!(round = round.round_id, samples, loss, "round model submitted");
        Ok(AnonStep::Submitted {
            round_id: round.round_id,
            samples,
            loss,
        })
    }

    /// Runs the task's cloud side until the task finishes.
    pub async fn run(&self) -> Result<u32, WorkerError> {
        let mut rounds = 0;
        loop {
            match self.step().await? {
                AnonStep::Finished => return Ok(rounds),
                AnonStep::Submitted { .. } => rounds += 1,
                AnonStep::Waiting => tokio::time::sleep(self.options.poll).await,
            }
        }
    }

    /// The class of each `(input, e)` sample under the task's current model, and that model's
    /// version: what thin clients get from [`predict_router`].
    pub async fn predict(&self, samples: Samples) -> Result<(i64, Vec<u32>), WorkerError> {
        let (version, current) = self.client.download_model(&self.task_id, None).await?;
        let current = NamedTensors::decode(&current)?;
        let (shape, device) = (self.shape, self.device.clone());
        let classes =
            tokio::task::spawn_blocking(move || anon::predict_samples(&current, shape, &samples, &device))
                .await
                .map_err(std::io::Error::other)??;
        Ok((version, classes))
    }
}

/// Most rows in one prediction request.
pub const MAX_PREDICTIONS: usize = 1024;

/// A thin client's request: inputs and, for each, a fresh embedding it drew from its own `q_u`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictRequest {
    pub inputs: Vec<Vec<f32>>,
    pub embeddings: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictResponse {
    pub model_version: i64,
    pub classes: Vec<u32>,
}

/// A refusal: `{error, message}` like the server's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictError {
    pub error: String,
    pub message: String,
}

fn refuse(status: StatusCode, error: &str, message: String) -> Response {
    let body = PredictError {
        error: error.into(),
        message,
    };
    (status, Json(body)).into_response()
}

/// Checks a request against the task's shape and builds its samples (labels unused).
fn request_samples(shape: SampleShape, request: &PredictRequest) -> Result<Samples, String> {
    let n = request.inputs.len();
    if n == 0 || n > MAX_PREDICTIONS || request.embeddings.len() != n {
        return Err(format!(
            "{n} inputs and {} embeddings: one embedding per input, 1 to {MAX_PREDICTIONS} rows",
            request.embeddings.len()
        ));
    }
    let mut samples = Samples::empty(shape);
    for (i, (x, e)) in request.inputs.iter().zip(&request.embeddings).enumerate() {
        if x.len() != shape.features || e.len() != shape.embedding_dim {
            return Err(format!(
                "row {i}: an input of {} values and an embedding of {}, the task's are {} and {}",
                x.len(),
                e.len(),
                shape.features,
                shape.embedding_dim
            ));
        }
        if x.iter().chain(e).any(|v| !v.is_finite()) {
            return Err(format!("row {i} holds a non-finite value"));
        }
        samples.push(x, e, 0);
    }
    Ok(samples)
}

/// The worker's HTTP face for thin clients: `POST /v1/predict` with a [`PredictRequest`] (JSON)
/// answers a [`PredictResponse`], or `400 bad_request` / `502 upstream` as `{error, message}`. It
/// reads no credential and logs no peer address: like the samples route, a request names nobody.
pub fn predict_router(worker: Arc<AnonWorker>) -> Router {
    Router::new()
        .route("/v1/predict", post(predict_handler))
        .with_state(worker)
}

/// Serves [`predict_router`] on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, worker: Arc<AnonWorker>) -> std::io::Result<()> {
    axum::serve(listener, predict_router(worker)).await
}

async fn predict_handler(
    State(worker): State<Arc<AnonWorker>>,
    body: Result<Json<PredictRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let samples = match request_samples(worker.shape, &request) {
        Ok(samples) => samples,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    match worker.predict(samples).await {
        Ok((model_version, classes)) => Json(PredictResponse {
            model_version,
            classes,
        })
        .into_response(),
        Err(e) => refuse(StatusCode::BAD_GATEWAY, "upstream", e.to_string()),
    }
}
