//! The synthetic task the harness runs: a model of a chosen size and the updates devices send.
//!
//! Update bodies are encoded once, up front, and shared (`Bytes` clones are reference counts):
//! 10,000 virtual devices must not hold 10,000 model-sized buffers in the load generator, or its
//! memory and CPU would distort what it measures.

use bytes::Bytes;
use fedhive_shared::{
    NamedTensors, Tensor, TensorSpec, int8,
    wire::{StrategyConfig, TaskConfig, TrainingParams, UpdateEncoding},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Specs of a model with `params` f32 parameters split over `tensors` tensors (`layer{i}.weight`,
/// the last one takes the remainder).
pub fn model_specs(params: usize, tensors: usize) -> Vec<TensorSpec> {
    let tensors = tensors.clamp(1, params.max(1));
    let each = params / tensors;
    (0..tensors)
        .map(|i| {
            let numel = if i + 1 == tensors {
                params - each * (tensors - 1)
            } else {
                each
            };
            TensorSpec {
                name: format!("layer{i}.weight"),
                shape: vec![numel],
            }
        })
        .collect()
}

/// What the harness asks the server to run.
pub struct TaskShape {
    pub specs: Vec<TensorSpec>,
    pub devices_per_round: u32,
    pub min_devices_per_round: u32,
    pub over_selection: f32,
    pub round_deadline_secs: u64,
    pub rounds: u32,
    pub update_encoding: UpdateEncoding,
}

pub fn task_config(shape: &TaskShape) -> TaskConfig {
    TaskConfig {
        model: "synthetic".into(),
        tensors: shape.specs.clone(),
        strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
        training: TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 32,
            learning_rate: 0.05,
            learning_rate_schedule: None,
        },
        devices_per_round: shape.devices_per_round,
        min_devices_per_round: shape.min_devices_per_round,
        over_selection: shape.over_selection,
        round_deadline_secs: shape.round_deadline_secs,
        require_enrolled_device: false,
        update_encoding: shape.update_encoding,
        rounds: shape.rounds,
    }
}

/// `variants` distinct update bodies (safetensors, f32 or int8), values uniform in ±0.01,
/// deterministic in `seed`.
pub fn update_bodies(
    specs: &[TensorSpec],
    variants: usize,
    seed: u64,
    encoding: UpdateEncoding,
) -> Vec<Bytes> {
    (0..variants.max(1))
        .map(|v| {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(v as u64));
            let tensors = specs
                .iter()
                .map(|s| {
                    let data = (0..s.numel()).map(|_| rng.random_range(-0.01f32..0.01)).collect();
                    let t = Tensor {
                        shape: s.shape.clone(),
                        data,
                    };
                    (s.name.clone(), t)
                })
                .collect();
            let delta = NamedTensors(tensors);
            Bytes::from(match encoding {
                UpdateEncoding::F32 => delta.encode(),
                UpdateEncoding::Int8 => int8::encode(&delta, || rng.random::<f32>()),
                UpdateEncoding::TopK { percent } => fedhive_shared::topk::encode(&delta, percent),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_cover_every_parameter() {
        let specs = model_specs(1_000_003, 4);
        assert_eq!(specs.len(), 4);
        assert_eq!(specs.iter().map(TensorSpec::numel).sum::<usize>(), 1_000_003);
        assert_eq!(specs[3].shape, vec![250_003]);
        assert_eq!(model_specs(3, 8).len(), 3);
    }

    #[test]
    fn update_bodies_decode_against_the_specs() {
        let specs = model_specs(1000, 3);
        let limit = fedhive_shared::fedavg::DELTA_LIMIT;
        let bodies = update_bodies(&specs, 2, 7, UpdateEncoding::F32);
        assert_ne!(bodies[0], bodies[1]);
        for body in &bodies {
            NamedTensors::decode_checked(body, &specs, limit).unwrap();
        }
        for body in update_bodies(&specs, 2, 7, UpdateEncoding::Int8) {
            int8::Int8Layout::check(&body, &specs, limit).unwrap();
        }
    }
}
