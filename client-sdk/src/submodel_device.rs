//! A device that trains a CTR model on its submodel: enrols its feature set `R_i` once, then in each
//! round it is assigned downloads only its rows plus the dense tensors (FedSubAvg) and uploads only
//! the rows it touched, or, when the task runs plain FedAvg on the same model, downloads the whole
//! model and uploads a full-size update (zero outside `R_i`) so the two can be compared.
//!
//! FedSubAvg is Ding et al., "Federated Submodel Optimization for Hot and Cold Data Features"
//! (NeurIPS 2022). The server needs `R_i` before any round (heat `h_m` counts the whole registered
//! population, not this round's devices), hence [`SubmodelDevice::enrol`] is separate from training.

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use fedhive_shared::{
    NamedTensors,
    sparse::{Enrolment, FeatureSet, RowsRequest, SparseTensors, split_specs},
    wire::{Assignment, MetricsReport, UploadReceipt},
};

use crate::{
    client::FedhiveClient,
    ctr::{CtrData, CtrSpec, TABLE, densify, submodel_of, train_local_sparse},
    device::DeviceError,
};

/// The burn device training runs on (re-exported so callers need not depend on burn).
pub type ComputeDevice = burn::tensor::Device;

/// How the task exchanges the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// FedSubAvg: rows `R_i` and dense tensors down, touched rows and dense Delta up.
    Submodel,
    /// FedAvg: the whole model down, a full-size Delta up.
    Dense,
}

pub struct SubmodelDevice {
    pub client: FedhiveClient,
    pub task_id: String,
    pub device_id: String,
    pub device: burn::tensor::Device,
    pub spec: CtrSpec,
    pub data: Arc<CtrData>,
    pub seed: u64,
    /// `R_i`, ascending.
    pub rows: Vec<u64>,
}

impl SubmodelDevice {
    pub fn new(
        client: FedhiveClient,
        task_id: &str,
        device_id: &str,
        device: burn::tensor::Device,
        spec: CtrSpec,
        data: Arc<CtrData>,
        seed: u64,
    ) -> Self {
        let rows = data.feature_set();
        SubmodelDevice {
            client,
            task_id: task_id.to_string(),
            device_id: device_id.to_string(),
            device,
            spec,
            data,
            seed,
            rows,
        }
    }

    fn rows_map(&self) -> BTreeMap<String, Vec<u64>> {
        BTreeMap::from([(TABLE.to_string(), self.rows.clone())])
    }

    /// Declares `R_i` and the sample count to the server (FedSubAvg's heat).
    pub async fn enrol(&self) -> Result<Enrolment, DeviceError> {
        let features = FeatureSet {
            num_samples: self.data.len() as u64,
            rows: self.rows_map(),
        };
        Ok(self
            .client
            .enrol_features(&self.task_id, &self.device_id, &features)
            .await?)
    }

    /// Downloads this device's submodel of the assigned version.
    pub async fn submodel(&self, version: i64, exchange: Exchange) -> Result<SparseTensors, DeviceError> {
        let bad = |e: String| DeviceError::BadModel(e);
        match exchange {
            Exchange::Submodel => {
                let request = RowsRequest {
                    version: Some(version),
                    rows: self.rows_map(),
                };
                let (_, bytes) = self.client.download_submodel(&self.task_id, &request).await?;
                let (dense, tables) = split_specs(&self.spec.tensor_specs(), &[TABLE.to_string()]);
                SparseTensors::decode_checked(&bytes, &dense, &tables, f32::MAX)
                    .map_err(|e| bad(e.to_string()))
            }
            Exchange::Dense => {
                let (_, bytes) = self.client.download_model(&self.task_id, Some(version)).await?;
                let full = NamedTensors::decode(&bytes).map_err(|e| bad(e.to_string()))?;
                Ok(submodel_of(&full, &self.rows)?)
            }
        }
    }

    /// One round's work: download, train locally, upload, report the training loss.
    pub async fn train_and_upload(
        &self,
        a: &Assignment,
        exchange: Exchange,
    ) -> Result<UploadReceipt, DeviceError> {
        let sub = self.submodel(a.model_version, exchange).await?;
        let (device, data, params) = (self.device.clone(), self.data.clone(), a.training.clone());
        let seed = self.seed ^ (a.round_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let update =
            tokio::task::spawn_blocking(move || train_local_sparse(&device, &sub, &data, &params, seed))
                .await
                .expect("training task panicked")?;
        let body = match exchange {
            Exchange::Submodel => update.delta.encode(),
            Exchange::Dense => densify(&update.delta, &self.spec).encode(),
        };
        let receipt = self
            .client
            .upload_update(&a.upload_token, update.num_samples, Bytes::from(body))
            .await?;
        let metrics = MetricsReport {
            loss: update.loss,
            num_samples: update.num_samples,
            accuracy: None,
        };
        self.client.report_metrics(&a.upload_token, &metrics).await?;
        Ok(receipt)
    }
}
