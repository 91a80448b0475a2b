//! FedSubAvg on the server (Ding et al., "Federated Submodel Optimization for Hot and Cold Data
//! Features", NeurIPS 2022; rule in `ALGORITHMS.md` and [`fedhive_shared::fedsubavg`]).
//!
//! - Submodels: each replica keeps the task's sparse tables row-addressable in a
//!   [`crate::tables::TableStore`], brought up to the committed version from the table history in
//!   the blob store ([`history`]: snapshots and journals); the dense tensors are the task's model
//!   blob as for FedAvg. `POST /v1/tasks/{id}/submodel` returns the dense tensors and the rows a
//!   device asks for, from whichever replica it reaches.
//! - Heat: a device enrols its feature set `R_i` and sample count (`PUT .../devices/{id}/features`);
//!   the enrolment transaction adds or removes it once per row it gains or drops (`sparse_heat`) and
//!   keeps `N` (`sparse_population`). Enrolling the same set again changes nothing.
//! - Rounds: uploads carry the sparse update format of [`fedhive_shared::sparse`]; the round's sums
//!   are a [`SubAvgAccumulator`] (memory O(rows touched), not O(table)).
//! - Commit without copying a table: finalisation computes the touched rows' new absolute values
//!   and writes them as a journal blob before the commit transaction; after the commit the
//!   finaliser writes them into its files in place, and every other replica does the same before it
//!   next reads rows. A journal of a version that never committed is ignored and rewritten,
//!   identically, when the round is finalised again (by any replica).
//! - Heat is frozen while a round is being finalised: an enrolment's transaction takes the round's
//!   row and is refused with `409 round_closing` once the round is `closing` (on this replica it
//!   first waits for a finalisation in progress), so re-running a finalisation gives the same bits.

mod heat;
mod history;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use fedhive_shared::{
    NamedTensors,
    fedavg::{DELTA_LIMIT, check_sample_count},
    fedsubavg::{Heat, SubAvgAccumulator, SubAvgForm},
    sparse::{
        Enrolment, FeatureSet, HeatReport, MAX_ROWS_PER_UPDATE, RowsRequest, SparseError, SparseTensors,
        TableShape, check_ids, split_specs,
    },
    tensors::TensorSpec,
    wire::{StrategyConfig, TaskConfig},
};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tracing::{info, warn};

use super::{
    fedavg::check_server_lr,
    interface::{CommitHold, Strategy, Sums, Update, async_trait},
};
use crate::{
    db::{RoundRow, TaskRow},
    error::ApiError,
    store::{Store, model_key, now_ms},
};
use heat::{Enrolled, enrol_device, read_heat, read_population};
use history::{History, journal_key};

/// A FedSubAvg task's model: its dense tensors and its tables.
#[derive(Debug, Clone)]
pub struct SparseModel {
    pub form: SubAvgForm,
    pub server_lr: f32,
    pub dense: Vec<TensorSpec>,
    pub tables: BTreeMap<String, TableShape>,
}

/// The task's sparse model, or `None` for a dense strategy.
fn sparse_model(config: &TaskConfig) -> Option<SparseModel> {
    match &config.strategy {
        StrategyConfig::FedSubAvg {
            server_lr,
            form,
            tables,
        } => {
            let (dense, tables) = split_specs(&config.tensors, tables);
            Some(SparseModel {
                form: *form,
                server_lr: *server_lr,
                dense,
                tables,
            })
        }
        _ => None,
    }
}

/// Checks the `tables` of a FedSubAvg config: listed once, each a 2-D tensor of the model.
fn validate(config: &TaskConfig) -> Result<(), ApiError> {
    let StrategyConfig::FedSubAvg {
        tables, server_lr, ..
    } = &config.strategy
    else {
        unreachable!("the registry hands FedSubAvg its own tasks");
    };
    let bad = |msg: String| Err(ApiError::InvalidConfig(msg));
    if tables.is_empty() {
        return bad("`strategy.tables` is empty; FedSubAvg needs at least one sparse table".into());
    }
    let mut seen = HashSet::new();
    for t in tables {
        if !seen.insert(t) {
            return bad(format!("`strategy.tables` lists `{t}` twice"));
        }
        match config.tensors.iter().find(|s| &s.name == t) {
            None => {
                return bad(format!(
                    "`strategy.tables` names `{t}`, which is not in `tensors`"
                ));
            }
            Some(s) if s.shape.len() != 2 => {
                return bad(format!(
                    "table `{t}` has shape {:?}; a sparse table must be 2-D [rows, width]",
                    s.shape
                ));
            }
            Some(_) if t.contains(fedhive_shared::sparse::PART_SEPARATOR) => {
                return bad(format!("table name `{t}` must not contain `:`"));
            }
            Some(_) => {}
        }
    }
    check_server_lr(*server_lr)
}

/// Checks a new task's initial weights: every tensor of the config with its shape, finite. A
/// FedSubAvg task may leave out a table, which then starts as zeros (a 10M-row table need not
/// travel in the request).
fn check_initial_model(config: &TaskConfig, bytes: &[u8]) -> Result<(), ApiError> {
    let model = sparse_model(config).expect("a FedSubAvg task");
    let weights = NamedTensors::decode(bytes)?;
    let present: Vec<TensorSpec> = config
        .tensors
        .iter()
        .filter(|s| !model.tables.contains_key(&s.name) || weights.0.contains_key(&s.name))
        .cloned()
        .collect();
    weights.check(&present, f32::MAX)?;
    Ok(())
}

/// Largest sparse upload body: dense values, plus at most `MAX_ROWS_PER_UPDATE` rows (ids and values)
/// per table, plus room for the header.
fn upload_limit(model: &SparseModel) -> usize {
    let dense: usize = model.dense.iter().map(TensorSpec::numel).sum();
    let rows: usize = model
        .tables
        .values()
        .map(|t| (t.rows as usize).min(MAX_ROWS_PER_UPDATE) * (t.width * 4 + 8))
        .sum();
    dense * 4 + rows + 64 * 1024 + (model.dense.len() + 2 * model.tables.len()) * 256
}

/// FedSubAvg, with this replica's hold on its copy of each task's tables.
#[derive(Default)]
pub struct FedSubAvg {
    local: Mutex<HashMap<String, LocalTables>>,
}

/// The task's table history in the store's blobs, seen from this replica's copy.
fn history<'a>(store: &'a Store, task_id: &'a str, model: &'a SparseModel) -> History<'a> {
    History {
        blobs: &store.blobs,
        tables: &store.tables,
        task_id,
        model,
    }
}

/// Orders this replica's reads of a task's table files (shared) against bringing them to a new
/// version (exclusive); it holds the version the files hold, `None` until known.
type LocalTables = Arc<RwLock<Option<i64>>>;

/// A device id: 1 to 128 characters of `[A-Za-z0-9._-]`.
fn check_device_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(format!(
            "device id `{id}` must be 1 to 128 characters of A-Z, a-z, 0-9, `.`, `_`, `-`"
        )))
    }
}

/// Checks a `{table: [ids]}` map against the model: known tables, ids inside, no duplicates.
/// Returns it with every table present and ids ascending.
fn checked_rows(
    model: &SparseModel,
    rows: &BTreeMap<String, Vec<u64>>,
) -> Result<BTreeMap<String, Vec<u64>>, ApiError> {
    if let Some(unknown) = rows.keys().find(|t| !model.tables.contains_key(*t)) {
        return Err(ApiError::InvalidRequest(format!(
            "`{unknown}` is not a sparse table of this task (tables: {:?})",
            model.tables.keys().collect::<Vec<_>>()
        )));
    }
    let mut out = BTreeMap::new();
    for (table, shape) in &model.tables {
        let mut ids = rows.get(table).cloned().unwrap_or_default();
        check_ids(table, &ids, shape.rows)?;
        ids.sort_unstable();
        out.insert(table.clone(), ids);
    }
    Ok(out)
}

impl FedSubAvg {
    fn local(&self, task_id: &str) -> LocalTables {
        self.local
            .lock()
            .expect("local tables")
            .entry(task_id.to_string())
            .or_default()
            .clone()
    }

    /// Brings this replica's files to the task's committed version (from the blob store's table
    /// history) and returns it. `held` is the version they held; unknown if this fails.
    async fn catch_up(
        &self,
        store: &Store,
        task_id: &str,
        model: &SparseModel,
        held: &mut Option<i64>,
    ) -> Result<i64, ApiError> {
        let target = store.task(task_id).await?.model_version;
        let local = match held.take() {
            Some(v) => Some(v),
            None => store.tables.version(task_id)?,
        };
        let history = history(store, task_id, model);
        history
            .catch_up(local, target)
            .await
            .map_err(|e| ApiError::Internal(format!("tables of task `{task_id}`: {e}")))?;
        *held = Some(target);
        Ok(target)
    }

    /// A shared hold on this replica's files at version `committed` (just read from the task)
    /// or later.
    async fn current_tables(
        &self,
        store: &Store,
        task_id: &str,
        model: &SparseModel,
        committed: i64,
    ) -> Result<OwnedRwLockReadGuard<Option<i64>>, ApiError> {
        let local = self.local(task_id);
        let reading = local.clone().read_owned().await;
        if reading.is_some_and(|v| v >= committed) {
            return Ok(reading);
        }
        drop(reading);
        let mut writing = local.write_owned().await;
        self.catch_up(store, task_id, model, &mut writing).await?;
        Ok(writing.downgrade())
    }

    async fn sparse_task(&self, store: &Store, task_id: &str) -> Result<(TaskRow, SparseModel), ApiError> {
        let task = store.task(task_id).await?;
        let model = sparse_model(&task.config).ok_or_else(|| ApiError::NotSparse(task_id.to_string()))?;
        Ok((task, model))
    }

    /// Stores a new FedSubAvg task's initial weights: dense tensors as model version 0, each table
    /// as a row-addressable file (zeros where the weights leave it out) and as the history's first
    /// snapshot. `weights` passed [`check_initial_model`] already.
    async fn store_sparse_model(
        &self,
        store: &Store,
        task_id: &str,
        model: &SparseModel,
        weights: Bytes,
    ) -> Result<(), ApiError> {
        let tables = store.tables.clone();
        let task = task_id.to_string();
        let model_tables = model.tables.clone();
        let (dense, zeros) = tokio::task::spawn_blocking(move || {
            let all = NamedTensors::decode(&weights)?;
            let mut zeros = BTreeSet::new();
            for (name, shape) in &model_tables {
                if !all.0.contains_key(name) {
                    tables.create_zeros(&task, name, *shape)?;
                    zeros.insert(name.clone());
                }
            }
            let mut dense = NamedTensors::default();
            for (name, t) in all.0 {
                match model_tables.get(&name) {
                    Some(shape) => tables.create(&task, &name, *shape, |m, row| {
                        let start = m as usize * shape.width;
                        row.copy_from_slice(&t.data[start..start + shape.width]);
                    })?,
                    None => {
                        dense.0.insert(name, t);
                    }
                }
            }
            Ok::<_, ApiError>((Bytes::from(dense.encode()), zeros))
        })
        .await??;
        store.blobs.put(&model_key(task_id, 0), dense).await?;
        history(store, task_id, model).write_snapshot(0, zeros).await?;
        store.tables.set_version(task_id, 0)?;
        Ok(())
    }

    /// Enrols a device's feature set, or re-enrols it with a changed one: heat moves by one device
    /// for each row gained or dropped; the same set again changes nothing.
    pub async fn enrol(
        &self,
        store: &Store,
        task_id: &str,
        device_id: &str,
        features: FeatureSet,
    ) -> Result<Enrolment, ApiError> {
        check_device_id(device_id)?;
        let (_, model) = self.sparse_task(store, task_id).await?;
        check_sample_count(features.num_samples)?;
        let rows = checked_rows(&model, &features.rows)?;
        // Heat must not move while a round is being finalised (a re-run must see the same heat):
        // the enrolment's transaction refuses a closing round; this waits rather than refuse while
        // this replica finalises one.
        let _frozen = store.finalize_lock.lock().await;
        let enrolled = enrol_device(
            store.db.pool(),
            task_id,
            device_id,
            features.num_samples,
            &rows,
            now_ms(),
        )
        .await?;
        let (changed, population) = match enrolled {
            Enrolled::Done { changed, population } => (changed, population),
            Enrolled::RoundClosing(round) => return Err(ApiError::RoundClosing(round)),
        };
        if changed {
            info!(task = %task_id, rows = rows.values().map(Vec::len).sum::<usize>(), population = population.devices, "device enrolled");
        }
        Ok(Enrolment {
            device_id: device_id.to_string(),
            changed,
            population,
        })
    }

    /// Population and per-row heat (operators, tests).
    pub async fn heat(
        &self,
        store: &Store,
        task_id: &str,
        request: RowsRequest,
    ) -> Result<HeatReport, ApiError> {
        let (_, model) = self.sparse_task(store, task_id).await?;
        let mut out = BTreeMap::new();
        for (table, ids) in &request.rows {
            checked_rows(&model, &BTreeMap::from([(table.clone(), ids.clone())]))?;
            let heat = read_heat(store.db.pool(), task_id, table, ids).await?;
            out.insert(
                table.clone(),
                ids.iter()
                    .map(|id| heat.get(id).copied().unwrap_or_default())
                    .collect(),
            );
        }
        Ok(HeatReport {
            population: read_population(store.db.pool(), task_id).await?,
            rows: out,
        })
    }

    /// The dense tensors and the requested rows of the current model version, as a sparse
    /// safetensors body. A version other than the current one is refused (tables keep only the
    /// latest version): the device's round has ended and its upload would be refused anyway.
    pub async fn submodel(
        &self,
        store: &Store,
        task_id: &str,
        request: RowsRequest,
    ) -> Result<(i64, Bytes), ApiError> {
        let (task, model) = self.sparse_task(store, task_id).await?;
        let rows = checked_rows(&model, &request.rows)?;
        // The version the files hold, and their rows, belong together while this is held.
        let reading = self
            .current_tables(store, task_id, &model, task.model_version)
            .await?;
        let current = reading.expect("caught up");
        match request.version {
            Some(v) if v < 0 || v > current => {
                return Err(ApiError::UnknownModelVersion {
                    task: task_id.to_string(),
                    version: v,
                });
            }
            Some(v) if v != current => {
                return Err(ApiError::StaleModelVersion {
                    requested: v,
                    current,
                });
            }
            _ => {}
        }
        let (_, dense) = store.model(task_id, Some(current)).await?;
        let tables = store.tables.clone();
        let task_id = task_id.to_string();
        let body = tokio::task::spawn_blocking(move || {
            let _reading = reading;
            let mut out = SparseTensors {
                dense: NamedTensors::decode(&dense)?,
                tables: BTreeMap::new(),
            };
            for (table, ids) in rows {
                let shape = model.tables[&table];
                out.tables
                    .insert(table.clone(), tables.read_rows(&task_id, &table, shape, &ids)?);
            }
            Ok::<_, ApiError>(Bytes::from(out.encode()))
        })
        .await??;
        Ok((current, body))
    }

    /// Refuses an update that touches a row no enrolled device holds (its heat is 0).
    async fn check_rows_held(
        &self,
        store: &Store,
        task_id: &str,
        update: &SparseTensors,
    ) -> Result<(), ApiError> {
        for (table, rows) in &update.tables {
            let heat = read_heat(store.db.pool(), task_id, table, &rows.ids).await?;
            if let Some(&id) = rows.ids.iter().find(|id| !heat.contains_key(id)) {
                return Err(SparseError::UnheldRow {
                    table: table.clone(),
                    id,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Finalisation, before the commit transaction: writes the new dense model blob and the journal
    /// of the touched rows' new absolute values for `new_version`. The caller holds this replica's
    /// files exclusively, at the round's base version; the round is closing (heat frozen).
    async fn write_sparse_version(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        acc: SubAvgAccumulator,
        new_version: i64,
    ) -> Result<(), ApiError> {
        let model = sparse_model(&task.config).expect("a FedSubAvg task");
        let population = read_population(store.db.pool(), &task.id).await?;
        let mut heat = BTreeMap::new();
        for table in model.tables.keys() {
            let ids = acc.touched(table);
            let h = read_heat(store.db.pool(), &task.id, table, &ids).await?;
            let h: Vec<Heat> = ids
                .iter()
                .map(|id| h.get(id).copied().unwrap_or_default())
                .collect();
            heat.insert(table.clone(), (ids, h));
        }
        let (_, base) = store.model(&task.id, Some(round.base_version)).await?;
        let tables = store.tables.clone();
        let task_id = task.id.clone();
        let (dense, journal) = tokio::task::spawn_blocking(move || {
            let mut dense = NamedTensors::decode(&base)?;
            acc.apply_dense(&mut dense, model.server_lr);
            let mut journal = SparseTensors::default();
            for (table, (ids, h)) in heat {
                let mut rows = tables.read_rows(&task_id, &table, model.tables[&table], &ids)?;
                acc.apply_rows(&table, &mut rows, &h, population, model.server_lr);
                journal.tables.insert(table, rows);
            }
            info!(task = %task_id, rows = acc.touched_rows(), updates = acc.updates(), "fedsubavg rows computed");
            Ok::<_, ApiError>((Bytes::from(dense.encode()), Bytes::from(journal.encode())))
        })
        .await??;
        store.blobs.put(&model_key(&task.id, new_version), dense).await?;
        store
            .blobs
            .put(&journal_key(&task.id, new_version), journal)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Strategy for FedSubAvg {
    fn handles(&self, config: &StrategyConfig) -> bool {
        matches!(config, StrategyConfig::FedSubAvg { .. })
    }

    fn validate(&self, config: &TaskConfig) -> Result<(), ApiError> {
        validate(config)
    }

    fn check_initial_model(&self, config: &TaskConfig, weights: &[u8]) -> Result<(), ApiError> {
        check_initial_model(config, weights)
    }

    async fn store_initial_model(
        &self,
        store: &Store,
        task_id: &str,
        config: &TaskConfig,
        weights: Bytes,
    ) -> Result<(), ApiError> {
        let model = sparse_model(config).expect("a FedSubAvg task");
        self.store_sparse_model(store, task_id, &model, weights).await
    }

    fn upload_limit(&self, config: &TaskConfig) -> usize {
        upload_limit(&sparse_model(config).expect("a FedSubAvg task"))
    }

    fn decode_update(&self, config: &TaskConfig, body: &Bytes) -> Result<Update, ApiError> {
        let m = sparse_model(config).expect("a FedSubAvg task");
        Ok(Update::Sparse(SparseTensors::decode_checked(
            body,
            &m.dense,
            &m.tables,
            DELTA_LIMIT,
        )?))
    }

    async fn check_update(&self, store: &Store, task: &TaskRow, update: &Update) -> Result<(), ApiError> {
        match update {
            Update::Sparse(rows) => self.check_rows_held(store, &task.id, rows).await,
            Update::Dense { .. } | Update::Int8 { .. } | Update::TopK(_) => {
                unreachable!("FedSubAvg decodes sparse updates")
            }
        }
    }

    fn new_sums(&self, config: &TaskConfig) -> Option<Sums> {
        let m = sparse_model(config).expect("a FedSubAvg task");
        Some(Sums::Sparse(SubAvgAccumulator::new(
            m.form,
            &m.dense,
            m.tables.into_keys(),
        )))
    }

    /// Writes the dense model and the table journal, holding this replica's files from before the
    /// journal is written until [`Strategy::after_commit`] has applied it.
    async fn commit(
        &self,
        store: &Store,
        task: &TaskRow,
        round: &RoundRow,
        sums: Option<Sums>,
        new_version: i64,
    ) -> Result<CommitHold, ApiError> {
        let Some(Sums::Sparse(sums)) = sums else {
            unreachable!("FedSubAvg folds sparse sums");
        };
        let model = sparse_model(&task.config).expect("a FedSubAvg task");
        let mut writing = self.local(&task.id).write_owned().await;
        let held = self.catch_up(store, &task.id, &model, &mut writing).await?;
        if held != round.base_version {
            return Err(ApiError::Internal(format!(
                "round {} of task `{}` builds on version {}, but version {held} is committed",
                round.id, task.id, round.base_version
            )));
        }
        self.write_sparse_version(store, task, round, sums, new_version)
            .await?;
        Ok(Some(Box::new(writing)))
    }

    async fn after_commit(
        &self,
        store: &Store,
        task: &TaskRow,
        _round: &RoundRow,
        hold: CommitHold,
        _first: bool,
    ) -> Result<(), ApiError> {
        let mut writing = *hold
            .expect("FedSubAvg's commit holds its tables")
            .downcast::<OwnedRwLockWriteGuard<Option<i64>>>()
            .expect("FedSubAvg's commit holds its tables");
        let model = sparse_model(&task.config).expect("a FedSubAvg task");
        let version = self.catch_up(store, &task.id, &model, &mut writing).await?;
        let _reading = writing.downgrade();
        let history = history(store, &task.id, &model);
        // Only bounds how far other replicas have to catch up: a failure is retried after the
        // next commit.
        if let Err(e) = history.compact_if_due(version).await {
            warn!(task = %task.id, version, error = %e, "compacting the table history failed");
        }
        Ok(())
    }
}
