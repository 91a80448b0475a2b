//! Anonymous labelled samples for personalisation without user identifiers (Ding et al.,
//! "Personalized Language Model Learning on Text Data Without User Identifiers", arXiv 2501.06062;
//! `ALGORITHMS.md`, "Anonymous user embeddings").
//!
//! A device keeps a private distribution `q_u = N(mu_u, sigma^2 I)` over an embedding and sends,
//! with each labelled input, a fresh sample `e ~ q_u` and nothing that names it. A body of
//! samples is safetensors with three F32 tensors: `inputs` `[n, features]`, `embeddings`
//! `[n, embedding_dim]` and `labels` `[n]` (class indices, whole numbers below the task's class
//! count; f32 holds them exactly). The same layout carries the server's shuffled batches to the
//! cloud worker.

use std::collections::BTreeMap;

use crate::{NamedTensors, Tensor, TensorError, TensorSpec};

/// Largest magnitude accepted in an input or an embedding: far beyond any normalised feature or
/// any sample of a sensible `q_u`, and small enough that no sum of them overflows f32.
pub const VALUE_LIMIT: f32 = 1.0e4;

/// The shapes a task's samples have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleShape {
    pub features: usize,
    pub embedding_dim: usize,
    pub num_classes: usize,
}

/// Labelled samples, each with its own embedding, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    pub shape: SampleShape,
    pub inputs: Vec<f32>,
    pub embeddings: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Why a body of samples was refused; each variant has a stable code for API error bodies.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplesError {
    #[error(transparent)]
    Tensors(#[from] TensorError),
    #[error("a body of samples holds at least one sample")]
    Empty,
    #[error("{got} samples in one body, at most {max} are accepted")]
    TooMany { got: usize, max: usize },
    #[error("`labels` holds {value} at index {index}: labels are class indices below {classes}")]
    BadLabel {
        index: usize,
        value: f32,
        classes: usize,
    },
}

impl SamplesError {
    pub fn code(&self) -> &'static str {
        match self {
            SamplesError::Tensors(e) => e.code(),
            SamplesError::Empty => "no_samples",
            SamplesError::TooMany { .. } => "too_many_samples",
            SamplesError::BadLabel { .. } => "bad_label",
        }
    }
}

impl Samples {
    pub fn empty(shape: SampleShape) -> Self {
        Samples {
            shape,
            inputs: Vec::new(),
            embeddings: Vec::new(),
            labels: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn input(&self, i: usize) -> &[f32] {
        &self.inputs[i * self.shape.features..(i + 1) * self.shape.features]
    }

    pub fn embedding(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.shape.embedding_dim..(i + 1) * self.shape.embedding_dim]
    }

    /// Appends one sample (`input` and `embedding` of the shape's widths).
    pub fn push(&mut self, input: &[f32], embedding: &[f32], label: u32) {
        assert_eq!(input.len(), self.shape.features, "input width");
        assert_eq!(embedding.len(), self.shape.embedding_dim, "embedding width");
        self.inputs.extend_from_slice(input);
        self.embeddings.extend_from_slice(embedding);
        self.labels.push(label);
    }

    /// The samples at `order`, in that order (a shuffle when `order` is a permutation).
    pub fn select(&self, order: &[usize]) -> Samples {
        let mut out = Samples::empty(self.shape);
        for &i in order {
            out.push(self.input(i), self.embedding(i), self.labels[i]);
        }
        out
    }

    /// Appends every sample of `other` (of the same shape).
    pub fn extend(&mut self, other: &Samples) {
        assert_eq!(self.shape, other.shape, "samples of one task");
        self.inputs.extend_from_slice(&other.inputs);
        self.embeddings.extend_from_slice(&other.embeddings);
        self.labels.extend_from_slice(&other.labels);
    }

    fn specs(shape: SampleShape, n: usize) -> [TensorSpec; 3] {
        [
            TensorSpec {
                name: "embeddings".into(),
                shape: vec![n, shape.embedding_dim],
            },
            TensorSpec {
                name: "inputs".into(),
                shape: vec![n, shape.features],
            },
            TensorSpec {
                name: "labels".into(),
                shape: vec![n],
            },
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        let n = self.len();
        let [embeddings, inputs, labels] = Self::specs(self.shape, n);
        let tensors = BTreeMap::from([
            (
                embeddings.name,
                Tensor {
                    shape: embeddings.shape,
                    data: self.embeddings.clone(),
                },
            ),
            (
                inputs.name,
                Tensor {
                    shape: inputs.shape,
                    data: self.inputs.clone(),
                },
            ),
            (
                labels.name,
                Tensor {
                    shape: labels.shape,
                    data: self.labels.iter().map(|&l| l as f32).collect(),
                },
            ),
        ]);
        NamedTensors(tensors).encode()
    }

    /// Parses and checks a body: exactly the three tensors, of `shape`'s widths and one sample
    /// count between 1 and `max_samples`, every value finite and within [`VALUE_LIMIT`], every
    /// label a class index.
    pub fn decode_checked(
        bytes: &[u8],
        shape: SampleShape,
        max_samples: usize,
    ) -> Result<Self, SamplesError> {
        let mut tensors = NamedTensors::decode(bytes)?;
        let n = match tensors.0.get("labels") {
            Some(labels) if labels.shape.len() == 1 => labels.shape[0],
            Some(labels) => {
                return Err(TensorError::ShapeMismatch {
                    name: "labels".into(),
                    expected: vec![0],
                    found: labels.shape.clone(),
                }
                .into());
            }
            None => return Err(TensorError::MissingTensor("labels".into()).into()),
        };
        if n == 0 {
            return Err(SamplesError::Empty);
        }
        if n > max_samples {
            return Err(SamplesError::TooMany {
                got: n,
                max: max_samples,
            });
        }
        tensors.check(&Self::specs(shape, n), VALUE_LIMIT)?;
        let mut take = |name: &str| tensors.0.remove(name).expect("checked").data;
        let (inputs, embeddings, raw_labels) = (take("inputs"), take("embeddings"), take("labels"));
        let labels = raw_labels
            .iter()
            .enumerate()
            .map(|(index, &value)| {
                if value.fract() == 0.0 && value >= 0.0 && (value as usize) < shape.num_classes {
                    Ok(value as u32)
                } else {
                    Err(SamplesError::BadLabel {
                        index,
                        value,
                        classes: shape.num_classes,
                    })
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Samples {
            shape,
            inputs,
            embeddings,
            labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: SampleShape = SampleShape {
        features: 3,
        embedding_dim: 2,
        num_classes: 4,
    };

    fn two() -> Samples {
        let mut s = Samples::empty(SHAPE);
        s.push(&[0.1, 0.2, 0.3], &[1.0, -1.0], 3);
        s.push(&[0.4, 0.5, 0.6], &[0.5, 0.25], 0);
        s
    }

    #[test]
    fn a_body_round_trips() {
        let s = two();
        assert_eq!(Samples::decode_checked(&s.encode(), SHAPE, 2).unwrap(), s);
        assert_eq!(s.select(&[1, 0]).labels, vec![0, 3]);
        assert_eq!(s.select(&[1, 0]).embedding(1), &[1.0, -1.0]);
    }

    #[test]
    fn bad_bodies_are_refused_with_their_reason() {
        let s = two();
        let code = |bytes: &[u8], shape, max| Samples::decode_checked(bytes, shape, max).unwrap_err().code();
        assert_eq!(code(&s.encode(), SHAPE, 1), "too_many_samples");
        let wide = SampleShape {
            embedding_dim: 3,
            ..SHAPE
        };
        assert_eq!(code(&s.encode(), wide, 2), "shape_mismatch");
        let mut bad = s.clone();
        bad.labels[1] = 4;
        assert_eq!(code(&bad.encode(), SHAPE, 2), "bad_label");
        let mut bad = s.clone();
        bad.embeddings[0] = f32::NAN;
        assert_eq!(code(&bad.encode(), SHAPE, 2), "non_finite_value");
        let empty = Samples::empty(SHAPE);
        assert_eq!(code(&empty.encode(), SHAPE, 2), "no_samples");
        assert_eq!(code(b"junk", SHAPE, 2), "malformed_tensors");
        let mut fractional = NamedTensors::decode(&s.encode()).unwrap();
        fractional.0.get_mut("labels").unwrap().data[0] = 1.5;
        assert_eq!(code(&fractional.encode(), SHAPE, 2), "bad_label");
    }
}
