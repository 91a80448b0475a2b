//! The anonymous-embeddings scenario: personalisation without user identifiers on Fashion-MNIST
//! (Ding et al., arXiv 2501.06062; `ALGORITHMS.md`, "Anonymous user embeddings").
//!
//! The labelling rule that a shared model cannot know without knowing the user: each user draws
//! one pair of classes `(a, b)` of their own (uniformly among the 45 pairs, per seed) and swaps
//! those two labels in all of their data, training and held-out alike. A model that knows nothing
//! of the user is wrong on about a fifth of each user's data (their two swapped classes, where the
//! majority of users keep the usual label).
//!
//! Per seed, one server (in this process; SQLite in a temporary directory unless
//! `--database-url`) runs one `anon_embeddings` task per arm, each with its own cloud worker
//! ([`fedhive_cloud::anon::AnonWorker`], over HTTP with the task's worker token) and the same users:
//!
//! - `none`: devices always send `e = 0` (no personalisation);
//! - `static`: `sigma = 0`, so `e = mu_u` every time: an identifier in all but name, the
//!   privacy-violating upper bound;
//! - `sigma_X`: sampled embeddings, a fresh `e ~ N(mu_u, X^2 I)` per sample and per prediction.
//!
//! Round 1 trains the base model on every user's data sent with `e = 0` (nobody has a
//! distribution yet). Before each later round, every device downloads the current model, fits its
//! `mu_u` with the model frozen, and submits its training data again with fresh embeddings, a few
//! samples per request, interleaved with the other devices; the worker fine-tunes on the server's
//! shuffled batches. After the last round the devices fit `mu_u` once more and predict their
//! held-out data on-device, each prediction with a fresh `e`.
//!
//! The attacker knows every user's final `mu_u` (more than the server ever sees) and attributes
//! each of `--attacker-draws` fresh embeddings per user to the user with the nearest mean; chance
//! is `1 / users`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use fedhive_client::{
    anon::{self, Examples, FitParams, UserEmbedding},
    backend::Backend,
    data::{Dataset, IMAGE_PIXELS, NUM_CLASSES, Split, default_data_dir, load_fashion_mnist},
};
use fedhive_cloud::anon::{AnonStep, AnonWorker, AnonWorkerOptions};
use fedhive_shared::{
    NamedTensors,
    anon::SampleShape,
    wire::{StrategyConfig, TaskConfig, TrainingParams},
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Scenario settings (defaults: about six minutes per seed on 2 busy CPU cores).
#[derive(Debug, Clone, clap::Args)]
pub struct AnonOptions {
    /// Seeds, one full comparison each.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub seeds: Vec<u64>,
    #[arg(long, default_value_t = 40)]
    pub users: usize,
    /// Training images per user (drawn from Fashion-MNIST's training set, no image twice).
    #[arg(long, default_value_t = 300)]
    pub train_per_user: usize,
    /// Held-out images per user (from the test set).
    #[arg(long, default_value_t = 100)]
    pub test_per_user: usize,
    #[arg(long, default_value_t = 8)]
    pub embedding_dim: usize,
    /// The sampled arms' sigmas.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.3,1,3")]
    pub sigmas: Vec<f32>,
    /// Rounds of each task: the base model, then fine-tunes.
    #[arg(long, default_value_t = 6)]
    pub rounds: u32,
    /// Samples per anonymous submission.
    #[arg(long, default_value_t = 50)]
    pub submission_samples: usize,
    #[arg(long, default_value_t = 256)]
    pub mix_batch_samples: u32,
    #[arg(long, default_value_t = 3)]
    pub base_epochs: u32,
    #[arg(long, default_value_t = 5)]
    pub fine_tune_epochs: u32,
    /// The worker's Adam step.
    #[arg(long, default_value_t = 0.002)]
    pub cloud_learning_rate: f32,
    #[arg(long, default_value_t = 64)]
    pub cloud_batch_size: usize,
    /// Epochs of a device's fit of `mu_u` per round.
    #[arg(long, default_value_t = 5)]
    pub fit_epochs: u32,
    /// The device's Adam step on `mu_u`.
    #[arg(long, default_value_t = 0.05)]
    pub fit_learning_rate: f32,
    #[arg(long, default_value_t = 32)]
    pub fit_batch_size: usize,
    #[arg(long, default_value_t = 50)]
    pub attacker_draws: usize,
    #[arg(long, env = "FEDHIVE_BACKEND", default_value = "flex")]
    pub backend: String,
    /// Server database (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Fashion-MNIST directory (IDX .gz files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Default for AnonOptions {
    fn default() -> Self {
        crate::clap_defaults("anon-embeddings")
    }
}

/// One arm of one seed.
#[derive(Debug, Clone, Serialize)]
pub struct ArmReport {
    pub arm: String,
    /// `None` for the `none` arm (no embedding at all).
    pub sigma: Option<f32>,
    /// Mean over users of the accuracy on their own held-out data.
    pub accuracy: f32,
    /// The attacker's share of fresh embeddings attributed to the right user (`None`: `none` arm,
    /// where every device sends the same `e = 0`; chance).
    pub attribution: Option<f32>,
    /// Mean device loss on its own data before and after its last fit of `mu_u` (model frozen).
    pub last_fit_loss_before: Option<f32>,
    pub last_fit_loss_after: Option<f32>,
    pub samples_submitted: usize,
    pub submissions: usize,
    pub model_version: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub seed: u64,
    pub arms: Vec<ArmReport>,
    pub seconds: f64,
}

/// Means over seeds, one per arm.
#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    pub arm: String,
    pub sigma: Option<f32>,
    pub accuracy: f32,
    pub attribution: Option<f32>,
    /// `(accuracy - none) / (static - none)`: the share of the identifier's gain recovered.
    pub gain_recovered: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct AnonReport {
    pub scenario: &'static str,
    pub arms: Vec<ArmSummary>,
    /// The sampled arm with the highest `gain_recovered - (attribution - chance) / (1 - chance)`:
    /// the share of the gain kept minus the attacker's share above chance.
    pub best_trade_off: Option<ArmSummary>,
    pub chance: f32,
    pub seeds: Vec<SeedReport>,
    pub users: usize,
    pub embedding_dim: usize,
    pub rounds: u32,
    pub backend: String,
    pub database: String,
}

/// One user's private data under their own labelling.
struct User {
    train: Examples,
    test: Examples,
}

/// Each user swaps the labels of one pair of classes of their own in all of their data.
fn users(
    train: &Dataset,
    test: &Dataset,
    options: &AnonOptions,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<User>> {
    let need = |per: usize, have: usize, what: &str| {
        anyhow::ensure!(
            per * options.users <= have,
            "{} users x {per} {what} images needs more than the {have} there are",
            options.users
        );
        Ok(())
    };
    need(options.train_per_user, train.len(), "training")?;
    need(options.test_per_user, test.len(), "held-out")?;
    let mut train_order: Vec<usize> = (0..train.len()).collect();
    let mut test_order: Vec<usize> = (0..test.len()).collect();
    train_order.shuffle(rng);
    test_order.shuffle(rng);
    let examples = |data: &Dataset, idx: &[usize], (a, b): (u32, u32)| {
        let mut inputs = Vec::with_capacity(idx.len() * IMAGE_PIXELS);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            inputs.extend_from_slice(data.image(i));
            let y = u32::from(data.labels[i]);
            labels.push(if y == a {
                b
            } else if y == b {
                a
            } else {
                y
            });
        }
        Examples {
            features: IMAGE_PIXELS,
            inputs,
            labels,
        }
    };
    Ok((0..options.users)
        .map(|u| {
            let a = rng.random_range(0..NUM_CLASSES as u32);
            let b = (a + rng.random_range(1..NUM_CLASSES as u32)) % NUM_CLASSES as u32;
            let tr = &train_order[u * options.train_per_user..(u + 1) * options.train_per_user];
            let te = &test_order[u * options.test_per_user..(u + 1) * options.test_per_user];
            User {
                train: examples(train, tr, (a, b)),
                test: examples(test, te, (a, b)),
            }
        })
        .collect())
}

pub async fn run_anon_embeddings(options: &AnonOptions, show_progress: bool) -> anyhow::Result<AnonReport> {
    anyhow::ensure!(!options.seeds.is_empty(), "--seeds is empty");
    anyhow::ensure!(options.users >= 2, "--users must be at least 2");
    anyhow::ensure!(
        options.rounds >= 2,
        "--rounds must be at least 2 (the base model, then fine-tunes)"
    );
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let train = load_fashion_mnist(&data_dir, Split::Train).context("loading Fashion-MNIST")?;
    let test = load_fashion_mnist(&data_dir, Split::Test)?;
    let backend: Backend = options.backend.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = backend.device().context("opening the training backend")?;

    let local =
        crate::LocalServer::start(options.database_url.clone(), 100, Duration::from_millis(50)).await?;
    let mut arms: Vec<(String, Option<f32>)> = vec![("none".into(), None), ("static".into(), Some(0.0))];
    arms.extend(options.sigmas.iter().map(|&s| (format!("sigma_{s}"), Some(s))));
    let mut seeds = Vec::new();
    for &seed in &options.seeds {
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let users = users(&train, &test, options, &mut rng)?;
        let mut reports = Vec::new();
        for (name, sigma) in &arms {
            let report = run_arm(
                &local,
                options,
                &device,
                &users,
                name,
                *sigma,
                seed,
                show_progress,
            )
            .await?;
            if show_progress {
                eprintln!(
                    "seed {seed} {name}: accuracy {:.4}, attribution {}",
                    report.accuracy,
                    report
                        .attribution
                        .map_or("chance".to_string(), |a| format!("{a:.4}"))
                );
            }
            reports.push(report);
        }
        seeds.push(SeedReport {
            seed,
            arms: reports,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let chance = 1.0 / options.users as f32;
    let summaries = summarise(&seeds, &arms);
    let score =
        |a: &ArmSummary| a.gain_recovered - (a.attribution.unwrap_or(chance) - chance) / (1.0 - chance);
    let best_trade_off = summaries
        .iter()
        .filter(|a| a.arm.starts_with("sigma_"))
        .max_by(|a, b| score(a).total_cmp(&score(b)))
        .cloned();
    Ok(AnonReport {
        scenario: "anon-embeddings",
        arms: summaries,
        best_trade_off,
        chance,
        seeds,
        users: options.users,
        embedding_dim: options.embedding_dim,
        rounds: options.rounds,
        backend: options.backend.clone(),
        database: local.database.clone(),
    })
}

fn summarise(seeds: &[SeedReport], arms: &[(String, Option<f32>)]) -> Vec<ArmSummary> {
    let mean = |f: &dyn Fn(&ArmReport) -> f32, arm: usize| {
        seeds.iter().map(|s| f(&s.arms[arm])).sum::<f32>() / seeds.len() as f32
    };
    let none = mean(&|a| a.accuracy, 0);
    let identified = mean(&|a| a.accuracy, 1);
    arms.iter()
        .enumerate()
        .map(|(i, (name, sigma))| {
            let accuracy = mean(&|a| a.accuracy, i);
            ArmSummary {
                arm: name.clone(),
                sigma: *sigma,
                accuracy,
                attribution: seeds[0].arms[i]
                    .attribution
                    .map(|_| mean(&|a| a.attribution.unwrap_or(0.0), i)),
                gain_recovered: (accuracy - none) / (identified - none),
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn run_arm(
    local: &crate::LocalServer,
    options: &AnonOptions,
    device: &burn::tensor::Device,
    users: &[User],
    name: &str,
    sigma: Option<f32>,
    seed: u64,
    show_progress: bool,
) -> anyhow::Result<ArmReport> {
    let shape = SampleShape {
        features: IMAGE_PIXELS,
        embedding_dim: options.embedding_dim,
        num_classes: NUM_CLASSES,
    };
    let config = TaskConfig {
        model: anon::MODEL_NAME.to_string(),
        tensors: anon::tensor_specs(shape),
        strategy: StrategyConfig::AnonEmbeddings {
            embedding_dim: shape.embedding_dim as u32,
            sigma: sigma.unwrap_or(0.0),
            input_features: shape.features as u32,
            num_classes: shape.num_classes as u32,
            max_samples_per_submission: options.submission_samples as u32,
            mix_batch_samples: options.mix_batch_samples,
            // The whole population submits at once here; a deployment sets its own budget.
            samples_per_second: 1.0e6,
            samples_burst: 1_000_000,
        },
        training: TrainingParams {
            local_epochs: options.fit_epochs,
            max_local_steps: 0,
            batch_size: options.fit_batch_size as u32,
            learning_rate: options.fit_learning_rate,
            learning_rate_schedule: None,
        },
        devices_per_round: 1,
        min_devices_per_round: 1,
        over_selection: 1.0,
        round_deadline_secs: 3600,
        rounds: options.rounds,
        require_enrolled_device: false,
        update_encoding: Default::default(),
    };
    let initial = anon::initial_weights(shape, seed);
    let client = &local.client;
    let created = client
        .create_task(&config, initial.encode())
        .await
        .context("creating the task")?;
    let state_dir = tempfile::tempdir()?;
    let fit = |epochs| FitParams {
        epochs,
        batch_size: options.cloud_batch_size,
        learning_rate: options.cloud_learning_rate,
    };
    let worker = AnonWorker {
        client: client.clone(),
        task_id: created.task_id.clone(),
        token: created
            .worker_token
            .clone()
            .context("the task came without a worker token")?,
        device: device.clone(),
        shape,
        state_dir: state_dir.path().to_path_buf(),
        options: AnonWorkerOptions {
            base: fit(options.base_epochs),
            fine_tune: fit(options.fine_tune_epochs),
            min_new_batches: 1,
            seed,
            poll: Duration::from_millis(50),
        },
    };
    let device_fit = FitParams {
        epochs: options.fit_epochs,
        batch_size: options.fit_batch_size,
        learning_rate: options.fit_learning_rate,
    };
    // Each device's private q_u, created at its first fit (none before round 2).
    let mut embeddings: Vec<Option<UserEmbedding>> = vec![None; users.len()];
    let mut rng = StdRng::seed_from_u64(seed ^ 0xa11);
    let (mut samples_submitted, mut submissions) = (0, 0);
    let mut last_fit = Vec::new();
    let progress = bar(show_progress, options.rounds as u64 + 1, name);
    for round in 1..=options.rounds {
        let model = current_model(client, &created.task_id).await?;
        if round > 1 && sigma.is_some() {
            last_fit = fit_all(
                &model,
                shape,
                &mut embeddings,
                users,
                device_fit,
                device,
                &mut rng,
                sigma,
            )?;
        }
        // Every device's data in requests of a few samples, the devices interleaved.
        let mut requests = Vec::new();
        for (u, user) in users.iter().enumerate() {
            let samples = anon::draw_samples(shape, embeddings[u].as_ref(), &user.train, &mut rng);
            let order: Vec<usize> = (0..samples.len()).collect();
            for chunk in order.chunks(options.submission_samples) {
                requests.push(samples.select(chunk));
            }
        }
        requests.shuffle(&mut rng);
        for body in &requests {
            client.submit_anonymous_samples(&created.task_id, body).await?;
            samples_submitted += body.len();
            submissions += 1;
        }
        loop {
            match worker.step().await? {
                AnonStep::Submitted { .. } => break,
                AnonStep::Finished => anyhow::bail!("the task finished before round {round}"),
                AnonStep::Waiting => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        wait_for_version(client, &created.task_id, i64::from(round)).await?;
        progress.inc(1);
    }
    // The devices fit q_u against the final model, then predict on-device with fresh draws.
    let model = current_model(client, &created.task_id).await?;
    if sigma.is_some() {
        last_fit = fit_all(
            &model,
            shape,
            &mut embeddings,
            users,
            device_fit,
            device,
            &mut rng,
            sigma,
        )?;
    }
    let mut accuracy = 0.0;
    for (u, user) in users.iter().enumerate() {
        let predicted = anon::predict(
            &model,
            shape,
            embeddings[u].as_ref(),
            &user.test.inputs,
            device,
            &mut rng,
        )?;
        let hits = predicted
            .iter()
            .zip(&user.test.labels)
            .filter(|(p, y)| p == y)
            .count();
        accuracy += hits as f32 / user.test.len() as f32;
    }
    progress.finish_and_clear();
    let status = client.task_status(&created.task_id).await?;
    let mean = |f: fn(&anon::FitReport) -> f32| {
        (!last_fit.is_empty()).then(|| last_fit.iter().map(f).sum::<f32>() / last_fit.len() as f32)
    };
    Ok(ArmReport {
        arm: name.to_string(),
        sigma,
        accuracy: accuracy / users.len() as f32,
        attribution: sigma.map(|_| attribution(&embeddings, options.attacker_draws, &mut rng)),
        last_fit_loss_before: mean(|r| r.loss_before),
        last_fit_loss_after: mean(|r| r.loss_after),
        samples_submitted,
        submissions,
        model_version: status.model_version,
    })
}

/// Every device fits its `mu_u` against `model` (creating `q_u` at its first fit).
#[allow(clippy::too_many_arguments)]
fn fit_all(
    model: &NamedTensors,
    shape: SampleShape,
    embeddings: &mut [Option<UserEmbedding>],
    users: &[User],
    params: FitParams,
    device: &burn::tensor::Device,
    rng: &mut StdRng,
    sigma: Option<f32>,
) -> anyhow::Result<Vec<anon::FitReport>> {
    let sigma = sigma.expect("only arms with an embedding fit one");
    users
        .iter()
        .zip(embeddings.iter_mut())
        .map(|(user, q)| {
            let q = q.get_or_insert_with(|| UserEmbedding::random(shape.embedding_dim, sigma, rng));
            Ok(anon::fit_embedding(
                model,
                shape,
                q,
                &user.train,
                params,
                device,
                rng.random(),
            )?)
        })
        .collect()
}

/// The attacker's share of fresh draws attributed to the user with the nearest mean.
fn attribution(embeddings: &[Option<UserEmbedding>], draws: usize, rng: &mut StdRng) -> f32 {
    let qs: Vec<&UserEmbedding> = embeddings.iter().map(|q| q.as_ref().expect("fitted")).collect();
    let mut right = 0usize;
    for (u, q) in qs.iter().enumerate() {
        for _ in 0..draws {
            let e = q.sample(rng);
            let distance =
                |v: &UserEmbedding| v.mu.iter().zip(&e).map(|(m, x)| (m - x) * (m - x)).sum::<f32>();
            let nearest = (0..qs.len())
                .min_by(|&a, &b| distance(qs[a]).total_cmp(&distance(qs[b])))
                .expect("users exist");
            right += usize::from(nearest == u);
        }
    }
    right as f32 / (qs.len() * draws) as f32
}

async fn current_model(
    client: &fedhive_client::client::FedhiveClient,
    task: &str,
) -> anyhow::Result<NamedTensors> {
    let (_, bytes) = client.download_model(task, None).await?;
    Ok(NamedTensors::decode(&bytes)?)
}

async fn wait_for_version(
    client: &fedhive_client::client::FedhiveClient,
    task: &str,
    version: i64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while client.task_status(task).await?.model_version < version {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "model version {version} was not committed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn bar(show: bool, len: u64, arm: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] round {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(arm.to_string());
    bar
}
