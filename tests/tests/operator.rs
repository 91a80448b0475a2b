//! The operator CLI (`fedhive task ...`, `fedhive model get`) against a real server: a refused
//! config uploads nothing, a created task runs a round, pause and resume gate check-ins, the model
//! download matches the API's, and cancelling ends the task and refuses its round's uploads; the
//! enrolment-key and device commands issue, list and revoke, and revocation holds at the next request.

use std::{path::Path, process::Output, time::Duration};

use bytes::Bytes;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::wire::{
    AuditEntry, CheckinResponse, DeviceCredentials, EnrolledDevice, EnrolmentKey, EnrolmentKeyCreated,
    RoundInfo, RoundState, TaskConfig, TaskCreated, TaskState, TaskSummary,
};

on_both_databases!(
    the_cli_runs_a_task_from_creation_to_cancellation,
    the_cli_issues_and_revokes_enrolment_keys_and_devices,
);

/// `fedhive ARGS` (the e2e server binary is the `fedhive` command line) against `server`.
async fn fedhive(server: &ServerProcess, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-server"))
        .args(args)
        .env("FEDHIVE_URL", &server.base_url)
        .env("FEDHIVE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .expect("running fedhive")
}

/// Runs a command that must succeed; its stdout.
async fn ok(server: &ServerProcess, args: &[&str]) -> String {
    let out = fedhive(server, args).await;
    assert!(
        out.status.success(),
        "fedhive {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; its stderr.
async fn fails(server: &ServerProcess, args: &[&str]) -> String {
    let out = fedhive(server, args).await;
    assert!(!out.status.success(), "fedhive {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

async fn the_cli_runs_a_task_from_creation_to_cancellation(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(&dir.path().join("data"), &db).await.unwrap();
    let client = server.raw_client();
    let model = write(dir.path(), "init.safetensors", &small_tensors(|_| 0.0).encode());
    let config = small_task(2, 2, 3, 120);
    let good = write(dir.path(), "task.json", &serde_json::to_vec(&config).unwrap());
    let mut wrong = config.clone();
    wrong.min_devices_per_round = 5;
    let bad = write(dir.path(), "bad.json", &serde_json::to_vec(&wrong).unwrap());

    // Checked here with the server's rules: nothing reaches the server.
    let refused = fails(&server, &["task", "create", "--config", &bad, "--model", &model]).await;
    assert!(refused.contains("min_devices_per_round"), "{refused}");
    let none: Vec<TaskSummary> =
        serde_json::from_str(&ok(&server, &["task", "list", "--json"]).await).unwrap();
    assert!(none.is_empty(), "{none:?}");
    let truncated = write(
        dir.path(),
        "short.safetensors",
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
    );
    let refused = fails(
        &server,
        &["task", "create", "--config", &good, "--model", &truncated],
    )
    .await;
    assert!(refused.contains("would be refused"), "{refused}");

    let created: TaskCreated = serde_json::from_str(
        &ok(
            &server,
            &["task", "create", "--config", &good, "--model", &model, "--json"],
        )
        .await,
    )
    .unwrap();
    let task = created.task_id.as_str();
    let listed: Vec<TaskSummary> =
        serde_json::from_str(&ok(&server, &["task", "list", "--json"]).await).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].task_id.as_str(),
            &listed[0].state,
            listed[0].strategy.as_str(),
            listed[0].rounds
        ),
        (task, &TaskState::Running, "fed_avg", 3)
    );
    let table = ok(&server, &["task", "list"]).await;
    assert!(table.starts_with("TASK") && table.contains(task), "{table}");

    // Paused: check-ins are told to come back; a second pause is refused with the reason.
    ok(&server, &["task", "pause", task]).await;
    match client.checkin(task).await.unwrap() {
        CheckinResponse::RetryAfter { reason, .. } => assert_eq!(reason, "task_paused"),
        other => panic!("a paused task assigned work: {other:?}"),
    }
    let again = fails(&server, &["task", "pause", task]).await;
    assert!(again.contains("task_state_conflict"), "{again}");

    // Resumed: a round commits.
    ok(&server, &["task", "resume", task]).await;
    let update = Bytes::from(small_tensors(|i| i as f32).encode());
    for _ in 0..2 {
        let a = assign(&client, task).await;
        client
            .upload_update(&a.upload_token, 5, update.clone())
            .await
            .unwrap();
    }
    wait_for_version(&client, task, 1, Duration::from_secs(30)).await;
    let out = dir.path().join("v1.safetensors");
    ok(
        &server,
        &[
            "model",
            "get",
            task,
            "--version",
            "1",
            "-o",
            out.to_str().unwrap(),
        ],
    )
    .await;
    let (_, served) = client.download_model(task, Some(1)).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), served.to_vec());
    assert_ne!(served.to_vec(), std::fs::read(&model).unwrap(), "version 1 moved");
    let rounds: Vec<RoundInfo> =
        serde_json::from_str(&ok(&server, &["task", "rounds", task, "--json"]).await).unwrap();
    assert_eq!(
        (&rounds[0].state, rounds[0].accepted),
        (&RoundState::Committed, 2)
    );
    let show = ok(&server, &["task", "show", task]).await;
    assert!(show.contains("version     1"), "{show}");

    // Cancelled: devices are told the task finished, and the open round's uploads are refused.
    let late = assign(&client, task).await;
    ok(&server, &["task", "cancel", task]).await;
    assert!(matches!(
        client.checkin(task).await.unwrap(),
        CheckinResponse::Finished { model_version: 1 }
    ));
    let refused = client
        .upload_update(&late.upload_token, 5, update.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("round_closed"));
    let status = client.task_status(task).await.unwrap();
    assert_eq!((status.state, status.model_version), (TaskState::Cancelled, 1));
    let rounds = client.rounds(task).await.unwrap();
    assert_eq!(rounds.last().unwrap().state, RoundState::Abandoned);
    let after = fails(&server, &["task", "resume", task]).await;
    assert!(after.contains("cancelled"), "{after}");

    // A wrong token is named as such.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-server"))
        .args(["task", "list", "--server", &server.base_url, "--token", "wrong"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

async fn the_cli_issues_and_revokes_enrolment_keys_and_devices(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(&dir.path().join("data"), &db).await.unwrap();
    let device_client = server.raw_client();

    // One key printed as JSON, one as text: the key is in the output once, with its id.
    let old: EnrolmentKeyCreated = serde_json::from_str(
        &ok(
            &server,
            &["enrolment-key", "create", "--name", "app 3.0", "--json"],
        )
        .await,
    )
    .unwrap();
    let text = ok(&server, &["enrolment-key", "create", "--name", "app 3.1"]).await;
    let new_key = text
        .lines()
        .find_map(|l| l.strip_prefix("enrolment key (shown once; only its hash is kept): "))
        .unwrap_or_else(|| panic!("no key in {text}"))
        .to_string();
    let new_id = new_key.split(':').next().unwrap().to_string();
    assert!(
        text.starts_with(&format!("created enrolment key {new_id} (app 3.1)")),
        "{text}"
    );

    let enrol = |key: String| {
        let client = device_client.clone();
        async move { client.enrol_device(&key).await.unwrap() }
    };
    let (a, b) = (
        enrol(old.enrolment_key.clone()).await,
        enrol(new_key.clone()).await,
    );
    let task = server
        .client()
        .create_task(
            &TaskConfig {
                require_enrolled_device: true,
                update_encoding: Default::default(),
                ..small_task(2, 2, 5, 120)
            },
            small_tensors(|_| 0.0).encode(),
        )
        .await
        .unwrap()
        .task_id;
    let checkin = |device: DeviceCredentials| {
        let (client, task) = (device_client.clone(), task.clone());
        async move {
            match client.checkin_as(&task, &device).await {
                Ok(CheckinResponse::Assigned(_)) => "assigned".to_string(),
                Ok(other) => format!("{other:?}"),
                Err(e) => e.code().unwrap_or("no code").to_string(),
            }
        }
    };
    assert_eq!(checkin(a.clone()).await, "assigned");
    assert_eq!(checkin(b.clone()).await, "assigned");

    // The tables name keys and devices and never show a secret.
    let keys = ok(&server, &["enrolment-key", "list"]).await;
    assert!(keys.starts_with("KEY"), "{keys}");
    for shown in [&old.key_id, &new_id, "app 3.0", "app 3.1"] {
        assert!(keys.contains(shown), "{shown} missing from {keys}");
    }
    assert!(
        !keys.contains(&old.enrolment_key) && !keys.contains(&new_key),
        "{keys}"
    );
    let devices = ok(&server, &["device", "list", "--key", &old.key_id]).await;
    assert!(
        devices.starts_with("DEVICE") && devices.contains(&a.device_id),
        "{devices}"
    );
    assert!(
        !devices.contains(&b.device_id) && !devices.contains(&a.device_secret),
        "{devices}"
    );

    // Revoking a device, then a key: refused from the very next request.
    ok(&server, &["device", "revoke", &a.device_id]).await;
    assert_eq!(checkin(a.clone()).await, "device_revoked");
    ok(&server, &["enrolment-key", "revoke", &new_id]).await;
    assert_eq!(checkin(b.clone()).await, "enrolment_key_revoked");
    let listed: Vec<EnrolmentKey> =
        serde_json::from_str(&ok(&server, &["enrolment-key", "list", "--json"]).await).unwrap();
    let states: Vec<_> = listed
        .iter()
        .map(|k| (k.name.as_str(), k.devices, k.revoked_ms.is_some()))
        .collect();
    assert_eq!(states, [("app 3.0", 1, false), ("app 3.1", 1, true)]);
    let listed: Vec<EnrolledDevice> =
        serde_json::from_str(&ok(&server, &["device", "list", "--json", "--limit", "1"]).await).unwrap();
    assert_eq!(listed.len(), 1);

    // Refusals name the server's code; the audit log has the CLI's four changes.
    let refused = fails(&server, &["device", "revoke", "dv-nope"]).await;
    assert!(refused.contains("unknown_device"), "{refused}");
    let refused = fails(&server, &["device", "list", "--limit", "0"]).await;
    assert!(refused.contains("invalid_request"), "{refused}");
    let audit: Vec<AuditEntry> = serde_json::from_str(&ok(&server, &["audit", "--json"]).await).unwrap();
    let changes: Vec<_> = audit
        .iter()
        .rev()
        .filter(|e| e.outcome == "ok" && e.action != "task.create")
        .map(|e| (e.actor.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        changes,
        [
            ("admin", "enrolment_key.create"),
            ("admin", "enrolment_key.create"),
            ("admin", "device.revoke"),
            ("admin", "enrolment_key.revoke"),
        ]
    );
}
