//! A CTR-style model with a sparse table, trained on a device's submodel.
//!
//! Each sample has one categorical feature per field (user, item, context, ...), all ids of one
//! shared table `emb.weight` (`[vocab, dim]`; fields use disjoint id ranges). The model looks up
//! each field's embedding (an embedding bag of one feature per field), concatenates them, and
//! applies an MLP `fields*dim -> hidden -> 1` with ReLU; the loss is the logistic loss of the logit.
//!
//! Submodels (FedSubAvg: Ding et al., "Federated Submodel Optimization for Hot and Cold Data
//! Features", NeurIPS 2022; rule in `ALGORITHMS.md`): a device only ever needs the rows `R_i` its
//! data touches. burn's
//! embeddings get dense gradients, so the device builds a *local* table of just those rows (feature
//! ids remapped to local indices `0..|R_i|`, [`crate::submodel`]) and trains [`CtrNet`] with the
//! SDK's local step like any app's model; its update is the change of those rows plus the change
//! of the dense tensors ([`SparseTensors`]).

use std::collections::{BTreeMap, HashMap};

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhive_shared::sparse::{SparseRows, SparseTensors};
use fedhive_shared::wire::TrainingParams;
use fedhive_shared::{NamedTensors, TensorSpec};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Uniform};

use crate::federated::{FederatedModel, LocalData};
use crate::training::{self, TrainError};
use crate::{model, submodel};

/// Name of the model family in a task config.
pub const CTR_MODEL: &str = "ctr";
/// The sparse table's tensor name.
pub const TABLE: &str = "emb.weight";

/// Sizes of a CTR model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtrSpec {
    /// Rows of the table (all fields' ids together).
    pub vocab: usize,
    pub fields: usize,
    pub dim: usize,
    pub hidden: usize,
}

impl CtrSpec {
    fn layout(&self) -> Vec<(&'static str, Vec<usize>, f32)> {
        let input = self.fields * self.dim;
        vec![
            (TABLE, vec![self.vocab, self.dim], 0.01),
            (
                "fc1.weight",
                vec![input, self.hidden],
                1.0 / (input as f32).sqrt(),
            ),
            ("fc1.bias", vec![self.hidden], 1.0 / (input as f32).sqrt()),
            (
                "fc2.weight",
                vec![self.hidden, 1],
                1.0 / (self.hidden as f32).sqrt(),
            ),
            ("fc2.bias", vec![1], 0.0),
        ]
    }

    /// Every tensor with its shape, in name order.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let mut specs: Vec<TensorSpec> = self
            .layout()
            .into_iter()
            .map(|(name, shape, _)| TensorSpec {
                name: name.to_string(),
                shape,
            })
            .collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs
    }

    /// Deterministic initial weights: embeddings `U(-0.01, 0.01)`, linear layers `U(±1/sqrt(fan_in))`,
    /// output bias 0.
    pub fn initial_weights(&self, seed: u64) -> NamedTensors {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = BTreeMap::new();
        for (name, shape, bound) in self.layout() {
            let n: usize = shape.iter().product();
            let data = if bound > 0.0 {
                let dist = Uniform::new_inclusive(-bound, bound).expect("positive bound");
                (0..n).map(|_| dist.sample(&mut rng)).collect()
            } else {
                vec![0.0; n]
            };
            out.insert(name.to_string(), fedhive_shared::Tensor { shape, data });
        }
        NamedTensors(out)
    }
}

/// A device's CTR samples: `fields` feature ids per sample and a 0/1 label.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CtrData {
    pub fields: usize,
    /// `len() * fields` ids, sample-major.
    pub features: Vec<u64>,
    pub labels: Vec<f32>,
}

impl CtrData {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn sample(&self, i: usize) -> &[u64] {
        &self.features[i * self.fields..(i + 1) * self.fields]
    }

    /// The submodel `R_i`: every feature id the data touches, ascending.
    pub fn feature_set(&self) -> Vec<u64> {
        let mut ids = self.features.clone();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// What a device sends back after training its submodel.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseLocalUpdate {
    /// Change of the dense tensors and of the table rows `R_i`.
    pub delta: SparseTensors,
    pub num_samples: u64,
    /// Mean training loss over the last epoch.
    pub loss: f32,
}

/// The CTR network with a local table: row `k` of `emb.weight` is feature `R_i[k]` of the
/// submodel (ids ascending). It takes part in training as any app's model does
/// ([`FederatedModel`], [`crate::submodel`]).
#[derive(Module, Debug)]
pub struct CtrNet {
    emb: Embedding,
    fc1: Linear,
    fc2: Linear,
}

impl CtrNet {
    /// A network with a local table of `rows` rows for samples of `fields` features.
    pub fn new(rows: usize, fields: usize, dim: usize, hidden: usize, device: &Device) -> Self {
        CtrNet {
            emb: EmbeddingConfig::new(rows, dim).init(device),
            fc1: LinearConfig::new(fields * dim, hidden).init(device),
            fc2: LinearConfig::new(hidden, 1).init(device),
        }
    }

    /// `(rows, dim, hidden)` of the submodel's table and first layer.
    fn sizes(sub: &SparseTensors) -> Result<(usize, usize, usize), TrainError> {
        let table = sub
            .tables
            .get(TABLE)
            .ok_or_else(|| TrainError::InvalidParams(format!("the submodel carries no `{TABLE}` rows")))?;
        let hidden = sub.dense.0.get("fc1.bias").map_or(0, |t| t.data.len());
        Ok((table.len(), table.width, hidden))
    }

    /// The network for the submodel `sub` and samples of `fields` features, with its weights.
    fn of(sub: &SparseTensors, fields: usize, device: &Device) -> Result<CtrNet, TrainError> {
        let (rows, dim, hidden) = CtrNet::sizes(sub)?;
        let weights = submodel::local_weights(sub);
        let net = CtrNet::new(rows, fields, dim, hidden, device);
        Ok(model::load_into(net, &weights, &weights.specs())?)
    }

    /// Logits `[batch]` of samples given as local row indices `[batch, fields]`.
    fn forward(&self, local: Tensor<2, Int>) -> Tensor<1> {
        let [batch, fields] = local.dims();
        let [_, dim] = self.emb.weight.val().dims();
        let x = self
            .emb
            .weight
            .val()
            .select(0, local.reshape([batch * fields]))
            .reshape([batch, fields * dim]);
        let z = self.fc2.forward(relu(self.fc1.forward(x)));
        z.reshape([batch])
    }
}

/// Local row indices `[batch, fields]` and 0/1 labels `[batch]`.
pub type CtrBatch = (Tensor<2, Int>, Tensor<1>);

impl FederatedModel for CtrNet {
    type Batch = CtrBatch;

    fn loss(&self, (local, labels): CtrBatch) -> Tensor<1> {
        logistic(self.forward(local), labels).mean()
    }
}

/// A device's samples with their features as rows of its local table.
struct LocalSamples<'a> {
    data: &'a CtrData,
    /// Local row of every feature of `data`, sample-major.
    local: Vec<i64>,
}

impl<'a> LocalSamples<'a> {
    /// Fails if a feature of `data` is not a row of `sub`.
    fn new(data: &'a CtrData, sub: &SparseTensors) -> Result<Self, TrainError> {
        let mut ids = sub.tables.get(TABLE).map(|r| r.ids.clone()).unwrap_or_default();
        ids.sort_unstable();
        let index: HashMap<u64, i64> = ids.iter().enumerate().map(|(k, &id)| (id, k as i64)).collect();
        let local = data
            .features
            .iter()
            .map(|id| {
                index.get(id).copied().ok_or_else(|| {
                    TrainError::InvalidParams(format!("feature {id} is not a row of the submodel"))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(LocalSamples { data, local })
    }
}

impl LocalData for LocalSamples<'_> {
    type Batch = CtrBatch;

    fn num_samples(&self) -> usize {
        self.data.len()
    }

    fn batch(&self, idx: &[usize], device: &Device) -> CtrBatch {
        let f = self.data.fields;
        let mut ids = Vec::with_capacity(idx.len() * f);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            ids.extend_from_slice(&self.local[i * f..(i + 1) * f]);
            labels.push(self.data.labels[i]);
        }
        (
            Tensor::from_data(TensorData::new(ids, [idx.len(), f]), device),
            Tensor::from_data(TensorData::new(labels, [idx.len()]), device),
        )
    }
}

/// Per-sample logistic loss `-(y log s(z) + (1 - y) log s(-z))` of logits `z` and labels `y`.
fn logistic(z: Tensor<1>, y: Tensor<1>) -> Tensor<1> {
    let pos = log_sigmoid(z.clone()) * y.clone();
    let neg = log_sigmoid(z.neg()) * y.neg().add_scalar(1.0);
    (pos + neg).neg()
}

fn check(data: &CtrData) -> Result<(), TrainError> {
    if data.is_empty() {
        return Err(TrainError::EmptyDataset);
    }
    if data.fields == 0 || data.features.len() != data.len() * data.fields {
        return Err(TrainError::InvalidParams(format!(
            "{} feature ids for {} samples of {} fields",
            data.features.len(),
            data.len(),
            data.fields
        )));
    }
    Ok(())
}

/// Trains the submodel `sub` (dense tensors + the table rows of the device's features) with the
/// SDK's local step ([`training::train_model`], as for any app's model) on the logistic loss, and
/// returns the change of every tensor and row.
pub fn train_local_sparse(
    device: &Device,
    sub: &SparseTensors,
    data: &CtrData,
    params: &TrainingParams,
    seed: u64,
) -> Result<SparseLocalUpdate, TrainError> {
    check(data)?;
    let samples = LocalSamples::new(data, sub)?;
    let start = submodel::local_weights(sub);
    let (rows, dim, hidden) = CtrNet::sizes(sub)?;
    let init = |d: &Device| CtrNet::new(rows, data.fields, dim, hidden, d);
    let update = training::train_model(init, device, &start, &samples, params, seed, &mut |_| true)?;
    let delta =
        submodel::rows_update(update.delta, sub).map_err(|e| TrainError::InvalidParams(e.to_string()))?;
    Ok(SparseLocalUpdate {
        delta,
        num_samples: update.num_samples,
        loss: update.loss,
    })
}

/// Per-sample logistic loss of the submodel `sub` on `data` (no autodiff, batches of 4096).
pub fn sample_losses(device: &Device, sub: &SparseTensors, data: &CtrData) -> Result<Vec<f32>, TrainError> {
    check(data)?;
    let device = device.clone().without_autodiff();
    let net = CtrNet::of(sub, data.fields, &device)?;
    let samples = LocalSamples::new(data, sub)?;
    let all: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for idx in all.chunks(4096) {
        let (x, y) = samples.batch(idx, &device);
        let losses = logistic(net.forward(x), y)
            .try_into_data_as::<f32>()
            .map_err(|e| TrainError::Backend(e.to_string()))?
            .try_into_vec::<f32>()
            .map_err(|e| TrainError::Backend(format!("{e:?}")))?;
        out.extend(losses);
    }
    Ok(out)
}

/// The submodel of a full (dense) model: its dense tensors and the table rows `ids` (ascending).
pub fn submodel_of(full: &NamedTensors, ids: &[u64]) -> Result<SparseTensors, TrainError> {
    let table = full
        .0
        .get(TABLE)
        .ok_or_else(|| TrainError::InvalidParams(format!("the model has no `{TABLE}`")))?;
    let width = table.shape[1];
    let mut rows = SparseRows::new(width);
    for &id in ids {
        let start = id as usize * width;
        let row = table
            .data
            .get(start..start + width)
            .ok_or_else(|| TrainError::InvalidParams(format!("feature {id} is outside the table")))?;
        rows.push(id, row);
    }
    let mut dense = full.clone();
    dense.0.remove(TABLE);
    Ok(SparseTensors {
        dense,
        tables: BTreeMap::from([(TABLE.to_string(), rows)]),
    })
}

/// A sparse update as a full-size dense one (zero for every row it does not carry): what a device
/// uploads when the task runs plain FedAvg on the same model.
pub fn densify(delta: &SparseTensors, spec: &CtrSpec) -> NamedTensors {
    let mut out = delta.dense.clone();
    let mut table = vec![0f32; spec.vocab * spec.dim];
    if let Some(rows) = delta.tables.get(TABLE) {
        for (k, &id) in rows.ids.iter().enumerate() {
            let start = id as usize * spec.dim;
            table[start..start + spec.dim].copy_from_slice(rows.row(k));
        }
    }
    out.0.insert(
        TABLE.to_string(),
        fedhive_shared::Tensor {
            shape: vec![spec.vocab, spec.dim],
            data: table,
        },
    );
    out
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    fn spec() -> CtrSpec {
        CtrSpec {
            vocab: 50,
            fields: 2,
            dim: 4,
            hidden: 8,
        }
    }

    /// Label 1 exactly when the first field's feature is even: learnable from the embeddings alone.
    fn data() -> CtrData {
        let mut d = CtrData {
            fields: 2,
            ..CtrData::default()
        };
        for i in 0..200u64 {
            let a = i % 10;
            let b = 25 + (i * 7) % 5;
            d.features.extend([a, b]);
            d.labels.push(if a % 2 == 0 { 1.0 } else { 0.0 });
        }
        d
    }

    #[test]
    fn submodel_training_lowers_the_loss_and_touches_only_its_rows() {
        let device = Device::flex();
        let full = spec().initial_weights(3);
        assert_eq!(full.specs(), spec().tensor_specs());
        let data = data();
        let ids = data.feature_set();
        assert_eq!(ids.len(), 15);
        let sub = submodel_of(&full, &ids).unwrap();
        let before: f32 = sample_losses(&device, &sub, &data).unwrap().iter().sum::<f32>() / 200.0;
        let params = TrainingParams {
            local_epochs: 20,
            max_local_steps: 0,
            batch_size: 20,
            learning_rate: 0.5,
            learning_rate_schedule: None,
        };
        let update = train_local_sparse(&device, &sub, &data, &params, 1).unwrap();
        assert_eq!(update.delta.tables[TABLE].ids, ids);
        let mut after = sub.clone();
        for (name, t) in &mut after.dense.0 {
            for (x, d) in t.data.iter_mut().zip(&update.delta.dense.0[name].data) {
                *x += d;
            }
        }
        let rows = after.tables.get_mut(TABLE).unwrap();
        for (x, d) in rows.values.iter_mut().zip(&update.delta.tables[TABLE].values) {
            *x += d;
        }
        let loss: f32 = sample_losses(&device, &after, &data).unwrap().iter().sum::<f32>() / 200.0;
        assert!(before > 0.65 && loss < 0.3, "loss {before} -> {loss}");
        let dense = densify(&update.delta, &spec());
        let table = &dense.0[TABLE].data;
        assert!(
            table[11 * 4..12 * 4].iter().all(|&v| v == 0.0),
            "row 11 is not in R_i"
        );
        assert!(table[2 * 4..3 * 4].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn a_feature_outside_the_submodel_is_an_error() {
        let device = Device::flex();
        let full = spec().initial_weights(3);
        let sub = submodel_of(&full, &[0, 1]).unwrap();
        assert!(matches!(
            sample_losses(&device, &sub, &data()),
            Err(TrainError::InvalidParams(_))
        ));
    }
}
