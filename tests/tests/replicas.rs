//! Three replicas of the server on one PostgreSQL database and one S3 prefix (SeaweedFS), behind a
//! round-robin load balancer (HAProxy): they commit the same models, bit for bit, as one replica
//! does on the same accepted sets, with each replica's sums merged by the round's finaliser (FedAvg)
//! or each replica's table copy brought up to date from the table history (FedSubAvg); two
//! replicas taking the same upload at once store it once; a round whose finaliser is killed
//! mid-finalisation is finished by another replica, with the same bits; and heat is frozen on every
//! replica while one finalises.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fedhive_client::client::{FedhiveClient, RetryPolicy};
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, Balancer, S3Prefix, ServerProcess, TestDb, assign, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::{
    FedAvgAccumulator, NamedTensors, Tensor, TensorSpec,
    fedsubavg::SubAvgForm,
    sparse::{FeatureSet, RowsRequest, SparseRows, SparseTensors},
    wire::Assignment,
    wire::{StrategyConfig, TaskConfig},
};
use sqlx::{Connection, Row};

const DEVICES: usize = 6;
const ROUNDS: usize = 3;
/// Short, so that a dead finaliser's round is taken over within the test's patience.
const LEASE_MS: &str = "1500";

/// Device j's update in round r, and its sample count: irregular values, so that float summation
/// order would show in the bits.
fn update(r: usize, j: usize) -> (u64, NamedTensors) {
    let n = 10 + 7 * j as u64 + r as u64;
    let delta = small_tensors(|i| ((j * 7 + i * 3 + r * 5) % 17) as f32 * 0.371 - 3.003 + (j as f32) * 1e-3);
    (n, delta)
}

fn initial() -> NamedTensors {
    small_tensors(|i| (i as f32).sin())
}

/// One deployment under test: its replicas (fields drop in order: servers before the database).
struct Deployment {
    replicas: Vec<ServerProcess>,
    balancer: Option<Balancer>,
    db: TestDb,
    s3: S3Prefix,
    _dirs: Vec<tempfile::TempDir>,
}

/// A replica named `name` on the deployment's database and S3 prefix, with its own data folder.
async fn start_replica(db: &TestDb, s3: &S3Prefix, name: &str) -> (ServerProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--replica-name", name, "--finalise-lease-ms", LEASE_MS];
    let server = ServerProcess::start_on_s3_with(dir.path(), db, s3, &flags)
        .await
        .unwrap();
    (server, dir)
}

impl Deployment {
    async fn start(replicas: usize) -> Deployment {
        let db = TestDb::create(Backend::Postgres).await.unwrap();
        let s3 = S3Prefix::new();
        let mut servers = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..replicas {
            let (server, dir) = start_replica(&db, &s3, &format!("r{i}")).await;
            servers.push(server);
            dirs.push(dir);
        }
        let balancer = if replicas > 1 {
            let ports: Vec<u16> = servers.iter().map(ServerProcess::port).collect();
            Some(Balancer::start(&ports).await.unwrap())
        } else {
            None
        };
        Deployment {
            replicas: servers,
            balancer,
            db,
            s3,
            _dirs: dirs,
        }
    }

    /// A client of the deployment: through the balancer if there is one.
    fn client(&self) -> FedhiveClient {
        match &self.balancer {
            Some(b) => b.client(),
            None => self.replicas[0].client(),
        }
    }

    async fn sql(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(self.db.url.as_deref().unwrap())
            .await
            .unwrap()
    }

    /// The replica (index) that holds the lease to finalise the task's closing round, if any.
    async fn finaliser(&self, task: &str) -> Option<usize> {
        let row = sqlx::query(
            "SELECT p.name FROM rounds r JOIN replicas p ON p.id = r.finaliser \
             WHERE r.task_id = $1 AND r.state = 'closing'",
        )
        .bind(task)
        .fetch_optional(&mut self.sql().await)
        .await
        .unwrap()?;
        let name: String = row.get("name");
        name.strip_prefix('r')?.parse().ok()
    }

    /// Each replica's `fedhive_round_sums_updates` by source, summed over the replicas: (local,
    /// partial, reread).
    async fn round_sums_sources(&self) -> (u64, u64, u64) {
        let mut total = (0, 0, 0);
        for r in &self.replicas {
            if r_is_dead(r) {
                continue;
            }
            let text = reqwest::Client::new()
                .get(format!("{}/metrics", r.base_url))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let count = |source: &str| -> u64 {
                let prefix = format!("fedhive_round_sums_updates_total{{source=\"{source}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .map_or(0, |v| v.trim().parse().unwrap())
            };
            total.0 += count("local");
            total.1 += count("partial");
            total.2 += count("reread");
        }
        total
    }
}

/// A replica this test killed answers nothing.
fn r_is_dead(r: &ServerProcess) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", r.port())).is_err()
}

async fn create_task(client: &FedhiveClient, rounds: usize) -> String {
    client
        .create_task(
            &small_task(DEVICES as u32, DEVICES as u32, rounds as u32, 300),
            initial().encode(),
        )
        .await
        .unwrap()
        .task_id
}

/// Every device checks in, one after another (each gets a token of the open round).
async fn assign_all(client: &FedhiveClient, task: &str) -> Vec<Assignment> {
    let mut assignments = Vec::new();
    for _ in 0..DEVICES {
        assignments.push(assign(client, task).await);
    }
    assignments
}

/// Round r (1-based): every device checks in and uploads, all at once; then the new model.
async fn run_round(client: &FedhiveClient, task: &str, r: usize) -> Bytes {
    let assignments = assign_all(client, task).await;
    let mut uploads = tokio::task::JoinSet::new();
    for (j, a) in assignments.into_iter().enumerate() {
        let client = client.clone();
        uploads.spawn(async move {
            let (n, delta) = update(r, j);
            client
                .upload_update(&a.upload_token, n, Bytes::from(delta.encode()))
                .await
                .unwrap()
        });
    }
    uploads.join_all().await;
    wait_for_version(client, task, r as i64, Duration::from_secs(60)).await;
    client.download_model(task, Some(r as i64)).await.unwrap().1
}

/// The task and its committed models, version 1 first.
async fn federation(deployment: &Deployment) -> (String, Vec<Bytes>) {
    let client = deployment.client();
    let task = create_task(&client, ROUNDS).await;
    let mut models = Vec::new();
    for r in 1..=ROUNDS {
        models.push(run_round(&client, &task, r).await);
    }
    (task, models)
}

/// The model FedAvg commits after round 1 from `initial()`, computed here by the same fixed-point
/// rule.
fn expected_round_1() -> Vec<u8> {
    let mut model = initial();
    let mut acc = FedAvgAccumulator::new(&model.specs());
    for j in 0..DEVICES {
        let (n, delta) = update(1, j);
        acc.add(n, &delta).unwrap();
    }
    acc.apply(&mut model, 1.0);
    model.encode()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_commit_what_one_replica_does() {
    let one = Deployment::start(1).await;
    let (_, alone) = federation(&one).await;
    assert_eq!(&alone[0][..], &expected_round_1()[..]);

    let three = Deployment::start(3).await;
    let (task, together) = federation(&three).await;
    for (v, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "model version {} differs", v + 1);
    }
    // The finalisers merged other replicas' sums, and none had to read an update again.
    let (local, partial, reread) = three.round_sums_sources().await;
    println!(
        "three replicas, {ROUNDS} rounds of {DEVICES}: sums from the finaliser {local}, handed over {partial}, read again {reread}"
    );
    assert_eq!(local + partial + reread, (ROUNDS * DEVICES) as u64);
    assert!(partial > 0, "no replica handed its sums over");
    assert_eq!(reread, 0);
    // The round's updates and the handed-over sums are gone from the bucket once committed.
    let store = three.s3.open(&three._dirs[0].path().join("blobs"));
    let started = Instant::now();
    let rounds = three.client().rounds(&task).await.unwrap();
    for round in rounds {
        while !store
            .list(&format!("updates/{}", round.round_id))
            .await
            .unwrap()
            .is_empty()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {} left blobs",
                round.round_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_taking_one_upload_at_once_store_it_once() {
    let d = Deployment::start(2).await;
    let client = d.client();
    let task = create_task(&client, 1).await;
    let same = assign(&client, &task).await;
    let other = assign(&client, &task).await;
    let (a, b) = (d.replicas[0].raw_client(), d.replicas[1].raw_client());
    let (n, body) = (update(1, 0).0, Bytes::from(update(1, 0).1.encode()));
    // The same bytes, to both replicas at once: one stores them, both answer its receipt.
    let (ra, rb) = tokio::join!(
        a.upload_update(&same.upload_token, n, body.clone()),
        b.upload_update(&same.upload_token, n, body.clone())
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra, rb);
    // Other bytes under one token, to both at once: one is stored, the other is a conflict.
    let (n2, body2) = (update(1, 1).0, Bytes::from(update(1, 1).1.encode()));
    let (n3, body3) = (update(1, 2).0, Bytes::from(update(1, 2).1.encode()));
    let (r2, r3) = tokio::join!(
        a.upload_update(&other.upload_token, n2, body2),
        b.upload_update(&other.upload_token, n3, body3)
    );
    let outcomes = [r2.map_err(|e| e.to_string()), r3.map_err(|e| e.to_string())];
    let stored = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(stored, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .any(|o| o.as_ref().is_err_and(|e| e.contains("conflicting_retry"))),
        "{outcomes:?}"
    );
    let status = client.task_status(&task).await.unwrap();
    assert_eq!(
        status.current_round.unwrap().accepted,
        2,
        "two tokens, two updates"
    );
    // One blob per stored update, none left by the loser.
    let round_id = ra.round_id;
    let store = d.s3.open(&d._dirs[0].path().join("blobs"));
    assert_eq!(store.list(&format!("updates/{round_id}")).await.unwrap().len(), 2);
}

/// Uploads a round's updates (`(token, samples, body)`), all but the last through the balancer;
/// stops a replica that holds some of them (alive by its heartbeat, silent), so that the finaliser
/// waits for its sums, uploads the last one and kills the finaliser while it holds the lease; then
/// lets the stopped one go on. Returns how many updates the killed finaliser had accepted.
async fn kill_the_finaliser_of(d: &mut Deployment, task: &str, uploads: Vec<(String, u64, Bytes)>) -> u64 {
    let client = d.client();
    let (last, rest) = uploads.split_last().unwrap();
    for (token, n, body) in rest {
        client.upload_update(token, *n, body.clone()).await.unwrap();
    }
    let holders: Vec<String> = sqlx::query(
        "SELECT DISTINCT p.name FROM updates u JOIN replicas p ON p.id = u.replica \
         JOIN rounds r ON r.id = u.round_id WHERE r.task_id = $1 AND r.state = 'open' ORDER BY p.name",
    )
    .bind(task)
    .fetch_all(&mut d.sql().await)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get("name"))
    .collect();
    let stopped: usize = holders[0].strip_prefix('r').unwrap().parse().unwrap();
    d.replicas[stopped].signal("STOP");
    d.replicas[(stopped + 1) % 3]
        .client()
        .upload_update(&last.0, last.1, last.2.clone())
        .await
        .unwrap();
    let started = Instant::now();
    let finaliser = loop {
        if let Some(f) = d.finaliser(task).await {
            break f;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no replica took the lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_ne!(finaliser, stopped, "a stopped replica cannot finalise");
    let held_by_finaliser: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM updates u JOIN replicas p ON p.id = u.replica \
         JOIN rounds r ON r.id = u.round_id WHERE p.name = $1 AND r.task_id = $2 AND r.state = 'closing'",
    )
    .bind(format!("r{finaliser}"))
    .bind(task)
    .fetch_one(&mut d.sql().await)
    .await
    .unwrap()
    .get("n");
    // From the database: a request could reach the stopped replica.
    let version_of = |mut sql: sqlx::PgConnection| async move {
        let row = sqlx::query("SELECT model_version FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(&mut sql)
            .await
            .unwrap();
        row.get::<i64, _>("model_version")
    };
    let before = version_of(d.sql().await).await;
    d.replicas[finaliser].kill();
    assert_eq!(
        version_of(d.sql().await).await,
        before,
        "the round committed before its finaliser was killed"
    );
    d.replicas[stopped].signal("CONT");
    held_by_finaliser as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_round_whose_finaliser_dies_is_finished_by_another_replica() {
    let mut d = Deployment::start(3).await;
    let client = d.client();
    let task = create_task(&client, 1).await;
    let mut uploads = Vec::new();
    for (j, a) in assign_all(&client, &task).await.into_iter().enumerate() {
        let (n, delta) = update(1, j);
        uploads.push((a.upload_token, n, Bytes::from(delta.encode())));
    }
    let held_by_finaliser = kill_the_finaliser_of(&mut d, &task, uploads).await;

    // The lease runs out and a surviving replica commits the same bits.
    wait_for_version(&client, &task, 1, Duration::from_secs(60)).await;
    let model = client.download_model(&task, Some(1)).await.unwrap().1;
    assert_eq!(&model[..], &expected_round_1()[..]);
    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!(rounds[0].accepted, DEVICES as i64);
    // The dead finaliser's own sums died with it: exactly its updates were read again; the
    // others' came from the survivors' sums.
    let (local, partial, reread) = d.round_sums_sources().await;
    println!(
        "finaliser killed: the survivor had {local} updates in its own sums, merged {partial} handed over \
         and read {reread} again (the dead finaliser held {held_by_finaliser})"
    );
    assert_eq!(reread, held_by_finaliser);
    assert_eq!(local + partial + reread, DEVICES as u64);
}

// FedSubAvg: sparse tables on every replica.

const EMB_ROWS: u64 = 64;
const COLD_ROWS: u64 = 32;
const SPARSE_ROUNDS: usize = 5;

fn spec(name: &str, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
    }
}

/// A dense `b`, a table `emb` given in the initial weights and a table `cold` left out (zeros).
fn sparse_task() -> TaskConfig {
    TaskConfig {
        tensors: vec![
            spec("b", &[2]),
            spec("emb", &[EMB_ROWS as usize, 4]),
            spec("cold", &[COLD_ROWS as usize, 3]),
        ],
        strategy: StrategyConfig::FedSubAvg {
            server_lr: 1.0,
            form: SubAvgForm::SampleWeighted,
            tables: vec!["emb".into(), "cold".into()],
        },
        ..small_task(DEVICES as u32, DEVICES as u32, SPARSE_ROUNDS as u32, 300)
    }
}

fn sparse_initial() -> NamedTensors {
    let mut m = NamedTensors::default();
    m.0.insert(
        "b".into(),
        Tensor {
            shape: vec![2],
            data: vec![0.5, -0.25],
        },
    );
    m.0.insert(
        "emb".into(),
        Tensor {
            shape: vec![EMB_ROWS as usize, 4],
            data: (0..EMB_ROWS * 4).map(|i| (i as f32 * 0.37).sin()).collect(),
        },
    );
    m
}

/// Device j's rows: two of its own, one of a shared middle band, four hot rows everyone holds;
/// and two of `cold`.
fn device_rows(j: usize) -> BTreeMap<String, Vec<u64>> {
    let j = j as u64;
    let emb: BTreeSet<u64> = [j, j + 6, 20 + (j * 7) % 40, 60, 61, 62, 63].into();
    let cold: BTreeSet<u64> = [(j * 5) % COLD_ROWS, COLD_ROWS - 1].into();
    BTreeMap::from([
        ("emb".to_string(), emb.into_iter().collect()),
        ("cold".to_string(), cold.into_iter().collect()),
    ])
}

fn sparse_samples(j: usize) -> u64 {
    10 + 3 * j as u64
}

/// Device j's update in round r: irregular values on its rows.
fn sparse_update(r: usize, j: usize) -> Bytes {
    let value = |id: u64, k: usize| ((r * 31 + j * 17 + id as usize * 7 + k * 3) % 23) as f32 * 0.113 - 1.2;
    let mut update = SparseTensors::default();
    update.dense.0.insert(
        "b".into(),
        Tensor {
            shape: vec![2],
            data: vec![value(0, 0), value(1, 1)],
        },
    );
    for (table, ids) in device_rows(j) {
        let width = if table == "emb" { 4 } else { 3 };
        let mut rows = SparseRows::new(width);
        for id in ids {
            let row: Vec<f32> = (0..width).map(|k| value(id, k)).collect();
            rows.push(id, &row);
        }
        update.tables.insert(table, rows);
    }
    Bytes::from(update.encode())
}

fn every_row(version: Option<i64>) -> RowsRequest {
    RowsRequest {
        version,
        rows: BTreeMap::from([
            ("emb".to_string(), (0..EMB_ROWS).collect()),
            ("cold".to_string(), (0..COLD_ROWS).collect()),
        ]),
    }
}

/// Creates the task and enrols the devices (through `client`: across the replicas).
async fn sparse_task_with_devices(client: &FedhiveClient) -> String {
    let task = client
        .create_task(&sparse_task(), sparse_initial().encode())
        .await
        .unwrap()
        .task_id;
    for j in 0..DEVICES {
        let features = FeatureSet {
            num_samples: sparse_samples(j),
            rows: device_rows(j),
        };
        client
            .enrol_features(&task, &format!("device-{j}"), &features)
            .await
            .unwrap();
    }
    task
}

/// Round r (1-based): each device checks in, downloads its submodel of version r - 1 and uploads,
/// all at once; then every row of the new version.
async fn sparse_round(client: &FedhiveClient, task: &str, r: usize) -> Bytes {
    let assignments = assign_all(client, task).await;
    let mut devices = tokio::task::JoinSet::new();
    for (j, a) in assignments.into_iter().enumerate() {
        let (client, task) = (client.clone(), task.to_string());
        devices.spawn(async move {
            let request = RowsRequest {
                version: Some(r as i64 - 1),
                rows: device_rows(j),
            };
            let (version, _) = client.download_submodel(&task, &request).await.unwrap();
            assert_eq!(version, r as i64 - 1);
            client
                .upload_update(&a.upload_token, sparse_samples(j), sparse_update(r, j))
                .await
                .unwrap()
        });
    }
    devices.join_all().await;
    wait_for_version(client, task, r as i64, Duration::from_secs(60)).await;
    let (version, rows) = client.download_submodel(task, &every_row(None)).await.unwrap();
    assert_eq!(version, r as i64);
    rows
}

/// The versions of a task's table snapshots and journals in the bucket.
async fn table_history(d: &Deployment, task: &str) -> (Vec<i64>, Vec<i64>) {
    let store = d.s3.open(&d._dirs[0].path().join("blobs"));
    let versions = |names: Vec<String>, suffix: &str| -> Vec<i64> {
        let mut v: Vec<i64> = names
            .iter()
            .filter_map(|n| n.strip_suffix(suffix)?.parse().ok())
            .collect();
        v.sort_unstable();
        v
    };
    let snapshots = store.list(&format!("table-snapshots/{task}")).await.unwrap();
    let journals = store.list(&format!("journals/{task}")).await.unwrap();
    (versions(snapshots, ".json"), versions(journals, ".safetensors"))
}

#[tokio::test(flavor = "multi_thread")]
async fn fedsubavg_on_three_replicas_commits_what_one_replica_does() {
    let one = Deployment::start(1).await;
    let task_alone = sparse_task_with_devices(&one.client()).await;
    let mut alone = Vec::new();
    for r in 1..=SPARSE_ROUNDS {
        alone.push(sparse_round(&one.client(), &task_alone, r).await);
    }

    let three = Deployment::start(3).await;
    let client = three.client();
    let task = sparse_task_with_devices(&client).await;
    let mut together = Vec::new();
    let mut late = None;
    for r in 1..=SPARSE_ROUNDS {
        together.push(sparse_round(&client, &task, r).await);
        if r == 1 {
            // A fourth replica outside the balancer reads version 1, then stops until the end.
            let (replica, dir) = start_replica(&three.db, &three.s3, "late").await;
            let (version, rows) = replica
                .client()
                .download_submodel(&task, &every_row(None))
                .await
                .unwrap();
            assert_eq!((version, &rows), (1, &together[0]));
            replica.signal("STOP");
            late = Some((replica, dir));
        }
    }
    let (late, _late_dir) = late.unwrap();
    late.signal("CONT");
    for (v, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "model version {} differs", v + 1);
    }
    let last_version = Some(SPARSE_ROUNDS as i64);
    let dense_alone = one
        .client()
        .download_model(&task_alone, last_version)
        .await
        .unwrap();
    let dense_together = client.download_model(&task, last_version).await.unwrap();
    assert_eq!(dense_alone, dense_together);
    // The finalisers merged the other replicas' sparse sums and read no update again.
    let (local, partial, reread) = three.round_sums_sources().await;
    println!(
        "FedSubAvg on three replicas: sums from the finaliser {local}, handed over {partial}, read again {reread}"
    );
    assert_eq!(local + partial + reread, (SPARSE_ROUNDS * DEVICES) as u64);
    assert!(partial > 0, "no replica handed its sums over");
    assert_eq!(reread, 0);

    // The finaliser snapshotted the tables once the journals outweighed them, and removed what the
    // snapshot covers (after the commit: wait for it).
    let started = Instant::now();
    let (snapshots, journals) = loop {
        let (snapshots, journals) = table_history(&three, &task).await;
        if snapshots.len() == 1 && snapshots[0] > 0 && journals.iter().all(|&v| v > snapshots[0]) {
            break (snapshots, journals);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "table history not compacted: snapshots {snapshots:?}, journals {journals:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("after {SPARSE_ROUNDS} rounds: table snapshot of version {snapshots:?}, journals {journals:?}");

    // Every replica serves the last version's rows, bit for bit: the late one, whose next journal
    // is gone, from the snapshot; a new one, with no copy at all, too.
    let last = together.last().unwrap();
    let (fresh, _fresh_dir) = start_replica(&three.db, &three.s3, "fresh").await;
    for replica in three.replicas.iter().chain([&late, &fresh]) {
        let (version, rows) = replica
            .client()
            .download_submodel(&task, &every_row(Some(SPARSE_ROUNDS as i64)))
            .await
            .unwrap();
        assert_eq!((version, &rows), (SPARSE_ROUNDS as i64, last));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn enrolments_wait_for_a_round_another_replica_finalises() {
    let d = Deployment::start(2).await;
    let task = sparse_task_with_devices(&d.client()).await;
    let population = |client: FedhiveClient, task: String| async move {
        client.heat(&task, &every_row(None)).await.unwrap().population
    };
    let before = population(d.client(), task.clone()).await;
    assert_eq!(before.devices, DEVICES as u64);
    // A finaliser that is not one of these replicas holds the round: heat is frozen for both.
    sqlx::query(
        "UPDATE rounds SET state = 'closing', finaliser = 'elsewhere', finaliser_until = $2 \
         WHERE task_id = $1 AND state = 'open'",
    )
    .bind(&task)
    .bind(i64::MAX)
    .execute(&mut d.sql().await)
    .await
    .unwrap();
    let newcomer = FeatureSet {
        num_samples: 5,
        rows: device_rows(0),
    };
    for replica in &d.replicas {
        let once = replica.client().with_retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        });
        let refused = once
            .enrol_features(&task, "newcomer", &newcomer)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("round_closing"), "{refused}");
    }
    assert_eq!(population(d.client(), task.clone()).await, before);
    // Its lease runs out: a replica finalises the round (no updates: abandoned, the next opens),
    // and the enrolment goes through.
    sqlx::query("UPDATE rounds SET finaliser_until = 0 WHERE task_id = $1 AND state = 'closing'")
        .bind(&task)
        .execute(&mut d.sql().await)
        .await
        .unwrap();
    let enrolled = d
        .client()
        .with_retry(RetryPolicy {
            max_attempts: 30,
            ..RetryPolicy::default()
        })
        .enrol_features(&task, "newcomer", &newcomer)
        .await
        .unwrap();
    assert!(enrolled.changed);
    assert_eq!(enrolled.population.devices, DEVICES as u64 + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fedsubavg_round_whose_finaliser_dies_is_finished_by_another_replica() {
    // What one replica commits in two rounds.
    let one = Deployment::start(1).await;
    let task_alone = sparse_task_with_devices(&one.client()).await;
    let mut alone = Vec::new();
    for r in 1..=2 {
        alone.push(sparse_round(&one.client(), &task_alone, r).await);
    }

    let mut d = Deployment::start(3).await;
    let client = d.client();
    let task = sparse_task_with_devices(&client).await;
    assert_eq!(sparse_round(&client, &task, 1).await, alone[0]);
    let mut uploads = Vec::new();
    for (j, a) in assign_all(&client, &task).await.into_iter().enumerate() {
        uploads.push((a.upload_token, sparse_samples(j), sparse_update(2, j)));
    }
    kill_the_finaliser_of(&mut d, &task, uploads).await;

    // A surviving replica finalises round 2 from its own table copy: the same rows, the same
    // dense tensors; every survivor serves them.
    wait_for_version(&client, &task, 2, Duration::from_secs(60)).await;
    let alone_dense = one.client().download_model(&task_alone, Some(2)).await.unwrap();
    assert_eq!(client.download_model(&task, Some(2)).await.unwrap(), alone_dense);
    for replica in d.replicas.iter().filter(|r| !r_is_dead(r)) {
        let (version, rows) = replica
            .client()
            .download_submodel(&task, &every_row(Some(2)))
            .await
            .unwrap();
        assert_eq!((version, &rows), (2, &alone[1]));
    }
}
