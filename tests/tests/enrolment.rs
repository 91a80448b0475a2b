//! Device identity end to end: enrolment keys, devices enrolled with them, tasks that require
//! enrolled devices, revocation that holds from the next request, FedLaAvg with key-enrolled
//! devices, and the per-device rate limit; on SQLite and PostgreSQL.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use fedhive_client::{
    backend::Backend as Compute,
    client::FedhiveClient,
    data::{Dataset, IMAGE_PIXELS, NUM_CLASSES},
    device::Device,
    model::{ModelKind, initial_weights, tensor_specs},
};
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, on_both_databases, small_task, small_tensors,
};
use fedhive_shared::wire::{
    Assignment, CheckinResponse, DeviceCredentials, MetricsReport, StrategyConfig, TaskConfig,
};

on_both_databases!(
    an_enrolled_device_trains_through_the_sdk_and_anonymous_ones_are_refused,
    an_upload_token_serves_only_the_device_it_was_issued_to,
    revoking_a_key_refuses_its_enrolments_and_its_devices_at_once,
    revoking_a_device_refuses_its_next_checkin,
    fedlaavg_admits_devices_enrolled_with_a_key,
    the_per_device_rate_limit_answers_429_and_recovers,
);

/// Fields drop in order: the server stops before its database and directory go.
struct Setup {
    server: ServerProcess,
    _db: TestDb,
    _dir: tempfile::TempDir,
    /// Operator client (admin token), retries like a device's.
    admin: FedhiveClient,
    /// A client that does not retry, to observe every answer.
    raw: FedhiveClient,
}

async fn setup(backend: Backend, flags: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start_with(dir.path(), &db, flags).await.unwrap();
    let (admin, raw) = (server.client(), server.raw_client());
    Setup {
        server,
        _db: db,
        _dir: dir,
        admin,
        raw,
    }
}

/// A FedAvg task on the tiny model that admits only enrolled devices.
fn enrolled_task(k: u32) -> TaskConfig {
    TaskConfig {
        require_enrolled_device: true,
        update_encoding: Default::default(),
        ..small_task(k, k, 5, 120)
    }
}

async fn create(s: &Setup, config: &TaskConfig) -> String {
    s.admin
        .create_task(config, small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id
}

async fn enrol(s: &Setup, key: &str) -> DeviceCredentials {
    s.raw.enrol_device(key).await.unwrap()
}

async fn assigned(s: &Setup, task: &str, device: &DeviceCredentials) -> Assignment {
    match s.raw.checkin_as(task, device).await.unwrap() {
        CheckinResponse::Assigned(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn update() -> Bytes {
    Bytes::from(small_tensors(|i| i as f32 * 0.01).encode())
}

/// The error code of a refused request.
fn code<T: std::fmt::Debug>(result: Result<T, fedhive_client::client::ClientError>) -> String {
    let err = result.expect_err("the request should be refused");
    err.code()
        .unwrap_or_else(|| panic!("no error code in {err}"))
        .to_string()
}

/// Random images and labels: enough for the SDK's local training to run.
fn synthetic_data(n: usize) -> Arc<Dataset> {
    Arc::new(Dataset {
        images: (0..n * IMAGE_PIXELS).map(|_| rand::random::<f32>()).collect(),
        labels: (0..n).map(|_| rand::random_range(0..NUM_CLASSES as u8)).collect(),
    })
}

async fn an_enrolled_device_trains_through_the_sdk_and_anonymous_ones_are_refused(backend: Backend) {
    let s = setup(backend, &[]).await;
    let key = s.admin.create_enrolment_key("app 1.4.0").await.unwrap();
    assert_eq!(key.name, "app 1.4.0");
    let kind = ModelKind::MlpSmall;
    let config = TaskConfig {
        model: kind.name().into(),
        tensors: tensor_specs(kind),
        ..enrolled_task(1)
    };
    let task = s
        .admin
        .create_task(&config, initial_weights(kind, 1).encode())
        .await
        .unwrap()
        .task_id;
    assert!(
        s.admin
            .task_status(&task)
            .await
            .unwrap()
            .config
            .require_enrolled_device
    );

    // No credential, or one that the server never issued: refused.
    assert_eq!(code(s.raw.checkin(&task).await), "device_unauthorized");
    let forged = DeviceCredentials {
        device_id: "dv-000000000000000000000000".into(),
        device_secret: "0".repeat(64),
    };
    assert_eq!(
        code(s.raw.checkin_as(&task, &forged).await),
        "device_unauthorized"
    );
    // Open per-task enrolment cannot get past the keys (FedAvg has none anyway).
    assert_eq!(code(s.raw.enrol(&task).await), "invalid_request");

    // The SDK device enrols with the key, then checks in, downloads, trains, uploads with its
    // credential and reports its metrics until the task finishes.
    let client = s.server.client();
    let compute = Compute::Flex.device().unwrap();
    let mut device = Device::new(client, &task, compute, synthetic_data(32), 7);
    let credentials = device.enrol_with_key(&key.enrolment_key).await.unwrap().clone();
    assert!(credentials.device_id.starts_with("dv-"));
    let report = device.run().await.unwrap();
    // The task has 5 rounds of K = 1: this device is its only one, and trains them all.
    assert_eq!(report.updates_accepted, 5, "{report:?}");
    assert_eq!(s.admin.task_status(&task).await.unwrap().committed_rounds, 5);
    let rounds = s.admin.rounds(&task).await.unwrap();
    assert!(
        rounds
            .iter()
            .all(|r| r.reports.as_ref().is_some_and(|m| m.devices == 1)),
        "every round has the device's metrics: {rounds:?}"
    );

    // A stored credential works in a new session of the app.
    let again = Device::new(
        s.server.client(),
        &task,
        Compute::Flex.device().unwrap(),
        synthetic_data(8),
        8,
    )
    .with_credentials(credentials.clone());
    assert!(matches!(
        again.checkin().await.unwrap(),
        CheckinResponse::Finished { .. }
    ));

    // Operators see the key and the device, never a secret or a hash.
    let keys = s.admin.enrolment_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!((keys[0].devices, keys[0].revoked_ms), (1, None));
    let devices = s.admin.enrolled_devices(Some(&key.key_id)).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id, credentials.device_id);
    assert_eq!(devices[0].key_id.as_deref(), Some(key.key_id.as_str()));
    let http = reqwest::Client::new();
    for path in ["/v1/enrolment-keys", "/v1/devices"] {
        let text = http
            .get(format!("{}{path}", s.server.base_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let secret = key.enrolment_key.split_once(':').unwrap().1;
        assert!(
            !text.contains(secret) && !text.contains(&credentials.device_secret),
            "{text}"
        );
        assert!(!text.contains("hash"), "{text}");
    }
}

async fn an_upload_token_serves_only_the_device_it_was_issued_to(backend: Backend) {
    let s = setup(backend, &[]).await;
    let key = s.admin.create_enrolment_key("app 2").await.unwrap().enrolment_key;
    let (a, b) = (enrol(&s, &key).await, enrol(&s, &key).await);
    let task = create(&s, &enrolled_task(2)).await;

    let token = assigned(&s, &task, &a).await.upload_token;
    // One token per device and round: a second check-in does not take another of the round's.
    match s.raw.checkin_as(&task, &a).await.unwrap() {
        CheckinResponse::RetryAfter { reason, .. } => assert_eq!(reason, "already_assigned"),
        other => panic!("expected already_assigned, got {other:?}"),
    }
    let status = s.admin.task_status(&task).await.unwrap();
    assert_eq!(status.current_round.unwrap().assigned, 1);

    // Without a credential, or with another device's, the token is refused.
    let upload = |device: Option<DeviceCredentials>| {
        let (raw, token) = (s.raw.clone(), token.clone());
        async move { raw.upload_update_as(&token, device.as_ref(), 10, update()).await }
    };
    assert_eq!(code(upload(None).await), "device_unauthorized");
    assert_eq!(code(upload(Some(b.clone())).await), "device_unauthorized");
    let receipt = upload(Some(a.clone())).await.unwrap();
    assert_eq!(receipt.accepted_updates, 1);
    let metrics = MetricsReport {
        loss: 0.5,
        num_samples: 10,
        accuracy: None,
    };
    assert_eq!(
        code(s.raw.report_metrics(&token, &metrics).await),
        "device_unauthorized"
    );
    s.raw.report_metrics_as(&token, Some(&a), &metrics).await.unwrap();

    // A task without the requirement still takes anonymous devices, and a credential sent to it
    // is checked all the same.
    let open = create(&s, &small_task(2, 2, 1, 120)).await;
    assert!(matches!(
        s.raw.checkin(&open).await.unwrap(),
        CheckinResponse::Assigned(_)
    ));
    let mut wrong = a.clone();
    wrong.device_secret = "1".repeat(64);
    assert_eq!(code(s.raw.checkin_as(&open, &wrong).await), "device_unauthorized");
}

async fn revoking_a_key_refuses_its_enrolments_and_its_devices_at_once(backend: Backend) {
    let s = setup(backend, &[]).await;
    let old = s.admin.create_enrolment_key("app 3.0").await.unwrap();
    let new = s.admin.create_enrolment_key("app 3.1").await.unwrap();
    let (a, b) = (
        enrol(&s, &old.enrolment_key).await,
        enrol(&s, &new.enrolment_key).await,
    );
    let task = create(&s, &enrolled_task(2)).await;
    let token = assigned(&s, &task, &a).await.upload_token;

    let revoked = s.admin.revoke_enrolment_key(&old.key_id).await.unwrap();
    assert!(revoked.revoked_ms.is_some());
    // The very next requests: no new enrolment with the key, no check-in or upload of its devices.
    assert_eq!(
        code(s.raw.enrol_device(&old.enrolment_key).await),
        "enrolment_key_revoked"
    );
    assert_eq!(code(s.raw.checkin_as(&task, &a).await), "enrolment_key_revoked");
    assert_eq!(
        code(s.raw.upload_update_as(&token, Some(&a), 10, update()).await),
        "enrolment_key_revoked"
    );
    // The other release's devices carry on.
    assigned(&s, &task, &b).await;
    enrol(&s, &new.enrolment_key).await;

    // Revoking again changes nothing; unknown or missing keys are refused as such.
    let again = s.admin.revoke_enrolment_key(&old.key_id).await.unwrap();
    assert_eq!(again.revoked_ms, revoked.revoked_ms);
    assert_eq!(
        code(s.admin.revoke_enrolment_key("ek-nope").await),
        "unknown_enrolment_key"
    );
    let forged = format!("{}:{}", new.key_id, "0".repeat(64));
    assert_eq!(
        code(s.raw.enrol_device(&forged).await),
        "enrolment_key_unauthorized"
    );
    assert_eq!(
        code(s.raw.enrol_device("no-colon").await),
        "enrolment_key_unauthorized"
    );
    let keys = s.admin.enrolment_keys().await.unwrap();
    let counts: Vec<_> = keys
        .iter()
        .map(|k| (k.name.as_str(), k.devices, k.revoked_ms.is_some()))
        .collect();
    assert_eq!(counts, [("app 3.0", 1, true), ("app 3.1", 2, false)]);
}

async fn revoking_a_device_refuses_its_next_checkin(backend: Backend) {
    let s = setup(backend, &[]).await;
    let key = s.admin.create_enrolment_key("app 4").await.unwrap().enrolment_key;
    let (a, b) = (enrol(&s, &key).await, enrol(&s, &key).await);
    let task = create(&s, &enrolled_task(2)).await;
    assigned(&s, &task, &a).await;

    let revoked = s.admin.revoke_device(&a.device_id).await.unwrap();
    assert!(revoked.revoked_ms.is_some());
    assert_eq!(code(s.raw.checkin_as(&task, &a).await), "device_revoked");
    // On a task that does not require enrolment too: a revoked credential is refused everywhere.
    let open = create(&s, &small_task(1, 1, 1, 120)).await;
    assert_eq!(code(s.raw.checkin_as(&open, &a).await), "device_revoked");
    assigned(&s, &task, &b).await;

    let again = s.admin.revoke_device(&a.device_id).await.unwrap();
    assert_eq!(again.revoked_ms, revoked.revoked_ms);
    assert_eq!(code(s.admin.revoke_device("dv-nope").await), "unknown_device");
    let devices = s.admin.enrolled_devices(None).await.unwrap();
    let states: Vec<_> = devices
        .iter()
        .map(|d| (d.device_id.clone(), d.revoked_ms.is_some()))
        .collect();
    let mut expected = vec![(a.device_id.clone(), true), (b.device_id.clone(), false)];
    expected.sort();
    assert_eq!(states, expected);
}

async fn fedlaavg_admits_devices_enrolled_with_a_key(backend: Backend) {
    let s = setup(backend, &[]).await;
    let key = s.admin.create_enrolment_key("app 5").await.unwrap().enrolment_key;
    let device = enrol(&s, &key).await;
    let fedlaavg = |require_enrolled_device| TaskConfig {
        strategy: StrategyConfig::FedLaAvg {
            warmup_rounds: 0,
            selection_window_ms: 60_000,
        },
        require_enrolled_device,
        update_encoding: Default::default(),
        ..small_task(1, 1, 1, 120)
    };
    let (strict, open) = (
        create(&s, &fedlaavg(true)).await,
        create(&s, &fedlaavg(false)).await,
    );

    // The per-task route stays open only where the task allows anonymous enrolment.
    assert_eq!(code(s.raw.enrol(&strict).await), "device_unauthorized");
    let per_task = s.raw.enrol(&open).await.unwrap();
    assert_eq!(
        code(s.raw.checkin_as(&strict, &per_task).await),
        "device_unauthorized"
    );

    // The key-enrolled device joins each task at its first check-in, under a pseudonym per task.
    for task in [&strict, &open] {
        for _ in 0..2 {
            match s.raw.checkin_as(task, &device).await.unwrap() {
                CheckinResponse::RetryAfter { reason, .. } => assert_eq!(reason, "selection_window"),
                other => panic!("expected the selection window, got {other:?}"),
            }
        }
    }
    let strict_devices = s.admin.devices(&strict).await.unwrap();
    assert_eq!(strict_devices.len(), 1);
    assert_eq!(
        strict_devices[0].enrolled_as.as_deref(),
        Some(device.device_id.as_str())
    );
    let open_devices = s.admin.devices(&open).await.unwrap();
    assert_eq!(open_devices.len(), 2, "{open_devices:?}");
    let mine = open_devices.iter().find(|d| d.enrolled_as.is_some()).unwrap();
    assert_ne!(mine.device_id, strict_devices[0].device_id);
    // The per-task device keeps its credential's id (no `enrolled_as`).
    assert!(
        open_devices
            .iter()
            .any(|d| d.device_id == per_task.device_id && d.enrolled_as.is_none())
    );

    // Revoking the device holds in FedLaAvg too.
    s.admin.revoke_device(&device.device_id).await.unwrap();
    assert_eq!(code(s.raw.checkin_as(&strict, &device).await), "device_revoked");
}

async fn the_per_device_rate_limit_answers_429_and_recovers(backend: Backend) {
    let s = setup(
        backend,
        &["--rate-limit-per-device", "1", "--rate-limit-device-burst", "2"],
    )
    .await;
    let key = s.admin.create_enrolment_key("app 6").await.unwrap().enrolment_key;
    let (a, b) = (enrol(&s, &key).await, enrol(&s, &key).await);
    let task = create(&s, &enrolled_task(2)).await;

    let http = reqwest::Client::new();
    let checkin = |device: &DeviceCredentials| {
        http.post(format!("{}/v1/tasks/{task}/checkin", s.server.base_url))
            .bearer_auth(device.bearer())
            .send()
    };
    // The burst of two passes, the third is refused with the time until a token is back.
    for _ in 0..2 {
        assert_eq!(checkin(&a).await.unwrap().status(), 200);
    }
    let refused = checkin(&a).await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 1, "one token a second");
    let body: fedhive_shared::wire::ErrorBody = refused.json().await.unwrap();
    assert_eq!(body.error, "rate_limited");
    assert!(body.message.contains("device"), "{}", body.message);
    let wait = body.retry_after_ms.expect("the body says when, too");
    assert!((1..=1000).contains(&wait), "{wait}");

    // Keyed by device, not by address: another device from the same address is not held back.
    let token = assigned(&s, &task, &b).await.upload_token;
    assert_eq!(checkin(&b).await.unwrap().status(), 200);
    // Uploads count against the same bucket.
    assert_eq!(
        code(s.raw.upload_update_as(&token, Some(&b), 10, update()).await),
        "rate_limited"
    );

    // After the wait, the device is served again; the SDK waits by itself when it is told to.
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    assert_eq!(checkin(&a).await.unwrap().status(), 200);
    let receipt = s
        .admin
        .upload_update_as(&token, Some(&b), 10, update())
        .await
        .unwrap();
    assert_eq!(receipt.accepted_updates, 1);
}
