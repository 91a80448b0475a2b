//! Wire types, tensor codecs and aggregation math shared by the fedhive server and device SDK.
//!
//! Architecture invariant: this crate knows nothing of HTTP, SQL or burn. It holds plain data types
//! ([`NamedTensors`], [`wire`]), the safetensors codec with the validation the server applies to
//! every upload ([`tensors`]), the order-independent FedAvg accumulator ([`fedavg`]) and FedLaAvg's running sum of
//! latest gradient sums ([`fedlaavg`]), and DC-CCL's device-cloud fusion ([`dc_ccl`]).

pub mod anon;
pub mod blocks;
pub mod dc_ccl;
pub mod fedavg;
pub mod fedlaavg;
pub mod fedsubavg;
pub mod int8;
pub mod sparse;
pub mod tensors;
pub mod topk;
pub mod wire;

pub use fedavg::FedAvgAccumulator;
pub use fedlaavg::LatestAverage;
pub use tensors::{NamedTensors, Tensor, TensorError, TensorLayout, TensorSpec};
