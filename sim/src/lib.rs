//! fedhive simulations: a real server and simulated devices that really train (burn) on real data,
//! talking over HTTP on loopback.

pub mod availability;
pub mod availability_scenario;
pub mod bench_training;
pub mod block_cyclic;
pub mod demo;
pub mod hot_cold;
