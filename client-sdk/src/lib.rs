//! fedhive device SDK: what a device runs in a federated-learning round.
//!
//! - [`data`]: Fashion-MNIST loading; [`partition`]: IID and label-skewed splits across
//!   simulated devices.
//! - [`model`]: the burn models and their exchange with the wire format ([`fedhive_shared::NamedTensors`]).
//! - [`federated`]: bring your own model: the traits an app's burn module and data implement.
//! - [`session`]: one round at a time for an app's scheduler (check in, train, upload), with
//!   cancellation, progress and limits; [`state`]: the device's persistent directory (atomic writes).
//! - [`submodel`]: FedSubAvg's rows exchange for any model with a row-indexed table.
//! - [`training`]: FedAvg's local SGD step ([`training::train_local`]) and evaluation.
//! - [`local_work`]: what an assignment asks of the device, by strategy; [`device`]: the loop.
//! - [`block_cyclic`]: MC-PSGD's device step (train `x` and the block's chain `y_m`).
//! - [`dc_ccl`]: DC-CCL's steps: the co-model against a frozen control model, distillation, and
//!   predictions of summed models.
//! - [`ctr`] and [`submodel_device`]: a CTR model with a sparse table trained on a device's submodel
//!   (FedSubAvg).
//! - [`backend`]: run-time choice of the compute device (`flex` CPU or `wgpu`).

pub mod anon;
pub mod backend;
pub mod block_cyclic;
pub mod client;
pub mod ctr;
pub mod data;
pub mod dc_ccl;
pub mod device;
pub mod federated;
pub mod local_work;
pub mod model;
pub mod partition;
pub mod session;
pub mod state;
pub mod submodel;
pub mod submodel_device;
pub mod training;
