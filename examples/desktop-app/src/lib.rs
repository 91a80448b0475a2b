//! An app's side of fedhive: a model the SDK has never seen, the app's own data, and the task
//! that trains them. `main.rs` is the program around it.
//!
//! The model is a two-hidden-layer perceptron over 28x28 grey images (Fashion-MNIST here, an app's
//! photos in real life); its parameter names (`"encoder.weight"`, ...) are whatever the module's
//! fields are called. The data are the app's arrays ([`AppImages`]); the SDK asks for batches of
//! chosen samples ([`LocalData::batch`]).

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhive_client::federated::{FederatedModel, LocalData};
use fedhive_client::model;
use fedhive_client::session::{RoundConditions, RoundOutcome, Session};
use fedhive_shared::NamedTensors;
use fedhive_shared::wire::{StrategyConfig, TaskConfig, TrainingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The task's name for this model family: devices check it against their own.
pub const MODEL_NAME: &str = "example_mlp2";
const PIXELS: usize = 28 * 28;
const CLASSES: usize = 10;

#[derive(Module, Debug)]
pub struct TwoLayerNet {
    encoder: Linear,
    hidden: Linear,
    classifier: Linear,
}

impl TwoLayerNet {
    pub fn new(device: &Device) -> Self {
        TwoLayerNet {
            encoder: LinearConfig::new(PIXELS, 64).init(device),
            hidden: LinearConfig::new(64, 32).init(device),
            classifier: LinearConfig::new(32, CLASSES).init(device),
        }
    }

    pub fn logits(&self, images: Tensor<2>) -> Tensor<2> {
        let x = relu(self.encoder.forward(images));
        self.classifier.forward(relu(self.hidden.forward(x)))
    }
}

impl FederatedModel for TwoLayerNet {
    type Batch = (Tensor<2>, Tensor<1, Int>);

    fn loss(&self, (images, labels): Self::Batch) -> Tensor<1> {
        let criterion = CrossEntropyLossConfig::new().init(&images.device());
        criterion.forward(self.logits(images), labels)
    }
}

/// The app's labelled images: pixels in `[0, 1]`, row-major, and one class each.
pub struct AppImages {
    pub pixels: Vec<f32>,
    pub labels: Vec<u8>,
}

impl LocalData for AppImages {
    type Batch = (Tensor<2>, Tensor<1, Int>);

    fn num_samples(&self) -> usize {
        self.labels.len()
    }

    fn batch(&self, indices: &[usize], device: &Device) -> Self::Batch {
        let mut pixels = Vec::with_capacity(indices.len() * PIXELS);
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * PIXELS..(i + 1) * PIXELS]);
        }
        let labels: Vec<i64> = indices.iter().map(|&i| i64::from(self.labels[i])).collect();
        (
            Tensor::from_data(TensorData::new(pixels, [indices.len(), PIXELS]), device),
            Tensor::from_data(TensorData::new(labels, [indices.len()]), device),
        )
    }
}

/// The model's starting weights, as the task is created with them: burn's layout, values drawn from
/// `seed` in burn's (and PyTorch's) default range for linear layers, `U(±1/sqrt(fan_in))`, so every
/// task created with the same seed starts alike.
pub fn initial_weights(device: &Device, seed: u64) -> Result<NamedTensors, model::ModelError> {
    let mut weights = model::read(&TwoLayerNet::new(device))?;
    // A layer's fan-in is its weight's first dimension (burn's linear weights are [in, out]).
    let fan_in: BTreeMap<String, usize> = weights
        .0
        .iter()
        .filter_map(|(name, t)| Some((name.strip_suffix(".weight")?.to_string(), t.shape[0])))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, tensor) in weights.0.iter_mut() {
        let layer = name.rsplit_once('.').map_or(name.as_str(), |(layer, _)| layer);
        let bound = 1.0 / (fan_in[layer] as f32).sqrt();
        tensor
            .data
            .iter_mut()
            .for_each(|v| *v = rng.random_range(-bound..=bound));
    }
    Ok(weights)
}

/// A FedAvg task for this model: `devices_per_round` updates per round, `rounds` rounds.
pub fn task_config(weights: &NamedTensors, devices_per_round: u32, rounds: u32) -> TaskConfig {
    TaskConfig {
        model: MODEL_NAME.into(),
        tensors: weights.specs(),
        strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
        training: TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 32,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        },
        devices_per_round,
        min_devices_per_round: devices_per_round,
        over_selection: 1.0,
        round_deadline_secs: 600,
        rounds,
        require_enrolled_device: false,
        update_encoding: Default::default(),
    }
}

/// Accuracy of `weights` on `data` (the app's own check of the model it received).
pub fn accuracy(weights: &NamedTensors, data: &AppImages, device: &Device) -> anyhow::Result<f32> {
    let net = model::load_into(TwoLayerNet::new(device), weights, &weights.specs())?;
    let all: Vec<usize> = (0..data.num_samples()).collect();
    let mut correct = 0i64;
    for chunk in all.chunks(1000) {
        let (x, y) = data.batch(chunk, device);
        let hits = net.logits(x).argmax(1).squeeze_dim::<1>(1).equal(y).int().sum();
        correct += hits
            .try_into_scalar::<i64>()
            .map_err(|e| anyhow::anyhow!("reading the accuracy back: {e:?}"))?;
    }
    Ok(correct as f32 / data.num_samples().max(1) as f32)
}

/// What a device did until the task finished (or it stopped).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub contributed: u32,
    pub late: u32,
    pub resumed: u32,
    pub finished: bool,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
}

/// The app's scheduler, reduced to its core: a round whenever the session may run one, a wait
/// when the server says so, until the task finishes or `max_rounds` contributions are made.
pub async fn run_rounds<M, D>(
    session: &mut Session<M, D>,
    conditions: &RoundConditions,
    max_rounds: Option<u32>,
) -> anyhow::Result<Summary>
where
    M: FederatedModel + 'static,
    D: LocalData<Batch = M::Batch> + Send + Sync + 'static,
{
    let mut summary = Summary::default();
    loop {
        match session.run_round(conditions).await? {
            RoundOutcome::Contributed(report) => {
                tracing::info!(
                    round = report.receipt.round_id,
                    loss = report.loss,
                    resumed = report.resumed,
                    "contributed"
                );
                summary.contributed += 1;
                summary.resumed += u32::from(report.resumed);
                summary.bytes_downloaded += report.bytes_downloaded;
                summary.bytes_uploaded += report.bytes_uploaded;
                if max_rounds.is_some_and(|max| summary.contributed >= max) {
                    return Ok(summary);
                }
            }
            RoundOutcome::Late { round_id } => {
                tracing::info!(round = round_id, "late: the round closed first");
                summary.late += 1;
            }
            RoundOutcome::NotNow { retry_after, reason } => {
                tracing::debug!(?retry_after, reason, "no round now");
                tokio::time::sleep(retry_after).await;
            }
            RoundOutcome::Finished { model_version } => {
                tracing::info!(model_version, "task finished");
                summary.finished = true;
                return Ok(summary);
            }
            RoundOutcome::Stopped { round_id, reason } => {
                tracing::info!(round = round_id, ?reason, "stopped; the next run resumes");
                return Ok(summary);
            }
        }
    }
}
