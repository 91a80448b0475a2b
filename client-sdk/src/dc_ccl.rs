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
//!
//! An app's own models take part through [`ControlLayout`] and [`train_controlled`]: its module
//! holds `F_m` and `F_s` side by side and computes its loss on their summed outputs, and the SDK
//! trains only `F_s` (what [`crate::session::Session::with_control_model`] runs each round).

use burn::nn::loss::{CrossEntropyLossConfig, MseLoss, Reduction};
use burn::optim::{AdamConfig, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhive_shared::NamedTensors;
use fedhive_shared::wire::TrainingParams;

use crate::data::{Dataset, IMAGE_PIXELS};
use crate::federated::{FederatedModel, LocalData};
use crate::model::{self, Classifier, ModelKind, with_model};
use crate::training::{
    EVAL_BATCH, Evaluation, FreezeAllBut, LocalUpdate, StepProgress, TrainError, backend_err, batch,
    check_dataset, check_params, evaluate_in_batches, fit, fit_model, local_update,
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

/// Where an app's DC-CCL module keeps its two models: the names of the two top-level fields that
/// hold the control model `F_m` (frozen: the weights the cloud worker publishes) and the co-model
/// `F_s` (trained: the task's model). The module's [`FederatedModel::loss`] computes the loss on
/// their summed outputs, `CE(F_m(x) + F_s(x), y)` for a classifier; a tensor `fc1.weight` of the
/// control model is the module's `<control>.fc1.weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlLayout {
    control: String,
    co_model: String,
}

impl ControlLayout {
    /// Two distinct top-level field names (no `.`).
    pub fn new(control: &str, co_model: &str) -> Result<Self, TrainError> {
        for name in [control, co_model] {
            if name.is_empty() || name.contains('.') {
                return Err(TrainError::InvalidParams(format!(
                    "`{name}` is not a top-level field name of a module"
                )));
            }
        }
        if control == co_model {
            return Err(TrainError::InvalidParams(format!(
                "the control model and the co-model are both in field `{control}`"
            )));
        }
        Ok(ControlLayout {
            control: control.to_string(),
            co_model: co_model.to_string(),
        })
    }

    /// The module's weights: `control` under its field, `co` under the other.
    pub fn join(&self, control: &NamedTensors, co: &NamedTensors) -> NamedTensors {
        let under = |field: &str, tensors: &NamedTensors| {
            tensors
                .0
                .iter()
                .map(|(name, t)| (format!("{field}.{name}"), t.clone()))
                .collect::<Vec<_>>()
        };
        let mut all = under(&self.control, control);
        all.extend(under(&self.co_model, co));
        NamedTensors(all.into_iter().collect())
    }

    /// The co-model's tensors of the module's weights, under their own names.
    fn co_part(&self, weights: NamedTensors) -> NamedTensors {
        let prefix = format!("{}.", self.co_model);
        NamedTensors(
            weights
                .0
                .into_iter()
                .filter_map(|(name, t)| name.strip_prefix(&prefix).map(|n| (n.to_string(), t)))
                .collect(),
        )
    }
}

/// Step 4 with an app's module (see [`ControlLayout`]): loads `control` (`F_m`) and `co` (`F_s`)
/// into the module `init` builds (names and shapes checked), trains only the co-model by FedAvg's
/// plain SGD on the module's loss, and returns the update of `F_s`. The control model is frozen
/// whatever the module's loss does with it.
#[allow(clippy::too_many_arguments)]
pub fn train_controlled<M, D>(
    init: impl FnOnce(&Device) -> M,
    device: &Device,
    layout: &ControlLayout,
    control: &NamedTensors,
    co: &NamedTensors,
    data: &D,
    params: &TrainingParams,
    seed: u64,
    on_step: &mut dyn FnMut(StepProgress) -> bool,
) -> Result<LocalUpdate, TrainError>
where
    M: FederatedModel,
    D: LocalData<Batch = M::Batch>,
{
    let weights = layout.join(control, co);
    let (after, loss) = fit_model(
        init,
        device,
        &weights,
        Some(&layout.co_model),
        data,
        params,
        seed,
        on_step,
    )?;
    local_update(layout.co_part(after), co, data.num_samples(), loss)
}

/// The app's module holding `control` and `co` (see [`ControlLayout`]), for its own forward pass:
/// on a device, `F_m(x) + F_s(x)` is DC-CCL's prediction.
pub fn load_controlled<M: FederatedModel>(
    init: impl FnOnce(&Device) -> M,
    device: &Device,
    layout: &ControlLayout,
    control: &NamedTensors,
    co: &NamedTensors,
) -> Result<M, TrainError> {
    let weights = layout.join(control, co);
    Ok(model::load_into(init(device), &weights, &weights.specs())?)
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
        model = model.map(&mut FreezeAllBut::new(model::head_module(trained.kind)));
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
    use burn::module::Module;

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
            learning_rate_schedule: None,
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

    /// An app's DC-CCL module: the two models side by side, the loss on their summed logits. It
    /// does not detach the control model's output: freezing it is the SDK's job.
    #[derive(Module, Debug)]
    struct AppPair {
        teacher_side: model::MlpSmall,
        learner: model::MlpSmall,
    }

    impl FederatedModel for AppPair {
        type Batch = crate::federated::ImageBatch;

        fn loss(&self, (x, y): Self::Batch) -> Tensor<1> {
            let logits = self.teacher_side.forward(x.clone()) + self.learner.forward(x);
            CrossEntropyLossConfig::new()
                .init(&logits.device())
                .forward(logits, y)
        }
    }

    fn app_pair(device: &Device) -> AppPair {
        AppPair {
            teacher_side: model::MlpSmall::new(device),
            learner: model::MlpSmall::new(device),
        }
    }

    #[test]
    fn an_apps_module_trains_the_co_model_as_the_built_in_step_does() {
        let device = Device::flex();
        let data = toy(3);
        let co = initial_weights(ModelKind::MlpSmall, 11);
        let control = initial_weights(ModelKind::MlpSmall, 12);
        let layout = ControlLayout::new("teacher_side", "learner").unwrap();
        let p = params(0.1);
        let mut steps = 0;
        let app = train_controlled(
            app_pair,
            &device,
            &layout,
            &control,
            &co,
            &data,
            &p,
            9,
            &mut |_| {
                steps += 1;
                true
            },
        )
        .unwrap();
        let built_in = train_co_model(
            Weights::new(ModelKind::MlpSmall, &co),
            Weights::new(ModelKind::MlpSmall, &control),
            &device,
            &data,
            &p,
            9,
        )
        .unwrap();
        assert_eq!(steps, 3 * 64 / 16);
        // Only F_s's tensors, under their own names, and F_m frozen although the loss reaches it:
        // the very update of the built-in step (same shuffles, same arithmetic).
        assert_eq!(app.delta.specs(), co.specs());
        assert!(app.delta.0.values().any(|t| t.data.iter().any(|v| *v != 0.0)));
        assert_eq!(app, built_in);
    }

    #[test]
    fn an_apps_module_is_refused_a_control_model_it_does_not_hold() {
        let device = Device::flex();
        let co = initial_weights(ModelKind::MlpSmall, 11);
        let wrong = initial_weights(ModelKind::Mlp, 12);
        let layout = ControlLayout::new("teacher_side", "learner").unwrap();
        let mut steps = 0;
        let err = train_controlled(
            app_pair,
            &device,
            &layout,
            &wrong,
            &co,
            &toy(0),
            &params(0.1),
            9,
            &mut |_| {
                steps += 1;
                true
            },
        )
        .unwrap_err();
        assert!(matches!(err, TrainError::Model(_)), "{err}");
        assert_eq!(steps, 0);
        for (control, co) in [("a", "a"), ("", "b"), ("a.b", "c")] {
            assert!(ControlLayout::new(control, co).is_err(), "{control:?} {co:?}");
        }
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
