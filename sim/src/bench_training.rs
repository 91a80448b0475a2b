//! Device training throughput: SDK samples/s of FedAvg's local step for the demo's models on each
//! backend, cold (the first round in a fresh process: device start-up and kernel compilation
//! included) and warm (later rounds in the same process).
//!
//! Cold needs a fresh process, so `bench-training` runs each measurement as a child process
//! (`bench-training-once`) and collects their JSON lines. `--features wgpu` runs WGSL with no
//! persistent kernel cache, so every wgpu child compiles its kernels afresh; the SPIR-V kernel
//! cache (the SDK's `vulkan` feature) is measured by `fedhive-client`'s `kernel_cache` example.
//!
//! It is a sim command rather than a criterion bench on purpose: `cargo bench` builds the release
//! profile, which would add a second, 12-20 minute build of burn on a 2-core machine; this runs on
//! the build the demo and the tests share (dependencies at opt-level 2).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use fedhive_client::{
    backend::Backend,
    data::{Split, default_data_dir, load_fashion_mnist},
    model::{ModelKind, initial_weights},
    training::train_local,
};
use fedhive_shared::wire::TrainingParams;
use serde::{Deserialize, Serialize};

const COMPILED_BACKENDS: &str = if cfg!(feature = "wgpu") {
    "flex,wgpu"
} else {
    "flex"
};

/// What `bench-training` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchTrainingOptions {
    /// Models, comma-separated.
    #[arg(long, default_value = "mlp,cnn", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Backends, comma-separated (default: every backend this build has; wgpu needs `--features wgpu`).
    #[arg(long, default_value = COMPILED_BACKENDS, value_delimiter = ',')]
    pub backends: Vec<String>,
    #[command(flatten)]
    pub round: RoundOptions,
}

/// One round's shape, shared by the parent and its children.
#[derive(Debug, Clone, clap::Args)]
pub struct RoundOptions {
    /// Training samples per round (one local epoch over them).
    #[arg(long, default_value_t = 1024)]
    pub samples: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    /// Warm rounds run until this much time has passed (at least two rounds).
    #[arg(long, default_value_t = 5.0)]
    pub warm_secs: f64,
    /// Fashion-MNIST directory (IDX .gz files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// One child's measurement.
#[derive(Debug, Clone, clap::Args)]
pub struct OnceOptions {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub backend: String,
    #[command(flatten)]
    pub round: RoundOptions,
}

/// The result of one process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingThroughput {
    pub model: String,
    pub backend: String,
    pub adapter: String,
    pub samples_per_round: usize,
    /// Starting the device (wgpu: adapter and runtime), seconds.
    pub device_start_secs: f64,
    /// First round, device start included, seconds.
    pub cold_round_secs: f64,
    pub cold_samples_per_sec: f64,
    pub warm_rounds: usize,
    pub warm_samples_per_sec: f64,
    /// cold round time / warm round time.
    pub cold_over_warm: f64,
}

/// Runs one process's measurement: device start and the first round (cold), then warm rounds.
pub fn run_once(options: &OnceOptions) -> anyhow::Result<TrainingThroughput> {
    let kind: ModelKind = options.model.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let round = &options.round;
    let data_dir = round.data_dir.clone().unwrap_or_else(default_data_dir);
    let train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
    let data = train.subset(&(0..round.samples.min(train.len())).collect::<Vec<_>>());
    let global = initial_weights(kind, 0);
    let params = TrainingParams {
        local_epochs: 1,
        max_local_steps: 0,
        batch_size: round.batch_size,
        learning_rate: 0.05,
        learning_rate_schedule: None,
    };
    let start = Instant::now();
    let device = backend.device().context("starting the backend")?;
    let device_start_secs = start.elapsed().as_secs_f64();
    train_local(kind, &device, &global, &data, &params, 0)?;
    let cold_round_secs = start.elapsed().as_secs_f64();

    let warm_start = Instant::now();
    let mut warm_rounds = 0;
    while warm_rounds < 2 || warm_start.elapsed() < Duration::from_secs_f64(round.warm_secs) {
        train_local(kind, &device, &global, &data, &params, warm_rounds as u64 + 1)?;
        warm_rounds += 1;
    }
    let warm_round_secs = warm_start.elapsed().as_secs_f64() / warm_rounds as f64;
    let n = data.len() as f64;
    Ok(TrainingThroughput {
        model: kind.name().into(),
        backend: backend.name().into(),
        adapter: backend.describe().unwrap_or_default(),
        samples_per_round: data.len(),
        device_start_secs,
        cold_round_secs,
        cold_samples_per_sec: n / cold_round_secs,
        warm_rounds,
        warm_samples_per_sec: n / warm_round_secs,
        cold_over_warm: cold_round_secs / warm_round_secs,
    })
}

/// Runs every (model, backend) measurement in a child process and returns their results.
pub fn run_all(options: &BenchTrainingOptions) -> anyhow::Result<Vec<TrainingThroughput>> {
    let exe = std::env::current_exe()?;
    let r = &options.round;
    let mut results = Vec::new();
    for model in &options.models {
        for backend in &options.backends {
            let mut cmd = Command::new(&exe);
            cmd.args(["bench-training-once", "--model", model, "--backend", backend])
                .args(["--samples", &r.samples.to_string()])
                .args(["--batch-size", &r.batch_size.to_string()])
                .args(["--warm-secs", &r.warm_secs.to_string()]);
            if let Some(d) = &r.data_dir {
                cmd.arg("--data-dir").arg(d);
            }
            let out = cmd.output().context("running a bench-training child")?;
            if !out.status.success() {
                bail!(
                    "bench-training-once {model} {backend} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let stdout = String::from_utf8(out.stdout)?;
            let line = stdout.lines().last().context("the child printed nothing")?;
            let result: TrainingThroughput = serde_json::from_str(line)?;
            eprintln!(
                "{:<4} {:<5} device start {:>5.2} s, cold round {:>7.2} s ({:>8.1} samples/s), warm {:>9.1} samples/s, cold/warm {:>5.1}x",
                result.model,
                result.backend,
                result.device_start_secs,
                result.cold_round_secs,
                result.cold_samples_per_sec,
                result.warm_samples_per_sec,
                result.cold_over_warm
            );
            results.push(result);
        }
    }
    Ok(results)
}
