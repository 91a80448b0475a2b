//! FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
//! Data", AISTATS 2017): `x += server_lr * sum_i (n_i / m) Delta_i` over the round's accepted updates,
//! in fixed point (see [`fedhive_shared::fedavg`]). Every default hook of [`Strategy`] is FedAvg's.

use bytes::Bytes;
use fedhive_shared::{
    FedAvgAccumulator, NamedTensors,
    wire::{StrategyConfig, TaskConfig, UpdateEncoding},
};

use super::interface::{CommitHold, Strategy, Sums, async_trait};
use crate::{
    db::{RoundRow, TaskRow},
    error::ApiError,
    store::{Store, model_key},
};

pub struct FedAvg;

/// Refuses a server learning rate that is not a positive number.
pub(crate) fn check_server_lr(lr: f32) -> Result<(), ApiError> {
    if lr.is_finite() && lr > 0.0 {
        return Ok(());
    }
    Err(ApiError::InvalidConfig(format!(
        "`strategy.server_lr` must be a positive number, got {lr}"
    )))
}

/// The FedAvg step on tensors: `base + server_lr * mean update` (blocking: run off the async threads).
pub(crate) fn step(base: &[u8], sums: &FedAvgAccumulator, server_lr: f32) -> Result<NamedTensors, ApiError> {
    let mut model = NamedTensors::decode(base)?;
    sums.apply(&mut model, server_lr);
    Ok(model)
}

#[async_trait]
impl Strategy for FedAvg {
    fn handles(&self, config: &StrategyConfig) -> bool {
        matches!(config, StrategyConfig::FedAvg { .. })
    }

    fn validate(&self, config: &TaskConfig) -> Result<(), ApiError> {
        let StrategyConfig::FedAvg { server_lr } = config.strategy else {
            unreachable!("the registry hands FedAvg its own tasks");
        };
        check_server_lr(server_lr)
    }

    fn update_encodings(&self) -> &'static [UpdateEncoding] {
        &[
            UpdateEncoding::F32,
            UpdateEncoding::Int8,
            UpdateEncoding::TopK { percent: 10 },
        ]
    }

    async fn commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        sums: Option<Sums>,
        new_version: i64,
    ) -> Result<CommitHold, ApiError> {
        let StrategyConfig::FedAvg { server_lr } = task.config.strategy else {
            unreachable!("the registry hands FedAvg its own tasks");
        };
        let Some(Sums::Dense(sums)) = sums else {
            unreachable!("FedAvg folds dense sums");
        };
        let (_, base) = store.model(&task.id, Some(round.base_version)).await?;
        let model = tokio::task::spawn_blocking(move || {
            Ok::<_, ApiError>(Bytes::from(step(&base, &sums, server_lr)?.encode()))
        })
        .await??;
        store.blobs.put(&model_key(&task.id, new_version), model).await?;
        Ok(None)
    }
}
