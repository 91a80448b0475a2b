//! Anonymous user embeddings: personalisation without user identifiers (Ding et al., "Personalized
//! Language Model Learning on Text Data Without User Identifiers", arXiv 2501.06062; `ALGORITHMS.md`,
//! "Anonymous user embeddings").
//!
//! The model reads an input and an embedding side by side: `[x, e] -> 128 ReLU -> classes`
//! ([`tensor_specs`]). A device keeps a private distribution `q_u = N(mu_u, sigma^2 I)`
//! ([`UserEmbedding`], in a file it chooses, never sent) and fits `mu_u` to its own data with the
//! model frozen, by the reparameterisation trick `e = mu_u + sigma * eps` ([`fit_embedding`]).
//! Every sample it submits and every prediction it asks for carries a fresh draw of `e` and
//! nothing else about the device ([`draw_samples`], [`predict`]): one draw per sample, not per
//! submission, because samples that shared an `e` could be matched again after the server
//! shuffles them. The cloud worker trains the whole model on those samples ([`train_model`]).
//!
//! Each coordinate of `mu_u` stays within `±`[`MU_BOUND`]: `sigma` only means something against the
//! spread of the users' means, and an unbounded mean would outgrow any `sigma`, and with it the
//! noise that keeps the device's samples unlinkable.

use std::path::Path;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhive_shared::anon::{SampleShape, Samples};
use fedhive_shared::{NamedTensors, Tensor as HostTensor, TensorSpec};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal, Uniform};
use serde::{Deserialize, Serialize};

use crate::model::{self, ModelError};
use crate::state;
pub use crate::state::StateError;
use crate::training::{Evaluation, TrainError, backend_err, evaluate_in_batches};

/// The model family's name in a task config.
pub const MODEL_NAME: &str = "anon_mlp";
pub const HIDDEN: usize = 128;
/// Bound on each coordinate of `mu_u` (see the module doc).
pub const MU_BOUND: f32 = 1.0;

/// Every tensor of the model for `shape`, in name order.
pub fn tensor_specs(shape: SampleShape) -> Vec<TensorSpec> {
    layout(shape)
        .into_iter()
        .map(|(name, shape, _)| TensorSpec {
            name: name.to_string(),
            shape,
        })
        .collect()
}

/// `(name, shape, fan_in)` in name order.
fn layout(shape: SampleShape) -> Vec<(&'static str, Vec<usize>, usize)> {
    let width = shape.features + shape.embedding_dim;
    vec![
        ("fc1.bias", vec![HIDDEN], width),
        ("fc1.weight", vec![width, HIDDEN], width),
        ("fc2.bias", vec![shape.num_classes], HIDDEN),
        ("fc2.weight", vec![HIDDEN, shape.num_classes], HIDDEN),
    ]
}

/// Initial weights, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` like every built-in model, deterministic
/// for `seed`.
pub fn initial_weights(shape: SampleShape, seed: u64) -> NamedTensors {
    let mut rng = StdRng::seed_from_u64(seed);
    let tensors = layout(shape)
        .into_iter()
        .map(|(name, shape, fan_in)| {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let dist = Uniform::new_inclusive(-bound, bound).expect("bound is positive and finite");
            let data = (0..shape.iter().product::<usize>())
                .map(|_| dist.sample(&mut rng))
                .collect();
            (name.to_string(), HostTensor { shape, data })
        })
        .collect();
    NamedTensors(tensors)
}

/// A model that reads an input and a user's embedding side by side: what a device's side of an
/// anonymous-embedding task needs of the task's model. The built-in `anon_mlp` is one; an app's
/// own burn module that implements it fits its embedding ([`fit_embedding_with`]) and predicts
/// ([`predict_samples_with`]) the same way. Its weights are the task's model, trained by the
/// cloud on the samples every device submits.
pub trait EmbeddingModel: Module + Sized {
    /// Logits `[batch, classes]` of `inputs` `[batch, features]` with `embeddings`
    /// `[batch, embedding_dim]`, one embedding per row.
    fn forward_with(&self, inputs: Tensor<2>, embeddings: Tensor<2>) -> Tensor<2>;
}

/// The built-in model: `[x, e] -> 128 ReLU -> classes`.
#[derive(Module, Debug)]
pub struct AnonMlp {
    fc1: Linear,
    fc2: Linear,
}

impl AnonMlp {
    /// The module for `shape` (burn's lazy initialisation: loading replaces every parameter).
    pub fn new(shape: SampleShape, device: &Device) -> Self {
        let width = shape.features + shape.embedding_dim;
        AnonMlp {
            fc1: LinearConfig::new(width, HIDDEN).init(device),
            fc2: LinearConfig::new(HIDDEN, shape.num_classes).init(device),
        }
    }

    fn load(weights: &NamedTensors, shape: SampleShape, device: &Device) -> Result<Self, ModelError> {
        model::load_into(AnonMlp::new(shape, device), weights, &tensor_specs(shape))
    }
}

impl EmbeddingModel for AnonMlp {
    fn forward_with(&self, inputs: Tensor<2>, embeddings: Tensor<2>) -> Tensor<2> {
        self.fc2
            .forward(relu(self.fc1.forward(Tensor::cat(vec![inputs, embeddings], 1))))
    }
}

/// A device's own labelled examples, row-major inputs of the task's width.
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    pub features: usize,
    pub inputs: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn input(&self, i: usize) -> &[f32] {
        &self.inputs[i * self.features..(i + 1) * self.features]
    }
}

/// A device's `q_u = N(mu, sigma^2 I)`: private state, never sent anywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserEmbedding {
    pub mu: Vec<f32>,
    pub sigma: f32,
}

impl UserEmbedding {
    /// A new distribution with its mean drawn uniformly within `±MU_BOUND`, so that devices are
    /// told apart from the first fine-tune on (with every mean at zero they would all look alike
    /// until a frozen model's gradient pulled them apart).
    pub fn random(dim: usize, sigma: f32, rng: &mut impl Rng) -> Self {
        let dist = Uniform::new_inclusive(-MU_BOUND, MU_BOUND).expect("bound is positive");
        UserEmbedding {
            mu: (0..dim).map(|_| dist.sample(rng)).collect(),
            sigma,
        }
    }

    /// A fresh `e ~ q_u`.
    pub fn sample(&self, rng: &mut impl Rng) -> Vec<f32> {
        self.mu
            .iter()
            .map(|&m| {
                let eps: f32 = StandardNormal.sample(rng);
                m + self.sigma * eps
            })
            .collect()
    }

    /// The stored distribution at `path`, `None` when there is none yet. Keep it in the task's
    /// private state ([`crate::state::DeviceState::private_dir`]).
    pub fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let q: Option<UserEmbedding> = state::read_json(path)?;
        if let Some(q) = &q
            && (!(q.sigma.is_finite() && q.sigma >= 0.0) || q.mu.iter().any(|m| !m.is_finite()))
        {
            return Err(StateError::Corrupt {
                path: path.into(),
                reason: "a non-finite or negative value".into(),
            });
        }
        Ok(q)
    }

    /// Writes the distribution to `path` atomically, so a device killed mid-write keeps the
    /// previous one.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        state::write_json(path, self)
    }
}

/// Steps of a fit: epochs over minibatches of `batch_size` at `learning_rate` (Adam).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitParams {
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f32,
}

/// The device's mean loss on its own examples, with `e` drawn from `q_u`, before and after a fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitReport {
    pub loss_before: f32,
    pub loss_after: f32,
    pub steps: usize,
}

/// Fits `q.mu` to the device's examples with the built-in model frozen: minibatch Adam on
/// `CE(model(x, mu + sigma * eps), y)`, `eps ~ N(0, I)` drawn afresh per sample and step, each
/// coordinate of `mu` kept within `±MU_BOUND`. The model's weights are only read.
pub fn fit_embedding(
    weights: &NamedTensors,
    shape: SampleShape,
    q: &mut UserEmbedding,
    data: &Examples,
    params: FitParams,
    device: &Device,
    seed: u64,
) -> Result<FitReport, TrainError> {
    fit_embedding_with(
        |d| AnonMlp::new(shape, d),
        weights,
        shape,
        q,
        data,
        params,
        device,
        seed,
    )
}

/// [`fit_embedding`] with an app's model: `init` builds the module (lazily initialised), loaded
/// with `weights` (names and shapes checked against the module) and frozen.
#[allow(clippy::too_many_arguments)]
pub fn fit_embedding_with<M: EmbeddingModel>(
    init: impl Fn(&Device) -> M,
    weights: &NamedTensors,
    shape: SampleShape,
    q: &mut UserEmbedding,
    data: &Examples,
    params: FitParams,
    device: &Device,
    seed: u64,
) -> Result<FitReport, TrainError> {
    check_examples(shape, data)?;
    if q.mu.len() != shape.embedding_dim {
        return Err(TrainError::InvalidParams(format!(
            "the embedding has {} values, the task's width is {}",
            q.mu.len(),
            shape.embedding_dim
        )));
    }
    let loss_before = expected_loss(&init, weights, shape, q, data, device, seed)?;
    let autodiff = device.clone().autodiff();
    let model = model::load_into(init(&autodiff), weights, &weights.specs())?.no_grad();
    let criterion = CrossEntropyLossConfig::new().init(&autodiff);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let dim = shape.embedding_dim;
    let (mut m, mut v) = (vec![0f32; dim], vec![0f32; dim]);
    let (beta1, beta2, eps_adam) = (0.9f32, 0.999f32, 1e-8f32);
    let mut steps = 0usize;
    for _ in 0..params.epochs {
        order.shuffle(&mut rng);
        for idx in order.chunks(params.batch_size.max(1)) {
            let (x, y) = examples_batch(data, idx, &autodiff);
            let mu =
                Tensor::<2>::from_data(TensorData::new(q.mu.clone(), [1, dim]), &autodiff).require_grad();
            let noise: Vec<f32> = (0..idx.len() * dim)
                .map(|_| q.sigma * rng.sample::<f32, _>(StandardNormal))
                .collect();
            let noise = Tensor::<2>::from_data(TensorData::new(noise, [idx.len(), dim]), &autodiff);
            let e = mu.clone().repeat_dim(0, idx.len()) + noise;
            let loss = criterion.forward(model.forward_with(x, e), y);
            let grads = loss.backward();
            let grad: Vec<f32> = mu
                .grad(&grads)
                .expect("mu requires its gradient")
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| backend_err(format!("{e:?}")))?;
            steps += 1;
            let (c1, c2) = (1.0 - beta1.powi(steps as i32), 1.0 - beta2.powi(steps as i32));
            for k in 0..dim {
                m[k] = beta1 * m[k] + (1.0 - beta1) * grad[k];
                v[k] = beta2 * v[k] + (1.0 - beta2) * grad[k] * grad[k];
                let step = params.learning_rate * (m[k] / c1) / ((v[k] / c2).sqrt() + eps_adam);
                q.mu[k] = (q.mu[k] - step).clamp(-MU_BOUND, MU_BOUND);
            }
        }
    }
    if q.mu.iter().any(|m| !m.is_finite()) {
        return Err(TrainError::Diverged("mu".into()));
    }
    let loss_after = expected_loss(&init, weights, shape, q, data, device, seed)?;
    Ok(FitReport {
        loss_before,
        loss_after,
        steps,
    })
}

/// The device's examples as samples to submit, each with its own fresh `e ~ q_u` (`q` = `None`:
/// a device without a distribution yet sends `e = 0`).
pub fn draw_samples(
    shape: SampleShape,
    q: Option<&UserEmbedding>,
    data: &Examples,
    rng: &mut impl Rng,
) -> Samples {
    let mut out = Samples::empty(shape);
    let zero = vec![0.0; shape.embedding_dim];
    for i in 0..data.len() {
        let e = q.map_or_else(|| zero.clone(), |q| q.sample(rng));
        out.push(data.input(i), &e, data.labels[i]);
    }
    out
}

/// The cloud's step: trains the whole model on `samples` (Adam, cross-entropy), returning the
/// new weights and the last epoch's mean loss.
pub fn train_model(
    weights: &NamedTensors,
    shape: SampleShape,
    samples: &Samples,
    params: FitParams,
    device: &Device,
    seed: u64,
) -> Result<(NamedTensors, f32), TrainError> {
    if samples.is_empty() {
        return Err(TrainError::EmptyDataset);
    }
    let autodiff = device.clone().autodiff();
    let mut model = AnonMlp::load(weights, shape, &autodiff)?;
    let criterion = CrossEntropyLossConfig::new().init(&autodiff);
    let mut optim = AdamConfig::new().init();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let mut last_loss = f32::NAN;
    for _ in 0..params.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum: Option<Tensor<1>> = None;
        for idx in order.chunks(params.batch_size.max(1)) {
            let (x, e, y) = samples_batch(samples, idx, &autodiff);
            let loss = criterion.forward(model.forward_with(x, e), y);
            let weighted = loss.clone().detach().inner().mul_scalar(idx.len() as f32);
            loss_sum = Some(match loss_sum {
                Some(s) => s + weighted,
                None => weighted,
            });
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(f64::from(params.learning_rate), model, grads);
        }
        let sum: f32 = loss_sum
            .expect("samples are not empty")
            .try_into_scalar()
            .map_err(backend_err)?;
        last_loss = sum / samples.len() as f32;
    }
    let trained = model::read(&model)?;
    if let Some((name, _)) = trained
        .0
        .iter()
        .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
    {
        return Err(TrainError::Diverged(name.clone()));
    }
    Ok((trained, last_loss))
}

/// Accuracy and mean cross-entropy of the model on `samples`, each with its own embedding.
pub fn evaluate(
    weights: &NamedTensors,
    shape: SampleShape,
    samples: &Samples,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    evaluate_with(|d| AnonMlp::new(shape, d), weights, samples, device)
}

/// [`evaluate`] with an app's model (`init` builds it; `weights` checked against it).
pub fn evaluate_with<M: EmbeddingModel>(
    init: impl FnOnce(&Device) -> M,
    weights: &NamedTensors,
    samples: &Samples,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let device = device.clone().without_autodiff();
    let model = model::load_into(init(&device), weights, &weights.specs())?;
    evaluate_in_batches(samples.len(), &device, |idx| {
        let (x, e, y) = samples_batch(samples, idx, &device);
        Ok((model.forward_with(x, e), y))
    })
}

/// On-device prediction for each input, each with a fresh `e ~ q_u` (`None`: `e = 0`): no network.
pub fn predict(
    weights: &NamedTensors,
    shape: SampleShape,
    q: Option<&UserEmbedding>,
    inputs: &[f32],
    device: &Device,
    rng: &mut impl Rng,
) -> Result<Vec<u32>, TrainError> {
    let n = inputs.len() / shape.features.max(1);
    let examples = Examples {
        features: shape.features,
        inputs: inputs.to_vec(),
        labels: vec![0; n],
    };
    check_examples(shape, &examples)?;
    let samples = draw_samples(shape, q, &examples, rng);
    predict_samples(weights, shape, &samples, device)
}

/// The predicted class of each sample from its own input and embedding (what a thin client's
/// request to the worker gets answered with).
pub fn predict_samples(
    weights: &NamedTensors,
    shape: SampleShape,
    samples: &Samples,
    device: &Device,
) -> Result<Vec<u32>, TrainError> {
    predict_samples_with(|d| AnonMlp::new(shape, d), weights, samples, device)
}

/// [`predict_samples`] with an app's model (`init` builds it; `weights` checked against it).
pub fn predict_samples_with<M: EmbeddingModel>(
    init: impl FnOnce(&Device) -> M,
    weights: &NamedTensors,
    samples: &Samples,
    device: &Device,
) -> Result<Vec<u32>, TrainError> {
    if samples.is_empty() {
        return Ok(Vec::new());
    }
    let device = device.clone().without_autodiff();
    let model = model::load_into(init(&device), weights, &weights.specs())?;
    let all: Vec<usize> = (0..samples.len()).collect();
    let mut out = Vec::with_capacity(samples.len());
    for idx in all.chunks(crate::training::EVAL_BATCH) {
        let (x, e, _) = samples_batch(samples, idx, &device);
        let classes: Vec<i64> = model
            .forward_with(x, e)
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| backend_err(format!("{e:?}")))?;
        out.extend(classes.into_iter().map(|c| c as u32));
    }
    Ok(out)
}

/// Mean loss over the device's examples with `e` drawn from `q` (the same draws for a given
/// `seed`, so a before/after comparison sees the same noise).
fn expected_loss<M: EmbeddingModel>(
    init: impl Fn(&Device) -> M,
    weights: &NamedTensors,
    shape: SampleShape,
    q: &UserEmbedding,
    data: &Examples,
    device: &Device,
    seed: u64,
) -> Result<f32, TrainError> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(0x5eed));
    let samples = draw_samples(shape, Some(q), data, &mut rng);
    Ok(evaluate_with(init, weights, &samples, device)?.loss)
}

fn check_examples(shape: SampleShape, data: &Examples) -> Result<(), TrainError> {
    if data.is_empty() {
        return Err(TrainError::EmptyDataset);
    }
    if data.features != shape.features || data.inputs.len() != data.len() * shape.features {
        return Err(TrainError::InvalidParams(format!(
            "{} input values for {} examples of width {} (the task's width is {})",
            data.inputs.len(),
            data.len(),
            data.features,
            shape.features
        )));
    }
    if let Some(l) = data.labels.iter().find(|&&l| l as usize >= shape.num_classes) {
        return Err(TrainError::InvalidParams(format!(
            "label {l} is not a class of the task ({} classes)",
            shape.num_classes
        )));
    }
    Ok(())
}

fn examples_batch(data: &Examples, idx: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let mut inputs = Vec::with_capacity(idx.len() * data.features);
    let mut labels = Vec::with_capacity(idx.len());
    for &i in idx {
        inputs.extend_from_slice(data.input(i));
        labels.push(i64::from(data.labels[i]));
    }
    (
        Tensor::from_data(TensorData::new(inputs, [idx.len(), data.features]), device),
        Tensor::from_data(TensorData::new(labels, [idx.len()]), device),
    )
}

fn samples_batch(
    samples: &Samples,
    idx: &[usize],
    device: &Device,
) -> (Tensor<2>, Tensor<2>, Tensor<1, Int>) {
    let shape = samples.shape;
    let mut inputs = Vec::with_capacity(idx.len() * shape.features);
    let mut embeddings = Vec::with_capacity(idx.len() * shape.embedding_dim);
    let mut labels = Vec::with_capacity(idx.len());
    for &i in idx {
        inputs.extend_from_slice(samples.input(i));
        embeddings.extend_from_slice(samples.embedding(i));
        labels.push(i64::from(samples.labels[i]));
    }
    (
        Tensor::from_data(TensorData::new(inputs, [idx.len(), shape.features]), device),
        Tensor::from_data(
            TensorData::new(embeddings, [idx.len(), shape.embedding_dim]),
            device,
        ),
        Tensor::from_data(TensorData::new(labels, [idx.len()]), device),
    )
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    const SHAPE: SampleShape = SampleShape {
        features: 6,
        embedding_dim: 2,
        num_classes: 2,
    };

    /// Inputs that say nothing about the label; the label is the user's: only `e` can tell.
    fn user_examples(label: u32, n: usize, rng: &mut StdRng) -> Examples {
        Examples {
            features: SHAPE.features,
            inputs: (0..n * SHAPE.features).map(|_| rng.random::<f32>()).collect(),
            labels: vec![label; n],
        }
    }

    const FIT: FitParams = FitParams {
        epochs: 10,
        batch_size: 16,
        learning_rate: 0.05,
    };

    /// Fits `q` from `mu = (-0.5, 0)` to 64 examples of a user of class 1 with `fit`, and checks
    /// what every fit must do: the loss halves, `mu` moves toward the user's class within
    /// `MU_BOUND`, and the model's weights stay as they were. Returns `q` and the examples.
    fn fit_toward_class_1(
        weights: &NamedTensors,
        rng: &mut StdRng,
        fit: impl FnOnce(&mut UserEmbedding, &Examples) -> Result<FitReport, TrainError>,
    ) -> (UserEmbedding, Examples) {
        let before = weights.encode();
        let data = user_examples(1, 64, rng);
        let mut q = UserEmbedding {
            mu: vec![-0.5, 0.0],
            sigma: 0.1,
        };
        let report = fit(&mut q, &data).unwrap();
        assert!(
            report.loss_after < 0.5 * report.loss_before,
            "{report:?}, mu {:?}",
            q.mu
        );
        assert!(q.mu[0] > 0.5, "mu moved toward the user's class: {:?}", q.mu);
        assert!(q.mu.iter().all(|m| m.abs() <= MU_BOUND));
        assert_eq!(weights.encode(), before, "the model is frozen");
        (q, data)
    }

    #[test]
    fn fitting_mu_lowers_the_loss_and_leaves_the_model_untouched() {
        let device = Device::flex();
        let mut rng = StdRng::seed_from_u64(7);
        // A model that reads the label off the first coordinate of `e` (weights set by hand):
        // hidden unit 0 = relu(e0), unit 1 = relu(-e0); class 1 follows unit 0.
        let mut weights = NamedTensors::zeros(&tensor_specs(SHAPE));
        let w1 = weights.0.get_mut("fc1.weight").unwrap();
        w1.data[SHAPE.features * HIDDEN] = 1.0;
        w1.data[SHAPE.features * HIDDEN + 1] = -1.0;
        let w2 = weights.0.get_mut("fc2.weight").unwrap();
        w2.data[1] = 4.0; // unit 0 -> class 1
        w2.data[SHAPE.num_classes] = 4.0; // unit 1 -> class 0
        fit_toward_class_1(&weights, &mut rng, |q, data| {
            fit_embedding(&weights, SHAPE, q, data, FIT, &device, 1)
        });
    }

    /// An app's own model, nothing like the built-in one: the embedding adds a per-user bias
    /// to the logits (`input(x) + user(e)`), under the app's own tensor names.
    #[derive(Module, Debug)]
    struct UserBias {
        input: Linear,
        user: Linear,
    }

    impl EmbeddingModel for UserBias {
        fn forward_with(&self, inputs: Tensor<2>, embeddings: Tensor<2>) -> Tensor<2> {
            self.input.forward(inputs) + self.user.forward(embeddings)
        }
    }

    fn user_bias(device: &Device) -> UserBias {
        UserBias {
            input: LinearConfig::new(SHAPE.features, SHAPE.num_classes).init(device),
            user: LinearConfig::new(SHAPE.embedding_dim, SHAPE.num_classes).init(device),
        }
    }

    #[test]
    fn an_apps_own_model_fits_the_embedding_and_predicts_with_it() {
        let device = Device::flex();
        let mut rng = StdRng::seed_from_u64(9);
        // The inputs say nothing; `e0` pushes class 1 up and class 0 down.
        let mut weights = NamedTensors::zeros(&model::specs_of(&user_bias(&device)));
        let user = weights.0.get_mut("user.weight").unwrap();
        assert_eq!(user.shape, [SHAPE.embedding_dim, SHAPE.num_classes]);
        user.data[0] = -4.0; // e0 -> class 0
        user.data[1] = 4.0; // e0 -> class 1
        let (mut q, data) = fit_toward_class_1(&weights, &mut rng, |q, data| {
            fit_embedding_with(user_bias, &weights, SHAPE, q, data, FIT, &device, 1)
        });
        let samples = draw_samples(SHAPE, Some(&q), &data, &mut rng);
        let predicted = predict_samples_with(user_bias, &weights, &samples, &device).unwrap();
        assert_eq!(predicted, vec![1; data.len()]);
        // The built-in model's weights do not fit the app's module: refused, not misread.
        let built_in = initial_weights(SHAPE, 1);
        assert!(matches!(
            fit_embedding_with(user_bias, &built_in, SHAPE, &mut q, &data, FIT, &device, 1),
            Err(TrainError::Model(_))
        ));
    }

    #[test]
    fn every_sample_and_prediction_gets_a_fresh_embedding() {
        let mut rng = StdRng::seed_from_u64(3);
        let data = user_examples(0, 5, &mut rng);
        let q = UserEmbedding::random(SHAPE.embedding_dim, 0.3, &mut rng);
        let samples = draw_samples(SHAPE, Some(&q), &data, &mut rng);
        let embeddings: Vec<&[f32]> = (0..samples.len()).map(|i| samples.embedding(i)).collect();
        for (i, a) in embeddings.iter().enumerate() {
            assert_ne!(*a, q.mu.as_slice(), "a draw, not the mean");
            for b in &embeddings[i + 1..] {
                assert_ne!(a, b, "no two samples share an embedding");
            }
        }
        let zero = draw_samples(SHAPE, None, &data, &mut rng);
        assert!(zero.embeddings.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn the_cloud_learns_to_read_the_embedding() {
        let device = Device::flex();
        let mut rng = StdRng::seed_from_u64(5);
        // Two users with opposite labels on the same kind of input, at distinct means.
        let users = [
            (
                UserEmbedding {
                    mu: vec![0.8, -0.8],
                    sigma: 0.05,
                },
                0,
            ),
            (
                UserEmbedding {
                    mu: vec![-0.8, 0.8],
                    sigma: 0.05,
                },
                1,
            ),
        ];
        let mut samples = Samples::empty(SHAPE);
        for (q, label) in &users {
            samples.extend(&draw_samples(
                SHAPE,
                Some(q),
                &user_examples(*label, 200, &mut rng),
                &mut rng,
            ));
        }
        let weights = initial_weights(SHAPE, 1);
        let params = FitParams {
            epochs: 20,
            batch_size: 32,
            learning_rate: 0.01,
        };
        let (trained, _) = train_model(&weights, SHAPE, &samples, params, &device, 2).unwrap();
        assert!(evaluate(&trained, SHAPE, &samples, &device).unwrap().accuracy > 0.95);
        for (q, label) in &users {
            let inputs = user_examples(*label, 20, &mut rng).inputs;
            let predicted = predict(&trained, SHAPE, Some(q), &inputs, &device, &mut rng).unwrap();
            assert!(
                predicted.iter().filter(|&&p| p == *label).count() >= 18,
                "{predicted:?}"
            );
        }
    }

    #[test]
    fn stored_embeddings_survive_a_restart_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.json");
        assert!(UserEmbedding::load(&path).unwrap().is_none());
        let q = UserEmbedding {
            mu: vec![0.25, -1.0],
            sigma: 0.3,
        };
        q.save(&path).unwrap();
        assert_eq!(UserEmbedding::load(&path).unwrap(), Some(q));
        std::fs::write(&path, b"{\"mu\": [0.1").unwrap();
        let err = UserEmbedding::load(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("delete it"), "{err}");
    }
}
