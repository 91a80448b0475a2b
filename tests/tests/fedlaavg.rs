//! FedLaAvg end to end: enrolment and device credentials, the selection window and
//! least-recently-participated selection, the server step against hand-computed values, a device
//! whose local state was wiped, and exactly-once application across SIGKILL restarts; on SQLite and
//! PostgreSQL.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fedhive_client::client::FedhiveClient;
use fedhive_e2e::{
    Backend, ServerProcess, TestDb, on_both_databases, small_task, small_tensors, wait_for_version,
};
use fedhive_shared::{
    NamedTensors,
    wire::{Assignment, CheckinResponse, DeviceCredentials, StrategyConfig, UploadKind, UploadReceipt},
};

on_both_databases!(
    selection_is_least_recently_participated_first,
    wiped_device_uploads_only_its_new_sum,
    kill_mid_round_applies_each_update_once,
);

/// gamma: the task's learning rate (`small_task`).
const GAMMA: f64 = 0.1;
/// Long enough that every test device checks in inside it even on a loaded machine.
const WINDOW_MS: u64 = 1500;

fn fedlaavg_task(k: u32, rounds: u32) -> fedhive_shared::wire::TaskConfig {
    let mut task = small_task(k, 1, rounds, 120);
    task.strategy = StrategyConfig::FedLaAvg {
        warmup_rounds: 0,
        selection_window_ms: WINDOW_MS,
    };
    task.over_selection = 1.0;
    task
}

fn initial() -> NamedTensors {
    small_tensors(|i| i as f32 * 0.5 - 1.0)
}

/// Device `j`'s gradient sum in the round of seq `r`: multiples of 1/8, exact in fixed point and in f32.
fn grad(j: usize, r: i64) -> NamedTensors {
    small_tensors(|i| ((j * 5 + i * 3 + r as usize * 7) % 11) as f32 * 0.125 - 0.625)
}

struct Fed {
    server: ServerProcess,
    _db: TestDb,
    _dir: tempfile::TempDir,
    admin: FedhiveClient,
    task: String,
    /// Enrolled devices, sorted by device id (the selection's tie-break).
    devices: Vec<DeviceCredentials>,
}

async fn start(backend: Backend, k: u32, rounds: u32, devices: usize) -> Fed {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let admin = server.client();
    let task = admin
        .create_task(&fedlaavg_task(k, rounds), initial().encode())
        .await
        .unwrap()
        .task_id;
    let mut creds = Vec::new();
    for _ in 0..devices {
        creds.push(admin.enrol(&task).await.unwrap());
    }
    creds.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Fed {
        server,
        _db: db,
        _dir: dir,
        admin,
        task,
        devices: creds,
    }
}

/// The devices `available` check in during the open round's window, come back when told, and
/// return the assignments they got, by device index. Panics if a check-in misses the window.
async fn select(fed: &Fed, available: &[usize]) -> Vec<(usize, Assignment)> {
    let client = fed.server.client();
    let mut wait_ms = 0;
    for &j in available {
        match client.checkin_as(&fed.task, &fed.devices[j]).await.unwrap() {
            CheckinResponse::RetryAfter {
                retry_after_ms,
                reason,
            } if reason == "selection_window" => wait_ms = wait_ms.max(retry_after_ms),
            other => panic!("device {j} should be inside the selection window, got {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let mut assigned = Vec::new();
    for &j in available {
        match client.checkin_as(&fed.task, &fed.devices[j]).await.unwrap() {
            CheckinResponse::Assigned(a) => {
                assert_eq!(a.upload, UploadKind::GradientSum);
                assigned.push((j, a));
            }
            CheckinResponse::RetryAfter { reason, .. } => assert_eq!(reason, "not_selected"),
            other => panic!("unexpected check-in answer {other:?}"),
        }
    }
    assigned
}

/// Device `j` uploads its gradient sum for the round of seq `r`.
async fn upload(client: &FedhiveClient, a: &Assignment, j: usize, r: i64) -> Result<UploadReceipt, String> {
    let body = Bytes::from(grad(j, r).encode());
    client
        .upload_update(&a.upload_token, 10 + j as u64, body)
        .await
        .map_err(|e| e.to_string())
}

/// The seq of a round (ids may skip values after a crash; seqs are 1, 2, ... per task).
async fn seq_of(fed: &Fed, round_id: i64) -> i64 {
    let rounds = fed.admin.rounds(&fed.task).await.unwrap();
    rounds.iter().find(|r| r.round_id == round_id).unwrap().seq
}

async fn model(fed: &Fed, version: i64) -> NamedTensors {
    wait_for_version(&fed.admin, &fed.task, version, Duration::from_secs(60)).await;
    let bytes = fed
        .admin
        .download_model(&fed.task, Some(version))
        .await
        .unwrap()
        .1;
    NamedTensors::decode(&bytes).unwrap()
}

/// `x - gamma * (sum of the latest G_i) / n`, in f64 per value, as the hand computation.
fn expected_step(x: &NamedTensors, latest: &[Option<NamedTensors>], n: usize) -> NamedTensors {
    let mut out = x.clone();
    for (name, t) in &mut out.0 {
        for (i, v) in t.data.iter_mut().enumerate() {
            let sum: f64 = latest
                .iter()
                .flatten()
                .map(|g| f64::from(g.0[name].data[i]))
                .sum();
            *v = (f64::from(*v) - GAMMA * sum / n as f64) as f32;
        }
    }
    out
}

fn assert_close(found: &NamedTensors, expected: &NamedTensors, what: &str) {
    for (name, t) in &expected.0 {
        for (i, (&e, &f)) in t.data.iter().zip(&found.0[name].data).enumerate() {
            assert!(
                (e - f).abs() <= 1e-6,
                "{what}: `{name}`[{i}] is {f}, expected {e}"
            );
        }
    }
}

async fn selection_is_least_recently_participated_first(backend: Backend) {
    let fed = start(backend, 2, 3, 4).await;
    let raw = fed.server.raw_client();

    // Refusals first: no credentials, a wrong secret, an unknown device, enrolling in a FedAvg task.
    let err = raw.checkin(&fed.task).await.unwrap_err();
    assert_eq!(err.code(), Some("device_unauthorized"), "{err}");
    let mut wrong = fed.devices[0].clone();
    wrong.device_secret = "0".repeat(64);
    let err = raw.checkin_as(&fed.task, &wrong).await.unwrap_err();
    assert_eq!(err.code(), Some("device_unauthorized"), "{err}");
    wrong.device_id = "d-unknown".into();
    let err = raw.checkin_as(&fed.task, &wrong).await.unwrap_err();
    assert_eq!(err.code(), Some("device_unauthorized"), "{err}");
    let fedavg = fed
        .admin
        .create_task(&small_task(1, 1, 1, 60), initial().encode())
        .await
        .unwrap()
        .task_id;
    let err = raw.enrol(&fedavg).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");

    let mut latest: Vec<Option<NamedTensors>> = vec![None; 4];
    let mut x = initial();
    // Round 1: all four available, none has participated: the two smallest ids.
    // Round 2: all four available: the two that have not participated yet.
    // Round 3: devices 1, 2, 3 available: R = (1, 2, 2): device 1, then device 2 by the id tie-break.
    let plan: [(&[usize], &[usize]); 3] = [
        (&[0, 1, 2, 3], &[0, 1]),
        (&[3, 2, 1, 0], &[2, 3]),
        (&[3, 1, 2], &[1, 2]),
    ];
    for (version, (available, picked)) in (1i64..).zip(plan) {
        let assigned = select(&fed, available).await;
        let mut got: Vec<usize> = assigned.iter().map(|(j, _)| *j).collect();
        got.sort();
        assert_eq!(got, picked, "round {version}: available {available:?}");
        // A device that was not picked, or comes after the selection, is told to retry later.
        if version == 3 {
            match raw.checkin_as(&fed.task, &fed.devices[0]).await.unwrap() {
                CheckinResponse::RetryAfter { reason, .. } => assert_eq!(reason, "not_selected"),
                other => panic!("late device got {other:?}"),
            }
        }
        // A second check-in of an assigned device does not get a second token.
        let (j, _) = &assigned[0];
        match raw.checkin_as(&fed.task, &fed.devices[*j]).await.unwrap() {
            CheckinResponse::RetryAfter { reason, .. } => assert_eq!(reason, "already_assigned"),
            other => panic!("device {j} asked twice in one round and got {other:?}"),
        }
        for (j, a) in &assigned {
            upload(&raw, a, *j, version).await.unwrap();
            latest[*j] = Some(grad(*j, version));
        }
        let found = model(&fed, version).await;
        x = expected_step(&x, &latest, 4);
        assert_close(&found, &x, &format!("model version {version}"));
        x = found;
    }
    let devices = fed.admin.devices(&fed.task).await.unwrap();
    let last: Vec<Option<i64>> = fed
        .devices
        .iter()
        .map(|c| {
            devices
                .iter()
                .find(|d| d.device_id == c.device_id)
                .unwrap()
                .last_round_seq
        })
        .collect();
    assert_eq!(last, vec![Some(1), Some(3), Some(3), Some(2)]);
    match raw.checkin_as(&fed.task, &fed.devices[0]).await.unwrap() {
        CheckinResponse::Finished { model_version } => assert_eq!(model_version, 3),
        other => panic!("expected finished, got {other:?}"),
    }
}

async fn wiped_device_uploads_only_its_new_sum(backend: Backend) {
    // N = 2, K = 1. Round 1: device 0 uploads G_a. Its phone is then wiped: nothing survives but
    // its credentials (re-entered from the app's account, say), so a new client in a new process
    // takes part in round 2 and uploads G_b. The server must replace G_a by G_b in T: the round's
    // step is gamma * G_b / 2, not gamma * (G_a + G_b) / 2.
    let fed = start(backend, 1, 2, 2).await;
    let assigned = select(&fed, &[0]).await;
    assert_eq!(assigned.len(), 1);
    let g_a = grad(0, 1);
    upload(&fed.server.client(), &assigned[0].1, 0, 1).await.unwrap();
    let x1 = model(&fed, 1).await;
    assert_close(
        &x1,
        &expected_step(&initial(), &[Some(g_a.clone()), None], 2),
        "round 1",
    );

    let wiped = FedhiveClient::new(&fed.server.base_url).unwrap();
    let credentials = fed.devices[0].clone();
    let assigned = select(&fed, &[0]).await;
    assert_eq!(assigned.len(), 1, "the only available device is selected");
    let a = &assigned[0].1;
    let g_b = grad(0, 2);
    wiped
        .upload_update(&a.upload_token, 10, Bytes::from(g_b.encode()))
        .await
        .unwrap();
    let x2 = model(&fed, 2).await;
    assert_close(&x2, &expected_step(&x1, &[Some(g_b.clone()), None], 2), "round 2");
    let corrupted = expected_step(&x1, &[Some(g_a), Some(g_b)], 2);
    assert!(x2 != corrupted, "G_a was not replaced");
    let devices = fed.admin.devices(&fed.task).await.unwrap();
    let me = devices
        .iter()
        .find(|d| d.device_id == credentials.device_id)
        .unwrap();
    assert_eq!(me.last_round_seq, Some(seq_of(&fed, a.round_id).await));
}

/// Runs rounds 1-3 with all four devices selected each round (K = N = 4); with `crash`, SIGKILLs
/// the server in round 2 with two uploads acknowledged and two in flight (every device then
/// retries), and in round 3 right after the last acknowledgement. Returns the three models' bytes.
async fn three_rounds(backend: Backend, crash: bool) -> Vec<Bytes> {
    let mut fed = start(backend, 4, 3, 4).await;
    let mut models = Vec::new();
    let mut latest: Vec<Option<NamedTensors>> = vec![None; 4];
    let mut x = initial();
    for version in 1..=3i64 {
        let assigned = select(&fed, &[0, 1, 2, 3]).await;
        assert_eq!(assigned.len(), 4);
        let raw = fed.server.raw_client();
        let mut acked: Vec<(usize, UploadReceipt)> = Vec::new();
        if crash && version == 2 {
            for (j, a) in &assigned[..2] {
                acked.push((*j, upload(&raw, a, *j, version).await.unwrap()));
            }
            let mut in_flight = Vec::new();
            for (j, a) in assigned[2..].iter().cloned() {
                let raw = raw.clone();
                in_flight.push(tokio::spawn(
                    async move { (j, upload(&raw, &a, j, version).await) },
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            fed.server.kill();
            for h in in_flight {
                if let (j, Ok(r)) = h.await.unwrap() {
                    acked.push((j, r));
                }
            }
            eprintln!("acknowledged before SIGKILL: {} of 4", acked.len());
            fed.server.restart().await.unwrap();
        }
        let client = fed.server.client();
        for (j, a) in &assigned {
            let receipt = upload(&client, a, *j, version).await.unwrap();
            if let Some((_, before)) = acked.iter().find(|(k, _)| k == j) {
                assert_eq!(&receipt, before, "acknowledged upload of device {j} changed");
            }
            assert_eq!(seq_of(&fed, a.round_id).await, version);
            latest[*j] = Some(grad(*j, version));
        }
        if crash && version == 3 {
            fed.server.kill();
            fed.server.restart().await.unwrap();
        }
        let found = model(&fed, version).await;
        x = expected_step(&x, &latest, 4);
        assert_close(&found, &x, &format!("model version {version}"));
        x = found;
        let rounds = fed.admin.rounds(&fed.task).await.unwrap();
        let this = rounds.iter().find(|r| r.seq == version).unwrap();
        assert_eq!(this.accepted, 4, "round {version} counts each device once");
        models.push(
            fed.admin
                .download_model(&fed.task, Some(version))
                .await
                .unwrap()
                .1,
        );
    }
    let status = fed.admin.task_status(&fed.task).await.unwrap();
    assert_eq!((status.model_version, status.committed_rounds), (3, 3));
    models
}

async fn kill_mid_round_applies_each_update_once(backend: Backend) {
    let started = Instant::now();
    let expected = three_rounds(backend, false).await;
    let crashed = three_rounds(backend, true).await;
    assert!(crashed == expected, "the crashed run committed different models");
    eprintln!("two runs of three rounds in {:?}", started.elapsed());
}
