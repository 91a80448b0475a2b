//! Three replicas of the server on one PostgreSQL database and one S3 prefix (SeaweedFS), behind a
//! round-robin load balancer (HAProxy): they commit the same models, bit for bit, as one replica
//! does on the same accepted sets, with each replica's sums merged by the round's finaliser; two
//! replicas taking the same upload at once store it once; and a round whose finaliser is killed
//! mid-finalisation is finished by another replica, with the same bits.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fedhive_client::client::FedhiveClient;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, Balancer, S3Prefix, ServerProcess, TestDb, assign, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::{FedAvgAccumulator, NamedTensors};
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

impl Deployment {
    async fn start(replicas: usize) -> Deployment {
        let db = TestDb::create(Backend::Postgres).await.unwrap();
        let s3 = S3Prefix::new();
        let mut servers = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..replicas {
            let dir = tempfile::tempdir().unwrap();
            let name = format!("r{i}");
            let flags = ["--replica-name", &name, "--finalise-lease-ms", LEASE_MS];
            servers.push(
                ServerProcess::start_on_s3_with(dir.path(), &db, &s3, &flags)
                    .await
                    .unwrap(),
            );
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

/// Round r (1-based): every device checks in and uploads, all at once; then the new model.
async fn run_round(client: &FedhiveClient, task: &str, r: usize) -> Bytes {
    let mut assignments = Vec::new();
    for _ in 0..DEVICES {
        assignments.push(assign(client, task).await);
    }
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

#[tokio::test(flavor = "multi_thread")]
async fn a_round_whose_finaliser_dies_is_finished_by_another_replica() {
    let mut d = Deployment::start(3).await;
    let client = d.client();
    let task = create_task(&client, 1).await;
    let mut assignments = Vec::new();
    for _ in 0..DEVICES {
        assignments.push(assign(&client, &task).await);
    }
    // All but the last update, through the balancer: each replica folds some.
    for (j, a) in assignments.iter().enumerate().take(DEVICES - 1) {
        let (n, delta) = update(1, j);
        client
            .upload_update(&a.upload_token, n, Bytes::from(delta.encode()))
            .await
            .unwrap();
    }
    // A replica that holds some of those sums stops (alive by its heartbeat, silent): the
    // finaliser now waits for its sums, long enough to be killed while it holds the lease.
    let holders: Vec<String> = sqlx::query(
        "SELECT DISTINCT p.name FROM updates u JOIN replicas p ON p.id = u.replica ORDER BY p.name",
    )
    .fetch_all(&mut d.sql().await)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get("name"))
    .collect();
    let stopped: usize = holders[0].strip_prefix('r').unwrap().parse().unwrap();
    d.replicas[stopped].signal("STOP");
    let (n, delta) = update(1, DEVICES - 1);
    d.replicas[(stopped + 1) % 3]
        .client()
        .upload_update(
            &assignments[DEVICES - 1].upload_token,
            n,
            Bytes::from(delta.encode()),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let finaliser = loop {
        if let Some(f) = d.finaliser(&task).await {
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
        "SELECT COUNT(*) AS n FROM updates u JOIN replicas p ON p.id = u.replica WHERE p.name = $1",
    )
    .bind(format!("r{finaliser}"))
    .fetch_one(&mut d.sql().await)
    .await
    .unwrap()
    .get("n");
    d.replicas[finaliser].kill();
    // From the database: a request could reach the stopped replica.
    let version: i64 = sqlx::query("SELECT model_version FROM tasks WHERE id = $1")
        .bind(&task)
        .fetch_one(&mut d.sql().await)
        .await
        .unwrap()
        .get("model_version");
    assert_eq!(version, 0, "the round committed before its finaliser was killed");
    d.replicas[stopped].signal("CONT");

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
    assert_eq!(reread, held_by_finaliser as u64);
    assert_eq!(local + partial + reread, DEVICES as u64);
}
