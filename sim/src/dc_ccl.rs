//! The DC-CCL scenario: device-cloud fusion on Fashion-MNIST split by class between the cloud and
//! the devices (Ding et al., arXiv 2303.10361; `ALGORITHMS.md`, "DC-CCL").
//!
//! The cloud holds the training images of `--cloud-classes` (0-5 by default), the devices hold the
//! other classes' training images, split among them by a Dirichlet(`--alpha`) label skew; nobody
//! holds both. Per seed, each run starts a fedhive server in this process (SQLite in a temporary
//! directory unless `--database-url`) and compares on the 10k test set (all classes, the cloud's
//! classes, the devices' classes):
//!
//! - `cloud_only`: `F_c` (`cnn_large`) trained on the cloud data alone;
//! - `device_only`: a FedAvg task of the small model (`mlp_small`) alone on the devices, same
//!   rounds and K;
//! - `dc_ccl_cloud`: `F_c + F_s`, served by the cloud worker ([`fedhive_cloud::predict`]);
//! - `dc_ccl_on_device`: `F_m + F_s`, what a device predicts offline;
//! - `dc_ccl_cloud_tuned` (with `--tuning-samples` > 0): `F_c + F_s` with `F_s`'s last layer tuned
//!   by the worker on a small labelled sample of all classes (the paper's optional step 5). That
//!   sample is data the other DC-CCL arms and the cloud-only arm do not get;
//! - `dc_ccl_pooled` (with `--pooled-co-model-epochs` > 0): `F_c + F_s` with `F_s` trained by one
//!   trainer on all the training data, step 4's loss against the same `F_m`, no federation: what
//!   these models reach if cloud and devices could pool their data, so a gap to the oracle splits
//!   into what the federation costs and what the method costs with these models;
//! - `oracle`: `F_c`'s family trained on the pooled training data with the same epochs.
//!
//! The DC-CCL task runs the real worker ([`fedhive_cloud::Worker`], in this process, over HTTP with
//! its worker token) and real devices ([`fedhive_client::device::Device`]). Bytes per device per
//! round are measured at the devices and set against the size of `F_c`, which never moves.

use std::{path::PathBuf, sync::Arc, time::Duration, time::Instant};

use anyhow::Context;
use fedhive_client::{
    backend::Backend,
    client::FedhiveClient,
    data::{Dataset, Split, default_data_dir, load_fashion_mnist},
    dc_ccl::{Weights, evaluate_sum, train_co_model},
    device::{Device, DeviceReport, Traffic},
    model::{ModelKind, initial_weights, tensor_specs},
    partition,
    training::{evaluate, train_local},
};
use fedhive_cloud::{HeadTuning, Worker, WorkerOptions};
use fedhive_shared::{
    NamedTensors,
    wire::{LearningRateSchedule, StrategyConfig, TaskConfig, TrainingParams, WithoutCloud},
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use serde::Serialize;

/// Scenario settings (defaults: about three and a half minutes per seed on 2 CPU cores; the
/// README's command ran its three seeds in 9 min 47 s).
#[derive(Debug, Clone, clap::Args)]
pub struct DcCclOptions {
    /// Seeds, one full comparison each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Classes whose training images only the cloud holds; devices hold the rest.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4,5")]
    pub cloud_classes: Vec<u8>,
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Label skew among the devices (Dirichlet alpha over the devices' classes).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Committed rounds of the DC-CCL task and of the device-only FedAvg task: many short rounds
    /// (with `--max-local-steps`), since each side's copy of `F_s` only sees its own classes and
    /// drifts from the pooled optimum the longer it trains alone (docs/dc-ccl.md).
    #[arg(long, default_value_t = 400)]
    pub rounds: u32,
    #[arg(long, default_value_t = 10)]
    pub devices_per_round: u32,
    /// `w`, the cloud's weight in the fusion.
    #[arg(long, default_value_t = 0.5)]
    pub cloud_weight: f32,
    /// Family of `F_c` (and the oracle).
    #[arg(long, default_value = "cnn_large")]
    pub cloud_model: String,
    /// Family of `F_s`, `F_m` and the device-only model.
    #[arg(long, default_value = "mlp_small")]
    pub small_model: String,
    /// Epochs of `F_c` on the cloud data (and of the oracle on the pooled data).
    #[arg(long, default_value_t = 2)]
    pub cloud_epochs: u32,
    #[arg(long, default_value_t = 3)]
    pub distil_epochs: u32,
    /// Cap on the worker's SGD steps on its copy of `F_s` per round (0: one epoch of the cloud
    /// data, as the devices' training parameters say: 1,125 steps against a device's ~40).
    #[arg(long, default_value_t = 100)]
    pub co_model_steps: u32,
    #[arg(long, default_value_t = 0.002)]
    pub distil_learning_rate: f32,
    /// Head tuning (step 5): training images of all classes, drawn at random per seed, that the
    /// worker tunes `F_s`'s last layer on (0: no tuned arm).
    #[arg(long, default_value_t = 600)]
    pub tuning_samples: usize,
    #[arg(long, default_value_t = 3)]
    pub tuning_epochs: u32,
    /// Epochs of the pooled co-model arm (`F_s` trained on all the training data beside `F_m`; 0:
    /// no such arm).
    #[arg(long, default_value_t = 3)]
    pub pooled_co_model_epochs: u32,
    #[arg(long, default_value_t = 1)]
    pub local_epochs: u32,
    /// Cap on a device's SGD steps per round in the federated tasks, and so on the worker's (0:
    /// `--local-epochs` whole, about 40 steps a device).
    #[arg(long, default_value_t = 10)]
    pub max_local_steps: u32,
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    #[arg(long, default_value_t = 0.05)]
    pub learning_rate: f32,
    /// The federated tasks' learning rate is multiplied by this once `--learning-rate-decay-at`
    /// of their rounds have committed (a step schedule; 1: constant).
    #[arg(long, default_value_t = 0.2)]
    pub learning_rate_decay: f32,
    /// Fraction of the rounds after which the rate drops.
    #[arg(long, default_value_t = 0.75)]
    pub learning_rate_decay_at: f32,
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    pub backend: String,
    /// Server database (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Fashion-MNIST directory (IDX .gz files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Default for DcCclOptions {
    fn default() -> Self {
        crate::clap_defaults("dc-ccl")
    }
}

/// Test accuracy on all classes, the cloud's classes and the devices' classes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Accuracy {
    pub all: f32,
    pub cloud_classes: f32,
    pub device_classes: f32,
}

/// One seed's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub seed: u64,
    pub cloud_only: Accuracy,
    pub device_only: Accuracy,
    pub dc_ccl_cloud: Accuracy,
    pub dc_ccl_on_device: Accuracy,
    /// `F_c + F_s` with `F_s`'s head tuned (`--tuning-samples` > 0).
    pub dc_ccl_cloud_tuned: Option<Accuracy>,
    /// `F_c + F_s` with `F_s` trained on the pooled data, no federation (`--pooled-co-model-epochs`
    /// > 0).
    pub dc_ccl_pooled: Option<Accuracy>,
    pub oracle: Accuracy,
    /// Mean body bytes a DC-CCL device downloaded / uploaded per round it trained (its control
    /// model download counted in its first round).
    pub device_download_bytes_per_round: f64,
    pub device_upload_bytes_per_round: f64,
    /// `F_c` as safetensors: never sent anywhere.
    pub cloud_model_bytes: u64,
    pub cloud_contributions: u32,
    pub dc_ccl_rounds_committed: i64,
    pub seconds: f64,
}

/// Across seeds: the claims the scenario checks, as numbers.
#[derive(Debug, Clone, Serialize)]
pub struct DcCclSummary {
    pub mean_all: MeanAll,
    /// Smallest margin (points of 10-class accuracy) of DC-CCL `F_c + F_s` over cloud-only and over
    /// device-only, and largest gap to the oracle, over the seeds.
    pub min_margin_over_cloud_only: f32,
    pub min_margin_over_device_only: f32,
    pub max_gap_to_oracle: f32,
}

/// Mean 10-class accuracy per method.
#[derive(Debug, Clone, Serialize)]
pub struct MeanAll {
    pub cloud_only: f32,
    pub device_only: f32,
    pub dc_ccl_cloud: f32,
    pub dc_ccl_on_device: f32,
    pub dc_ccl_cloud_tuned: Option<f32>,
    pub dc_ccl_pooled: Option<f32>,
    pub oracle: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct DcCclReport {
    pub scenario: &'static str,
    pub summary: DcCclSummary,
    pub seeds: Vec<SeedReport>,
    pub cloud_classes: Vec<u8>,
    pub devices: usize,
    pub alpha: f64,
    pub rounds: u32,
    pub devices_per_round: u32,
    pub cloud_weight: f32,
    pub cloud_model: String,
    pub small_model: String,
    pub backend: String,
    pub learning_rate: f32,
    /// The federated tasks' step schedule (`--learning-rate-decay`, `--learning-rate-decay-at`).
    pub learning_rate_decay: f32,
    pub learning_rate_decay_at: f32,
}

/// The three test sets.
struct Tests {
    all: Dataset,
    cloud: Dataset,
    devices: Dataset,
}

impl Tests {
    fn new(test: Dataset, cloud_classes: &[u8]) -> Self {
        let (cloud, devices): (Vec<usize>, Vec<usize>) =
            (0..test.len()).partition(|&i| cloud_classes.contains(&test.labels[i]));
        Tests {
            cloud: test.subset(&cloud),
            devices: test.subset(&devices),
            all: test,
        }
    }

    /// Accuracy of `a` (or of the summed logits `a + b`) on each test set.
    fn accuracy(
        &self,
        device: &burn::tensor::Device,
        a: Weights,
        b: Option<Weights>,
    ) -> anyhow::Result<Accuracy> {
        let eval = |d: &Dataset| -> anyhow::Result<f32> {
            Ok(match b {
                Some(b) => evaluate_sum(a, b, device, d)?.accuracy,
                None => evaluate(a.kind, device, a.tensors, d)?.accuracy,
            })
        };
        Ok(Accuracy {
            all: eval(&self.all)?,
            cloud_classes: eval(&self.cloud)?,
            device_classes: eval(&self.devices)?,
        })
    }
}

pub async fn run_dc_ccl(options: &DcCclOptions, show_progress: bool) -> anyhow::Result<DcCclReport> {
    anyhow::ensure!(!options.seeds.is_empty(), "--seeds is empty");
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    // Shared, not copied, with the arms trained on all of it on the blocking pool.
    let train = Arc::new(load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?);
    let tests = Tests::new(
        load_fashion_mnist(&data_dir, Split::Test)?,
        &options.cloud_classes,
    );
    let mut seeds = Vec::new();
    for &seed in &options.seeds {
        let report = run_seed(options, &train, &tests, seed, show_progress).await?;
        if show_progress {
            eprintln!(
                "seed {seed}: cloud-only {:.4}, device-only {:.4}, DC-CCL F_c+F_s {:.4}, F_m+F_s {:.4}, oracle {:.4}",
                report.cloud_only.all,
                report.device_only.all,
                report.dc_ccl_cloud.all,
                report.dc_ccl_on_device.all,
                report.oracle.all
            );
            if let Some(tuned) = report.dc_ccl_cloud_tuned {
                eprintln!("seed {seed}: DC-CCL F_c+F_s with a tuned head {:.4}", tuned.all);
            }
            if let Some(pooled) = report.dc_ccl_pooled {
                eprintln!(
                    "seed {seed}: DC-CCL F_c+F_s, F_s trained on pooled data {:.4}",
                    pooled.all
                );
            }
        }
        seeds.push(report);
    }
    let mean = |f: fn(&SeedReport) -> f32| seeds.iter().map(f).sum::<f32>() / seeds.len() as f32;
    let mean_of_arm = |f: fn(&SeedReport) -> Option<Accuracy>| {
        seeds
            .iter()
            .map(|s| f(s).map(|a| a.all))
            .sum::<Option<f32>>()
            .map(|sum| sum / seeds.len() as f32)
    };
    let fold = |f: fn(&SeedReport) -> f32, min: bool| {
        let values = seeds.iter().map(f);
        if min {
            values.fold(f32::INFINITY, f32::min)
        } else {
            values.fold(f32::NEG_INFINITY, f32::max)
        }
    };
    let summary = DcCclSummary {
        mean_all: MeanAll {
            cloud_only: mean(|s| s.cloud_only.all),
            device_only: mean(|s| s.device_only.all),
            dc_ccl_cloud: mean(|s| s.dc_ccl_cloud.all),
            dc_ccl_on_device: mean(|s| s.dc_ccl_on_device.all),
            dc_ccl_cloud_tuned: mean_of_arm(|s| s.dc_ccl_cloud_tuned),
            dc_ccl_pooled: mean_of_arm(|s| s.dc_ccl_pooled),
            oracle: mean(|s| s.oracle.all),
        },
        min_margin_over_cloud_only: 100.0 * fold(|s| s.dc_ccl_cloud.all - s.cloud_only.all, true),
        min_margin_over_device_only: 100.0 * fold(|s| s.dc_ccl_cloud.all - s.device_only.all, true),
        max_gap_to_oracle: 100.0 * fold(|s| s.oracle.all - s.dc_ccl_cloud.all, false),
    };
    Ok(DcCclReport {
        scenario: "dc-ccl",
        summary,
        seeds,
        cloud_classes: options.cloud_classes.clone(),
        devices: options.devices,
        alpha: options.alpha,
        rounds: options.rounds,
        devices_per_round: options.devices_per_round,
        cloud_weight: options.cloud_weight,
        cloud_model: options.cloud_model.clone(),
        small_model: options.small_model.clone(),
        backend: options.backend.clone(),
        learning_rate: options.learning_rate,
        learning_rate_decay: options.learning_rate_decay,
        learning_rate_decay_at: options.learning_rate_decay_at,
    })
}

fn parse_kind(name: &str) -> anyhow::Result<ModelKind> {
    name.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

async fn run_seed(
    options: &DcCclOptions,
    train: &Arc<Dataset>,
    tests: &Tests,
    seed: u64,
    show_progress: bool,
) -> anyhow::Result<SeedReport> {
    let started = Instant::now();
    let (cloud_kind, small_kind) = (
        parse_kind(&options.cloud_model)?,
        parse_kind(&options.small_model)?,
    );
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = backend.device().context("opening the training backend")?;

    let (cloud_idx, device_idx): (Vec<usize>, Vec<usize>) =
        (0..train.len()).partition(|&i| options.cloud_classes.contains(&train.labels[i]));
    let cloud_data = Arc::new(train.subset(&cloud_idx));
    let device_pool = train.subset(&device_idx);
    let shards: Vec<Arc<Dataset>> =
        partition::dirichlet(&device_pool.labels, options.devices, options.alpha, seed)
            .iter()
            .map(|idx| Arc::new(device_pool.subset(idx)))
            .collect();

    let local =
        crate::LocalServer::start(options.database_url.clone(), 100, Duration::from_millis(50)).await?;
    let client = local.client.clone();
    let training = TrainingParams {
        local_epochs: options.local_epochs,
        max_local_steps: 0,
        batch_size: options.batch_size,
        learning_rate: options.learning_rate,
        learning_rate_schedule: None,
    };
    // The federated tasks (DC-CCL's and the device-only one) lower the rate for their last rounds.
    let decay_at = (options.rounds as f32 * options.learning_rate_decay_at).round() as u32;
    let round_training = TrainingParams {
        max_local_steps: options.max_local_steps,
        learning_rate_schedule: (options.learning_rate_decay < 1.0 && decay_at > 0).then(|| {
            LearningRateSchedule::Step {
                milestones: vec![decay_at],
                factor: options.learning_rate_decay,
            }
        }),
        ..training.clone()
    };
    let task_config = |strategy| TaskConfig {
        model: small_kind.name().to_string(),
        tensors: tensor_specs(small_kind),
        strategy,
        training: round_training.clone(),
        devices_per_round: options.devices_per_round,
        min_devices_per_round: options.devices_per_round.div_ceil(2),
        over_selection: 1.3,
        round_deadline_secs: 600,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds: options.rounds,
    };

    // DC-CCL: the worker and the devices.
    let dc_config = task_config(StrategyConfig::DcCcl {
        cloud_weight: options.cloud_weight,
        without_cloud: WithoutCloud::Abandon,
        control_model: small_kind.name().to_string(),
        control_tensors: tensor_specs(small_kind),
    });
    let created = client
        .create_task(&dc_config, initial_weights(small_kind, seed).encode())
        .await?;
    let state_dir = tempfile::tempdir()?;
    let head_tuning = (options.tuning_samples > 0).then(|| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7E57);
        let sample = rand::seq::index::sample(&mut rng, train.len(), options.tuning_samples.min(train.len()));
        HeadTuning {
            data: Arc::new(train.subset(&sample.into_vec())),
            params: TrainingParams {
                local_epochs: options.tuning_epochs,
                ..training.clone()
            },
        }
    });
    let worker = Arc::new(Worker {
        client: client.clone(),
        task_id: created.task_id.clone(),
        token: created
            .worker_token
            .clone()
            .context("a DC-CCL task comes with a worker token")?,
        device: device.clone(),
        data: cloud_data.clone(),
        state_dir: state_dir.path().to_path_buf(),
        options: WorkerOptions {
            cloud_model: cloud_kind,
            cloud_training: TrainingParams {
                local_epochs: options.cloud_epochs,
                ..training.clone()
            },
            distillation: TrainingParams {
                local_epochs: options.distil_epochs,
                learning_rate: options.distil_learning_rate,
                ..training.clone()
            },
            co_model_steps: (options.co_model_steps > 0).then_some(options.co_model_steps),
            seed,
            poll: Duration::from_millis(100),
            head_tuning,
        },
    });
    let running_worker = worker.clone();
    let worker_task = tokio::spawn(async move { running_worker.run().await });
    let dc_devices = spawn_devices(&client, &created.task_id, &shards, &device, seed);
    let dc_rounds = wait(&client, &created.task_id, options.rounds, "DC-CCL", show_progress).await?;
    let worker_report = worker_task.await??;
    let mut traffic = Vec::new();
    for handle in dc_devices {
        let (report, moved) = handle.await??;
        traffic.push((report, moved));
    }

    // Device-only: FedAvg of the small model alone on the same devices.
    let fedavg = client
        .create_task(
            &task_config(StrategyConfig::FedAvg { server_lr: 1.0 }),
            initial_weights(small_kind, seed).encode(),
        )
        .await?;
    let fedavg_devices = spawn_devices(&client, &fedavg.task_id, &shards, &device, seed);
    wait(
        &client,
        &fedavg.task_id,
        options.rounds,
        "device-only FedAvg",
        show_progress,
    )
    .await?;
    for handle in fedavg_devices {
        handle.await??;
    }

    let decode = |bytes: &[u8]| NamedTensors::decode(bytes).context("a model from the server");
    let f_c = worker.cloud_model().await?;
    let (_, f_s) = client.download_model(&created.task_id, None).await?;
    let f_s = decode(&f_s)?;
    let (_, f_m) = client.download_control_model(&created.task_id, None).await?;
    let f_m = decode(&f_m)?;
    let tuned = match worker.served_co_model()? {
        Some((version, tuned)) => {
            let final_version = client.task_status(&created.task_id).await?.model_version;
            anyhow::ensure!(
                version == final_version,
                "the worker tuned version {version}, not the final {final_version}"
            );
            Some(tuned)
        }
        None => None,
    };
    let (_, device_only) = client.download_model(&fedavg.task_id, None).await?;
    let device_only = decode(&device_only)?;
    local.server.shutdown().await;

    let oracle = {
        let (device, train) = (device.clone(), train.clone());
        let params = TrainingParams {
            local_epochs: options.cloud_epochs,
            ..training.clone()
        };
        train_blocking(
            show_progress,
            "oracle: F_c's family on the pooled data",
            move || {
                let init = initial_weights(cloud_kind, seed);
                let update = train_local(cloud_kind, &device, &init, &train, &params, seed)?;
                Ok(init.add(&update.delta))
            },
        )
        .await?
    };

    let pooled = if options.pooled_co_model_epochs > 0 {
        let (device, f_m, train) = (device.clone(), f_m.clone(), train.clone());
        let params = TrainingParams {
            local_epochs: options.pooled_co_model_epochs,
            ..training.clone()
        };
        let message = "pooled co-model: F_s on all the training data beside F_m";
        let pooled = train_blocking(show_progress, message, move || {
            let init = initial_weights(small_kind, seed);
            let (co, control) = (Weights::new(small_kind, &init), Weights::new(small_kind, &f_m));
            let update = train_co_model(co, control, &device, &train, &params, seed)?;
            Ok(init.add(&update.delta))
        })
        .await?;
        Some(pooled)
    } else {
        None
    };

    let (rounds_trained, moved) = traffic.iter().fold((0u64, Traffic::default()), |(n, t), (r, m)| {
        (
            n + u64::from(r.rounds_trained),
            Traffic {
                downloaded: t.downloaded + m.downloaded,
                uploaded: t.uploaded + m.uploaded,
            },
        )
    });
    let per_round = |bytes: u64| bytes as f64 / rounds_trained.max(1) as f64;
    // What the cloud serves: `F_c` plus a co-model.
    let served = |co: &NamedTensors| {
        tests.accuracy(
            &device,
            Weights::new(cloud_kind, &f_c),
            Some(Weights::new(small_kind, co)),
        )
    };
    Ok(SeedReport {
        seed,
        cloud_only: tests.accuracy(&device, Weights::new(cloud_kind, &f_c), None)?,
        device_only: tests.accuracy(&device, Weights::new(small_kind, &device_only), None)?,
        dc_ccl_cloud: served(&f_s)?,
        dc_ccl_on_device: tests.accuracy(
            &device,
            Weights::new(small_kind, &f_m),
            Some(Weights::new(small_kind, &f_s)),
        )?,
        dc_ccl_cloud_tuned: tuned.as_ref().map(served).transpose()?,
        dc_ccl_pooled: pooled.as_ref().map(served).transpose()?,
        oracle: tests.accuracy(&device, Weights::new(cloud_kind, &oracle), None)?,
        device_download_bytes_per_round: per_round(moved.downloaded),
        device_upload_bytes_per_round: per_round(moved.uploaded),
        cloud_model_bytes: worker_report.cloud_model_bytes,
        cloud_contributions: worker_report.contributions,
        dc_ccl_rounds_committed: dc_rounds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

type DeviceHandle = tokio::task::JoinHandle<anyhow::Result<(DeviceReport, Traffic)>>;

fn spawn_devices(
    client: &FedhiveClient,
    task_id: &str,
    shards: &[Arc<Dataset>],
    device: &burn::tensor::Device,
    seed: u64,
) -> Vec<DeviceHandle> {
    shards
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let mut d = Device::new(
                client.clone(),
                task_id,
                device.clone(),
                data.clone(),
                seed * 1000 + i as u64,
            );
            tokio::spawn(async move {
                let report = d.run().await?;
                Ok((report, d.traffic))
            })
        })
        .collect()
}

/// Runs `train` on the blocking pool behind a spinner showing `message`.
async fn train_blocking<T: Send + 'static>(
    show: bool,
    message: &'static str,
    train: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let bar = spinner(show, message);
    let trained = tokio::task::spawn_blocking(train).await?;
    bar.finish_and_clear();
    trained
}

fn spinner(show: bool, message: &'static str) -> ProgressBar {
    let bar = if show {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Waits for a task to finish, with a progress bar of its committed rounds; returns them.
async fn wait(
    client: &FedhiveClient,
    task_id: &str,
    rounds: u32,
    label: &'static str,
    show_progress: bool,
) -> anyhow::Result<i64> {
    let bar = if show_progress {
        ProgressBar::new(u64::from(rounds))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}",
    )?);
    bar.set_message(label);
    loop {
        let status = client.task_status(task_id).await?;
        bar.set_position(status.committed_rounds as u64);
        if status.state.is_over() {
            bar.finish_and_clear();
            return Ok(status.committed_rounds);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
