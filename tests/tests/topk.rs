//! Top-k updates over real HTTP (`fedhive_shared::topk`): a FedAvg task that asks for them commits
//! the hand-computed model, refuses bodies that break the layout without counting them, and a
//! percent outside 1-100 or a strategy that does not fold dense sums is refused at task creation.
//! SQLite and PostgreSQL.

use std::time::Duration;

use bytes::Bytes;
use fedhive_e2e::{
    Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors, wait_for_version,
};
use fedhive_shared::{
    NamedTensors, topk,
    wire::{StrategyConfig, TaskConfig, UpdateEncoding},
};

on_both_databases!(
    top_k_round_commits_the_hand_computed_model,
    a_bad_top_k_config_is_refused,
);

fn top_k_task(percent: u8) -> TaskConfig {
    TaskConfig {
        update_encoding: UpdateEncoding::TopK { percent },
        ..small_task(2, 2, 1, 60)
    }
}

async fn top_k_round_commits_the_hand_computed_model(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let initial = small_tensors(|i| i as f32);
    // 50 %: of `b` [3] two values are kept, of `w` [2, 3] three.
    let task = client
        .create_task(&top_k_task(50), initial.encode())
        .await
        .unwrap()
        .task_id;
    let (a1, a2) = (assign(&client, &task).await, assign(&client, &task).await);
    assert_eq!(a1.encoding, UpdateEncoding::TopK { percent: 50 });

    // Refused, and nothing counted: an f32 body, and a body kept at another percent.
    let delta = |scale: f32| small_tensors(move |i| if i % 2 == 0 { scale } else { scale / 8.0 });
    let err = client
        .upload_update(&a1.upload_token, 1, Bytes::from(delta(1.0).encode()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("missing_tensor"), "{err}");
    let err = client
        .upload_update(&a1.upload_token, 1, Bytes::from(topk::encode(&delta(1.0), 100)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("shape_mismatch"), "{err}");
    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!(rounds.iter().map(|r| r.accepted).collect::<Vec<_>>(), vec![0]);

    // Values 0..9 over `b` then `w`: the even positions hold `scale`, the odd `scale / 8`. At 50 %
    // `b` keeps its two even positions (values 0, 2) and `w` its three (values 4, 6, 8): every
    // even value is `scale`, every odd one reads back 0. n=1 with scale 1, n=3 with scale 2:
    // x += (1 * 1 + 3 * 2) / 4 = 1.75 on even values, 0 on odd ones.
    client
        .upload_update(&a1.upload_token, 1, Bytes::from(topk::encode(&delta(1.0), 50)))
        .await
        .unwrap();
    client
        .upload_update(&a2.upload_token, 3, Bytes::from(topk::encode(&delta(2.0), 50)))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, Duration::from_secs(30)).await;
    let (_, bytes) = client.download_model(&task, Some(1)).await.unwrap();
    assert_eq!(
        NamedTensors::decode(&bytes).unwrap(),
        small_tensors(|i| i as f32 + if i % 2 == 0 { 1.75 } else { 0.0 })
    );
}

async fn a_bad_top_k_config_is_refused(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let initial = small_tensors(|_| 0.0).encode();
    for percent in [0, 101] {
        let err = client
            .create_task(&top_k_task(percent), initial.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("invalid_config"), "{err}");
        assert!(err.to_string().contains("percent"), "{err}");
    }
    let fedlaavg = TaskConfig {
        strategy: StrategyConfig::FedLaAvg {
            warmup_rounds: 0,
            selection_window_ms: 1000,
        },
        ..top_k_task(10)
    };
    let err = client.create_task(&fedlaavg, initial.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_config"), "{err}");
    assert!(err.to_string().contains("top_k"), "{err}");
    client.create_task(&top_k_task(10), initial).await.unwrap();
}
