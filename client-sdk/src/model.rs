//! The models devices train, and their exchange with [`NamedTensors`].
//!
//! The server never runs burn: it sees a model only as named f32 tensors (safetensors). Names are
//! the burn module paths (`"fc1.weight"`), so the same file loads back into the module here. The
//! layout of every model is also written down as a table ([`tensor_specs`]) so initial weights can
//! be drawn without a device, bit-identically on every machine; a test checks the table against
//! the modules.

use std::collections::BTreeMap;
use std::str::FromStr;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::store::{ModuleSnapshot, burn_pack::Tensor as PackTensor};
use burn::tensor::activation::relu;
use burn::tensor::{Bytes, DType, Device, Tensor};
use fedhive_shared::{NamedTensors, TensorError, TensorSpec};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Uniform};

use crate::data::{IMAGE_PIXELS, NUM_CLASSES};

/// Model family, named in a task's config (`"mlp"`, `"cnn"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// 784-128-10 perceptron with ReLU: fast, ~85% on Fashion-MNIST.
    Mlp,
    /// Two 3x3 conv + max-pool blocks (8 and 16 channels) and a linear head: ~89%, still CPU-cheap.
    Cnn,
    /// 784-32-10 perceptron (25k parameters): DC-CCL's device-side co-model and control model.
    MlpSmall,
    /// The CNN with a 256-unit hidden layer before its head (106k parameters, 4x `MlpSmall`):
    /// DC-CCL's large cloud model.
    CnnLarge,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::MlpSmall => "mlp_small",
            ModelKind::CnnLarge => "cnn_large",
        }
    }

    pub const ALL: [ModelKind; 4] = [
        ModelKind::Mlp,
        ModelKind::Cnn,
        ModelKind::MlpSmall,
        ModelKind::CnnLarge,
    ];
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model `{0}` (expected `mlp`, `cnn`, `mlp_small` or `cnn_large`)")]
pub struct UnknownModel(pub String);

impl FromStr for ModelKind {
    type Err = UnknownModel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownModel(s.to_string()))
    }
}

/// Why weights could not be moved into or out of a module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("weights do not fit the model: {0}")]
    Weights(#[from] TensorError),
    #[error("tensor `{name}` has {found} values but its shape {shape:?} needs {expected}")]
    DataLength {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error("cannot read tensor `{name}` back from the device: {message}")]
    Readback { name: String, message: String },
    #[error("cannot load the weights into the module: {0}")]
    Apply(String),
}

/// Every tensor of `kind` with its shape and fan-in (which sets its initialisation range).
fn layout(kind: ModelKind) -> Vec<(&'static str, Vec<usize>, usize)> {
    match kind {
        ModelKind::Mlp => vec![
            ("fc1.weight", vec![IMAGE_PIXELS, MLP_HIDDEN], IMAGE_PIXELS),
            ("fc1.bias", vec![MLP_HIDDEN], IMAGE_PIXELS),
            ("fc2.weight", vec![MLP_HIDDEN, NUM_CLASSES], MLP_HIDDEN),
            ("fc2.bias", vec![NUM_CLASSES], MLP_HIDDEN),
        ],
        ModelKind::Cnn => vec![
            ("conv1.weight", vec![CONV1, 1, 3, 3], 9),
            ("conv1.bias", vec![CONV1], 9),
            ("conv2.weight", vec![CONV2, CONV1, 3, 3], CONV1 * 9),
            ("conv2.bias", vec![CONV2], CONV1 * 9),
            ("fc.weight", vec![CNN_FLAT, NUM_CLASSES], CNN_FLAT),
            ("fc.bias", vec![NUM_CLASSES], CNN_FLAT),
        ],
        ModelKind::MlpSmall => vec![
            ("fc1.weight", vec![IMAGE_PIXELS, SMALL_HIDDEN], IMAGE_PIXELS),
            ("fc1.bias", vec![SMALL_HIDDEN], IMAGE_PIXELS),
            ("fc2.weight", vec![SMALL_HIDDEN, NUM_CLASSES], SMALL_HIDDEN),
            ("fc2.bias", vec![NUM_CLASSES], SMALL_HIDDEN),
        ],
        ModelKind::CnnLarge => vec![
            ("conv1.weight", vec![CONV1, 1, 3, 3], 9),
            ("conv1.bias", vec![CONV1], 9),
            ("conv2.weight", vec![CONV2, CONV1, 3, 3], CONV1 * 9),
            ("conv2.bias", vec![CONV2], CONV1 * 9),
            ("fc1.weight", vec![CNN_FLAT, LARGE_HIDDEN], CNN_FLAT),
            ("fc1.bias", vec![LARGE_HIDDEN], CNN_FLAT),
            ("fc2.weight", vec![LARGE_HIDDEN, NUM_CLASSES], LARGE_HIDDEN),
            ("fc2.bias", vec![NUM_CLASSES], LARGE_HIDDEN),
        ],
    }
}

/// The module of `kind`'s last layer (its head: `fc2` or `fc`), the one layer DC-CCL's optional
/// head tuning trains.
pub fn head_module(kind: ModelKind) -> &'static str {
    let (last, _, _) = layout(kind).pop().expect("every model has layers");
    last.split('.').next().expect("split yields at least one piece")
}

/// Names and shapes of every tensor of `kind`, in name order (as [`NamedTensors::specs`]).
pub fn tensor_specs(kind: ModelKind) -> Vec<TensorSpec> {
    let mut specs: Vec<TensorSpec> = layout(kind)
        .into_iter()
        .map(|(name, shape, _)| TensorSpec {
            name: name.to_string(),
            shape,
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// Initial weights for `kind`, deterministic for `seed` on every machine and backend.
///
/// Drawn on the host rather than by burn's initialisers so the bits depend only on the seed.
/// Every tensor is `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, the same range as burn's (and PyTorch's)
/// default for linear and conv layers.
pub fn initial_weights(kind: ModelKind, seed: u64) -> NamedTensors {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for (name, shape, fan_in) in layout(kind) {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let dist = Uniform::new_inclusive(-bound, bound).expect("bound is positive and finite");
        let data = (0..shape.iter().product::<usize>())
            .map(|_| dist.sample(&mut rng))
            .collect();
        out.insert(name.to_string(), fedhive_shared::Tensor { shape, data });
    }
    NamedTensors(out)
}

const MLP_HIDDEN: usize = 128;
const SMALL_HIDDEN: usize = 32;
const LARGE_HIDDEN: usize = 256;
const CONV1: usize = 8;
const CONV2: usize = 16;
/// 28 -conv3-> 26 -pool2-> 13 -conv3-> 11 -pool2-> 5: 16 channels of 5x5.
const CNN_FLAT: usize = CONV2 * 5 * 5;

/// A classifier over flattened 28x28 images: `[batch, 784] -> [batch, 10]` logits.
pub(crate) trait Classifier: Module + Sized {
    /// A module with burn's own (lazy, never materialised when loaded) initialisation.
    fn init(device: &Device) -> Self;
    fn forward(&self, images: Tensor<2>) -> Tensor<2>;
}

/// The built-in classifiers as modules, for an app that trains one of them through a
/// [`crate::session::Session`] (e.g. the bindings): `Mlp::new(&device)`.
macro_rules! classifiers_are_constructible {
    ($($model:ty),*) => {$(
        impl $model {
            pub fn new(device: &Device) -> Self {
                <$model as Classifier>::init(device)
            }
        }
    )*};
}
classifiers_are_constructible!(Mlp, MlpSmall, Cnn, CnnLarge);

#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Classifier for Mlp {
    fn init(device: &Device) -> Self {
        Mlp {
            fc1: LinearConfig::new(IMAGE_PIXELS, MLP_HIDDEN).init(device),
            fc2: LinearConfig::new(MLP_HIDDEN, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(relu(self.fc1.forward(images)))
    }
}

#[derive(Module, Debug)]
pub struct MlpSmall {
    fc1: Linear,
    fc2: Linear,
}

impl Classifier for MlpSmall {
    fn init(device: &Device) -> Self {
        MlpSmall {
            fc1: LinearConfig::new(IMAGE_PIXELS, SMALL_HIDDEN).init(device),
            fc2: LinearConfig::new(SMALL_HIDDEN, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(relu(self.fc1.forward(images)))
    }
}

#[derive(Module, Debug)]
pub struct CnnLarge {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
}

impl Classifier for CnnLarge {
    fn init(device: &Device) -> Self {
        CnnLarge {
            conv1: Conv2dConfig::new([1, CONV1], [3, 3]).init(device),
            conv2: Conv2dConfig::new([CONV1, CONV2], [3, 3]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(CNN_FLAT, LARGE_HIDDEN).init(device),
            fc2: LinearConfig::new(LARGE_HIDDEN, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        let [batch, _] = images.dims();
        let x = images.reshape([batch, 1, 28, 28]);
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        self.fc2
            .forward(relu(self.fc1.forward(x.reshape([batch, CNN_FLAT]))))
    }
}

/// Runs `$body` with `$M` bound to the module type of model kind `$kind`.
macro_rules! with_model {
    ($kind:expr, $M:ident => $body:expr) => {
        match $kind {
            $crate::model::ModelKind::Mlp => {
                type $M = $crate::model::Mlp;
                $body
            }
            $crate::model::ModelKind::Cnn => {
                type $M = $crate::model::Cnn;
                $body
            }
            $crate::model::ModelKind::MlpSmall => {
                type $M = $crate::model::MlpSmall;
                $body
            }
            $crate::model::ModelKind::CnnLarge => {
                type $M = $crate::model::CnnLarge;
                $body
            }
        }
    };
}
pub(crate) use with_model;

#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc: Linear,
}

impl Classifier for Cnn {
    fn init(device: &Device) -> Self {
        Cnn {
            conv1: Conv2dConfig::new([1, CONV1], [3, 3]).init(device),
            conv2: Conv2dConfig::new([CONV1, CONV2], [3, 3]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc: LinearConfig::new(CNN_FLAT, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        let [batch, _] = images.dims();
        let x = images.reshape([batch, 1, 28, 28]);
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        self.fc.forward(x.reshape([batch, CNN_FLAT]))
    }
}

/// Builds a `M` on `device` holding exactly `weights` (names, shapes and finiteness are checked).
pub(crate) fn load<M: Classifier>(
    weights: &NamedTensors,
    specs: &[TensorSpec],
    device: &Device,
) -> Result<M, ModelError> {
    load_into(M::init(device), weights, specs)
}

/// [`load`] for a module built by the caller (with burn's lazy initialisation, so its own
/// weights are never materialised): every float parameter becomes the tensor of its path, through
/// burn's store. `specs` is what the caller expects (a task's tensors, or a model's table); the
/// weights must match it exactly, and the module's own parameters must match the weights (name,
/// shape: checked by the store before any value moves).
pub fn load_into<M: Module>(
    mut module: M,
    weights: &NamedTensors,
    specs: &[TensorSpec],
) -> Result<M, ModelError> {
    weights.check(specs, f32::INFINITY)?;
    for (name, t) in &weights.0 {
        let expected = t.shape.iter().product::<usize>();
        if t.data.len() != expected {
            return Err(ModelError::DataLength {
                name: name.clone(),
                shape: t.shape.clone(),
                expected,
                found: t.data.len(),
            });
        }
    }
    // The module against the weights: a parameter the weights lack, or one they hold that the
    // module does not have, is refused here (the store would skip both silently).
    weights.check(&specs_of(&module), f32::INFINITY)?;
    let tensors = weights
        .0
        .iter()
        .map(|(name, t)| {
            PackTensor::new(
                name.clone(),
                DType::F32,
                t.shape.clone(),
                None,
                Bytes::from_elems(t.data.clone()),
            )
        })
        .collect();
    let result = module.apply(tensors, None, None, false);
    if let Some(error) = result.errors.first() {
        return Err(ModelError::Apply(error.to_string()));
    }
    Ok(module)
}

/// Names and shapes of every parameter of `module`, in name order; no value is read.
pub fn specs_of<M: Module>(module: &M) -> Vec<TensorSpec> {
    let mut specs: Vec<TensorSpec> = module
        .collect(None, None, false)
        .into_iter()
        .map(|t| TensorSpec {
            shape: t.shape.to_vec(),
            name: t.name,
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// Reads every parameter of `module` back to the host, keyed by its dotted path (burn's store).
pub fn read<M: Module>(module: &M) -> Result<NamedTensors, ModelError> {
    let mut out = BTreeMap::new();
    for t in module.collect(None, None, false) {
        if t.dtype != DType::F32 {
            return Err(ModelError::Readback {
                message: format!("its dtype is {:?}; tasks exchange f32 tensors", t.dtype),
                name: t.name,
            });
        }
        let shape = t.shape.to_vec();
        let name = t.name.clone();
        let bytes = t.into_bytes().map_err(|e| ModelError::Readback {
            name: name.clone(),
            message: e.to_string(),
        })?;
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4 bytes")))
            .collect();
        out.insert(name, fedhive_shared::Tensor { shape, data });
    }
    Ok(NamedTensors(out))
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    fn bits(t: &NamedTensors) -> Vec<(String, Vec<usize>, Vec<u32>)> {
        t.0.iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.shape.clone(),
                    t.data.iter().map(|v| v.to_bits()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn names_parse_and_print() {
        for kind in ModelKind::ALL {
            assert_eq!(kind.name().parse::<ModelKind>(), Ok(kind));
        }
        assert!(
            "resnet"
                .parse::<ModelKind>()
                .unwrap_err()
                .to_string()
                .contains("resnet")
        );
    }

    #[test]
    fn spec_table_matches_the_modules() {
        let device = Device::flex();
        assert_eq!(
            read(&Mlp::init(&device)).unwrap().specs(),
            tensor_specs(ModelKind::Mlp)
        );
        for kind in ModelKind::ALL {
            let specs = with_model!(kind, M => read(&M::init(&device)).unwrap().specs());
            assert_eq!(specs, tensor_specs(kind), "{kind}");
        }
    }

    #[test]
    fn initial_weights_are_deterministic_and_in_range() {
        let a = initial_weights(ModelKind::Cnn, 1);
        assert_eq!(bits(&a), bits(&initial_weights(ModelKind::Cnn, 1)));
        assert_ne!(a, initial_weights(ModelKind::Cnn, 2));
        assert_eq!(a.specs(), tensor_specs(ModelKind::Cnn));
        let w = &initial_weights(ModelKind::Mlp, 1).0["fc1.weight"].data;
        let bound = 1.0 / 28.0;
        assert!(w.iter().all(|v| v.abs() <= bound));
        assert!(w.iter().any(|v| v.abs() > 0.9 * bound));
    }

    #[test]
    fn load_then_read_is_bit_exact() {
        for kind in ModelKind::ALL {
            let weights = initial_weights(kind, 42);
            let specs = tensor_specs(kind);
            for device in [Device::flex(), Device::flex().autodiff()] {
                let back =
                    with_model!(kind, M => read(&load::<M>(&weights, &specs, &device).unwrap())).unwrap();
                assert_eq!(bits(&back), bits(&weights), "{kind}");
            }
        }
    }

    #[test]
    fn load_rejects_mismatched_weights() {
        let specs = tensor_specs(ModelKind::Mlp);
        let device = Device::flex();
        let cnn = initial_weights(ModelKind::Cnn, 0);
        assert!(matches!(
            load::<Mlp>(&cnn, &specs, &device),
            Err(ModelError::Weights(TensorError::MissingTensor(_)))
        ));
        let mut bad = initial_weights(ModelKind::Mlp, 0);
        bad.0.get_mut("fc2.bias").unwrap().data[3] = f32::NAN;
        assert!(matches!(
            load::<Mlp>(&bad, &specs, &device),
            Err(ModelError::Weights(TensorError::NonFinite { .. }))
        ));
        let mut short = initial_weights(ModelKind::Mlp, 0);
        short.0.get_mut("fc2.bias").unwrap().data.pop();
        assert!(matches!(
            load::<Mlp>(&short, &specs, &device),
            Err(ModelError::DataLength { .. })
        ));
    }
}
