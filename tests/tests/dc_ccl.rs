//! DC-CCL end to end: the fusion rule on a hand-computed example, the cloud contribution counted
//! once, the worker token's scope, SIGKILL of the server and of the real cloud worker mid-round,
//! and the cloud model never served to devices.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fedhive_client::{
    client::FedhiveClient,
    model::{ModelKind, initial_weights, tensor_specs},
};
use fedhive_e2e::{
    Backend, ServerProcess, TestDb, assign, on_both_databases, small_specs, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::{
    FedAvgAccumulator, NamedTensors,
    dc_ccl::fuse,
    wire::{
        CheckinResponse, ControlModelRef, RoundState, StrategyConfig, TaskConfig, UploadReceipt, WithoutCloud,
    },
};

on_both_databases!(
    fusion_commits_the_hand_computed_model,
    cloud_contribution_counts_once,
    a_round_without_the_cloud_follows_the_config,
    worker_token_only_serves_its_task,
    kill_server_mid_round_commits_the_uncrashed_model,
    kill_worker_mid_round_contributes_once_and_never_serves_f_c,
);

/// A DC-CCL task on the tiny `small_specs()` model, with the same tensors as its control model.
fn dc_task(k: u32, min: u32, rounds: u32, deadline_secs: u64, without_cloud: WithoutCloud) -> TaskConfig {
    TaskConfig {
        strategy: StrategyConfig::DcCcl {
            cloud_weight: 0.5,
            without_cloud,
            control_model: "test".into(),
            control_tensors: small_specs(),
        },
        ..small_task(k, min, rounds, deadline_secs)
    }
}

/// Fields drop in order: the server stops before its database and directory go.
struct Setup {
    server: ServerProcess,
    _db: TestDb,
    _dir: tempfile::TempDir,
    client: FedhiveClient,
}

async fn setup(backend: Backend) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    Setup {
        server,
        _db: db,
        _dir: dir,
        client,
    }
}

/// Creates a task; returns its id and worker token.
async fn create(client: &FedhiveClient, config: &TaskConfig, initial: &NamedTensors) -> (String, String) {
    let created = client.create_task(config, initial.encode()).await.unwrap();
    let token = created.worker_token.expect("a DC-CCL task has a worker token");
    (created.task_id, token)
}

fn body(value: f32) -> Bytes {
    Bytes::from(small_tensors(|_| value).encode())
}

fn code(e: fedhive_client::client::ClientError) -> String {
    e.code().unwrap_or("(no code)").to_string()
}

async fn fusion_commits_the_hand_computed_model(backend: Backend) {
    let s = setup(backend).await;
    let config = dc_task(2, 2, 1, 300, WithoutCloud::Abandon);
    let (task, token) = create(&s.client, &config, &small_tensors(|_| 1.0)).await;

    // No control model yet: devices are told to come back.
    match s.client.checkin(&task).await.unwrap() {
        CheckinResponse::RetryAfter { reason, .. } => assert_eq!(reason, "control_model_pending"),
        other => panic!("expected retry_after, got {other:?}"),
    }
    s.client
        .publish_control_model(&task, 1, &token, body(0.0))
        .await
        .unwrap();
    let (a1, a2) = (assign(&s.client, &task).await, assign(&s.client, &task).await);
    let control = Some(ControlModelRef {
        model: "test".into(),
        version: 1,
    });
    assert_eq!((&a1.control, &a2.control), (&control, &control));
    s.client
        .upload_update(&a1.upload_token, 1, body(0.5))
        .await
        .unwrap();
    s.client
        .upload_update(&a2.upload_token, 3, body(0.25))
        .await
        .unwrap();

    // K devices but no cloud contribution: the round waits for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = s.client.cloud_status(&task, &token).await.unwrap();
    assert_eq!((status.model_version, status.cloud_submitted), (0, false));
    let round = status.round.expect("a round is open");
    assert_eq!(round.accepted, 2);

    s.client
        .submit_cloud_update(&task, round.round_id, &token, body(1.0))
        .await
        .unwrap();
    wait_for_version(&s.client, &task, 1, Duration::from_secs(30)).await;
    // 1 + 0.5 * 1.0 + 0.5 * (1 * 0.5 + 3 * 0.25) / 4 = 1.65625, exactly.
    let (_, model) = s.client.download_model(&task, Some(1)).await.unwrap();
    let model = NamedTensors::decode(&model).unwrap();
    assert!(
        model.0.values().all(|t| t.data.iter().all(|&v| v == 1.65625)),
        "{model:?}"
    );
}

async fn cloud_contribution_counts_once(backend: Backend) {
    let s = setup(backend).await;
    let (task, token) = create(
        &s.client,
        &dc_task(1, 1, 2, 300, WithoutCloud::Abandon),
        &small_tensors(|_| 0.0),
    )
    .await;
    s.client
        .publish_control_model(&task, 1, &token, body(0.0))
        .await
        .unwrap();
    let round = s.client.cloud_status(&task, &token).await.unwrap().round.unwrap();
    let first = s
        .client
        .submit_cloud_update(&task, round.round_id, &token, body(0.75))
        .await
        .unwrap();
    // A retry of the same body gets the same receipt; another body is refused.
    let again = s
        .client
        .submit_cloud_update(&task, round.round_id, &token, body(0.75))
        .await
        .unwrap();
    assert_eq!(first, again);
    let other = s
        .client
        .submit_cloud_update(&task, round.round_id, &token, body(0.5))
        .await
        .unwrap_err();
    assert_eq!(code(other), "conflicting_retry");

    let a = assign(&s.client, &task).await;
    s.client
        .upload_update(&a.upload_token, 2, body(0.25))
        .await
        .unwrap();
    wait_for_version(&s.client, &task, 1, Duration::from_secs(30)).await;
    // After the commit the stored contribution still answers its retries, and only once counted:
    // 0.5 * 0.75 + 0.5 * 0.25 = 0.5.
    let again = s
        .client
        .submit_cloud_update(&task, round.round_id, &token, body(0.75))
        .await
        .unwrap();
    assert_eq!(first, again);
    let (_, model) = s.client.download_model(&task, Some(1)).await.unwrap();
    let model = NamedTensors::decode(&model).unwrap();
    assert!(
        model.0.values().all(|t| t.data.iter().all(|&v| v == 0.5)),
        "{model:?}"
    );
    // The next round has no contribution yet.
    let status = s.client.cloud_status(&task, &token).await.unwrap();
    assert_ne!(status.round.unwrap().round_id, round.round_id);
    assert!(!status.cloud_submitted);
}

async fn a_round_without_the_cloud_follows_the_config(backend: Backend) {
    let s = setup(backend).await;
    for (without_cloud, expected) in [
        (WithoutCloud::Abandon, None),
        (WithoutCloud::DevicesOnly, Some(0.25)),
    ] {
        let (task, token) = create(
            &s.client,
            &dc_task(1, 1, 1, 1, without_cloud),
            &small_tensors(|_| 0.0),
        )
        .await;
        s.client
            .publish_control_model(&task, 1, &token, body(0.0))
            .await
            .unwrap();
        let a = assign(&s.client, &task).await;
        s.client
            .upload_update(&a.upload_token, 2, body(0.25))
            .await
            .unwrap();
        // The deadline (1 s) passes without the cloud's contribution.
        let started = Instant::now();
        let first = loop {
            let rounds = s.client.rounds(&task).await.unwrap();
            if rounds[0].state != RoundState::Open {
                break rounds[0].clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the round never ended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match expected {
            None => assert_eq!(first.state, RoundState::Abandoned, "{without_cloud:?}"),
            Some(value) => {
                assert_eq!(first.state, RoundState::Committed, "{without_cloud:?}");
                let (_, model) = s.client.download_model(&task, Some(1)).await.unwrap();
                let model = NamedTensors::decode(&model).unwrap();
                assert!(model.0.values().all(|t| t.data.iter().all(|&v| v == value)));
            }
        }
        // A contribution for an ended round is refused and changes nothing.
        let late = s
            .client
            .submit_cloud_update(&task, first.round_id, &token, body(1.0))
            .await
            .unwrap_err();
        assert_eq!(code(late), "round_closed");
    }
}

async fn worker_token_only_serves_its_task(backend: Backend) {
    let s = setup(backend).await;
    let config = dc_task(1, 1, 1, 300, WithoutCloud::Abandon);
    let (a, token_a) = create(&s.client, &config, &small_tensors(|_| 0.0)).await;
    let (b, token_b) = create(&s.client, &config, &small_tensors(|_| 0.0)).await;
    let fedavg = s
        .client
        .create_task(&small_task(1, 1, 1, 300), small_tensors(|_| 0.0).encode())
        .await
        .unwrap();
    assert_eq!(fedavg.worker_token, None);

    // Not an operator: it cannot create tasks or read a task's status or rounds.
    let as_operator = s.server.raw_client().with_admin_token(token_a.clone());
    let refused = as_operator
        .create_task(&config, small_tensors(|_| 0.0).encode())
        .await
        .unwrap_err();
    assert_eq!(code(refused), "unauthorized");
    assert_eq!(
        code(as_operator.task_status(&a).await.unwrap_err()),
        "unauthorized"
    );
    assert_eq!(code(as_operator.rounds(&a).await.unwrap_err()), "unauthorized");

    // Not another task's worker.
    let round_b = s
        .client
        .cloud_status(&b, &token_b)
        .await
        .unwrap()
        .round
        .unwrap()
        .round_id;
    let c = &s.client;
    assert_eq!(
        code(c.cloud_status(&b, &token_a).await.unwrap_err()),
        "worker_unauthorized"
    );
    assert_eq!(
        code(
            c.submit_cloud_update(&b, round_b, &token_a, body(0.1))
                .await
                .unwrap_err()
        ),
        "worker_unauthorized"
    );
    assert_eq!(
        code(
            c.publish_control_model(&b, 1, &token_a, body(0.0))
                .await
                .unwrap_err()
        ),
        "worker_unauthorized"
    );
    // Its own task, another task's round.
    assert_eq!(
        code(
            c.submit_cloud_update(&a, round_b, &token_a, body(0.1))
                .await
                .unwrap_err()
        ),
        "unknown_round"
    );
    assert_eq!(
        code(c.cloud_status(&fedavg.task_id, &token_a).await.unwrap_err()),
        "not_dc_ccl"
    );
    let status = reqwest::get(format!("{}/v1/tasks/{a}/cloud", s.server.base_url))
        .await
        .unwrap();
    assert_eq!(status.status(), 401);
    assert!(!c.cloud_status(&b, &token_b).await.unwrap().cloud_submitted);

    // Control models: in order, checked, immutable, cacheable.
    assert_eq!(
        code(
            c.publish_control_model(&a, 2, &token_a, body(0.0))
                .await
                .unwrap_err()
        ),
        "control_version_out_of_order"
    );
    let mut wrong_shape = small_tensors(|_| 0.0);
    wrong_shape.0.get_mut("w").unwrap().shape = vec![3, 2];
    let wrong_shape = Bytes::from(wrong_shape.encode());
    let refused = c.publish_control_model(&a, 1, &token_a, wrong_shape).await;
    assert_eq!(code(refused.unwrap_err()), "shape_mismatch");
    let too_large = Bytes::from(initial_weights(ModelKind::MlpSmall, 0).encode());
    let refused = c.publish_control_model(&a, 1, &token_a, too_large).await;
    assert_eq!(code(refused.unwrap_err()), "body_too_large");
    let first = c.publish_control_model(&a, 1, &token_a, body(0.0)).await.unwrap();
    assert_eq!(
        first,
        c.publish_control_model(&a, 1, &token_a, body(0.0)).await.unwrap()
    );
    assert_eq!(
        code(
            c.publish_control_model(&a, 1, &token_a, body(1.0))
                .await
                .unwrap_err()
        ),
        "conflicting_retry"
    );
    let url = format!("{}/v1/tasks/{a}/control-model?version=1", s.server.base_url);
    let http = reqwest::Client::new();
    let got = http.get(&url).send().await.unwrap();
    assert_eq!(got.headers()["etag"], "\"1\"");
    assert!(
        got.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert_eq!(got.bytes().await.unwrap(), body(0.0));
    let cached = http
        .get(&url)
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    let missing = c.download_control_model(&b, None).await.unwrap_err();
    assert_eq!(code(missing), "unknown_control_model");
}

/// Device j's update and sample count: irregular values, so float summation order would show.
fn device_update(j: usize) -> (u64, Bytes) {
    let delta = small_tensors(|i| ((j * 7 + i * 3) % 17) as f32 * 0.371 - 3.003 + (j as f32) * 1e-3);
    (10 + 7 * j as u64, Bytes::from(delta.encode()))
}

fn cloud_body() -> Bytes {
    Bytes::from(small_tensors(|i| (i as f32 * 0.77).cos() * 1.3).encode())
}

const DEVICES: usize = 4;

struct Round {
    s: Setup,
    task: String,
    token: String,
    round_id: i64,
    tokens: Vec<String>,
}

async fn open_round(backend: Backend) -> Round {
    let s = setup(backend).await;
    let config = dc_task(DEVICES as u32, DEVICES as u32, 1, 300, WithoutCloud::Abandon);
    let (task, token) = create(&s.client, &config, &small_tensors(|i| (i as f32).sin())).await;
    s.client
        .publish_control_model(&task, 1, &token, body(0.0))
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for _ in 0..DEVICES {
        tokens.push(assign(&s.client, &task).await.upload_token);
    }
    let round_id = s
        .client
        .cloud_status(&task, &token)
        .await
        .unwrap()
        .round
        .unwrap()
        .round_id;
    Round {
        s,
        task,
        token,
        round_id,
        tokens,
    }
}

async fn committed(r: &Round) -> Bytes {
    wait_for_version(&r.s.client, &r.task, 1, Duration::from_secs(60)).await;
    let rounds = r.s.client.rounds(&r.task).await.unwrap();
    assert_eq!(rounds[0].accepted, DEVICES as i64);
    r.s.client.download_model(&r.task, Some(1)).await.unwrap().1
}

async fn kill_server_mid_round_commits_the_uncrashed_model(backend: Backend) {
    let clean = open_round(backend).await;
    for (j, t) in clean.tokens.iter().enumerate() {
        let (n, b) = device_update(j);
        clean.s.client.upload_update(t, n, b).await.unwrap();
    }
    clean
        .s
        .client
        .submit_cloud_update(&clean.task, clean.round_id, &clean.token, cloud_body())
        .await
        .unwrap();
    let expected = committed(&clean).await;

    let mut r = open_round(backend).await;
    let raw = r.s.server.raw_client();
    let mut acked: Vec<(usize, UploadReceipt)> = Vec::new();
    for j in 0..2 {
        let (n, b) = device_update(j);
        acked.push((j, raw.upload_update(&r.tokens[j], n, b).await.unwrap()));
    }
    // The cloud's contribution and two uploads in flight when the server is killed.
    let (task, token, round_id) = (r.task.clone(), r.token.clone(), r.round_id);
    let cloud = {
        let raw = raw.clone();
        tokio::spawn(async move {
            raw.submit_cloud_update(&task, round_id, &token, cloud_body())
                .await
        })
    };
    let mut in_flight = Vec::new();
    for j in 2..DEVICES {
        let (raw, t) = (raw.clone(), r.tokens[j].clone());
        in_flight.push(tokio::spawn(async move {
            let (n, b) = device_update(j);
            (j, raw.upload_update(&t, n, b).await)
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.s.server.kill();
    for handle in in_flight {
        if let (j, Ok(receipt)) = handle.await.unwrap() {
            acked.push((j, receipt));
        }
    }
    let cloud_acked = cloud.await.unwrap().ok();
    eprintln!(
        "acknowledged before SIGKILL: {} of {DEVICES} uploads, cloud {}",
        acked.len(),
        cloud_acked.is_some()
    );

    r.s.server.restart().await.unwrap();
    let client = r.s.server.client();
    for (j, t) in r.tokens.iter().enumerate() {
        let (n, b) = device_update(j);
        let receipt = client.upload_update(t, n, b).await.unwrap();
        if let Some((_, before)) = acked.iter().find(|(k, _)| *k == j) {
            assert_eq!(&receipt, before, "acknowledged upload {j} changed");
        }
    }
    let cloud = client
        .submit_cloud_update(&r.task, r.round_id, &r.token, cloud_body())
        .await
        .unwrap();
    if let Some(before) = cloud_acked {
        assert_eq!(cloud, before, "the acknowledged cloud contribution changed");
    }
    assert!(
        committed(&r).await == expected,
        "the crashed run committed another model"
    );
}

/// The `fedhive-cloud` worker binary of this package.
fn worker(server: &str, task: &str, token: &str, state_dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-cloud"))
        .args(["--server", server, "--task", task, "--state-dir"])
        .arg(state_dir)
        .args([
            "--max-samples",
            "600",
            "--cloud-epochs",
            "1",
            "--distil-epochs",
            "1",
        ])
        .args(["--poll-ms", "50", "--backend", "flex"])
        .env("FEDHIVE_WORKER_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the worker")
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what} did not happen within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn contribution(state_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(state_dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("contribution-") && name.ends_with(".safetensors")
        })
}

async fn kill_worker_mid_round_contributes_once_and_never_serves_f_c(backend: Backend) {
    let s = setup(backend).await;
    let kind = ModelKind::MlpSmall;
    let config = TaskConfig {
        model: kind.name().into(),
        tensors: tensor_specs(kind),
        strategy: StrategyConfig::DcCcl {
            cloud_weight: 0.5,
            without_cloud: WithoutCloud::Abandon,
            control_model: kind.name().into(),
            control_tensors: tensor_specs(kind),
        },
        ..small_task(2, 2, 1, 300)
    };
    let initial = initial_weights(kind, 3);
    let (task, token) = create(&s.client, &config, &initial).await;
    let state = tempfile::tempdir().unwrap();
    let mut child = worker(&s.server.base_url, &task, &token, state.path());

    // The worker trains F_c, distils F_m and publishes it; then two devices upload.
    let started = Instant::now();
    while s
        .client
        .cloud_status(&task, &token)
        .await
        .unwrap()
        .control_version
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no control model published"
        );
        assert!(child.try_wait().unwrap().is_none(), "the worker exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut devices = FedAvgAccumulator::new(&tensor_specs(kind));
    for (j, n) in [(0usize, 5u64), (1, 7)] {
        let a = assign(&s.client, &task).await;
        let delta = initial_weights(kind, 10 + j as u64);
        let delta = NamedTensors(
            delta
                .0
                .into_iter()
                .map(|(name, mut t)| {
                    t.data.iter_mut().for_each(|v| *v *= 0.1);
                    (name, t)
                })
                .collect(),
        );
        devices.add(n, &delta).unwrap();
        s.client
            .upload_update(&a.upload_token, n, Bytes::from(delta.encode()))
            .await
            .unwrap();
    }

    // SIGKILL the worker as soon as its contribution is on its disk (sent or not), then restart it.
    wait_until("the worker's contribution", Duration::from_secs(300), || {
        contribution(state.path()).is_some()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let cloud = std::fs::read(contribution(state.path()).unwrap()).unwrap();
    let mut child = worker(&s.server.base_url, &task, &token, state.path());
    wait_for_version(&s.client, &task, 1, Duration::from_secs(120)).await;
    wait_until("the worker's exit", Duration::from_secs(60), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(child.wait().unwrap().success(), "the restarted worker failed");

    // Exactly the one contribution, fused with the devices' average.
    let mut cloud_sums = FedAvgAccumulator::new(&tensor_specs(kind));
    cloud_sums.add(1, &NamedTensors::decode(&cloud).unwrap()).unwrap();
    let mut expected = initial.clone();
    fuse(&mut expected, &devices, Some(&cloud_sums), 0.5);
    let (_, model) = s.client.download_model(&task, Some(1)).await.unwrap();
    assert!(model == expected.encode(), "the committed F_s is not the fusion");

    // F_c stays in the worker: no device-facing endpoint returns it or any tensor of it.
    let f_c = std::fs::read(state.path().join("cloud-model.safetensors")).unwrap();
    let f_c_names: Vec<String> = NamedTensors::decode(&f_c).unwrap().0.into_keys().collect();
    assert!(f_c_names.iter().any(|n| n.starts_with("conv")), "{f_c_names:?}");
    let base = &s.server.base_url;
    let device_facing = [
        format!("{base}/v1/tasks/{task}/model"),
        format!("{base}/v1/tasks/{task}/model?version=0"),
        format!("{base}/v1/tasks/{task}/model?version=1"),
        format!("{base}/v1/tasks/{task}/control-model"),
        format!("{base}/v1/tasks/{task}/control-model?version=1"),
        format!("{base}/v1/tasks/{task}/predictor"),
        format!("{base}/v1/tasks/{task}/blocks/cloud/chain?version=0"),
    ];
    for url in device_facing {
        let got = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
        assert!(got != f_c, "{url} served F_c");
        if let Ok(tensors) = NamedTensors::decode(&got) {
            assert!(
                tensors.0.keys().all(|n| !n.starts_with("conv")),
                "{url} served a tensor of F_c"
            );
        }
    }
}
