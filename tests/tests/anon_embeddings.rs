//! Anonymous embeddings end to end (issue 15), on both databases: samples sent with no credential
//! are stored with nothing that names their sender (every column of every stored row and every
//! stored batch read back), the server's log holds no peer address, a retried `Idempotency-Key`
//! stores nothing twice (also when sent concurrently), bad input is refused with nothing stored,
//! the task's global budget refuses and recovers, and the cloud worker's flow ends in the model it
//! submitted being served as the task's next version.

use std::time::Duration;

use bytes::Bytes;
use fedhive_client::client::FedhiveClient;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::{
    NamedTensors, Tensor,
    anon::{SampleShape, Samples},
    wire::{AnonStatus, ArtifactReceipt, DeviceCredentials, StrategyConfig, TaskConfig},
};
use serde_json::Value;
use sqlx::{Column, Connection, Row};

on_both_databases!(
    samples_are_stored_with_nothing_that_names_their_sender,
    the_log_holds_no_peer_address_and_no_per_address_limit_applies,
    a_retried_key_stores_nothing_twice,
    concurrent_submissions_number_batches_without_gaps,
    bad_input_is_refused_and_stores_nothing,
    the_global_budget_refuses_then_recovers,
    the_worker_fine_tunes_and_the_round_commits_its_model,
    a_restart_keeps_pending_samples_batches_and_seen_keys,
    configs_that_cannot_run_are_refused,
);

const SHAPE: SampleShape = SampleShape {
    features: 3,
    embedding_dim: 2,
    num_classes: 4,
};

/// An anonymous-embeddings task on the tiny `small_specs()` model.
fn anon_task(mix: u32, max: u32, per_second: f32, burst: u32, rounds: u32) -> TaskConfig {
    TaskConfig {
        strategy: StrategyConfig::AnonEmbeddings {
            embedding_dim: SHAPE.embedding_dim as u32,
            sigma: 0.5,
            input_features: SHAPE.features as u32,
            num_classes: SHAPE.num_classes as u32,
            max_samples_per_submission: max,
            mix_batch_samples: mix,
            samples_per_second: per_second,
            samples_burst: burst,
        },
        ..small_task(1, 1, rounds, 300)
    }
}

/// `n` samples of submission `s`, each telling where it came from: input `[s, j, 100 s + j]`.
fn marked(s: usize, n: usize) -> Samples {
    let mut out = Samples::empty(SHAPE);
    for j in 0..n {
        let input = [s as f32, j as f32, (100 * s + j) as f32];
        out.push(&input, &[-(s as f32), 0.5 * j as f32], ((s + j) % 4) as u32);
    }
    out
}

/// `(submission, index)` of each of `samples`, from its input.
fn origins(samples: &Samples) -> Vec<(usize, usize)> {
    (0..samples.len())
        .map(|i| (samples.input(i)[0] as usize, samples.input(i)[1] as usize))
        .collect()
}

fn fresh_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// An answer: status, JSON body (`Null` when not JSON) and `Retry-After`.
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("(no code)")
    }
}

/// Fields drop in order: the server stops before its database and directory go.
struct Setup {
    server: ServerProcess,
    db: TestDb,
    _dir: tempfile::TempDir,
    admin: FedhiveClient,
    http: reqwest::Client,
}

async fn setup(backend: Backend) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(&dir.path().join("data"), &db).await.unwrap();
    with_server(server, db, dir)
}

fn with_server(server: ServerProcess, db: TestDb, dir: tempfile::TempDir) -> Setup {
    Setup {
        admin: server.raw_client(),
        server,
        db,
        _dir: dir,
        http: reqwest::Client::new(),
    }
}

impl Setup {
    /// Creates a task; returns its id and worker token.
    async fn create(&self, config: &TaskConfig) -> (String, String) {
        let created = self
            .admin
            .create_task(config, small_tensors(|_| 0.0).encode())
            .await
            .unwrap();
        let token = created
            .worker_token
            .expect("an anonymous-embeddings task has a worker token");
        (created.task_id, token)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url)
    }

    /// Posts the bodies at once, each with its key, from tasks of their own (so they reach the
    /// server concurrently); their answers in order.
    async fn post_all(&self, task: &str, posts: Vec<(String, Vec<u8>)>) -> Vec<Answer> {
        let url = self.url(&format!("/v1/tasks/{task}/anonymous/samples"));
        let handles: Vec<_> = posts
            .into_iter()
            .map(|(key, body)| {
                let request = self.http.post(&url).header("idempotency-key", key).body(body);
                tokio::spawn(answer(request))
            })
            .collect();
        let mut answers = Vec::new();
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
        answers
    }

    /// Posts a body of samples with `key` as its `Idempotency-Key` and any `extra` headers.
    async fn post_samples(
        &self,
        task: &str,
        key: Option<&str>,
        body: Vec<u8>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .http
            .post(self.url(&format!("/v1/tasks/{task}/anonymous/samples")))
            .header("content-type", "application/octet-stream")
            .body(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        answer(request).await
    }

    async fn submit(&self, task: &str, samples: &Samples) -> Answer {
        self.post_samples(task, Some(&fresh_key()), samples.encode(), &[])
            .await
    }

    async fn worker_get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    async fn status(&self, task: &str, token: &str) -> AnonStatus {
        let resp = self
            .worker_get(&format!("/v1/tasks/{task}/anonymous"), token)
            .await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn put_model(&self, task: &str, round: i64, token: &str, body: Vec<u8>) -> Answer {
        let request = self
            .http
            .put(self.url(&format!("/v1/tasks/{task}/anonymous/rounds/{round}/model")))
            .bearer_auth(token)
            .body(body);
        answer(request).await
    }

    /// A connection to the server's database, to read what it stored.
    async fn database(&self) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        let url = self
            .db
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.server.data_dir.join("fedhive.db").display()));
        sqlx::AnyConnection::connect(&url).await.unwrap()
    }

    /// `(pending samples, seen keys, batches)` of the task, counted in the database.
    async fn counts(&self, task: &str) -> (i64, i64, i64) {
        let mut db = self.database().await;
        let mut n = [0i64; 3];
        for (i, table) in ["anon_pending", "anon_seen_keys", "anon_batches"]
            .iter()
            .enumerate()
        {
            let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE task_id = $1");
            n[i] = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(task)
                .fetch_one(&mut db)
                .await
                .unwrap()
                .get("n");
        }
        (n[0], n[1], n[2])
    }
}

async fn answer(request: reqwest::RequestBuilder) -> Answer {
    let resp = request.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        body,
        retry_after,
    }
}

/// A stored value, whatever its column's type.
#[derive(Debug)]
enum Stored {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// Every row of `table`, each as its columns' names and values.
async fn dump(db: &mut sqlx::AnyConnection, table: &str) -> Vec<Vec<(String, Stored)>> {
    let sql = format!("SELECT * FROM {table}");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *db)
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            row.columns()
                .iter()
                .map(|c| {
                    let i = c.ordinal();
                    let value = if let Ok(v) = row.try_get::<i64, _>(i) {
                        Stored::Int(v)
                    } else if let Ok(v) = row.try_get::<String, _>(i) {
                        Stored::Text(v)
                    } else {
                        Stored::Bytes(row.try_get::<Vec<u8>, _>(i).unwrap())
                    };
                    (c.name().to_string(), value)
                })
                .collect()
        })
        .collect()
}

/// Asserts that `bytes` hold none of `secrets` (as text, in any position).
fn assert_holds_none(what: &str, bytes: &[u8], secrets: &[&str]) {
    let text = String::from_utf8_lossy(bytes);
    for secret in secrets {
        assert!(!text.contains(secret), "{what} holds `{secret}`: {text}");
    }
}

/// Asserts that a stored integer is no time of this test run, in milliseconds or seconds.
fn assert_not_a_time(what: &str, value: i64, started_ms: i64) {
    let day = 86_400_000;
    let (from, to) = (started_ms - day, now_ms() + day);
    assert!(
        !(from..=to).contains(&value) && !(from / 1000..=to / 1000).contains(&value),
        "{what} = {value} looks like a time of this run"
    );
}

async fn samples_are_stored_with_nothing_that_names_their_sender(backend: Backend) {
    let s = setup(backend).await;
    let started_ms = now_ms();
    let (task, worker) = s.create(&anon_task(12, 8, 1000.0, 1000, 1)).await;
    // An enrolled device's credential, sent along with two submissions: the route reads no
    // credential, so none may end up stored.
    let key = s.admin.create_enrolment_key("app").await.unwrap().enrolment_key;
    let device: DeviceCredentials = s.admin.enrol_device(&key).await.unwrap();
    let bearer = format!("Bearer {}", device.bearer());
    let keys: Vec<String> = (0..4).map(|_| fresh_key()).collect();
    for (i, key) in keys.iter().enumerate() {
        let extra: &[(&str, &str)] = if i % 2 == 0 {
            &[("authorization", &bearer), ("fedhive-device", &device.bearer())]
        } else {
            &[]
        };
        let a = s
            .post_samples(&task, Some(key), marked(i, 4).encode(), extra)
            .await;
        assert_eq!(
            (a.status, &a.body),
            (
                200,
                &serde_json::json!({"accepted_samples": 4, "duplicate": false})
            )
        );
    }
    // The SDK's call too: no credential, a key of its own.
    let anonymous = FedhiveClient::new(&s.server.base_url).unwrap();
    let accepted = anonymous
        .submit_anonymous_samples(&task, &marked(4, 2))
        .await
        .unwrap();
    assert_eq!((accepted.accepted_samples, accepted.duplicate), (2, false));

    // 18 samples, batches of 12: one batch (made by the third submission), 6 pending.
    assert_eq!(s.counts(&task).await, (6, 5, 1));
    let secrets: Vec<&str> = [
        "127.0.0.1",
        "localhost",
        device.device_id.as_str(),
        device.device_secret.as_str(),
        ADMIN_TOKEN,
        worker.as_str(),
    ]
    .into_iter()
    .chain(keys.iter().map(String::as_str))
    .collect();
    let mut db = s.database().await;
    let expected_columns = [
        ("anon_pending", vec!["id", "task_id", "sample"]),
        ("anon_seen_keys", vec!["task_id", "key_hash"]),
        ("anon_batches", vec!["task_id", "number", "blob_key", "samples"]),
    ];
    let mut pending = Vec::new();
    let mut blob_keys = Vec::new();
    for (table, columns) in expected_columns {
        let rows = dump(&mut db, table).await;
        assert!(!rows.is_empty(), "{table} is empty");
        for row in rows {
            let names: Vec<&str> = row.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, columns, "{table}: only these columns");
            for (column, value) in &row {
                let what = format!("{table}.{column}");
                match value {
                    Stored::Int(v) => assert_not_a_time(&what, *v, started_ms),
                    Stored::Text(t) => assert_holds_none(&what, t.as_bytes(), &secrets),
                    Stored::Bytes(b) => assert_holds_none(&what, b, &secrets),
                }
                match (table, column.as_str(), value) {
                    ("anon_pending", "id", Stored::Text(id))
                    | ("anon_seen_keys", "key_hash", Stored::Text(id)) => {
                        assert!(
                            id.len() >= 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                            "{what} = {id}"
                        );
                    }
                    ("anon_pending" | "anon_seen_keys" | "anon_batches", "task_id", Stored::Text(t)) => {
                        assert_eq!(t, &task)
                    }
                    ("anon_pending", "sample", Stored::Bytes(b)) => pending.push(b.clone()),
                    ("anon_batches", "blob_key", Stored::Text(k)) => blob_keys.push(k.clone()),
                    ("anon_batches", "number" | "samples", Stored::Int(_)) => {}
                    other => panic!("unexpected column or type: {other:?}"),
                }
            }
        }
    }
    // A pending row is one sample's input, embedding and label, f32 LE, and nothing more.
    assert_eq!(pending.len(), 6);
    for sample in &pending {
        assert_eq!(sample.len(), (SHAPE.features + SHAPE.embedding_dim + 1) * 4);
    }
    // The batch, read from the blob store: 12 samples from several submissions, shuffled.
    assert_eq!(blob_keys.len(), 1);
    assert!(
        blob_keys[0].starts_with(&format!("anon/{task}/batches/1-")),
        "{}",
        blob_keys[0]
    );
    let bytes = std::fs::read(s.server.data_dir.join("blobs").join(&blob_keys[0])).unwrap();
    assert_holds_none("the batch", &bytes, &secrets);
    let batch = Samples::decode_checked(&bytes, SHAPE, usize::MAX).unwrap();
    let order = origins(&batch);
    assert_eq!(order.len(), 12);
    let mut sorted = order.clone();
    sorted.sort();
    let submitted: Vec<(usize, usize)> = (0..3).flat_map(|s| (0..4).map(move |j| (s, j))).collect();
    assert_eq!(
        sorted, submitted,
        "the batch holds the first three submissions' samples, once each"
    );
    assert_ne!(order, submitted, "the batch is shuffled, not in submission order");
    for (i, &(from, j)) in order.iter().enumerate() {
        let original = marked(from, 4);
        assert_eq!(
            batch.embedding(i),
            original.embedding(j),
            "each sample keeps its own embedding"
        );
        assert_eq!(batch.labels[i], original.labels[j]);
    }
    // Metrics count submissions by outcome and name nobody either.
    let metrics = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let accepted = format!("fedhive_anon_submissions_total{{task=\"{task}\",outcome=\"accepted\"}} 5");
    assert!(metrics.contains(&accepted), "{accepted} in:\n{metrics}");
    assert_holds_none("/metrics", metrics.as_bytes(), &secrets);
    // The worker reads the same bytes.
    let served = s
        .worker_get(&format!("/v1/tasks/{task}/anonymous/batches/1"), &worker)
        .await;
    assert_eq!(served.status(), 200);
    assert_eq!(served.bytes().await.unwrap(), Bytes::from(bytes));
}

async fn the_log_holds_no_peer_address_and_no_per_address_limit_applies(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let log_file = dir.path().join("server.log");
    // Debug: more than an operator would run with, so that every request's line is there to read.
    // A per-address limit of one request per 100 s: the samples route must not count against it.
    let flags = ["--rate-limit-per-address", "0.01", "--rate-limit-burst", "1"];
    let server = ServerProcess::start_logged(&dir.path().join("data"), &db, &flags, &log_file, "debug")
        .await
        .unwrap();
    let port = server.port();
    let s = with_server(server, db, dir);
    let (task, _) = s.create(&anon_task(4, 8, 1000.0, 1000, 1)).await;
    let keys: Vec<String> = (0..6).map(|_| fresh_key()).collect();
    for (i, key) in keys.iter().enumerate() {
        let a = s.post_samples(&task, Some(key), marked(i, 3).encode(), &[]).await;
        assert_eq!(a.status, 200, "submission {i}: {}", a.body);
    }
    // Refusals are logged too: none of them names the sender either.
    let bad = s
        .post_samples(&task, Some("NOT-A-KEY"), marked(0, 1).encode(), &[])
        .await;
    assert_eq!(bad.code(), "bad_idempotency_key");
    // The per-address limit is on: the same address's second check-in is refused by it.
    let checkin = s.url(&format!("/v1/tasks/{task}/checkin"));
    assert_eq!(answer(s.http.post(&checkin)).await.code(), "anonymous_task");
    assert_eq!(answer(s.http.post(&checkin)).await.code(), "rate_limited");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = s.server.log();
    assert!(
        log.contains(&format!("/v1/tasks/{task}/anonymous/samples")),
        "the samples route's requests are in the log:\n{log}"
    );
    // The only addresses in it are the server's own (where it listens) and its database's.
    let own = format!("127.0.0.1:{port}");
    let database =
        s.db.url
            .as_deref()
            .and_then(|url| url.split('@').nth(1)?.split('/').next());
    let without_own = log.replace(&own, "").replace(database.unwrap_or(&own), "");
    assert!(
        !without_own.contains("127.0.0.1"),
        "a peer address is in the log:\n{log}"
    );
    assert!(
        !log.to_lowercase().contains("peer"),
        "the log mentions a peer:\n{log}"
    );
    for key in &keys {
        assert!(
            !log.contains(key.as_str()),
            "an Idempotency-Key is in the log:\n{log}"
        );
    }
}

async fn a_retried_key_stores_nothing_twice(backend: Backend) {
    let s = setup(backend).await;
    let (task, _) = s.create(&anon_task(6, 8, 1000.0, 1000, 1)).await;
    let first = fresh_key();
    let duplicate = serde_json::json!({"accepted_samples": 4, "duplicate": true});
    let a = s
        .post_samples(&task, Some(&first), marked(0, 4).encode(), &[])
        .await;
    assert_eq!((a.status, a.body["duplicate"].as_bool()), (200, Some(false)));
    let again = s
        .post_samples(&task, Some(&first), marked(0, 4).encode(), &[])
        .await;
    assert_eq!((again.status, &again.body), (200, &duplicate));
    assert_eq!(s.counts(&task).await, (4, 1, 0));

    // A second submission makes a batch of 6 and leaves 2; its retries, and the first's, after
    // the mixing still store nothing.
    let second = fresh_key();
    let a = s
        .post_samples(&task, Some(&second), marked(1, 4).encode(), &[])
        .await;
    assert_eq!(a.body["duplicate"].as_bool(), Some(false));
    assert_eq!(s.counts(&task).await, (2, 2, 1));
    for (i, key) in [&first, &second].into_iter().enumerate() {
        let again = s.post_samples(&task, Some(key), marked(i, 4).encode(), &[]).await;
        assert_eq!((again.status, &again.body), (200, &duplicate));
    }
    assert_eq!(s.counts(&task).await, (2, 2, 1));

    // The same key sent by eight requests at once: one stores, seven are duplicates.
    let third = fresh_key();
    let body = marked(2, 4).encode();
    let answers = s
        .post_all(&task, (0..8).map(|_| (third.clone(), body.clone())).collect())
        .await;
    let fresh: Vec<bool> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200, "{}", a.body);
            !a.body["duplicate"].as_bool().unwrap()
        })
        .collect();
    assert_eq!(fresh.iter().filter(|&&f| f).count(), 1, "{fresh:?}");
    assert_eq!(s.counts(&task).await, (0, 3, 2));
}

async fn concurrent_submissions_number_batches_without_gaps(backend: Backend) {
    let s = setup(backend).await;
    let (task, worker) = s.create(&anon_task(4, 8, 10_000.0, 10_000, 1)).await;
    // 16 submissions of 3 at once: 48 samples, 12 batches of 4.
    let posts = (0..16).map(|i| (fresh_key(), marked(i, 3).encode())).collect();
    let answers = s.post_all(&task, posts).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(s.counts(&task).await, (0, 16, 12));
    let mut db = s.database().await;
    let numbers: Vec<i64> = sqlx::query("SELECT number FROM anon_batches WHERE task_id = $1 ORDER BY number")
        .bind(&task)
        .fetch_all(&mut db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("number"))
        .collect();
    assert_eq!(numbers, (1..=12).collect::<Vec<i64>>());
    // Every sample is in exactly one batch.
    let mut all = Vec::new();
    for n in 1..=12 {
        let resp = s
            .worker_get(&format!("/v1/tasks/{task}/anonymous/batches/{n}"), &worker)
            .await;
        let batch = Samples::decode_checked(&resp.bytes().await.unwrap(), SHAPE, usize::MAX).unwrap();
        assert_eq!(batch.len(), 4);
        all.extend(origins(&batch));
    }
    all.sort();
    let submitted: Vec<(usize, usize)> = (0..16).flat_map(|s| (0..3).map(move |j| (s, j))).collect();
    assert_eq!(all, submitted);
}

async fn bad_input_is_refused_and_stores_nothing(backend: Backend) {
    let s = setup(backend).await;
    let (task, _) = s.create(&anon_task(4, 8, 1000.0, 1000, 1)).await;
    let key = fresh_key();
    let good = marked(0, 2);
    let wide = {
        let mut t = NamedTensors::decode(&good.encode()).unwrap();
        t.0.insert(
            "embeddings".into(),
            Tensor {
                shape: vec![2, 3],
                data: vec![0.5; 6],
            },
        );
        t.encode()
    };
    let mut nan = good.clone();
    nan.embeddings[1] = f32::NAN;
    let mut label = good.clone();
    label.labels[0] = 4;
    // The byte limit: 8 samples of (3 + 2 + 1) f32 and 4 KiB of header room.
    let limit = 8 * 6 * 4 + 4096;
    // (what, Idempotency-Key, body, status, code)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("embedding width", Some(&key), wide, 400, "shape_mismatch"),
        (
            "non-finite value",
            Some(&key),
            nan.encode(),
            400,
            "non_finite_value",
        ),
        ("label out of range", Some(&key), label.encode(), 400, "bad_label"),
        (
            "more than max samples",
            Some(&key),
            marked(0, 9).encode(),
            400,
            "too_many_samples",
        ),
        (
            "no samples",
            Some(&key),
            Samples::empty(SHAPE).encode(),
            400,
            "no_samples",
        ),
        (
            "not safetensors",
            Some(&key),
            b"junk".to_vec(),
            400,
            "malformed_tensors",
        ),
        (
            "over the byte limit",
            Some(&key),
            vec![0; limit + 1],
            413,
            "body_too_large",
        ),
        ("no key", None, good.encode(), 400, "bad_idempotency_key"),
        (
            "short key",
            Some("abc123"),
            good.encode(),
            400,
            "bad_idempotency_key",
        ),
        (
            "upper-case key",
            Some("0123456789ABCDEF0123456789ABCDEF"),
            good.encode(),
            400,
            "bad_idempotency_key",
        ),
    ];
    for (what, key, body, status, code) in cases {
        let a = s.post_samples(&task, key, body, &[]).await;
        assert_eq!((a.status, a.code()), (status, code), "{what}: {}", a.body);
        assert!(
            !a.body["message"].as_str().unwrap_or("").is_empty(),
            "{what}: a message"
        );
    }
    // Unknown task, a task of another strategy, a check-in to this one.
    let unknown = s.post_samples("t-nope", Some(&key), good.encode(), &[]).await;
    assert_eq!((unknown.status, unknown.code()), (404, "unknown_task"));
    let fedavg = s
        .admin
        .create_task(&small_task(1, 1, 1, 300), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let other = s.post_samples(&fedavg, Some(&key), good.encode(), &[]).await;
    assert_eq!((other.status, other.code()), (404, "not_anon_embeddings"));
    let checkin = answer(s.http.post(s.url(&format!("/v1/tasks/{task}/checkin")))).await;
    assert_eq!(
        (checkin.status, checkin.code()),
        (409, "anonymous_task"),
        "{}",
        checkin.body
    );
    // A paused task takes no samples.
    let pause = s
        .http
        .post(s.url(&format!("/v1/tasks/{task}/pause")))
        .bearer_auth(ADMIN_TOKEN);
    assert_eq!(answer(pause).await.status, 200);
    let paused = s.post_samples(&task, Some(&key), good.encode(), &[]).await;
    assert_eq!((paused.status, paused.code()), (409, "task_state_conflict"));
    let resume = s
        .http
        .post(s.url(&format!("/v1/tasks/{task}/resume")))
        .bearer_auth(ADMIN_TOKEN);
    assert_eq!(answer(resume).await.status, 200);

    assert_eq!(s.counts(&task).await, (0, 0, 0), "nothing stored");
    // Nor was the key used up: the good body with it is stored, once.
    let a = s.post_samples(&task, Some(&key), good.encode(), &[]).await;
    assert_eq!((a.status, a.body["duplicate"].as_bool()), (200, Some(false)));
    assert_eq!(s.counts(&task).await, (2, 1, 0));
}

async fn the_global_budget_refuses_then_recovers(backend: Backend) {
    let s = setup(backend).await;
    // 20 samples a second, bursts of 10.
    let (task, _) = s.create(&anon_task(100, 10, 20.0, 10, 1)).await;
    let a = s.submit(&task, &marked(0, 10)).await;
    assert_eq!(a.status, 200);
    let refused = s.submit(&task, &marked(1, 5)).await;
    assert_eq!(
        (refused.status, refused.code()),
        (429, "sample_budget_exhausted"),
        "{}",
        refused.body
    );
    assert_eq!(
        refused.retry_after.as_deref(),
        Some("1"),
        "Retry-After in seconds"
    );
    let wait = refused.body["retry_after_ms"].as_u64().unwrap();
    assert!((1..=250).contains(&wait), "5 samples at 20/s: {wait} ms");
    assert_eq!(
        s.counts(&task).await,
        (10, 1, 0),
        "the refused submission stored nothing"
    );
    // Any sender shares the one budget: another task has its own.
    let (other, _) = s.create(&anon_task(100, 10, 20.0, 10, 1)).await;
    assert_eq!(s.submit(&other, &marked(2, 10)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let again = s.submit(&task, &marked(1, 5)).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(s.counts(&task).await, (15, 2, 0));
}

async fn the_worker_fine_tunes_and_the_round_commits_its_model(backend: Backend) {
    let s = setup(backend).await;
    let (task, worker) = s.create(&anon_task(4, 8, 1000.0, 1000, 2)).await;
    let (other_task, other_worker) = s.create(&anon_task(4, 8, 1000.0, 1000, 1)).await;
    for i in 0..3 {
        assert_eq!(s.submit(&task, &marked(i, 3)).await.status, 200);
    }
    let status = s.status(&task, &worker).await;
    assert_eq!((status.batches, status.pending_samples), (2, 1));
    assert_eq!((status.model_version, status.round_model_submitted), (0, false));
    let round = status.round.expect("a round is open").round_id;

    // The worker reads its batches through the SDK; there is no batch 3.
    let sdk = FedhiveClient::new(&s.server.base_url).unwrap();
    for n in 1..=2 {
        let batch = sdk.anonymous_batch(&task, n, &worker, SHAPE).await.unwrap();
        assert_eq!(batch.len(), 4);
    }
    let missing = s
        .worker_get(&format!("/v1/tasks/{task}/anonymous/batches/3"), &worker)
        .await;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"], "unknown_batch");

    // Wrong tokens: none, the admin's, another task's worker; all 401, and nothing changes.
    let model1 = small_tensors(|i| 0.25 * i as f32).encode();
    for token in ["", ADMIN_TOKEN, other_worker.as_str()] {
        let status = s.worker_get(&format!("/v1/tasks/{task}/anonymous"), token).await;
        assert_eq!(status.status(), 401);
        let batch = s
            .worker_get(&format!("/v1/tasks/{task}/anonymous/batches/1"), token)
            .await;
        assert_eq!(batch.status(), 401);
        let put = s.put_model(&task, round, token, model1.clone()).await;
        assert_eq!((put.status, put.code()), (401, "worker_unauthorized"));
    }
    let unchanged = s.status(&task, &worker).await;
    assert_eq!(
        (unchanged.model_version, unchanged.round_model_submitted),
        (0, false)
    );
    // A model that is not the task's tensors is refused, and stores nothing.
    let wrong = NamedTensors::default().encode();
    assert_eq!(s.put_model(&task, round, &worker, wrong).await.status, 422);
    assert!(!s.status(&task, &worker).await.round_model_submitted);
    // A round of another task.
    let foreign = s.status(&other_task, &other_worker).await.round.unwrap().round_id;
    let put = s.put_model(&task, foreign, &worker, model1.clone()).await;
    assert_eq!((put.status, put.code()), (404, "unknown_round"));

    // The round's model, with the SDK: the round commits it as version 1, byte for byte.
    let receipt = sdk
        .submit_round_model(&task, round, &worker, Bytes::from(model1.clone()))
        .await
        .unwrap();
    assert_eq!(receipt.id, round);
    wait_for_version(&s.admin, &task, 1, Duration::from_secs(30)).await;
    let (version, served) = sdk.download_model(&task, None).await.unwrap();
    assert_eq!((version, served), (1, Bytes::from(model1.clone())));
    let direct = s
        .http
        .get(s.url(&format!("/v1/tasks/{task}/model")))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200, "devices download it with no credential");
    assert_eq!(direct.bytes().await.unwrap(), Bytes::from(model1.clone()));

    // The same model again gets the same receipt; another one for that round is a conflict.
    let same = s.put_model(&task, round, &worker, model1.clone()).await;
    let same: ArtifactReceipt = serde_json::from_value(same.body).unwrap();
    assert_eq!(same, receipt);
    let model2 = small_tensors(|i| -0.5 * i as f32).encode();
    let conflict = s.put_model(&task, round, &worker, model2.clone()).await;
    assert_eq!((conflict.status, conflict.code()), (409, "round_model_conflict"));

    // The next round, with a named cloud-worker token for the task: version 2, the task's last.
    let named = s
        .http
        .post(s.url("/v1/tokens"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"name": "anon-worker", "scope": "cloud-worker", "task_id": task}))
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), 201);
    let named = named.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let status = s.status(&task, &named).await;
    let next = status.round.expect("round 2 is open");
    assert_ne!(next.round_id, round);
    assert_eq!((status.model_version, status.round_model_submitted), (1, false));
    assert_eq!(
        s.put_model(&task, next.round_id, &named, model2.clone())
            .await
            .status,
        200
    );
    wait_for_version(&s.admin, &task, 2, Duration::from_secs(30)).await;
    assert_eq!(
        sdk.download_model(&task, None).await.unwrap(),
        (2, Bytes::from(model2))
    );
    assert_eq!(
        sdk.download_model(&task, Some(1)).await.unwrap(),
        (1, Bytes::from(model1))
    );
    let last = s.status(&task, &worker).await;
    assert_eq!(last.state, fedhive_shared::wire::TaskState::Finished);
}

async fn a_restart_keeps_pending_samples_batches_and_seen_keys(backend: Backend) {
    let mut s = setup(backend).await;
    let (task, worker) = s.create(&anon_task(4, 8, 1000.0, 1000, 1)).await;
    let keys: Vec<String> = (0..3).map(|_| fresh_key()).collect();
    for (i, key) in keys.iter().enumerate() {
        let a = s.post_samples(&task, Some(key), marked(i, 3).encode(), &[]).await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(s.counts(&task).await, (1, 3, 2));
    let before = s
        .worker_get(&format!("/v1/tasks/{task}/anonymous/batches/2"), &worker)
        .await
        .bytes()
        .await
        .unwrap();

    s.server.kill();
    s.server.restart().await.unwrap();
    // Every key is still known: retries store nothing.
    for (i, key) in keys.iter().enumerate() {
        let a = s.post_samples(&task, Some(key), marked(i, 3).encode(), &[]).await;
        assert_eq!(a.body["duplicate"].as_bool(), Some(true), "{}", a.body);
    }
    assert_eq!(s.counts(&task).await, (1, 3, 2));
    // The pending sample joins the next batch, numbered on from the last.
    assert_eq!(s.submit(&task, &marked(3, 3)).await.status, 200);
    let status = s.status(&task, &worker).await;
    assert_eq!((status.batches, status.pending_samples), (3, 0));
    let after = s
        .worker_get(&format!("/v1/tasks/{task}/anonymous/batches/2"), &worker)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(after, before, "a batch never changes");
    let third = sdk_batch(&s, &task, 3, &worker).await;
    let mut origins = origins(&third);
    origins.sort();
    let last = origins.iter().filter(|(from, _)| *from == 3).count();
    assert_eq!(
        last, 3,
        "the batch holds the new submission's three samples: {origins:?}"
    );
    assert!(
        origins.iter().any(|(from, _)| *from < 3),
        "and the one pending since before"
    );
}

async fn sdk_batch(s: &Setup, task: &str, n: i64, worker: &str) -> Samples {
    FedhiveClient::new(&s.server.base_url)
        .unwrap()
        .anonymous_batch(task, n, worker, SHAPE)
        .await
        .unwrap()
}

/// A change of one field of an anonymous-embeddings config.
macro_rules! edit {
    ($($field:ident = $value:expr),+) => {
        |c: &mut TaskConfig| {
            let StrategyConfig::AnonEmbeddings { $($field,)+ .. } = &mut c.strategy else {
                unreachable!("an anonymous-embeddings config")
            };
            $(*$field = $value;)+
        }
    };
}

async fn configs_that_cannot_run_are_refused(backend: Backend) {
    let s = setup(backend).await;
    type Edit = fn(&mut TaskConfig);
    let cases: Vec<(&str, Edit)> = vec![
        ("embedding_dim 0", edit!(embedding_dim = 0)),
        ("input_features 0", edit!(input_features = 0)),
        ("one class", edit!(num_classes = 1)),
        ("sigma NaN (null in JSON)", edit!(sigma = f32::NAN)),
        ("sigma negative", edit!(sigma = -0.1)),
        ("no samples per submission", edit!(max_samples_per_submission = 0)),
        ("no samples per batch", edit!(mix_batch_samples = 0)),
        ("no budget", edit!(samples_per_second = 0.0)),
        (
            "an infinite budget (null in JSON)",
            edit!(samples_per_second = f32::INFINITY),
        ),
        ("a burst below a submission", edit!(samples_burst = 7)),
        (
            "batches of gigabytes",
            edit!(input_features = 1 << 20, mix_batch_samples = 1 << 10),
        ),
        ("enrolled devices", |c| c.require_enrolled_device = true),
    ];
    for (what, change) in cases {
        let mut config = anon_task(4, 8, 10.0, 10, 1);
        change(&mut config);
        let refused = s
            .admin
            .create_task(&config, small_tensors(|_| 0.0).encode())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("invalid_config"), "{what}: {refused}");
    }
    let tasks: Value = s
        .http
        .get(s.url("/v1/tasks"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tasks, serde_json::json!([]), "no task was created");
}
