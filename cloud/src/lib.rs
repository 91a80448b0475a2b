//! fedhive's cloud worker: the cloud half of DC-CCL (Ding et al., arXiv 2303.10361; `ALGORITHMS.md`,
//! "DC-CCL"), a program of its own next to the server.
//!
//! It holds the cloud's data and the large model `F_c`, which never leave it: the server stays free
//! of burn and never sees `F_c`. With its task's worker token (issued at task creation; it can
//! read its task's round, submit contributions and publish control models, nothing else) it:
//!
//! 1. trains `F_c` on cloud data (cross-entropy), kept in its state directory;
//! 2. distils the control model `F_m` from frozen `F_c` (MSE on logits) and publishes it as the
//!    task's control model version 1, which devices download;
//! 3. each open round, trains its copy of the round's `F_s` on cloud data with loss
//!    `CE(F_m(x) + F_s(x), y)` and submits the delta as the round's cloud contribution.
//!
//! Serving is a library call, [`predict`]: `F_c(x) + F_s(x)` (the worker answers no HTTP itself).
//!
//! Crash safety: every artefact is written to the state directory (write, fsync, rename) before it
//! is sent, and sent again unchanged after a restart. The server stores a contribution once per
//! round and answers a repeat of the same bytes with the same receipt, so killing the worker at any
//! point neither loses nor duplicates one. The paper's optional head-tuning step after fusion is not
//! implemented.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use fedhive_client::{
    client::{ClientError, FedhiveClient},
    data::Dataset,
    dc_ccl::{self, Weights},
    model::{ModelKind, UnknownModel, initial_weights},
    training::{self, TrainError},
};
use fedhive_shared::{
    NamedTensors, TensorError,
    wire::{CloudStatus, RoundState, TrainingParams},
};
use tracing::info;

pub mod cli;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] UnknownModel),
    #[error("a model file is not valid safetensors: {0}")]
    Tensors(#[from] TensorError),
    #[error("state directory: {0}")]
    Io(#[from] std::io::Error),
}

/// How the worker trains its models.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Family of the cloud model `F_c`.
    pub cloud_model: ModelKind,
    /// Training of `F_c` on cloud data (plain SGD, cross-entropy).
    pub cloud_training: TrainingParams,
    /// Distillation of `F_m` from `F_c` (Adam, MSE on logits).
    pub distillation: TrainingParams,
    /// Cap on SGD steps of the worker's copy of `F_s` per round (`None`: the devices' training
    /// parameters as they are, which on the cloud's larger data means many more steps than a
    /// device takes).
    pub co_model_steps: Option<u32>,
    pub seed: u64,
    /// How often the worker asks the server for its task's round.
    pub poll: Duration,
}

/// What a worker did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerReport {
    /// Rounds this worker submitted (or re-submitted after a restart) a contribution to.
    pub contributions: u32,
    /// Bytes of `F_c` as safetensors: what DC-CCL never moves.
    pub cloud_model_bytes: u64,
}

/// A worker bound to one DC-CCL task and its cloud data.
pub struct Worker {
    pub client: FedhiveClient,
    pub task_id: String,
    pub token: String,
    pub device: burn::tensor::Device,
    pub data: Arc<Dataset>,
    pub state_dir: PathBuf,
    pub options: WorkerOptions,
}

/// `F_c(x) + F_s(x)` for each image (`[n * 784]` pixels): the class DC-CCL serves.
pub fn predict(
    cloud: Weights,
    co: Weights,
    device: &burn::tensor::Device,
    images: &[f32],
) -> Result<Vec<u8>, TrainError> {
    dc_ccl::predict_sum(cloud, co, device, images)
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The model at `path`, or `make()`'s result, stored there first.
fn stored_or(
    path: &Path,
    make: impl FnOnce() -> Result<NamedTensors, WorkerError>,
) -> Result<NamedTensors, WorkerError> {
    if path.exists() {
        return Ok(NamedTensors::decode(&std::fs::read(path)?)?);
    }
    let model = make()?;
    write_atomic(path, &model.encode())?;
    Ok(model)
}

impl Worker {
    /// The trained cloud model `F_c` (trained once, then read from the state directory).
    pub async fn cloud_model(&self) -> Result<NamedTensors, WorkerError> {
        let (path, kind, data, device) = (
            self.state_dir.join("cloud-model.safetensors"),
            self.options.cloud_model,
            self.data.clone(),
            self.device.clone(),
        );
        let (params, seed) = (self.options.cloud_training.clone(), self.options.seed);
        tokio::task::spawn_blocking(move || {
            stored_or(&path, || {
                info!(model = %kind, samples = data.len(), epochs = params.local_epochs, "training the cloud model F_c");
                let init = initial_weights(kind, seed);
                let update = training::train_local(kind, &device, &init, &data, &params, seed)?;
                Ok(init.add(&update.delta))
            })
        })
        .await
        .expect("training task panicked")
    }

    /// Control model version 1, distilled from `cloud` and published (again, unchanged, after a
    /// restart: the server keeps the first and answers a repeat with its receipt).
    async fn control_model(
        &self,
        status: &CloudStatus,
        cloud: &NamedTensors,
    ) -> Result<NamedTensors, WorkerError> {
        let control_kind: ModelKind = status.control_model.parse()?;
        let (path, cloud_kind, data, device) = (
            self.state_dir.join("control-model-1.safetensors"),
            self.options.cloud_model,
            self.data.clone(),
            self.device.clone(),
        );
        let (params, seed, cloud) = (
            self.options.distillation.clone(),
            self.options.seed,
            cloud.clone(),
        );
        let have = status.control_version.is_some() && !path.exists();
        let control = if have {
            // The state directory was lost after publishing: the server holds version 1.
            let (_, bytes) = self.client.download_control_model(&self.task_id, Some(1)).await?;
            write_atomic(&path, &bytes)?;
            NamedTensors::decode(&bytes)?
        } else {
            tokio::task::spawn_blocking(move || {
                stored_or(&path, || {
                    info!(model = %control_kind, "distilling the control model F_m from F_c");
                    let init = initial_weights(control_kind, seed ^ 0xF00D);
                    let teacher = Weights::new(cloud_kind, &cloud);
                    Ok(dc_ccl::distil(
                        Weights::new(control_kind, &init),
                        teacher,
                        &device,
                        &data,
                        &params,
                        seed,
                    )?
                    .0)
                })
            })
            .await
            .expect("training task panicked")?
        };
        self.client
            .publish_control_model(&self.task_id, 1, &self.token, Bytes::from(control.encode()))
            .await?;
        Ok(control)
    }

    /// The cloud's delta of `F_s` for an open round, trained once and kept until sent.
    async fn contribution(
        &self,
        status: &CloudStatus,
        round_id: i64,
        base_version: i64,
        control: &Arc<NamedTensors>,
    ) -> Result<Bytes, WorkerError> {
        let path = self
            .state_dir
            .join(format!("contribution-{round_id}.safetensors"));
        if path.exists() {
            return Ok(Bytes::from(std::fs::read(&path)?));
        }
        let co_kind: ModelKind = status.model.parse()?;
        let control_kind: ModelKind = status.control_model.parse()?;
        let (_, base) = self
            .client
            .download_model(&self.task_id, Some(base_version))
            .await?;
        let base = NamedTensors::decode(&base)?;
        let (data, device, control) = (self.data.clone(), self.device.clone(), control.clone());
        let (params, seed) = (
            status.training.clone(),
            self.options.seed ^ ((round_id as u64) << 20),
        );
        let update = tokio::task::spawn_blocking(move || {
            dc_ccl::train_co_model(
                Weights::new(co_kind, &base),
                Weights::new(control_kind, &control),
                &device,
                &data,
                &params,
                seed,
            )
        })
        .await
        .expect("training task panicked")?;
        let body = update.delta.encode();
        write_atomic(&path, &body)?;
        // Earlier rounds' contributions were all sent (or their rounds closed).
        for entry in std::fs::read_dir(&self.state_dir)? {
            let entry = entry?.path();
            let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("contribution-") && entry != path {
                std::fs::remove_file(&entry)?;
            }
        }
        Ok(Bytes::from(body))
    }

    /// Runs the task's cloud side until the task finishes.
    pub async fn run(&self) -> Result<WorkerReport, WorkerError> {
        std::fs::create_dir_all(&self.state_dir)?;
        let cloud = self.cloud_model().await?;
        let mut report = WorkerReport {
            cloud_model_bytes: cloud.encode().len() as u64,
            ..WorkerReport::default()
        };
        let status = self.client.cloud_status(&self.task_id, &self.token).await?;
        let control = Arc::new(self.control_model(&status, &cloud).await?);
        loop {
            let status = self.client.cloud_status(&self.task_id, &self.token).await?;
            if status.state.is_over() {
                return Ok(report);
            }
            let open = status.round.as_ref().filter(|r| r.state == RoundState::Open);
            if let Some(round) = open
                && !status.cloud_submitted
            {
                let body = self
                    .contribution(&status, round.round_id, round.base_version, &control)
                    .await?;
                match self
                    .client
                    .submit_cloud_update(&self.task_id, round.round_id, &self.token, body)
                    .await
                {
                    Ok(_) => {
                        report.contributions += 1;
                        info!(round = round.round_id, "cloud contribution submitted");
                    }
                    // Too slow for this round (or it closed meanwhile): the next one is another.
                    Err(e) if e.code() == Some("round_closed") => {
                        tracing::warn!(
                            round = round.round_id,
                            "the round closed before the cloud's contribution"
                        )
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            tokio::time::sleep(self.options.poll).await;
        }
    }
}
