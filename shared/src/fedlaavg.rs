//! FedLaAvg, federated latest averaging (Yan et al., "Federated Optimization under Intermittent
//! Client Availability", INFORMS Journal on Computing; arXiv 2002.07399): the server state and the
//! device's gradient sum.
//!
//! Rule (`ALGORITHMS.md`): each device `i` keeps contributing its *latest* gradient sum `G_i`, also
//! while it is away; the server steps along their average `S = (1/N) sum_i G_i`:
//! - device: `z = x`; `C` plain SGD steps `z -= gamma * s_i * grad`; uploads `G_i = (x - z) / gamma`;
//! - server: `S += (G_i_new - G_i_old) / N` for every accepted device, then `x -= gamma * S`.
//!
//! fedhive keeps `G_i_old` on the server, so a device uploads only `G_i_new` and one that lost its
//! local state cannot corrupt `S`. The server keeps `T = sum_i G_i` rather than `S`, in fixed point
//! (`2^-FRACTION_BITS`, `i64`, wrapping): replacing `G_i_old` by `G_i_new` subtracts exactly the
//! integers that were added for `G_i_old`, so `T` never drifts however many replacements it sees,
//! and it depends only on each device's latest upload, never on arrival order or restarts.
//! `S = T / N` is formed only when stepping. Bound: `|G_i| <= GRADIENT_LIMIT = 2^7` and
//! `N < 2^32` devices keep `|T| < 2^(7+24+32) = 2^63`.

use std::collections::BTreeMap;

use crate::fedavg::{DELTA_LIMIT, FRACTION_BITS};
use crate::tensors::{NamedTensors, Tensor, TensorSpec};

/// Largest accepted magnitude of any value of an uploaded gradient sum (larger is refused).
pub const GRADIENT_LIMIT: f32 = DELTA_LIMIT;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LatestAverageError {
    #[error("stored FedLaAvg sum holds {found} bytes, expected {expected} (8 per parameter)")]
    Length { expected: usize, found: usize },
    #[error("the population N must be at least 1")]
    EmptyPopulation,
}

fn to_fixed(v: f32) -> i64 {
    (f64::from(v) * f64::from(FRACTION_BITS).exp2()).round() as i64
}

/// `T = sum_i G_i` over every device's latest gradient sum, in fixed point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestAverage {
    sums: BTreeMap<String, Vec<i64>>,
}

impl LatestAverage {
    /// No device has contributed yet: `T = 0`.
    pub fn zeros(specs: &[TensorSpec]) -> Self {
        LatestAverage {
            sums: specs
                .iter()
                .map(|s| (s.name.clone(), vec![0i64; s.numel()]))
                .collect(),
        }
    }

    /// Reads `T` as [`LatestAverage::encode`] wrote it for a model with `specs`.
    pub fn decode(specs: &[TensorSpec], bytes: &[u8]) -> Result<Self, LatestAverageError> {
        let mut out = Self::zeros(specs);
        let expected = out.sums.values().map(|s| s.len() * 8).sum();
        if bytes.len() != expected {
            return Err(LatestAverageError::Length {
                expected,
                found: bytes.len(),
            });
        }
        let mut words = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")));
        for sum in out.sums.values_mut() {
            for v in sum.iter_mut() {
                *v = words.next().expect("length checked");
            }
        }
        Ok(out)
    }

    /// Little-endian `i64`s, tensor after tensor in name order.
    pub fn encode(&self) -> Vec<u8> {
        self.sums
            .values()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// Replaces one device's contribution: `T += G_new - G_old` (`G_old` is `None` for a device that
    /// never contributed). Both must match the specs `T` was made with (the server's upload gate
    /// checks them with [`GRADIENT_LIMIT`]).
    pub fn replace(&mut self, old: Option<&NamedTensors>, new: &NamedTensors) {
        for (name, sum) in &mut self.sums {
            let new = &new.0[name].data;
            debug_assert_eq!(new.len(), sum.len());
            for (acc, &v) in sum.iter_mut().zip(new) {
                *acc = acc.wrapping_add(to_fixed(v));
            }
            if let Some(old) = old {
                for (acc, &v) in sum.iter_mut().zip(&old.0[name].data) {
                    *acc = acc.wrapping_sub(to_fixed(v));
                }
            }
        }
    }

    /// `S = T / N`, the average of the latest gradient sums over a population of `N` devices.
    pub fn average(&self, population: u64) -> Result<NamedTensors, LatestAverageError> {
        let scale = self.scale(population)?;
        Ok(NamedTensors(
            self.sums
                .iter()
                .map(|(name, sum)| {
                    let data = sum.iter().map(|&t| (t as f64 * scale) as f32).collect();
                    let shape = vec![sum.len()];
                    (name.clone(), Tensor { shape, data })
                })
                .collect(),
        ))
    }

    /// The server step `x -= gamma * T / N`, computed per value in `f64` and rounded once.
    pub fn step(
        &self,
        model: &mut NamedTensors,
        gamma: f32,
        population: u64,
    ) -> Result<(), LatestAverageError> {
        let factor = f64::from(gamma) * self.scale(population)?;
        for (name, sum) in &self.sums {
            let x = &mut model.0.get_mut(name).expect("model has the sum's tensors").data;
            for (xv, &t) in x.iter_mut().zip(sum) {
                *xv = (f64::from(*xv) - t as f64 * factor) as f32;
            }
        }
        Ok(())
    }

    fn scale(&self, population: u64) -> Result<f64, LatestAverageError> {
        if population == 0 {
            return Err(LatestAverageError::EmptyPopulation);
        }
        Ok(1.0 / (population as f64 * f64::from(FRACTION_BITS).exp2()))
    }
}

/// A device's gradient sum from its local change: `G = (x - z) / gamma = -(z - x) / gamma`, where
/// `delta = z - x` came from plain SGD at step `gamma * s_i`.
pub fn gradient_sum(delta: &NamedTensors, gamma: f32) -> NamedTensors {
    let inv = -1.0 / f64::from(gamma);
    NamedTensors(
        delta
            .0
            .iter()
            .map(|(name, t)| {
                let data = t.data.iter().map(|&d| (f64::from(d) * inv) as f32).collect();
                (
                    name.clone(),
                    Tensor {
                        shape: t.shape.clone(),
                        data,
                    },
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FedAvgAccumulator;

    fn w(data: Vec<f32>) -> NamedTensors {
        let mut m = BTreeMap::new();
        m.insert(
            "w".to_string(),
            Tensor {
                shape: vec![data.len()],
                data,
            },
        );
        NamedTensors(m)
    }

    #[test]
    fn update_rule_matches_hand_computation() {
        // N = 4, gamma = 0.1, x = [1, 1].
        // Round 1: a uploads G_a = [1, -2], b uploads G_b = [0.5, 0.5] (neither had contributed):
        //   T = [1.5, -1.5], S = T/4 = [0.375, -0.375], x = [1 - 0.0375, 1 + 0.0375] = [0.9625, 1.0375].
        // Round 2: a uploads G_a' = [3, 0], replacing [1, -2]; b is away and keeps its G_b:
        //   T = [3.5, 0.5], S = [0.875, 0.125], x = [0.9625 - 0.0875, 1.0375 - 0.0125] = [0.875, 1.025].
        let mut model = w(vec![1.0, 1.0]);
        let mut t = LatestAverage::zeros(&model.specs());
        t.replace(None, &w(vec![1.0, -2.0]));
        t.replace(None, &w(vec![0.5, 0.5]));
        assert_eq!(t.average(4).unwrap(), w(vec![0.375, -0.375]));
        t.step(&mut model, 0.1, 4).unwrap();
        assert_eq!(model, w(vec![(1.0f64 - 0.0375) as f32, (1.0f64 + 0.0375) as f32]));

        t.replace(Some(&w(vec![1.0, -2.0])), &w(vec![3.0, 0.0]));
        assert_eq!(t.average(4).unwrap(), w(vec![0.875, 0.125]));
        t.step(&mut model, 0.1, 4).unwrap();
        let expected = [
            (f64::from((1.0f64 - 0.0375) as f32) - 0.0875) as f32,
            (f64::from((1.0f64 + 0.0375) as f32) - 0.0125) as f32,
        ];
        assert_eq!(model, w(expected.to_vec()));
    }

    #[test]
    fn device_gradient_sum_inverts_the_sgd_step() {
        // One SGD step z = x - gamma * g with g = [2, -4], gamma = 0.5: delta = [-1, 2], G = g.
        let g = gradient_sum(&w(vec![-1.0, 2.0]), 0.5);
        assert_eq!(g, w(vec![2.0, -4.0]));
    }

    #[test]
    fn sum_round_trips_and_refuses_wrong_lengths() {
        let specs = w(vec![0.0; 3]).specs();
        let mut t = LatestAverage::zeros(&specs);
        t.replace(None, &w(vec![1.25, -127.5, 1e-7]));
        let bytes = t.encode();
        assert_eq!(LatestAverage::decode(&specs, &bytes).unwrap(), t);
        assert_eq!(
            LatestAverage::decode(&specs, &bytes[..16]),
            Err(LatestAverageError::Length {
                expected: 24,
                found: 16
            })
        );
        assert_eq!(t.average(0), Err(LatestAverageError::EmptyPopulation));
    }

    #[test]
    fn replacing_many_times_never_drifts() {
        // A device replaces its own G 1000 times with awkward values; only the last one may remain.
        let specs = w(vec![0.0; 2]).specs();
        let mut t = LatestAverage::zeros(&specs);
        let mut old: Option<NamedTensors> = None;
        for k in 0..1000 {
            let new = w(vec![(k as f32 * 0.377).sin() * 100.0, 1.0 / (k as f32 + 3.0)]);
            t.replace(old.as_ref(), &new);
            old = Some(new);
        }
        let mut fresh = LatestAverage::zeros(&specs);
        fresh.replace(None, old.as_ref().unwrap());
        assert_eq!(t, fresh);
    }

    /// `ALGORITHMS.md`'s motivating example: device 0 (loss (x-0)^2/2) is always available, device 1
    /// (loss (x-1)^2/2) only every 5th round; the optimum of the average loss is 0.5. One local step,
    /// gamma = 0.1. FedAvg over the available devices is pulled to device 0's data and cycles around
    /// 0.08; FedLaAvg (K = 1, least recently participated first) converges to 0.5.
    #[test]
    fn two_devices_fedavg_drifts_fedlaavg_reaches_the_optimum() {
        let (gamma, optimum, centres) = (0.1f32, 0.5f32, [0.0f32, 1.0]);
        let available = |r: usize| if r.is_multiple_of(5) { vec![0, 1] } else { vec![0] };
        // One local SGD step from x on device i: delta = -gamma * (x - c_i).
        let local = |x: f32, i: usize| w(vec![-gamma * (x - centres[i])]);

        let mut fedavg = w(vec![0.0]);
        let mut fedavg_last_cycle = Vec::new();
        let mut lates = w(vec![0.0]);
        let mut t = LatestAverage::zeros(&lates.specs());
        let mut latest: [Option<NamedTensors>; 2] = [None, None];
        let mut last_round = [0usize; 2];
        for r in 1..=2000 {
            let mut acc = FedAvgAccumulator::new(&fedavg.specs());
            for i in available(r) {
                acc.add(1, &local(fedavg.0["w"].data[0], i)).unwrap();
            }
            acc.apply(&mut fedavg, 1.0);
            if r > 1995 {
                fedavg_last_cycle.push(fedavg.0["w"].data[0]);
            }

            // K = 1: the available device with the smallest R_i (ties: lower index).
            let i = *available(r).iter().min_by_key(|&&i| (last_round[i], i)).unwrap();
            let g = gradient_sum(&local(lates.0["w"].data[0], i), gamma);
            t.replace(latest[i].as_ref(), &g);
            latest[i] = Some(g);
            last_round[i] = r;
            t.step(&mut lates, gamma, 2).unwrap();
        }
        let x = lates.0["w"].data[0];
        assert!(
            (x - optimum).abs() < 1e-3,
            "FedLaAvg ended at {x}, optimum {optimum}"
        );
        for v in fedavg_last_cycle {
            assert!(
                (0.05..0.15).contains(&v),
                "FedAvg at {v}: expected its biased cycle in [0.08, 0.12]"
            );
        }
    }

    proptest::proptest! {
        /// T depends only on each device's latest upload, not on the order replacements arrive in.
        #[test]
        fn order_does_not_change_the_sum(
            uploads in proptest::collection::vec((0usize..4, proptest::collection::vec(-100f32..100.0, 3)), 1..30),
        ) {
            let specs = w(vec![0.0; 3]).specs();
            let run = |order: Vec<(usize, Vec<f32>)>| {
                let mut t = LatestAverage::zeros(&specs);
                let mut latest: BTreeMap<usize, NamedTensors> = BTreeMap::new();
                for (device, g) in order {
                    let g = w(g);
                    t.replace(latest.get(&device), &g);
                    latest.insert(device, g);
                }
                (t, latest)
            };
            let (forward, latest) = run(uploads.clone());
            // Rebuild from the final latest G_i only: the same integers.
            let mut direct = LatestAverage::zeros(&specs);
            for g in latest.values() {
                direct.replace(None, g);
            }
            proptest::prop_assert_eq!(forward, direct);
        }
    }
}
