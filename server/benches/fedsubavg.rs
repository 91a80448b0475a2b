//! FedSubAvg benchmarks: submodel download from a 10M x 16 table and sparse aggregation.
//!
//! `cargo bench --workspace --all-features --bench fedsubavg` prints a table and one JSON line:
//! 1. 1,000 random rows from a 10M x 16 f32 table: latency of the table store's positioned reads,
//!    and of `POST /v1/tasks/{id}/submodel` on the real `fedhive` binary over loopback, with that
//!    server's resident and peak memory (it must stay far below the table's 640 MB).
//! 2. Sparse aggregation: rows/s folded into a round's accumulator (100 updates of 1,000 rows),
//!    and rows/s committed (read base rows, apply the rule, write in place); the accumulator's size
//!    for a 1M-row and a 10M-row table (it depends on rows touched, not on the table).
//! 3. The table as a snapshot in the blob store (what a new replica downloads before it serves
//!    rows): upload and download MB/s, streamed.
//!
//! `FEDHIVE_BENCH_ROWS` overrides the table size (default 10,000,000); `FEDHIVE_BENCH_BLOB_STORE`
//! (`s3://bucket/prefix`, with the `AWS_*` environment) puts the snapshot in S3 rather than a
//! directory.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fedhive_server::{blobs::BlobStore, tables::TableStore};
use fedhive_shared::{
    NamedTensors, Tensor, TensorSpec,
    fedsubavg::{Heat, SubAvgAccumulator, SubAvgForm},
    sparse::{RowsRequest, SparseRows, SparseTensors, TableShape},
    wire::{StrategyConfig, TaskConfig, TrainingParams},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::json;

const WIDTH: usize = 16;
const IDS_PER_REQUEST: usize = 1000;
const REQUESTS: usize = 200;
const UPDATES: usize = 100;
const TABLE: &str = "emb.weight";

/// `(VmRSS, VmHWM)` of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn random_ids(rng: &mut StdRng, rows: u64, n: usize) -> Vec<u64> {
    let mut ids = std::collections::BTreeSet::new();
    while ids.len() < n {
        ids.insert(rng.random_range(0..rows));
    }
    ids.into_iter().collect()
}

/// (p50, p99, mean) in milliseconds.
fn percentiles(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), ms.iter().sum::<f64>() / ms.len() as f64)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let rows: u64 = std::env::var("FEDHIVE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let shape = TableShape { rows, width: WIDTH };
    let mut rng = StdRng::seed_from_u64(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let table_mb = rows as f64 * WIDTH as f64 * 4.0 / 1e6;
    println!("table: {rows} x {WIDTH} f32 ({table_mb:.0} MB)");

    // 1a. The table store alone.
    let store = TableStore::new(dir.path().join("store"));
    let started = Instant::now();
    store
        .create("bench", TABLE, shape, |m, row| row.fill(m as f32))
        .expect("create table");
    let create_s = started.elapsed().as_secs_f64();
    let (rss_before, _) = memory_kib(std::process::id());
    let mut store_ms = Vec::new();
    for _ in 0..REQUESTS {
        let ids = random_ids(&mut rng, rows, IDS_PER_REQUEST);
        let t = Instant::now();
        let got = store.read_rows("bench", TABLE, shape, &ids).expect("read rows");
        store_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(got.row(7)[0], ids[7] as f32);
    }
    let (rss_after, _) = memory_kib(std::process::id());
    let (store_p50, store_p99, store_mean) = percentiles(store_ms);
    println!(
        "store: created in {create_s:.1} s; {IDS_PER_REQUEST} random rows: p50 {store_p50:.3} ms, p99 {store_p99:.3} ms, mean {store_mean:.3} ms; bench RSS {} -> {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );

    // 1b. The real server over HTTP.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_fedhive"))
        .args([
            "serve",
            "--insecure-dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path().join("server"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn fedhive");
    let server = Server(child);
    let pid = server.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (http, after_create) = runtime.block_on(async {
        let http = reqwest::Client::new();
        let started = Instant::now();
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (idle_rss, _) = memory_kib(pid);
        let config = TaskConfig {
            model: "bench".into(),
            tensors: vec![
                TensorSpec {
                    name: TABLE.into(),
                    shape: vec![rows as usize, WIDTH],
                },
                TensorSpec {
                    name: "fc.bias".into(),
                    shape: vec![1],
                },
            ],
            strategy: StrategyConfig::FedSubAvg {
                server_lr: 1.0,
                form: SubAvgForm::Paper,
                tables: vec![TABLE.into()],
            },
            training: TrainingParams {
                local_epochs: 1,
                max_local_steps: 0,
                batch_size: 1,
                learning_rate: 0.1,
                learning_rate_schedule: None,
            },
            devices_per_round: 10,
            min_devices_per_round: 1,
            over_selection: 1.0,
            round_deadline_secs: 3600,
            require_enrolled_device: false,
            update_encoding: Default::default(),
            rounds: 1,
        };
        // The table is left out of the initial weights: the server creates it (zeros) on disk.
        let mut dense = NamedTensors::default();
        dense.0.insert(
            "fc.bias".into(),
            Tensor {
                shape: vec![1],
                data: vec![0.0],
            },
        );
        let form = reqwest::multipart::Form::new()
            .text("config", serde_json::to_string(&config).unwrap())
            .part("model", reqwest::multipart::Part::bytes(dense.encode()));
        let created: serde_json::Value = http
            .post(format!("{base}/v1/tasks"))
            .multipart(form)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        let task = created["task_id"].as_str().unwrap().to_string();
        let (rss, hwm) = memory_kib(pid);
        println!(
            "server: idle RSS {} MiB; after creating the task (table written): RSS {} MiB, peak {} MiB",
            idle_rss / 1024,
            rss / 1024,
            hwm / 1024
        );
        ((http, task), (idle_rss, rss, hwm))
    });
    let (http, task) = http;
    let (http_ms, body_bytes) = runtime.block_on(async {
        let mut ms = Vec::new();
        let mut bytes = 0;
        for _ in 0..REQUESTS {
            let request = RowsRequest {
                version: None,
                rows: BTreeMap::from([(TABLE.to_string(), random_ids(&mut rng, rows, IDS_PER_REQUEST))]),
            };
            let t = Instant::now();
            let body = http
                .post(format!("{base}/v1/tasks/{task}/submodel"))
                .json(&request)
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            bytes = body.len();
        }
        (ms, bytes)
    });
    let (server_rss, server_hwm) = memory_kib(pid);
    drop(server);
    let (http_p50, http_p99, http_mean) = percentiles(http_ms);
    println!(
        "submodel over HTTP ({IDS_PER_REQUEST} rows, {body_bytes} B): p50 {http_p50:.2} ms, p99 {http_p99:.2} ms, mean {http_mean:.2} ms; server RSS {} MiB, peak {} MiB (table {table_mb:.0} MB)",
        server_rss / 1024,
        server_hwm / 1024
    );

    // 2. Sparse aggregation.
    let dense_specs = vec![TensorSpec {
        name: "fc.bias".into(),
        shape: vec![1],
    }];
    let mut aggregation = Vec::new();
    for table_rows in [1_000_000u64, rows] {
        let updates: Vec<SparseTensors> = (0..UPDATES)
            .map(|_| {
                let mut u = SparseTensors::default();
                u.dense.0.insert(
                    "fc.bias".into(),
                    Tensor {
                        shape: vec![1],
                        data: vec![0.01],
                    },
                );
                let mut r = SparseRows::new(WIDTH);
                for id in random_ids(&mut rng, table_rows, IDS_PER_REQUEST) {
                    let row: Vec<f32> = (0..WIDTH).map(|_| rng.random_range(-0.1..0.1)).collect();
                    r.push(id, &row);
                }
                u.tables.insert(TABLE.into(), r);
                u
            })
            .collect();
        let (rss_before, _) = memory_kib(std::process::id());
        let mut acc = SubAvgAccumulator::new(SubAvgForm::Paper, &dense_specs, [TABLE.to_string()]);
        let t = Instant::now();
        for u in &updates {
            acc.add(20, u).unwrap();
        }
        let fold_s = t.elapsed().as_secs_f64();
        let (rss_after, _) = memory_kib(std::process::id());
        let touched = acc.touched_rows();
        let fold_rate = (UPDATES * IDS_PER_REQUEST) as f64 / fold_s;
        // Sums (i64 per value) plus the map's key and counters: what the round holds per touched row.
        let acc_mb = touched as f64 * (WIDTH * 8 + 8 + 16 + 24) as f64 / 1e6;
        let mut commit = None;
        if table_rows == rows {
            let ids = acc.touched(TABLE);
            let heat = vec![
                Heat {
                    devices: 3,
                    samples: 60
                };
                ids.len()
            ];
            let t = Instant::now();
            let mut base = store.read_rows("bench", TABLE, shape, &ids).unwrap();
            acc.apply_rows(
                TABLE,
                &mut base,
                &heat,
                Heat {
                    devices: 1000,
                    samples: 20_000,
                },
                1.0,
            );
            store.write_rows("bench", TABLE, &base).unwrap();
            let s = t.elapsed().as_secs_f64();
            commit = Some(ids.len() as f64 / s);
        }
        println!(
            "aggregation, table of {table_rows} rows: {} rows folded at {:.2} M rows/s; {touched} rows touched, accumulator ~{acc_mb:.1} MB (RSS +{} MiB){}",
            UPDATES * IDS_PER_REQUEST,
            fold_rate / 1e6,
            rss_after.saturating_sub(rss_before) / 1024,
            commit
                .map(|r| format!(
                    "; commit (read, apply, write in place, fsync) {:.2} M rows/s",
                    r / 1e6
                ))
                .unwrap_or_default()
        );
        aggregation.push(json!({
            "table_rows": table_rows,
            "rows_folded": UPDATES * IDS_PER_REQUEST,
            "fold_rows_per_s": fold_rate,
            "touched_rows": touched,
            "accumulator_mb": acc_mb,
            "rss_growth_mib": rss_after.saturating_sub(rss_before) / 1024,
            "commit_rows_per_s": commit,
        }));
    }
    // 3. The table's snapshot in the blob store.
    let blobs = match std::env::var("FEDHIVE_BENCH_BLOB_STORE") {
        Ok(url) => BlobStore::connect(&url, dir.path().join("local")).expect("blob store"),
        Err(_) => BlobStore::open(dir.path().join("blobs")).expect("blob directory"),
    };
    let snapshot = runtime.block_on(async {
        let key = "table-snapshots/bench/snapshot.f32";
        let t = Instant::now();
        blobs
            .put_file(key, &store.path("bench", TABLE))
            .await
            .expect("snapshot upload");
        let up = t.elapsed().as_secs_f64();
        let back = dir.path().join("downloaded.f32");
        let t = Instant::now();
        blobs.get_to_file(key, &back).await.expect("snapshot download");
        let down = t.elapsed().as_secs_f64();
        assert_eq!(std::fs::metadata(&back).unwrap().len(), rows * WIDTH as u64 * 4);
        blobs.delete_prefix("table-snapshots/bench").await.unwrap();
        (table_mb / up, table_mb / down)
    });
    let (rss_now, hwm_now) = memory_kib(std::process::id());
    println!(
        "snapshot of the table in the blob store: upload {:.0} MB/s, download {:.0} MB/s (bench RSS {} MiB, peak {} MiB)",
        snapshot.0,
        snapshot.1,
        rss_now / 1024,
        hwm_now / 1024
    );

    println!(
        "{}",
        json!({
            "bench": "fedsubavg",
            "table_rows": rows,
            "width": WIDTH,
            "table_mb": table_mb,
            "store_read_1000_rows_ms": {"p50": store_p50, "p99": store_p99, "mean": store_mean},
            "http_submodel_1000_rows_ms": {"p50": http_p50, "p99": http_p99, "mean": http_mean},
            "submodel_body_bytes": body_bytes,
            "server_rss_mib": {"idle": after_create.0 / 1024, "after_create": after_create.1 / 1024, "after_downloads": server_rss / 1024, "peak": server_hwm / 1024},
            "aggregation": aggregation,
            "snapshot_mb_per_s": {"upload": snapshot.0, "download": snapshot.1},
        })
    );
}
