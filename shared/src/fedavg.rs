//! FedAvg aggregation (McMahan et al., "Communication-Efficient Learning of Deep Networks from
//! Decentralized Data", AISTATS 2017), accumulated in fixed point.
//!
//! Rule (`ALGORITHMS.md`): `x_{t+1} = x_t + server_lr * sum_i (n_i / m_t) * Delta_i`, with
//! `m_t = sum_i n_i` over the updates the round accepted.
//!
//! Why fixed point: floating-point sums depend on the order of the terms, and uploads arrive in any
//! order (and again after a crash). Each term `n_i * Delta_i` is rounded once to an integer multiple
//! of `2^-FRACTION_BITS` and summed in `i64` with wrapping addition, which is associative and
//! commutative, so the round's result depends only on the *set* of accepted updates: a crash-and-restart
//! run commits a bit-identical model. Wrapping is safe because the true total is bounded: every
//! `|Delta_i| <= DELTA_LIMIT = 2^7` and `m_t <= MAX_ROUND_SAMPLES < 2^32`, so `|sum| < 2^(7+24+32) = 2^63`.
//! The same modular sums are what secure aggregation needs later.
//! Memory is O(model size): one `i64` per parameter, whatever the number of devices.

use std::{borrow::Cow, collections::BTreeMap};

use crate::tensors::{NamedTensors, TensorSpec};

/// Fractional bits of the fixed-point accumulator: resolution `2^-24 ≈ 6e-8` per sample-weighted term.
pub const FRACTION_BITS: i32 = 24;
/// Largest accepted magnitude of any update value (the stated clipping range; larger is refused).
pub const DELTA_LIMIT: f32 = 128.0;
/// Largest sample count one update may claim.
pub const MAX_UPDATE_SAMPLES: u64 = 1 << 24;
/// Largest total sample count of one round (keeps the fixed-point sum inside `i64`).
pub const MAX_ROUND_SAMPLES: u64 = (1 << 32) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error("num_samples must be between 1 and {MAX_UPDATE_SAMPLES}, got {0}")]
    BadSampleCount(u64),
    #[error("the round already holds {0} samples; adding {1} would exceed {MAX_ROUND_SAMPLES}")]
    RoundSampleLimit(u64, u64),
}

/// Partial sums (from [`FedAvgAccumulator::to_bytes`] or another accumulator) that cannot be merged
/// into this one: other tensors, a damaged blob, or more samples than a round may hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partial sums do not match this accumulator: {0}")]
pub struct BadPartial(pub String);

/// First bytes of [`FedAvgAccumulator::to_bytes`]: the format and its version.
const PARTIAL_MAGIC: &[u8; 8] = b"FHSUMS01";

/// A sample count one update (or one device's report) may claim: 1 to [`MAX_UPDATE_SAMPLES`].
pub fn check_sample_count(num_samples: u64) -> Result<(), AggregateError> {
    if num_samples == 0 || num_samples > MAX_UPDATE_SAMPLES {
        return Err(AggregateError::BadSampleCount(num_samples));
    }
    Ok(())
}

/// Up to this many samples per update, `|Delta * n * 2^FRACTION_BITS| <= 2^51 - 2^31` for every
/// accepted value (`|Delta| <= 2^7`), inside the range where [`fold::many`] is exact.
const FAST_FOLD_MAX_SAMPLES: u64 = (1 << (51 - FRACTION_BITS - 7)) - 1;

/// `sum[i] += round(values[i] * scale)`, rounding half away from zero (`f64::round`): the
/// aggregation kernel. The `round` call is a libm call per element on baseline x86-64, which keeps
/// the loop scalar at ~6% of memory-copy bandwidth; [`many`] gets the same integers with adds and
/// compares that vectorise.
mod fold {
    /// `1.5 * 2^52`: for `|y| < 2^51 - 1`, `y + MAGIC` lands in `[2^52, 2^53)`, where the spacing of
    /// f64 is 1, so the addition rounds `y` to an integer (ties to even) held in the low mantissa
    /// bits; subtracting `MAGIC`'s bits reads it out.
    const MAGIC: f64 = 6_755_399_441_055_744.0;

    /// Reference kernel, any range.
    pub fn exact(sum: &mut [i64], values: &[f32], scale: f64) {
        for (acc, &v) in sum.iter_mut().zip(values) {
            *acc = acc.wrapping_add((f64::from(v) * scale).round() as i64);
        }
    }

    /// [`many`] for one update.
    #[cfg(test)]
    pub fn fast(sum: &mut [i64], values: &[f32], scale: f64) {
        many(sum, &[(values, scale)])
    }

    /// Sums this long (2 KiB) stay in the L1 cache while every update of a batch adds to them; the
    /// best of 256 to 32,768 on the machine of the figures in `docs/benchmarks.md`.
    const TILE: usize = 256;

    /// [`exact`] for each `(values, scale)` in turn, with the same result when every
    /// `|values[i] * scale| < 2^51 - 1`, in one pass over `sum`: a tile of the sums is read and
    /// written once per batch instead of once per update, so a batch of k updates moves
    /// `4 + 16 / k` bytes per parameter and update instead of 20. Each sum receives the same
    /// integers as one update at a time, and integer addition is associative: the bits are the
    /// same. Uses AVX-512 or AVX2 when the CPU has them (the same IEEE operations on wider
    /// vectors, so the same bits), else the portable loop.
    pub fn many(sum: &mut [i64], updates: &[(&[f32], f64)]) {
        if updates.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the CPU supports these features, checked just above.
                return unsafe { many_avx512(sum, updates) };
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { many_avx2(sum, updates) };
            }
        }
        many_portable(sum, updates)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    fn many_avx512(sum: &mut [i64], updates: &[(&[f32], f64)]) {
        many_portable(sum, updates)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn many_avx2(sum: &mut [i64], updates: &[(&[f32], f64)]) {
        many_portable(sum, updates)
    }

    #[inline(always)]
    fn many_portable(sum: &mut [i64], updates: &[(&[f32], f64)]) {
        if let [(values, scale)] = updates {
            return fast_portable(sum, values, *scale);
        }
        for (t, tile) in sum.chunks_mut(TILE).enumerate() {
            let at = t * TILE;
            for (values, _) in updates {
                prefetch(
                    values
                        .get(at + TILE..values.len().min(at + 2 * TILE))
                        .unwrap_or_default(),
                );
            }
            for (values, scale) in updates {
                fast_portable(tile, &values[at..at + tile.len()], *scale);
            }
        }
    }

    /// Asks for `values` in the L2 cache ahead of their use. A batch reads one stream per update,
    /// more than the hardware prefetcher follows well: without it a batch of 8 ran at 0.53-0.60 of
    /// memcpy at 10M parameters, with it 0.62-0.68 (2026-12-07, `docs/benchmarks.md`).
    #[inline(always)]
    fn prefetch(values: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        for line in values.chunks(16) {
            use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
            // SAFETY: SSE is part of x86-64's baseline, and a prefetch reads nothing (it is a hint).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = values;
    }

    #[inline(always)]
    fn fast_portable(sum: &mut [i64], values: &[f32], scale: f64) {
        for (acc, &v) in sum.iter_mut().zip(values) {
            let y = f64::from(v) * scale;
            let m = y + MAGIC;
            // Exact: `y` minus its ties-to-even rounding, in [-0.5, 0.5].
            let d = y - (m - MAGIC);
            // A tie that went toward zero moves one step away from it, as `f64::round` does.
            let up = i64::from((d == 0.5) & (y > 0.0));
            let down = i64::from((d == -0.5) & (y < 0.0));
            let rounded = (m.to_bits() as i64 - MAGIC.to_bits() as i64) + up - down;
            *acc = acc.wrapping_add(rounded);
        }
    }
}

/// Running sums `sum_i n_i * Delta_i` (fixed point) and `sum_i n_i` of one round.
#[derive(Debug, Clone, PartialEq)]
pub struct FedAvgAccumulator {
    sums: BTreeMap<String, Vec<i64>>,
    total_samples: u64,
    updates: u64,
}

impl FedAvgAccumulator {
    pub fn new(specs: &[TensorSpec]) -> Self {
        let sums = specs
            .iter()
            .map(|s| (s.name.clone(), vec![0i64; s.numel()]))
            .collect();
        FedAvgAccumulator {
            sums,
            total_samples: 0,
            updates: 0,
        }
    }

    /// Folds one update in. `delta` must already have passed [`NamedTensors::check`] against the
    /// accumulator's specs with `DELTA_LIMIT` (the server's upload gate does this).
    pub fn add(&mut self, num_samples: u64, delta: &NamedTensors) -> Result<(), AggregateError> {
        self.add_with(num_samples, |name| Cow::Borrowed(&delta.0[name].data))
    }

    /// [`FedAvgAccumulator::add`] with the update's values given per tensor name (e.g. read in
    /// place from a checked upload body, see [`crate::TensorLayout`]); every accumulator tensor
    /// must have its values, of its length.
    pub fn add_with<'a>(
        &mut self,
        num_samples: u64,
        values_of: impl Fn(&str) -> Cow<'a, [f32]>,
    ) -> Result<(), AggregateError> {
        let [result] = self
            .add_many(&[num_samples], |_, name| values_of(name))
            .try_into()
            .expect("one result per update");
        result
    }

    /// Folds a batch of updates in one pass over the sums (see [`fold::many`]): update `i` claims
    /// `num_samples[i]` and has the values `values_of(i, name)`. Each update is taken or refused
    /// as [`FedAvgAccumulator::add`] would in that order (a refused one changes nothing), and the
    /// sums equal those of adding the taken ones one by one.
    pub fn add_many<'a>(
        &mut self,
        num_samples: &[u64],
        values_of: impl Fn(usize, &str) -> Cow<'a, [f32]>,
    ) -> Vec<Result<(), AggregateError>> {
        let mut total = self.total_samples;
        let results: Vec<_> = num_samples
            .iter()
            .map(|&n| {
                check_sample_count(n)?;
                if total + n > MAX_ROUND_SAMPLES {
                    return Err(AggregateError::RoundSampleLimit(total, n));
                }
                total += n;
                Ok(())
            })
            .collect();
        let taken: Vec<(usize, f64)> = (num_samples.iter().zip(&results).enumerate())
            .filter(|(_, (_, r))| r.is_ok())
            .map(|(i, (&n, _))| (i, n as f64 * f64::from(FRACTION_BITS).exp2()))
            .collect();
        for (name, sum) in &mut self.sums {
            let values: Vec<(Cow<'a, [f32]>, f64)> = taken
                .iter()
                .map(|&(i, scale)| (values_of(i, name), scale))
                .collect();
            let mut batch = Vec::with_capacity(values.len());
            for ((values, scale), &(i, _)) in values.iter().zip(&taken) {
                assert_eq!(
                    values.len(),
                    sum.len(),
                    "tensor `{name}` has the accumulator's length"
                );
                if num_samples[i] <= FAST_FOLD_MAX_SAMPLES {
                    batch.push((&values[..], *scale));
                } else {
                    fold::exact(sum, values, *scale);
                }
            }
            fold::many(sum, &batch);
        }
        self.total_samples = total;
        self.updates += taken.len() as u64;
        results
    }

    pub fn total_samples(&self) -> u64 {
        self.total_samples
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Adds another accumulator's sums (of other updates, over the same tensors) to these: integer
    /// sums are associative, so sums folded apart and merged equal the sums folded in one place.
    pub fn merge(&mut self, other: &FedAvgAccumulator) -> Result<(), BadPartial> {
        let same_tensors = self.sums.len() == other.sums.len()
            && self
                .sums
                .iter()
                .zip(&other.sums)
                .all(|((a, x), (b, y))| a == b && x.len() == y.len());
        if !same_tensors {
            return Err(BadPartial("other tensors".into()));
        }
        if self.total_samples + other.total_samples > MAX_ROUND_SAMPLES {
            return Err(BadPartial(format!(
                "{} + {} samples is more than a round holds",
                self.total_samples, other.total_samples
            )));
        }
        for (sum, more) in self.sums.values_mut().zip(other.sums.values()) {
            for (s, m) in sum.iter_mut().zip(more) {
                *s = s.wrapping_add(*m);
            }
        }
        self.total_samples += other.total_samples;
        self.updates += other.updates;
        Ok(())
    }

    /// The sums as bytes, to hand them to another process: `FHSUMS01`, then `total_samples` and
    /// `updates` (u64), then each tensor's sums in name order (i64), all little-endian. The tensor
    /// names and lengths are not stored: [`FedAvgAccumulator::from_bytes`] takes them from the specs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let numel: usize = self.sums.values().map(Vec::len).sum();
        let mut out = Vec::with_capacity(24 + numel * 8);
        out.extend_from_slice(PARTIAL_MAGIC);
        out.extend_from_slice(&self.total_samples.to_le_bytes());
        out.extend_from_slice(&self.updates.to_le_bytes());
        for sum in self.sums.values() {
            for s in sum {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
        out
    }

    /// Reads [`FedAvgAccumulator::to_bytes`]'s bytes back, for tensors of `specs`.
    pub fn from_bytes(specs: &[TensorSpec], bytes: &[u8]) -> Result<Self, BadPartial> {
        let mut acc = FedAvgAccumulator::new(specs);
        acc.merge_bytes(bytes)?;
        Ok(acc)
    }

    /// [`FedAvgAccumulator::merge`] of the sums in `bytes` ([`FedAvgAccumulator::to_bytes`]'s), read
    /// in place; on an error nothing has changed.
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Result<(), BadPartial> {
        let numel: usize = self.sums.values().map(Vec::len).sum();
        if bytes.len() != 24 + numel * 8 || &bytes[..8] != PARTIAL_MAGIC {
            return Err(BadPartial(format!(
                "{} bytes, expected {} in format {}",
                bytes.len(),
                24 + numel * 8,
                String::from_utf8_lossy(PARTIAL_MAGIC)
            )));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (total_samples, updates) = (u64_at(8), u64_at(16));
        if self.total_samples + total_samples > MAX_ROUND_SAMPLES {
            return Err(BadPartial(format!(
                "{} + {total_samples} samples is more than a round holds",
                self.total_samples
            )));
        }
        let mut values = bytes[24..]
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")));
        for sum in self.sums.values_mut() {
            for s in sum.iter_mut() {
                *s = s.wrapping_add(values.next().expect("the length was checked"));
            }
        }
        self.total_samples += total_samples;
        self.updates += updates;
        Ok(())
    }

    /// Sample-weighted mean `sum_i n_i v_i / m_t` of the tensor `name` over the round's updates
    /// (e.g. losses the devices reported inside their uploads); `None` for an empty round or an
    /// unknown name. A function of the accepted set only, like the sums.
    pub fn mean(&self, name: &str) -> Option<Vec<f64>> {
        let sum = self.sums.get(name)?;
        if self.total_samples == 0 {
            return None;
        }
        let factor = 1.0 / (self.total_samples as f64 * f64::from(FRACTION_BITS).exp2());
        Some(sum.iter().map(|&s| s as f64 * factor).collect())
    }

    /// Applies the round to `model`: `x += server_lr * (sum n_i Delta_i) / m_t`. A round with no
    /// updates leaves the model unchanged.
    pub fn apply(&self, model: &mut NamedTensors, server_lr: f32) {
        if self.total_samples == 0 {
            return;
        }
        let factor = f64::from(server_lr) / (self.total_samples as f64 * f64::from(FRACTION_BITS).exp2());
        for (name, sum) in &self.sums {
            let x = &mut model
                .0
                .get_mut(name)
                .expect("model has the accumulator's tensors")
                .data;
            for (xv, &s) in x.iter_mut().zip(sum) {
                *xv = (f64::from(*xv) + s as f64 * factor) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::Tensor;

    fn one(name: &str, data: Vec<f32>) -> NamedTensors {
        let mut m = BTreeMap::new();
        m.insert(
            name.to_string(),
            Tensor {
                shape: vec![data.len()],
                data,
            },
        );
        NamedTensors(m)
    }

    #[test]
    fn values_in_place_fold_like_decoded_ones() {
        let a = one("w", vec![0.5, -1.0, 3.25]);
        let bytes = a.encode();
        let layout = crate::TensorLayout::check(&bytes, &a.specs(), DELTA_LIMIT).unwrap();
        let mut decoded = FedAvgAccumulator::new(&a.specs());
        decoded.add(3, &a).unwrap();
        let mut in_place = FedAvgAccumulator::new(&a.specs());
        in_place
            .add_with(3, |name| layout.values(&bytes, name).unwrap())
            .unwrap();
        assert_eq!(in_place, decoded);
        assert_eq!(in_place.total_samples(), 3);
    }

    #[test]
    fn partial_sums_merged_equal_one_accumulator() {
        let updates = [
            (1, vec![0.5, -1.0, 3.0]),
            (3, vec![1.5, 1.0, -0.25]),
            (7, vec![-2.0, 0.125, 9.0]),
        ];
        let specs = one("w", vec![0.0; 3]).specs();
        let mut whole = FedAvgAccumulator::new(&specs);
        for (n, d) in &updates {
            whole.add(*n, &one("w", d.clone())).unwrap();
        }
        // Two replicas fold the updates between them; one hands its sums over as bytes.
        let (mut a, mut b) = (FedAvgAccumulator::new(&specs), FedAvgAccumulator::new(&specs));
        a.add(updates[1].0, &one("w", updates[1].1.clone())).unwrap();
        for (n, d) in [&updates[0], &updates[2]] {
            b.add(*n, &one("w", d.clone())).unwrap();
        }
        let b = FedAvgAccumulator::from_bytes(&specs, &b.to_bytes()).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a, whole);
        assert_eq!((a.total_samples(), a.updates()), (11, 3));
    }

    #[test]
    fn partial_sums_of_other_tensors_are_refused() {
        let specs = one("w", vec![0.0; 3]).specs();
        let acc = FedAvgAccumulator::new(&specs);
        let bytes = acc.to_bytes();
        let other = one("w", vec![0.0; 4]).specs();
        assert!(FedAvgAccumulator::from_bytes(&other, &bytes).is_err());
        assert!(FedAvgAccumulator::from_bytes(&specs, &bytes[..20]).is_err());
        let mut wrong = FedAvgAccumulator::new(&other);
        assert!(wrong.merge(&acc).is_err());
    }

    #[test]
    fn weighted_average_matches_hand_computation() {
        // x = [1, 2]; device a: n=1, delta=[0.5, -1]; device b: n=3, delta=[1.5, 1].
        // sum n*delta = [0.5 + 4.5, -1 + 3] = [5, 2]; m = 4; x' = [1 + 5/4, 2 + 2/4] = [2.25, 2.5].
        let mut model = one("w", vec![1.0, 2.0]);
        let mut acc = FedAvgAccumulator::new(&model.specs());
        acc.add(1, &one("w", vec![0.5, -1.0])).unwrap();
        acc.add(3, &one("w", vec![1.5, 1.0])).unwrap();
        assert_eq!(acc.total_samples(), 4);
        acc.apply(&mut model, 1.0);
        assert_eq!(model.0["w"].data, vec![2.25, 2.5]);
    }

    #[test]
    fn server_lr_scales_the_step() {
        // Same updates, server_lr = 2: x' = [1 + 2*1.25, 2 + 2*0.5] = [3.5, 3].
        let mut model = one("w", vec![1.0, 2.0]);
        let mut acc = FedAvgAccumulator::new(&model.specs());
        acc.add(1, &one("w", vec![0.5, -1.0])).unwrap();
        acc.add(3, &one("w", vec![1.5, 1.0])).unwrap();
        acc.apply(&mut model, 2.0);
        assert_eq!(model.0["w"].data, vec![3.5, 3.0]);
    }

    #[test]
    fn mean_is_sample_weighted() {
        // n=1 reports 1.0, n=3 reports 2.0: (1 + 6) / 4 = 1.75.
        let mut acc = FedAvgAccumulator::new(&one("loss", vec![0.0]).specs());
        assert_eq!(acc.mean("loss"), None, "no updates, no mean");
        acc.add(1, &one("loss", vec![1.0])).unwrap();
        acc.add(3, &one("loss", vec![2.0])).unwrap();
        assert_eq!(acc.mean("loss"), Some(vec![1.75]));
        assert_eq!(acc.mean("other"), None);
    }

    #[test]
    fn empty_round_leaves_model_unchanged() {
        let mut model = one("w", vec![1.0, 2.0]);
        FedAvgAccumulator::new(&model.specs()).apply(&mut model, 1.0);
        assert_eq!(model.0["w"].data, vec![1.0, 2.0]);
    }

    #[test]
    fn sample_counts_are_bounded() {
        let model = one("w", vec![0.0]);
        let mut acc = FedAvgAccumulator::new(&model.specs());
        assert_eq!(acc.add(0, &model), Err(AggregateError::BadSampleCount(0)));
        assert!(acc.add(MAX_UPDATE_SAMPLES + 1, &model).is_err());
        assert_eq!(acc.updates(), 0);
    }

    #[test]
    fn extreme_values_within_limit_do_not_overflow() {
        // 300 updates of the largest count and value: the fixed-point sum must stay exact.
        let model = one("w", vec![0.0]);
        let mut acc = FedAvgAccumulator::new(&model.specs());
        for _ in 0..255 {
            acc.add(MAX_UPDATE_SAMPLES, &one("w", vec![-DELTA_LIMIT]))
                .unwrap();
        }
        let mut out = model.clone();
        acc.apply(&mut out, 1.0);
        assert_eq!(out.0["w"].data, vec![-DELTA_LIMIT]);
    }

    #[test]
    fn fast_fold_rounds_exactly_like_f64_round() {
        // Ties both ways, values next to ties, zeros, and the ends of the fast range.
        let mut values = vec![0.5f32, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0, -0.0, 3.0, 1e-30];
        values.extend([0.49999997f32, -0.49999997, 0.50000006, -0.50000006, 1e-8, -1e-8]);
        values.extend([DELTA_LIMIT, -DELTA_LIMIT, 127.99999, -127.99999]);
        for scale in [
            1.0,
            3.0,
            0.5,
            f64::from(FRACTION_BITS).exp2(),
            (FAST_FOLD_MAX_SAMPLES as f64) * 2f64.powi(24),
        ] {
            let mut exact = vec![7i64; values.len()];
            let mut fast = exact.clone();
            fold::exact(&mut exact, &values, scale);
            fold::fast(&mut fast, &values, scale);
            assert_eq!(fast, exact, "scale {scale}");
        }
    }

    /// Two tensors longer than a tile, values spread over the whole accepted range.
    fn spread(seed: u32, len: usize) -> NamedTensors {
        let value = |i: usize| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x % 25_601) as f32 / 100.0 - 128.0
        };
        let mut m = BTreeMap::new();
        for (name, n) in [("a", len), ("b", len / 3 + 1)] {
            let data = (0..n).map(value).collect();
            m.insert(name.to_string(), Tensor { shape: vec![n], data });
        }
        NamedTensors(m)
    }

    #[test]
    fn a_batch_sums_like_updates_added_one_by_one() {
        let updates: Vec<NamedTensors> = (0..7).map(|k| spread(k, 3 * 2048 + 5)).collect();
        // Counts on both sides of the fast kernel's limit, one refused, one past the round's limit.
        let counts = [
            3,
            FAST_FOLD_MAX_SAMPLES,
            0,
            FAST_FOLD_MAX_SAMPLES + 1,
            MAX_UPDATE_SAMPLES,
            1,
            7,
        ];
        let specs = updates[0].specs();
        let mut batched = FedAvgAccumulator::new(&specs);
        batched.total_samples = MAX_ROUND_SAMPLES - MAX_UPDATE_SAMPLES - FAST_FOLD_MAX_SAMPLES - 20;
        let mut single = batched.clone();
        let results = batched.add_many(&counts, |i, name| Cow::Borrowed(&updates[i].0[name].data));
        let one_by_one: Vec<_> = counts
            .iter()
            .zip(&updates)
            .map(|(&n, u)| single.add(n, u))
            .collect();
        assert_eq!(results, one_by_one);
        assert!(results[2].is_err() && results[4].is_err(), "{results:?}");
        assert_eq!(batched, single);
        assert_eq!(batched.updates(), 5);
    }

    proptest::proptest! {
        /// Any batch, in any split, sums to the same bits as one update at a time.
        #[test]
        fn batches_of_any_size_give_the_same_bits(
            counts in proptest::collection::vec(1u64..=FAST_FOLD_MAX_SAMPLES, 1..12),
            len in 1usize..5000,
            split in 0usize..12,
        ) {
            let updates: Vec<NamedTensors> = (0..counts.len()).map(|k| spread(k as u32, len)).collect();
            let mut single = FedAvgAccumulator::new(&updates[0].specs());
            let mut batched = single.clone();
            for (n, u) in counts.iter().zip(&updates) {
                single.add(*n, u).unwrap();
            }
            let split = split.min(counts.len());
            for range in [0..split, split..counts.len()] {
                let results = batched.add_many(&counts[range.clone()], |i, name| {
                    Cow::Borrowed(&updates[range.start + i].0[name].data)
                });
                proptest::prop_assert!(results.iter().all(Result::is_ok));
            }
            proptest::prop_assert_eq!(batched, single);
        }

        #[test]
        fn fast_fold_matches_the_reference(
            values in proptest::collection::vec(-DELTA_LIMIT..=DELTA_LIMIT, 1..300),
            n in 1u64..=FAST_FOLD_MAX_SAMPLES,
        ) {
            let scale = n as f64 * f64::from(FRACTION_BITS).exp2();
            let mut exact = vec![0i64; values.len()];
            let mut fast = exact.clone();
            fold::exact(&mut exact, &values, scale);
            fold::fast(&mut fast, &values, scale);
            proptest::prop_assert_eq!(fast, exact);
        }

        /// The result depends only on the set of updates, never on their order.
        #[test]
        fn order_does_not_change_the_bits(
            updates in proptest::collection::vec(
                (1u64..10_000, proptest::collection::vec(-10f32..10.0, 4)), 1..20),
            seed in 0usize..1000,
        ) {
            let base = one("w", vec![0.1, -0.2, 0.3, 1e-3]);
            let run = |order: &[usize]| {
                let mut acc = FedAvgAccumulator::new(&base.specs());
                for &i in order {
                    acc.add(updates[i].0, &one("w", updates[i].1.clone())).unwrap();
                }
                let mut m = base.clone();
                acc.apply(&mut m, 1.0);
                m.0["w"].data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let forward: Vec<usize> = (0..updates.len()).collect();
            let mut shuffled = forward.clone();
            shuffled.rotate_left(seed % updates.len());
            shuffled.reverse();
            proptest::prop_assert_eq!(run(&forward), run(&shuffled));
        }

        /// Fixed point stays within its resolution of the exact f64 weighted average.
        #[test]
        fn close_to_exact_average(
            updates in proptest::collection::vec((1u64..1000, -100f32..100.0), 1..50),
        ) {
            let base = one("w", vec![0.0]);
            let mut acc = FedAvgAccumulator::new(&base.specs());
            let (mut num, mut den) = (0f64, 0f64);
            for (n, d) in &updates {
                acc.add(*n, &one("w", vec![*d])).unwrap();
                num += *n as f64 * f64::from(*d);
                den += *n as f64;
            }
            let mut m = base.clone();
            acc.apply(&mut m, 1.0);
            let exact = num / den;
            proptest::prop_assert!((f64::from(m.0["w"].data[0]) - exact).abs() <= 1e-5 * exact.abs().max(1.0));
        }
    }
}
