//! Named f32 tensors and their safetensors codec.
//!
//! Models and updates travel as safetensors: a language-neutral layout that PyTorch and Hugging Face
//! read, that burn-store writes, and that the server parses without burn. Only `F32` tensors are
//! accepted for now. [`NamedTensors::decode_checked`] is the gate every upload passes: it rejects
//! malformed bodies, missing or unexpected names, wrong dtypes or shapes and non-finite values, so
//! nothing invalid ever reaches an accumulator.

use std::{borrow::Cow, collections::BTreeMap, ops::Range};

use safetensors::{Dtype, SafeTensorError, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

/// Name and shape of one model tensor, as declared in a task's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A dense f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Tensors keyed by their dotted path (`"fc1.weight"`). A `BTreeMap` so iteration order, and with it
/// encoding and aggregation, is the same everywhere.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NamedTensors(pub BTreeMap<String, Tensor>);

/// Why a tensor body was refused. Each variant has a stable code for API error bodies.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("body is not valid safetensors: {0}")]
    Malformed(String),
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("tensor `{0}` is not part of this model")]
    UnexpectedTensor(String),
    #[error("tensor `{name}` has dtype {found}, expected {expected}")]
    DtypeMismatch {
        name: String,
        found: String,
        expected: &'static str,
    },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    #[error(
        "tensor `{name}` holds position {position} at index {index}: positions are strictly ascending and below {size}"
    )]
    BadPosition {
        name: String,
        index: usize,
        position: u32,
        size: usize,
    },
    #[error("tensor `{name}` holds {value} at index {index}, outside the accepted range ±{limit}")]
    OutOfRange {
        name: String,
        index: usize,
        value: f32,
        limit: f32,
    },
}

impl TensorError {
    /// Stable, greppable code used in HTTP error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            TensorError::Malformed(_) => "malformed_tensors",
            TensorError::MissingTensor(_) => "missing_tensor",
            TensorError::UnexpectedTensor(_) => "unexpected_tensor",
            TensorError::DtypeMismatch { .. } => "dtype_mismatch",
            TensorError::ShapeMismatch { .. } => "shape_mismatch",
            TensorError::NonFinite { .. } => "non_finite_value",
            TensorError::OutOfRange { .. } => "value_out_of_range",
            TensorError::BadPosition { .. } => "bad_position",
        }
    }
}

impl NamedTensors {
    /// Zero tensors with the given specs.
    pub fn zeros(specs: &[TensorSpec]) -> Self {
        Self::from_specs(specs, |s| vec![0.0; s.numel()])
    }

    /// Tensors with the given specs, each holding `data(spec)` (its `numel` values).
    pub fn from_specs(specs: &[TensorSpec], mut data: impl FnMut(&TensorSpec) -> Vec<f32>) -> Self {
        NamedTensors(
            specs
                .iter()
                .map(|s| {
                    let t = Tensor {
                        shape: s.shape.clone(),
                        data: data(s),
                    };
                    (s.name.clone(), t)
                })
                .collect(),
        )
    }

    /// The specs (names and shapes) of these tensors, in name order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.0
            .iter()
            .map(|(name, t)| TensorSpec {
                name: name.clone(),
                shape: t.shape.clone(),
            })
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.0.values().map(|t| t.data.len()).sum()
    }

    /// Serialises to safetensors bytes (all tensors F32, little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let views: Vec<(&str, TensorView<'_>)> = self
            .0
            .iter()
            .map(|(name, t)| {
                let bytes: &[u8] = bytemuck::cast_slice(&t.data);
                let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                    .expect("shape matches data length by construction");
                (name.as_str(), view)
            })
            .collect();
        safetensors::serialize(views, None).expect("serialising in-memory f32 tensors cannot fail")
    }

    /// Parses safetensors bytes without checking them against a model (all tensors must be F32).
    pub fn decode(bytes: &[u8]) -> Result<Self, TensorError> {
        let tensors = f32_views(bytes)?
            .into_iter()
            .map(|(name, view)| {
                let tensor = Tensor {
                    shape: view.shape().to_vec(),
                    data: bytemuck::pod_collect_to_vec(view.data()),
                };
                (name, tensor)
            })
            .collect();
        Ok(NamedTensors(tensors))
    }

    /// Parses safetensors bytes and checks them against `specs`: exactly these names, these shapes,
    /// F32, every value finite and within `±limit`. The first problem found is returned.
    pub fn decode_checked(bytes: &[u8], specs: &[TensorSpec], limit: f32) -> Result<Self, TensorError> {
        let tensors = Self::decode(bytes)?;
        tensors.check(specs, limit)?;
        Ok(tensors)
    }

    /// Checks names, shapes and values against `specs` and `±limit`.
    pub fn check(&self, specs: &[TensorSpec], limit: f32) -> Result<(), TensorError> {
        check_names_and_shapes(
            specs,
            |name| self.0.get(name).map(|t| t.shape.as_slice()),
            self.0.keys(),
        )?;
        for (name, t) in &self.0 {
            check_values(name, &t.data, limit)?;
        }
        Ok(())
    }

    /// `self - other`, tensor by tensor (both must have the same specs).
    pub fn sub(&self, other: &NamedTensors) -> NamedTensors {
        self.zip_with(other, |x, y| x - y)
    }

    /// `self + other`, tensor by tensor (both must have the same specs).
    pub fn add(&self, other: &NamedTensors) -> NamedTensors {
        self.zip_with(other, |x, y| x + y)
    }

    fn zip_with(&self, other: &NamedTensors, op: impl Fn(f32, f32) -> f32) -> NamedTensors {
        NamedTensors(
            self.0
                .iter()
                .map(|(name, a)| {
                    let b = &other.0[name];
                    let data = a.data.iter().zip(&b.data).map(|(&x, &y)| op(x, y)).collect();
                    (
                        name.clone(),
                        Tensor {
                            shape: a.shape.clone(),
                            data,
                        },
                    )
                })
                .collect(),
        )
    }
}

/// Parses a safetensors body. safetensors checks the tensors' offsets and sizes in offset order,
/// and among tensors with equal offsets that order is hash order, different from one parse to the
/// next: the same body was refused naming one tensor or another, or for its offsets one time and a
/// size the next (found by fuzzing). Every such refusal gets one message here, naming no tensor.
/// Refuses the tensor `name` of a parsed body unless it is there with `dtype` and `shape`.
pub(crate) fn check_view(
    views: &BTreeMap<String, TensorView<'_>>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<(), TensorError> {
    let view = views
        .get(name)
        .ok_or_else(|| TensorError::MissingTensor(name.to_string()))?;
    if view.dtype() != dtype {
        return Err(TensorError::DtypeMismatch {
            name: name.to_string(),
            found: format!("{:?}", view.dtype()),
            expected: match dtype {
                Dtype::I8 => "I8",
                Dtype::U32 => "U32",
                _ => "F32",
            },
        });
    }
    if view.shape() != shape {
        return Err(TensorError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: view.shape().to_vec(),
        });
    }
    Ok(())
}

pub(crate) fn parse_safetensors(bytes: &[u8]) -> Result<SafeTensors<'_>, TensorError> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        TensorError::Malformed(match e {
            SafeTensorError::InvalidOffset(_)
            | SafeTensorError::TensorInvalidInfo
            | SafeTensorError::MisalignedSlice
            | SafeTensorError::ValidationOverflow => "the header's data offsets do not tile the data by \
                 the tensors' shapes and dtypes (the first tensor starts at 0, each next one where the \
                 previous one ends, each spans its shape's bytes)"
                .to_string(),
            other => other.to_string(),
        })
    })
}

/// Parses safetensors bytes into views of their tensors, refusing the first (by name) that is not
/// F32. safetensors lists tensors in hash order, different from one parse to the next; checking in
/// name order refuses the same body with the same message every time (found by fuzzing).
fn f32_views(bytes: &[u8]) -> Result<BTreeMap<String, TensorView<'_>>, TensorError> {
    let st = parse_safetensors(bytes)?;
    let views: BTreeMap<String, TensorView<'_>> = st.tensors().into_iter().collect();
    if let Some((name, view)) = views.iter().find(|(_, view)| view.dtype() != Dtype::F32) {
        return Err(TensorError::DtypeMismatch {
            name: name.clone(),
            found: format!("{:?}", view.dtype()),
            expected: "F32",
        });
    }
    Ok(views)
}

/// Exactly the names of `specs`, each with its shape: the first missing or misshapen tensor (in
/// `specs` order), else the first unexpected one.
fn check_names_and_shapes<'a>(
    specs: &[TensorSpec],
    shape_of: impl Fn(&str) -> Option<&'a [usize]>,
    mut names: impl Iterator<Item = &'a String>,
) -> Result<(), TensorError> {
    for spec in specs {
        let shape = shape_of(&spec.name).ok_or_else(|| TensorError::MissingTensor(spec.name.clone()))?;
        if shape != spec.shape.as_slice() {
            return Err(TensorError::ShapeMismatch {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                found: shape.to_vec(),
            });
        }
    }
    if let Some(extra) = names.find(|k| !specs.iter().any(|s| &s.name == *k)) {
        return Err(TensorError::UnexpectedTensor(extra.clone()));
    }
    Ok(())
}

/// Every value finite and within `±limit`; the first one that is not.
pub(crate) fn check_values(name: &str, values: &[f32], limit: f32) -> Result<(), TensorError> {
    for (index, &value) in values.iter().enumerate() {
        if !value.is_finite() {
            return Err(TensorError::NonFinite {
                name: name.to_string(),
                index,
            });
        }
        if value.abs() > limit {
            return Err(TensorError::OutOfRange {
                name: name.to_string(),
                index,
                value,
                limit,
            });
        }
    }
    Ok(())
}

/// Little-endian f32 bytes as values: borrowed in place when they are 4-byte aligned (safetensors
/// pads its header so they are, in any buffer from the allocator), copied otherwise.
fn f32_values(bytes: &[u8]) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) => Cow::Borrowed(values),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// Where each tensor's values lie in a safetensors body that passed the upload gate.
///
/// The server's upload path keeps the body (it is stored as the update's blob anyway) and reads the
/// values from it in place, instead of holding a decoded copy beside it: one model-sized buffer per
/// upload in flight instead of two. The checks are [`NamedTensors::decode_checked`]'s, in its order.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorLayout(BTreeMap<String, Range<usize>>);

impl TensorLayout {
    /// Parses `bytes` and checks them against `specs` and `±limit` as
    /// [`NamedTensors::decode_checked`] does, returning where each tensor's values are.
    pub fn check(bytes: &[u8], specs: &[TensorSpec], limit: f32) -> Result<Self, TensorError> {
        let views = f32_views(bytes)?;
        check_names_and_shapes(specs, |name| views.get(name).map(|v| v.shape()), views.keys())?;
        let mut ranges = BTreeMap::new();
        for (name, view) in &views {
            check_values(name, &f32_values(view.data()), limit)?;
            // The view's data is a slice of `bytes`: its offset there is the pointer difference.
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            ranges.insert(name.clone(), start..start + view.data().len());
        }
        Ok(TensorLayout(ranges))
    }

    /// The values of tensor `name` in `bytes` (the body this layout was checked on).
    pub fn values<'a>(&self, bytes: &'a [u8], name: &str) -> Option<Cow<'a, [f32]>> {
        let range = self.0.get(name)?;
        Some(f32_values(&bytes[range.clone()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NamedTensors {
        let mut m = BTreeMap::new();
        m.insert(
            "fc.weight".to_string(),
            Tensor {
                shape: vec![2, 3],
                data: vec![1.0, -2.0, 3.5, 0.0, 1e-7, -4.25],
            },
        );
        m.insert(
            "fc.bias".to_string(),
            Tensor {
                shape: vec![3],
                data: vec![0.5, 0.25, -0.125],
            },
        );
        NamedTensors(m)
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(NamedTensors::decode(&bytes).unwrap(), t);
        assert_eq!(NamedTensors::decode_checked(&bytes, &t.specs(), 10.0).unwrap(), t);
    }

    /// The in-place gate gives the decoded values, and refuses exactly what the decoding gate
    /// refuses, with the same error.
    #[test]
    fn layout_reads_in_place_and_refuses_what_decode_checked_refuses() {
        let t = sample();
        let specs = t.specs();
        let bytes = t.encode();
        let layout = TensorLayout::check(&bytes, &specs, 10.0).unwrap();
        for (name, tensor) in &t.0 {
            let values = layout.values(&bytes, name).unwrap();
            assert!(
                matches!(values, Cow::Borrowed(_)),
                "aligned values are not copied"
            );
            assert_eq!(&*values, tensor.data.as_slice());
        }
        assert_eq!(layout.values(&bytes, "nope"), None);

        // One byte into a buffer, the values are no longer 4-byte aligned: still read, by copy.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        let body = &shifted[1..];
        let layout = TensorLayout::check(body, &specs, 10.0).unwrap();
        assert_eq!(
            &*layout.values(body, "fc.weight").unwrap(),
            t.0["fc.weight"].data.as_slice()
        );

        let mut nan = t.clone();
        nan.0.get_mut("fc.bias").unwrap().data[1] = f32::NAN;
        let mut big = t.clone();
        big.0.get_mut("fc.weight").unwrap().data[4] = 11.0;
        let mut wrong_shape = specs.clone();
        wrong_shape[1].shape = vec![3, 2];
        let mut missing = specs.clone();
        missing.push(TensorSpec {
            name: "y".into(),
            shape: vec![1],
        });
        let cases: Vec<(Vec<u8>, Vec<TensorSpec>)> = vec![
            (bytes[..bytes.len() - 3].to_vec(), specs.clone()),
            (bytes.clone(), wrong_shape),
            (bytes.clone(), specs[..1].to_vec()),
            (bytes.clone(), missing),
            (nan.encode(), specs.clone()),
            (big.encode(), specs.clone()),
        ];
        for (body, specs) in cases {
            let decoded = NamedTensors::decode_checked(&body, &specs, 10.0).unwrap_err();
            assert_eq!(TensorLayout::check(&body, &specs, 10.0).unwrap_err(), decoded);
        }
    }

    #[test]
    fn checked_decode_names_each_problem() {
        let t = sample();
        let specs = t.specs();
        let bytes = t.encode();
        assert!(matches!(
            NamedTensors::decode_checked(&bytes[..bytes.len() - 3], &specs, 10.0),
            Err(TensorError::Malformed(_))
        ));
        let mut wrong_shape = specs.clone();
        wrong_shape[1].shape = vec![3, 2];
        assert_eq!(
            NamedTensors::decode_checked(&bytes, &wrong_shape, 10.0)
                .unwrap_err()
                .code(),
            "shape_mismatch"
        );
        let mut extra = t.clone();
        extra.0.insert(
            "x".into(),
            Tensor {
                shape: vec![1],
                data: vec![0.0],
            },
        );
        assert_eq!(
            NamedTensors::decode_checked(&extra.encode(), &specs, 10.0).unwrap_err(),
            TensorError::UnexpectedTensor("x".into())
        );
        assert_eq!(
            NamedTensors::decode_checked(&bytes, &specs[..1], 10.0)
                .unwrap_err()
                .code(),
            "unexpected_tensor"
        );
        let mut missing = specs.clone();
        missing.push(TensorSpec {
            name: "y".into(),
            shape: vec![1],
        });
        assert_eq!(
            NamedTensors::decode_checked(&bytes, &missing, 10.0).unwrap_err(),
            TensorError::MissingTensor("y".into())
        );
        let mut nan = t.clone();
        nan.0.get_mut("fc.bias").unwrap().data[1] = f32::NAN;
        assert_eq!(
            NamedTensors::decode_checked(&nan.encode(), &specs, 10.0).unwrap_err(),
            TensorError::NonFinite {
                name: "fc.bias".into(),
                index: 1
            }
        );
        assert_eq!(
            NamedTensors::decode_checked(&bytes, &specs, 4.0)
                .unwrap_err()
                .code(),
            "value_out_of_range"
        );
    }

    #[test]
    fn non_f32_dtype_is_refused() {
        let data = [0u8; 8];
        let view = TensorView::new(Dtype::F64, vec![1], &data).unwrap();
        let bytes = safetensors::serialize(vec![("w", view)], None).unwrap();
        assert_eq!(NamedTensors::decode(&bytes).unwrap_err().code(), "dtype_mismatch");
    }

    /// Found by `fuzz/` (tensors_roundtrip): with several non-F32 tensors, the one named in the
    /// refusal followed safetensors' hash order, so the same body got different messages.
    #[test]
    fn the_same_body_is_refused_the_same_way_every_time() {
        let (a, b, c) = ([0u8; 4], [0u8; 4], [0u8; 4]);
        let bytes = safetensors::serialize(
            vec![
                ("w", TensorView::new(Dtype::I32, vec![1], &a).unwrap()),
                ("b", TensorView::new(Dtype::U32, vec![1], &b).unwrap()),
                ("e", TensorView::new(Dtype::F32, vec![1], &c).unwrap()),
            ],
            None,
        )
        .unwrap();
        let specs = [("b", 1), ("e", 1), ("w", 1)].map(|(name, n)| TensorSpec {
            name: name.into(),
            shape: vec![n],
        });
        let expected = TensorError::DtypeMismatch {
            name: "b".into(),
            found: "U32".into(),
            expected: "F32",
        };
        for _ in 0..32 {
            assert_eq!(NamedTensors::decode(&bytes).unwrap_err(), expected);
            assert_eq!(TensorLayout::check(&bytes, &specs, 1.0).unwrap_err(), expected);
        }
    }

    #[test]
    fn bad_offsets_and_sizes_are_refused_the_same_way_every_time() {
        // Found by the `tensors_roundtrip` fuzz target: tensors that share their offsets were
        // checked in hash order, so safetensors named one or the other, or refused the offsets one
        // time and a size the next.
        let bodies = [
            r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[12,140]},"7":{"dtype":"F32","shape":[8,4],"data_offsets":[12,140]},"w":{"dtype":"F32","shape":[3,4],"data_offsets":[140,188]}}"#,
            r#"{"b":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"emb":{"dtype":"I16","shape":[8,4],"data_offsets":[0,12]},"e(b":{"dtype":"I16","shape":[4,3],"data_offsets":[140,188]}}"#,
        ];
        let specs = [("7", vec![8, 4]), ("t", vec![3]), ("w", vec![3, 4])].map(|(name, shape)| TensorSpec {
            name: name.into(),
            shape,
        });
        for header in bodies {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.resize(bytes.len() + 188, 0);
            let first = NamedTensors::decode(&bytes).unwrap_err();
            for _ in 0..64 {
                assert_eq!(NamedTensors::decode(&bytes).unwrap_err(), first);
                assert_eq!(TensorLayout::check(&bytes, &specs, 1.0).unwrap_err(), first);
            }
            assert!(
                matches!(&first, TensorError::Malformed(m) if m.contains("do not tile")),
                "{first:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn round_trip_any_values(data in proptest::collection::vec(-1e6f32..1e6, 1..64)) {
            let mut m = BTreeMap::new();
            m.insert("t".to_string(), Tensor { shape: vec![data.len()], data });
            let t = NamedTensors(m);
            proptest::prop_assert_eq!(NamedTensors::decode(&t.encode()).unwrap(), t);
        }
    }
}
