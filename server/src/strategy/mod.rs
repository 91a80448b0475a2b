//! The aggregation algorithms, one module each, behind the [`Strategy`] seam (see [`interface`]).
//!
//! - [`fedavg`]: FedAvg (every default hook).
//! - [`fedsubavg`]: FedSubAvg's sparse submodels, heat and table journals.
//! - [`fedlaavg`]: FedLaAvg's enrolment, selection window and latest-gradient average.
//! - [`block_cyclic`]: MM-PSGD and MC-PSGD's block schedule, predictors and chains.
//! - [`dc_ccl`]: DC-CCL's device-cloud fusion, its cloud worker's contributions and control models.
//! - [`anon_embeddings`]: anonymous samples with user embeddings, mixed for the cloud worker, whose
//!   model each round commits.
//! - [`worker`]: the cloud worker's token, for the strategies that have one.
//!
//! A task's strategy is found in the [`Registry`] by its config; the coordinator calls only the
//! trait. Adding an algorithm: ARCHITECTURE.md, "Adding a strategy".

pub mod anon_embeddings;
pub mod block_cyclic;
pub mod dc_ccl;
pub mod fedavg;
pub mod fedlaavg;
pub mod fedsubavg;
pub mod interface;
pub mod worker;

use std::sync::Arc;

use fedhive_shared::wire::TaskConfig;

pub use interface::{Strategy, async_trait};

use crate::error::ApiError;

/// The strategies a server runs, asked in order which one handles a task's config.
#[derive(Clone)]
pub struct Registry {
    strategies: Vec<Arc<dyn Strategy>>,
}

impl Default for Registry {
    /// fedhive's own strategies.
    fn default() -> Self {
        Registry {
            strategies: vec![
                Arc::new(fedavg::FedAvg),
                Arc::new(fedsubavg::FedSubAvg::default()),
                Arc::new(fedlaavg::FedLaAvg),
                Arc::new(block_cyclic::BlockCyclic),
                Arc::new(dc_ccl::DcCcl),
                Arc::new(anon_embeddings::AnonEmbeddings::default()),
            ],
        }
    }
}

impl Registry {
    /// Adds a strategy that is asked before the ones already registered.
    pub fn with(mut self, strategy: Arc<dyn Strategy>) -> Self {
        self.strategies.insert(0, strategy);
        self
    }

    /// The strategy that runs tasks with this config.
    pub fn for_config(&self, config: &TaskConfig) -> Result<Arc<dyn Strategy>, ApiError> {
        self.strategies
            .iter()
            .find(|s| s.handles(&config.strategy))
            .cloned()
            .ok_or_else(|| {
                ApiError::InvalidConfig(format!(
                    "no strategy of this server runs `strategy` {:?}",
                    config.strategy
                ))
            })
    }

    /// The registered strategy of type `S`, for its own routes (FedSubAvg's submodels, ...).
    pub fn get<S: Strategy>(&self) -> Option<&S> {
        self.strategies.iter().find_map(|s| {
            let any: &dyn std::any::Any = s.as_ref();
            any.downcast_ref::<S>()
        })
    }
}
