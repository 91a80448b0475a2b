//! An upload's digest: SHA-256 as the server computes it (sha2, on the CPU's SHA extensions where
//! it has them), fed 16 KiB at a time as the body arrives, against BLAKE3 fed the same way. The
//! profile of an upload's CPU (docs/benchmarks.md) found SHA-256 the largest single item; this is
//! what a faster digest would save per update.
//!
//! `cargo bench --manifest-path benches/Cargo.toml --bench digest`; throughput is in body bytes.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};

/// Bytes handed to the hasher at once: about what one read off the socket brings.
const CHUNK: usize = 16 << 10;

fn digest(c: &mut Criterion) {
    // A 1M-parameter f32 update's size.
    let body: Vec<u8> = (0..4_000_336u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut group = c.benchmark_group("digest_4MB");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("sha256", |b| {
        b.iter(|| {
            let mut hasher = Sha256::new();
            for chunk in black_box(&body).chunks(CHUNK) {
                hasher.update(chunk);
            }
            hasher.finalize()
        })
    });
    group.bench_function("blake3", |b| {
        b.iter(|| {
            let mut hasher = blake3::Hasher::new();
            for chunk in black_box(&body).chunks(CHUNK) {
                hasher.update(chunk);
            }
            hasher.finalize()
        })
    });
    group.finish();
}

criterion_group!(benches, digest);
criterion_main!(benches);
