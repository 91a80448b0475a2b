//! The `fedhive-cloud` command line: the cloud worker of one task, DC-CCL (see the crate doc) or,
//! with `--anon-embeddings`, anonymous user embeddings ([`crate::anon`]).
//!
//! ```text
//! FEDHIVE_WORKER_TOKEN=... fedhive-cloud --server http://127.0.0.1:8080 --task t-... \
//!     --state-dir /var/lib/fedhive-cloud --classes 0,1,2,3,4,5
//! FEDHIVE_WORKER_TOKEN=... fedhive-cloud --anon-embeddings --server http://127.0.0.1:8080 \
//!     --task t-... --state-dir /var/lib/fedhive-cloud
//! ```

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use crate::{
    HeadTuning, Worker, WorkerOptions,
    anon::{AnonWorker, AnonWorkerOptions, serve},
};
use anyhow::Context;
use clap::Parser;
use fedhive_client::{
    anon::FitParams,
    backend::Backend,
    client::FedhiveClient,
    data::{Split, default_data_dir, load_fashion_mnist},
};
use fedhive_shared::wire::TrainingParams;

#[derive(Parser)]
#[command(
    name = "fedhive-cloud",
    version,
    about = "fedhive's cloud worker for one task (DC-CCL, or anonymous embeddings)"
)]
struct Cli {
    /// The fedhive server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    #[command(flatten)]
    tls: fedhive_tls::ClientTlsArgs,
    #[arg(long)]
    task: String,
    /// The task's worker token (from the task's creation answer).
    #[arg(long, env = "FEDHIVE_WORKER_TOKEN", hide_env_values = true)]
    token: String,
    /// Where F_c, F_m and pending contributions are kept.
    #[arg(long)]
    state_dir: PathBuf,
    /// Cloud data: the Fashion-MNIST training images of these classes.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4,5")]
    classes: Vec<u8>,
    /// Use only the first N images of those classes (0: all).
    #[arg(long, default_value_t = 0)]
    max_samples: usize,
    /// Fashion-MNIST directory (IDX .gz files).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Family of F_c.
    #[arg(long, default_value = "cnn_large")]
    cloud_model: String,
    #[arg(long, default_value_t = 3)]
    cloud_epochs: u32,
    #[arg(long, default_value_t = 0.05)]
    cloud_learning_rate: f32,
    #[arg(long, default_value_t = 3)]
    distil_epochs: u32,
    #[arg(long, default_value_t = 0.002)]
    distil_learning_rate: f32,
    #[arg(long, default_value_t = 32)]
    batch_size: u32,
    /// Cap on the SGD steps of the worker's copy of F_s per round (default: the devices' training
    /// parameters as the task sets them).
    #[arg(long)]
    co_model_steps: Option<u32>,
    /// Head tuning (step 5, off at 0): tune each committed F_s's last layer for serving on the
    /// first N training images of --tuning-classes.
    #[arg(long, default_value_t = 0)]
    tuning_samples: usize,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4,5,6,7,8,9")]
    tuning_classes: Vec<u8>,
    #[arg(long, default_value_t = 3)]
    tuning_epochs: u32,
    #[arg(long, default_value_t = 0.05)]
    tuning_learning_rate: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    backend: String,
    /// Run the task as an anonymous-embeddings task: no cloud data of its own; each round trains
    /// the model on the server's shuffled batches of anonymous samples (the DC-CCL flags above
    /// other than the server, task, token, state, seed, poll and backend ones do not apply).
    #[arg(long)]
    anon_embeddings: bool,
    /// Anonymous embeddings: epochs of the first round (the base model) and of each later round.
    #[arg(long, default_value_t = 3)]
    anon_base_epochs: u32,
    #[arg(long, default_value_t = 5)]
    anon_fine_tune_epochs: u32,
    /// Anonymous embeddings: Adam's step and minibatch size.
    #[arg(long, default_value_t = 0.002)]
    anon_learning_rate: f32,
    #[arg(long, default_value_t = 64)]
    anon_batch_size: usize,
    /// Anonymous embeddings: new batches a round waits for before the worker trains.
    #[arg(long, default_value_t = 1)]
    anon_min_new_batches: i64,
    /// Anonymous embeddings: answer thin clients' `POST /v1/predict` on this address (plain HTTP:
    /// put it behind a TLS proxy that logs no addresses), while training and after the task ends,
    /// until interrupted.
    #[arg(long)]
    anon_serve: Option<std::net::SocketAddr>,
}

/// The anonymous-embeddings worker of `cli.task`, until the task is over.
async fn run_anon(cli: Cli) -> anyhow::Result<()> {
    let backend: Backend = cli.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = FedhiveClient::with_tls(&cli.server, &cli.tls.load()?)?;
    let status = client.anonymous_status(&cli.task, &cli.token).await?;
    let fit = |epochs| FitParams {
        epochs,
        batch_size: cli.anon_batch_size,
        learning_rate: cli.anon_learning_rate,
    };
    let worker = AnonWorker {
        client,
        task_id: cli.task.clone(),
        token: cli.token.clone(),
        device: backend.device().context("opening the training backend")?,
        shape: status.sample_shape(),
        state_dir: cli.state_dir.clone(),
        options: AnonWorkerOptions {
            base: fit(cli.anon_base_epochs),
            fine_tune: fit(cli.anon_fine_tune_epochs),
            min_new_batches: cli.anon_min_new_batches,
            seed: cli.seed,
            poll: Duration::from_millis(cli.poll_ms),
        },
    };
    let worker = std::sync::Arc::new(worker);
    let Some(addr) = cli.anon_serve else {
        let rounds = worker.run().await?;
        tracing::info!(rounds, "task finished");
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "serving predictions");
    let serving = tokio::spawn(serve(listener, worker.clone()));
    let rounds = worker.run().await?;
    tracing::info!(
        rounds,
        "task finished; still serving predictions until interrupted"
    );
    tokio::select! {
        served = serving => served?.context("serving predictions")?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.anon_embeddings {
        return run_anon(cli).await;
    }
    let backend: Backend = cli.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    let train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
    let mut keep: Vec<usize> = (0..train.len())
        .filter(|&i| cli.classes.contains(&train.labels[i]))
        .collect();
    if cli.max_samples > 0 {
        keep.truncate(cli.max_samples);
    }
    anyhow::ensure!(
        !keep.is_empty(),
        "no training images of classes {:?}",
        cli.classes
    );
    let params = |epochs, learning_rate| TrainingParams {
        local_epochs: epochs,
        max_local_steps: 0,
        batch_size: cli.batch_size,
        learning_rate,
        learning_rate_schedule: None,
    };
    let head_tuning = if cli.tuning_samples == 0 {
        None
    } else {
        let tuning: Vec<usize> = (0..train.len())
            .filter(|&i| cli.tuning_classes.contains(&train.labels[i]))
            .take(cli.tuning_samples)
            .collect();
        anyhow::ensure!(
            !tuning.is_empty(),
            "no training images of classes {:?}",
            cli.tuning_classes
        );
        Some(HeadTuning {
            data: Arc::new(train.subset(&tuning)),
            params: params(cli.tuning_epochs, cli.tuning_learning_rate),
        })
    };
    let worker = Worker {
        client: FedhiveClient::with_tls(&cli.server, &cli.tls.load()?)?,
        task_id: cli.task.clone(),
        token: cli.token.clone(),
        device: backend.device().context("opening the training backend")?,
        data: Arc::new(train.subset(&keep)),
        state_dir: cli.state_dir.clone(),
        options: WorkerOptions {
            cloud_model: cli.cloud_model.parse()?,
            cloud_training: params(cli.cloud_epochs, cli.cloud_learning_rate),
            distillation: params(cli.distil_epochs, cli.distil_learning_rate),
            co_model_steps: cli.co_model_steps,
            seed: cli.seed,
            poll: Duration::from_millis(cli.poll_ms),
            head_tuning,
        },
    };
    let report = worker.run().await?;
    tracing::info!(
        contributions = report.contributions,
        cloud_model_bytes = report.cloud_model_bytes,
        "task finished"
    );
    Ok(())
}

/// Entry point of the `fedhive-cloud` binary.
pub fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedhive-cloud: {e:#}");
            ExitCode::FAILURE
        }
    }
}
