//! Rounds over real HTTP: FedAvg commits, retries, late uploads, deadlines; SQLite and PostgreSQL.

use std::time::Duration;

use bytes::Bytes;
use fedhive_e2e::{
    Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors, wait_for_version,
};
use fedhive_shared::{
    NamedTensors,
    wire::{CheckinResponse, LearningRateSchedule, MetricsReport, RoundState, TaskState},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(30);

on_both_databases!(
    fedavg_round_commits_hand_computed_model,
    retried_upload_counts_once,
    upload_in_flight_is_refused_until_done,
    late_upload_after_commit_is_refused,
    deadline_commits_with_minimum_or_abandons,
    a_step_schedule_lowers_the_rate_devices_are_given,
);

fn filled(v: f32) -> Bytes {
    Bytes::from(small_tensors(|_| v).encode())
}

async fn fedavg_round_commits_hand_computed_model(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let initial = small_tensors(|i| i as f32);
    let task = client
        .create_task(&small_task(2, 2, 2, 60), initial.encode())
        .await
        .unwrap()
        .task_id;

    let (version, bytes) = client.download_model(&task, None).await.unwrap();
    assert_eq!(
        (version, NamedTensors::decode(&bytes).unwrap()),
        (0, initial.clone())
    );

    // Round 1: n=1 with delta 0.5 and n=3 with delta 1.5: x += (1*0.5 + 3*1.5) / 4 = 1.25.
    let a1 = assign(&client, &task).await;
    let a2 = assign(&client, &task).await;
    assert_eq!((a1.round_id, a1.model_version), (a2.round_id, 0));
    let r1 = client
        .upload_update(&a1.upload_token, 1, filled(0.5))
        .await
        .unwrap();
    assert_eq!(r1.accepted_updates, 1);
    client
        .report_metrics(
            &a1.upload_token,
            &MetricsReport {
                loss: 0.7,
                num_samples: 1,
                accuracy: Some(0.5),
            },
        )
        .await
        .unwrap();
    let r2 = client
        .upload_update(&a2.upload_token, 3, filled(1.5))
        .await
        .unwrap();
    assert_eq!(r2.accepted_updates, 2);
    wait_for_version(&client, &task, 1, LONG).await;
    let (_, v1) = client.download_model(&task, Some(1)).await.unwrap();
    assert_eq!(
        NamedTensors::decode(&v1).unwrap(),
        small_tensors(|i| i as f32 + 1.25)
    );

    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!(rounds.len(), 2);
    assert_eq!(
        (
            rounds[0].state.clone(),
            rounds[0].accepted,
            rounds[0].total_samples
        ),
        (RoundState::Committed, 2, 4)
    );
    assert_eq!(
        (rounds[1].state.clone(), rounds[1].base_version, rounds[1].seq),
        (RoundState::Open, 1, 2)
    );

    // Round 2 steps back by the same amount; then the task is finished.
    let b1 = assign(&client, &task).await;
    let b2 = assign(&client, &task).await;
    assert_eq!(b1.model_version, 1);
    client
        .upload_update(&b1.upload_token, 5, filled(-1.25))
        .await
        .unwrap();
    client
        .upload_update(&b2.upload_token, 5, filled(-1.25))
        .await
        .unwrap();
    wait_for_version(&client, &task, 2, LONG).await;
    let (_, v2) = client.download_model(&task, None).await.unwrap();
    assert_eq!(NamedTensors::decode(&v2).unwrap(), initial);
    let status = client.task_status(&task).await.unwrap();
    assert_eq!(
        (status.state, status.committed_rounds, status.current_round),
        (TaskState::Finished, 2, None)
    );
    assert_eq!(
        client.checkin(&task).await.unwrap(),
        CheckinResponse::Finished { model_version: 2 }
    );
}

async fn retried_upload_counts_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.raw_client();
    let task = client
        .create_task(&small_task(3, 3, 1, 60), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let a = assign(&client, &task).await;

    let first = client
        .upload_update(&a.upload_token, 4, filled(0.25))
        .await
        .unwrap();
    let again = client
        .upload_update(&a.upload_token, 4, filled(0.25))
        .await
        .unwrap();
    assert_eq!(first, again, "a retried identical upload gets the stored receipt");

    let different = client
        .upload_update(&a.upload_token, 4, filled(0.5))
        .await
        .unwrap_err();
    assert_eq!(different.code(), Some("conflicting_retry"));
    let other_count = client
        .upload_update(&a.upload_token, 5, filled(0.25))
        .await
        .unwrap_err();
    assert_eq!(other_count.code(), Some("conflicting_retry"));

    let round = &client.rounds(&task).await.unwrap()[0];
    assert_eq!((round.accepted, round.total_samples), (1, 4));
}

async fn upload_in_flight_is_refused_until_done(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.raw_client();
    let task = client
        .create_task(&small_task(3, 3, 1, 60), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let a = assign(&client, &task).await;
    let body = filled(0.25);

    // Start an upload by hand and stop halfway through its body.
    let addr = server.base_url.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "PUT /v1/updates?num_samples=2 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        a.upload_token,
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body[..body.len() / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let refused = client
        .upload_update(&a.upload_token, 2, body.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("upload_in_flight"));
    assert_eq!(client.rounds(&task).await.unwrap()[0].accepted, 0);

    slow.write_all(&body[body.len() / 2..]).await.unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "first upload completes: {answer}"
    );
    let retry = client.upload_update(&a.upload_token, 2, body).await.unwrap();
    assert_eq!(retry.accepted_updates, 1);
    assert_eq!(client.rounds(&task).await.unwrap()[0].accepted, 1);
}

async fn late_upload_after_commit_is_refused(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.raw_client();
    let task = client
        .create_task(&small_task(2, 2, 3, 60), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    // Over-selection 2.0: four assignments for K = 2.
    let assigned: Vec<_> = assign_n(&client, &task, 3).await;
    client
        .upload_update(&assigned[0].upload_token, 1, filled(1.0))
        .await
        .unwrap();
    client
        .upload_update(&assigned[1].upload_token, 1, filled(1.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, LONG).await;
    let before = client.rounds(&task).await.unwrap();

    let late = client
        .upload_update(&assigned[2].upload_token, 1, filled(1.0))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Some("round_closed"));
    assert_eq!(client.rounds(&task).await.unwrap(), before);
    let (_, model) = client.download_model(&task, Some(1)).await.unwrap();
    assert_eq!(NamedTensors::decode(&model).unwrap(), small_tensors(|_| 1.0));
}

async fn assign_n(
    client: &fedhive_client::client::FedhiveClient,
    task: &str,
    n: usize,
) -> Vec<fedhive_shared::wire::Assignment> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(assign(client, task).await);
    }
    out
}

async fn deadline_commits_with_minimum_or_abandons(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.raw_client();
    // K = 3, minimum 2, 2-second deadline.
    let task = client
        .create_task(&small_task(3, 2, 2, 2), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;

    // Round 1: only one update by the deadline: abandoned, the model stays at version 0.
    let a = assign(&client, &task).await;
    client
        .upload_update(&a.upload_token, 1, filled(1.0))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let rounds = client.rounds(&task).await.unwrap();
        if rounds[0].state == RoundState::Abandoned {
            assert_eq!(rounds.len(), 2);
            assert_eq!(
                (rounds[1].seq, rounds[1].base_version, rounds[1].state.clone()),
                (2, 0, RoundState::Open)
            );
            break;
        }
        assert!(started.elapsed() < LONG, "round 1 was not abandoned: {rounds:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client.task_status(&task).await.unwrap().model_version, 0);

    // Round 2: two updates (the minimum) by the deadline: committed at the deadline.
    let b1 = assign(&client, &task).await;
    let b2 = assign(&client, &task).await;
    assert_eq!(b1.round_id, a.round_id + 1);
    client
        .upload_update(&b1.upload_token, 1, filled(2.0))
        .await
        .unwrap();
    client
        .upload_update(&b2.upload_token, 3, filled(6.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, LONG).await;
    let (_, model) = client.download_model(&task, None).await.unwrap();
    assert_eq!(NamedTensors::decode(&model).unwrap(), small_tensors(|_| 5.0));
    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!(
        (rounds[1].state.clone(), rounds[1].accepted),
        (RoundState::Committed, 2)
    );
}

/// `training.learning_rate_schedule`: each round's assignment carries that round's rate (and no
/// schedule); a schedule that cannot be applied is refused at task creation, naming the field.
async fn a_step_schedule_lowers_the_rate_devices_are_given(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let step = |milestones: Vec<u32>, factor: f32| {
        let mut config = small_task(1, 1, 4, 60);
        config.training.learning_rate = 0.5;
        config.training.learning_rate_schedule = Some(LearningRateSchedule::Step { milestones, factor });
        config
    };
    for (milestones, factor, named) in [
        (vec![2, 1], 0.5, "milestones"),
        (vec![], 0.5, "milestones"),
        (vec![1], 0.0, "factor"),
        (vec![1], 1.5, "factor"),
    ] {
        let refused = client
            .create_task(&step(milestones.clone(), factor), filled(0.0).to_vec())
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Some("invalid_config"), "{refused}");
        let text = refused.to_string();
        assert!(
            text.contains("training.learning_rate_schedule") && text.contains(named),
            "{milestones:?} x {factor}: {text}"
        );
    }

    let task = client
        .create_task(&step(vec![1, 3], 0.5), filled(0.0).to_vec())
        .await
        .unwrap()
        .task_id;
    let mut rates = Vec::new();
    for version in 0..4 {
        let a = assign(&client, &task).await;
        assert_eq!(a.model_version, version);
        assert_eq!(
            a.training.learning_rate_schedule, None,
            "devices get the rate, not the schedule"
        );
        rates.push(a.training.learning_rate);
        client
            .upload_update(&a.upload_token, 1, filled(0.0))
            .await
            .unwrap();
        wait_for_version(&client, &task, version + 1, LONG).await;
    }
    assert_eq!(rates, vec![0.5, 0.25, 0.25, 0.125]);
}
