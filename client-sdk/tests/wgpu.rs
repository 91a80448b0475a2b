//! Local training on the wgpu backend. Needs a wgpu adapter; a software Vulkan (Mesa lavapipe)
//! is enough. A missing adapter fails the test: a build with `--features wgpu` promises one.

#![cfg(feature = "wgpu")]

use std::time::Instant;

use fedhive_client::backend::Backend;
use fedhive_client::data::{Split, default_data_dir, load_fashion_mnist};
use fedhive_client::model::{ModelKind, initial_weights};
use fedhive_client::training::{evaluate, train_local};
use fedhive_shared::wire::TrainingParams;

#[test]
fn mlp_trains_on_wgpu() {
    let device = Backend::Wgpu.device().unwrap_or_else(|e| {
        panic!("the wgpu backend needs an adapter (install mesa-vulkan-drivers for lavapipe): {e}")
    });
    let adapter = Backend::Wgpu.describe().unwrap();
    eprintln!("wgpu adapter: {adapter}");

    let data = load_fashion_mnist(&default_data_dir(), Split::Train)
        .unwrap_or_else(|e| panic!("Fashion-MNIST is required for this test: {e}"));
    let local = data.subset(&(0..640).collect::<Vec<_>>());
    let global = initial_weights(ModelKind::Mlp, 0);
    let params = TrainingParams {
        local_epochs: 1,
        max_local_steps: 20,
        batch_size: 32,
        learning_rate: 0.1,
        learning_rate_schedule: None,
    };

    let before = evaluate(ModelKind::Mlp, &device, &global, &local).unwrap();
    // The CPU agrees with the GPU on the same weights (different kernels, same math).
    #[cfg(feature = "flex")]
    {
        let cpu = evaluate(ModelKind::Mlp, &burn::tensor::Device::flex(), &global, &local).unwrap();
        assert!(
            (cpu.loss - before.loss).abs() < 1e-3,
            "flex {} vs wgpu {}",
            cpu.loss,
            before.loss
        );
    }

    // Warm up kernel compilation so the timing below measures training.
    train_local(
        ModelKind::Mlp,
        &device,
        &global,
        &local,
        &TrainingParams {
            max_local_steps: 2,
            ..params.clone()
        },
        0,
    )
    .unwrap();
    let start = Instant::now();
    let update = train_local(ModelKind::Mlp, &device, &global, &local, &params, 0).unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "wgpu MLP: 20 steps of 32 in {secs:.2}s = {:.0} samples/s on {adapter}",
        640.0 / secs
    );

    assert_eq!(update.num_samples, 640);
    for (name, t) in &update.delta.0 {
        assert!(
            t.data.iter().all(|v| v.is_finite()),
            "{name} has non-finite values"
        );
    }
    assert!(
        update.delta.0.values().flat_map(|t| &t.data).any(|v| *v != 0.0),
        "delta is zero"
    );
    let after = evaluate(ModelKind::Mlp, &device, &global.add(&update.delta), &local).unwrap();
    assert!(
        after.loss < before.loss - 0.3,
        "loss on the training data: {} -> {}",
        before.loss,
        after.loss
    );
}
