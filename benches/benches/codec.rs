//! Update codec throughput: safetensors encode, the checked decode (parse, copy, names/shapes,
//! finite and range check) of dense updates and of sparse ones (FedSubAvg: ids + rows of an
//! embedding table beside a small dense part; the decode also checks ids are in range and unique),
//! and the server's dense upload gate, which checks the same without the copy.
//!
//! `cargo bench --manifest-path benches/Cargo.toml --bench codec`; throughput is in bytes of f32 data.

use std::{collections::BTreeMap, hint::black_box};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedhive_shared::{
    NamedTensors, Tensor, TensorLayout,
    fedavg::DELTA_LIMIT,
    sparse::{SparseRows, SparseTensors, TableShape},
};

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
        // The server's upload gate: the same checks, values read in place (no decoded copy).
        group.bench_function("check_in_place", |b| {
            b.iter(|| TensorLayout::check(black_box(&encoded), &specs, DELTA_LIMIT).expect("valid"))
        });
        group.finish();
    }
}

/// A sparse update: `rows` scattered rows of a 10M x 16 table plus a 10k-parameter dense part.
fn sparse_update(rows: usize) -> (SparseTensors, BTreeMap<String, TableShape>) {
    let shape = TableShape {
        rows: 10_000_000,
        width: 16,
    };
    let mut table = SparseRows::new(shape.width);
    for k in 0..rows as u64 {
        // Distinct ids spread over the table (7919 is prime, so k -> k * 7919 mod rows is injective).
        let id = (k * 7919) % shape.rows;
        let row: Vec<f32> = (0..shape.width)
            .map(|j| ((k as usize + j) % 200) as f32 / 100.0 - 1.0)
            .collect();
        table.push(id, &row);
    }
    let update = SparseTensors {
        dense: update(10_000),
        tables: BTreeMap::from([("embedding".to_string(), table)]),
    };
    (update, BTreeMap::from([("embedding".to_string(), shape)]))
}

fn codec_sparse(c: &mut Criterion) {
    for rows in [1_000usize, 100_000] {
        let (tensors, tables) = sparse_update(rows);
        let specs = tensors.dense.specs();
        let encoded = tensors.encode();
        let mut group = c.benchmark_group(format!("codec_sparse/{rows}_rows"));
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_function("encode", |b| b.iter(|| black_box(tensors.encode())));
        group.bench_function("decode_checked", |b| {
            b.iter(|| {
                SparseTensors::decode_checked(black_box(&encoded), &specs, &tables, DELTA_LIMIT)
                    .expect("valid")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, codec, codec_sparse);
criterion_main!(benches);
