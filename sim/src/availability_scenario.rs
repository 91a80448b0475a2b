//! The intermittent-availability scenario: FedAvg vs FedLaAvg on Fashion-MNIST with one class per
//! device, when which devices can take part changes with time.
//!
//! For each availability setting, each method runs the same number of rounds against a real
//! fedhive server (in this process, SQLite in a temporary directory, loopback HTTP), with devices
//! that train with burn through the SDK (`Device::train_and_upload`). Each round, only the devices
//! the availability model marks available check in:
//! - FedAvg: they check in in a seeded random order and the first K get the round's K assignments
//!   (random selection among the available devices);
//! - FedLaAvg: they enrol once, check in during the round's selection window, and come back when it
//!   ends; the server assigns the K least recently participated.
//!
//! Both use the same local work (C plain SGD steps at gamma, batch B) and the same gamma. Every
//! committed model is evaluated on the 10k test set; the summary gives the final accuracy and the
//! mean, min and max over the last availability period (the last full cycle: both groups' turns, or
//! the last day).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use fedhive_client::{
    backend::Backend,
    client::FedhiveClient,
    data::{Dataset, Split, default_data_dir, load_fashion_mnist},
    device::Device,
    model::{ModelKind, initial_weights, tensor_specs},
    partition,
    training::evaluate,
};
use fedhive_shared::{
    NamedTensors,
    wire::{CheckinResponse, RoundState, StrategyConfig, TaskConfig, TrainingParams},
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::availability::Availability;

/// Scenario settings. Defaults run the grid (D in {1, 5} x E in {10, 50}, model (a)).
#[derive(Debug, Clone, clap::Args)]
pub struct AvailabilityOptions {
    /// Availability model: `alternating` (two groups taking turns, model a) or `daily` (a window
    /// per device each simulated day, model b).
    #[arg(long, default_value = "alternating")]
    pub availability: String,
    /// Model (a): D values, comma-separated (the first group holds classes 0..D-1).
    #[arg(long, value_delimiter = ',', default_value = "1,5")]
    pub classes: Vec<u8>,
    /// Model (a): E values, comma-separated (rounds per group turn).
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    pub periods: Vec<u32>,
    /// Model (b): rounds per simulated day.
    #[arg(long, default_value_t = 24)]
    pub day: u32,
    /// Model (b): rounds a day each device is available.
    #[arg(long, default_value_t = 8)]
    pub hours: u32,
    /// Rounds per run: this many full availability cycles (both turns, or days), at least 300 rounds.
    #[arg(long, default_value_t = 3)]
    pub cycles: u32,
    /// Override the number of rounds of every run.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Simulated devices (device i holds class i mod 10).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// K: devices per round (default 10% of the devices).
    #[arg(long)]
    pub devices_per_round: Option<u32>,
    /// gamma: the devices' SGD step and FedLaAvg's server step. FedLaAvg re-applies the away
    /// group's gradients, up to E rounds old, every round, so it needs gamma x C x E small: at 0.05
    /// it swung more than FedAvg at D = 1, E = 10; at 0.02 it swung a third as much.
    #[arg(long, default_value_t = 0.02)]
    pub learning_rate: f32,
    /// C: local SGD steps per round.
    #[arg(long, default_value_t = 5)]
    pub local_steps: u32,
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    /// FedLaAvg's warm-up W (rounds that only collect gradient sums).
    #[arg(long, default_value_t = 0)]
    pub warmup_rounds: u32,
    /// FedLaAvg's selection window. Every check-in in the window is a durable write, which SQLite
    /// serialises: with 90 devices checking in on a loaded 2-core machine, 300 ms let two thirds of
    /// them miss it (and the LRU selection then saw only the few that made it).
    #[arg(long, default_value_t = 1500)]
    pub selection_window_ms: u64,
    /// Which methods to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "fedavg,fedlaavg")]
    pub methods: Vec<String>,
    /// Model family: mlp or cnn.
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Training backend of the devices: flex (CPU) or wgpu.
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    pub backend: String,
    /// Server database (default: SQLite in a temporary directory per run).
    #[arg(long)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fashion-MNIST directory (IDX .gz files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Default for AvailabilityOptions {
    fn default() -> Self {
        crate::clap_defaults("availability")
    }
}

/// One method's result in one setting.
#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    pub method: String,
    pub final_accuracy: f32,
    /// Over the last availability period: the last full cycle of the pattern (both groups' turns,
    /// or the last day).
    pub last_period_mean: f32,
    pub last_period_min: f32,
    pub last_period_max: f32,
    pub accuracy_per_round: Vec<f32>,
    pub updates_accepted: u32,
    /// FedLaAvg: available devices whose first check-in of a round arrived after its selection
    /// window (they were not considered as available; should be 0).
    pub missed_windows: u32,
    pub seconds: f64,
}

/// One availability setting and both methods' results.
#[derive(Debug, Clone, Serialize)]
pub struct SettingReport {
    pub availability: String,
    /// Model (a)'s D, or 0 for model (b).
    pub classes: u8,
    /// E for model (a), the day length for model (b).
    pub period: u32,
    /// Rounds of the last availability period the summary covers (2E, or one day).
    pub last_period_rounds: u32,
    pub rounds: u32,
    pub methods: Vec<MethodReport>,
}

/// The scenario's JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct AvailabilityReport {
    pub scenario: &'static str,
    pub devices: usize,
    pub devices_per_round: u32,
    pub learning_rate: f32,
    pub local_steps: u32,
    pub batch_size: u32,
    pub warmup_rounds: u32,
    pub model: String,
    pub backend: String,
    pub settings: Vec<SettingReport>,
    pub seconds: f64,
}

/// Data and compute shared by every run.
struct World {
    kind: ModelKind,
    device: burn::tensor::Device,
    shards: Vec<Arc<Dataset>>,
    classes: Vec<u8>,
    test: Arc<Dataset>,
}

pub async fn run_availability(
    options: &AvailabilityOptions,
    show_progress: bool,
) -> anyhow::Result<AvailabilityReport> {
    let started = Instant::now();
    let kind: ModelKind = options.model.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = backend.device().context("opening the training backend")?;
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
    let test = Arc::new(load_fashion_mnist(&data_dir, Split::Test)?);
    let parts = partition::one_class_per_device(&train.labels, options.devices, options.seed);
    let shards: Vec<Arc<Dataset>> = parts.iter().map(|p| Arc::new(train.subset(p))).collect();
    let classes: Vec<u8> = shards
        .iter()
        .map(|s| s.labels.first().copied().unwrap_or(0))
        .collect();
    let world = World {
        kind,
        device,
        shards,
        classes,
        test,
    };
    let k = options
        .devices_per_round
        .unwrap_or_else(|| (options.devices as u32).div_ceil(10).max(1));

    let mut settings: Vec<(Availability, u8)> = Vec::new();
    match options.availability.as_str() {
        "alternating" => {
            for &d in &options.classes {
                for &e in &options.periods {
                    settings.push((
                        Availability::AlternatingGroups {
                            classes: d,
                            period: e,
                        },
                        d,
                    ));
                }
            }
        }
        "daily" => settings.push((
            Availability::daily(&world.classes, options.day, options.hours, options.seed),
            0,
        )),
        other => bail!("unknown availability model `{other}` (expected alternating or daily)"),
    }

    let mut reports = Vec::new();
    for (availability, classes) in settings {
        let cycle = availability.cycle();
        let rounds = options
            .rounds
            .unwrap_or_else(|| (cycle * options.cycles).max(300).div_ceil(cycle) * cycle);
        let mut methods = Vec::new();
        for method in &options.methods {
            let label = format!("{} | {method}", availability.describe());
            let r = run_one(
                options,
                &world,
                &availability,
                method,
                k,
                rounds,
                &label,
                show_progress,
            )
            .await?;
            eprintln!(
                "{label}: final {:.4}, last period mean {:.4} min {:.4} max {:.4} ({:.0} s)",
                r.final_accuracy, r.last_period_mean, r.last_period_min, r.last_period_max, r.seconds
            );
            methods.push(r);
        }
        reports.push(SettingReport {
            availability: options.availability.clone(),
            classes,
            period: match &availability {
                Availability::AlternatingGroups { period, .. } => *period,
                Availability::DailyWindow { day, .. } => *day,
            },
            last_period_rounds: availability.cycle(),
            rounds,
            methods,
        });
    }
    Ok(AvailabilityReport {
        scenario: "availability",
        devices: options.devices,
        devices_per_round: k,
        learning_rate: options.learning_rate,
        local_steps: options.local_steps,
        batch_size: options.batch_size,
        warmup_rounds: options.warmup_rounds,
        model: kind.name().to_string(),
        backend: options.backend.clone(),
        settings: reports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    options: &AvailabilityOptions,
    world: &World,
    availability: &Availability,
    method: &str,
    k: u32,
    rounds: u32,
    label: &str,
    show_progress: bool,
) -> anyhow::Result<MethodReport> {
    let started = Instant::now();
    let strategy = match method {
        "fedavg" => StrategyConfig::FedAvg { server_lr: 1.0 },
        "fedlaavg" => StrategyConfig::FedLaAvg {
            warmup_rounds: options.warmup_rounds,
            selection_window_ms: options.selection_window_ms,
        },
        other => bail!("unknown method `{other}` (expected fedavg or fedlaavg)"),
    };
    let fedlaavg = matches!(strategy, StrategyConfig::FedLaAvg { .. });

    let local =
        crate::LocalServer::start(options.database_url.clone(), 50, Duration::from_millis(20)).await?;
    let client = local.client.clone();

    let task = TaskConfig {
        model: world.kind.name().to_string(),
        tensors: tensor_specs(world.kind),
        strategy,
        training: TrainingParams {
            // Every epoch has at least one step; max_local_steps stops at C.
            local_epochs: options.local_steps,
            max_local_steps: options.local_steps,
            batch_size: options.batch_size,
            learning_rate: options.learning_rate,
            learning_rate_schedule: None,
        },
        devices_per_round: k,
        min_devices_per_round: 1,
        over_selection: 1.0,
        round_deadline_secs: 120,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds,
    };
    let task_id = client
        .create_task(&task, initial_weights(world.kind, options.seed).encode())
        .await?
        .task_id;
    let mut devices: Vec<Option<Device>> = Vec::new();
    for (i, shard) in world.shards.iter().enumerate() {
        let mut d = Device::new(
            client.clone(),
            &task_id,
            world.device.clone(),
            shard.clone(),
            options.seed.wrapping_add(i as u64),
        );
        if fedlaavg {
            d.enrol().await?;
        }
        devices.push(Some(d));
    }

    let bar = if show_progress {
        ProgressBar::new(u64::from(rounds))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} {prefix} {msg}",
    )?);
    bar.set_prefix(label.to_string());
    let mut rng = StdRng::seed_from_u64(options.seed ^ 0xA5A5);
    let (mut evaluations, mut accuracy) = (std::collections::VecDeque::new(), Vec::new());
    let (mut accepted, mut missed) = (0u32, 0u32);
    for r in 1..=rounds {
        wait_open_round(&client, &task_id, i64::from(r) - 1).await?;
        let mut available: Vec<usize> = (0..devices.len())
            .filter(|&i| availability.is_available(i, world.classes[i], r))
            .collect();
        let assigned = if fedlaavg {
            let (assigned, late) = fedlaavg_checkins(&devices, &available).await?;
            missed += late;
            assigned
        } else {
            available.shuffle(&mut rng);
            fedavg_checkins(&devices, &available, k as usize).await?
        };
        let mut training = JoinSet::new();
        for (i, a) in assigned {
            let mut d = devices[i].take().expect("a device trains once per round");
            training.spawn(async move {
                let result = d.train_and_upload(&a).await;
                (i, d, result)
            });
        }
        while let Some(done) = training.join_next().await {
            let (i, d, result) = done?;
            devices[i] = Some(d);
            match result {
                Ok(()) => accepted += 1,
                Err(e) => tracing::warn!(device = i, round = r, error = %e, "device update failed"),
            }
        }
        wait_version(&client, &task_id, i64::from(r)).await?;
        let (_, bytes) = client.download_model(&task_id, Some(i64::from(r))).await?;
        let weights = NamedTensors::decode(&bytes)?;
        // Evaluated beside the next round: evaluating first would delay the devices' check-ins past
        // the selection window that opened when this round committed.
        let (kind, device, test) = (world.kind, world.device.clone(), world.test.clone());
        evaluations.push_back(tokio::task::spawn_blocking(move || {
            evaluate(kind, &device, &weights, &test)
        }));
        // At most two evaluations in flight, one per core.
        if evaluations.len() > 2 {
            let done = evaluations.pop_front().expect("non-empty");
            accuracy.push(done.await??.accuracy);
            bar.set_message(format!("acc {:.4}", accuracy[accuracy.len() - 1]));
        }
        bar.set_position(u64::from(r));
    }
    for evaluation in evaluations {
        accuracy.push(evaluation.await??.accuracy);
    }
    bar.finish_and_clear();
    local.server.shutdown().await;

    let last = &accuracy[accuracy.len().saturating_sub(availability.cycle() as usize)..];
    Ok(MethodReport {
        method: method.to_string(),
        final_accuracy: accuracy.last().copied().unwrap_or(0.0),
        last_period_mean: last.iter().sum::<f32>() / last.len().max(1) as f32,
        last_period_min: last.iter().copied().fold(f32::INFINITY, f32::min),
        last_period_max: last.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        accuracy_per_round: accuracy,
        updates_accepted: accepted,
        missed_windows: missed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

type Assigned = Vec<(usize, fedhive_shared::wire::Assignment)>;

/// FedAvg: the available devices check in one after another (in the shuffled order given) until
/// the round's K assignments are handed out.
async fn fedavg_checkins(devices: &[Option<Device>], order: &[usize], k: usize) -> anyhow::Result<Assigned> {
    let mut assigned = Vec::new();
    for &i in order {
        if assigned.len() == k {
            break;
        }
        let d = devices[i].as_ref().expect("devices are home between rounds");
        if let CheckinResponse::Assigned(a) = d.checkin().await? {
            assigned.push((i, a));
        }
    }
    Ok(assigned)
}

/// FedLaAvg: every available device checks in during the selection window and again when told
/// to; returns the assignments and how many first check-ins missed the window.
async fn fedlaavg_checkins(
    devices: &[Option<Device>],
    available: &[usize],
) -> anyhow::Result<(Assigned, u32)> {
    let first = checkin_all(devices, available).await?;
    let mut wait_ms = 0;
    let mut late = 0;
    let mut assigned = Vec::new();
    for (i, answer) in first {
        match answer {
            CheckinResponse::RetryAfter {
                retry_after_ms,
                reason,
            } if reason == "selection_window" => wait_ms = wait_ms.max(retry_after_ms),
            CheckinResponse::Assigned(a) => {
                late += 1;
                assigned.push((i, a));
            }
            _ => late += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let waiting: Vec<usize> = available
        .iter()
        .copied()
        .filter(|i| !assigned.iter().any(|(j, _)| j == i))
        .collect();
    for (i, answer) in checkin_all(devices, &waiting).await? {
        if let CheckinResponse::Assigned(a) = answer {
            assigned.push((i, a));
        }
    }
    assigned.sort_by_key(|(i, _)| *i);
    Ok((assigned, late))
}

/// Concurrent check-ins of the given devices, as they would arrive from many phones.
async fn checkin_all(
    devices: &[Option<Device>],
    which: &[usize],
) -> anyhow::Result<Vec<(usize, CheckinResponse)>> {
    let mut set = JoinSet::new();
    for &i in which {
        let d = devices[i].as_ref().expect("devices are home between rounds");
        let (client, task, creds) = (d.client.clone(), d.task_id.clone(), d.credentials.clone());
        set.spawn(async move {
            let answer = match creds {
                Some(c) => client.checkin_as(&task, &c).await,
                None => client.checkin(&task).await,
            };
            (i, answer)
        });
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        let (i, answer) = done?;
        out.push((i, answer?));
    }
    Ok(out)
}

/// Waits until the task's model is at `version` and the round that builds on it is open.
async fn wait_open_round(client: &FedhiveClient, task_id: &str, version: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let status = client.task_status(task_id).await?;
        if status.model_version == version
            && status
                .current_round
                .as_ref()
                .is_some_and(|r| r.state == RoundState::Open && r.base_version == version)
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("round on model version {version} did not open: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_version(client: &FedhiveClient, task_id: &str, version: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if client.task_status(task_id).await?.model_version >= version {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("model version {version} was not committed within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
