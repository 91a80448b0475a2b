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
//! ids remapped to local indices `0..|R_i|`) and trains it with plain SGD; its update is the change
//! of those rows plus the change of the dense tensors ([`SparseTensors`]).

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhive_shared::sparse::{SparseRows, SparseTensors};
use fedhive_shared::wire::TrainingParams;
use fedhive_shared::{NamedTensors, TensorSpec};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Uniform};

use crate::model::ModelError;
use crate::training::TrainError;

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

#[derive(Module, Debug)]
struct CtrNet {
    /// The local table: row `k` is feature `ids[k]` of the submodel.
    emb: Param<Tensor<2>>,
    fc1: Linear,
    fc2: Linear,
}

impl CtrNet {
    /// Logits `[batch]` of samples given as local row indices `[batch * fields]`.
    fn forward(&self, local: Tensor<1, Int>, batch: usize) -> Tensor<1> {
        let [_, dim] = self.emb.val().dims();
        let fields = local.dims()[0] / batch;
        let x = self.emb.val().select(0, local).reshape([batch, fields * dim]);
        let z = self.fc2.forward(relu(self.fc1.forward(x)));
        z.reshape([batch])
    }
}

/// Per-sample logistic loss `-(y log s(z) + (1 - y) log s(-z))` of logits `z` and labels `y`.
fn logistic(z: Tensor<1>, y: Tensor<1>) -> Tensor<1> {
    let pos = log_sigmoid(z.clone()) * y.clone();
    let neg = log_sigmoid(z.neg()) * y.neg().add_scalar(1.0);
    (pos + neg).neg()
}

fn tensor<const D: usize>(t: &fedhive_shared::Tensor, device: &Device) -> Result<Tensor<D>, ModelError> {
    let expected: usize = t.shape.iter().product();
    if t.data.len() != expected || t.shape.len() != D {
        return Err(ModelError::DataLength {
            name: "tensor".into(),
            shape: t.shape.clone(),
            expected,
            found: t.data.len(),
        });
    }
    Ok(Tensor::from_data(
        TensorData::new(t.data.clone(), t.shape.clone()),
        device,
    ))
}

fn dense<'a>(sub: &'a SparseTensors, name: &str) -> Result<&'a fedhive_shared::Tensor, TrainError> {
    sub.dense.0.get(name).ok_or_else(|| {
        TrainError::Model(ModelError::Weights(fedhive_shared::TensorError::MissingTensor(
            name.into(),
        )))
    })
}

/// Builds the network from a submodel (dense tensors and the table rows it carries).
fn build(sub: &SparseTensors, device: &Device) -> Result<(CtrNet, Vec<u64>), TrainError> {
    let rows = sub
        .tables
        .get(TABLE)
        .ok_or_else(|| TrainError::InvalidParams(format!("the submodel carries no `{TABLE}` rows")))?;
    let emb = Tensor::from_data(
        TensorData::new(rows.values.clone(), [rows.len(), rows.width]),
        device,
    );
    let linear = |prefix: &str| -> Result<Linear, TrainError> {
        let w = tensor::<2>(dense(sub, &format!("{prefix}.weight"))?, device)?;
        let b = tensor::<1>(dense(sub, &format!("{prefix}.bias"))?, device)?;
        Ok(Linear {
            weight: Param::from_tensor(w),
            bias: Some(Param::from_tensor(b)),
        })
    };
    let net = CtrNet {
        emb: Param::from_tensor(emb),
        fc1: linear("fc1")?,
        fc2: linear("fc2")?,
    };
    Ok((net, rows.ids.clone()))
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Result<(Vec<usize>, Vec<f32>), TrainError> {
    let shape = t.dims().to_vec();
    let data = t
        .try_into_data_as::<f32>()
        .map_err(|e| TrainError::Backend(e.to_string()))?
        .try_into_vec::<f32>()
        .map_err(|e| TrainError::Backend(format!("{e:?}")))?;
    Ok((shape, data))
}

/// The network's weights as a submodel (same ids as it was built from).
fn read(net: &CtrNet, ids: &[u64]) -> Result<SparseTensors, TrainError> {
    let mut out = SparseTensors::default();
    let (_, values) = to_vec(net.emb.val())?;
    out.tables.insert(
        TABLE.to_string(),
        SparseRows {
            ids: ids.to_vec(),
            width: values.len() / ids.len().max(1),
            values,
        },
    );
    for (prefix, layer) in [("fc1", &net.fc1), ("fc2", &net.fc2)] {
        let (shape, data) = to_vec(layer.weight.val())?;
        out.dense
            .0
            .insert(format!("{prefix}.weight"), fedhive_shared::Tensor { shape, data });
        let bias = layer.bias.as_ref().expect("built with a bias");
        let (shape, data) = to_vec(bias.val())?;
        out.dense
            .0
            .insert(format!("{prefix}.bias"), fedhive_shared::Tensor { shape, data });
    }
    Ok(out)
}

/// Local row index of every feature of `data` (all must be rows of the submodel).
fn local_indices(data: &CtrData, ids: &[u64]) -> Result<Vec<i64>, TrainError> {
    let index: HashMap<u64, i64> = ids.iter().enumerate().map(|(k, &id)| (id, k as i64)).collect();
    data.features
        .iter()
        .map(|id| {
            index.get(id).copied().ok_or_else(|| {
                TrainError::InvalidParams(format!("feature {id} is not a row of the submodel"))
            })
        })
        .collect()
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

fn batch_tensors(
    local: &[i64],
    data: &CtrData,
    idx: &[usize],
    device: &Device,
) -> (Tensor<1, Int>, Tensor<1>) {
    let f = data.fields;
    let mut ids = Vec::with_capacity(idx.len() * f);
    let mut labels = Vec::with_capacity(idx.len());
    for &i in idx {
        ids.extend_from_slice(&local[i * f..(i + 1) * f]);
        labels.push(data.labels[i]);
    }
    (
        Tensor::from_data(TensorData::new(ids, [idx.len() * f]), device),
        Tensor::from_data(TensorData::new(labels, [idx.len()]), device),
    )
}

/// Trains the submodel `sub` (dense tensors + the table rows of the device's features) with plain
/// minibatch SGD on the logistic loss, as [`crate::training::train_local`] does for images, and
/// returns the change of every tensor and row.
pub fn train_local_sparse(
    device: &Device,
    sub: &SparseTensors,
    data: &CtrData,
    params: &TrainingParams,
    seed: u64,
) -> Result<SparseLocalUpdate, TrainError> {
    check(data)?;
    if params.batch_size == 0
        || params.local_epochs == 0
        || !(params.learning_rate.is_finite() && params.learning_rate > 0.0)
    {
        return Err(TrainError::InvalidParams(
            "batch_size, local_epochs and learning_rate must be positive".into(),
        ));
    }
    let device = device.clone().autodiff();
    let (mut net, ids) = build(sub, &device)?;
    let local = local_indices(data, &ids)?;
    let mut optim = SgdConfig::new().init();
    let lr = f64::from(params.learning_rate);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let (mut steps, max_steps) = (0usize, params.max_local_steps as usize);
    let mut last_loss = f32::NAN;
    'epochs: for _ in 0..params.local_epochs {
        order.shuffle(&mut rng);
        let (mut sum, mut seen) = (0f64, 0usize);
        for idx in order.chunks(params.batch_size as usize) {
            let (x, y) = batch_tensors(&local, data, idx, &device);
            let loss = logistic(net.forward(x, idx.len()), y).mean();
            let value: f32 = loss
                .clone()
                .try_into_scalar()
                .map_err(|e| TrainError::Backend(e.to_string()))?;
            sum += f64::from(value) * idx.len() as f64;
            seen += idx.len();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(lr, net, grads);
            steps += 1;
            if max_steps > 0 && steps >= max_steps {
                last_loss = (sum / seen as f64) as f32;
                break 'epochs;
            }
        }
        last_loss = (sum / seen as f64) as f32;
    }
    let after = read(&net, &ids)?;
    let delta = SparseTensors {
        dense: after.dense.sub(&sub.dense),
        tables: after
            .tables
            .iter()
            .map(|(name, rows)| {
                let before = &sub.tables[name];
                let values = rows
                    .values
                    .iter()
                    .zip(&before.values)
                    .map(|(a, b)| a - b)
                    .collect();
                let rows = SparseRows {
                    ids: rows.ids.clone(),
                    values,
                    width: rows.width,
                };
                (name.clone(), rows)
            })
            .collect(),
    };
    let finite = delta
        .dense
        .0
        .values()
        .all(|t| t.data.iter().all(|v| v.is_finite()))
        && delta
            .tables
            .values()
            .all(|r| r.values.iter().all(|v| v.is_finite()));
    if !finite {
        return Err(TrainError::Diverged(TABLE.into()));
    }
    Ok(SparseLocalUpdate {
        delta,
        num_samples: data.len() as u64,
        loss: last_loss,
    })
}

/// Per-sample logistic loss of the submodel `sub` on `data` (no autodiff, batches of 4096).
pub fn sample_losses(device: &Device, sub: &SparseTensors, data: &CtrData) -> Result<Vec<f32>, TrainError> {
    check(data)?;
    let device = device.clone().without_autodiff();
    let (net, ids) = build(sub, &device)?;
    let local = local_indices(data, &ids)?;
    let all: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for idx in all.chunks(4096) {
        let (x, y) = batch_tensors(&local, data, idx, &device);
        let (_, losses) = to_vec(logistic(net.forward(x, idx.len()), y))?;
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
