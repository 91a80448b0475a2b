//! FedSubAvg against the real `fedhive` binary over loopback HTTP, on SQLite and on PostgreSQL,
//! without the device SDK (so it builds without burn): the rule against hand-computed rows
//! (including a row one device touched and rows nobody touched), heat bookkeeping (enrol, duplicate
//! enrolment, re-enrolment with a changed set), exactly-once sparse uploads (retries and SIGKILL),
//! and bad sparse uploads that change nothing.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fedhive_shared::{
    NamedTensors, Tensor, TensorSpec,
    fedsubavg::{Heat, SubAvgForm},
    sparse::{FeatureSet, HeatReport, RowsRequest, SparseRows, SparseTensors, split_specs},
    wire::{
        CheckinResponse, RoundInfo, StrategyConfig, TaskConfig, TaskStatus, TrainingParams, UploadReceipt,
    },
};
use reqwest::StatusCode;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::Value;
use sqlx::{Connection, Executor};

const TOKEN: &str = "fedsubavg-test-admin";
const ROWS: usize = 6;

#[derive(Clone, Copy)]
enum Db {
    Sqlite,
    Postgres,
}

/// A PostgreSQL database of the test's own (dropped at the end), or none for SQLite.
struct TestDb {
    url: Option<String>,
    name: Option<String>,
}

fn pg_admin() -> String {
    std::env::var("FEDHIVE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TestDb {
    async fn create(db: Db) -> TestDb {
        match db {
            Db::Sqlite => TestDb {
                url: None,
                name: None,
            },
            Db::Postgres => {
                let name = format!("fedhive_test_{:016x}", rand::random::<u64>());
                let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", pg_admin()))
                    .await
                    .unwrap();
                conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                TestDb {
                    url: Some(format!("{}/{name}", pg_admin())),
                    name: Some(name),
                }
            }
        }
    }

    async fn drop_db(self) {
        if let Some(name) = self.name {
            let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", pg_admin()))
                .await
                .unwrap();
            conn.execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .await
            .unwrap();
        }
    }
}

/// A running `fedhive serve`.
struct Server {
    child: Child,
    base: String,
    dir: PathBuf,
    url: Option<String>,
    port: u16,
    http: reqwest::Client,
}

impl Server {
    async fn start(dir: &Path, url: Option<String>, port: Option<u16>) -> Server {
        let port = port.unwrap_or_else(|| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedhive"));
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-token",
            TOKEN,
        ])
        .args(["--tick-ms", "50", "--checkin-retry-ms", "100", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
        if let Some(url) = &url {
            cmd.arg("--database-url").arg(url);
        }
        let server = Server {
            child: cmd.spawn().unwrap(),
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            url,
            port,
            http: reqwest::Client::new(),
        };
        let started = Instant::now();
        while server
            .http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// SIGKILL, then a new process on the same state and port.
    async fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        *self = Server::start(&self.dir.clone(), self.url.clone(), Some(self.port)).await;
    }

    async fn create(&self, form: SubAvgForm, k: u32) -> String {
        self.create_with(&task(form, k), &initial()).await
    }

    async fn create_with(&self, config: &TaskConfig, weights: &NamedTensors) -> String {
        let model = reqwest::multipart::Form::new()
            .text("config", serde_json::to_string(config).unwrap())
            .part("model", reqwest::multipart::Part::bytes(weights.encode()));
        let resp = self
            .http
            .post(format!("{}/v1/tasks", self.base))
            .bearer_auth(TOKEN)
            .multipart(model)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        resp.json::<Value>().await.unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn token(&self, task: &str) -> String {
        let resp = self
            .http
            .post(format!("{}/v1/tasks/{task}/checkin", self.base))
            .send()
            .await
            .unwrap();
        match resp.json::<CheckinResponse>().await.unwrap() {
            CheckinResponse::Assigned(a) => a.upload_token,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    /// `Ok(receipt)` or `Err((status, error code))`.
    async fn upload(
        &self,
        token: &str,
        n: u64,
        body: Vec<u8>,
    ) -> Result<UploadReceipt, (StatusCode, String)> {
        let resp = self
            .http
            .put(format!("{}/v1/updates?num_samples={n}", self.base))
            .bearer_auth(token)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await.unwrap());
        }
        let body: Value = resp.json().await.unwrap();
        assert!(!body["message"].as_str().unwrap().is_empty());
        Err((status, body["error"].as_str().unwrap().to_string()))
    }

    async fn enrol(&self, task: &str, device: &str, f: &FeatureSet) -> Result<Value, (StatusCode, String)> {
        let resp = self
            .http
            .put(format!("{}/v1/tasks/{task}/devices/{device}/features", self.base))
            .json(f)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        if status.is_success() {
            Ok(body)
        } else {
            Err((status, body["error"].as_str().unwrap().to_string()))
        }
    }

    async fn heat(&self, task: &str) -> (Heat, Vec<Heat>) {
        let report: HeatReport = self
            .http
            .post(format!("{}/v1/tasks/{task}/heat", self.base))
            .bearer_auth(TOKEN)
            .json(&all_rows(None))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (report.population, report.rows["emb"].clone())
    }

    /// `(version, first value of every row, b)` of the current model.
    async fn rows(&self, task: &str) -> (i64, Vec<f32>, f32) {
        let resp = self
            .http
            .post(format!("{}/v1/tasks/{task}/submodel", self.base))
            .json(&all_rows(None))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let version: i64 = resp.headers()["fedhive-model-version"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .parse()
            .unwrap();
        let bytes = resp.bytes().await.unwrap();
        let (dense, tables) = split_specs(&specs(), &["emb".to_string()]);
        let sub = SparseTensors::decode_checked(&bytes, &dense, &tables, f32::MAX).unwrap();
        let rows = &sub.tables["emb"];
        assert_eq!(rows.ids, (0..ROWS as u64).collect::<Vec<_>>());
        (
            version,
            (0..ROWS).map(|k| rows.row(k)[0]).collect(),
            sub.dense.0["b"].data[0],
        )
    }

    async fn rounds(&self, task: &str) -> Vec<RoundInfo> {
        let url = format!("{}/v1/tasks/{task}/rounds", self.base);
        self.http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_version(&self, task: &str, version: i64) {
        let started = Instant::now();
        loop {
            let url = format!("{}/v1/tasks/{task}", self.base);
            let status: TaskStatus = self
                .http
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if status.model_version >= version {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "version {version} not reached: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec {
            name: "b".into(),
            shape: vec![1],
        },
        TensorSpec {
            name: "emb".into(),
            shape: vec![ROWS, 2],
        },
    ]
}

fn task(form: SubAvgForm, k: u32) -> TaskConfig {
    TaskConfig {
        model: "test-sparse".into(),
        tensors: specs(),
        strategy: StrategyConfig::FedSubAvg {
            server_lr: 1.0,
            form,
            tables: vec!["emb".into()],
        },
        training: TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 8,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        },
        devices_per_round: k,
        min_devices_per_round: k,
        over_selection: 2.0,
        round_deadline_secs: 120,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds: 3,
    }
}

/// `b = 0`; row `m` of `emb` is `[m, m]`.
fn initial() -> NamedTensors {
    let mut m = NamedTensors::default();
    m.0.insert(
        "b".into(),
        Tensor {
            shape: vec![1],
            data: vec![0.0],
        },
    );
    let data = (0..ROWS).flat_map(|r| [r as f32, r as f32]).collect();
    m.0.insert(
        "emb".into(),
        Tensor {
            shape: vec![ROWS, 2],
            data,
        },
    );
    m
}

/// A sparse update: dense `b` and rows `[v, v]`.
fn update(rows: &[(u64, f32)], b: f32) -> Vec<u8> {
    let mut t = SparseTensors::default();
    t.dense.0.insert(
        "b".into(),
        Tensor {
            shape: vec![1],
            data: vec![b],
        },
    );
    let mut r = SparseRows::new(2);
    for &(id, v) in rows {
        r.push(id, &[v, v]);
    }
    t.tables.insert("emb".into(), r);
    t.encode()
}

fn features(n: u64, ids: &[u64]) -> FeatureSet {
    FeatureSet {
        num_samples: n,
        rows: BTreeMap::from([("emb".to_string(), ids.to_vec())]),
    }
}

fn all_rows(version: Option<i64>) -> RowsRequest {
    RowsRequest {
        version,
        rows: BTreeMap::from([("emb".to_string(), (0..ROWS as u64).collect())]),
    }
}

fn h(devices: u64, samples: u64) -> Heat {
    Heat { devices, samples }
}

fn assert_close(got: &[f32], want: &[f32]) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "got {got:?}, want {want:?}");
    }
}

/// A (n=1) {0, 1}, B (n=3) {0, 2}, C (n=2) {0, 2}, D (n=2) {0}; nobody holds rows 3, 4, 5.
async fn enrol_population(s: &Server, task: &str) {
    for (id, n, rows) in [
        ("dev-a", 1, &[0u64, 1][..]),
        ("dev-b", 3, &[0, 2]),
        ("dev-c", 2, &[2, 0]),
        ("dev-d", 2, &[0]),
    ] {
        s.enrol(task, id, &features(n, rows)).await.unwrap();
    }
}

/// A's and B's updates of the hand-computed example (see fedhive_shared::fedsubavg's tests).
async fn example_round(s: &Server, task: &str) {
    let (a, b) = (s.token(task).await, s.token(task).await);
    s.upload(&a, 1, update(&[(0, 0.4), (1, 1.0)], 0.2)).await.unwrap();
    s.upload(&b, 3, update(&[(2, -0.5), (0, 0.8)], 0.6))
        .await
        .unwrap();
}

async fn rule_and_heat(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let tdb = TestDb::create(db).await;
    let s = Server::start(dir.path(), tdb.url.clone(), None).await;
    let zero = Heat::default();

    // Heat: enrol, duplicate enrolment, re-enrolment with a changed set.
    let t = s.create(SubAvgForm::Paper, 2).await;
    let e = s.enrol(&t, "dev-a", &features(2, &[0, 1])).await.unwrap();
    assert_eq!(
        (e["changed"].as_bool(), e["population"]["devices"].as_u64()),
        (Some(true), Some(1))
    );
    assert_eq!(
        s.heat(&t).await,
        (h(1, 2), vec![h(1, 2), h(1, 2), zero, zero, zero, zero])
    );
    let e = s.enrol(&t, "dev-a", &features(2, &[1, 0])).await.unwrap();
    assert_eq!(e["changed"].as_bool(), Some(false));
    assert_eq!(
        s.heat(&t).await,
        (h(1, 2), vec![h(1, 2), h(1, 2), zero, zero, zero, zero])
    );
    s.enrol(&t, "dev-a", &features(3, &[1, 2])).await.unwrap();
    assert_eq!(
        s.heat(&t).await,
        (h(1, 3), vec![zero, h(1, 3), h(1, 3), zero, zero, zero])
    );
    s.enrol(&t, "dev-b", &features(1, &[1])).await.unwrap();
    assert_eq!(
        s.heat(&t).await,
        (h(2, 4), vec![zero, h(2, 4), h(1, 3), zero, zero, zero])
    );
    let mut other_table = features(1, &[]);
    other_table.rows.insert("nope".into(), vec![1]);
    for (device, body, code) in [
        ("dev-c", features(1, &[ROWS as u64]), "unknown_row"),
        ("dev-c", features(1, &[1, 1]), "duplicate_row"),
        ("dev-c", features(0, &[1]), "bad_num_samples"),
        ("dev-c", other_table, "invalid_request"),
        ("bad%20id", features(1, &[1]), "invalid_request"),
    ] {
        assert_eq!(s.enrol(&t, device, &body).await.unwrap_err().1, code);
    }
    assert_eq!(
        s.heat(&t).await,
        (h(2, 4), vec![zero, h(2, 4), h(1, 3), zero, zero, zero])
    );

    // Paper form: row0 += (4/4)(1/2)(0.4+0.8) = 0.6; row1 (one device) += (4/1)(1/2)(1.0) = 2;
    // row2 += (4/2)(1/2)(-0.5) = -0.5; rows 3..5 (nobody) stay; b = (0.2 + 0.6) / 2 = 0.4.
    let paper = s.create(SubAvgForm::Paper, 2).await;
    enrol_population(&s, &paper).await;
    assert_eq!(
        s.heat(&paper).await,
        (h(4, 8), vec![h(4, 8), h(1, 1), h(2, 5), zero, zero, zero])
    );
    example_round(&s, &paper).await;
    s.wait_version(&paper, 1).await;
    let (version, rows, b) = s.rows(&paper).await;
    assert_eq!(version, 1);
    assert_close(&rows, &[0.6, 3.0, 1.5, 3.0, 4.0, 5.0]);
    assert_close(&[b], &[0.4]);
    let stale = s
        .http
        .post(format!("{}/v1/tasks/{paper}/submodel", s.base))
        .json(&all_rows(Some(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::CONFLICT);

    // Sample-weighted form (m_t = 4; 8 samples): row0 += (8/8)(0.4 + 2.4)/4 = 0.7;
    // row1 += (8/1)(1.0)/4 = 2; row2 += (8/5)(-1.5)/4 = -0.6; b = (0.2 + 1.8)/4 = 0.5.
    let weighted = s.create(SubAvgForm::SampleWeighted, 2).await;
    enrol_population(&s, &weighted).await;
    example_round(&s, &weighted).await;
    s.wait_version(&weighted, 1).await;
    let (_, rows, b) = s.rows(&weighted).await;
    assert_close(&rows, &[0.7, 3.0, 1.4, 3.0, 4.0, 5.0]);
    assert_close(&[b], &[0.5]);
    drop(s);
    tdb.drop_db().await;
}

fn raw_body(ids: (Dtype, Vec<u8>, Vec<usize>), rows: (Vec<f32>, Vec<usize>)) -> Vec<u8> {
    let b = 0.1f32.to_le_bytes();
    let row_bytes: Vec<u8> = rows.0.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        ("b", TensorView::new(Dtype::F32, vec![1], &b).unwrap()),
        ("emb:ids", TensorView::new(ids.0, ids.2, &ids.1).unwrap()),
        (
            "emb:rows",
            TensorView::new(Dtype::F32, rows.1, &row_bytes).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

async fn bad_inputs_and_retries(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let tdb = TestDb::create(db).await;
    let s = Server::start(dir.path(), tdb.url.clone(), None).await;
    let t = s.create(SubAvgForm::Paper, 2).await;
    enrol_population(&s, &t).await;
    let a = s.token(&t).await;
    let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut dense_only = NamedTensors::default();
    dense_only.0.insert(
        "b".into(),
        Tensor {
            shape: vec![1],
            data: vec![0.1],
        },
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "row id past the table",
            update(&[(ROWS as u64, 0.1)], 0.1),
            "unknown_row",
        ),
        ("row nobody enrolled", update(&[(3, 0.1)], 0.1), "unknown_row"),
        (
            "negative id",
            raw_body((Dtype::I64, i64s(&[-1]), vec![1]), (vec![0.0; 2], vec![1, 2])),
            "unknown_row",
        ),
        (
            "duplicate ids",
            raw_body((Dtype::I64, i64s(&[1, 1]), vec![2]), (vec![0.0; 4], vec![2, 2])),
            "duplicate_row",
        ),
        (
            "wrong width",
            raw_body((Dtype::I64, i64s(&[1]), vec![1]), (vec![0.0; 3], vec![1, 3])),
            "width_mismatch",
        ),
        (
            "fewer rows than ids",
            raw_body((Dtype::I64, i64s(&[0, 1]), vec![2]), (vec![0.0; 2], vec![1, 2])),
            "row_count_mismatch",
        ),
        (
            "F32 ids",
            raw_body(
                (Dtype::F32, 1f32.to_le_bytes().to_vec(), vec![1]),
                (vec![0.0; 2], vec![1, 2]),
            ),
            "dtype_mismatch",
        ),
        ("NaN in a row", update(&[(1, f32::NAN)], 0.1), "non_finite_value"),
        (
            "NaN in a dense tensor",
            update(&[(1, 0.1)], f32::NAN),
            "non_finite_value",
        ),
        (
            "beyond the clipping range",
            update(&[(1, 1000.0)], 0.1),
            "value_out_of_range",
        ),
        ("a dense update", dense_only.encode(), "missing_tensor"),
        ("garbage", b"not safetensors".to_vec(), "malformed_tensors"),
    ];
    for (what, body, code) in cases {
        let (status, got) = s.upload(&a, 1, body).await.unwrap_err();
        assert_eq!((status.as_u16() / 100, got.as_str()), (4, code), "{what}");
        assert_eq!(s.rounds(&t).await[0].accepted, 0, "{what}");
    }
    let (version, rows, _) = s.rows(&t).await;
    assert_eq!(version, 0);
    assert_close(&rows, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

    // Retries: same bytes -> same receipt, counted once; other bytes -> conflicting_retry.
    let body = update(&[(0, 0.4), (1, 1.0)], 0.2);
    let first = s.upload(&a, 1, body.clone()).await.unwrap();
    assert_eq!(s.upload(&a, 1, body).await.unwrap(), first);
    assert_eq!(
        s.upload(&a, 1, update(&[(0, 0.5)], 0.2)).await.unwrap_err().1,
        "conflicting_retry"
    );
    let rounds = s.rounds(&t).await;
    assert_eq!((rounds[0].accepted, rounds[0].total_samples), (1, 1));
    let b = s.token(&t).await;
    s.upload(&b, 3, update(&[(2, -0.5), (0, 0.8)], 0.6))
        .await
        .unwrap();
    s.wait_version(&t, 1).await;
    let (_, rows, b) = s.rows(&t).await;
    assert_close(&rows, &[0.6, 3.0, 1.5, 3.0, 4.0, 5.0]);
    assert_close(&[b], &[0.4]);
    drop(s);
    tdb.drop_db().await;
}

async fn sigkill_after_last_upload(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let tdb = TestDb::create(db).await;
    let mut s = Server::start(dir.path(), tdb.url.clone(), None).await;
    let t = s.create(SubAvgForm::Paper, 2).await;
    enrol_population(&s, &t).await;
    let (a, b) = (s.token(&t).await, s.token(&t).await);
    let (body_a, body_b) = (
        update(&[(0, 0.4), (1, 1.0)], 0.2),
        update(&[(2, -0.5), (0, 0.8)], 0.6),
    );
    let ra = s.upload(&a, 1, body_a.clone()).await.unwrap();
    let rb = s.upload(&b, 3, body_b.clone()).await.unwrap();
    // Killed right after the K-th ack: finalisation may be anywhere (not started, journal written,
    // committed but not yet applied to the table file, done).
    s.kill_and_restart().await;
    assert_eq!(s.upload(&a, 1, body_a).await.unwrap(), ra);
    assert_eq!(s.upload(&b, 3, body_b).await.unwrap(), rb);
    s.wait_version(&t, 1).await;
    let (version, rows, bias) = s.rows(&t).await;
    assert_eq!(version, 1);
    assert_close(&rows, &[0.6, 3.0, 1.5, 3.0, 4.0, 5.0]);
    assert_close(&[bias], &[0.4]);
    let rounds = s.rounds(&t).await;
    assert_eq!((rounds[0].accepted, rounds[0].total_samples), (2, 4));
    s.kill_and_restart().await;
    assert_eq!(s.rows(&t).await.1, rows);
    drop(s);
    tdb.drop_db().await;
}

/// FedAvg on the same model still runs through the shared round code: the whole model down, a
/// dense update up, `x += sum n_i Delta_i / m` (n=1 with 0.5 and n=3 with 1.5: +1.25 everywhere).
async fn fedavg_on_the_same_model(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let tdb = TestDb::create(db).await;
    let s = Server::start(dir.path(), tdb.url.clone(), None).await;
    let mut config = task(SubAvgForm::Paper, 2);
    config.strategy = StrategyConfig::FedAvg { server_lr: 1.0 };
    let t = s.create_with(&config, &initial()).await;
    let filled = |v: f32| {
        let mut m = initial();
        m.0.values_mut()
            .for_each(|t| t.data.iter_mut().for_each(|x| *x = v));
        m.encode()
    };
    let (a, b) = (s.token(&t).await, s.token(&t).await);
    s.upload(&a, 1, filled(0.5)).await.unwrap();
    // A sparse body is not a FedAvg update (its I64 ids are refused first).
    assert_eq!(
        s.upload(&b, 3, update(&[(1, 0.5)], 0.0)).await.unwrap_err().1,
        "dtype_mismatch"
    );
    s.upload(&b, 3, filled(1.5)).await.unwrap();
    s.wait_version(&t, 1).await;
    let bytes = s
        .http
        .get(format!("{}/v1/tasks/{t}/model", s.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let model = NamedTensors::decode(&bytes).unwrap();
    assert_close(
        &model.0["emb"].data,
        &[
            1.25, 1.25, 2.25, 2.25, 3.25, 3.25, 4.25, 4.25, 5.25, 5.25, 6.25, 6.25,
        ],
    );
    assert_close(&model.0["b"].data, &[1.25]);
    drop(s);
    tdb.drop_db().await;
}

macro_rules! both {
    ($($name:ident),*) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Db::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Db::Postgres).await } )*
        }
    };
}

both!(
    rule_and_heat,
    bad_inputs_and_retries,
    sigkill_after_last_upload,
    fedavg_on_the_same_model
);
