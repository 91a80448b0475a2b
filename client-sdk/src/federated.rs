//! Bring your own model: any burn module takes part in a fedhive task.
//!
//! An app implements [`FederatedModel`] for its module (the loss of one batch: its training step)
//! and [`LocalData`] for its data (a batch of chosen samples, built on the training device). The
//! SDK does the rest: it moves the round's weights into the module through burn's store (a
//! tensor's name is its parameter's path in the module, `"fc1.weight"`; names and shapes are
//! checked against the task's model before any training: [`crate::model::load_into`]), runs the
//! strategy's local step ([`crate::training::train_model`]), and reads the trained weights back
//! ([`crate::model::read`]). The built-in models ([`crate::model::ModelKind`]) take part through the
//! same two traits, as an app's model does.
//!
//! A task names the model family its devices build (`TaskConfig::model`) and lists its tensors; a
//! device whose module does not have exactly those tensors refuses the round with
//! [`crate::model::ModelError`] before it trains.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor};

use crate::data::Dataset;
use crate::model::{Classifier, Cnn, CnnLarge, Mlp, MlpSmall};
use crate::training;

/// A burn module that trains in a task.
pub trait FederatedModel: Module + Sized {
    /// A minibatch of the app's data on the training device, as [`LocalData::batch`] builds it.
    type Batch;

    /// The batch's mean loss, a one-element tensor; the local step minimises it with the task's
    /// optimiser settings.
    fn loss(&self, batch: Self::Batch) -> Tensor<1>;
}

/// The samples a device trains on. The SDK chooses the order (reshuffled each epoch from the
/// round's seed) and the batch size (the task's); the app turns chosen samples into tensors.
pub trait LocalData {
    type Batch;

    /// Samples this device holds: the epoch's length and FedAvg's weight `n_i`.
    fn num_samples(&self) -> usize;

    /// The samples `indices` (each below [`LocalData::num_samples`]) as one batch on `device`.
    fn batch(&self, indices: &[usize], device: &Device) -> Self::Batch;
}

/// Labelled images: `([batch, 784] pixels, [batch] classes)`.
pub type ImageBatch = (Tensor<2>, Tensor<1, Int>);

impl LocalData for Dataset {
    type Batch = ImageBatch;

    fn num_samples(&self) -> usize {
        self.len()
    }

    fn batch(&self, indices: &[usize], device: &Device) -> ImageBatch {
        training::batch(self, indices, device)
    }
}

/// The built-in classifiers: cross-entropy of their logits.
macro_rules! classifiers_are_federated {
    ($($model:ty),*) => {$(
        impl FederatedModel for $model {
            type Batch = ImageBatch;

            fn loss(&self, (images, labels): ImageBatch) -> Tensor<1> {
                let criterion = CrossEntropyLossConfig::new().init(&images.device());
                criterion.forward(self.forward(images), labels)
            }
        }
    )*};
}
classifiers_are_federated!(Mlp, MlpSmall, Cnn, CnnLarge);

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::nn::loss::{MseLoss, Reduction};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;
    use fedhive_shared::wire::TrainingParams;
    use fedhive_shared::{NamedTensors, TensorError};

    use super::*;
    use crate::model::{self, ModelError};
    use crate::training::{StepProgress, TrainError, train_model};

    /// An app's model that is nothing like the built-in classifiers: regression, its own names.
    #[derive(Module, Debug)]
    struct Regressor {
        hidden: Linear,
        out: Linear,
    }

    impl Regressor {
        fn new(device: &Device) -> Self {
            Regressor {
                hidden: LinearConfig::new(3, 8).init(device),
                out: LinearConfig::new(8, 1).init(device),
            }
        }
    }

    impl FederatedModel for Regressor {
        type Batch = (Tensor<2>, Tensor<2>);

        fn loss(&self, (x, y): Self::Batch) -> Tensor<1> {
            let y_hat = self
                .out
                .forward(burn::tensor::activation::relu(self.hidden.forward(x)));
            MseLoss::new().forward(y_hat, y, Reduction::Mean)
        }
    }

    /// `y = 2 x0 - x1 + 0.5 x2`, on a grid.
    struct Points(Vec<([f32; 3], f32)>);

    impl Points {
        fn new() -> Self {
            Points(
                (0..96)
                    .map(|i| {
                        let x = [
                            (i % 4) as f32 / 4.0,
                            (i / 4 % 4) as f32 / 4.0,
                            (i / 16) as f32 / 6.0,
                        ];
                        (x, 2.0 * x[0] - x[1] + 0.5 * x[2])
                    })
                    .collect(),
            )
        }
    }

    impl LocalData for Points {
        type Batch = (Tensor<2>, Tensor<2>);

        fn num_samples(&self) -> usize {
            self.0.len()
        }

        fn batch(&self, indices: &[usize], device: &Device) -> Self::Batch {
            let x: Vec<f32> = indices.iter().flat_map(|&i| self.0[i].0).collect();
            let y: Vec<f32> = indices.iter().map(|&i| self.0[i].1).collect();
            (
                Tensor::from_data(TensorData::new(x, [indices.len(), 3]), device),
                Tensor::from_data(TensorData::new(y, [indices.len(), 1]), device),
            )
        }
    }

    fn params(epochs: u32) -> TrainingParams {
        TrainingParams {
            local_epochs: epochs,
            max_local_steps: 0,
            batch_size: 16,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        }
    }

    fn train(global: &NamedTensors, epochs: u32) -> Result<crate::training::LocalUpdate, TrainError> {
        train_model(
            Regressor::new,
            &Device::flex(),
            global,
            &Points::new(),
            &params(epochs),
            7,
            &mut |_| true,
        )
    }

    #[test]
    fn an_apps_own_model_trains_and_its_update_names_its_parameters() {
        let global = model::read(&Regressor::new(&Device::flex())).unwrap();
        assert_eq!(
            global.0.keys().collect::<Vec<_>>(),
            ["hidden.bias", "hidden.weight", "out.bias", "out.weight"]
        );
        let first = train(&global, 1).unwrap();
        let longer = train(&global, 30).unwrap();
        assert_eq!(first.num_samples, 96);
        assert_eq!(first.delta.specs(), global.specs());
        assert!(
            longer.loss < first.loss / 4.0,
            "30 epochs: {} vs 1 epoch: {}",
            longer.loss,
            first.loss
        );
    }

    #[test]
    fn a_model_that_does_not_match_the_task_is_refused_before_training() {
        let mut global = model::read(&Regressor::new(&Device::flex())).unwrap();
        let wrong = fedhive_shared::Tensor {
            shape: vec![8, 4],
            data: vec![0.0; 32],
        };
        global.0.insert("hidden.weight".into(), wrong);
        let mut steps = 0;
        let err = train_model(
            Regressor::new,
            &Device::flex(),
            &global,
            &Points::new(),
            &params(1),
            7,
            &mut |_| {
                steps += 1;
                true
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                TrainError::Model(ModelError::Weights(TensorError::ShapeMismatch { .. }))
            ),
            "{err}"
        );
        assert_eq!(steps, 0);

        let mut extra = model::read(&Regressor::new(&Device::flex())).unwrap();
        extra
            .0
            .insert("head.weight".into(), extra.0["out.weight"].clone());
        assert!(matches!(train(&extra, 1), Err(TrainError::Model(_))));
    }

    #[test]
    fn a_step_callback_sees_progress_and_can_cancel() {
        let global = model::read(&Regressor::new(&Device::flex())).unwrap();
        let mut seen = Vec::new();
        let err = train_model(
            Regressor::new,
            &Device::flex(),
            &global,
            &Points::new(),
            &params(2),
            7,
            &mut |p| {
                seen.push(p);
                p.step < 3
            },
        )
        .unwrap_err();
        assert!(matches!(err, TrainError::Cancelled));
        let total_steps = 2 * 96 / 16;
        assert_eq!(
            seen,
            (1..=3)
                .map(|step| StepProgress { step, total_steps })
                .collect::<Vec<_>>()
        );
    }
}
