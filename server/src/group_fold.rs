//! Group fold: accepted updates that wait for a round's sums together are folded in one pass over
//! them.
//!
//! Folding one 1M-parameter update reads and writes the round's 8 MB of fixed-point sums; a batch
//! of k updates does that once ([`fedhive_shared::FedAvgAccumulator::add_many`]), so the sums stay in
//! cache while the batch's values stream past. The pattern is [`crate::group_commit`]'s: the first
//! update to find no fold running starts one (on a blocking thread) for every update queued at that
//! moment, and updates arriving while it runs queue for the next; no timer, so a lone update waits
//! for nothing but its own fold.
//!
//! The sums are a cache (finalisation checks they hold exactly the accepted set, see
//! [`crate::coordinator`]): an update is folded at most once, by its token, and an upload is
//! answered once its fold is done, as before.

use std::{
    collections::{BTreeSet, HashMap, hash_map::Entry},
    sync::{Arc, Mutex},
};

use fedhive_shared::{fedavg::AggregateError, wire::TaskConfig};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;
use tracing::warn;

use crate::{
    db::UpdateRow,
    error::ApiError,
    strategy::{
        Strategy,
        interface::{Sums, Update},
    },
};

/// Updates folded in one pass at most: each may hold a decoded copy (int8, top-k) while it waits.
const MAX_BATCH: usize = 8;

/// Sums of one open round (for its task's strategy) and the tokens folded into them.
pub struct RoundAccumulator {
    pub acc: Sums,
    pub folded: BTreeSet<String>,
}

/// Every open round's sums in this process, by round id.
pub type Accumulators = Arc<Mutex<HashMap<i64, RoundAccumulator>>>;

/// An accepted update on its way into its round's sums.
pub struct ToFold {
    pub round_id: i64,
    /// Builds the round's sums if this is the first update folded (`None`: it keeps none).
    pub strategy: Arc<dyn Strategy>,
    pub config: TaskConfig,
    pub row: UpdateRow,
    pub update: Update,
}

type Reply = oneshot::Sender<Result<(), AggregateError>>;

/// The queue of updates waiting for their round's sums, shared by the uploads of one server.
#[derive(Clone)]
pub struct GroupFold {
    accumulators: Accumulators,
    queue: Arc<Mutex<Queue>>,
    /// Updates per pass (`fedhive_group_fold_updates`).
    batch_sizes: Histogram,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(ToFold, Reply)>,
    /// A fold is running; it takes `waiting` once its pass is done.
    folding: bool,
}

/// The fold task's hold on the queue: if the task panics outside a round's fold (those panics are
/// caught), fails the updates still queued (their uploads get an internal error; the round's
/// finaliser reads their updates from the blob store) and clears [`Queue::folding`] so that the
/// next update starts a new task.
struct Folding(Arc<Mutex<Queue>>);

impl Drop for Folding {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(mut queue) = self.0.lock()
        {
            queue.waiting.clear();
            queue.folding = false;
        }
    }
}

impl GroupFold {
    pub fn new(accumulators: Accumulators, batch_sizes: Histogram) -> Self {
        GroupFold {
            accumulators,
            queue: Arc::default(),
            batch_sizes,
        }
    }

    /// Folds `update` into its round's sums, together with whatever else is waiting, and returns
    /// once it is in (or refused: the round's sample limit).
    pub async fn fold(&self, update: ToFold) -> Result<(), ApiError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().expect("fold queue");
            queue.waiting.push((update, reply));
            !std::mem::replace(&mut queue.folding, true)
        };
        if start {
            let (folding, accumulators, batch_sizes) = (
                Folding(self.queue.clone()),
                self.accumulators.clone(),
                self.batch_sizes.clone(),
            );
            tokio::task::spawn_blocking(move || fold_while_waiting(&folding, &accumulators, &batch_sizes));
        }
        match answer.await {
            Ok(folded) => Ok(folded?),
            Err(_) => Err(ApiError::Internal("the fold of this update stopped".into())),
        }
    }
}

/// Folds batches until none is waiting.
fn fold_while_waiting(folding: &Folding, accumulators: &Accumulators, batch_sizes: &Histogram) {
    loop {
        let batch: Vec<(ToFold, Reply)> = {
            let mut queue = folding.0.lock().expect("fold queue");
            if queue.waiting.is_empty() {
                // Cleared under the lock that found the queue empty: an update queueing after it
                // starts the next task.
                queue.folding = false;
                return;
            }
            let n = queue.waiting.len().min(MAX_BATCH);
            queue.waiting.drain(..n).collect()
        };
        let mut all = accumulators.lock().expect("accumulator lock");
        let mut by_round: HashMap<i64, Vec<(ToFold, Reply)>> = HashMap::new();
        for waiting in batch {
            by_round.entry(waiting.0.round_id).or_default().push(waiting);
        }
        for (round_id, waiting) in by_round {
            let folded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                fold_round(&mut all, round_id, waiting, batch_sizes)
            }));
            if folded.is_err() {
                // The sums may hold part of an update: dropped, so that the finaliser reads the
                // round's updates from the blob store. The batch's uploads got an internal error
                // (their replies went with the panic); their rows stand.
                all.remove(&round_id);
                warn!(round = round_id, "a fold panicked; the round's sums are dropped");
            }
        }
    }
}

/// Folds one round's share of a batch into its sums and answers each update.
fn fold_round(
    all: &mut HashMap<i64, RoundAccumulator>,
    round_id: i64,
    waiting: Vec<(ToFold, Reply)>,
    batch_sizes: &Histogram,
) {
    let entry = match all.entry(round_id) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => match waiting[0].0.strategy.new_sums(&waiting[0].0.config) {
            Some(acc) => e.insert(RoundAccumulator {
                acc,
                folded: BTreeSet::new(),
            }),
            None => {
                for (_, reply) in waiting {
                    let _ = reply.send(Ok(()));
                }
                return;
            }
        },
    };
    // A token already folded (a replay that raced its first upload) is not folded again.
    let mut fresh = Vec::with_capacity(waiting.len());
    for (f, reply) in waiting {
        if entry.folded.insert(f.row.token_hash.clone()) {
            fresh.push((f, reply));
        } else {
            let _ = reply.send(Ok(()));
        }
    }
    if fresh.is_empty() {
        return;
    }
    let updates: Vec<(u64, &Update)> = fresh
        .iter()
        .map(|(f, _)| (f.row.num_samples as u64, &f.update))
        .collect();
    let results = entry.acc.add_many(&updates);
    batch_sizes.observe(updates.len() as f64);
    for ((f, reply), result) in fresh.into_iter().zip(results) {
        if result.is_err() {
            entry.folded.remove(&f.row.token_hash);
        }
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, future::Future};

    use fedhive_shared::{
        FedAvgAccumulator, NamedTensors, Tensor, TensorLayout,
        fedavg::DELTA_LIMIT,
        wire::{StrategyConfig, TrainingParams},
    };
    use prometheus_client::metrics::histogram::exponential_buckets;

    use super::*;
    use crate::strategy::fedavg::FedAvg;

    fn config() -> TaskConfig {
        TaskConfig {
            model: "m".into(),
            tensors: update(0).specs(),
            strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
            training: TrainingParams {
                local_epochs: 1,
                max_local_steps: 0,
                batch_size: 1,
                learning_rate: 0.1,
                learning_rate_schedule: None,
            },
            devices_per_round: 100,
            min_devices_per_round: 1,
            over_selection: 1.0,
            round_deadline_secs: 60,
            require_enrolled_device: false,
            update_encoding: Default::default(),
            rounds: 1,
        }
    }

    /// Two tensors, one longer than the fold's tile, with values that differ per update.
    fn update(k: usize) -> NamedTensors {
        let mut m = BTreeMap::new();
        for (name, n) in [("a", 5000), ("b", 7)] {
            let data = (0..n)
                .map(|i| ((i * 7919 + k * 104_729) % 2001) as f32 / 100.0 - 10.0)
                .collect();
            m.insert(name.to_string(), Tensor { shape: vec![n], data });
        }
        NamedTensors(m)
    }

    fn to_fold(round_id: i64, k: usize) -> ToFold {
        let body = bytes::Bytes::from(update(k).encode());
        let layout = TensorLayout::check(&body, &config().tensors, DELTA_LIMIT).expect("a valid body");
        ToFold {
            round_id,
            strategy: Arc::new(FedAvg),
            config: config(),
            row: UpdateRow {
                token_hash: format!("token-{k}"),
                round_id,
                num_samples: k as i64 + 1,
                sha256: String::new(),
                blob_key: String::new(),
                accepted_seq: k as i64 + 1,
                replica: None,
            },
            update: Update::Dense { body, layout },
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn updates_folded_together_sum_like_one_by_one_and_once_per_token() {
        let accumulators = Accumulators::default();
        let batch_sizes = Histogram::new(exponential_buckets(1.0, 2.0, 4));
        let folds = GroupFold::new(accumulators.clone(), batch_sizes.clone());
        // 40 updates at once into two rounds, then every token of round 1 again (a replay).
        let round_of = |k: usize| 1 + (k % 2) as i64;
        let mut uploads = tokio::task::JoinSet::new();
        for k in 0..40 {
            let folds = folds.clone();
            uploads.spawn(async move { folds.fold(to_fold(round_of(k), k)).await });
        }
        while let Some(folded) = uploads.join_next().await {
            folded.expect("no panic").expect("folded");
        }
        for k in (0..40).filter(|k| round_of(*k) == 1) {
            folds.fold(to_fold(1, k)).await.expect("a replay is answered");
        }

        let all = accumulators.lock().unwrap();
        for round_id in [1, 2] {
            let mut one_by_one = FedAvgAccumulator::new(&config().tensors);
            for k in (0..40).filter(|k| round_of(*k) == round_id) {
                one_by_one.add(k as u64 + 1, &update(k)).unwrap();
            }
            let Sums::Dense(acc) = &all[&round_id].acc else {
                panic!("dense sums")
            };
            assert_eq!(acc, &one_by_one, "round {round_id}");
            assert_eq!(all[&round_id].folded.len(), 20);
        }
        let (passes, updates) = histogram_count_and_sum(&batch_sizes);
        println!("40 updates at once: {passes} passes");
        assert_eq!(updates, 40.0, "each update folded in exactly one pass");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn updates_waiting_together_share_a_pass() {
        let accumulators = Accumulators::default();
        let batch_sizes = Histogram::new(exponential_buckets(1.0, 2.0, 4));
        let folds = GroupFold::new(accumulators.clone(), batch_sizes.clone());
        let mut waiting: Vec<_> = (0..MAX_BATCH)
            .map(|k| Box::pin(folds.fold(to_fold(1, k))))
            .collect();
        {
            // While the sums are busy, every update queues (its first poll queues it); the first
            // started a fold that waits for the sums with what it found queued.
            let _busy = accumulators.lock().unwrap();
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            for fold in &mut waiting {
                assert!(fold.as_mut().poll(&mut cx).is_pending());
            }
        }
        for fold in waiting {
            fold.await.expect("folded");
        }
        let (passes, updates) = histogram_count_and_sum(&batch_sizes);
        assert_eq!(updates, MAX_BATCH as f64);
        assert!(
            passes <= 2,
            "{MAX_BATCH} updates waiting together took {passes} passes"
        );
        assert_eq!(accumulators.lock().unwrap()[&1].folded.len(), MAX_BATCH);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fold_that_panics_fails_its_upload_drops_the_rounds_sums_and_folds_go_on() {
        let accumulators = Accumulators::default();
        let folds = GroupFold::new(
            accumulators.clone(),
            Histogram::new(exponential_buckets(1.0, 2.0, 4)),
        );
        folds.fold(to_fold(1, 0)).await.expect("folded");
        // An update whose body lacks tensor `b` (a broken invariant: the gate checks every body
        // against the task's tensors) panics in the middle of its fold.
        let mut broken = to_fold(1, 1);
        let body = bytes::Bytes::from(NamedTensors(update(1).0.into_iter().take(1).collect()).encode());
        let layout = TensorLayout::check(&body, &update(1).specs()[..1], DELTA_LIMIT).unwrap();
        broken.update = Update::Dense { body, layout };
        let failed = folds.fold(broken).await;
        assert!(matches!(failed, Err(ApiError::Internal(_))), "{failed:?}");
        assert!(
            !accumulators.lock().expect("not poisoned").contains_key(&1),
            "the round's sums, which may hold part of the update, are dropped"
        );
        folds.fold(to_fold(1, 2)).await.expect("folds go on");
        let all = accumulators.lock().unwrap();
        assert_eq!(all[&1].folded, BTreeSet::from(["token-2".to_string()]));
    }

    fn histogram_count_and_sum(h: &Histogram) -> (u64, f64) {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("folds", "", h.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name)).expect(name);
            line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
        };
        (value("folds_count ") as u64, value("folds_sum "))
    }
}
