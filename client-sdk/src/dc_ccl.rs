//! DC-CCL's model steps (Ding et al., "DC-CCL: Device-Cloud Collaborative Controlled Learning for
//! Large Vision Models", arXiv 2303.10361; `ALGORITHMS.md`, "DC-CCL"), on devices and in the cloud
//! worker alike.
//!
//! - [`train_co_model`] (step 4, devices and cloud): train the co-model `F_s` with loss
//!   `CE(F_m(x) + F_s(x), y)`, the control model `F_m` frozen, by the same plain SGD as FedAvg's
//!   local step; the delta of `F_s` is what is uploaded.
//! - [`distil`] (step 2, cloud): the control model `F_m` from frozen `F_c`, minimising
//!   `MSE(F_m(x), F_c(x))` on logits (Adam).
//! - [`tune_head`] (step 5, optional, cloud): after fusion, train only `F_s`'s last layer on a
//!   small tuning set with the same loss as step 4.
//! - [`evaluate_sum`] and [`predict_sum`]: the served output `F_c(x) + F_s(x)` (cloud) or
//!   `F_m(x) + F_s(x)` (on the device).

use burn::module::{ModuleMapper, Param};
use burn::nn::loss::{CrossEntropyLossConfig, MseLoss, Reduction};
use burn::optim::{AdamConfig, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhive_shared::NamedTensors;
use fedhive_shared::wire::TrainingParams;

use crate::data::{Dataset, IMAGE_PIXELS};
use crate::model::{self, Classifier, ModelKind, with_model};
use crate::training::{
    EVAL_BATCH, Evaluation, LocalUpdate, TrainError, backend_err, batch, check_dataset, check_params,
    evaluate_in_batches, fit, local_update,
};

/// A model's family and weights.
#[derive(Debug, Clone, Copy)]
pub struct Weights<'a> {
    pub kind: ModelKind,
    pub tensors: &'a NamedTensors,
}

impl<'a> Weights<'a> {
    pub fn new(kind: ModelKind, tensors: &'a NamedTensors) -> Self {
        Weights { kind, tensors }
    }

    /// The module on `device` (frozen when `device` has autodiff: no gradient reaches it).
    fn load<M: Classifier>(&self, device: &Device) -> Result<M, TrainError> {
        Ok(model::load::<M>(self.tensors, &model::tensor_specs(self.kind), device)?.no_grad())
    }
}

/// Step 4: trains `co` (`F_s`) on `data` with loss `CE(F_m(x) + F_s(x), y)`, `control` (`F_m`)
/// frozen, and returns the update of `F_s`.
pub fn train_co_model(
    co: Weights,
    control: Weights,
    device: &Device,
    data: &Dataset,
    params: &TrainingParams,
    seed: u64,
) -> Result<LocalUpdate, TrainError> {
    check_dataset(data)?;
    check_params(params)?;
    let (after, loss) = with_model!(co.kind, S => with_model!(control.kind, M =>
        train_beside::<S, M>(co, control, Objective::CoModel, device, data, params, seed)?));
    local_update(after, co.tensors, data.len(), loss)
}

/// Step 2: distils `student` (`F_m`, from these initial weights) from frozen `teacher` (`F_c`) on
/// `data`, minimising the mean squared error between their logits with Adam at
/// `params.learning_rate`. Returns the student's weights and the last epoch's mean loss.
pub fn distil(
    student: Weights,
    teacher: Weights,
    device: &Device,
    data: &Dataset,
    params: &TrainingParams,
    seed: u64,
) -> Result<(NamedTensors, f32), TrainError> {
    check_dataset(data)?;
    check_params(params)?;
    with_model!(student.kind, S => with_model!(teacher.kind, T =>
        train_beside::<S, T>(student, teacher, Objective::Distil, device, data, params, seed)))
}

/// Step 5 (optional): trains only the last layer of `co` (`F_s`, after fusion) on a small tuning
/// set with step 4's loss `CE(F_m(x) + F_s(x), y)` by plain SGD, every other tensor and `control`
/// frozen. Returns `F_s` with the tuned head (the other tensors bit for bit as given) and the last
/// epoch's mean loss.
pub fn tune_head(
    co: Weights,
    control: Weights,
    device: &Device,
    tuning: &Dataset,
    params: &TrainingParams,
    seed: u64,
) -> Result<(NamedTensors, f32), TrainError> {
    check_dataset(tuning)?;
    check_params(params)?;
    with_model!(co.kind, S => with_model!(control.kind, M =>
        train_beside::<S, M>(co, control, Objective::Head, device, tuning, params, seed)))
}

/// Stops gradients to every parameter outside one top-level module.
struct FreezeAllBut<'a> {
    module: &'a str,
    path: Vec<String>,
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

/// What a model trained beside a frozen one minimises.
#[derive(Debug, Clone, Copy)]
enum Objective {
    /// `CE(frozen(x) + trained(x), y)` by plain SGD (step 4).
    CoModel,
    /// The same, training only the last layer (step 5).
    Head,
    /// `MSE(trained(x), frozen(x))` on logits by Adam (step 2).
    Distil,
}

/// Trains `trained` with `frozen` fixed beside it; returns the trained weights and the last
/// epoch's mean loss.
fn train_beside<S: Classifier, F: Classifier>(
    trained: Weights,
    frozen: Weights,
    objective: Objective,
    device: &Device,
    data: &Dataset,
    params: &TrainingParams,
    seed: u64,
) -> Result<(NamedTensors, f32), TrainError> {
    let device = device.clone().autodiff();
    let mut model: S = model::load(trained.tensors, &model::tensor_specs(trained.kind), &device)?;
    if let Objective::Head = objective {
        model = model.map(&mut FreezeAllBut {
            module: model::head_module(trained.kind),
            path: Vec::new(),
        });
    }
    let frozen: F = frozen.load(&device)?;
    let criterion = CrossEntropyLossConfig::new().init(&device);
    let optim = match objective {
        Objective::CoModel | Objective::Head => SgdConfig::new().init(),
        Objective::Distil => AdamConfig::new().init(),
    };
    let loss_of = |s: &S, (x, y): (Tensor<2>, Tensor<1, Int>)| {
        let fixed = frozen.forward(x.clone()).detach();
        match objective {
            Objective::CoModel | Objective::Head => criterion.forward(fixed + s.forward(x), y),
            Objective::Distil => MseLoss::new().forward(s.forward(x), fixed, Reduction::Mean),
        }
    };
    let (model, loss) = fit(model, optim, &device, data, params, seed, loss_of, &mut |_| true)?;
    Ok((model::read(&model)?, loss))
}

/// Accuracy and mean cross-entropy of the summed logits `a(x) + b(x)` on `data`.
pub fn evaluate_sum(
    a: Weights,
    b: Weights,
    device: &Device,
    data: &Dataset,
) -> Result<Evaluation, TrainError> {
    check_dataset(data)?;
    with_model!(a.kind, A => with_model!(b.kind, B => eval_sum::<A, B>(a, b, device, data)))
}

fn eval_sum<A: Classifier, B: Classifier>(
    a: Weights,
    b: Weights,
    device: &Device,
    data: &Dataset,
) -> Result<Evaluation, TrainError> {
    let device = device.clone().without_autodiff();
    let (ma, mb): (A, B) = (a.load(&device)?, b.load(&device)?);
    evaluate_in_batches(data.len(), &device, |idx| {
        let (x, y) = batch(data, idx, &device);
        Ok((ma.forward(x.clone()) + mb.forward(x), y))
    })
}

/// The class of each image (`[n * 784]` pixels) under the summed logits `a(x) + b(x)`: DC-CCL's
/// served prediction (`F_c + F_s` in the cloud, `F_m + F_s` on a device).
pub fn predict_sum(a: Weights, b: Weights, device: &Device, images: &[f32]) -> Result<Vec<u8>, TrainError> {
    if images.is_empty() || !images.len().is_multiple_of(IMAGE_PIXELS) {
        return Err(TrainError::MalformedDataset {
            images: images.len(),
            labels: images.len() / IMAGE_PIXELS,
        });
    }
    with_model!(a.kind, A => with_model!(b.kind, B => predict_with::<A, B>(a, b, device, images)))
}

fn predict_with<A: Classifier, B: Classifier>(
    a: Weights,
    b: Weights,
    device: &Device,
    images: &[f32],
) -> Result<Vec<u8>, TrainError> {
    let device = device.clone().without_autodiff();
    let (ma, mb): (A, B) = (a.load(&device)?, b.load(&device)?);
    let mut classes = Vec::with_capacity(images.len() / IMAGE_PIXELS);
    for chunk in images.chunks(EVAL_BATCH * IMAGE_PIXELS) {
        let n = chunk.len() / IMAGE_PIXELS;
        let x = Tensor::<2>::from_data(TensorData::new(chunk.to_vec(), [n, IMAGE_PIXELS]), &device);
        let predicted = (ma.forward(x.clone()) + mb.forward(x)).argmax(1);
        let values = predicted
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| backend_err(format!("{e:?}")))?;
        classes.extend(values.into_iter().map(|c| c as u8));
    }
    Ok(classes)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::model::initial_weights;

    /// 64 images of two classes that differ by their brightness.
    fn toy(seed: u64) -> Dataset {
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for i in 0..64u64 {
            let class = (i % 2) as u8;
            let base = if class == 0 { 0.1 } else { 0.8 };
            images.extend((0..IMAGE_PIXELS).map(|p| base + ((p as u64 * 7 + i + seed) % 10) as f32 * 0.01));
            labels.push(class);
        }
        Dataset { images, labels }
    }

    fn params(lr: f32) -> TrainingParams {
        TrainingParams {
            local_epochs: 3,
            max_local_steps: 0,
            batch_size: 16,
            learning_rate: lr,
        }
    }

    #[test]
    fn co_model_learns_against_the_control_model() {
        let device = Device::flex();
        let data = toy(0);
        let co = initial_weights(ModelKind::MlpSmall, 1);
        let control = initial_weights(ModelKind::MlpSmall, 2);
        let before = evaluate_sum(
            Weights::new(ModelKind::MlpSmall, &control),
            Weights::new(ModelKind::MlpSmall, &co),
            &device,
            &data,
        )
        .unwrap();
        let update = train_co_model(
            Weights::new(ModelKind::MlpSmall, &co),
            Weights::new(ModelKind::MlpSmall, &control),
            &device,
            &data,
            &TrainingParams {
                local_epochs: 20,
                ..params(0.1)
            },
            7,
        )
        .unwrap();
        assert_eq!(update.num_samples, 64);
        assert_eq!(update.delta.specs(), co.specs());
        let trained = co.add(&update.delta);
        let after = evaluate_sum(
            Weights::new(ModelKind::MlpSmall, &control),
            Weights::new(ModelKind::MlpSmall, &trained),
            &device,
            &data,
        )
        .unwrap();
        assert!(after.loss < before.loss, "{after:?} vs {before:?}");
        assert_eq!(after.accuracy, 1.0, "{after:?}");
        // The prediction path agrees with the evaluation.
        let predicted = predict_sum(
            Weights::new(ModelKind::MlpSmall, &control),
            Weights::new(ModelKind::MlpSmall, &trained),
            &device,
            &data.images,
        )
        .unwrap();
        assert_eq!(predicted, data.labels);
    }

    #[test]
    fn head_tuning_trains_the_last_layer_only() {
        let device = Device::flex();
        let data = toy(2);
        let co = initial_weights(ModelKind::MlpSmall, 5);
        let control = initial_weights(ModelKind::MlpSmall, 6);
        let sum = |co: &NamedTensors| {
            evaluate_sum(
                Weights::new(ModelKind::MlpSmall, &control),
                Weights::new(ModelKind::MlpSmall, co),
                &device,
                &data,
            )
            .unwrap()
        };
        let (tuned, _) = tune_head(
            Weights::new(ModelKind::MlpSmall, &co),
            Weights::new(ModelKind::MlpSmall, &control),
            &device,
            &data,
            &TrainingParams {
                local_epochs: 20,
                ..params(0.1)
            },
            8,
        )
        .unwrap();
        assert_eq!(model::head_module(ModelKind::MlpSmall), "fc2");
        assert_eq!(model::head_module(ModelKind::Cnn), "fc");
        assert_eq!(tuned.specs(), co.specs());
        for (name, before) in &co.0 {
            let after = &tuned.0[name];
            if name.starts_with("fc2.") {
                assert_ne!(after.data, before.data, "{name} should have been tuned");
            } else {
                assert_eq!(after.data, before.data, "{name} should be frozen");
            }
        }
        let (before, after) = (sum(&co), sum(&tuned));
        assert!(after.loss < before.loss, "{after:?} vs {before:?}");
    }

    #[test]
    fn distillation_moves_the_student_towards_the_teacher() {
        let device = Device::flex();
        let data = toy(1);
        let teacher = initial_weights(ModelKind::CnnLarge, 3);
        let student = initial_weights(ModelKind::MlpSmall, 4);
        // The MSE after one epoch against the MSE after twenty, from the same start.
        let one_epoch = TrainingParams {
            local_epochs: 1,
            ..params(0.01)
        };
        let (_, first) = distil(
            Weights::new(ModelKind::MlpSmall, &student),
            Weights::new(ModelKind::CnnLarge, &teacher),
            &device,
            &data,
            &one_epoch,
            5,
        )
        .unwrap();
        let (distilled, last) = distil(
            Weights::new(ModelKind::MlpSmall, &student),
            Weights::new(ModelKind::CnnLarge, &teacher),
            &device,
            &data,
            &TrainingParams {
                local_epochs: 20,
                ..params(0.01)
            },
            5,
        )
        .unwrap();
        assert_eq!(distilled.specs(), student.specs());
        assert!(last < first / 2.0, "MSE {first} after one epoch, {last} after 20");
    }
}
