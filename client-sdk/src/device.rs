//! The device loop: check in, download the model, train locally, upload the update, report metrics,
//! and repeat until the task finishes.
//!
//! What a round asks of the device depends on the task's strategy, as its assignment says
//! ([`LocalWork`]). FedLaAvg reuses FedAvg's local step: `local_epochs` / `max_local_steps` of plain
//! SGD at `learning_rate` = gamma (times s_i, 1 for equal weighting) is FedLaAvg's `C` steps from
//! `z = x`, and the device uploads `G = (x - z) / gamma`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use fedhive_shared::{
    NamedTensors, fedlaavg,
    wire::{Assignment, CheckinResponse, DeviceCredentials, MetricsReport},
};

use crate::{
    block_cyclic::{McStart, train_mc},
    client::{ClientError, FedhiveClient},
    data::Dataset,
    dc_ccl::{self, Weights},
    local_work::{LocalWork, encode_update},
    model::ModelKind,
    training::{self, TrainError},
};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("the server sent a model this device cannot read: {0}")]
    BadModel(String),
}

/// What one device did over a task's lifetime.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceReport {
    pub rounds_trained: u32,
    pub updates_accepted: u32,
    /// Updates refused because the round closed before they arrived (too slow, or over-selected).
    pub updates_late: u32,
    /// Update bytes this run sent (each upload's body once; retries not counted).
    pub bytes_uploaded: u64,
}

/// A simulated (or real) device bound to one task and its local data.
pub struct Device {
    pub client: FedhiveClient,
    pub task_id: String,
    pub device: burn::tensor::Device,
    pub data: Arc<Dataset>,
    pub seed: u64,
    /// The device's identity: from [`Device::enrol_with_key`] (every task), [`Device::enrol`]
    /// (FedLaAvg, one task), or stored by the app from an earlier enrolment
    /// ([`Device::with_credentials`]). Sent with every check-in, upload and metrics report.
    pub credentials: Option<DeviceCredentials>,
    /// Block-cyclic tasks: the device's data in each block, by block name (a block without an entry
    /// trains on `data`).
    pub block_data: BTreeMap<String, Arc<Dataset>>,
    /// The last model downloaded: `(version, tensors)`, reused while the version stays the same.
    cached: Option<(i64, Arc<NamedTensors>)>,
    /// MC-PSGD: the last chain downloaded per block, `(version, tensors)`.
    cached_chains: BTreeMap<String, (i64, Arc<NamedTensors>)>,
    /// DC-CCL: the control model `F_m`, downloaded once per version.
    cached_control: Option<(i64, Arc<NamedTensors>)>,
    /// Bytes downloaded and uploaded (bodies only), for reports of what a strategy moves.
    pub traffic: Traffic,
}

/// Body bytes a device moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub downloaded: u64,
    pub uploaded: u64,
}

impl Device {
    pub fn new(
        client: FedhiveClient,
        task_id: &str,
        device: burn::tensor::Device,
        data: Arc<Dataset>,
        seed: u64,
    ) -> Self {
        Device {
            client,
            task_id: task_id.to_string(),
            device,
            data,
            seed,
            credentials: None,
            block_data: BTreeMap::new(),
            cached: None,
            cached_chains: BTreeMap::new(),
            cached_control: None,
            traffic: Traffic::default(),
        }
    }

    /// Enrols with an enrolment key and keeps the credential for every later request. The app
    /// should store what this returns (the server shows the secret only once) and hand it back
    /// with [`Device::with_credentials`] when it starts again.
    pub async fn enrol_with_key(&mut self, enrolment_key: &str) -> Result<&DeviceCredentials, DeviceError> {
        let credentials = self.client.enrol_device(enrolment_key).await?;
        Ok(&*self.credentials.insert(credentials))
    }

    /// A device that enrolled before (its stored credential).
    pub fn with_credentials(mut self, credentials: DeviceCredentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Enrols with the server in this device's FedLaAvg task only (no enrolment key) and keeps the
    /// credentials for later check-ins.
    pub async fn enrol(&mut self) -> Result<&DeviceCredentials, DeviceError> {
        let credentials = self.client.enrol(&self.task_id).await?;
        Ok(&*self.credentials.insert(credentials))
    }

    /// One check-in, with the device's credentials if it has enrolled.
    pub async fn checkin(&self) -> Result<CheckinResponse, DeviceError> {
        Ok(match &self.credentials {
            Some(c) => self.client.checkin_as(&self.task_id, c).await?,
            None => self.client.checkin(&self.task_id).await?,
        })
    }

    /// Block-cyclic tasks: the data this device holds while `block` is active.
    pub fn with_block_data(mut self, block: &str, data: Arc<Dataset>) -> Self {
        self.block_data.insert(block.to_string(), data);
        self
    }

    /// Participates until the server says the task is finished.
    pub async fn run(&mut self) -> Result<DeviceReport, DeviceError> {
        let mut report = DeviceReport::default();
        let uploaded_before = self.traffic.uploaded;
        loop {
            match self.checkin().await? {
                CheckinResponse::Finished { .. } => {
                    report.bytes_uploaded = self.traffic.uploaded - uploaded_before;
                    return Ok(report);
                }
                CheckinResponse::RetryAfter { retry_after_ms, .. } => {
                    // Jitter spreads the herd of devices that were all told the same wait.
                    let jitter = 0.75 + rand::random::<f64>() * 0.5;
                    tokio::time::sleep(Duration::from_millis(retry_after_ms).mul_f64(jitter)).await;
                }
                CheckinResponse::Assigned(assignment) => {
                    report.rounds_trained += 1;
                    match self.train_and_upload(&assignment).await {
                        Ok(()) => report.updates_accepted += 1,
                        Err(DeviceError::Client(e)) if e.code() == Some("round_closed") => {
                            report.updates_late += 1
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    async fn model(&mut self, version: i64) -> Result<Arc<NamedTensors>, DeviceError> {
        if let Some((v, model)) = &self.cached
            && *v == version
        {
            return Ok(model.clone());
        }
        let (_, bytes): (i64, Bytes) = self.client.download_model(&self.task_id, Some(version)).await?;
        self.traffic.downloaded += bytes.len() as u64;
        let model = Arc::new(NamedTensors::decode(&bytes).map_err(|e| DeviceError::BadModel(e.to_string()))?);
        self.cached = Some((version, model.clone()));
        Ok(model)
    }

    /// MC-PSGD: version `version` of `block`'s chain, cached while the version stays the same.
    async fn chain(&mut self, block: &str, version: i64) -> Result<Arc<NamedTensors>, DeviceError> {
        if let Some((v, chain)) = self.cached_chains.get(block)
            && *v == version
        {
            return Ok(chain.clone());
        }
        let bytes = self.client.download_chain(&self.task_id, block, version).await?;
        self.traffic.downloaded += bytes.len() as u64;
        let chain = Arc::new(NamedTensors::decode(&bytes).map_err(|e| DeviceError::BadModel(e.to_string()))?);
        self.cached_chains
            .insert(block.to_string(), (version, chain.clone()));
        Ok(chain)
    }

    /// DC-CCL: version `version` of the control model, downloaded once.
    async fn control(&mut self, version: i64) -> Result<Arc<NamedTensors>, DeviceError> {
        if let Some((v, control)) = &self.cached_control
            && *v == version
        {
            return Ok(control.clone());
        }
        let (_, bytes) = self
            .client
            .download_control_model(&self.task_id, Some(version))
            .await?;
        self.traffic.downloaded += bytes.len() as u64;
        let control =
            Arc::new(NamedTensors::decode(&bytes).map_err(|e| DeviceError::BadModel(e.to_string()))?);
        self.cached_control = Some((version, control.clone()));
        Ok(control)
    }

    /// One round's work for an assignment.
    pub async fn train_and_upload(&mut self, a: &Assignment) -> Result<(), DeviceError> {
        let kind: ModelKind = a
            .model
            .parse()
            .map_err(|_| DeviceError::BadModel(format!("unknown model family `{}`", a.model)))?;
        let global = self.model(a.model_version).await?;
        let block = a.block.as_ref();
        let data = block
            .and_then(|b| self.block_data.get(&b.name))
            .unwrap_or(&self.data)
            .clone();
        let (device, params) = (self.device.clone(), a.training.clone());
        let seed = self.seed ^ (a.round_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (body, num_samples, loss) = match LocalWork::of(a) {
            LocalWork::Chains {
                block,
                version,
                chain_learning_rate,
            } => {
                let chain = self.chain(&block, version).await?;
                let update = tokio::task::spawn_blocking(move || {
                    let start = McStart {
                        x: &global,
                        chain: &chain,
                        chain_learning_rate,
                    };
                    train_mc(kind, &device, start, &data, &params, seed)
                })
                .await
                .expect("training task panicked")?;
                (update.body, update.num_samples, update.train_loss)
            }
            LocalWork::WithControl { model, version } => {
                let control_kind: ModelKind = model
                    .parse()
                    .map_err(|_| DeviceError::BadModel(format!("unknown control model family `{model}`")))?;
                let control = self.control(version).await?;
                let update = tokio::task::spawn_blocking(move || {
                    dc_ccl::train_co_model(
                        Weights::new(kind, &global),
                        Weights::new(control_kind, &control),
                        &device,
                        &data,
                        &params,
                        seed,
                    )
                })
                .await
                .expect("training task panicked")?;
                (update.delta, update.num_samples, update.loss)
            }
            work @ (LocalWork::Delta | LocalWork::GradientSum) => {
                let update = tokio::task::spawn_blocking(move || {
                    training::train_local(kind, &device, &global, &data, &params, seed)
                })
                .await
                .expect("training task panicked")?;
                let body = match work {
                    LocalWork::GradientSum => fedlaavg::gradient_sum(&update.delta, a.training.learning_rate),
                    _ => update.delta,
                };
                (body, update.num_samples, update.loss)
            }
        };
        let body = Bytes::from(encode_update(&body, a.encoding));
        self.traffic.uploaded += body.len() as u64;
        let credentials = self.credentials.as_ref();
        self.client
            .upload_update_as(&a.upload_token, credentials, num_samples, body)
            .await?;
        let metrics = MetricsReport {
            loss,
            num_samples,
            accuracy: None,
        };
        self.client
            .report_metrics_as(&a.upload_token, credentials, &metrics)
            .await?;
        Ok(())
    }
}
