//! The README guide's device side: `task-files` writes a task the server accepts, and `devices`
//! joins it on a running server and trains until it is over.

use fedhive_shared::wire::TaskState;
use fedhive_sim::join::{DevicesOptions, TaskFilesOptions, run_devices, write_task_files};

#[tokio::test(flavor = "multi_thread")]
async fn devices_join_a_task_created_from_the_written_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = fedhive_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), data.path().into());
    config.insecure_dev = true;
    config.coordinator.checkin_retry_ms = 100;
    let server = fedhive_server::start(config).await.unwrap();
    let url = format!("http://{}", server.addr);

    let (task_json, model) = write_task_files(&TaskFilesOptions {
        model: "mlp".into(),
        rounds: 2,
        devices_per_round: 2,
        seed: 1,
        output: dir.path().into(),
    })
    .unwrap();
    let config = serde_json::from_slice(&std::fs::read(task_json).unwrap()).unwrap();
    let client = fedhive_client::client::FedhiveClient::new(&url).unwrap();
    let task = client
        .create_task(&config, std::fs::read(model).unwrap())
        .await
        .expect("the server accepts the written task")
        .task_id;

    let report = run_devices(&DevicesOptions {
        server: url,
        task: task.clone(),
        devices: 4,
        alpha: 0.5,
        backend: "flex".into(),
        seed: 1,
        data_dir: None,
    })
    .await
    .unwrap();
    assert_eq!(report.updates_accepted, 4, "{report:?}");
    let status = client.task_status(&task).await.unwrap();
    assert_eq!((status.state, status.model_version), (TaskState::Finished, 2));
    server.shutdown().await;
}
