//! The operator CLI (`fedhive task ...`, `fedhive model get`) against a real server: a refused
//! config uploads nothing, a created task runs a round, pause and resume gate check-ins, the model
//! download matches the API's, and cancelling ends the task and refuses its round's uploads.

use std::{path::Path, process::Output, time::Duration};

use bytes::Bytes;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::wire::{CheckinResponse, RoundInfo, RoundState, TaskCreated, TaskState, TaskSummary};

on_both_databases!(the_cli_runs_a_task_from_creation_to_cancellation);

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
