//! Every SPIR-V kernel the built-in models compile is valid SPIR-V, and the models train on it.
//!
//! cubecl-spirv 0.11.3 declared shared memory as a pointer-to-pointer on drivers without explicit
//! workgroup layout (lavapipe among them), which `spirv-val` rejects and lavapipe crashes on; the
//! workspace builds a fixed copy (patches/README.md). With `spirv-dump`, cubecl writes each kernel
//! it compiles to `$CUBECL_DEBUG_PLIRON/<kernel>/module.spv`; this test trains and evaluates the MLP
//! and the CNN on wgpu with the kernel cache on, then runs `spirv-val` (Debian `spirv-tools`) on
//! every module. It needs a Vulkan adapter (lavapipe is enough): a build with `vulkan` promises one.

#![cfg(feature = "spirv-dump")]

use std::path::{Path, PathBuf};
use std::process::Command;

use fedhive_client::backend::{Backend, enable_kernel_cache};
use fedhive_client::data::{Split, default_data_dir, load_fashion_mnist};
use fedhive_client::model::{ModelKind, initial_weights};
use fedhive_client::training::{evaluate, train_local};
use fedhive_shared::wire::TrainingParams;

/// Every `module.spv` under `dir`.
fn modules(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(modules(&path));
        } else if path.file_name().is_some_and(|n| n == "module.spv") {
            found.push(path);
        }
    }
    found
}

#[test]
fn model_kernels_are_valid_spirv_and_train() {
    let dump = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // This file holds one test, so nothing else in the process reads the environment meanwhile.
    unsafe { std::env::set_var("CUBECL_DEBUG_PLIRON", dump.path()) };
    enable_kernel_cache(cache.path()).unwrap();

    let device = Backend::Wgpu.device().unwrap_or_else(|e| {
        panic!("the vulkan feature needs a Vulkan adapter (mesa-vulkan-drivers for lavapipe): {e}")
    });
    let adapter = Backend::Wgpu.describe().unwrap();
    eprintln!("wgpu adapter: {adapter}");
    assert!(adapter.contains("Vulkan"), "not a Vulkan adapter: {adapter}");

    let data = load_fashion_mnist(&default_data_dir(), Split::Train)
        .unwrap_or_else(|e| panic!("Fashion-MNIST is required for this test: {e}"));
    let local = data.subset(&(0..256).collect::<Vec<_>>());
    let mut per_model = Vec::new();
    for kind in [ModelKind::Mlp, ModelKind::Cnn] {
        let global = initial_weights(kind, 0);
        let params = TrainingParams {
            local_epochs: 1,
            max_local_steps: 8,
            batch_size: 32,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        };
        let before = evaluate(kind, &device, &global, &local).unwrap();
        let update = train_local(kind, &device, &global, &local, &params, 0).unwrap();
        let after = evaluate(kind, &device, &global.add(&update.delta), &local).unwrap();
        eprintln!("{}: loss {:.3} -> {:.3}", kind.name(), before.loss, after.loss);
        assert!(
            after.loss < before.loss,
            "{}: loss {} -> {}",
            kind.name(),
            before.loss,
            after.loss
        );
        per_model.push((kind.name(), modules(dump.path()).len()));
    }
    eprintln!("SPIR-V modules compiled, cumulative after each model: {per_model:?}");
    let (_, mlp) = per_model[0];
    let (_, all) = per_model[1];
    assert!(mlp > 0, "the MLP compiled no SPIR-V kernel (WGSL fallback?)");
    assert!(all > mlp, "the CNN compiled no SPIR-V kernel of its own");

    let mut invalid = Vec::new();
    let mut with_shared_memory = 0;
    for module in modules(dump.path()) {
        let text = Command::new("spirv-dis")
            .arg(&module)
            .output()
            .unwrap_or_else(|e| panic!("running spirv-dis (apt-get install spirv-tools): {e}"));
        // The lowering the patch fixes: shared memory as a Workgroup variable.
        let text = String::from_utf8_lossy(&text.stdout);
        if text
            .lines()
            .any(|l| l.contains("OpVariable") && l.trim_end().ends_with(" Workgroup"))
        {
            with_shared_memory += 1;
        }
        let out = Command::new("spirv-val")
            .args(["--target-env", "vulkan1.3"])
            .arg(&module)
            .output()
            .unwrap_or_else(|e| panic!("running spirv-val (apt-get install spirv-tools): {e}"));
        if !out.status.success() {
            invalid.push(format!(
                "{}: {}",
                module.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    eprintln!("{with_shared_memory} of {all} kernels use shared memory");
    assert!(
        with_shared_memory > 0,
        "no kernel uses shared memory: the fixed lowering went untested"
    );
    assert!(
        invalid.is_empty(),
        "{} of {all} kernels are invalid SPIR-V:\n{}",
        invalid.len(),
        invalid.join("\n")
    );

    let cached: u64 = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        cached > 0,
        "the kernel cache directory is empty after compiling {all} kernels"
    );
}
