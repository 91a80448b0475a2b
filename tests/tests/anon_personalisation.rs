//! Anonymous embeddings with the real parts on both sides (issue 15), on both databases: devices
//! send samples with no credential, the real cloud worker (`fedhive_cloud::anon::AnonWorker`, burn
//! flex, over HTTP with the task's worker token) trains the base model and then fine-tunes, each
//! round commits the worker's model as a version that devices download and use, a device's fit of
//! `mu_u` lowers its loss and leaves the model's bytes unchanged, and with their embeddings two
//! users whose inputs look alike get their own labels back, on the device and from the worker.

use std::{sync::Arc, time::Duration};

use fedhive_client::{
    anon::{self, Examples, FitParams, UserEmbedding},
    client::FedhiveClient,
};
use fedhive_cloud::anon::{
    AnonStep, AnonWorker, AnonWorkerOptions, PredictError, PredictRequest, PredictResponse,
};
use fedhive_e2e::{Backend, ServerProcess, TestDb, on_both_databases, small_task, wait_for_version};
use fedhive_shared::{
    NamedTensors,
    anon::SampleShape,
    wire::{StrategyConfig, TaskConfig, TaskState},
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

on_both_databases!(
    the_worker_and_the_devices_personalise_without_identifiers,
    the_worker_program_runs_a_task_to_its_end,
);

const SHAPE: SampleShape = SampleShape {
    features: 6,
    embedding_dim: 2,
    num_classes: 2,
};

/// Inputs that say nothing about the label; each user labels all of theirs with their own class,
/// so only the embedding can tell the users apart.
fn user_examples(label: u32, n: usize, rng: &mut StdRng) -> Examples {
    Examples {
        features: SHAPE.features,
        inputs: (0..n * SHAPE.features).map(|_| rng.random::<f32>()).collect(),
        labels: vec![label; n],
    }
}

async fn submit_round(
    client: &FedhiveClient,
    task: &str,
    users: &[(Option<&UserEmbedding>, &Examples)],
    rng: &mut StdRng,
) {
    // Ten samples a request, the two users' requests interleaved.
    let bodies: Vec<Vec<_>> = users
        .iter()
        .map(|(q, data)| {
            let samples = anon::draw_samples(SHAPE, *q, data, rng);
            let order: Vec<usize> = (0..samples.len()).collect();
            order.chunks(10).map(|c| samples.select(c)).collect()
        })
        .collect();
    for i in 0..bodies[0].len() {
        for user in &bodies {
            let answer = client.submit_anonymous_samples(task, &user[i]).await.unwrap();
            assert_eq!((answer.accepted_samples, answer.duplicate), (10, false));
        }
    }
}

async fn model(client: &FedhiveClient, task: &str) -> (i64, NamedTensors) {
    let (version, bytes) = client.download_model(task, None).await.unwrap();
    (version, NamedTensors::decode(&bytes).unwrap())
}

fn task_config() -> TaskConfig {
    TaskConfig {
        model: anon::MODEL_NAME.into(),
        tensors: anon::tensor_specs(SHAPE),
        strategy: StrategyConfig::AnonEmbeddings {
            embedding_dim: SHAPE.embedding_dim as u32,
            sigma: 0.1,
            input_features: SHAPE.features as u32,
            num_classes: SHAPE.num_classes as u32,
            max_samples_per_submission: 10,
            mix_batch_samples: 20,
            samples_per_second: 1.0e4,
            samples_burst: 10_000,
        },
        ..small_task(1, 1, 2, 300)
    }
}

/// `fedhive-cloud --anon-embeddings` as its own process trains each round once its batches are
/// there, and exits when the task is over.
async fn the_worker_program_runs_a_task_to_its_end(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(&dir.path().join("data"), &db).await.unwrap();
    let admin = server.client();
    let created = admin
        .create_task(&task_config(), anon::initial_weights(SHAPE, 2).encode())
        .await
        .unwrap();
    let task = created.task_id.clone();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-cloud"))
        .args(["--anon-embeddings", "--server", &server.base_url, "--task", &task])
        .arg("--state-dir")
        .arg(dir.path().join("worker"))
        .args([
            "--poll-ms",
            "50",
            "--backend",
            "flex",
            "--anon-fine-tune-epochs",
            "2",
        ])
        // A round's 80 samples make 4 batches of 20: the worker waits for all of them (with 1 it
        // could train round 2 on its first batch and finish the task under the later submissions).
        .args(["--anon-min-new-batches", "4"])
        .env("FEDHIVE_WORKER_TOKEN", created.worker_token.unwrap())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting the worker");
    let devices = FedhiveClient::new(&server.base_url).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let data = [user_examples(0, 40, &mut rng), user_examples(1, 40, &mut rng)];
    let q = UserEmbedding::random(SHAPE.embedding_dim, 0.1, &mut rng);
    submit_round(&devices, &task, &[(None, &data[0]), (None, &data[1])], &mut rng).await;
    wait_for_version(&admin, &task, 1, Duration::from_secs(60)).await;
    submit_round(
        &devices,
        &task,
        &[(Some(&q), &data[0]), (Some(&q), &data[1])],
        &mut rng,
    )
    .await;
    wait_for_version(&admin, &task, 2, Duration::from_secs(60)).await;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the worker did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let files = std::fs::read_dir(dir.path().join("worker")).unwrap().count();
    assert_eq!(
        files, 3,
        "two round models and the batch cursor in its state directory"
    );
}

async fn the_worker_and_the_devices_personalise_without_identifiers(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(&dir.path().join("data"), &db).await.unwrap();
    let admin = server.client();
    let device = fedhive_client::backend::Backend::Flex.device().unwrap();
    let config = task_config();
    let initial = anon::initial_weights(SHAPE, 1);
    let created = admin.create_task(&config, initial.encode()).await.unwrap();
    let task = created.task_id.clone();
    let fit = |epochs, learning_rate| FitParams {
        epochs,
        batch_size: 16,
        learning_rate,
    };
    let worker = AnonWorker {
        client: server.client(),
        task_id: task.clone(),
        token: created.worker_token.unwrap(),
        device: device.clone(),
        shape: SHAPE,
        state_dir: dir.path().join("worker"),
        options: AnonWorkerOptions {
            base: fit(5, 0.01),
            fine_tune: fit(40, 0.01),
            min_new_batches: 1,
            seed: 3,
            poll: Duration::from_millis(20),
        },
    };
    // Devices send with no credential: a client without the admin token.
    let devices = FedhiveClient::new(&server.base_url).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let data = [user_examples(0, 80, &mut rng), user_examples(1, 80, &mut rng)];

    // Round 1: nobody has a distribution yet; the worker trains the base model on e = 0.
    assert_eq!(worker.step().await.unwrap(), AnonStep::Waiting, "no batch yet");
    submit_round(&devices, &task, &[(None, &data[0]), (None, &data[1])], &mut rng).await;
    let AnonStep::Submitted {
        round_id, samples, ..
    } = worker.step().await.unwrap()
    else {
        panic!("the worker trains once batches are there");
    };
    assert_eq!(samples, 160, "every sample, in 8 shuffled batches of 20");
    wait_for_version(&admin, &task, 1, Duration::from_secs(30)).await;
    let (version, base) = model(&devices, &task).await;
    assert_eq!(version, 1);
    assert_ne!(base, initial, "version 1 is the worker's base model");
    let stored = std::fs::read(
        dir.path()
            .join(format!("worker/anon-round-{round_id}.safetensors")),
    )
    .unwrap();
    assert_eq!(base.encode(), stored, "exactly the model the worker submitted");

    // Each device creates q_u, stores it, and fits mu against version 1 with the model frozen.
    let mut qs = Vec::new();
    for (u, examples) in data.iter().enumerate() {
        let path = dir.path().join(format!("q{u}.json"));
        let mut q = UserEmbedding::random(SHAPE.embedding_dim, 0.1, &mut rng);
        let before = base.encode();
        let report =
            anon::fit_embedding(&base, SHAPE, &mut q, examples, fit(20, 0.05), &device, u as u64).unwrap();
        assert!(report.loss_after < report.loss_before, "{report:?}");
        assert_eq!(base.encode(), before, "the fit leaves the model's bytes alone");
        q.save(&path).unwrap();
        assert_eq!(UserEmbedding::load(&path).unwrap().as_ref(), Some(&q));
        qs.push(q);
    }

    // Round 2: samples with fresh embeddings; the worker fine-tunes; the task then finishes.
    submit_round(
        &devices,
        &task,
        &[(Some(&qs[0]), &data[0]), (Some(&qs[1]), &data[1])],
        &mut rng,
    )
    .await;
    let AnonStep::Submitted { samples, .. } = worker.step().await.unwrap() else {
        panic!("the worker fine-tunes on the new batches");
    };
    assert_eq!(samples, 160, "only the batches since round 1");
    wait_for_version(&admin, &task, 2, Duration::from_secs(30)).await;
    assert_eq!(admin.task_status(&task).await.unwrap().state, TaskState::Finished);
    assert_eq!(worker.step().await.unwrap(), AnonStep::Finished);
    let (version, tuned) = model(&devices, &task).await;
    assert_eq!(version, 2);

    let worker = Arc::new(worker);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let predict_url = format!("http://{}/v1/predict", listener.local_addr().unwrap());
    tokio::spawn(fedhive_cloud::anon::serve(listener, worker.clone()));
    let http = reqwest::Client::new();

    // The devices re-fit mu against version 2 and predict new inputs with fresh draws: each user
    // gets their own label back, which no model without the embedding could do for both.
    for (u, q) in qs.iter_mut().enumerate() {
        anon::fit_embedding(&tuned, SHAPE, q, &data[u], fit(20, 0.05), &device, 7).unwrap();
        let fresh = user_examples(u as u32, 50, &mut rng);
        let predicted = anon::predict(&tuned, SHAPE, Some(q), &fresh.inputs, &device, &mut rng).unwrap();
        let right = predicted.iter().filter(|&&p| p == u as u32).count();
        assert!(right >= 45, "user {u}: {right} of 50 right ({predicted:?})");

        // A thin client asks the worker over HTTP with the same (input, e): the same answers.
        let samples = anon::draw_samples(SHAPE, Some(q), &fresh, &mut rng);
        let on_device = anon::predict_samples(&tuned, SHAPE, &samples, &device).unwrap();
        let request = PredictRequest {
            inputs: (0..samples.len()).map(|i| samples.input(i).to_vec()).collect(),
            embeddings: (0..samples.len())
                .map(|i| samples.embedding(i).to_vec())
                .collect(),
        };
        let resp = http.post(&predict_url).json(&request).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let answer: PredictResponse = resp.json().await.unwrap();
        assert_eq!((answer.model_version, answer.classes), (2, on_device));
    }
    // A request whose embedding has the wrong width is refused, naming the problem.
    let bad = PredictRequest {
        inputs: vec![vec![0.5; SHAPE.features]],
        embeddings: vec![vec![0.5; SHAPE.embedding_dim + 1]],
    };
    let resp = http.post(&predict_url).json(&bad).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let refusal: PredictError = resp.json().await.unwrap();
    assert_eq!(refusal.error, "bad_request");
    assert!(refusal.message.contains("embedding of 3"), "{}", refusal.message);
}
