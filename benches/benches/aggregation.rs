//! Aggregation kernel throughput: folding one f32 update into the fixed-point FedAvg accumulator,
//! next to a plain copy of the same bytes measured in the same run.
//!
//! `cargo bench --manifest-path benches/Cargo.toml --bench aggregation` prints criterion's figures and then, per
//! size, one line `aggregation <n> params: fold X GB/s, memcpy Y GB/s, fold/memcpy = R` (bytes
//! are the update's f32 bytes, 4 per parameter). The fold reads the 4-byte value and reads and
//! writes the 8-byte sum, so it moves 20 bytes per parameter where the copy moves 8 (12 with
//! write-allocate): on memory-bound sizes the ratio is bounded by that traffic.

use std::{
    cell::Cell,
    collections::BTreeMap,
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedhive_shared::{FedAvgAccumulator, NamedTensors, Tensor};

/// Mean time per iteration over every batch criterion ran (warm-up included).
#[derive(Default)]
struct Mean {
    total: Cell<Duration>,
    iters: Cell<u64>,
}

impl Mean {
    fn add(&self, elapsed: Duration, iters: u64) {
        self.total.set(self.total.get() + elapsed);
        self.iters.set(self.iters.get() + iters);
    }

    fn bytes_per_sec(&self, bytes: usize) -> f64 {
        bytes as f64 * self.iters.get() as f64 / self.total.get().as_secs_f64()
    }
}

fn update(n: usize) -> NamedTensors {
    // Values spread over the accepted range so the rounding sees every case.
    let data = (0..n)
        .map(|i| ((i * 7919) % 20001) as f32 / 1000.0 - 10.0)
        .collect();
    let mut m = BTreeMap::new();
    m.insert("w".to_string(), Tensor { shape: vec![n], data });
    NamedTensors(m)
}

fn aggregation(c: &mut Criterion) {
    let mut ratios = Vec::new();
    for n in [1_000_000usize, 10_000_000] {
        let bytes = n * 4;
        let delta = update(n);
        let mut group = c.benchmark_group(format!("aggregation/{n}"));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.sample_size(if n > 1_000_000 { 20 } else { 50 });

        let fold = Mean::default();
        let mut acc = FedAvgAccumulator::new(&delta.specs());
        group.bench_function("fold", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    acc.add(black_box(3), black_box(&delta)).expect("within bounds");
                }
                let elapsed = start.elapsed();
                fold.add(elapsed, iters);
                elapsed
            })
        });
        black_box(&acc);

        let copy = Mean::default();
        let src = &delta.0["w"].data;
        let mut dst = vec![0f32; n];
        group.bench_function("memcpy", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    dst.copy_from_slice(black_box(src));
                    black_box(&mut dst);
                }
                let elapsed = start.elapsed();
                copy.add(elapsed, iters);
                elapsed
            })
        });
        group.finish();
        let (f, m) = (fold.bytes_per_sec(bytes), copy.bytes_per_sec(bytes));
        ratios.push(format!(
            "aggregation {n} params: fold {:.2} GB/s, memcpy {:.2} GB/s, fold/memcpy = {:.2}",
            f / 1e9,
            m / 1e9,
            f / m
        ));
    }
    for line in ratios {
        println!("{line}");
    }
}

criterion_group!(benches, aggregation);
criterion_main!(benches);
