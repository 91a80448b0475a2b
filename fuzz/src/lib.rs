//! What the fuzz targets share: one small model and a task of each strategy on it, so that the
//! upload decoders run with the checks a real task gives them.

use fedhive_server::strategy::Registry;
use fedhive_shared::{
    NamedTensors, Tensor,
    blocks::{BlockSchedule, RoundBlock},
    tensors::TensorSpec,
    wire::{StrategyConfig, TaskConfig, TrainingParams, UpdateEncoding},
};

/// `emb` [8, 4] (a FedSubAvg table in the sparse task), `w` [4, 3], `b` [3].
pub fn specs() -> Vec<TensorSpec> {
    [("emb", vec![8, 4]), ("w", vec![4, 3]), ("b", vec![3])]
        .map(|(name, shape)| TensorSpec {
            name: name.into(),
            shape,
        })
        .to_vec()
}

/// Small non-zero values of the given shapes: a model or an update a real device could send.
pub fn tensors(specs: &[TensorSpec]) -> NamedTensors {
    let mut out = NamedTensors::default();
    for spec in specs {
        let data = (0..spec.numel()).map(|i| (i as f32 - 3.0) * 0.01).collect();
        out.0.insert(
            spec.name.clone(),
            Tensor {
                shape: spec.shape.clone(),
                data,
            },
        );
    }
    out
}

fn task(strategy: StrategyConfig) -> TaskConfig {
    TaskConfig {
        model: "fuzz".into(),
        tensors: specs(),
        strategy,
        training: TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 8,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        },
        devices_per_round: 2,
        min_devices_per_round: 1,
        over_selection: 1.0,
        round_deadline_secs: 60,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds: 10,
    }
}

/// A task of each upload format: dense (FedAvg), sparse (FedSubAvg), model plus chain plus losses
/// (MC-PSGD), DC-CCL's co-model, and int8 (FedAvg); an int8 body is the seed corpus's last task's.
pub fn tasks() -> Vec<TaskConfig> {
    let schedule = BlockSchedule::Rounds {
        blocks: ["a", "b"]
            .map(|name| RoundBlock {
                name: name.into(),
                rounds: 1,
            })
            .to_vec(),
    };
    vec![
        task(StrategyConfig::FedAvg { server_lr: 1.0 }),
        task(StrategyConfig::FedSubAvg {
            server_lr: 1.0,
            form: Default::default(),
            tables: vec!["emb".into()],
        }),
        task(StrategyConfig::McPsgd {
            server_lr: 1.0,
            schedule,
            chain_learning_rate: None,
            predictor_average: Default::default(),
        }),
        task(StrategyConfig::DcCcl {
            cloud_weight: 0.5,
            without_cloud: Default::default(),
            control_model: "fuzz".into(),
            control_tensors: specs()[2..].to_vec(),
        }),
        TaskConfig {
            update_encoding: UpdateEncoding::Int8,
            ..task(StrategyConfig::FedAvg { server_lr: 1.0 })
        },
        TaskConfig {
            update_encoding: UpdateEncoding::TopK { percent: 10 },
            ..task(StrategyConfig::FedAvg { server_lr: 1.0 })
        },
    ]
}

/// The server's own strategies.
pub fn registry() -> Registry {
    Registry::default()
}
