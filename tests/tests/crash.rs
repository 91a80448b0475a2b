//! SIGKILL the server mid-round, restart it on the same state, finish the round: no acknowledged
//! upload is lost or double-counted, and the committed model equals an uncrashed run's bit for bit,
//! with the blobs in the data directory or in a real S3 store (SeaweedFS), which must end up holding
//! the models and none of the round's updates.

use std::time::Duration;

use bytes::Bytes;
use fedhive_client::client::FedhiveClient;
use fedhive_e2e::{
    Backend, S3Prefix, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::wire::{Assignment, UploadReceipt};

const DEVICES: usize = 8;

on_both_databases!(
    kill_mid_round_commits_the_uncrashed_model,
    kill_after_last_upload_commits_once,
    kill_mid_round_with_blobs_in_s3_commits_the_uncrashed_model,
    kill_after_last_upload_with_blobs_in_s3_commits_once,
    update_blobs_of_ended_rounds_are_swept_at_start_up,
);

/// Where the server keeps its blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blobs {
    Dir,
    S3,
}

/// Device j's update: irregular values so that float summation order would show in the bits.
fn update(j: usize) -> (u64, Bytes) {
    let n = 10 + 7 * j as u64;
    let delta = small_tensors(|i| ((j * 7 + i * 3) % 17) as f32 * 0.371 - 3.003 + (j as f32) * 1e-3);
    (n, Bytes::from(delta.encode()))
}

/// Fields drop in order: the server stops before its database and directory go.
struct Run {
    server: ServerProcess,
    _db: TestDb,
    _dir: tempfile::TempDir,
    client: FedhiveClient,
    task: String,
    assignments: Vec<Assignment>,
    s3: Option<S3Prefix>,
}

async fn new_run(backend: Backend, blobs: Blobs) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let s3 = (blobs == Blobs::S3).then(S3Prefix::new);
    let server = match &s3 {
        None => ServerProcess::start(dir.path(), &db).await.unwrap(),
        Some(s3) => ServerProcess::start_on_s3(dir.path(), &db, s3).await.unwrap(),
    };
    let client = server.client();
    let initial = small_tensors(|i| (i as f32).sin());
    let task = client
        .create_task(
            &small_task(DEVICES as u32, DEVICES as u32, 1, 300),
            initial.encode(),
        )
        .await
        .unwrap()
        .task_id;
    let mut assignments = Vec::new();
    for _ in 0..DEVICES {
        assignments.push(assign(&client, &task).await);
    }
    Run {
        server,
        _db: db,
        _dir: dir,
        client,
        task,
        assignments,
        s3,
    }
}

async fn upload(client: &FedhiveClient, a: &Assignment, j: usize) -> Result<UploadReceipt, String> {
    let (n, body) = update(j);
    client
        .upload_update(&a.upload_token, n, body)
        .await
        .map_err(|e| e.to_string())
}

async fn committed_model(run: &Run) -> Bytes {
    wait_for_version(&run.client, &run.task, 1, Duration::from_secs(60)).await;
    let rounds = run.client.rounds(&run.task).await.unwrap();
    let expected_samples: u64 = (0..DEVICES).map(|j| update(j).0).sum();
    assert_eq!(
        (rounds[0].accepted, rounds[0].total_samples as u64),
        (DEVICES as i64, expected_samples)
    );
    if let Some(s3) = &run.s3 {
        blobs_are_in_s3(run, s3, rounds[0].round_id).await;
    }
    run.client.download_model(&run.task, Some(1)).await.unwrap().1
}

/// The models are in the bucket, not on local disk, and the committed round's updates are gone.
async fn blobs_are_in_s3(run: &Run, s3: &S3Prefix, round_id: i64) {
    let local = run.server.data_dir.join("blobs");
    let store = s3.open(&local);
    let mut models = store.list(&format!("models/{}", run.task)).await.unwrap();
    models.sort();
    assert_eq!(models, ["0.safetensors", "1.safetensors"]);
    assert!(!local.join("models").exists(), "a model blob on local disk");
    let updates = format!("updates/{round_id}");
    let started = std::time::Instant::now();
    loop {
        let left = store.list(&updates).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the committed round's updates are still in the bucket: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn uncrashed_model(backend: Backend) -> Bytes {
    let run = new_run(backend, Blobs::Dir).await;
    for (j, a) in run.assignments.iter().enumerate() {
        upload(&run.client, a, j).await.unwrap();
    }
    committed_model(&run).await
}

async fn kill_mid_round_commits_the_uncrashed_model(backend: Backend) {
    kill_mid_round(backend, Blobs::Dir).await
}

async fn kill_mid_round_with_blobs_in_s3_commits_the_uncrashed_model(backend: Backend) {
    kill_mid_round(backend, Blobs::S3).await
}

async fn kill_after_last_upload_commits_once(backend: Backend) {
    kill_after_last_upload(backend, Blobs::Dir).await
}

async fn kill_after_last_upload_with_blobs_in_s3_commits_once(backend: Backend) {
    kill_after_last_upload(backend, Blobs::S3).await
}

/// The uncrashed model is the directory store's: the blob store must not change a bit.
async fn kill_mid_round(backend: Backend, blobs: Blobs) {
    let expected = uncrashed_model(backend).await;
    let mut run = new_run(backend, blobs).await;
    let raw = run.server.raw_client();

    // Three uploads acknowledged, then five in flight when the server is killed.
    let mut acked: Vec<(usize, UploadReceipt)> = Vec::new();
    for j in 0..3 {
        acked.push((j, upload(&raw, &run.assignments[j], j).await.unwrap()));
    }
    let mut in_flight = Vec::new();
    for j in 3..DEVICES {
        let (raw, a) = (raw.clone(), run.assignments[j].clone());
        in_flight.push(tokio::spawn(async move { (j, upload(&raw, &a, j).await) }));
    }
    tokio::time::sleep(Duration::from_millis(15)).await;
    run.server.kill();
    for handle in in_flight {
        if let (j, Ok(receipt)) = handle.await.unwrap() {
            acked.push((j, receipt));
        }
    }
    eprintln!("acknowledged before SIGKILL: {} of {DEVICES}", acked.len());

    run.server.restart().await.unwrap();
    let client = run.server.client();
    // Every device retries (same token, same bytes). Acknowledged uploads get their stored receipt.
    for (j, a) in run.assignments.iter().enumerate() {
        let receipt = upload(&client, a, j).await.unwrap();
        if let Some((_, before)) = acked.iter().find(|(k, _)| *k == j) {
            assert_eq!(
                &receipt, before,
                "acknowledged upload {j} was lost or changed by the crash"
            );
        }
    }
    let model = committed_model(&run).await;
    assert!(
        model == expected,
        "the crashed run committed a different model than the uncrashed run"
    );
}

async fn kill_after_last_upload(backend: Backend, blobs: Blobs) {
    let expected = uncrashed_model(backend).await;
    let mut run = new_run(backend, blobs).await;
    for (j, a) in run.assignments.iter().enumerate() {
        upload(&run.client, a, j).await.unwrap();
    }
    // The round is full; the commit may be anywhere between not started and done.
    run.server.kill();
    run.server.restart().await.unwrap();
    let model = committed_model(&run).await;
    assert!(
        model == expected,
        "recovery committed a different model than the uncrashed run"
    );
    let status = run.client.task_status(&run.task).await.unwrap();
    assert_eq!((status.model_version, status.committed_rounds), (1, 1));
}

/// A finaliser killed between its commit and removing the round's update blobs leaves them (no one
/// finalises that round again): the next start-up removes them, and leaves an open round's alone.
async fn update_blobs_of_ended_rounds_are_swept_at_start_up(backend: Backend) {
    let mut run = new_run(backend, Blobs::S3).await;
    for (j, a) in run.assignments.iter().enumerate() {
        upload(&run.client, a, j).await.unwrap();
    }
    committed_model(&run).await;
    // A second task keeps a round open.
    let open_task = run
        .client
        .create_task(
            &small_task(DEVICES as u32, DEVICES as u32, 1, 300),
            small_tensors(|_| 0.0).encode(),
        )
        .await
        .unwrap()
        .task_id;
    let ended = run.client.rounds(&run.task).await.unwrap()[0].round_id;
    let open = run.client.rounds(&open_task).await.unwrap()[0].round_id;
    let store = run.s3.as_ref().unwrap().open(&run.server.data_dir.join("blobs"));
    for round in [ended, open] {
        store
            .put(
                &format!("updates/{round}/left.safetensors"),
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
    }
    run.server.kill();
    run.server.restart().await.unwrap();
    let started = std::time::Instant::now();
    while !store.list(&format!("updates/{ended}")).await.unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the ended round's update blobs were not swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        store.list(&format!("updates/{open}")).await.unwrap(),
        ["left.safetensors"]
    );
}
