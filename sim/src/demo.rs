//! The demo federation: FedAvg on Fashion-MNIST with Dirichlet label skew.
//!
//! Starts a fedhive server in this process (SQLite in a temporary directory unless a database URL is
//! given), creates a task, spawns simulated devices that each hold one non-IID partition and run the
//! SDK's device loop over HTTP, and evaluates every committed model on the 10k test set.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use fedhive_client::{
    backend::Backend,
    client::FedhiveClient,
    data::{Dataset, Split, default_data_dir, load_fashion_mnist},
    device::{Device, DeviceError, DeviceReport},
    model::{ModelKind, initial_weights, tensor_specs},
    partition,
    training::evaluate,
};
use fedhive_shared::{
    NamedTensors,
    wire::{StrategyConfig, TaskConfig, TrainingParams, UpdateEncoding},
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::task::JoinHandle;

/// Demo settings (all have defaults that reach >= 80% test accuracy on 2 CPU cores).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Simulated devices.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Committed rounds to run.
    #[arg(long, default_value_t = 60)]
    pub rounds: u32,
    /// K: updates a round needs to commit.
    #[arg(long, default_value_t = 10)]
    pub devices_per_round: u32,
    /// Dirichlet concentration of the label skew (smaller = more skewed).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Model family: mlp or cnn.
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Training backend of the devices: flex (CPU) or wgpu.
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    pub backend: String,
    /// Server database (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub local_epochs: u32,
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    #[arg(long, default_value_t = 0.05)]
    pub learning_rate: f32,
    /// How devices encode their updates: f32, int8 or top_k:PERCENT.
    #[arg(long, default_value = "f32", value_parser = str::parse::<UpdateEncoding>)]
    pub update_encoding: UpdateEncoding,
    /// Use only this many training samples (0 = all 60,000).
    #[arg(long, default_value_t = 0)]
    pub train_samples: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fashion-MNIST directory (IDX .gz files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        crate::clap_defaults("demo")
    }
}

/// The demo's result, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub final_accuracy: f32,
    pub rounds: i64,
    pub seconds: f64,
    pub accuracy_per_round: Vec<f32>,
    pub devices: usize,
    pub devices_per_round: u32,
    pub alpha: f64,
    pub model: String,
    pub backend: String,
    pub database: String,
    pub updates_accepted: u32,
    pub updates_late: u32,
    pub update_encoding: UpdateEncoding,
    /// Mean bytes of one upload's body.
    pub bytes_per_update: u64,
}

/// The demo's FedAvg task: K per round, at least half of K to commit, over-selection 1.3,
/// 120 s deadlines.
pub fn fedavg_task(
    kind: ModelKind,
    rounds: u32,
    devices_per_round: u32,
    local_epochs: u32,
    batch_size: u32,
    learning_rate: f32,
) -> TaskConfig {
    TaskConfig {
        model: kind.name().to_string(),
        tensors: tensor_specs(kind),
        strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
        training: TrainingParams {
            local_epochs,
            max_local_steps: 0,
            batch_size,
            learning_rate,
            learning_rate_schedule: None,
        },
        devices_per_round,
        min_devices_per_round: devices_per_round.div_ceil(2),
        over_selection: 1.3,
        round_deadline_secs: 120,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds,
    }
}

/// Spawns `count` SDK devices on `task_id`, each holding one Dirichlet(`alpha`) label-skewed share
/// of `train` and running the device loop until the task is over.
pub fn spawn_devices(
    client: &FedhiveClient,
    task_id: &str,
    device: &burn::tensor::Device,
    train: &Dataset,
    count: usize,
    alpha: f64,
    seed: u64,
) -> Vec<JoinHandle<Result<DeviceReport, DeviceError>>> {
    partition::dirichlet(&train.labels, count, alpha, seed)
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let data = Arc::new(train.subset(part));
            let mut d = Device::new(client.clone(), task_id, device.clone(), data, seed + i as u64);
            tokio::spawn(async move { d.run().await })
        })
        .collect()
}

/// Waits for every device and adds up what they did.
pub async fn join_devices(
    devices: Vec<JoinHandle<Result<DeviceReport, DeviceError>>>,
) -> anyhow::Result<DeviceReport> {
    let mut totals = DeviceReport::default();
    for handle in devices {
        let r = handle.await??;
        totals.rounds_trained += r.rounds_trained;
        totals.updates_accepted += r.updates_accepted;
        totals.updates_late += r.updates_late;
        totals.bytes_uploaded += r.bytes_uploaded;
    }
    Ok(totals)
}

pub async fn run_demo(options: &DemoOptions, show_progress: bool) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let kind: ModelKind = options.model.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = backend.device().context("opening the training backend")?;
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let mut train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
    if options.train_samples > 0 && options.train_samples < train.len() {
        train = train.subset(&(0..options.train_samples).collect::<Vec<_>>());
    }
    let test = Arc::new(load_fashion_mnist(&data_dir, Split::Test)?);

    let local =
        crate::LocalServer::start(options.database_url.clone(), 100, Duration::from_millis(50)).await?;
    let client = local.client.clone();

    let task = TaskConfig {
        update_encoding: options.update_encoding,
        ..fedavg_task(
            kind,
            options.rounds,
            options.devices_per_round,
            options.local_epochs,
            options.batch_size,
            options.learning_rate,
        )
    };
    let created = client
        .create_task(&task, initial_weights(kind, options.seed).encode())
        .await?;
    let task_id = created.task_id;

    let devices = spawn_devices(
        &client,
        &task_id,
        &device,
        &train,
        options.devices,
        options.alpha,
        options.seed,
    );

    let bar = if show_progress {
        ProgressBar::new(u64::from(options.rounds))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}",
    )?);
    let mut accuracy_per_round = Vec::new();
    let mut evaluated = 0;
    loop {
        let status = client.task_status(&task_id).await?;
        while evaluated < status.model_version {
            evaluated += 1;
            let (_, bytes) = client.download_model(&task_id, Some(evaluated)).await?;
            let weights = NamedTensors::decode(&bytes)?;
            let (device, test) = (device.clone(), test.clone());
            let eval =
                tokio::task::spawn_blocking(move || evaluate(kind, &device, &weights, &test)).await??;
            accuracy_per_round.push(eval.accuracy);
            bar.set_position(evaluated as u64);
            bar.set_message(format!("test accuracy {:.4}", eval.accuracy));
            bar.println(format!(
                "round {evaluated:>3}: test accuracy {:.4}  loss {:.4}",
                eval.accuracy, eval.loss
            ));
        }
        if status.state.is_over() && evaluated == status.model_version {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    let totals = join_devices(devices).await?;
    local.server.shutdown().await;
    Ok(DemoReport {
        final_accuracy: accuracy_per_round.last().copied().unwrap_or(0.0),
        rounds: evaluated,
        seconds: started.elapsed().as_secs_f64(),
        accuracy_per_round,
        devices: options.devices,
        devices_per_round: options.devices_per_round,
        alpha: options.alpha,
        model: kind.name().to_string(),
        backend: options.backend.clone(),
        database: local.database.clone(),
        updates_accepted: totals.updates_accepted,
        updates_late: totals.updates_late,
        update_encoding: options.update_encoding,
        bytes_per_update: totals.bytes_uploaded / u64::from(totals.rounds_trained.max(1)),
    })
}
