//! The hot/cold scenario: FedSubAvg against FedAvg at several server step sizes on Zipf-distributed
//! sparse features (Ding et al., NeurIPS 2022).
//!
//! # Generator (all draws from one `StdRng` seeded with `--seed`)
//!
//! - `--fields` categorical fields, each with its own vocabulary of `--vocab` ids (field `f` owns
//!   table rows `f*vocab .. (f+1)*vocab`). A feature of field `f` is drawn by rank from a Zipf law,
//!   `P(rank k) ∝ k^-zipf` (`k = 1..vocab`), rank `k` being id `f*vocab + k - 1`.
//! - Ground truth: a weight `w*[id] ~ N(0, 1.5^2)` per id; a sample's label is
//!   `y ~ Bernoulli(sigmoid(sum_f w*[x_f]))`.
//! - Device `i` holds `n_i ~ U{min_samples..=max_samples}` samples, each drawn independently as
//!   above; its feature set `R_i` is the ids its samples use.
//!
//! With the defaults (200 devices, 2 fields of 3,000 ids, Zipf exponent 1.1, 20-60 samples each)
//! most touched features are cold (held by 1-2 devices) and a few are hot (held by most devices).
//! A feature is *cold* when at most 2 devices hold it and *hot* when at least 10% of the devices do;
//! a sample is a *cold sample* when one of its features is cold and a *hot sample* when all of its
//! features are hot.
//!
//! # Runs
//!
//! One in-process server (temporary SQLite unless `--database-url`), one task per rule on the same
//! CTR model, initial weights and data: FedSubAvg (paper form, and the sample-weighted form) at
//! server step 1, then FedAvg at each `--fedavg-server-lrs` step. Every round the simulator picks
//! K devices uniformly at random (the same devices in the same round for every rule, as the paper's
//! uniform sampling assumes); they check in, download (their submodel for FedSubAvg, the whole
//! model for FedAvg), train locally with burn and upload over loopback HTTP. After the last round
//! the training loss of the committed model is measured on every device's samples. A run whose
//! device update blows up (non-finite, or refused as out of range) stops there and reports its
//! last committed model with `diverged_in_round`, so a too-large FedAvg server step is a result,
//! not a failed scenario.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use fedhive_client::{
    backend::Backend,
    client::FedhiveClient,
    ctr::{CTR_MODEL, CtrData, CtrSpec, TABLE, sample_losses, submodel_of},
    device::DeviceError,
    submodel_device::{ComputeDevice, Exchange, SubmodelDevice},
    training::TrainError,
};
use fedhive_shared::{
    NamedTensors,
    fedsubavg::SubAvgForm,
    sparse::{RowsRequest, SparseTensors, split_specs},
    wire::{CheckinResponse, StrategyConfig, TaskConfig, TrainingParams},
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};
use serde::Serialize;

/// Scenario settings; the defaults run in under a minute on 2 CPU cores (dev build).
#[derive(Debug, Clone, clap::Args)]
pub struct HotColdOptions {
    #[arg(long, default_value_t = 200)]
    pub devices: usize,
    /// K: devices per round.
    #[arg(long, default_value_t = 20)]
    pub devices_per_round: u32,
    #[arg(long, default_value_t = 30)]
    pub rounds: u32,
    #[arg(long, default_value_t = 2)]
    pub fields: usize,
    /// Ids per field.
    #[arg(long, default_value_t = 3000)]
    pub vocab: usize,
    /// Zipf exponent of feature popularity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    #[arg(long, default_value_t = 20)]
    pub min_samples: usize,
    #[arg(long, default_value_t = 60)]
    pub max_samples: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 4)]
    pub dim: usize,
    #[arg(long, default_value_t = 8)]
    pub hidden: usize,
    #[arg(long, default_value_t = 2)]
    pub local_epochs: u32,
    #[arg(long, default_value_t = 10)]
    pub batch_size: u32,
    /// Device SGD step, the same for every rule. The default is the step of {0.1, 0.3, 1, 3} at
    /// which FedAvg reached its lowest loss (at any server step) in our runs: the baseline's best.
    #[arg(long, default_value_t = 1.0)]
    pub learning_rate: f32,
    /// FedAvg server step sizes to compare (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,3,10,30")]
    pub fedavg_server_lrs: Vec<f32>,
    /// Also run FedSubAvg's sample-weighted form.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub sample_weighted: bool,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Training backend of the devices: flex (CPU) or wgpu.
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    pub backend: String,
    /// Server database (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database_url: Option<String>,
}

impl Default for HotColdOptions {
    fn default() -> Self {
        crate::clap_defaults("hot-cold")
    }
}

/// Mean training loss overall, on hot samples and on cold samples.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Losses {
    pub loss: f64,
    pub loss_hot: f64,
    pub loss_cold: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub rule: String,
    pub server_lr: f32,
    #[serde(flatten)]
    pub losses: Losses,
    /// Gain over the initial model on cold samples (initial cold loss minus this run's).
    pub cold_gain: f64,
    pub hot_gain: f64,
    pub updates_accepted: u64,
    /// The round in which a device's update blew up (the run stopped there), if one did.
    pub diverged_in_round: Option<u32>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HotColdReport {
    pub scenario: &'static str,
    pub seed: u64,
    pub devices: usize,
    pub devices_per_round: u32,
    pub rounds: u32,
    pub learning_rate: f32,
    pub features_touched: usize,
    pub cold_features: usize,
    pub hot_features: usize,
    pub samples: usize,
    pub hot_samples: usize,
    pub cold_samples: usize,
    pub initial: Losses,
    pub runs: Vec<RunReport>,
    /// FedSubAvg (paper form) has a lower overall loss than FedAvg at every server step.
    pub fedsubavg_lowest_loss: bool,
    /// ... a lower loss on cold samples (same initial model, so: the largest cold gain).
    pub fedsubavg_largest_cold_gain: bool,
    /// ... a lower loss on hot samples.
    pub fedsubavg_lowest_hot_loss: bool,
    pub database: String,
    pub seconds: f64,
}

/// The generated federation: per-device data, and which samples are hot or cold.
pub struct Population {
    pub spec: CtrSpec,
    pub devices: Vec<Arc<CtrData>>,
    /// All samples of all devices, in device order.
    pub all: CtrData,
    pub hot_sample: Vec<bool>,
    pub cold_sample: Vec<bool>,
    pub heat: HashMap<u64, usize>,
    pub cold_features: usize,
    pub hot_features: usize,
}

/// Zipf sampler by inverse CDF over ranks `1..=n`.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, exponent: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 1..=n {
            total += (k as f64).powf(-exponent);
            cdf.push(total);
        }
        cdf.iter_mut().for_each(|c| *c /= total);
        Zipf { cdf }
    }

    /// A rank in `0..n` (0 = most popular).
    fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// Generates the federation described in the module docs.
pub fn generate(o: &HotColdOptions) -> Population {
    let spec = CtrSpec {
        vocab: o.fields * o.vocab,
        fields: o.fields,
        dim: o.dim,
        hidden: o.hidden,
    };
    let mut rng = StdRng::seed_from_u64(o.seed);
    let truth = Normal::new(0.0f64, 1.5).expect("valid normal");
    let w: Vec<f64> = (0..spec.vocab).map(|_| truth.sample(&mut rng)).collect();
    let zipf = Zipf::new(o.vocab, o.zipf);
    let mut devices = Vec::with_capacity(o.devices);
    let mut all = CtrData {
        fields: o.fields,
        ..CtrData::default()
    };
    for _ in 0..o.devices {
        let n = rng.random_range(o.min_samples..=o.max_samples.max(o.min_samples));
        let mut d = CtrData {
            fields: o.fields,
            ..CtrData::default()
        };
        for _ in 0..n {
            let mut logit = 0.0;
            for f in 0..o.fields {
                let id = (f * o.vocab + zipf.sample(&mut rng)) as u64;
                logit += w[id as usize];
                d.features.push(id);
            }
            let p = 1.0 / (1.0 + (-logit).exp());
            d.labels.push(if rng.random::<f64>() < p { 1.0 } else { 0.0 });
        }
        all.features.extend_from_slice(&d.features);
        all.labels.extend_from_slice(&d.labels);
        devices.push(Arc::new(d));
    }
    let mut heat: HashMap<u64, usize> = HashMap::new();
    for d in &devices {
        for id in d.feature_set() {
            *heat.entry(id).or_default() += 1;
        }
    }
    let hot_at = (o.devices / 10).max(3);
    let is_cold = |id: &u64| heat[id] <= 2;
    let is_hot = |id: &u64| heat[id] >= hot_at;
    let hot_sample = (0..all.len()).map(|i| all.sample(i).iter().all(is_hot)).collect();
    let cold_sample = (0..all.len())
        .map(|i| all.sample(i).iter().any(is_cold))
        .collect();
    let cold_features = heat.keys().filter(|id| is_cold(id)).count();
    let hot_features = heat.keys().filter(|id| is_hot(id)).count();
    Population {
        spec,
        devices,
        all,
        hot_sample,
        cold_sample,
        heat,
        cold_features,
        hot_features,
    }
}

fn mean_where(losses: &[f32], mask: &[bool]) -> f64 {
    let (sum, n) = losses
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .fold((0f64, 0usize), |(s, n), (l, _)| (s + f64::from(*l), n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

fn losses_of(pop: &Population, per_sample: &[f32]) -> Losses {
    let everything = vec![true; per_sample.len()];
    Losses {
        loss: mean_where(per_sample, &everything),
        loss_hot: mean_where(per_sample, &pop.hot_sample),
        loss_cold: mean_where(per_sample, &pop.cold_sample),
    }
}

/// The committed model of `task` restricted to every touched row, fetched over HTTP.
async fn fetch_model(
    client: &FedhiveClient,
    task: &str,
    exchange: Exchange,
    pop: &Population,
) -> anyhow::Result<SparseTensors> {
    let ids = pop.all.feature_set();
    match exchange {
        Exchange::Submodel => {
            let request = RowsRequest {
                version: None,
                rows: BTreeMap::from([(TABLE.to_string(), ids)]),
            };
            let (_, bytes) = client.download_submodel(task, &request).await?;
            let (dense, tables) = split_specs(&pop.spec.tensor_specs(), &[TABLE.to_string()]);
            Ok(SparseTensors::decode_checked(&bytes, &dense, &tables, f32::MAX)?)
        }
        Exchange::Dense => {
            let (_, bytes) = client.download_model(task, None).await?;
            Ok(submodel_of(&NamedTensors::decode(&bytes)?, &ids)?)
        }
    }
}

async fn evaluate(
    device: &ComputeDevice,
    pop: &Arc<Population>,
    model: SparseTensors,
) -> anyhow::Result<Losses> {
    let (device, p) = (device.clone(), pop.clone());
    let per_sample = tokio::task::spawn_blocking(move || sample_losses(&device, &model, &p.all)).await??;
    Ok(losses_of(pop, &per_sample))
}

/// The server's heat after enrolment must be the generator's: every device counted once per row.
async fn check_heat(
    client: &FedhiveClient,
    task: &str,
    pop: &Population,
    devices: usize,
) -> anyhow::Result<()> {
    let ids = pop.all.feature_set();
    let request = RowsRequest {
        version: None,
        rows: BTreeMap::from([(TABLE.to_string(), ids.clone())]),
    };
    let report = client.heat(task, &request).await?;
    anyhow::ensure!(
        report.population.devices == devices as u64 && report.population.samples == pop.all.len() as u64,
        "server population {:?}, generated {devices} devices with {} samples",
        report.population,
        pop.all.len()
    );
    let heat = report.rows.get(TABLE).context("heat report without the table")?;
    for (id, h) in ids.iter().zip(heat) {
        anyhow::ensure!(
            h.devices == pop.heat[id] as u64,
            "row {id}: server heat {} devices, generator {}",
            h.devices,
            pop.heat[id]
        );
    }
    Ok(())
}

/// Everything a run needs besides its rule.
struct Setup<'a> {
    options: &'a HotColdOptions,
    client: FedhiveClient,
    device: ComputeDevice,
    pop: Arc<Population>,
    initial: NamedTensors,
    bar: ProgressBar,
}

/// What one rule reached.
struct RuleOutcome {
    /// Of the last committed model.
    losses: Losses,
    accepted: u64,
    diverged_in_round: Option<u32>,
}

/// One rule for `rounds` rounds (or until a device diverges).
async fn run_rule(setup: &Setup<'_>, strategy: StrategyConfig) -> anyhow::Result<RuleOutcome> {
    let o = setup.options;
    let exchange = match strategy {
        StrategyConfig::FedSubAvg { .. } => Exchange::Submodel,
        _ => Exchange::Dense,
    };
    let config = TaskConfig {
        model: CTR_MODEL.to_string(),
        tensors: setup.pop.spec.tensor_specs(),
        strategy,
        training: TrainingParams {
            local_epochs: o.local_epochs,
            max_local_steps: 0,
            batch_size: o.batch_size,
            learning_rate: o.learning_rate,
            learning_rate_schedule: None,
        },
        devices_per_round: o.devices_per_round,
        min_devices_per_round: o.devices_per_round,
        over_selection: 1.0,
        round_deadline_secs: 600,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds: o.rounds,
    };
    let client = &setup.client;
    let task = client.create_task(&config, setup.initial.encode()).await?.task_id;
    let devices: Vec<Arc<SubmodelDevice>> = setup
        .pop
        .devices
        .iter()
        .enumerate()
        .map(|(i, data)| {
            Arc::new(SubmodelDevice::new(
                client.clone(),
                &task,
                &format!("device-{i:04}"),
                setup.device.clone(),
                setup.pop.spec,
                data.clone(),
                o.seed.wrapping_add(i as u64),
            ))
        })
        .collect();
    if exchange == Exchange::Submodel {
        for chunk in devices.chunks(16) {
            let enrolments: Vec<_> = chunk
                .iter()
                .map(|d| {
                    let d = d.clone();
                    tokio::spawn(async move { d.enrol().await })
                })
                .collect();
            for e in enrolments {
                e.await??;
            }
        }
        check_heat(client, &task, &setup.pop, devices.len()).await?;
    }
    // The same device sample in round r for every rule.
    let mut selection = StdRng::seed_from_u64(o.seed ^ 0x5E1E_C7ED);
    let mut accepted = 0;
    let mut diverged_in_round = None;
    for round in 0..o.rounds {
        let picked = rand::seq::index::sample(&mut selection, devices.len(), o.devices_per_round as usize);
        let mut work = Vec::new();
        for i in picked.iter() {
            let d = devices[i].clone();
            let task = task.clone();
            work.push(tokio::spawn(async move {
                let assignment = loop {
                    match d.client.checkin(&task).await? {
                        CheckinResponse::Assigned(a) => break a,
                        CheckinResponse::RetryAfter { .. } => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        CheckinResponse::Finished { .. } => anyhow::bail!("task finished early"),
                    }
                };
                d.train_and_upload(&assignment, exchange).await?;
                anyhow::Ok(())
            }));
        }
        for w in work {
            match w.await? {
                Ok(()) => accepted += 1,
                Err(e) if diverged(&e) => {
                    diverged_in_round.get_or_insert(round);
                }
                Err(e) => return Err(e),
            }
        }
        if diverged_in_round.is_some() {
            break;
        }
        loop {
            if client.task_status(&task).await?.model_version > i64::from(round) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        setup.bar.inc(1);
    }
    let model = fetch_model(client, &task, exchange, &setup.pop).await?;
    let losses = evaluate(&setup.device, &setup.pop, model).await?;
    Ok(RuleOutcome {
        losses,
        accepted,
        diverged_in_round,
    })
}

/// A local model that blew up (training noticed, or the server refused the update's values): the
/// run stops there and reports the last committed model, instead of failing the whole scenario.
fn diverged(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<DeviceError>() {
        Some(DeviceError::Train(TrainError::Diverged(_))) => true,
        Some(DeviceError::Client(c)) => matches!(c.code(), Some("value_out_of_range" | "non_finite_value")),
        _ => false,
    }
}

/// `a` is a lower loss than `b`; a non-finite loss (a diverged run) is the highest.
fn lower(a: f64, b: f64) -> bool {
    a.is_finite() && (!b.is_finite() || a < b)
}

pub async fn run_hot_cold(options: &HotColdOptions, show_progress: bool) -> anyhow::Result<HotColdReport> {
    let started = Instant::now();
    anyhow::ensure!(
        options.devices >= options.devices_per_round as usize && options.devices_per_round > 0,
        "need 1 <= devices_per_round <= devices"
    );
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = backend.device().context("opening the training backend")?;
    let pop = Arc::new(generate(options));
    let initial = pop.spec.initial_weights(options.seed);

    let local =
        crate::LocalServer::start(options.database_url.clone(), 20, Duration::from_millis(50)).await?;
    let client = local.client.clone();

    let mut rules = vec![StrategyConfig::FedSubAvg {
        server_lr: 1.0,
        form: SubAvgForm::Paper,
        tables: vec![TABLE.to_string()],
    }];
    if options.sample_weighted {
        rules.push(StrategyConfig::FedSubAvg {
            server_lr: 1.0,
            form: SubAvgForm::SampleWeighted,
            tables: vec![TABLE.to_string()],
        });
    }
    rules.extend(
        options
            .fedavg_server_lrs
            .iter()
            .map(|&server_lr| StrategyConfig::FedAvg { server_lr }),
    );
    let bar = if show_progress {
        ProgressBar::new(u64::from(options.rounds) * rules.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} rounds {msg}",
    )?);
    let setup = Setup {
        options,
        client,
        device: device.clone(),
        pop: pop.clone(),
        initial: initial.clone(),
        bar: bar.clone(),
    };
    let ids = pop.all.feature_set();
    let initial_losses = evaluate(&device, &pop, submodel_of(&initial, &ids)?).await?;

    let mut runs = Vec::new();
    for strategy in rules {
        let (rule, server_lr) = match &strategy {
            StrategyConfig::FedSubAvg { form, server_lr, .. } => (
                match form {
                    SubAvgForm::Paper => "fedsubavg",
                    SubAvgForm::SampleWeighted => "fedsubavg_sample_weighted",
                },
                *server_lr,
            ),
            StrategyConfig::FedAvg { server_lr } => ("fedavg", *server_lr),
            _ => anyhow::bail!("unexpected strategy"),
        };
        bar.set_message(format!("{rule} server_lr {server_lr}"));
        let run_started = Instant::now();
        let RuleOutcome {
            losses,
            accepted: updates_accepted,
            diverged_in_round,
        } = run_rule(&setup, strategy).await?;
        bar.println(format!(
            "{rule:<26} server_lr {server_lr:>4}: loss {:.4}  hot {:.4}  cold {:.4}",
            losses.loss, losses.loss_hot, losses.loss_cold
        ));
        runs.push(RunReport {
            rule: rule.to_string(),
            server_lr,
            losses,
            cold_gain: initial_losses.loss_cold - losses.loss_cold,
            hot_gain: initial_losses.loss_hot - losses.loss_hot,
            updates_accepted,
            diverged_in_round,
            seconds: run_started.elapsed().as_secs_f64(),
        });
    }
    bar.finish_and_clear();
    local.server.shutdown().await;

    let sub = runs
        .iter()
        .find(|r| r.rule == "fedsubavg")
        .expect("fedsubavg always runs");
    let fedavg: Vec<&RunReport> = runs.iter().filter(|r| r.rule == "fedavg").collect();
    let fedsubavg_lowest_loss = fedavg.iter().all(|r| lower(sub.losses.loss, r.losses.loss));
    let fedsubavg_largest_cold_gain = fedavg
        .iter()
        .all(|r| lower(sub.losses.loss_cold, r.losses.loss_cold));
    let fedsubavg_lowest_hot_loss = fedavg
        .iter()
        .all(|r| lower(sub.losses.loss_hot, r.losses.loss_hot));
    Ok(HotColdReport {
        scenario: "hot-cold",
        seed: options.seed,
        devices: options.devices,
        devices_per_round: options.devices_per_round,
        rounds: options.rounds,
        learning_rate: options.learning_rate,
        features_touched: pop.heat.len(),
        cold_features: pop.cold_features,
        hot_features: pop.hot_features,
        samples: pop.all.len(),
        hot_samples: pop.hot_sample.iter().filter(|h| **h).count(),
        cold_samples: pop.cold_sample.iter().filter(|c| **c).count(),
        initial: initial_losses,
        runs,
        fedsubavg_lowest_loss,
        fedsubavg_largest_cold_gain,
        fedsubavg_lowest_hot_loss,
        database: local.database.clone(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
