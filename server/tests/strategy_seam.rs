//! A strategy that is not fedhive's plugs into the round lifecycle through the registry alone: the
//! coordinator runs its check-ins, uploads, sums and commit without knowing it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fedhive_server::{
    Coordinator, CoordinatorOptions,
    blobs::BlobStore,
    db::{Db, RoundRow, TaskRow},
    error::ApiError,
    store::{HashedBody, Store, model_key},
    strategy::{
        Registry, Strategy, async_trait,
        interface::{CommitHold, Sums},
    },
};
use fedhive_shared::{
    NamedTensors, Tensor, TensorSpec,
    wire::{CheckinResponse, StrategyConfig, TaskConfig, TaskState, TrainingParams},
};

/// Takes FedAvg's tasks and keeps the model as it was, recording what each commit saw.
#[derive(Default)]
struct KeepModel {
    /// `(round seq, updates folded, samples folded)` per commit.
    commits: Mutex<Vec<(i64, u64, u64)>>,
}

#[async_trait]
impl Strategy for KeepModel {
    fn handles(&self, config: &StrategyConfig) -> bool {
        matches!(config, StrategyConfig::FedAvg { .. })
    }

    fn validate(&self, _config: &TaskConfig) -> Result<(), ApiError> {
        Ok(())
    }

    async fn commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        sums: Option<Sums>,
        new_version: i64,
    ) -> Result<CommitHold, ApiError> {
        let Some(Sums::Dense(sums)) = sums else {
            panic!("the default sums are dense FedAvg sums");
        };
        self.commits
            .lock()
            .unwrap()
            .push((round.seq, sums.updates(), sums.total_samples()));
        let (_, base) = store.model(&task.id, Some(round.base_version)).await?;
        store.blobs.put(&model_key(&task.id, new_version), base).await?;
        Ok(None)
    }
}

fn config() -> TaskConfig {
    TaskConfig {
        model: "test".into(),
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![2],
        }],
        strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
        training: TrainingParams {
            local_epochs: 1,
            max_local_steps: 0,
            batch_size: 8,
            learning_rate: 0.1,
            learning_rate_schedule: None,
        },
        devices_per_round: 2,
        min_devices_per_round: 2,
        over_selection: 1.0,
        round_deadline_secs: 60,
        require_enrolled_device: false,
        update_encoding: Default::default(),
        rounds: 2,
    }
}

fn weights(values: [f32; 2]) -> Bytes {
    let mut t = NamedTensors::default();
    t.0.insert(
        "w".into(),
        Tensor {
            shape: vec![2],
            data: values.to_vec(),
        },
    );
    Bytes::from(t.encode())
}

#[tokio::test]
async fn a_registered_strategy_runs_rounds_without_touching_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("db.sqlite").display());
    let db = Db::connect(&url).await.unwrap();
    let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
    let keep = Arc::new(KeepModel::default());
    let strategies = Registry::default().with(keep.clone());
    let coordinator = Coordinator::with_strategies(db, blobs, CoordinatorOptions::default(), strategies);

    let initial = weights([1.0, -2.0]);
    let task = coordinator
        .create_task(
            config(),
            initial.clone(),
            &fedhive_server::access::Principal::Admin,
        )
        .await
        .unwrap();
    for round in 1..=2 {
        let mut full = false;
        for samples in [3u64, 5] {
            let CheckinResponse::Assigned(a) = coordinator.checkin(&task.task_id, None).await.unwrap() else {
                panic!("round {round}: expected an assignment");
            };
            let delta = weights([0.5, 0.5]);
            let (_, now_full) = coordinator
                .upload(&a.upload_token, None, samples, HashedBody::of(delta))
                .await
                .unwrap();
            full = now_full;
        }
        assert!(full, "round {round}: K = 2 updates fill the round");
        let round_id = coordinator
            .status(&task.task_id)
            .await
            .unwrap()
            .current_round
            .unwrap()
            .round_id;
        coordinator.finalize_if_due(round_id).await.unwrap();
    }

    let status = coordinator.status(&task.task_id).await.unwrap();
    assert_eq!(status.state, TaskState::Finished);
    assert_eq!(status.model_version, 2);
    let (_, last) = coordinator.model(&task.task_id, None).await.unwrap();
    assert_eq!(
        last, initial,
        "FedAvg would have moved w by 0.5; the plugged-in strategy kept it"
    );
    assert_eq!(*keep.commits.lock().unwrap(), vec![(1, 2, 8), (2, 2, 8)]);
}

#[tokio::test]
async fn fedhive_strategies_stay_reachable_beside_a_plugged_in_one() {
    let strategies = Registry::default().with(Arc::new(KeepModel::default()));
    let mut block_cyclic = config();
    block_cyclic.strategy = serde_json::from_value(serde_json::json!({
        "name": "mm_psgd",
        "schedule": {"kind": "rounds", "blocks": [{"name": "day", "rounds": 1}, {"name": "night", "rounds": 1}]}
    }))
    .unwrap();
    let fedavg = strategies.for_config(&config()).unwrap();
    let mm = strategies.for_config(&block_cyclic).unwrap();
    let any: &dyn std::any::Any = fedavg.as_ref();
    assert!(
        any.is::<KeepModel>(),
        "the strategy registered last is asked first"
    );
    let any: &dyn std::any::Any = mm.as_ref();
    assert!(any.is::<fedhive_server::strategy::block_cyclic::BlockCyclic>());
}
