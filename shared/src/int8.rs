//! int8 updates: a dense update in a quarter of the bytes, unbiased.
//!
//! Layout (a safetensors file, so any safetensors reader can open it): for every tensor `name` of
//! the model, `name` holds the quantised values as `I8` in the model's shape (each in `-127..=127`),
//! and `name:scale` holds one `F32` scale per block of [`BLOCK`] consecutive values (row-major),
//! shape `[ceil(numel / BLOCK)]`. Value `i` reads back as `q[i] as f32 * scale[i / BLOCK]`: 1 byte
//! per value plus 4 per block, 3.94x fewer bytes than f32.
//!
//! The device quantises each block to `scale = max|v| / 127` with stochastic rounding,
//! `q = floor(v / scale + u)` with `u` uniform in `[0, 1)`, so `E[q * scale] = v`: the round's
//! weighted mean is unbiased, and its quantisation noise averages out over the devices instead of
//! adding up as a bias would (QSGD, Alistarh et al., NeurIPS 2017, with one level per int8 step).
//! The server reads the values back and folds them like f32 values: what it sums is a function of the
//! bytes received, so the determinism and exactly-once rules are unchanged.

use std::{borrow::Cow, collections::BTreeMap, ops::Range};

use safetensors::{Dtype, tensor::TensorView};

use crate::tensors::{NamedTensors, TensorError, TensorSpec, check_values, check_view, parse_safetensors};

/// Values per scale.
pub const BLOCK: usize = 256;
/// Largest quantised magnitude: `-128` is refused so the range is symmetric.
const QMAX: f32 = 127.0;

/// The name of the scales of tensor `name`.
pub fn scale_name(name: &str) -> String {
    format!("{name}:scale")
}

fn blocks(numel: usize) -> usize {
    numel.div_ceil(BLOCK)
}

/// Quantises every tensor of `delta` (see the module doc); `uniform` draws from `[0, 1)`.
pub fn encode(delta: &NamedTensors, mut uniform: impl FnMut() -> f32) -> Vec<u8> {
    // Per tensor (name order): its quantised values and its block scales.
    let mut quantised: Vec<(Vec<i8>, Vec<f32>)> = Vec::new();
    for t in delta.0.values() {
        let mut q = Vec::with_capacity(t.data.len());
        let mut scales = Vec::with_capacity(blocks(t.data.len()));
        for block in t.data.chunks(BLOCK) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / QMAX;
            scales.push(scale);
            for &v in block {
                let level = if scale > 0.0 {
                    (v / scale + uniform()).floor().clamp(-QMAX, QMAX)
                } else {
                    0.0
                };
                q.push(level as i8);
            }
        }
        quantised.push((q, scales));
    }
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for ((name, t), (q, scales)) in delta.0.iter().zip(&quantised) {
        let shape = &t.shape;
        let q_bytes: &[u8] = bytemuck::cast_slice(q);
        let s_bytes: &[u8] = bytemuck::cast_slice(scales);
        views.push((
            name.to_string(),
            TensorView::new(Dtype::I8, shape.to_vec(), q_bytes)
                .expect("shape matches data length by construction"),
        ));
        views.push((
            scale_name(name),
            TensorView::new(Dtype::F32, vec![scales.len()], s_bytes).expect("one scale per block"),
        ));
    }
    safetensors::serialize(views, None).expect("serialising in-memory tensors cannot fail")
}

/// Where each tensor's quantised values and scales lie in an int8 body that passed the upload gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Layout(BTreeMap<String, (Range<usize>, Range<usize>)>);

impl Int8Layout {
    /// Parses `bytes` and checks them against `specs`: exactly each tensor and its scales, of their
    /// dtypes and shapes; every scale finite, non-negative and at most `limit / 127` (so every value
    /// reads back within `±limit`); no quantised value `-128`. The first problem, in name order.
    pub fn check(bytes: &[u8], specs: &[TensorSpec], limit: f32) -> Result<Self, TensorError> {
        let st = parse_safetensors(bytes)?;
        let views: BTreeMap<String, TensorView<'_>> = st.tensors().into_iter().collect();
        for spec in specs {
            let scales = scale_name(&spec.name);
            check_view(&views, &spec.name, Dtype::I8, &spec.shape)?;
            check_view(&views, &scales, Dtype::F32, &[blocks(spec.numel())])?;
        }
        let expected = |k: &String| specs.iter().any(|s| &s.name == k || scale_name(&s.name) == *k);
        if let Some(extra) = views.keys().find(|k| !expected(k)) {
            return Err(TensorError::UnexpectedTensor(extra.clone()));
        }
        let offset = |view: &TensorView<'_>| {
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            start..start + view.data().len()
        };
        let mut ranges = BTreeMap::new();
        for spec in specs {
            let (q, scales) = (&views[&spec.name], &views[&scale_name(&spec.name)]);
            check_values(&scale_name(&spec.name), &f32_values(scales.data()), limit / QMAX)?;
            if let Some(s) = f32_values(scales.data()).iter().position(|&s| s < 0.0) {
                return Err(TensorError::OutOfRange {
                    name: scale_name(&spec.name),
                    index: s,
                    value: f32_values(scales.data())[s],
                    limit: limit / QMAX,
                });
            }
            if let Some(index) = q.data().iter().position(|&b| b as i8 == i8::MIN) {
                return Err(TensorError::OutOfRange {
                    name: spec.name.clone(),
                    index,
                    value: -128.0,
                    limit: QMAX,
                });
            }
            ranges.insert(spec.name.clone(), (offset(q), offset(scales)));
        }
        Ok(Int8Layout(ranges))
    }

    /// The values of tensor `name` read back from `bytes` (the body this layout was checked on).
    pub fn values(&self, bytes: &[u8], name: &str) -> Option<Vec<f32>> {
        let (q, scales) = self.0.get(name)?;
        let scales = f32_values(&bytes[scales.clone()]);
        Some(
            bytes[q.clone()]
                .iter()
                .enumerate()
                .map(|(i, &b)| f32::from(b as i8) * scales[i / BLOCK])
                .collect(),
        )
    }

    /// Every tensor read back (for a device or a test; the server folds per tensor).
    pub fn decode(&self, bytes: &[u8], specs: &[TensorSpec]) -> NamedTensors {
        NamedTensors::from_specs(specs, |s| {
            self.values(bytes, &s.name).expect("checked against these specs")
        })
    }
}

/// Little-endian f32 bytes as values (in place when aligned, as safetensors lays them out).
fn f32_values(bytes: &[u8]) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) => Cow::Borrowed(values),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FedAvgAccumulator, Tensor, fedavg::DELTA_LIMIT};

    /// A deterministic stand-in for a device's random source (xorshift).
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    fn delta() -> NamedTensors {
        let w = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
            .collect();
        NamedTensors(
            [
                (
                    "fc.weight".to_string(),
                    Tensor {
                        shape: vec![10, 100],
                        data: w,
                    },
                ),
                (
                    "fc.bias".to_string(),
                    Tensor {
                        shape: vec![3],
                        data: vec![0.0, 0.0, 0.0],
                    },
                ),
            ]
            .into(),
        )
    }

    #[test]
    fn an_int8_body_is_about_a_quarter_of_f32_and_reads_back_within_one_step() {
        let d = delta();
        let body = encode(&d, uniform(7));
        let layout = Int8Layout::check(&body, &d.specs(), DELTA_LIMIT).unwrap();
        let back = layout.decode(&body, &d.specs());
        for (name, t) in &d.0 {
            for (block, (orig, read)) in t
                .data
                .chunks(BLOCK)
                .zip(back.0[name].data.chunks(BLOCK))
                .enumerate()
            {
                let step = block_max(orig) / 127.0;
                for (a, b) in orig.iter().zip(read) {
                    assert!(
                        (a - b).abs() <= step * 1.0001,
                        "{name} block {block}: {a} read back as {b}"
                    );
                }
            }
        }
        // An all-zero tensor reads back as exact zeros.
        assert_eq!(back.0["fc.bias"].data, vec![0.0; 3]);
        // At the demo model's size (101,770 values) the header is noise: 1 + 4/256 bytes a value.
        let big = NamedTensors(
            [(
                "w".to_string(),
                Tensor {
                    shape: vec![101_770],
                    data: vec![0.25; 101_770],
                },
            )]
            .into(),
        );
        let (f32_len, int8_len) = (big.encode().len() as f64, encode(&big, uniform(1)).len() as f64);
        assert!(f32_len / int8_len > 3.9, "{int8_len} vs {f32_len}");
    }

    fn block_max(v: &[f32]) -> f32 {
        v.iter().fold(0f32, |m, x| m.max(x.abs()))
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        // A value a third of the way between two steps: the mean over many encodings converges to it,
        // where round-to-nearest would read back the lower step every time.
        let step_value = 1.0f32; // block max 127 => scale 1
        let mut data = vec![0.0f32; BLOCK];
        data[0] = 127.0 * step_value;
        data[1] = 10.0 + 1.0 / 3.0;
        let d = NamedTensors(
            [(
                "w".to_string(),
                Tensor {
                    shape: vec![BLOCK],
                    data,
                },
            )]
            .into(),
        );
        let mut rng = uniform(11);
        let draws = 20_000;
        let mut sum = 0f64;
        for _ in 0..draws {
            let body = encode(&d, &mut rng);
            let back = Int8Layout::check(&body, &d.specs(), DELTA_LIMIT)
                .unwrap()
                .decode(&body, &d.specs());
            sum += f64::from(back.0["w"].data[1]);
        }
        let mean = sum / draws as f64;
        assert!((mean - (10.0 + 1.0 / 3.0)).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn the_fold_of_an_int8_update_depends_only_on_its_bytes() {
        let d = delta();
        let body = encode(&d, uniform(3));
        let layout = Int8Layout::check(&body, &d.specs(), DELTA_LIMIT).unwrap();
        let fold = || {
            let mut acc = FedAvgAccumulator::new(&d.specs());
            acc.add_with(5, |name| Cow::Owned(layout.values(&body, name).unwrap()))
                .unwrap();
            acc
        };
        let decoded = layout.decode(&body, &d.specs());
        let mut via_f32 = FedAvgAccumulator::new(&d.specs());
        via_f32.add(5, &decoded).unwrap();
        assert_eq!(fold(), fold());
        assert_eq!(fold(), via_f32);
    }

    /// A body's tensors as owned parts, to edit and serialise again.
    type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

    #[test]
    fn bad_int8_bodies_are_refused_naming_the_problem() {
        let d = delta();
        let specs = d.specs();
        let good = encode(&d, uniform(5));
        let st = safetensors::SafeTensors::deserialize(&good).unwrap();
        let owned: Raw = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        let with = |edit: &dyn Fn(&mut Raw)| {
            let mut t = owned.clone();
            edit(&mut t);
            let views: Vec<(String, TensorView<'_>)> = t
                .iter()
                .map(|(n, (dt, sh, b))| (n.clone(), TensorView::new(*dt, sh.clone(), b).unwrap()))
                .collect();
            Int8Layout::check(&safetensors::serialize(views, None).unwrap(), &specs, DELTA_LIMIT)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            with(&|t| {
                t.remove("fc.bias:scale");
            }),
            "tensor `fc.bias:scale` is missing"
        );
        assert_eq!(
            with(&|t| {
                t.insert("extra".into(), (Dtype::I8, vec![1], vec![0]));
            }),
            "tensor `extra` is not part of this model"
        );
        // An f32 body where int8 is expected.
        assert_eq!(
            Int8Layout::check(&d.encode(), &specs, DELTA_LIMIT)
                .unwrap_err()
                .to_string(),
            "tensor `fc.bias` has dtype F32, expected I8"
        );
        let scale_of = |v: f32| {
            move |t: &mut Raw| {
                t.get_mut("fc.weight:scale").unwrap().2[..4].copy_from_slice(&v.to_le_bytes());
            }
        };
        assert_eq!(
            with(&scale_of(f32::NAN)),
            "tensor `fc.weight:scale` holds a non-finite value at index 0"
        );
        assert!(
            with(&scale_of(2.0))
                .starts_with("tensor `fc.weight:scale` holds 2 at index 0, outside the accepted range")
        );
        assert!(with(&scale_of(-0.5)).starts_with("tensor `fc.weight:scale` holds -0.5 at index 0"));
        assert_eq!(
            with(&|t| t.get_mut("fc.weight").unwrap().2[3] = 0x80),
            "tensor `fc.weight` holds -128 at index 3, outside the accepted range ±127"
        );
        assert_eq!(
            with(&|t| t.get_mut("fc.weight:scale").unwrap().1 = vec![2, 2]),
            "tensor `fc.weight:scale` has shape [2, 2], expected [4]"
        );
    }
}
