//! DC-CCL's fusion rule (Ding et al., "DC-CCL: Device-Cloud Collaborative Controlled Learning for
//! Large Vision Models", arXiv 2303.10361; `ALGORITHMS.md`, "DC-CCL").
//!
//! Each round the cloud worker trains one copy of the co-model `F_s` on cloud data and the devices
//! train theirs on private data, all from the round's `F_s`; the next `F_s` is
//!
//! `F_s_new = w * F_s_cloud + (1 - w) * (sum_i n_i F_s_i / sum_i n_i)`.
//!
//! Everyone starts from the same `F_s`, so with deltas `D = F_s_trained - F_s` this is
//! `F_s_new = F_s + w * D_cloud + (1 - w) * (sum_i n_i D_i / sum_i n_i)`: the devices' part is
//! FedAvg's fixed-point accumulator (order-independent, see [`crate::fedavg`]) and the cloud's delta
//! is rounded to the same fixed point, so the result depends only on the accepted set. Both terms
//! are added to `F_s` in one `f64` expression per value and rounded to `f32` once.

use crate::{FedAvgAccumulator, NamedTensors};

/// `base += w * cloud_mean + (1 - w) * device_mean`. With `cloud` = `None` (a round committed
/// without the cloud's contribution) the devices' mean alone is applied (`w = 0`); with no device
/// updates the cloud's alone (`w = 1`).
pub fn fuse(
    base: &mut NamedTensors,
    devices: &FedAvgAccumulator,
    cloud: Option<&FedAvgAccumulator>,
    cloud_weight: f32,
) {
    let has_devices = devices.total_samples() > 0;
    let cloud = cloud.filter(|c| c.total_samples() > 0);
    let w = match (cloud.is_some(), has_devices) {
        (true, true) => f64::from(cloud_weight),
        (true, false) => 1.0,
        (false, _) => 0.0,
    };
    for (name, x) in base.0.iter_mut() {
        let device_mean = devices.mean(name);
        let cloud_mean = cloud.and_then(|c| c.mean(name));
        for (i, xv) in x.data.iter_mut().enumerate() {
            let d = device_mean.as_ref().map_or(0.0, |m| m[i]);
            let c = cloud_mean.as_ref().map_or(0.0, |m| m[i]);
            *xv = (f64::from(*xv) + w * c + (1.0 - w) * d) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Tensor;

    fn tensors(data: Vec<f32>) -> NamedTensors {
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

    fn sums(updates: &[(u64, Vec<f32>)]) -> FedAvgAccumulator {
        let mut acc = FedAvgAccumulator::new(&tensors(vec![0.0, 0.0]).specs());
        for (n, d) in updates {
            acc.add(*n, &tensors(d.clone())).unwrap();
        }
        acc
    }

    /// By hand: device mean = ((1 * 0.5 + 3 * 0.25) / 4, (1 * -1 + 3 * 1) / 4) = (0.3125, 0.5);
    /// cloud delta (1, -2); w = 0.5: F_s = (1 + 0.5 + 0.15625, 2 - 1 + 0.25) = (1.65625, 1.25).
    #[test]
    fn fuses_by_the_hand_computed_example() {
        let devices = sums(&[(1, vec![0.5, -1.0]), (3, vec![0.25, 1.0])]);
        let cloud = sums(&[(1, vec![1.0, -2.0])]);
        let mut model = tensors(vec![1.0, 2.0]);
        fuse(&mut model, &devices, Some(&cloud), 0.5);
        assert_eq!(model.0["w"].data, vec![1.65625, 1.25]);

        // w = 0.25 weighs the devices three times the cloud.
        let mut model = tensors(vec![1.0, 2.0]);
        fuse(&mut model, &devices, Some(&cloud), 0.25);
        assert_eq!(model.0["w"].data, vec![1.0 + 0.25 + 0.234375, 2.0 - 0.5 + 0.375]);
    }

    #[test]
    fn a_missing_side_gets_no_weight() {
        let devices = sums(&[(2, vec![0.5, -1.0])]);
        let cloud = sums(&[(1, vec![1.0, -2.0])]);
        let mut model = tensors(vec![1.0, 2.0]);
        fuse(&mut model, &devices, None, 0.5);
        assert_eq!(model.0["w"].data, vec![1.5, 1.0]);
        let mut model = tensors(vec![1.0, 2.0]);
        fuse(&mut model, &sums(&[]), Some(&cloud), 0.5);
        assert_eq!(model.0["w"].data, vec![2.0, 0.0]);
    }

    proptest::proptest! {
        /// The fused model depends only on the set of device updates, never on their order.
        #[test]
        fn depends_only_on_the_set_of_device_updates(
            updates in proptest::collection::vec(
                (1u64..10_000, proptest::collection::vec(-10f32..10.0, 2)), 1..20),
            cloud in proptest::collection::vec(-10f32..10.0, 2),
            w in 0f32..=1.0,
            seed in 0usize..1000,
        ) {
            let cloud = sums(&[(1, cloud)]);
            let run = |order: &[usize]| {
                let picked: Vec<_> = order.iter().map(|&i| updates[i].clone()).collect();
                let mut model = tensors(vec![0.1, -0.2]);
                fuse(&mut model, &sums(&picked), Some(&cloud), w);
                model.0["w"].data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let forward: Vec<usize> = (0..updates.len()).collect();
            let mut shuffled = forward.clone();
            shuffled.rotate_left(seed % updates.len());
            shuffled.reverse();
            proptest::prop_assert_eq!(run(&forward), run(&shuffled));
        }
    }
}
