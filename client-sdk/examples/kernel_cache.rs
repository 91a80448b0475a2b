//! Cold start on wgpu with burn's persistent kernel cache: for the MLP and the CNN, the first round
//! of a new process with an empty cache, the first round of a second process with the cache the
//! first one filled, and a warm round. Each cold figure is a fresh child process.
//!
//! ```sh
//! cargo run -p fedhive-client --features vulkan,spirv-dump --example kernel_cache
//! ```
//!
//! (`spirv-dump` only so that it shares the build of the kernel validation test.) Prints a table and
//! one JSON line per measurement; the figures are in docs/benchmarks.md ("Kernel cache").

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedhive_client::backend::{Backend, enable_kernel_cache};
use fedhive_client::data::{Split, default_data_dir, load_fashion_mnist};
use fedhive_client::model::{ModelKind, initial_weights};
use fedhive_client::training::train_local;
use fedhive_shared::wire::TrainingParams;
use serde::{Deserialize, Serialize};

const SAMPLES: usize = 1024;
const BATCH: u32 = 32;
const WARM_SECS: f64 = 5.0;

#[derive(Debug, Serialize, Deserialize)]
struct Measurement {
    model: String,
    adapter: String,
    /// Whether the cache directory held this build's kernels when the process started.
    cache_filled: bool,
    /// Device start and the first round (kernel compilation or cache loads included), seconds.
    first_round_secs: f64,
    /// Mean of the later rounds in the same process, seconds.
    warm_round_secs: f64,
}

/// One process: enable the cache in `cache`, time the first round, then warm rounds.
fn measure(model: ModelKind, cache: &std::path::Path) -> anyhow::Result<Measurement> {
    let cache_filled = std::fs::read_dir(cache).is_ok_and(|mut d| d.next().is_some());
    enable_kernel_cache(cache)?;
    let data = load_fashion_mnist(&default_data_dir(), Split::Train)?;
    let local = data.subset(&(0..SAMPLES).collect::<Vec<_>>());
    let global = initial_weights(model, 0);
    let params = TrainingParams {
        local_epochs: 1,
        max_local_steps: 0,
        batch_size: BATCH,
        learning_rate: 0.05,
        learning_rate_schedule: None,
    };
    let start = Instant::now();
    let device = Backend::Wgpu.device()?;
    train_local(model, &device, &global, &local, &params, 0)?;
    let first_round_secs = start.elapsed().as_secs_f64();
    let warm = Instant::now();
    let mut rounds = 0;
    while rounds < 2 || warm.elapsed() < Duration::from_secs_f64(WARM_SECS) {
        train_local(model, &device, &global, &local, &params, rounds + 1)?;
        rounds += 1;
    }
    Ok(Measurement {
        model: model.name().into(),
        adapter: Backend::Wgpu.describe()?,
        cache_filled,
        first_round_secs,
        warm_round_secs: warm.elapsed().as_secs_f64() / rounds as f64,
    })
}

fn child(model: &str, cache: &std::path::Path) -> anyhow::Result<Measurement> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--child", model])
        .arg(cache)
        .output()?;
    if !out.status.success() {
        bail!(
            "the {model} child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(
        stdout.lines().last().context("the child printed nothing")?,
    )?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, model, cache] = args.as_slice()
        && flag == "--child"
    {
        let model: ModelKind = model.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let m = measure(model, &PathBuf::from(cache))?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    println!("{SAMPLES} samples a round, batch {BATCH}; each cold figure is a new process");
    println!("model | cold, empty cache | cold, filled cache | warm round");
    for model in ["mlp", "cnn"] {
        let cache = tempfile::tempdir()?;
        let empty = child(model, cache.path())?;
        let filled = child(model, cache.path())?;
        if empty.cache_filled || !filled.cache_filled {
            bail!("{model}: the first process did not fill the cache");
        }
        println!(
            "{model} | {:.2} s | {:.2} s | {:.3} s (warm in the second process: {:.3} s) | {}",
            empty.first_round_secs,
            filled.first_round_secs,
            empty.warm_round_secs,
            filled.warm_round_secs,
            empty.adapter
        );
        for m in [empty, filled] {
            eprintln!("{}", serde_json::to_string(&m)?);
        }
    }
    Ok(())
}
