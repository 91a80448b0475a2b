//! A device's local step of FedAvg, and model evaluation.
//!
//! FedAvg (McMahan et al., 2017) has each device run plain minibatch SGD from the global model
//! for a few epochs and send back the change `x_after - x_before`; the server averages changes
//! weighted by sample counts. Plain SGD (no momentum, no weight decay) keeps the device step the
//! one the algorithm analyses and leaves no optimizer state to carry between rounds.

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhive_shared::NamedTensors;
use fedhive_shared::wire::TrainingParams;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::data::{Dataset, IMAGE_PIXELS};
use crate::federated::{FederatedModel, LocalData};
use crate::model::{self, Classifier, ModelError, ModelKind, with_model};

/// Samples per forward pass in [`evaluate`] (bounded memory, few dispatches).
pub const EVAL_BATCH: usize = 1000;

/// What a device sends back after its local training.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalUpdate {
    /// `x_after - x_before`, tensor by tensor.
    pub delta: NamedTensors,
    /// Local samples the update was trained on (FedAvg's weight `n_i`).
    pub num_samples: u64,
    /// Mean training loss over the last epoch (over the steps run, if `max_local_steps` cut it).
    pub loss: f32,
}

/// Accuracy and mean cross-entropy of a model on a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub accuracy: f32,
    pub loss: f32,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    #[error("the dataset is empty")]
    EmptyDataset,
    #[error("invalid training parameters: {0}")]
    InvalidParams(String),
    #[error("dataset holds {images} pixel values for {labels} labels (expected {IMAGE_PIXELS} per label)")]
    MalformedDataset { images: usize, labels: usize },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("backend error: {0}")]
    Backend(String),
    #[error("training diverged: the update of `{0}` is not finite (lower the learning rate)")]
    Diverged(String),
    #[error("training was cancelled")]
    Cancelled,
}

/// Runs FedAvg's local step: `local_epochs` epochs of plain SGD with cross-entropy over
/// minibatches of `batch_size`, reshuffled each epoch with `seed`, stopping after
/// `max_local_steps` steps when that is non-zero. The last minibatch of an epoch may be smaller.
///
/// `device` is a plain device (see [`crate::backend::Backend::device`]); autodiff is enabled here.
pub fn train_local(
    kind: ModelKind,
    device: &Device,
    global: &NamedTensors,
    data: &Dataset,
    params: &TrainingParams,
    seed: u64,
) -> Result<LocalUpdate, TrainError> {
    check_dataset(data)?;
    with_model!(kind, M => train_model(M::init, device, global, data, params, seed, &mut |_| true))
}

/// FedAvg's local step (as [`train_local`]) for any [`FederatedModel`]: `init` builds the module on
/// the training device (lazily initialised: the round's weights replace every parameter, after
/// their names and shapes are checked against the module), `data` gives its batches, and
/// `on_step` hears of every step and stops training by returning `false`
/// ([`TrainError::Cancelled`]).
pub fn train_model<M, D>(
    init: impl FnOnce(&Device) -> M,
    device: &Device,
    global: &NamedTensors,
    data: &D,
    params: &TrainingParams,
    seed: u64,
    on_step: &mut dyn FnMut(StepProgress) -> bool,
) -> Result<LocalUpdate, TrainError>
where
    M: FederatedModel,
    D: LocalData<Batch = M::Batch>,
{
    let (after, loss) = fit_model(init, device, global, None, data, params, seed, on_step)?;
    local_update(after, global, data.num_samples(), loss)
}

/// [`train_model`]'s training: the module loaded with `weights`, trained by plain SGD (only the
/// parameters under the top-level field `only` when given, every other one frozen); returns all
/// its weights and the last epoch's mean loss.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit_model<M, D>(
    init: impl FnOnce(&Device) -> M,
    device: &Device,
    weights: &NamedTensors,
    only: Option<&str>,
    data: &D,
    params: &TrainingParams,
    seed: u64,
    on_step: &mut dyn FnMut(StepProgress) -> bool,
) -> Result<(NamedTensors, f32), TrainError>
where
    M: FederatedModel,
    D: LocalData<Batch = M::Batch>,
{
    check_params(params)?;
    if data.num_samples() == 0 {
        return Err(TrainError::EmptyDataset);
    }
    let device = device.clone().autodiff();
    let mut model = model::load_into(init(&device), weights, &weights.specs())?;
    if let Some(module) = only {
        model = model.map(&mut FreezeAllBut::new(module));
    }
    let (model, loss) = fit(
        model,
        SgdConfig::new().init(),
        &device,
        data,
        params,
        seed,
        |m, batch| m.loss(batch),
        on_step,
    )?;
    Ok((model::read(&model)?, loss))
}

/// Stops gradients to every parameter outside one top-level field of a module.
pub(crate) struct FreezeAllBut<'a> {
    module: &'a str,
    path: Vec<String>,
}

impl<'a> FreezeAllBut<'a> {
    pub(crate) fn new(module: &'a str) -> Self {
        FreezeAllBut {
            module,
            path: Vec::new(),
        }
    }
}

impl ModuleMapper for FreezeAllBut<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.path.first().is_some_and(|top| top == self.module) {
            param
        } else {
            param.set_require_grad(false)
        }
    }
}

/// The mean of [`FederatedModel::loss`] over `data` for the model `init` builds, loaded with
/// `weights`: [`EVAL_BATCH`] samples at a time, without autodiff, each batch weighted by its size.
pub fn mean_loss<M, D>(
    init: impl FnOnce(&Device) -> M,
    device: &Device,
    weights: &NamedTensors,
    data: &D,
) -> Result<f32, TrainError>
where
    M: FederatedModel,
    D: LocalData<Batch = M::Batch>,
{
    let n = data.num_samples();
    if n == 0 {
        return Err(TrainError::EmptyDataset);
    }
    let model = model::load_into(init(device), weights, &weights.specs())?;
    let all: Vec<usize> = (0..n).collect();
    let mut total = 0.0f64;
    for chunk in all.chunks(EVAL_BATCH) {
        let loss: f32 = model
            .loss(data.batch(chunk, device))
            .try_into_scalar()
            .map_err(backend_err)?;
        total += f64::from(loss) * chunk.len() as f64;
    }
    Ok((total / n as f64) as f32)
}

/// How far a local step is, after each optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    pub step: usize,
    /// Steps the local step runs in all (`local_epochs` epochs, cut at `max_local_steps`).
    pub total_steps: usize,
}

/// The update of weights trained from `global` on `data`, refused if training diverged.
pub(crate) fn local_update(
    after: NamedTensors,
    global: &NamedTensors,
    num_samples: usize,
    loss: f32,
) -> Result<LocalUpdate, TrainError> {
    let delta = after.sub(global);
    if let Some((name, _)) = delta
        .0
        .iter()
        .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
    {
        return Err(TrainError::Diverged(name.clone()));
    }
    Ok(LocalUpdate {
        delta,
        num_samples: num_samples as u64,
        loss,
    })
}

/// Refuses training parameters no local step can run with.
pub(crate) fn check_params(params: &TrainingParams) -> Result<(), TrainError> {
    if params.batch_size == 0 {
        return Err(TrainError::InvalidParams("batch_size must be positive".into()));
    }
    if params.local_epochs == 0 {
        return Err(TrainError::InvalidParams("local_epochs must be positive".into()));
    }
    if !(params.learning_rate.is_finite() && params.learning_rate > 0.0) {
        return Err(TrainError::InvalidParams(format!(
            "learning_rate must be positive and finite, got {}",
            params.learning_rate
        )));
    }
    Ok(())
}

/// Accuracy and mean cross-entropy of `weights` on `data`, in batches of [`EVAL_BATCH`] without
/// autodiff.
pub fn evaluate(
    kind: ModelKind,
    device: &Device,
    weights: &NamedTensors,
    data: &Dataset,
) -> Result<Evaluation, TrainError> {
    check_dataset(data)?;
    with_model!(kind, M => eval_with::<M>(kind, device, weights, data))
}

pub(crate) fn check_dataset(data: &Dataset) -> Result<(), TrainError> {
    if data.is_empty() {
        return Err(TrainError::EmptyDataset);
    }
    if data.images.len() != data.len() * IMAGE_PIXELS {
        return Err(TrainError::MalformedDataset {
            images: data.images.len(),
            labels: data.len(),
        });
    }
    Ok(())
}

/// Accuracy and mean cross-entropy over samples `0..n`, [`EVAL_BATCH`] at a time: `batch(idx)`
/// gives the logits and labels of the samples `idx` (on `device`, without autodiff).
pub(crate) fn evaluate_in_batches(
    n: usize,
    device: &Device,
    mut batch: impl FnMut(&[usize]) -> Result<(Tensor<2>, Tensor<1, Int>), TrainError>,
) -> Result<Evaluation, TrainError> {
    if n == 0 {
        return Err(TrainError::EmptyDataset);
    }
    let criterion = CrossEntropyLossConfig::new().init(device);
    let all: Vec<usize> = (0..n).collect();
    let (mut loss_sum, mut correct) = (0f64, 0i64);
    for idx in all.chunks(EVAL_BATCH) {
        let (logits, y) = batch(idx)?;
        let hits: i64 = logits
            .clone()
            .argmax(1)
            .squeeze_dim::<1>(1)
            .equal(y.clone())
            .int()
            .sum()
            .try_into_scalar()
            .map_err(backend_err)?;
        let loss: f32 = criterion
            .forward(logits, y)
            .try_into_scalar()
            .map_err(backend_err)?;
        loss_sum += f64::from(loss) * idx.len() as f64;
        correct += hits;
    }
    Ok(Evaluation {
        accuracy: (correct as f64 / n as f64) as f32,
        loss: (loss_sum / n as f64) as f32,
    })
}

pub(crate) fn backend_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Backend(e.to_string())
}

/// The minibatch `idx` as `([b, 784] images, [b] labels)` on `device`: one host copy per batch.
pub(crate) fn batch(data: &Dataset, idx: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let mut images = Vec::with_capacity(idx.len() * IMAGE_PIXELS);
    let mut labels = Vec::with_capacity(idx.len());
    for &i in idx {
        images.extend_from_slice(data.image(i));
        labels.push(i64::from(data.labels[i]));
    }
    (
        Tensor::from_data(TensorData::new(images, [idx.len(), IMAGE_PIXELS]), device),
        Tensor::from_data(TensorData::new(labels, [idx.len()]), device),
    )
}

/// The training loop every local step shares: `local_epochs` epochs over minibatches of
/// `batch_size` reshuffled each epoch with `seed`, at most `max_local_steps` steps when non-zero,
/// minimising `loss(model, batch)` with `optim` at `learning_rate`. `on_step` hears of each step
/// and stops the loop by returning `false`. Returns the trained module and the last epoch's mean
/// loss. `device` must have autodiff.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit<M: Module, D: LocalData>(
    mut model: M,
    mut optim: ModuleOptimizer,
    device: &Device,
    data: &D,
    params: &TrainingParams,
    seed: u64,
    loss: impl Fn(&M, D::Batch) -> Tensor<1>,
    on_step: &mut dyn FnMut(StepProgress) -> bool,
) -> Result<(M, f32), TrainError> {
    let lr = f64::from(params.learning_rate);
    let batch_size = params.batch_size as usize;
    let max_steps = params.max_local_steps as usize;
    let n = data.num_samples();
    let per_epoch = n.div_ceil(batch_size);
    let mut total_steps = per_epoch * params.local_epochs as usize;
    if max_steps > 0 {
        total_steps = total_steps.min(max_steps);
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut steps = 0usize;
    let mut last_epoch_loss = f32::NAN;
    'epochs: for _ in 0..params.local_epochs {
        order.shuffle(&mut rng);
        // Loss summed on the device (weighted by batch size) and read once per epoch, so the
        // loop never waits on the device between steps.
        let mut loss_sum: Option<Tensor<1>> = None;
        let mut seen = 0usize;
        for idx in order.chunks(batch_size) {
            let loss = loss(&model, data.batch(idx, device));
            // In units of full batches; only a short last batch pays for the rescaling op.
            let mut weighted = loss.clone().detach().inner();
            if idx.len() != batch_size {
                weighted = weighted.mul_scalar(idx.len() as f32 / batch_size as f32);
            }
            loss_sum = Some(match loss_sum {
                Some(s) => s + weighted,
                None => weighted,
            });
            seen += idx.len();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            steps += 1;
            if !on_step(StepProgress {
                step: steps,
                total_steps,
            }) {
                return Err(TrainError::Cancelled);
            }
            if max_steps > 0 && steps >= max_steps {
                last_epoch_loss = epoch_mean(loss_sum, seen, batch_size)?;
                break 'epochs;
            }
        }
        last_epoch_loss = epoch_mean(loss_sum, seen, batch_size)?;
    }
    Ok((model, last_epoch_loss))
}

/// Mean per-sample loss from a sum of batch-mean losses weighted in units of `batch_size`.
pub(crate) fn epoch_mean(
    loss_sum: Option<Tensor<1>>,
    seen: usize,
    batch_size: usize,
) -> Result<f32, TrainError> {
    match loss_sum {
        Some(sum) => {
            let sum: f32 = sum.try_into_scalar().map_err(backend_err)?;
            Ok(sum * batch_size as f32 / seen as f32)
        }
        None => Ok(f32::NAN),
    }
}

fn eval_with<M: Classifier>(
    kind: ModelKind,
    device: &Device,
    weights: &NamedTensors,
    data: &Dataset,
) -> Result<Evaluation, TrainError> {
    let device = device.clone().without_autodiff();
    let model: M = model::load(weights, &model::tensor_specs(kind), &device)?;
    let criterion = CrossEntropyLossConfig::new().init(&device);
    let all: Vec<usize> = (0..data.len()).collect();
    let mut loss_sum: Option<Tensor<1>> = None;
    let mut correct_sum: Option<Tensor<1, Int>> = None;
    for idx in all.chunks(EVAL_BATCH) {
        let (x, y) = batch(data, idx, &device);
        let logits = model.forward(x);
        let correct = logits
            .clone()
            .argmax(1)
            .squeeze_dim::<1>(1)
            .equal(y.clone())
            .int()
            .sum();
        let loss = criterion.forward(logits, y).mul_scalar(idx.len() as f32);
        loss_sum = Some(match loss_sum {
            Some(s) => s + loss,
            None => loss,
        });
        correct_sum = Some(match correct_sum {
            Some(s) => s + correct,
            None => correct,
        });
    }
    let n = data.len() as f64;
    let loss: f32 = loss_sum
        .expect("data is not empty")
        .try_into_scalar()
        .map_err(backend_err)?;
    let correct: i64 = correct_sum
        .expect("data is not empty")
        .try_into_scalar()
        .map_err(backend_err)?;
    Ok(Evaluation {
        accuracy: (correct as f64 / n) as f32,
        loss: (f64::from(loss) / n) as f32,
    })
}
