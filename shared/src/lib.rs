//! Wire types, tensor codecs and aggregation math shared by the fedhive server and device SDK.
//!
//! Architecture invariant: this crate knows nothing of HTTP, SQL or burn. It holds plain data types
//! ([`NamedTensors`], [`wire`]), the safetensors codec with the validation the server applies to
//! every upload ([`tensors`]), and the order-independent FedAvg accumulator ([`fedavg`]).

pub mod fedavg;
pub mod fedsubavg;
pub mod sparse;
pub mod tensors;
pub mod wire;

pub use fedavg::FedAvgAccumulator;
pub use tensors::{NamedTensors, Tensor, TensorError, TensorSpec};
