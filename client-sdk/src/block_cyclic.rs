//! The device's step of MC-PSGD (Ding et al., "Distributed Optimization over Block-Cyclic Data",
//! arXiv 2002.07454).
//!
//! In MC-PSGD a device in block `m` trains twice from the same data: from the block-mixed model `x`
//! and from the block's own chain `y_m`, and reports the loss of each *trained* local model on its
//! block data, which the server compares to pick the chain that feeds the block's predictor. The
//! predictor takes the winner's averaged update (`x_{t+1}` or `y_{m,t+1}`), so the losses must rank
//! the models after this round's step: the losses of the starting models did not. They picked `y_m`
//! at every block start, when `x` was still fitted to the previous block, although one round then
//! re-fits `x` to the block, and measured that way MC-PSGD fell 2.8 points behind MM-PSGD in the
//! block-cyclic scenario. Both locally trained models have seen the same data, so the in-sample bias
//! of the two losses is alike. MM-PSGD needs nothing beyond FedAvg's step
//! ([`crate::training::train_local`]) on the block's data.
//!
//! One upload carries everything (see [`fedhive_shared::blocks::mc_upload_specs`]): the update of
//! `x` under the model's tensor names, the update of `y_m` under `chain/<name>`, and the two losses as
//! `[1]` tensors, so they are part of the accepted upload and counted exactly once with it.

use burn::tensor::Device;
use fedhive_shared::{
    NamedTensors, Tensor,
    blocks::{CHAIN_PREFIX, LOSS_CHAIN, LOSS_X, put_prefixed},
    fedavg::DELTA_LIMIT,
    wire::TrainingParams,
};

use crate::{
    data::Dataset,
    model::ModelKind,
    training::{TrainError, evaluate, train_local},
};

/// What an MC-PSGD device uploads.
#[derive(Debug, Clone, PartialEq)]
pub struct McUpdate {
    /// Update of `x`, update of `y_m` (prefixed) and the two losses: the upload body.
    pub body: NamedTensors,
    pub num_samples: u64,
    /// Mean cross-entropy on the block data of the models trained from `x` and from `y_m`.
    pub loss_x: f32,
    pub loss_chain: f32,
    /// Mean training loss of the `x` run (for the metrics report).
    pub train_loss: f32,
}

/// The two starting points of an MC-PSGD round.
#[derive(Debug, Clone, Copy)]
pub struct McStart<'a> {
    /// The block-mixed model `x` (trained with `params.learning_rate`).
    pub x: &'a NamedTensors,
    /// The block's chain `y_m`, trained with `chain_learning_rate`.
    pub chain: &'a NamedTensors,
    pub chain_learning_rate: f32,
}

/// Trains from `start.x` and from `start.chain` on `data`, and measures both trained models' loss
/// there ([`mc_body`]).
pub fn train_mc(
    kind: ModelKind,
    device: &Device,
    start: McStart<'_>,
    data: &Dataset,
    params: &TrainingParams,
    seed: u64,
) -> Result<McUpdate, TrainError> {
    let McStart {
        x,
        chain,
        chain_learning_rate,
    } = start;
    let on_x = train_local(kind, device, x, data, params, seed)?;
    let chain_params = TrainingParams {
        learning_rate: chain_learning_rate,
        ..params.clone()
    };
    let on_chain = train_local(kind, device, chain, data, &chain_params, seed)?;
    let loss_x = evaluate(kind, device, &x.add(&on_x.delta), data)?.loss;
    let loss_chain = evaluate(kind, device, &chain.add(&on_chain.delta), data)?.loss;
    Ok(McUpdate {
        body: mc_body(on_x.delta, on_chain.delta, loss_x, loss_chain),
        num_samples: on_x.num_samples,
        loss_x,
        loss_chain,
        train_loss: on_x.loss,
    })
}

/// The upload body of an MC-PSGD round: the update of `x`, the update of `y_m` under
/// `chain/<name>`, and the two trained models' losses as `[1]` tensors. Losses above the upload's
/// value limit (a diverged model) are reported as that limit, which still ranks them last.
pub fn mc_body(
    delta_x: NamedTensors,
    delta_chain: NamedTensors,
    loss_x: f32,
    loss_chain: f32,
) -> NamedTensors {
    let mut body = delta_x;
    put_prefixed(&mut body, CHAIN_PREFIX, delta_chain);
    for (name, loss) in [(LOSS_X, loss_x), (LOSS_CHAIN, loss_chain)] {
        let reported = if loss.is_finite() {
            loss.min(DELTA_LIMIT)
        } else {
            DELTA_LIMIT
        };
        body.0.insert(
            name.to_string(),
            Tensor {
                shape: vec![1],
                data: vec![reported],
            },
        );
    }
    body
}
