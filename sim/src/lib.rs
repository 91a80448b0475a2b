//! fedhive simulations: a real server and simulated devices that really train (burn) on real data,
//! talking over HTTP on loopback.

pub mod availability;
pub mod availability_scenario;
pub mod bench_training;
pub mod block_cyclic;
pub mod demo;
pub mod hot_cold;

/// The values clap gives a command's options when none is passed, so a scenario's `Default` and its
/// command line cannot disagree.
pub(crate) fn clap_defaults<T: clap::Args>(command: &'static str) -> T {
    let matches = T::augment_args(clap::Command::new(command)).get_matches_from([command]);
    T::from_arg_matches(&matches).expect("every option has a default")
}
