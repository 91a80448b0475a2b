//! Update codec throughput: safetensors encode, and the server's checked decode (parse, copy,
//! names/shapes, finite and range check) of dense updates.
//!
//! `cargo bench --manifest-path benches/Cargo.toml --bench codec`; throughput is in bytes of f32 data.

use std::{collections::BTreeMap, hint::black_box};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedhive_shared::{NamedTensors, Tensor, fedavg::DELTA_LIMIT};

/// `n` parameters split over four tensors, like a small model's layers.
fn update(n: usize) -> NamedTensors {
    let each = n / 4;
    let tensors = (0..4)
        .map(|t| {
            let data = (0..each)
                .map(|i| ((i * 31 + t) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            (
                format!("layer{t}.weight"),
                Tensor {
                    shape: vec![each],
                    data,
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    NamedTensors(tensors)
}

fn codec(c: &mut Criterion) {
    for n in [1_000_000usize, 10_000_000] {
        let tensors = update(n);
        let specs = tensors.specs();
        let encoded = tensors.encode();
        let mut group = c.benchmark_group(format!("codec_dense/{n}"));
        group.throughput(Throughput::Bytes((n * 4) as u64));
        group.sample_size(if n > 1_000_000 { 20 } else { 50 });
        group.bench_function("encode", |b| b.iter(|| black_box(tensors.encode())));
        group.bench_function("decode_checked", |b| {
            b.iter(|| NamedTensors::decode_checked(black_box(&encoded), &specs, DELTA_LIMIT).expect("valid"))
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
