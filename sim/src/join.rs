//! Simulated devices for a server you run yourself: `task-files` writes a FedAvg task config and
//! its initial model for `fedhive task create`, and `devices` joins that task with devices that each
//! hold a non-IID share of Fashion-MNIST and run the SDK's device loop until the task is over. The
//! README's guide uses both.

use std::path::PathBuf;

use anyhow::Context;
use fedhive_client::{
    backend::Backend,
    client::FedhiveClient,
    data::{Split, default_data_dir, load_fashion_mnist},
    model::{ModelKind, initial_weights},
};
use serde::Serialize;

use crate::demo::{fedavg_task, join_devices, spawn_devices};

#[derive(Debug, Clone, clap::Args)]
pub struct TaskFilesOptions {
    /// Model family the devices train (`mlp`, `cnn`, ...).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// K: updates a round commits with.
    #[arg(long, default_value_t = 10)]
    pub devices_per_round: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Directory to write `task.json` and `init.safetensors` into.
    #[arg(short, long, default_value = ".")]
    pub output: PathBuf,
}

/// Writes `task.json` and `init.safetensors`; returns their paths.
pub fn write_task_files(options: &TaskFilesOptions) -> anyhow::Result<(PathBuf, PathBuf)> {
    let kind: ModelKind = options.model.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let task = fedavg_task(kind, options.rounds, options.devices_per_round, 1, 32, 0.05);
    std::fs::create_dir_all(&options.output)?;
    let (config, model) = (
        options.output.join("task.json"),
        options.output.join("init.safetensors"),
    );
    std::fs::write(&config, serde_json::to_vec_pretty(&task)?)
        .with_context(|| format!("writing {}", config.display()))?;
    std::fs::write(&model, initial_weights(kind, options.seed).encode())
        .with_context(|| format!("writing {}", model.display()))?;
    Ok((config, model))
}

#[derive(Debug, Clone, clap::Args)]
pub struct DevicesOptions {
    /// The server's base URL.
    #[arg(long, env = "FEDHIVE_URL", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The task to join.
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Dirichlet label skew (smaller: each device sees fewer classes).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    pub backend: String,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fashion-MNIST IDX directory (default: Debian's dataset-fashion-mnist).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// What the devices did, printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct DevicesReport {
    pub task: String,
    pub devices: usize,
    pub rounds_trained: u32,
    pub updates_accepted: u32,
    pub updates_late: u32,
}

/// Runs the devices until the task has finished (or been cancelled).
pub async fn run_devices(options: &DevicesOptions) -> anyhow::Result<DevicesReport> {
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = backend.device().context("opening the training backend")?;
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
    let client = FedhiveClient::new(&options.server)?;
    let devices = spawn_devices(
        &client,
        &options.task,
        &device,
        &train,
        options.devices,
        options.alpha,
        options.seed,
    );
    let totals = join_devices(devices).await?;
    Ok(DevicesReport {
        task: options.task.clone(),
        devices: options.devices,
        rounds_trained: totals.rounds_trained,
        updates_accepted: totals.updates_accepted,
        updates_late: totals.updates_late,
    })
}
