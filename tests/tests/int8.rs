//! int8 updates over real HTTP (`fedhive_shared::int8`): a FedAvg task that asks for them commits
//! the hand-computed model, refuses f32 and malformed int8 bodies without counting them, and other
//! strategies refuse the encoding at task creation; the SDK sends int8 when its assignment says so.
//! SQLite and PostgreSQL.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use fedhive_client::{
    backend::Backend as Compute,
    data::{Dataset, IMAGE_PIXELS, NUM_CLASSES},
    device::Device,
    model::{ModelKind, initial_weights, tensor_specs},
};
use fedhive_e2e::{
    Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors, wait_for_version,
};
use fedhive_shared::{
    NamedTensors, int8,
    wire::{StrategyConfig, TaskConfig, UpdateEncoding},
};

on_both_databases!(
    int8_round_commits_the_hand_computed_model,
    strategies_without_int8_refuse_it,
    an_sdk_device_trains_and_uploads_int8,
);

fn int8_task() -> TaskConfig {
    TaskConfig {
        update_encoding: UpdateEncoding::Int8,
        ..small_task(2, 2, 1, 60)
    }
}

/// An int8 body whose every value is `v`. With `v = 127 * 2^-8 * m` every block's scale is
/// `m * 2^-8` and every quantised value 127 whatever the random draw, so each value reads back as
/// exactly `v`.
fn int8_filled(v: f32) -> Bytes {
    Bytes::from(int8::encode(&small_tensors(|_| v), || 0.999))
}

async fn int8_round_commits_the_hand_computed_model(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let initial = small_tensors(|i| i as f32);
    let task = client
        .create_task(&int8_task(), initial.encode())
        .await
        .unwrap()
        .task_id;
    let (a1, a2) = (assign(&client, &task).await, assign(&client, &task).await);
    assert_eq!(
        (a1.encoding, a2.encoding),
        (UpdateEncoding::Int8, UpdateEncoding::Int8)
    );

    // Refused, and nothing counted: an f32 body, and an int8 body holding -128.
    let f32_body = Bytes::from(small_tensors(|_| 0.5).encode());
    let err = client
        .upload_update(&a1.upload_token, 1, f32_body)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("dtype_mismatch"), "{err}");
    let mut bad = int8_filled(127.0 / 256.0).to_vec();
    let last = bad.len() - 1;
    bad[last] = 0x80;
    let err = client
        .upload_update(&a1.upload_token, 1, Bytes::from(bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("value_out_of_range"), "{err}");
    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!(rounds.iter().map(|r| r.accepted).collect::<Vec<_>>(), vec![0]);

    // n=1 with 127/256 (scale 2^-8) and n=3 with 381/256 (scale 3 * 2^-8):
    // x += (1 * 127/256 + 3 * 381/256) / 4 = 1270/1024 = 635/512, exact in fixed point.
    let r1 = client
        .upload_update(&a1.upload_token, 1, int8_filled(127.0 / 256.0))
        .await
        .unwrap();
    assert_eq!(r1.accepted_updates, 1);
    client
        .upload_update(&a2.upload_token, 3, int8_filled(381.0 / 256.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, Duration::from_secs(30)).await;
    let (_, bytes) = client.download_model(&task, Some(1)).await.unwrap();
    assert_eq!(
        NamedTensors::decode(&bytes).unwrap(),
        small_tensors(|i| i as f32 + 635.0 / 512.0)
    );
}

async fn strategies_without_int8_refuse_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let config = TaskConfig {
        strategy: StrategyConfig::FedLaAvg {
            warmup_rounds: 0,
            selection_window_ms: 1000,
        },
        ..int8_task()
    };
    let err = client
        .create_task(&config, small_tensors(|_| 0.0).encode())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_config"), "{err}");
    assert!(err.to_string().contains("`update_encoding` \"int8\""), "{err}");
    // The same task with f32 updates is fine: the encoding was the only problem.
    let f32_config = TaskConfig {
        update_encoding: UpdateEncoding::F32,
        ..config
    };
    client
        .create_task(&f32_config, small_tensors(|_| 0.0).encode())
        .await
        .unwrap();
}

/// The SDK reads the assignment's encoding: a real device (burn, flex) trains three rounds and sends
/// int8 bodies, each under a 3.5th of the f32 update's size, and every round commits.
async fn an_sdk_device_trains_and_uploads_int8(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let kind = ModelKind::MlpSmall;
    let config = TaskConfig {
        model: kind.name().into(),
        tensors: tensor_specs(kind),
        update_encoding: UpdateEncoding::Int8,
        ..small_task(1, 1, 3, 60)
    };
    let initial = initial_weights(kind, 1);
    let task = client
        .create_task(&config, initial.encode())
        .await
        .unwrap()
        .task_id;
    let data = Arc::new(Dataset {
        images: (0..32 * IMAGE_PIXELS).map(|_| rand::random::<f32>()).collect(),
        labels: (0..32)
            .map(|_| rand::random_range(0..NUM_CLASSES as u8))
            .collect(),
    });
    let mut device = Device::new(client.clone(), &task, Compute::Flex.device().unwrap(), data, 3);
    let report = device.run().await.unwrap();
    assert_eq!(report.updates_accepted, 3, "{report:?}");
    // Over-selection may hand the device a second token in a round it already filled: that upload
    // is late, but it was sent, so count it.
    let uploads = u64::from(report.updates_accepted + report.updates_late);
    let f32_update = initial.encode().len() as u64;
    assert!(
        report.bytes_uploaded * 35 < f32_update * 10 * uploads,
        "{} bytes for {uploads} uploads against {f32_update} for one f32 update",
        report.bytes_uploaded
    );
    assert_eq!(client.task_status(&task).await.unwrap().committed_rounds, 3);
    // The model moved: the int8 updates were folded, not dropped.
    let (_, last) = client.download_model(&task, Some(3)).await.unwrap();
    assert_ne!(NamedTensors::decode(&last).unwrap(), initial);
}
