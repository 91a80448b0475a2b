//! Local training and evaluation on real Fashion-MNIST, on the flex CPU backend.

#![cfg(feature = "flex")]

use std::sync::OnceLock;
use std::time::Instant;

use burn::tensor::Device;
use fedhive_client::data::{Dataset, Split, default_data_dir, load_fashion_mnist};
use fedhive_client::model::{ModelKind, initial_weights};
use fedhive_client::partition;
use fedhive_client::training::{evaluate, train_local};
use fedhive_shared::NamedTensors;
use fedhive_shared::wire::TrainingParams;

fn split(split: Split) -> &'static Dataset {
    static TRAIN: OnceLock<Dataset> = OnceLock::new();
    static TEST: OnceLock<Dataset> = OnceLock::new();
    let cell = match split {
        Split::Train => &TRAIN,
        Split::Test => &TEST,
    };
    cell.get_or_init(|| {
        load_fashion_mnist(&default_data_dir(), split)
            .unwrap_or_else(|e| panic!("Fashion-MNIST is required for these tests: {e}"))
    })
}

fn assert_finite_and_nonzero(delta: &NamedTensors) {
    for (name, t) in &delta.0 {
        assert!(
            t.data.iter().all(|v| v.is_finite()),
            "{name} has non-finite values"
        );
    }
    let norm: f64 = delta
        .0
        .values()
        .flat_map(|t| &t.data)
        .map(|v| f64::from(*v).powi(2))
        .sum();
    assert!(norm > 1e-6, "delta is (nearly) zero: squared norm {norm}");
}

#[test]
fn splits_have_the_expected_sizes() {
    assert_eq!(split(Split::Train).len(), 60_000);
    assert_eq!(split(Split::Test).len(), 10_000);
    let pixels = &split(Split::Test).images;
    assert!(pixels.iter().all(|p| (0.0..=1.0).contains(p)));
}

#[test]
fn initial_weights_are_near_chance() {
    let device = Device::flex();
    for kind in [ModelKind::Mlp, ModelKind::Cnn] {
        let eval = evaluate(kind, &device, &initial_weights(kind, 0), split(Split::Test)).unwrap();
        assert!(
            (0.02..0.25).contains(&eval.accuracy),
            "{kind}: accuracy {}",
            eval.accuracy
        );
        assert!((eval.loss - 10f32.ln()).abs() < 0.5, "{kind}: loss {}", eval.loss);
    }
}

#[test]
fn mlp_learns_in_one_local_epoch() {
    let device = Device::flex();
    let train = split(Split::Train);
    let shard = &partition::iid(train.len(), 10, 1)[0];
    let local = train.subset(shard);
    assert_eq!(local.len(), 6_000);
    let global = initial_weights(ModelKind::Mlp, 0);
    let params = TrainingParams {
        local_epochs: 1,
        max_local_steps: 0,
        batch_size: 32,
        learning_rate: 0.2,
        learning_rate_schedule: None,
    };

    let start = Instant::now();
    let update = train_local(ModelKind::Mlp, &device, &global, &local, &params, 7).unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "flex MLP local epoch: {} samples in {secs:.2}s = {:.0} samples/s (batch 32)",
        local.len(),
        local.len() as f64 / secs
    );

    assert_eq!(update.num_samples, 6_000);
    assert!(
        update.loss.is_finite() && update.loss < 1.5,
        "train loss {}",
        update.loss
    );
    assert_finite_and_nonzero(&update.delta);
    assert_eq!(update.delta.specs(), global.specs());

    let eval = evaluate(
        ModelKind::Mlp,
        &device,
        &global.add(&update.delta),
        split(Split::Test),
    )
    .unwrap();
    eprintln!(
        "flex MLP after one local epoch: test accuracy {:.3}, loss {:.3}",
        eval.accuracy, eval.loss
    );
    assert!(
        eval.accuracy > 0.65,
        "test accuracy after one epoch: {}",
        eval.accuracy
    );

    // Same seed, same data: the local step is reproducible on the CPU.
    let again = train_local(ModelKind::Mlp, &device, &global, &local, &params, 7).unwrap();
    assert_eq!(again.delta, update.delta);
}

#[test]
fn cnn_loss_decreases_in_a_few_steps() {
    let device = Device::flex();
    let local = split(Split::Train).subset(&(0..640).collect::<Vec<_>>());
    let global = initial_weights(ModelKind::Cnn, 0);
    let params = TrainingParams {
        local_epochs: 5,
        max_local_steps: 40,
        batch_size: 32,
        learning_rate: 0.1,
        learning_rate_schedule: None,
    };
    let before = evaluate(ModelKind::Cnn, &device, &global, &local).unwrap();
    let update = train_local(ModelKind::Cnn, &device, &global, &local, &params, 3).unwrap();
    let after = evaluate(ModelKind::Cnn, &device, &global.add(&update.delta), &local).unwrap();
    assert_finite_and_nonzero(&update.delta);
    assert!(
        after.loss < before.loss - 0.1,
        "CNN loss on its training data: {} -> {}",
        before.loss,
        after.loss
    );
}

#[test]
fn max_local_steps_caps_training() {
    let device = Device::flex();
    let local = split(Split::Train).subset(&(0..256).collect::<Vec<_>>());
    let global = initial_weights(ModelKind::Mlp, 0);
    let run = |max_local_steps| {
        let params = TrainingParams {
            local_epochs: 3,
            max_local_steps,
            batch_size: 32,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        };
        train_local(ModelKind::Mlp, &device, &global, &local, &params, 1).unwrap()
    };
    // 8 steps per epoch: a cap of 8 is exactly the first epoch, 24 is all three.
    assert_eq!(run(8).delta, run(8).delta);
    assert_ne!(run(8).delta, run(0).delta);
    assert_eq!(run(24).delta, run(0).delta);
    assert!(run(8).loss.is_finite());
}

#[test]
fn bad_inputs_are_errors() {
    use fedhive_client::training::TrainError;
    let device = Device::flex();
    let global = initial_weights(ModelKind::Mlp, 0);
    let ok = TrainingParams {
        local_epochs: 1,
        max_local_steps: 0,
        batch_size: 32,
        learning_rate: 0.1,
        learning_rate_schedule: None,
    };
    let empty = Dataset::default();
    assert_eq!(
        train_local(ModelKind::Mlp, &device, &global, &empty, &ok, 0),
        Err(TrainError::EmptyDataset)
    );
    let local = split(Split::Test).subset(&[0, 1, 2]);
    let zero_batch = TrainingParams {
        batch_size: 0,
        ..ok.clone()
    };
    assert!(matches!(
        train_local(ModelKind::Mlp, &device, &global, &local, &zero_batch, 0),
        Err(TrainError::InvalidParams(_))
    ));
    let cnn_weights = initial_weights(ModelKind::Cnn, 0);
    assert!(matches!(
        train_local(ModelKind::Mlp, &device, &cnn_weights, &local, &ok, 0),
        Err(TrainError::Model(_))
    ));
}

#[test]
fn reported_loss_is_the_per_sample_mean() {
    // With a negligible step the weights stay put, so the epoch's mean training loss equals the
    // evaluation loss on the same data, even with a short last batch (250 = 7 * 32 + 26).
    let device = Device::flex();
    let local = split(Split::Train).subset(&(0..250).collect::<Vec<_>>());
    let global = initial_weights(ModelKind::Mlp, 0);
    let params = TrainingParams {
        local_epochs: 1,
        max_local_steps: 0,
        batch_size: 32,
        learning_rate: 1e-9,
        learning_rate_schedule: None,
    };
    let update = train_local(ModelKind::Mlp, &device, &global, &local, &params, 0).unwrap();
    let eval = evaluate(ModelKind::Mlp, &device, &global, &local).unwrap();
    assert!(
        (update.loss - eval.loss).abs() < 1e-4,
        "{} vs {}",
        update.loss,
        eval.loss
    );
}

#[test]
fn mc_reports_the_losses_of_the_trained_models() {
    use fedhive_client::block_cyclic::{McStart, train_mc};
    use fedhive_shared::blocks::{CHAIN_PREFIX, LOSS_CHAIN, LOSS_X, take_prefixed};

    let device = Device::flex();
    let local = split(Split::Train).subset(&(0..320).collect::<Vec<_>>());
    let x = initial_weights(ModelKind::Mlp, 1);
    let chain = initial_weights(ModelKind::Mlp, 2);
    let params = TrainingParams {
        local_epochs: 2,
        max_local_steps: 0,
        batch_size: 32,
        learning_rate: 0.1,
        learning_rate_schedule: None,
    };
    let start = McStart {
        x: &x,
        chain: &chain,
        chain_learning_rate: 0.05,
    };
    let mc = train_mc(ModelKind::Mlp, &device, start, &local, &params, 5).unwrap();

    let mut body = mc.body.clone();
    let loss_x = body.0.remove(LOSS_X).unwrap().data[0];
    let loss_chain = body.0.remove(LOSS_CHAIN).unwrap().data[0];
    let chain_delta = take_prefixed(&mut body, CHAIN_PREFIX);
    let trained_x = evaluate(ModelKind::Mlp, &device, &x.add(&body), &local).unwrap();
    let trained_chain = evaluate(ModelKind::Mlp, &device, &chain.add(&chain_delta), &local).unwrap();
    assert_eq!((loss_x, mc.loss_x), (trained_x.loss, trained_x.loss));
    assert_eq!(
        (loss_chain, mc.loss_chain),
        (trained_chain.loss, trained_chain.loss)
    );
    // The chain ran at its own step: not the x run's update applied to another start.
    let x_start = evaluate(ModelKind::Mlp, &device, &x, &local).unwrap().loss;
    assert!(loss_x < x_start - 0.1, "x: {x_start} -> {loss_x}");
    assert_ne!(chain_delta, body);
}
