//! `fedhive-example-app`: a desktop program that embeds the fedhive SDK with a model of its own.
//!
//! ```text
//! fedhive-example-app create-task --server http://127.0.0.1:8080 --admin-token T
//! fedhive-example-app join --server http://127.0.0.1:8080 --task ID --state ./device-1 --shard 0 --shards 4
//! ```
//!
//! `join` runs rounds until the task finishes, keeping its state in `--state`: kill it at any
//! moment and run it again, and it resumes the round it was in without uploading twice.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedhive_client::backend::{Backend, enable_kernel_cache};
use fedhive_client::client::FedhiveClient;
use fedhive_client::data::{Split, default_data_dir, load_fashion_mnist};
use fedhive_client::session::{RoundConditions, Session};
use fedhive_client::state::DeviceState;
use fedhive_example_app::{AppImages, TwoLayerNet, accuracy, initial_weights, run_rounds, task_config};
use fedhive_shared::NamedTensors;

#[derive(Parser)]
#[command(about = "A desktop app that trains its own model in a fedhive task")]
struct Cli {
    /// The fedhive server.
    #[arg(long, env = "FEDHIVE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates a FedAvg task for the app's model and prints its id.
    CreateTask {
        #[arg(long, env = "FEDHIVE_ADMIN_TOKEN")]
        admin_token: String,
        #[arg(long, default_value_t = 2)]
        devices_per_round: u32,
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// Takes part in a task until it finishes, then prints a JSON summary.
    Join {
        #[arg(long)]
        task: String,
        /// The device's state directory (credentials, cached model, the round in progress).
        #[arg(long)]
        state: PathBuf,
        /// Which slice of the training images is this device's, of `--shards`.
        #[arg(long, default_value_t = 0)]
        shard: usize,
        #[arg(long, default_value_t = 4)]
        shards: usize,
        /// Images per device (from its slice).
        #[arg(long, default_value_t = 2000)]
        samples: usize,
        /// Enrol with this key first (tasks that require enrolled devices).
        #[arg(long)]
        enrolment_key: Option<String>,
        /// Stop after this many contributions.
        #[arg(long)]
        max_rounds: Option<u32>,
        /// Body bytes each round may move (a metered network).
        #[arg(long)]
        max_network_bytes: Option<u64>,
        /// Fashion-MNIST's directory (the Debian package's by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let backend = Backend::from_env()?;
    // Compiled GPU kernels live beside the device's state, so only its first process compiles them.
    if let (Backend::Wgpu, true, Command::Join { state, .. }) =
        (backend, cfg!(feature = "vulkan"), &cli.command)
    {
        enable_kernel_cache(&state.join("kernels"))?;
    }
    let device = backend.device()?;
    match cli.command {
        Command::CreateTask {
            admin_token,
            devices_per_round,
            rounds,
        } => {
            let client = FedhiveClient::new(&cli.server)?.with_admin_token(admin_token);
            let weights = initial_weights(&device, 0)?;
            let created = client
                .create_task(
                    &task_config(&weights, devices_per_round, rounds),
                    weights.encode(),
                )
                .await?;
            println!("{}", serde_json::json!({ "task_id": created.task_id }));
        }
        Command::Join {
            task,
            state,
            shard,
            shards,
            samples,
            enrolment_key,
            max_rounds,
            max_network_bytes,
            data_dir,
        } => {
            let data_dir = data_dir.unwrap_or_else(default_data_dir);
            let train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
            let (from, to) = shard_range(train.len(), shard, shards, samples)?;
            let mine = AppImages {
                pixels: train.images[from * 784..to * 784].to_vec(),
                labels: train.labels[from..to].to_vec(),
            };
            let client = FedhiveClient::new(&cli.server)?;
            let state = DeviceState::open(state)?;
            let mut session = Session::new(
                client.clone(),
                &task,
                state,
                device.clone(),
                TwoLayerNet::new,
                Arc::new(mine),
            )?;
            if let Some(key) = enrolment_key {
                let id = session.enrol(&key).await?.device_id.clone();
                tracing::info!(device_id = id, "enrolled");
            }
            let conditions = RoundConditions {
                max_network_bytes,
                ..RoundConditions::default()
            };
            let summary = run_rounds(&mut session, &conditions, max_rounds).await?;
            let (version, bytes) = client.download_model(&task, None).await?;
            let test = load_fashion_mnist(&data_dir, Split::Test)?;
            let test = AppImages {
                pixels: test.images,
                labels: test.labels,
            };
            let model = NamedTensors::decode(&bytes)?;
            let accuracy = accuracy(&model, &test, &device)?;
            println!(
                "{}",
                serde_json::json!({ "summary": summary, "model_version": version, "test_accuracy": accuracy })
            );
        }
    }
    Ok(())
}

/// Samples `[from, to)` of shard `shard` of `shards` equal slices, at most `samples` of them.
fn shard_range(len: usize, shard: usize, shards: usize, samples: usize) -> anyhow::Result<(usize, usize)> {
    anyhow::ensure!(shards > 0 && shard < shards, "--shard must be below --shards");
    let size = len / shards;
    let from = shard * size;
    Ok((from, from + size.min(samples)))
}
