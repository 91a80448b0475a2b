//! The block-cyclic scenario: MM-PSGD and MC-PSGD against the last global model on Fashion-MNIST
//! whose concept changes between a "day" and a "night" block.
//!
//! Blocks (`--night`): in the day block images and labels are Fashion-MNIST as it is. In the night
//! block, by default (`permuted`), the label map of classes 0-4 is rotated (0->1, 1->2, 2->3, 3->4,
//! 4->0; 5-9 unchanged): the same image means another class at night, a concept that no single model
//! can fit for both blocks. `inverted-permuted` also inverts the images (pixel -> 1 - pixel), which
//! makes the block visible in the input; `inverted` only inverts. The control run (`--control`, and
//! always in the summary) uses the day concept in both blocks.
//!
//! Each run starts a fedhive server in this process (SQLite in a temporary directory unless
//! `--database-url`), creates a task whose round-count schedule is `cycles` x (day: R rounds,
//! night: R rounds), and runs `devices` simulated devices over loopback HTTP: each device holds its
//! own day samples and its own night samples (disjoint IID shares of the training set, transformed for
//! its block) and trains on the data of the block its assignment names. Afterwards the last global
//! model (`x`, the model a plain FedAvg deployment would serve) and the block predictors, fetched from
//! the predictor endpoint, are evaluated on the 10k test set transformed for each block.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use fedhive_client::{
    backend::Backend,
    data::{Dataset, Split, default_data_dir, load_fashion_mnist},
    device::Device,
    model::{ModelKind, initial_weights, tensor_specs},
    partition,
    training::evaluate,
};
use fedhive_shared::{
    NamedTensors,
    blocks::{BlockSchedule, ChainChoice, PredictorAverage, RoundBlock},
    wire::{StrategyConfig, TaskConfig, TrainingParams},
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// How the night block's data differ from the day block's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NightConcept {
    /// Labels of classes 0-4 rotated by one (the same image means another class).
    Permuted,
    /// Images inverted and labels of classes 0-4 rotated.
    InvertedPermuted,
    /// Images inverted, labels unchanged.
    Inverted,
    /// Same as the day (the control).
    Same,
}

impl NightConcept {
    fn transform(self, data: &Dataset) -> Dataset {
        let invert = matches!(self, NightConcept::InvertedPermuted | NightConcept::Inverted);
        let permute = matches!(self, NightConcept::InvertedPermuted | NightConcept::Permuted);
        Dataset {
            images: if invert {
                data.images.iter().map(|p| 1.0 - p).collect()
            } else {
                data.images.clone()
            },
            labels: if permute {
                data.labels
                    .iter()
                    .map(|&l| if l < 5 { (l + 1) % 5 } else { l })
                    .collect()
            } else {
                data.labels.clone()
            },
        }
    }
}

/// Scenario settings (defaults run in a few minutes on 2 CPU cores).
#[derive(Debug, Clone, clap::Args)]
pub struct BlockCyclicOptions {
    /// Simulated devices; each holds day data and night data of its own.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Cycles (days) of day + night.
    #[arg(long, default_value_t = 10)]
    pub cycles: u32,
    /// Rounds per block.
    #[arg(long, default_value_t = 2)]
    pub rounds_per_block: u32,
    /// K: updates a round needs to commit.
    #[arg(long, default_value_t = 10)]
    pub devices_per_round: u32,
    /// Training samples per device per block.
    #[arg(long, default_value_t = 500)]
    pub samples_per_device: usize,
    /// How the night concept differs from the day's.
    #[arg(long, value_enum, default_value = "permuted")]
    pub night: NightConcept,
    /// Only run the control (both blocks the day concept).
    #[arg(long)]
    pub control: bool,
    /// Skip the control run.
    #[arg(long)]
    pub no_control: bool,
    #[arg(long, default_value = "mlp")]
    pub model: String,
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    pub backend: String,
    /// Server database (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub local_epochs: u32,
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    /// Device step gamma on x.
    #[arg(long, default_value_t = 0.05)]
    pub learning_rate: f32,
    /// MC-PSGD's eta, the device step on the chains `y_m` (default: 2 x gamma: a chain trains only
    /// in its own block's rounds, half as many as `x`, so twice the step gives it `x`'s step per
    /// cycle; at eta = gamma the chains lag `x` and MC-PSGD trailed MM-PSGD by 1-2 points).
    #[arg(long)]
    pub chain_learning_rate: Option<f32>,
    /// Which rounds of a block its predictor averages: `all` (the paper's rule), `tail` (from cycle
    /// `--tail-after-cycles` on) or `ema` (decay `--ema-decay`).
    #[arg(long, value_enum, default_value = "all")]
    pub predictor_average: AverageWindow,
    /// `tail`: the cycle from which the predictors average (default: half the cycles).
    #[arg(long)]
    pub tail_after_cycles: Option<u32>,
    /// `ema`: weight of the previous predictor in each round's average.
    #[arg(long, default_value_t = 0.8)]
    pub ema_decay: f32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Fashion-MNIST directory (IDX .gz files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// The predictor averaging windows of [`PredictorAverage`], as a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AverageWindow {
    All,
    Tail,
    Ema,
}

impl BlockCyclicOptions {
    fn chain_learning_rate(&self) -> f32 {
        self.chain_learning_rate.unwrap_or(2.0 * self.learning_rate)
    }

    fn predictor_average(&self) -> PredictorAverage {
        match self.predictor_average {
            AverageWindow::All => PredictorAverage::All,
            AverageWindow::Tail => PredictorAverage::Tail {
                after_cycles: self.tail_after_cycles.unwrap_or(self.cycles / 2).max(1),
            },
            AverageWindow::Ema => PredictorAverage::Ema {
                decay: self.ema_decay,
            },
        }
    }
}

impl Default for BlockCyclicOptions {
    fn default() -> Self {
        crate::clap_defaults("block-cyclic")
    }
}

/// Test accuracy on each block's test set, and their mean.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerBlock {
    pub day: f32,
    pub night: f32,
    pub mean: f32,
}

impl PerBlock {
    fn new(day: f32, night: f32) -> Self {
        PerBlock {
            day,
            night,
            mean: (day + night) / 2.0,
        }
    }
}

/// One setting (blocks differ, or the control): an MM-PSGD run and an MC-PSGD run.
#[derive(Debug, Clone, Serialize)]
pub struct SettingReport {
    pub night: NightConcept,
    /// The MM-PSGD run's last `x`: what plain FedAvg would serve (MM-PSGD's `x` is FedAvg's).
    pub last_global: PerBlock,
    /// Per-block predictors of MM-PSGD (each evaluated on its own block).
    pub mm_psgd: PerBlock,
    /// Per-block predictors of MC-PSGD.
    pub mc_psgd: PerBlock,
    /// The MC-PSGD run's last `x`, for reference.
    pub mc_last_global: PerBlock,
    /// Fraction of MC-PSGD rounds per block whose predictor step took the chain `y_m` over `x`.
    pub mc_chain_chosen: PerBlock,
    pub rounds: i64,
}

/// The scenario's result, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BlockCyclicReport {
    pub scenario: &'static str,
    pub blocks_differ: Option<SettingReport>,
    pub control: Option<SettingReport>,
    pub devices: usize,
    pub cycles: u32,
    pub rounds_per_block: u32,
    pub devices_per_round: u32,
    pub samples_per_device: usize,
    /// gamma, the devices' step on `x`.
    pub learning_rate: f32,
    /// eta, the devices' step on MC-PSGD's chains.
    pub chain_learning_rate: f32,
    /// Which rounds of a block the predictors average.
    pub predictor_average: PredictorAverage,
    pub seed: u64,
    pub model: String,
    pub backend: String,
    pub seconds: f64,
}

struct Data {
    day: Vec<Arc<Dataset>>,
    night_raw: Vec<Dataset>,
    test: Dataset,
}

pub async fn run_block_cyclic(
    options: &BlockCyclicOptions,
    show_progress: bool,
) -> anyhow::Result<BlockCyclicReport> {
    let started = Instant::now();
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
    let test = load_fashion_mnist(&data_dir, Split::Test)?;
    let needed = options.devices * options.samples_per_device * 2;
    anyhow::ensure!(
        needed <= train.len(),
        "{} devices x {} samples x 2 blocks = {needed} exceeds the {} training samples",
        options.devices,
        options.samples_per_device,
        train.len()
    );
    // Disjoint IID shares: device i's day samples are shard i, its night samples shard devices + i.
    let shards = partition::iid(train.len(), options.devices * 2, options.seed);
    let take = |i: usize| train.subset(&shards[i][..options.samples_per_device]);
    let data = Data {
        day: (0..options.devices).map(|i| Arc::new(take(i))).collect(),
        night_raw: (0..options.devices).map(|i| take(options.devices + i)).collect(),
        test,
    };

    let mut settings = Vec::new();
    if !options.control {
        settings.push(options.night);
    }
    if options.control || !options.no_control {
        settings.push(NightConcept::Same);
    }
    let mut reports = Vec::new();
    for night in settings {
        reports.push(run_setting(options, &data, night, show_progress).await?);
    }
    let (mut blocks_differ, mut control) = (None, None);
    for r in reports {
        if r.night == NightConcept::Same {
            control = Some(r);
        } else {
            blocks_differ = Some(r);
        }
    }
    Ok(BlockCyclicReport {
        scenario: "block-cyclic",
        blocks_differ,
        control,
        devices: options.devices,
        cycles: options.cycles,
        rounds_per_block: options.rounds_per_block,
        devices_per_round: options.devices_per_round,
        samples_per_device: options.samples_per_device,
        learning_rate: options.learning_rate,
        chain_learning_rate: options.chain_learning_rate(),
        predictor_average: options.predictor_average(),
        seed: options.seed,
        model: options.model.clone(),
        backend: options.backend.clone(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn run_setting(
    options: &BlockCyclicOptions,
    data: &Data,
    night: NightConcept,
    show_progress: bool,
) -> anyhow::Result<SettingReport> {
    let night_data: Vec<Arc<Dataset>> = data
        .night_raw
        .iter()
        .map(|d| Arc::new(night.transform(d)))
        .collect();
    let tests = (data.test.clone(), night.transform(&data.test));
    let mm = run_federation(options, data, &night_data, &tests, false, show_progress).await?;
    let mc = run_federation(options, data, &night_data, &tests, true, show_progress).await?;
    Ok(SettingReport {
        night,
        last_global: mm.last_global,
        mm_psgd: mm.predictors,
        mc_psgd: mc.predictors,
        mc_last_global: mc.last_global,
        mc_chain_chosen: mc.chain_chosen,
        rounds: mm.rounds,
    })
}

struct FederationResult {
    last_global: PerBlock,
    predictors: PerBlock,
    chain_chosen: PerBlock,
    rounds: i64,
}

async fn run_federation(
    options: &BlockCyclicOptions,
    data: &Data,
    night_data: &[Arc<Dataset>],
    tests: &(Dataset, Dataset),
    mc: bool,
    show_progress: bool,
) -> anyhow::Result<FederationResult> {
    let kind: ModelKind = options.model.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = backend.device().context("opening the training backend")?;

    let local =
        crate::LocalServer::start(options.database_url.clone(), 100, Duration::from_millis(50)).await?;
    let client = local.client.clone();

    let schedule = BlockSchedule::Rounds {
        blocks: ["day", "night"]
            .map(|name| RoundBlock {
                name: name.into(),
                rounds: options.rounds_per_block,
            })
            .to_vec(),
    };
    let strategy = if mc {
        StrategyConfig::McPsgd {
            server_lr: 1.0,
            schedule,
            chain_learning_rate: Some(options.chain_learning_rate()),
            predictor_average: options.predictor_average(),
        }
    } else {
        StrategyConfig::MmPsgd {
            server_lr: 1.0,
            schedule,
            predictor_average: options.predictor_average(),
        }
    };
    let rounds = options.cycles * 2 * options.rounds_per_block;
    let task = TaskConfig {
        model: kind.name().to_string(),
        tensors: tensor_specs(kind),
        strategy,
        training: TrainingParams {
            local_epochs: options.local_epochs,
            max_local_steps: 0,
            batch_size: options.batch_size,
            learning_rate: options.learning_rate,
            learning_rate_schedule: None,
        },
        devices_per_round: options.devices_per_round,
        min_devices_per_round: options.devices_per_round.div_ceil(2),
        over_selection: 1.3,
        round_deadline_secs: 300,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds,
    };
    let task_id = client
        .create_task(&task, initial_weights(kind, options.seed).encode())
        .await?
        .task_id;

    let mut devices = Vec::new();
    for (i, (day, night)) in data.day.iter().zip(night_data).enumerate() {
        let mut d = Device::new(
            client.clone(),
            &task_id,
            device.clone(),
            day.clone(),
            options.seed * 1000 + i as u64,
        )
        .with_block_data("day", day.clone())
        .with_block_data("night", night.clone());
        devices.push(tokio::spawn(async move { d.run().await }));
    }

    let bar = if show_progress {
        ProgressBar::new(u64::from(rounds))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}",
    )?);
    bar.set_message(if mc { "MC-PSGD" } else { "MM-PSGD" });
    loop {
        let status = client.task_status(&task_id).await?;
        bar.set_position(status.committed_rounds as u64);
        if status.state.is_over() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    for handle in devices {
        handle.await??;
    }

    let eval = |bytes: &[u8], test: &Dataset| -> anyhow::Result<f32> {
        let weights = NamedTensors::decode(bytes)?;
        Ok(evaluate(kind, &device, &weights, test)?.accuracy)
    };
    let (_, x) = client.download_model(&task_id, None).await?;
    let last_global = PerBlock::new(eval(&x, &tests.0)?, eval(&x, &tests.1)?);
    let day = client.download_predictor(&task_id, Some("day")).await?;
    let night = client.download_predictor(&task_id, Some("night")).await?;
    anyhow::ensure!(day.rounds > 0 && night.rounds > 0, "a block has no predictor");
    let predictors = PerBlock::new(eval(&day.bytes, &tests.0)?, eval(&night.bytes, &tests.1)?);
    let status = client.block_status(&task_id).await?;
    let chain_share = |block: &str| {
        let rounds: Vec<_> = status.history.iter().filter(|r| r.block == block).collect();
        let chain = rounds.iter().filter(|r| r.chosen == ChainChoice::Chain).count();
        chain as f32 / rounds.len().max(1) as f32
    };
    let chain_chosen = PerBlock::new(chain_share("day"), chain_share("night"));
    let committed = client.task_status(&task_id).await?.committed_rounds;
    local.server.shutdown().await;
    let label = if mc { "MC-PSGD" } else { "MM-PSGD" };
    if show_progress {
        eprintln!(
            "{label}: last x day {:.4} night {:.4}; predictors day {:.4} night {:.4}",
            last_global.day, last_global.night, predictors.day, predictors.night
        );
    }
    Ok(FederationResult {
        last_global,
        predictors,
        chain_chosen,
        rounds: committed,
    })
}
