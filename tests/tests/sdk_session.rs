//! The SDK as apps embed it (`fedhive_client::session`): a model the SDK has never seen (the
//! example app's) joins a FedAvg task and a FedLaAvg task and trains on real data; a model with a
//! sparse table joins a FedSubAvg task with its submodel; a module holding two of the app's
//! networks joins a DC-CCL task as the control model and the co-model; a device process SIGKILLed at each
//! step of a round resumes it from its state directory without a second upload; corrupt state is
//! refused with a clear error. Real server over HTTP, SQLite and PostgreSQL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Int, Tensor, TensorData};
use bytes::Bytes;
use fedhive_client::data::{Split, default_data_dir, load_fashion_mnist};
use fedhive_client::dc_ccl::{self, ControlLayout};
use fedhive_client::federated::{FederatedModel, LocalData};
use fedhive_client::session::{RoundConditions, Session};
use fedhive_client::state::DeviceState;
use fedhive_client::submodel::local_weights;
use fedhive_e2e::{Backend, ServerProcess, TestDb, on_both_databases};
use fedhive_example_app::{
    AppImages, Summary, TwoLayerNet, accuracy, initial_weights, run_rounds, task_config,
};
use fedhive_shared::NamedTensors;
use fedhive_shared::blocks::{BlockSchedule, PredictorAverage, RoundBlock, choose};
use fedhive_shared::sparse::{RowsRequest, SparseTensors, split_specs};
use fedhive_shared::wire::{RoundState, StrategyConfig, TaskConfig, TaskState, TrainingParams, WithoutCloud};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

on_both_databases!(
    an_apps_own_model_joins_a_fedavg_task_and_learns,
    an_apps_own_model_joins_a_fedlaavg_task_and_learns,
    an_apps_own_model_trains_both_chains_of_an_mc_psgd_task,
    an_apps_own_model_with_a_sparse_table_joins_a_fedsubavg_task,
    a_device_killed_at_each_step_resumes_without_a_second_upload,
    corrupt_device_state_is_refused_with_a_clear_error,
    an_apps_own_models_join_a_dc_ccl_task_beside_a_cloud,
);

fn images(split: Split, from: usize, n: usize) -> AppImages {
    let all = load_fashion_mnist(&default_data_dir(), split)
        .expect("Fashion-MNIST (apt-get install dataset-fashion-mnist)");
    AppImages {
        pixels: all.images[from * 784..(from + n) * 784].to_vec(),
        labels: all.labels[from..from + n].to_vec(),
    }
}

async fn an_apps_own_model_joins_a_fedavg_task_and_learns(backend: Backend) {
    app_model_learns(backend, StrategyConfig::FedAvg { server_lr: 1.0 }).await
}

/// FedLaAvg's device uploads its gradient sum `(x_before - x_after) / gamma`, not a delta. Both
/// devices must check in within each round's selection window to be selected every round: 2 s was
/// too short on a loaded 2-core machine (one device missed a window, the round was abandoned with
/// one upload, and the other contributed 4 times in 3 rounds), so the window is 5 s.
async fn an_apps_own_model_joins_a_fedlaavg_task_and_learns(backend: Backend) {
    app_model_learns(
        backend,
        StrategyConfig::FedLaAvg {
            warmup_rounds: 0,
            selection_window_ms: 5000,
        },
    )
    .await
}

/// The app's DC-CCL module: the cloud's control model `F_m` and the co-model `F_s`, both the
/// example app's network, summed at the logits.
#[derive(Module, Debug)]
struct ControlledNet {
    control: TwoLayerNet,
    co: TwoLayerNet,
}

impl ControlledNet {
    fn new(device: &burn::tensor::Device) -> Self {
        ControlledNet {
            control: TwoLayerNet::new(device),
            co: TwoLayerNet::new(device),
        }
    }

    fn logits(&self, images: Tensor<2>) -> Tensor<2> {
        self.control.logits(images.clone()).detach() + self.co.logits(images)
    }
}

impl FederatedModel for ControlledNet {
    type Batch = (Tensor<2>, Tensor<1, Int>);

    fn loss(&self, (images, labels): Self::Batch) -> Tensor<1> {
        let criterion = burn::nn::loss::CrossEntropyLossConfig::new().init(&images.device());
        criterion.forward(self.logits(images), labels)
    }
}

/// `n` images of the classes `classes` from the split, skipping the first `skip` of them.
fn images_of(split: Split, classes: std::ops::Range<u8>, skip: usize, n: usize) -> AppImages {
    let all = load_fashion_mnist(&default_data_dir(), split)
        .expect("Fashion-MNIST (apt-get install dataset-fashion-mnist)");
    let chosen: Vec<usize> = (0..all.labels.len())
        .filter(|&i| classes.contains(&all.labels[i]))
        .skip(skip)
        .take(n)
        .collect();
    AppImages {
        pixels: chosen
            .iter()
            .flat_map(|&i| all.images[i * 784..(i + 1) * 784].iter().copied())
            .collect(),
        labels: chosen.iter().map(|&i| all.labels[i]).collect(),
    }
}

/// Test accuracy of the summed logits `F_m(x) + F_s(x)`, the app's own forward pass.
fn controlled_accuracy(
    layout: &ControlLayout,
    control: &NamedTensors,
    co: &NamedTensors,
    data: &AppImages,
) -> f32 {
    let device = burn::tensor::Device::flex();
    let net = dc_ccl::load_controlled(ControlledNet::new, &device, layout, control, co).unwrap();
    let all: Vec<usize> = (0..data.num_samples()).collect();
    let (x, y) = data.batch(&all, &device);
    let hits: i64 = net
        .logits(x)
        .argmax(1)
        .squeeze_dim::<1>(1)
        .equal(y)
        .int()
        .sum()
        .try_into_scalar()
        .unwrap();
    hits as f32 / data.num_samples() as f32
}

/// DC-CCL with an app's own models: the cloud (played here by the test, with the worker token)
/// holds classes 0-4 and publishes a control model trained on them; two devices hold classes 5-9
/// and train the co-model through a session whose module holds both (`with_control_model`).
/// Each round fuses the cloud's copy with the devices'; the control model is downloaded once.
async fn an_apps_own_models_join_a_dc_ccl_task_beside_a_cloud(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let device = burn::tensor::Device::flex();
    let layout = ControlLayout::new("control", "co").unwrap();
    let rounds = 3;
    let co_initial = initial_weights(&device, 0).unwrap();
    let strategy = StrategyConfig::DcCcl {
        cloud_weight: 0.5,
        without_cloud: WithoutCloud::Abandon,
        control_model: "example_mlp2".into(),
        control_tensors: co_initial.specs(),
    };
    let config = enrolled_task(&co_initial, strategy, rounds);
    let params = config.training.clone();
    let created = client.create_task(&config, co_initial.encode()).await.unwrap();
    let (task, token) = (created.task_id, created.worker_token.unwrap());

    // The cloud: F_m trained on its own classes (the example app's network, FedAvg's local step).
    let cloud_data = Arc::new(images_of(Split::Train, 0..5, 0, 2000));
    let control = {
        let start = initial_weights(&device, 1).unwrap();
        let trained = fedhive_client::training::train_model(
            TwoLayerNet::new,
            &device,
            &start,
            &*cloud_data,
            &params,
            1,
            &mut |_| true,
        )
        .unwrap();
        start.add(&trained.delta)
    };
    client
        .publish_control_model(&task, 1, &token, Bytes::from(control.encode()))
        .await
        .unwrap();
    // Its copy of F_s each round, trained beside F_m on cloud data by the same module.
    let cloud = {
        let (client, task, token, layout, control) = (
            client.clone(),
            task.clone(),
            token.clone(),
            layout.clone(),
            control.clone(),
        );
        tokio::spawn(async move {
            let mut contributed = 0;
            loop {
                let status = client.cloud_status(&task, &token).await.unwrap();
                if status.state == TaskState::Finished {
                    return contributed;
                }
                let open = status.round.filter(|_| !status.cloud_submitted);
                let Some(round) = open else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let (_, bytes) = client
                    .download_model(&task, Some(round.base_version))
                    .await
                    .unwrap();
                let co = NamedTensors::decode(&bytes).unwrap();
                let (layout, control, data, params) = (
                    layout.clone(),
                    control.clone(),
                    cloud_data.clone(),
                    status.training.clone(),
                );
                let update = tokio::task::spawn_blocking(move || {
                    let device = burn::tensor::Device::flex();
                    dc_ccl::train_controlled(
                        ControlledNet::new,
                        &device,
                        &layout,
                        &control,
                        &co,
                        &*data,
                        &params,
                        2,
                        &mut |_| true,
                    )
                })
                .await
                .unwrap()
                .unwrap();
                client
                    .submit_cloud_update(&task, round.round_id, &token, Bytes::from(update.delta.encode()))
                    .await
                    .unwrap();
                contributed += 1;
            }
        })
    };

    let key = client.create_enrolment_key("app").await.unwrap().enrolment_key;
    let session = |shard: usize| {
        let state = DeviceState::open(dir.path().join(format!("device-{shard}"))).unwrap();
        let data = Arc::new(images_of(Split::Train, 5..10, shard * 1000, 1000));
        Session::new(
            client.clone(),
            &task,
            state,
            device.clone(),
            ControlledNet::new,
            data,
        )
        .unwrap()
        .with_control_model(layout.clone())
        .with_seed(shard as u64)
    };
    let (ra, rb) = enrol_and_finish(session(0), session(1), &key, rounds).await;
    assert_eq!(cloud.await.unwrap(), rounds);
    // Each device downloaded F_s once a round and F_m once (both are the same network here).
    let model_bytes = co_initial.encode().len() as u64;
    assert_eq!(
        ra.bytes_downloaded,
        (u64::from(rounds) + 1) * model_bytes,
        "{ra:?}"
    );
    assert_eq!(
        rb.bytes_downloaded,
        (u64::from(rounds) + 1) * model_bytes,
        "{rb:?}"
    );

    let all_rounds = client.rounds(&task).await.unwrap();
    assert!(
        all_rounds
            .iter()
            .all(|r| r.state == RoundState::Committed && r.accepted == 2),
        "{all_rounds:?}"
    );
    let (_, bytes) = client.download_model(&task, None).await.unwrap();
    let co_final = NamedTensors::decode(&bytes).unwrap();
    let test_all = images_of(Split::Test, 0..10, 0, 2000);
    let test_devices = images_of(Split::Test, 5..10, 0, 1000);
    let control_alone = accuracy(&control, &test_all, &device).unwrap();
    let (before, after) = (
        controlled_accuracy(&layout, &control, &co_initial, &test_all),
        controlled_accuracy(&layout, &control, &co_final, &test_all),
    );
    let on_devices = (
        controlled_accuracy(&layout, &control, &co_initial, &test_devices),
        controlled_accuracy(&layout, &control, &co_final, &test_devices),
    );
    eprintln!(
        "DC-CCL, the example app's models: F_m alone {control_alone}; F_m + F_s {before} -> {after} \
         (devices' classes {} -> {}); bytes downloaded per device {} ({rounds} x F_s + F_m, {model_bytes} each)",
        on_devices.0, on_devices.1, ra.bytes_downloaded
    );
    assert!(
        control_alone < 0.55,
        "F_m knows only the cloud's classes: {control_alone}"
    );
    assert!(
        on_devices.1 > on_devices.0 + 0.4,
        "devices' classes {on_devices:?}"
    );
    assert!(
        after > control_alone + 0.15 && after > before + 0.15,
        "{control_alone} / {before} -> {after}"
    );
}

/// Two devices with the example app's model train 3 rounds of a `strategy` task on 1,000
/// Fashion-MNIST images each; every round commits both updates and the model learns.
async fn app_model_learns(backend: Backend, strategy: StrategyConfig) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let device = burn::tensor::Device::flex();
    let initial = initial_weights(&device, 0).unwrap();
    let config = enrolled_task(&initial, strategy.clone(), 3);
    let task = client
        .create_task(&config, initial.encode())
        .await
        .unwrap()
        .task_id;
    two_devices_finish(&server, dir.path(), &task, 3).await;

    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!(
        rounds
            .iter()
            .map(|r| (r.state.clone(), r.accepted, r.total_samples))
            .collect::<Vec<_>>(),
        vec![(RoundState::Committed, 2, 2000); 3]
    );
    let (version, bytes) = client.download_model(&task, None).await.unwrap();
    assert_eq!(version, 3);
    let trained = NamedTensors::decode(&bytes).unwrap();
    let test = images(Split::Test, 0, 2000);
    let (before, after) = (
        accuracy(&initial, &test, &device).unwrap(),
        accuracy(&trained, &test, &device).unwrap(),
    );
    eprintln!("{strategy:?}, the example app's model: test accuracy {before} -> {after}");
    assert!(
        after > 0.6 && after > before + 0.3,
        "test accuracy {before} -> {after}"
    );
}

/// A `strategy` task on the example app's model from `initial`, for two enrolled devices a round
/// (each gets one upload token per round, so each trains every round), `rounds` rounds, 3 local
/// epochs of the example's SGD (batch 32, step 0.1).
fn enrolled_task(initial: &NamedTensors, strategy: StrategyConfig, rounds: u32) -> TaskConfig {
    let base = task_config(initial, 2, rounds);
    TaskConfig {
        strategy,
        require_enrolled_device: true,
        training: TrainingParams {
            local_epochs: 3,
            ..base.training
        },
        ..base
    }
}

/// Two enrolled devices with the example app's model and 1,000 Fashion-MNIST training images each
/// (shards 0 and 1, state under `dir`) run `task` to its end; each contributes to all `rounds`.
async fn two_devices_finish(server: &ServerProcess, dir: &Path, task: &str, rounds: u32) {
    let key = server
        .client()
        .create_enrolment_key("app")
        .await
        .unwrap()
        .enrolment_key;
    let device = burn::tensor::Device::flex();
    let session = |shard: usize| {
        let state = DeviceState::open(dir.join(format!("device-{shard}"))).unwrap();
        let data = Arc::new(images(Split::Train, shard * 1000, 1000));
        Session::new(
            server.client(),
            task,
            state,
            device.clone(),
            TwoLayerNet::new,
            data,
        )
        .unwrap()
        .with_seed(shard as u64)
    };
    enrol_and_finish(session(0), session(1), &key, rounds).await;
}

/// Enrols two sessions with `key` and runs both to the task's end at once; each must contribute
/// to all `rounds`. Returns what each did.
async fn enrol_and_finish<M, D>(
    mut a: Session<M, D>,
    mut b: Session<M, D>,
    key: &str,
    rounds: u32,
) -> (Summary, Summary)
where
    M: FederatedModel + 'static,
    D: LocalData<Batch = M::Batch> + Send + Sync + 'static,
{
    a.enrol(key).await.unwrap();
    b.enrol(key).await.unwrap();
    let conditions = RoundConditions::default();
    let (ra, rb) = tokio::join!(
        run_rounds(&mut a, &conditions, None),
        run_rounds(&mut b, &conditions, None)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.finished && rb.finished, "{ra:?} {rb:?}");
    assert_eq!(
        (ra.contributed, rb.contributed),
        (rounds, rounds),
        "{ra:?} {rb:?}"
    );
    (ra, rb)
}

/// MC-PSGD: each device trains the example app's model from `x` and from the block's chain `y_m`
/// and reports both trained models' losses, which pick the chain that feeds the block's predictor.
async fn an_apps_own_model_trains_both_chains_of_an_mc_psgd_task(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let device = burn::tensor::Device::flex();
    let initial = initial_weights(&device, 0).unwrap();
    let strategy = StrategyConfig::McPsgd {
        server_lr: 1.0,
        schedule: BlockSchedule::Rounds {
            blocks: vec![RoundBlock {
                name: "day".into(),
                rounds: 2,
            }],
        },
        chain_learning_rate: Some(0.05),
        predictor_average: PredictorAverage::All,
    };
    let config = enrolled_task(&initial, strategy, 2);
    let task = client
        .create_task(&config, initial.encode())
        .await
        .unwrap()
        .task_id;
    two_devices_finish(&server, dir.path(), &task, 2).await;

    let status = client.block_status(&task).await.unwrap();
    assert_eq!(status.history.len(), 2, "{status:?}");
    for round in &status.history {
        let (x, chain) = (
            round.mean_loss_x.expect("MC-PSGD rounds carry x's loss"),
            round.mean_loss_chain.expect("and the chain's"),
        );
        eprintln!(
            "MC-PSGD round {}: mean loss of the trained x {x:.4}, of the trained chain {chain:.4}, chose {:?}",
            round.round_id, round.chosen
        );
        // Both trained models beat chance (cross-entropy ln 10 = 2.303) on the data they trained on.
        assert!(x > 0.0 && x < 2.2 && chain > 0.0 && chain < 2.2, "{round:?}");
        assert_eq!(round.chosen, choose(x, chain), "{round:?}");
    }
    let (_, bytes) = client.download_model(&task, None).await.unwrap();
    let test = images(Split::Test, 0, 2000);
    let (before, after) = (
        accuracy(&initial, &test, &device).unwrap(),
        accuracy(&NamedTensors::decode(&bytes).unwrap(), &test, &device).unwrap(),
    );
    eprintln!("MC-PSGD, the example app's model: test accuracy of x {before} -> {after}");
    assert!(after > before + 0.3, "test accuracy {before} -> {after}");
}

/// A model defined here, with a sparse table: a sample is 3 items; its label is whether most of
/// them are liked (even ids are). The module's table holds only the device's rows (local ids).
#[derive(Module, Debug)]
struct Recommender {
    items: Embedding,
    score: Linear,
}

const ITEMS: usize = 1000;
const ITEM_DIM: usize = 8;
const ITEMS_PER_SAMPLE: usize = 3;

impl Recommender {
    fn new(rows: usize, device: &burn::tensor::Device) -> Self {
        Recommender {
            items: EmbeddingConfig::new(rows, ITEM_DIM).init(device),
            score: LinearConfig::new(ITEM_DIM, 1).init(device),
        }
    }

    /// The whole model's weights (every item), drawn from `seed` so each run starts alike.
    fn initial_weights(seed: u64) -> NamedTensors {
        let mut weights =
            fedhive_client::model::read(&Recommender::new(ITEMS, &burn::tensor::Device::flex())).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        for (name, tensor) in weights.0.iter_mut() {
            let bound = if name.starts_with("items") {
                1.0
            } else {
                1.0 / (ITEM_DIM as f32).sqrt()
            };
            tensor
                .data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-bound..=bound));
        }
        weights
    }

    /// Logits `[batch]` of samples given as table rows `[batch, ITEMS_PER_SAMPLE]`.
    fn logits(&self, items: Tensor<2, Int>) -> Tensor<1> {
        let [batch, _] = items.dims();
        let pooled = self.items.forward(items).mean_dim(1).reshape([batch, ITEM_DIM]);
        self.score.forward(pooled).reshape([batch])
    }
}

impl FederatedModel for Recommender {
    type Batch = (Tensor<2, Int>, Tensor<1>);

    fn loss(&self, (items, liked): Self::Batch) -> Tensor<1> {
        let z = self.logits(items);
        let log_likelihood =
            log_sigmoid(z.clone()) * liked.clone() + log_sigmoid(z.neg()) * liked.neg().add_scalar(1.0);
        log_likelihood.mean().neg()
    }
}

/// Samples as rows of a table: local rows for a device's module, global ids for the whole model.
struct Baskets {
    rows: Vec<i64>,
    liked: Vec<f32>,
}

impl LocalData for Baskets {
    type Batch = (Tensor<2, Int>, Tensor<1>);

    fn num_samples(&self) -> usize {
        self.liked.len()
    }

    fn batch(&self, indices: &[usize], device: &burn::tensor::Device) -> Self::Batch {
        let rows = indices
            .iter()
            .flat_map(|&i| &self.rows[i * ITEMS_PER_SAMPLE..(i + 1) * ITEMS_PER_SAMPLE]);
        let rows = TensorData::new(
            rows.copied().collect::<Vec<_>>(),
            [indices.len(), ITEMS_PER_SAMPLE],
        );
        let liked = TensorData::new(
            indices.iter().map(|&i| self.liked[i]).collect::<Vec<_>>(),
            [indices.len()],
        );
        (Tensor::from_data(rows, device), Tensor::from_data(liked, device))
    }
}

/// `n` baskets of items drawn from `items`: `(global ids, liked)`.
fn baskets(items: std::ops::Range<u64>, n: usize, seed: u64) -> (Vec<u64>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u64> = (0..n * ITEMS_PER_SAMPLE)
        .map(|_| rng.random_range(items.clone()))
        .collect();
    let liked = ids
        .chunks(ITEMS_PER_SAMPLE)
        .map(|b| f32::from(b.iter().filter(|&&id| id % 2 == 0).count() * 2 > ITEMS_PER_SAMPLE))
        .collect();
    (ids, liked)
}

/// Accuracy of the whole model `weights` on baskets given by global ids.
fn basket_accuracy(weights: &NamedTensors, ids: &[u64], liked: &[f32]) -> f32 {
    let device = burn::tensor::Device::flex();
    let model = fedhive_client::model::load_into(Recommender::new(ITEMS, &device), weights, &weights.specs())
        .unwrap();
    let data = Baskets {
        rows: ids.iter().map(|&id| id as i64).collect(),
        liked: liked.to_vec(),
    };
    let all: Vec<usize> = (0..liked.len()).collect();
    let (items, liked) = data.batch(&all, &device);
    let predicted = model.logits(items).greater_elem(0.0).float();
    let hits: i64 = predicted.equal(liked).int().sum().into_scalar();
    hits as f32 / all.len() as f32
}

async fn an_apps_own_model_with_a_sparse_table_joins_a_fedsubavg_task(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let device = burn::tensor::Device::flex();
    let initial = Recommender::initial_weights(0);
    let config = TaskConfig {
        model: "test_recommender".into(),
        tensors: initial.specs(),
        strategy: StrategyConfig::FedSubAvg {
            server_lr: 1.0,
            form: Default::default(),
            tables: vec!["items.weight".into()],
        },
        training: TrainingParams {
            local_epochs: 5,
            max_local_steps: 0,
            batch_size: 16,
            learning_rate: 0.5,
            learning_rate_schedule: None,
        },
        require_enrolled_device: true,
        ..task_config(&initial, 2, 3)
    };
    let task = client
        .create_task(&config, initial.encode())
        .await
        .unwrap()
        .task_id;
    let key = client.create_enrolment_key("app").await.unwrap().enrolment_key;

    // Device 0 holds items 0..40, device 1 items 30..70; nobody holds the other 930.
    let held = [(0..40, 0u64), (30..70, 1u64)];
    let mut sessions = Vec::new();
    for (items, seed) in held {
        let (ids, liked) = baskets(items, 400, seed);
        let mut rows: Vec<u64> = ids.clone();
        rows.sort_unstable();
        rows.dedup();
        let local = |id: &u64| rows.binary_search(id).unwrap() as i64;
        let data = Arc::new(Baskets {
            rows: ids.iter().map(local).collect(),
            liked,
        });
        let state = DeviceState::open(dir.path().join(format!("device-{seed}"))).unwrap();
        let n = rows.len();
        let session = Session::new(
            server.client(),
            &task,
            state,
            device.clone(),
            move |d| Recommender::new(n, d),
            data,
        )
        .unwrap()
        .with_seed(seed)
        .with_submodel(BTreeMap::from([("items.weight".to_string(), rows)]))
        .unwrap();
        sessions.push(session);
    }
    let (a, b) = sessions.split_at_mut(1);
    a[0].enrol(&key).await.unwrap();
    b[0].enrol(&key).await.unwrap();
    let conditions = RoundConditions::default();
    let (ra, rb) = tokio::join!(
        run_rounds(&mut a[0], &conditions, None),
        run_rounds(&mut b[0], &conditions, None)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.contributed, rb.contributed), (3, 3), "{ra:?} {rb:?}");
    // Each device downloads its rows, not the table: 3 rounds' worth is less than one whole model.
    assert!(ra.bytes_downloaded < initial.encode().len() as u64, "{ra:?}");

    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!(
        rounds
            .iter()
            .map(|r| (r.state.clone(), r.accepted, r.total_samples))
            .collect::<Vec<_>>(),
        vec![(RoundState::Committed, 2, 800); 3]
    );
    // The model blob holds the dense tensors; the whole table comes as the submodel of every row.
    let every_row = BTreeMap::from([("items.weight".to_string(), (0..ITEMS as u64).collect())]);
    let request = RowsRequest {
        version: None,
        rows: every_row,
    };
    let (_, bytes) = client.download_submodel(&task, &request).await.unwrap();
    let (dense, tables) = split_specs(&initial.specs(), &["items.weight".to_string()]);
    let trained = local_weights(&SparseTensors::decode_checked(&bytes, &dense, &tables, f32::MAX).unwrap());
    assert_eq!(trained.specs(), initial.specs());
    let row =
        |w: &NamedTensors, id: usize| w.0["items.weight"].data[id * ITEM_DIM..(id + 1) * ITEM_DIM].to_vec();
    for id in 0..ITEMS {
        let changed = row(&trained, id) != row(&initial, id);
        assert_eq!(changed, id < 70, "item {id}: held by a device = {}", id < 70);
    }
    let (ids, liked) = baskets(0..70, 1000, 99);
    let (before, after) = (
        basket_accuracy(&initial, &ids, &liked),
        basket_accuracy(&trained, &ids, &liked),
    );
    eprintln!("FedSubAvg, an app's recommender: accuracy on held items {before} -> {after}");
    assert!(
        after > 0.9 && after > before + 0.2,
        "accuracy on held items {before} -> {after}"
    );
}

/// The device process of this package (the example app's model and loop).
fn device_process(
    server: &ServerProcess,
    task: &str,
    state: &Path,
    key: &str,
    pause_at: Option<&str>,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-device"));
    cmd.args([
        "--server",
        &server.base_url,
        "--task",
        task,
        "--enrolment-key",
        key,
    ])
    .arg("--state")
    .arg(state)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped());
    if let Some(stage) = pause_at {
        cmd.args(["--pause-at", stage]);
    }
    cmd
}

async fn one_round_task(server: &ServerProcess) -> (String, String) {
    let client = server.client();
    let initial = initial_weights(&burn::tensor::Device::flex(), 0).unwrap();
    let config = TaskConfig {
        require_enrolled_device: true,
        ..task_config(&initial, 1, 1)
    };
    let task = client
        .create_task(&config, initial.encode())
        .await
        .unwrap()
        .task_id;
    let key = client.create_enrolment_key(&format!("k-{task}")).await.unwrap();
    (task, key.enrolment_key)
}

async fn a_device_killed_at_each_step_resumes_without_a_second_upload(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let stages = [
        "checked_in",
        "downloaded",
        "training",
        "trained",
        "upload_acknowledged",
        "reported",
    ];
    for stage in stages {
        let (task, key) = one_round_task(&server).await;
        let state = dir.path().join(format!("state-{stage}"));

        let mut first = device_process(&server, &task, &state, &key, Some(stage))
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
        let line = tokio::task::spawn_blocking(move || lines.next())
            .await
            .unwrap()
            .expect("the device printed nothing")
            .unwrap();
        assert_eq!(line, format!("paused at {stage}"));
        first.kill().unwrap(); // SIGKILL
        first.wait().unwrap();

        let second = tokio::task::spawn_blocking({
            let mut cmd = device_process(&server, &task, &state, &key, None);
            move || cmd.output().unwrap()
        })
        .await
        .unwrap();
        let out = String::from_utf8_lossy(&second.stdout);
        assert!(
            second.status.success(),
            "{stage}: {out} {}",
            String::from_utf8_lossy(&second.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_str(out.trim().strip_prefix("summary ").expect("a summary line")).unwrap();
        assert_eq!(summary["finished"], true, "{stage}: {summary}");
        // The restarted device finished the round the killed one began (from `checked_in` on, the
        // assignment is kept), so it counts it as resumed: unless it was killed after reporting,
        // when nothing was left to do but clear the round.
        let contributed = summary["contributed"].as_u64().unwrap();
        assert_eq!(
            (contributed, summary["resumed"].as_u64().unwrap()),
            (1, 1),
            "{stage}: {summary}"
        );

        let rounds = client.rounds(&task).await.unwrap();
        let counts: Vec<_> = rounds
            .iter()
            .map(|r| {
                (
                    r.state.clone(),
                    r.assigned,
                    r.accepted,
                    r.reports.as_ref().map(|m| m.devices),
                )
            })
            .collect();
        assert_eq!(
            counts,
            vec![(RoundState::Committed, 1, 1, Some(1))],
            "{stage}: one assignment, one update, one report"
        );
        let devices = client.enrolled_devices(None).await.unwrap();
        assert_eq!(
            devices.len(),
            stages.iter().position(|s| *s == stage).unwrap() + 1,
            "{stage}: enrolled once"
        );
    }
}

async fn corrupt_device_state_is_refused_with_a_clear_error(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let (task, key) = one_round_task(&server).await;
    let state = dir.path().join("state");

    let mut first = device_process(&server, &task, &state, &key, Some("trained"))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let line = tokio::task::spawn_blocking(move || lines.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(line, "paused at trained");
    first.kill().unwrap();
    first.wait().unwrap();

    // A flipped byte in the stored update: sending it would upload bytes that were never trained.
    let update = state.join(format!("tasks/{task}/update.bin"));
    let mut bytes = std::fs::read(&update).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&update, bytes).unwrap();
    let out = device_process(&server, &task, &state, &key, None)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("update.bin") && stderr.contains("corrupt") && stderr.contains("start over"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let rounds = server.client().rounds(&task).await.unwrap();
    assert_eq!(rounds[0].accepted, 0, "nothing was uploaded");

    // Resetting the task's state starts the round over: the device keeps its credential (and its
    // one upload token for the round is spent), so it waits for the round's deadline.
    DeviceState::open(&state).unwrap().reset_task(&task).unwrap();
    assert!(
        DeviceState::open(&state)
            .unwrap()
            .credentials()
            .unwrap()
            .is_some()
    );
}
