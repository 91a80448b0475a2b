//! The device's side of the server's strategies: what an assignment asks a device to train and to
//! upload. [`LocalWork::of`] is the one place the SDK reads a strategy off an assignment; each kind
//! of work is computed by its strategy's module ([`crate::training`], [`crate::block_cyclic`], and
//! [`fedhive_shared::fedlaavg`]). FedSubAvg's submodel rounds have their own loop
//! ([`crate::submodel_device`]): they download and upload rows, not a model.

use fedhive_shared::NamedTensors;
use fedhive_shared::wire::{Assignment, UpdateEncoding, UploadKind};

/// One round's local work.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalWork {
    /// FedAvg and MM-PSGD: train from `x`, upload `x_after - x_before`.
    Delta,
    /// FedLaAvg: train from `x` with step gamma, upload `G = (x_before - x_after) / gamma`. The
    /// server keeps `G_old` and applies `G_new - G_old` itself, so a device that lost its state
    /// cannot corrupt the running average.
    GradientSum,
    /// MC-PSGD: train `x` and the block's chain `y_m` (this `version`, step `chain_learning_rate`),
    /// upload both updates and both trained models' losses.
    Chains {
        block: String,
        version: i64,
        chain_learning_rate: f32,
    },
    /// DC-CCL: train the co-model `x` = `F_s` against the frozen control model `F_m` (this family
    /// and version), upload `x_after - x_before`.
    WithControl { model: String, version: i64 },
}

impl LocalWork {
    pub fn of(a: &Assignment) -> LocalWork {
        if let Some(block) = &a.block
            && let Some(version) = block.chain_version
        {
            return LocalWork::Chains {
                block: block.name.clone(),
                version,
                chain_learning_rate: block.chain_learning_rate.unwrap_or(a.training.learning_rate),
            };
        }
        if let Some(control) = &a.control {
            return LocalWork::WithControl {
                model: control.model.clone(),
                version: control.version,
            };
        }
        match a.upload {
            UploadKind::Delta => LocalWork::Delta,
            UploadKind::GradientSum => LocalWork::GradientSum,
        }
    }
}

/// An update's body in the task's encoding (int8: stochastic rounding, so its mean is the f32
/// update's).
pub fn encode_update(update: &NamedTensors, encoding: UpdateEncoding) -> Vec<u8> {
    match encoding {
        UpdateEncoding::F32 => update.encode(),
        UpdateEncoding::TopK { percent } => fedhive_shared::topk::encode(update, percent),
        UpdateEncoding::Int8 => {
            let mut rng = rand::rng();
            fedhive_shared::int8::encode(update, || rand::Rng::random::<f32>(&mut rng))
        }
    }
}

#[cfg(test)]
mod tests {
    use fedhive_shared::{
        blocks::BlockAssignment,
        wire::{TrainingParams, UploadKind},
    };

    use super::*;

    fn assignment(upload: UploadKind, block: Option<BlockAssignment>) -> Assignment {
        Assignment {
            task_id: "t".into(),
            round_id: 1,
            model_version: 0,
            model: "mlp".into(),
            training: TrainingParams {
                local_epochs: 1,
                max_local_steps: 0,
                batch_size: 8,
                learning_rate: 0.05,
                learning_rate_schedule: None,
            },
            upload_token: "x".into(),
            deadline_unix: 0,
            upload,
            encoding: Default::default(),
            block,
            control: None,
        }
    }

    fn block(chain_version: Option<i64>, chain_learning_rate: Option<f32>) -> BlockAssignment {
        BlockAssignment {
            name: "night".into(),
            index: 1,
            cycle: 0,
            round_in_block: 1,
            chain_version,
            chain_learning_rate,
        }
    }

    #[test]
    fn each_assignment_names_its_work() {
        assert_eq!(
            LocalWork::of(&assignment(UploadKind::Delta, None)),
            LocalWork::Delta
        );
        assert_eq!(
            LocalWork::of(&assignment(UploadKind::GradientSum, None)),
            LocalWork::GradientSum
        );
        // MM-PSGD: a block but no chain.
        assert_eq!(
            LocalWork::of(&assignment(UploadKind::Delta, Some(block(None, None)))),
            LocalWork::Delta
        );
        assert_eq!(
            LocalWork::of(&assignment(UploadKind::Delta, Some(block(Some(3), Some(0.1))))),
            LocalWork::Chains {
                block: "night".into(),
                version: 3,
                chain_learning_rate: 0.1
            }
        );
        // Without a chain step of its own, the chain trains at the devices' step.
        assert_eq!(
            LocalWork::of(&assignment(UploadKind::Delta, Some(block(Some(0), None)))),
            LocalWork::Chains {
                block: "night".into(),
                version: 0,
                chain_learning_rate: 0.05
            }
        );
        // DC-CCL: a control model to train beside.
        let mut dc = assignment(UploadKind::Delta, None);
        dc.control = Some(fedhive_shared::wire::ControlModelRef {
            model: "mlp_small".into(),
            version: 2,
        });
        assert_eq!(
            LocalWork::of(&dc),
            LocalWork::WithControl {
                model: "mlp_small".into(),
                version: 2
            }
        );
    }
}
