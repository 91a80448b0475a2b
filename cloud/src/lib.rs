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
//! 4. optionally (off by default; [`WorkerOptions::head_tuning`]), after each committed round,
//!    tunes the last layer of the new `F_s` on a small labelled tuning set with the same loss (the
//!    paper's step 5) and keeps the result as its serving co-model ([`Worker::served_co_model`]).
//!    The tuned co-model is for serving only: the task's model chain, which devices train, stays
//!    the fusion's deterministic output, so a restart or a second worker cannot fork it.
//!
//! Serving is a library call, [`predict`]: `F_c(x) + F_s(x)` (the worker answers no HTTP itself).
//!
//! Crash safety: every artefact is written to the state directory (write, fsync, rename) before it
//! is sent, and sent again unchanged after a restart. The server stores a contribution once per
//! round and answers a repeat of the same bytes with the same receipt, so killing the worker at any
//! point neither loses nor duplicates one.

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

pub mod anon;
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
    /// Step 5, off when `None`: tune each committed `F_s`'s last layer for serving.
    pub head_tuning: Option<HeadTuning>,
}

/// The tuning set and training of the optional head-tuning step (plain SGD, loss
/// `CE(F_m(x) + F_s(x), y)`, only `F_s`'s last layer learns).
#[derive(Debug, Clone)]
pub struct HeadTuning {
    /// A small labelled set; in the authors' code, a sample of the devices' kind of data that the
    /// cloud holds for this purpose (data the cloud-only arm never sees).
    pub data: Arc<Dataset>,
    pub params: TrainingParams,
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

/// The worker's training parameters for its copy of `F_s`: the devices' (the task's), with at most
/// `cap` SGD steps when set.
fn co_model_params(task: &TrainingParams, cap: Option<u32>) -> TrainingParams {
    let max_local_steps = match (task.max_local_steps, cap) {
        (steps, None) => steps,
        (0, Some(cap)) => cap,
        (steps, Some(cap)) => steps.min(cap),
    };
    TrainingParams {
        max_local_steps,
        ..task.clone()
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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
            co_model_params(&status.training, self.options.co_model_steps),
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

    /// Step 5: version `version` of the task's `F_s` with its last layer tuned, made once and kept
    /// in the state directory (older versions' files are removed).
    async fn tune(
        &self,
        tuning: &HeadTuning,
        status: &CloudStatus,
        version: i64,
        control: &Arc<NamedTensors>,
    ) -> Result<(), WorkerError> {
        let path = self
            .state_dir
            .join(format!("served-co-model-{version}.safetensors"));
        if path.exists() {
            return Ok(());
        }
        let co_kind: ModelKind = status.model.parse()?;
        let control_kind: ModelKind = status.control_model.parse()?;
        let (_, committed) = self.client.download_model(&self.task_id, Some(version)).await?;
        let committed = NamedTensors::decode(&committed)?;
        let (tuning, device, control) = (tuning.clone(), self.device.clone(), control.clone());
        let seed = self.options.seed ^ ((version as u64) << 24);
        let tuned = tokio::task::spawn_blocking(move || {
            dc_ccl::tune_head(
                Weights::new(co_kind, &committed),
                Weights::new(control_kind, &control),
                &device,
                &tuning.data,
                &tuning.params,
                seed,
            )
        })
        .await
        .expect("training task panicked")?
        .0;
        write_atomic(&path, &tuned.encode())?;
        info!(version, "head of F_s tuned for serving");
        for (old, _) in self.served_files()? {
            if old != path {
                std::fs::remove_file(old)?;
            }
        }
        Ok(())
    }

    /// The served co-model files in the state directory with their versions.
    fn served_files(&self) -> Result<Vec<(PathBuf, i64)>, WorkerError> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.state_dir)? {
            let path = entry?.path();
            let version = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("served-co-model-")?.strip_suffix(".safetensors"))
                .and_then(|v| v.parse::<i64>().ok());
            if let Some(version) = version {
                files.push((path, version));
            }
        }
        Ok(files)
    }

    /// The co-model this worker serves beside `F_c` when head tuning is on: the latest committed
    /// `F_s` it tuned, with its version; `None` before the first or with tuning off.
    pub fn served_co_model(&self) -> Result<Option<(i64, NamedTensors)>, WorkerError> {
        let Some((path, version)) = self.served_files()?.into_iter().max_by_key(|(_, v)| *v) else {
            return Ok(None);
        };
        Ok(Some((version, NamedTensors::decode(&std::fs::read(path)?)?)))
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
            // Version 0 is the task's initial model; later ones are fusions.
            if let Some(tuning) = &self.options.head_tuning
                && status.model_version > 0
            {
                self.tune(tuning, &status, status.model_version, &control).await?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_cap_bounds_the_workers_co_model_training() {
        let task = |max_local_steps| TrainingParams {
            local_epochs: 1,
            max_local_steps,
            batch_size: 32,
            learning_rate: 0.05,
            learning_rate_schedule: None,
        };
        let steps = |task_steps, cap| co_model_params(&task(task_steps), cap).max_local_steps;
        // 0 is "no cap" in the task's parameters: one epoch of the cloud's data.
        assert_eq!(steps(0, None), 0);
        assert_eq!(steps(0, Some(100)), 100);
        assert_eq!(steps(40, Some(100)), 40);
        assert_eq!(steps(400, Some(100)), 100);
        assert_eq!(steps(40, None), 40);
        assert_eq!(co_model_params(&task(0), Some(7)).learning_rate, 0.05);
    }
}
