//! FedSubAvg aggregation (Ding et al., "Federated Submodel Optimization for Hot and Cold Data
//! Features", NeurIPS 2022), accumulated in fixed point.
//!
//! Rule (`ALGORITHMS.md`). Row `m` of a sparse table has heat `h_m`, the number of registered devices
//! whose feature set holds `m` (`N` = all registered devices). With `S_t` the accepted updates
//! (`K = |S_t|`):
//!
//! - paper form: `x[m] += lr * (N / h_m) * (1/K) * sum_{i in S_t, m in R_i} Delta_i[m]`, dense
//!   tensors `x += lr * (1/K) * sum_i Delta_i`;
//! - sample-weighted form: `c_m = (sum_j n_j) / (sum_{j: m in R_j} n_j)` over the population,
//!   `x[m] += lr * c_m * (sum_{i in S_t, m in R_i} n_i Delta_i[m]) / m_t`, dense as FedAvg.
//!
//! A row no accepted update touches is left as it is. Under FedAvg a selected device that does not
//! hold row `m` counts as a zero update, so a cold row learns about `h_m / N` times slower; `N / h_m`
//! undoes that. (Not "per-round submodel averaging", which divides by the selected devices touching
//! `m`.)
//!
//! Heat is read when the round is finalised. Should a device have re-enrolled without a row after its
//! update for that row was accepted, `h_m` could be smaller than the number of this round's updates
//! touching `m`; the rule then uses that number instead (those devices did hold `m`), so the
//! coefficient stays finite and never exceeds `N / 1`.
//!
//! Determinism: as in [`crate::fedavg`], each term is rounded once to a multiple of
//! `2^-FRACTION_BITS` and summed in wrapping `i64`, so the result depends only on the set of updates.
//! Memory is O(dense size + rows touched this round), whatever the table size.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    fedavg::{
        AggregateError, BadPartial, FRACTION_BITS, FedAvgAccumulator, MAX_ROUND_SAMPLES, MAX_UPDATE_SAMPLES,
    },
    sparse::{SparseRows, SparseTensors},
    tensors::{NamedTensors, TensorSpec},
};

/// Which FedSubAvg coefficient a task uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SubAvgForm {
    /// `N / h_m` with uniform `1/K` weights (the paper's analysis).
    #[default]
    Paper,
    /// Sample-weighted heat and updates (the authors' code).
    SampleWeighted,
}

/// Devices and their total samples: of the whole population, or of those holding one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Heat {
    pub devices: u64,
    pub samples: u64,
}

/// Fixed-point sums of one touched row.
#[derive(Debug, Clone, PartialEq)]
struct RowSum {
    sum: Vec<i64>,
    devices: u64,
    samples: u64,
}

/// Running sums of one FedSubAvg round.
#[derive(Debug, Clone, PartialEq)]
pub struct SubAvgAccumulator {
    form: SubAvgForm,
    /// Dense sums, weighted 1 (paper) or `n_i` (sample-weighted).
    dense: FedAvgAccumulator,
    rows: BTreeMap<String, BTreeMap<u64, RowSum>>,
    updates: u64,
    total_samples: u64,
}

fn scale() -> f64 {
    f64::from(FRACTION_BITS).exp2()
}

impl SubAvgAccumulator {
    pub fn new(form: SubAvgForm, dense: &[TensorSpec], tables: impl IntoIterator<Item = String>) -> Self {
        SubAvgAccumulator {
            form,
            dense: FedAvgAccumulator::new(dense),
            rows: tables.into_iter().map(|t| (t, BTreeMap::new())).collect(),
            updates: 0,
            total_samples: 0,
        }
    }

    /// Folds one update in. It must already have passed [`SparseTensors::decode_checked`] against
    /// the accumulator's model with `DELTA_LIMIT` (the server's upload gate does this).
    pub fn add(&mut self, num_samples: u64, update: &SparseTensors) -> Result<(), AggregateError> {
        if num_samples == 0 || num_samples > MAX_UPDATE_SAMPLES {
            return Err(AggregateError::BadSampleCount(num_samples));
        }
        if self.total_samples + num_samples > MAX_ROUND_SAMPLES {
            return Err(AggregateError::RoundSampleLimit(self.total_samples, num_samples));
        }
        let weight = match self.form {
            SubAvgForm::Paper => 1,
            SubAvgForm::SampleWeighted => num_samples,
        };
        self.dense.add(weight, &update.dense)?;
        let factor = weight as f64 * scale();
        for (table, rows) in &mut self.rows {
            let Some(carried) = update.tables.get(table) else {
                continue;
            };
            for (k, &id) in carried.ids.iter().enumerate() {
                let entry = rows.entry(id).or_insert_with(|| RowSum {
                    sum: vec![0; carried.width],
                    devices: 0,
                    samples: 0,
                });
                for (acc, &v) in entry.sum.iter_mut().zip(carried.row(k)) {
                    *acc = acc.wrapping_add((f64::from(v) * factor).round() as i64);
                }
                entry.devices += 1;
                entry.samples += num_samples;
            }
        }
        self.updates += 1;
        self.total_samples += num_samples;
        Ok(())
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    pub fn total_samples(&self) -> u64 {
        self.total_samples
    }

    /// Ids of `table`'s rows that this round touched, ascending.
    pub fn touched(&self, table: &str) -> Vec<u64> {
        self.rows
            .get(table)
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Rows touched this round, over all tables.
    pub fn touched_rows(&self) -> usize {
        self.rows.values().map(BTreeMap::len).sum()
    }

    /// Applies the dense part: `x += lr * mean Delta` (paper) or `lr * sum n_i Delta_i / m_t`.
    pub fn apply_dense(&self, dense: &mut NamedTensors, server_lr: f32) {
        self.dense.apply(dense, server_lr);
    }

    /// Applies the rule to `base`, rows of `table` that this round touched (each id must be in
    /// [`Self::touched`]); `heat[k]` is the heat of `base.ids[k]`, `population` that of all devices.
    pub fn apply_rows(
        &self,
        table: &str,
        base: &mut SparseRows,
        heat: &[Heat],
        population: Heat,
        server_lr: f32,
    ) {
        debug_assert_eq!(base.ids.len(), heat.len());
        if self.updates == 0 {
            return;
        }
        let rows = &self.rows[table];
        let width = base.width;
        for (k, (&id, h)) in base.ids.iter().zip(heat).enumerate() {
            let row = &rows[&id];
            let factor = match self.form {
                SubAvgForm::Paper => {
                    let h_m = h.devices.max(row.devices);
                    let n = population.devices.max(h_m);
                    n as f64 / h_m as f64 / self.updates as f64
                }
                SubAvgForm::SampleWeighted => {
                    let w_m = h.samples.max(row.samples);
                    let w = population.samples.max(w_m);
                    w as f64 / w_m as f64 / self.total_samples as f64
                }
            } * f64::from(server_lr)
                / scale();
            for (x, &s) in base.values[k * width..(k + 1) * width].iter_mut().zip(&row.sum) {
                *x = (f64::from(*x) + s as f64 * factor) as f32;
            }
        }
    }
}

/// First bytes of [`SubAvgAccumulator::to_bytes`]: the format and its version.
const SPARSE_PARTIAL_MAGIC: &[u8; 8] = b"FHSUBS01";

/// Reads [`SubAvgAccumulator::to_bytes`]'s little-endian fields in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadPartial> {
        if self.0.len() < n {
            return Err(BadPartial("sparse sums end early".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, BadPartial> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A count or length, bounded by what is left to read (each item takes at least `item` bytes).
    fn len(&mut self, item: usize) -> Result<usize, BadPartial> {
        let n = self.u64()?;
        if n > (self.0.len() / item.max(1)) as u64 {
            return Err(BadPartial(format!(
                "sparse sums claim {n} items beyond their end"
            )));
        }
        Ok(n as usize)
    }
}

impl SubAvgAccumulator {
    /// The sums as bytes, for another replica to merge ([`Self::merge_bytes`]): `FHSUBS01`, then
    /// u64 little-endian fields: updates, total samples, the dense sums' length and bytes
    /// ([`FedAvgAccumulator::to_bytes`]), and per table (name order) its name's length and UTF-8,
    /// its row count and each row as id, devices, samples, width and `width` i64 sums.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(SPARSE_PARTIAL_MAGIC);
        let dense = self.dense.to_bytes();
        for n in [self.updates, self.total_samples, dense.len() as u64] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&dense);
        for (table, rows) in &self.rows {
            out.extend_from_slice(&(table.len() as u64).to_le_bytes());
            out.extend_from_slice(table.as_bytes());
            out.extend_from_slice(&(rows.len() as u64).to_le_bytes());
            for (id, row) in rows {
                for n in [*id, row.devices, row.samples, row.sum.len() as u64] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
                for s in &row.sum {
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
        }
        out
    }

    /// Adds sums that another replica folded (of other updates of the same round), from
    /// [`Self::to_bytes`]'s bytes. Integer sums: merging equals folding in one place, bit for bit.
    /// On an error nothing has changed.
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Result<(), BadPartial> {
        let mut merged = self.clone();
        merged.merge_into(bytes)?;
        *self = merged;
        Ok(())
    }

    fn merge_into(&mut self, bytes: &[u8]) -> Result<(), BadPartial> {
        let mut r = Reader(bytes);
        if r.take(8)? != SPARSE_PARTIAL_MAGIC {
            return Err(BadPartial("not sparse sums (format FHSUBS01)".into()));
        }
        let (updates, total_samples) = (r.u64()?, r.u64()?);
        if self.total_samples + total_samples > MAX_ROUND_SAMPLES {
            return Err(BadPartial(format!(
                "{} + {total_samples} samples is more than a round holds",
                self.total_samples
            )));
        }
        let dense_len = r.len(1)?;
        self.dense.merge_bytes(r.take(dense_len)?)?;
        for (table, rows) in &mut self.rows {
            let name_len = r.len(1)?;
            if r.take(name_len)? != table.as_bytes() {
                return Err(BadPartial(format!("sparse sums of other tables than `{table}`")));
            }
            for _ in 0..r.len(32)? {
                let (id, devices, samples) = (r.u64()?, r.u64()?, r.u64()?);
                let width = r.len(8)?;
                let entry = rows.entry(id).or_insert_with(|| RowSum {
                    sum: vec![0; width],
                    devices: 0,
                    samples: 0,
                });
                if entry.sum.len() != width {
                    return Err(BadPartial(format!("row {id} of `{table}` has width {width}")));
                }
                for s in entry.sum.iter_mut() {
                    let more = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
                    *s = s.wrapping_add(more);
                }
                entry.devices += devices;
                entry.samples += samples;
            }
        }
        if !r.0.is_empty() {
            return Err(BadPartial(format!("{} bytes after the sparse sums", r.0.len())));
        }
        self.updates += updates;
        self.total_samples += total_samples;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::Tensor;

    #[test]
    fn sums_folded_apart_and_merged_are_the_sums_folded_in_one_place() {
        let updates = [
            (1, update(&[(0, 0.4), (1, 1.0)], 0.2)),
            (3, update(&[(0, 0.8), (2, -0.5)], 0.6)),
            (2, update(&[(2, 0.123_456_7), (5, -3.3)], -0.7)),
        ];
        for form in [SubAvgForm::Paper, SubAvgForm::SampleWeighted] {
            let new = || SubAvgAccumulator::new(form, &specs(), ["emb".to_string()]);
            let mut one = new();
            for (n, u) in &updates {
                one.add(*n, u).unwrap();
            }
            let (mut a, mut b) = (new(), new());
            a.add(updates[1].0, &updates[1].1).unwrap();
            b.add(updates[0].0, &updates[0].1).unwrap();
            b.add(updates[2].0, &updates[2].1).unwrap();
            a.merge_bytes(&b.to_bytes()).unwrap();
            assert_eq!(a, one);
            // An empty replica's sums change nothing; bad bytes are refused and change nothing.
            a.merge_bytes(&new().to_bytes()).unwrap();
            assert_eq!(a, one);
            let bytes = b.to_bytes();
            for bad in [&bytes[..bytes.len() - 1], &bytes[1..], b"FHSUBS01"] {
                assert!(a.merge_bytes(bad).is_err());
                assert_eq!(a, one);
            }
            let other = SubAvgAccumulator::new(form, &specs(), ["other".to_string()]);
            assert!(a.merge_bytes(&other.to_bytes()).is_err());
            assert_eq!(a, one);
        }
    }

    fn update(rows: &[(u64, f32)], dense: f32) -> SparseTensors {
        let mut t = SparseTensors::default();
        t.dense.0.insert(
            "b".into(),
            Tensor {
                shape: vec![1],
                data: vec![dense],
            },
        );
        let mut r = SparseRows::new(1);
        for &(id, v) in rows {
            r.push(id, &[v]);
        }
        t.tables.insert("emb".into(), r);
        t
    }

    fn specs() -> Vec<TensorSpec> {
        vec![TensorSpec {
            name: "b".into(),
            shape: vec![1],
        }]
    }

    /// Population: A (n=1) holds rows {0, 1}; B (n=3) holds {0, 2}; C (n=2) holds {0, 2}; D (n=2)
    /// holds {0}. Row 3 is held by nobody. Heat: row 0 (4 devices, 8 samples), row 1 (1, 1),
    /// row 2 (2, 5), row 3 (0, 0); N = 4, 8 samples. Round: A uploads row0 0.4, row1 1.0, dense 0.2;
    /// B uploads row0 0.8, row2 -0.5, dense 0.6.
    fn round(form: SubAvgForm) -> (SubAvgAccumulator, SparseRows, NamedTensors) {
        let mut acc = SubAvgAccumulator::new(form, &specs(), ["emb".to_string()]);
        acc.add(1, &update(&[(0, 0.4), (1, 1.0)], 0.2)).unwrap();
        acc.add(3, &update(&[(0, 0.8), (2, -0.5)], 0.6)).unwrap();
        assert_eq!(acc.touched("emb"), vec![0, 1, 2]);
        let mut base = SparseRows::new(1);
        for id in acc.touched("emb") {
            base.push(id, &[1.0]);
        }
        let heat = [
            Heat {
                devices: 4,
                samples: 8,
            },
            Heat {
                devices: 1,
                samples: 1,
            },
            Heat {
                devices: 2,
                samples: 5,
            },
        ];
        let population = Heat {
            devices: 4,
            samples: 8,
        };
        acc.apply_rows("emb", &mut base, &heat, population, 1.0);
        let mut dense = NamedTensors::zeros(&specs());
        acc.apply_dense(&mut dense, 1.0);
        (acc, base, dense)
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn paper_form_matches_hand_computation() {
        // row0: (4/4) * (1/2) * (0.4 + 0.8) = 0.6; row1 (one device): (4/1) * (1/2) * 1.0 = 2.0;
        // row2: (4/2) * (1/2) * -0.5 = -0.5; row 3 untouched; dense: (0.2 + 0.6) / 2 = 0.4.
        let (acc, rows, dense) = round(SubAvgForm::Paper);
        let want = [1.6, 3.0, 0.5];
        for (got, want) in rows.values.iter().zip(want) {
            assert!(close(*got, want), "{:?} vs {want:?}", rows.values);
        }
        assert!(close(dense.0["b"].data[0], 0.4));
        assert_eq!(acc.touched_rows(), 3);
        assert!(!acc.touched("emb").contains(&3));
    }

    #[test]
    fn sample_weighted_form_matches_hand_computation() {
        // m_t = 4. row0: (8/8) * (1*0.4 + 3*0.8) / 4 = 0.7; row1: (8/1) * 1.0 / 4 = 2.0;
        // row2: (8/5) * (3 * -0.5) / 4 = -0.6; dense: (1*0.2 + 3*0.6) / 4 = 0.5.
        let (_, rows, dense) = round(SubAvgForm::SampleWeighted);
        let want = [1.7, 3.0, 0.4];
        for (got, want) in rows.values.iter().zip(want) {
            assert!(close(*got, want), "{:?} vs {want:?}", rows.values);
        }
        assert!(close(dense.0["b"].data[0], 0.5));
    }

    #[test]
    fn heat_below_the_round_count_is_raised_to_it() {
        // Row 1 with heat 0 (its device re-enrolled without it): treated as h = 1.
        let mut acc = SubAvgAccumulator::new(SubAvgForm::Paper, &specs(), ["emb".to_string()]);
        acc.add(1, &update(&[(1, 1.0)], 0.0)).unwrap();
        let mut base = SparseRows::new(1);
        base.push(1, &[0.0]);
        acc.apply_rows(
            "emb",
            &mut base,
            &[Heat::default()],
            Heat {
                devices: 4,
                samples: 4,
            },
            1.0,
        );
        assert!(close(base.values[0], 4.0));
    }

    proptest::proptest! {
        /// The result depends only on the set of updates, never on their order.
        #[test]
        fn order_does_not_change_the_bits(
            updates in proptest::collection::vec(
                (1u64..1000, proptest::collection::btree_map(0u64..20, -10f32..10.0, 0..6), -1f32..1.0), 1..12),
            rotate in 0usize..100,
        ) {
            let run = |order: &[usize]| {
                let mut acc = SubAvgAccumulator::new(SubAvgForm::SampleWeighted, &specs(), ["emb".to_string()]);
                for &i in order {
                    let (n, rows, d) = &updates[i];
                    let rows: Vec<(u64, f32)> = rows.iter().map(|(&k, &v)| (k, v)).collect();
                    acc.add(*n, &update(&rows, *d)).unwrap();
                }
                let mut base = SparseRows::new(1);
                let ids = acc.touched("emb");
                for &id in &ids {
                    base.push(id, &[0.25]);
                }
                let heat: Vec<Heat> = ids.iter().map(|&id| Heat { devices: id + 1, samples: 50 * (id + 1) }).collect();
                acc.apply_rows("emb", &mut base, &heat, Heat { devices: 30, samples: 20_000 }, 1.0);
                base.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let forward: Vec<usize> = (0..updates.len()).collect();
            let mut shuffled = forward.clone();
            shuffled.rotate_left(rotate % updates.len());
            shuffled.reverse();
            proptest::prop_assert_eq!(run(&forward), run(&shuffled));
        }
    }
}
