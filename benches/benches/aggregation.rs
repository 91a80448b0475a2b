//! Aggregation kernel throughput: folding f32 updates into the fixed-point FedAvg accumulator, one
//! at a time and eight per pass, next to a plain copy of the same bytes measured in the same run.
//!
//! `cargo bench --manifest-path benches/Cargo.toml --bench aggregation` prints criterion's figures
//! and then, per size, one line `aggregation <n> params: fold X GB/s, memcpy Y GB/s, fold/memcpy = R;
//! fold 8 per pass Z GB/s, memcpy of the 8 W GB/s, fold 8 per pass/memcpy = S` (bytes are the
//! updates' f32 bytes, 4 per parameter; each ratio against a copy of the same bytes). One fold
//! reads the 4-byte value and reads and writes the 8-byte sum, 20 bytes per parameter where the
//! copy moves 8 (12 with write-allocate); eight per pass move 4 + 16 / 8.

use std::{
    borrow::Cow,
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

/// Updates folded per pass in the batched measurement.
const BATCH: usize = 8;

fn update(n: usize, k: usize) -> NamedTensors {
    // Values spread over the accepted range so the rounding sees every case.
    let data = (0..n)
        .map(|i| ((i * 7919 + k * 104_729) % 20001) as f32 / 1000.0 - 10.0)
        .collect();
    let mut m = BTreeMap::new();
    m.insert("w".to_string(), Tensor { shape: vec![n], data });
    NamedTensors(m)
}

fn aggregation(c: &mut Criterion) {
    let mut ratios = Vec::new();
    for n in [1_000_000usize, 10_000_000] {
        let bytes = n * 4;
        let delta = update(n, 0);
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

        let batch: Vec<NamedTensors> = (0..BATCH).map(|k| update(n, k)).collect();
        let counts: Vec<u64> = (1..=BATCH as u64).collect();
        let fold_batch = Mean::default();
        let mut acc = FedAvgAccumulator::new(&delta.specs());
        group.throughput(Throughput::Bytes((bytes * BATCH) as u64));
        group.bench_function("fold 8 per pass", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let results = acc.add_many(black_box(&counts), |i, name| {
                        Cow::Borrowed(&batch[i].0[name].data)
                    });
                    assert!(results.iter().all(Result::is_ok), "within bounds");
                }
                let elapsed = start.elapsed();
                fold_batch.add(elapsed, iters);
                elapsed
            })
        });
        black_box(&acc);
        group.throughput(Throughput::Bytes(bytes as u64));

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

        // The batch's own bytes copied, update by update: at 10M parameters the eight updates
        // (320 MB) come from DRAM where one update's copy above may stay in a large cache.
        let copy_batch = Mean::default();
        group.throughput(Throughput::Bytes((bytes * BATCH) as u64));
        group.bench_function("memcpy of 8", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    for update in &batch {
                        dst.copy_from_slice(black_box(&update.0["w"].data));
                        black_box(&mut dst);
                    }
                }
                let elapsed = start.elapsed();
                copy_batch.add(elapsed, iters);
                elapsed
            })
        });
        group.finish();
        let (f, fb, m, mb) = (
            fold.bytes_per_sec(bytes),
            fold_batch.bytes_per_sec(bytes * BATCH),
            copy.bytes_per_sec(bytes),
            copy_batch.bytes_per_sec(bytes * BATCH),
        );
        ratios.push(format!(
            "aggregation {n} params: fold {:.2} GB/s, memcpy {:.2} GB/s, fold/memcpy = {:.2}; \
             fold {BATCH} per pass {:.2} GB/s, memcpy of the {BATCH} {:.2} GB/s, fold {BATCH} per pass/memcpy = {:.2}",
            f / 1e9,
            m / 1e9,
            f / m,
            fb / 1e9,
            mb / 1e9,
            fb / mb
        ));
    }
    for line in ratios {
        println!("{line}");
    }
}

criterion_group!(benches, aggregation);
criterion_main!(benches);
