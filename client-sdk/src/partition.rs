//! Splitting one dataset across simulated devices.
//!
//! Federated learning is only interesting when device data differ, so besides an IID split there
//! are the two standard label-skew schemes: Dirichlet proportions per class (Hsu et al., 2019,
//! "Measuring the Effects of Non-Identical Data Distribution") and the pathological one class per
//! device. Every function is deterministic for a seed and returns, per device, sorted sample
//! indices into the dataset.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};

use crate::data::NUM_CLASSES;

/// Smallest shard [`dirichlet`] leaves a device with (capped at `n / devices`).
pub const DIRICHLET_MIN_SAMPLES: usize = 10;

/// Shuffles `0..n` and deals it into `devices` contiguous shards whose sizes differ by at most one.
///
/// # Panics
/// If `devices` is 0.
pub fn iid(n: usize, devices: usize, seed: u64) -> Vec<Vec<usize>> {
    assert!(devices > 0, "devices must be positive");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let mut out = Vec::with_capacity(devices);
    let mut start = 0;
    for d in 0..devices {
        let size = n / devices + usize::from(d < n % devices);
        let mut shard = order[start..start + size].to_vec();
        shard.sort_unstable();
        out.push(shard);
        start += size;
    }
    out
}

/// Label skew: for each class, proportions `p ~ Dir(alpha)` over the devices split that class's
/// shuffled samples. Small `alpha` (0.1) gives devices dominated by one or two classes; large
/// `alpha` (100) approaches IID. Every index is assigned to exactly one device.
///
/// A draw can leave a device (nearly) empty, which a device cannot train on. Rather than
/// resampling until lucky (unbounded for small `alpha` and many devices), devices below
/// `min(DIRICHLET_MIN_SAMPLES, n / devices)` samples are topped up with samples moved from the
/// currently largest device. This moves at most a few samples per device and keeps the skew.
///
/// # Panics
/// If `devices` is 0 or `alpha` is not positive and finite.
pub fn dirichlet(labels: &[u8], devices: usize, alpha: f64, seed: u64) -> Vec<Vec<usize>> {
    assert!(devices > 0, "devices must be positive");
    assert!(
        alpha.is_finite() && alpha > 0.0,
        "alpha must be positive and finite, got {alpha}"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let gamma = Gamma::new(alpha, 1.0).expect("alpha was checked");
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); devices];

    for class in by_class(labels) {
        let mut class = class;
        class.shuffle(&mut rng);
        // Dir(alpha) as normalised Gamma(alpha, 1) draws.
        let draws: Vec<f64> = (0..devices).map(|_| gamma.sample(&mut rng)).collect();
        let total: f64 = draws.iter().sum();
        let mut cuts = Vec::with_capacity(devices);
        if total > 0.0 && total.is_finite() {
            let mut acc = 0.0;
            for w in &draws {
                acc += w / total;
                cuts.push(((acc * class.len() as f64).round() as usize).min(class.len()));
            }
        } else {
            // Every draw underflowed (tiny alpha): the whole class goes to one device.
            let lucky = rand::Rng::random_range(&mut rng, 0..devices);
            cuts.extend((0..devices).map(|d| if d < lucky { 0 } else { class.len() }));
        }
        if let Some(last) = cuts.last_mut() {
            *last = class.len();
        }
        let mut start = 0;
        for (d, &end) in cuts.iter().enumerate() {
            let end = end.max(start);
            out[d].extend_from_slice(&class[start..end]);
            start = end;
        }
    }

    let min = DIRICHLET_MIN_SAMPLES.min(labels.len() / devices);
    for d in 0..devices {
        while out[d].len() < min {
            let largest = (0..devices)
                .max_by_key(|&i| (out[i].len(), std::cmp::Reverse(i)))
                .expect("devices > 0");
            if out[largest].len() <= min {
                break;
            }
            let moved = out[largest].pop().expect("largest is not empty");
            out[d].push(moved);
        }
    }
    for shard in &mut out {
        shard.sort_unstable();
    }
    out
}

/// Pathological skew: device `d` holds only class `d % 10`; each class's shuffled samples are
/// split evenly among the devices holding it. With fewer than 10 devices some classes go unused.
///
/// # Panics
/// If `devices` is 0.
pub fn one_class_per_device(labels: &[u8], devices: usize, seed: u64) -> Vec<Vec<usize>> {
    assert!(devices > 0, "devices must be positive");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); devices];
    for (c, class) in by_class(labels).into_iter().enumerate() {
        let holders: Vec<usize> = (0..devices).filter(|d| d % NUM_CLASSES == c).collect();
        if holders.is_empty() {
            continue;
        }
        let mut class = class;
        class.shuffle(&mut rng);
        let k = holders.len();
        let mut start = 0;
        for (j, &d) in holders.iter().enumerate() {
            let size = class.len() / k + usize::from(j < class.len() % k);
            out[d].extend_from_slice(&class[start..start + size]);
            start += size;
        }
    }
    for shard in &mut out {
        shard.sort_unstable();
    }
    out
}

/// Sample indices per class, ascending. Labels outside `0..NUM_CLASSES` are ignored.
fn by_class(labels: &[u8]) -> Vec<Vec<usize>> {
    let mut classes = vec![Vec::new(); NUM_CLASSES];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(c) = classes.get_mut(usize::from(l)) {
            c.push(i);
        }
    }
    classes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 classes, `per_class` samples each, interleaved.
    fn labels(per_class: usize) -> Vec<u8> {
        (0..per_class * NUM_CLASSES)
            .map(|i| (i % NUM_CLASSES) as u8)
            .collect()
    }

    fn assert_exact_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..n).collect::<Vec<_>>(),
            "shards must be disjoint and cover 0..n"
        );
    }

    #[test]
    fn iid_is_balanced_disjoint_and_deterministic() {
        let parts = iid(1003, 10, 7);
        assert_exact_cover(&parts, 1003);
        assert!(parts.iter().all(|p| p.len() == 100 || p.len() == 101));
        assert_eq!(parts, iid(1003, 10, 7));
        assert_ne!(parts, iid(1003, 10, 8));
    }

    #[test]
    fn dirichlet_covers_and_is_deterministic() {
        let labels = labels(600);
        for alpha in [0.05, 0.1, 1.0, 100.0] {
            let parts = dirichlet(&labels, 50, alpha, 3);
            assert_exact_cover(&parts, labels.len());
            assert!(
                parts.iter().all(|p| p.len() >= DIRICHLET_MIN_SAMPLES),
                "alpha {alpha}"
            );
            assert_eq!(parts, dirichlet(&labels, 50, alpha, 3));
        }
    }

    /// Share of a device's samples held by its two most frequent classes, averaged over devices.
    fn top2_share(labels: &[u8], parts: &[Vec<usize>]) -> f64 {
        let shares: Vec<f64> = parts
            .iter()
            .map(|p| {
                let mut counts = [0usize; NUM_CLASSES];
                for &i in p {
                    counts[usize::from(labels[i])] += 1;
                }
                counts.sort_unstable_by(|a, b| b.cmp(a));
                (counts[0] + counts[1]) as f64 / p.len() as f64
            })
            .collect();
        shares.iter().sum::<f64>() / shares.len() as f64
    }

    #[test]
    fn dirichlet_alpha_controls_skew() {
        let labels = labels(600);
        let skewed = top2_share(&labels, &dirichlet(&labels, 20, 0.1, 1));
        let flat = top2_share(&labels, &dirichlet(&labels, 20, 100.0, 1));
        assert!(
            skewed > 0.8,
            "alpha=0.1: top-2 classes hold {skewed:.2} of a device's data"
        );
        assert!(
            flat < 0.35,
            "alpha=100: top-2 classes hold {flat:.2} (IID is 0.2)"
        );
    }

    #[test]
    fn one_class_per_device_holds_one_class() {
        let labels = labels(95);
        let parts = one_class_per_device(&labels, 20, 5);
        assert_exact_cover(&parts, labels.len());
        for (d, p) in parts.iter().enumerate() {
            assert!(!p.is_empty());
            assert!(p.iter().all(|&i| usize::from(labels[i]) == d % NUM_CLASSES));
        }
        // Class c is shared by devices c and c + 10: 95 samples split 48/47.
        assert_eq!(parts[0].len() + parts[10].len(), 95);
        assert!(parts[0].len().abs_diff(parts[10].len()) <= 1);
        assert_eq!(parts, one_class_per_device(&labels, 20, 5));
    }
}
