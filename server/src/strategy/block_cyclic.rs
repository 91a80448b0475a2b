//! MM-PSGD and MC-PSGD on the server (Ding et al., "Distributed Optimization over Block-Cyclic
//! Data", arXiv 2002.07454): the block schedule's position, the per-block predictors `p_m` with
//! their counts `r_m`, MC-PSGD's block-separate chains `y_m`, and serving the predictor of a block.
//!
//! Each committed round in block `m` (rule in `ALGORITHMS.md`):
//! 1. `x` takes the round's FedAvg step, exactly as in FedAvg (same fixed-point sums).
//! 2. MC only: the same sums carry each device's update of `y_m` (tensors `chain/<name>`) and its
//!    losses of `x` and `y_m` on its block data (`loss/x`, `loss/chain`), so `y_m` takes its FedAvg
//!    step and the losses' sample-weighted means come out of the accepted set, order-free.
//! 3. `u = x` (MM) or whichever of `x`, `y_m` has the lower mean loss (MC; a tie keeps `x`).
//! 4. `r_m += 1; p_m += (u - p_m) / r_m`, or under the task's `predictor_average` window
//!    ([`fedhive_shared::blocks::PredictorAverage`]): the same from a restart at cycle k (`tail`), or
//!    `p_m = b p_m + (1 - b) u` (`ema`). The window is a function of the stored rows (each names
//!    its cycle), so it needs no state of its own and resumes after a crash like the rest.
//!
//! Durability: a `block_rounds` row per committed round names the new `p_m` and `y_m` blobs (keyed
//! by round id, never overwritten) and the round's schedule position. It is written just before the
//! round's commit transaction from values that depend only on the frozen accepted set, and read only
//! once its round is committed; a crash in between re-runs finalisation, which computes the same
//! bytes. So the schedule position, `r_m`, `p_m` and `y_m` resume after a restart where they were.
//!
//! Schedule: round-count schedules advance per committed round (abandoned rounds do not count);
//! wall-clock schedules place a round by the time it opened. A round that is open when a block
//! boundary passes stays in the block it opened in: its devices were told that block and train on
//! its data, and its result feeds that block's predictor. The next round opens in the new block.

use bytes::Bytes;
use fedhive_shared::{
    FedAvgAccumulator, NamedTensors, Tensor, TensorSpec,
    blocks::{
        BlockAssignment, BlockInfo, BlockPosition, BlockRoundInfo, BlockSchedule, BlockStatus, CHAIN_PREFIX,
        ChainChoice, LOSS_CHAIN, LOSS_X, choose, mc_upload_specs, put_prefixed, take_prefixed,
    },
    wire::{StrategyConfig, TaskConfig, UploadKind},
};
use sqlx::{Row, any::AnyRow};

use super::{
    fedavg::check_server_lr,
    interface::{AssignmentParts, CommitHold, Strategy, Sums, async_trait},
};
use crate::{
    db::{RoundRow, TaskRow},
    error::ApiError,
    store::{Store, model_key, now_ms},
};

/// MM-PSGD and MC-PSGD (one strategy: MC-PSGD is MM-PSGD plus its chains).
pub struct BlockCyclic;

/// Tensors of one upload: the model's, plus the chain update and losses in MC-PSGD.
fn upload_specs(config: &TaskConfig) -> Vec<TensorSpec> {
    match config.strategy {
        StrategyConfig::McPsgd { .. } => mc_upload_specs(&config.tensors),
        _ => config.tensors.clone(),
    }
}

/// Block-cyclic parts of a task config.
fn validate(c: &TaskConfig) -> Result<(), ApiError> {
    check_server_lr(server_lr(c))?;
    let schedule = c.strategy.block_schedule().expect("a block-cyclic task");
    let bad = |msg: String| Err(ApiError::InvalidConfig(msg));
    if let Err(msg) = schedule.validate() {
        return bad(msg);
    }
    if let Err(msg) = c.strategy.predictor_average().unwrap_or_default().validate() {
        return bad(msg);
    }
    if let StrategyConfig::McPsgd {
        chain_learning_rate, ..
    } = c.strategy
    {
        if chain_learning_rate.is_some_and(|lr| !(lr.is_finite() && lr > 0.0)) {
            return bad(format!(
                "`strategy.chain_learning_rate` must be a positive number, got {chain_learning_rate:?}"
            ));
        }
        if let Some(t) = c
            .tensors
            .iter()
            .find(|t| t.name.starts_with(CHAIN_PREFIX) || t.name.starts_with("loss/"))
        {
            return bad(format!(
                "tensor `{}` uses a name MC-PSGD uploads reserve (`{CHAIN_PREFIX}*`, `loss/*`)",
                t.name
            ));
        }
    }
    Ok(())
}

fn server_lr(config: &TaskConfig) -> f32 {
    match config.strategy {
        StrategyConfig::MmPsgd { server_lr, .. } | StrategyConfig::McPsgd { server_lr, .. } => server_lr,
        _ => unreachable!("the registry hands BlockCyclic its own tasks"),
    }
}

/// One `block_rounds` row.
#[derive(Debug, Clone)]
struct BlockRow {
    round_id: i64,
    position: BlockPosition,
    block_name: String,
    block_rounds: i64,
    chosen: ChainChoice,
    mean_loss_x: Option<f64>,
    mean_loss_chain: Option<f64>,
    predictor_key: String,
    chain_key: Option<String>,
}

const BLOCK_COLUMNS: &str = "b.round_id, b.cycle, b.block_index, b.block_name, b.round_in_block, \
    b.block_rounds, b.chosen, b.mean_loss_x, b.mean_loss_chain, b.predictor_key, b.chain_key";

fn block_row(r: &AnyRow) -> Result<BlockRow, sqlx::Error> {
    let chosen: String = r.try_get("chosen")?;
    Ok(BlockRow {
        round_id: r.try_get("round_id")?,
        position: BlockPosition {
            cycle: r.try_get("cycle")?,
            block: r.try_get::<i64, _>("block_index")? as usize,
            round_in_block: r.try_get("round_in_block")?,
        },
        block_name: r.try_get("block_name")?,
        block_rounds: r.try_get("block_rounds")?,
        chosen: if chosen == "chain" {
            ChainChoice::Chain
        } else {
            ChainChoice::X
        },
        mean_loss_x: r.try_get("mean_loss_x")?,
        mean_loss_chain: r.try_get("mean_loss_chain")?,
        predictor_key: r.try_get("predictor_key")?,
        chain_key: r.try_get("chain_key")?,
    })
}

impl BlockRow {
    fn info(&self) -> BlockRoundInfo {
        BlockRoundInfo {
            round_id: self.round_id,
            block: self.block_name.clone(),
            cycle: self.position.cycle,
            round_in_block: self.position.round_in_block,
            block_rounds: self.block_rounds,
            chosen: self.chosen,
            mean_loss_x: self.mean_loss_x,
            mean_loss_chain: self.mean_loss_chain,
        }
    }
}

/// What the predictor endpoint serves.
pub struct ServedPredictor {
    pub block: String,
    /// `r_m`; 0 when the block has no committed round yet and the global model stands in.
    pub rounds: i64,
    /// ETag: the round that produced the predictor, or the global model's version when `rounds == 0`.
    pub etag: String,
    pub bytes: Bytes,
}

fn schedule_of(task: &TaskRow) -> Result<&BlockSchedule, ApiError> {
    task.config
        .strategy
        .block_schedule()
        .ok_or_else(|| ApiError::NotBlockCyclic(task.id.clone()))
}

fn predictor_key(task_id: &str, block: usize, round_id: i64) -> String {
    format!("blocks/{task_id}/{block}/predictor-{round_id}.safetensors")
}

fn chain_key(task_id: &str, block: usize, round_id: i64) -> String {
    format!("blocks/{task_id}/{block}/chain-{round_id}.safetensors")
}

impl BlockCyclic {
    /// The latest committed round of the task (of one block, if given) before round `before`.
    async fn last_block_row(
        &self,
        store: &Store,
        task_id: &str,
        block: Option<usize>,
        before: i64,
    ) -> Result<Option<BlockRow>, ApiError> {
        let filter = if block.is_some() {
            "AND b.block_index = $3"
        } else {
            ""
        };
        let query = format!(
            "SELECT {BLOCK_COLUMNS} FROM block_rounds b JOIN rounds r ON r.id = b.round_id \
             WHERE b.task_id = $1 AND r.state = 'committed' AND b.round_id < $2 {filter} \
             ORDER BY b.round_id DESC LIMIT 1"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(query)).bind(task_id).bind(before);
        if let Some(b) = block {
            q = q.bind(b as i64);
        }
        let row = q.fetch_optional(store.db.pool()).await?;
        Ok(row.as_ref().map(block_row).transpose()?)
    }

    async fn block_history(&self, store: &Store, task_id: &str) -> Result<Vec<BlockRow>, ApiError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {BLOCK_COLUMNS} FROM block_rounds b JOIN rounds r ON r.id = b.round_id \
             WHERE b.task_id = $1 AND r.state = 'committed' ORDER BY b.round_id"
        )))
        .bind(task_id)
        .fetch_all(store.db.pool())
        .await?;
        Ok(rows.iter().map(block_row).collect::<Result<_, _>>()?)
    }

    /// Absolute wall-clock cycle in which the task's first round opened (cycle 0 of the task).
    async fn first_cycle(
        &self,
        store: &Store,
        task_id: &str,
        schedule: &BlockSchedule,
    ) -> Result<i64, ApiError> {
        let row = sqlx::query("SELECT opened_ms FROM rounds WHERE task_id = $1 AND seq = 1")
            .bind(task_id)
            .fetch_one(store.db.pool())
            .await?;
        Ok(schedule.clock_slot(row.try_get("opened_ms")?).0)
    }

    /// Schedule position of a round opening at `opened_ms` after the committed rounds before `before`.
    async fn position_at(
        &self,
        store: &Store,
        task_id: &str,
        schedule: &BlockSchedule,
        opened_ms: i64,
        before: i64,
    ) -> Result<BlockPosition, ApiError> {
        let last = self
            .last_block_row(store, task_id, None, before)
            .await?
            .map(|r| r.position);
        Ok(match schedule {
            BlockSchedule::Rounds { .. } => schedule.next_by_rounds(last),
            BlockSchedule::WallClock { .. } => {
                let (absolute, block) = schedule.clock_slot(opened_ms);
                let cycle = absolute - self.first_cycle(store, task_id, schedule).await?;
                let round_in_block = match last {
                    Some(l) if l.cycle == cycle && l.block == block => l.round_in_block + 1,
                    _ => 1,
                };
                BlockPosition {
                    cycle,
                    block,
                    round_in_block,
                }
            }
        })
    }

    /// The block part of an assignment in `round`.
    async fn block_assignment(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
    ) -> Result<BlockAssignment, ApiError> {
        let schedule = schedule_of(task)?;
        let position = self
            .position_at(store, &task.id, schedule, round.opened_ms, round.id)
            .await?;
        let (chain_version, chain_learning_rate) = match task.config.strategy {
            StrategyConfig::McPsgd {
                chain_learning_rate, ..
            } => {
                let last = self
                    .last_block_row(store, &task.id, Some(position.block), round.id)
                    .await?;
                (
                    Some(last.map_or(0, |r| r.round_id)),
                    Some(
                        chain_learning_rate.unwrap_or(
                            task.config
                                .training
                                .for_round(round.base_version.max(0) as u64)
                                .learning_rate,
                        ),
                    ),
                )
            }
            _ => (None, None),
        };
        Ok(BlockAssignment {
            name: schedule.names()[position.block].to_string(),
            index: position.block as u32,
            cycle: position.cycle,
            round_in_block: position.round_in_block,
            chain_version,
            chain_learning_rate,
        })
    }

    /// Commits a block-cyclic round: `x`'s FedAvg step, MC's chain step and choice, the running
    /// mean into `p_m`, and the `block_rounds` row. Returns the new `x` for the caller to store as
    /// the next model version. Idempotent: a repeat after a crash computes and stores the same bytes.
    async fn commit_block_round(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        acc: FedAvgAccumulator,
        base: Bytes,
        server_lr: f32,
    ) -> Result<Bytes, ApiError> {
        let schedule = schedule_of(task)?;
        let position = self
            .position_at(store, &task.id, schedule, round.opened_ms, round.id)
            .await?;
        let previous = self
            .last_block_row(store, &task.id, Some(position.block), round.id)
            .await?;
        // The predictor's window may restart the block's average; the chain `y_m` goes on.
        let window = task
            .config
            .strategy
            .predictor_average()
            .expect("a block-cyclic task");
        let averaged = previous
            .as_ref()
            .filter(|p| !window.restarts(p.position.cycle, position.cycle));
        let r_m = averaged.map_or(0, |p| p.block_rounds) + 1;
        let previous_p = match averaged {
            Some(p) => Some(store.blobs.get(&p.predictor_key).await?),
            None => None,
        };
        let mc = matches!(task.config.strategy, StrategyConfig::McPsgd { .. });
        let chain_base = if mc {
            Some(match previous.as_ref().and_then(|p| p.chain_key.clone()) {
                Some(key) => store.blobs.get(&key).await?,
                None => store.blobs.get(&model_key(&task.id, 0)).await?,
            })
        } else {
            None
        };

        let computed = tokio::task::spawn_blocking(move || {
            let mut all = NamedTensors::decode(&base)?;
            if let Some(chain) = &chain_base {
                put_prefixed(&mut all, CHAIN_PREFIX, NamedTensors::decode(chain)?);
                for name in [LOSS_X, LOSS_CHAIN] {
                    let zero = Tensor {
                        shape: vec![1],
                        data: vec![0.0],
                    };
                    all.0.insert(name.to_string(), zero);
                }
            }
            acc.apply(&mut all, server_lr);
            let (choice, loss_x, loss_chain) = if mc {
                let mean = |name| acc.mean(name).map(|v| v[0]).unwrap_or(f64::NAN);
                let (lx, lc) = (mean(LOSS_X), mean(LOSS_CHAIN));
                all.0.remove(LOSS_X);
                all.0.remove(LOSS_CHAIN);
                (choose(lx, lc), Some(lx), Some(lc))
            } else {
                (ChainChoice::X, None, None)
            };
            let chain = mc.then(|| take_prefixed(&mut all, CHAIN_PREFIX));
            let x = all;
            let u = match (choice, &chain) {
                (ChainChoice::Chain, Some(y)) => y,
                _ => &x,
            };
            let p = match previous_p {
                Some(bytes) => {
                    let mut p = NamedTensors::decode(&bytes)?;
                    window.update(&mut p, u, r_m as u64);
                    p
                }
                None => u.clone(),
            };
            Ok::<_, ApiError>((
                Bytes::from(x.encode()),
                Bytes::from(p.encode()),
                chain.map(|y| Bytes::from(y.encode())),
                choice,
                loss_x,
                loss_chain,
            ))
        })
        .await??;
        let (x, p, chain, choice, loss_x, loss_chain) = computed;

        let p_key = predictor_key(&task.id, position.block, round.id);
        store.blobs.put(&p_key, p).await?;
        let y_key = match chain {
            Some(y) => {
                let key = chain_key(&task.id, position.block, round.id);
                store.blobs.put(&key, y).await?;
                Some(key)
            }
            None => None,
        };
        sqlx::query(
            "INSERT INTO block_rounds (round_id, task_id, cycle, block_index, block_name, round_in_block, \
             block_rounds, chosen, mean_loss_x, mean_loss_chain, predictor_key, chain_key, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (round_id) DO NOTHING",
        )
        .bind(round.id)
        .bind(&task.id)
        .bind(position.cycle)
        .bind(position.block as i64)
        .bind(schedule.names()[position.block])
        .bind(position.round_in_block)
        .bind(r_m)
        .bind(match choice {
            ChainChoice::X => "x",
            ChainChoice::Chain => "chain",
        })
        .bind(loss_x)
        .bind(loss_chain)
        .bind(&p_key)
        .bind(y_key.as_deref())
        .bind(now_ms())
        .execute(store.db.pool())
        .await?;
        tracing::info!(
            task = %task.id, round = round.id, block = schedule.names()[position.block],
            cycle = position.cycle, r_m, ?choice, ?loss_x, ?loss_chain, "block predictor updated"
        );
        Ok(x)
    }

    /// The block meant for now: by the clock for wall-clock schedules; else the open round's block,
    /// or between rounds and after the last round, the block the next round would be in.
    async fn current_block(
        &self,
        store: &Store,
        task: &TaskRow,
    ) -> Result<(usize, Option<BlockPosition>), ApiError> {
        let schedule = schedule_of(task)?;
        let active = store.db.active_round(&task.id).await?;
        let round_position = match &active {
            Some(r) => Some(
                self.position_at(store, &task.id, schedule, r.opened_ms, r.id)
                    .await?,
            ),
            None => None,
        };
        let block = match (schedule, round_position) {
            (BlockSchedule::WallClock { .. }, _) => schedule.clock_slot(now_ms()).1,
            (_, Some(p)) => p.block,
            (_, None) => {
                self.position_at(store, &task.id, schedule, now_ms(), i64::MAX)
                    .await?
                    .block
            }
        };
        Ok((block, round_position))
    }

    /// The predictor `p_m` of `block` (the current block when `None`) as safetensors. A block with
    /// no committed round yet has no predictor: the current global model stands in (`rounds == 0`).
    pub async fn predictor(
        &self,
        store: &Store,
        task_id: &str,
        block: Option<&str>,
    ) -> Result<ServedPredictor, ApiError> {
        let task = store.task(task_id).await?;
        let schedule = schedule_of(&task)?;
        let index = match block {
            Some(name) => schedule.index_of(name).ok_or_else(|| ApiError::UnknownBlock {
                task: task_id.to_string(),
                block: name.to_string(),
            })?,
            None => self.current_block(store, &task).await?.0,
        };
        let name = schedule.names()[index].to_string();
        match self.last_block_row(store, task_id, Some(index), i64::MAX).await? {
            Some(row) => Ok(ServedPredictor {
                block: name,
                rounds: row.block_rounds,
                etag: format!("p{}", row.round_id),
                bytes: store.blobs.get(&row.predictor_key).await?,
            }),
            None => {
                let (version, bytes) = store.model(task_id, None).await?;
                Ok(ServedPredictor {
                    block: name,
                    rounds: 0,
                    etag: format!("x{version}"),
                    bytes,
                })
            }
        }
    }

    /// MC-PSGD: version `version` of block `block`'s chain `y_m` (0 = the initial model).
    pub async fn chain(
        &self,
        store: &Store,
        task_id: &str,
        block: &str,
        version: i64,
    ) -> Result<Bytes, ApiError> {
        let task = store.task(task_id).await?;
        let schedule = schedule_of(&task)?;
        let index = schedule.index_of(block).ok_or_else(|| ApiError::UnknownBlock {
            task: task_id.to_string(),
            block: block.to_string(),
        })?;
        let unknown = || ApiError::UnknownChainVersion {
            block: block.to_string(),
            version,
        };
        if !matches!(task.config.strategy, StrategyConfig::McPsgd { .. }) {
            return Err(unknown());
        }
        if version == 0 {
            return Ok(store.blobs.get(&model_key(task_id, 0)).await?);
        }
        let row = self
            .last_block_row(store, task_id, Some(index), version + 1)
            .await?
            .filter(|r| r.round_id == version)
            .ok_or_else(unknown)?;
        let key = row.chain_key.ok_or_else(unknown)?;
        Ok(store.blobs.get(&key).await?)
    }

    /// Schedule position, every block's `r_m` and chain version, and every committed round.
    pub async fn block_status(&self, store: &Store, task_id: &str) -> Result<BlockStatus, ApiError> {
        let task = store.task(task_id).await?;
        let schedule = schedule_of(&task)?;
        let (current, round_position) = self.current_block(store, &task).await?;
        let history = self.block_history(store, task_id).await?;
        let mc = matches!(task.config.strategy, StrategyConfig::McPsgd { .. });
        let blocks = schedule
            .names()
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let last = history.iter().rev().find(|r| r.position.block == i);
                BlockInfo {
                    name: name.to_string(),
                    rounds: last.map_or(0, |r| r.block_rounds),
                    last_round_id: last.map(|r| r.round_id),
                    chain_version: mc.then(|| last.map_or(0, |r| r.round_id)),
                }
            })
            .collect();
        Ok(BlockStatus {
            current: schedule.names()[current].to_string(),
            round_position,
            blocks,
            history: history.iter().map(BlockRow::info).collect(),
        })
    }
}

#[async_trait]
impl Strategy for BlockCyclic {
    fn handles(&self, config: &StrategyConfig) -> bool {
        config.block_schedule().is_some()
    }

    fn validate(&self, config: &TaskConfig) -> Result<(), ApiError> {
        validate(config)
    }

    async fn assignment_parts(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
    ) -> Result<AssignmentParts, ApiError> {
        Ok(AssignmentParts {
            upload: UploadKind::Delta,
            block: Some(self.block_assignment(store, task, round).await?),
            control: None,
        })
    }

    fn upload_specs(&self, config: &TaskConfig) -> Vec<TensorSpec> {
        upload_specs(config)
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
            unreachable!("block-cyclic rounds fold dense sums");
        };
        let (_, base) = store.model(&task.id, Some(round.base_version)).await?;
        let x = self
            .commit_block_round(store, task, round, sums, base, server_lr(&task.config))
            .await?;
        store.blobs.put(&model_key(&task.id, new_version), x).await?;
        Ok(None)
    }
}
