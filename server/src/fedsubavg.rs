//! FedSubAvg on the server (Ding et al., "Federated Submodel Optimization for Hot and Cold Data
//! Features", NeurIPS 2022; rule in `ALGORITHMS.md` and [`fedhive_shared::fedsubavg`]).
//!
//! - Submodels: a task's sparse tables live row-addressable in a [`TableStore`]; the dense tensors
//!   are the task's model blob as for FedAvg. `POST /v1/tasks/{id}/submodel` returns the dense
//!   tensors and the rows a device asks for.
//! - Heat: a device enrols its feature set `R_i` and sample count (`PUT .../devices/{id}/features`);
//!   the enrolment transaction adds or removes it once per row it gains or drops (`sparse_heat`) and
//!   keeps `N` (`sparse_population`). Enrolling the same set again changes nothing.
//! - Rounds: uploads carry the sparse update format of [`fedhive_shared::sparse`]; the round's sums
//!   are a [`SubAvgAccumulator`] (memory O(rows touched), not O(table)).
//! - Commit without copying a table: finalisation computes the touched rows' new absolute values
//!   and writes them as a journal blob (`journals/<task>/<version>`) before the commit transaction;
//!   after the commit they are written into the table file in place and the journal is removed.
//!   After a crash, journals of committed versions are replayed (absolute values, so replaying twice
//!   is harmless) before the table is read again; a journal of a version that never committed is
//!   ignored and rewritten, identically, when the round is finalised again.
//! - Heat is frozen while a round is being finalised (enrolments wait on the finalise lock and are
//!   refused with `409 round_closing` while a round is `closing` after a crash), so re-running a
//!   finalisation gives the same model bits.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use fedhive_shared::{
    FedAvgAccumulator, NamedTensors, TensorLayout,
    fedavg::{AggregateError, DELTA_LIMIT, MAX_UPDATE_SAMPLES},
    fedsubavg::{Heat, SubAvgAccumulator, SubAvgForm},
    sparse::{
        Enrolment, FeatureSet, HeatReport, MAX_ROWS_PER_UPDATE, RowsRequest, SparseError, SparseTensors,
        TableShape, check_ids, split_specs,
    },
    tensors::TensorSpec,
    wire::{StrategyConfig, TaskConfig},
};
use sqlx::{AnyPool, Row};
use tracing::info;

use crate::{
    coordinator::{Coordinator, blocks::upload_specs, model_key, now_ms},
    db::{DbError, RoundRow, TaskRow},
    error::ApiError,
    tables::TableStore,
};

/// A FedSubAvg task's model: its dense tensors and its tables.
#[derive(Debug, Clone)]
pub struct SparseModel {
    pub form: SubAvgForm,
    pub server_lr: f32,
    pub dense: Vec<TensorSpec>,
    pub tables: BTreeMap<String, TableShape>,
}

/// The task's sparse model, or `None` for a dense strategy.
pub fn sparse_model(config: &TaskConfig) -> Option<SparseModel> {
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
pub fn validate(config: &TaskConfig) -> Result<(), ApiError> {
    let StrategyConfig::FedSubAvg { tables, .. } = &config.strategy else {
        return Ok(());
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
    Ok(())
}

/// Checks a new task's initial weights: every tensor of the config with its shape, finite. A
/// FedSubAvg task may leave out a table, which then starts as zeros (a 10M-row table need not
/// travel in the request).
pub fn check_initial_model(config: &TaskConfig, bytes: &[u8]) -> Result<(), ApiError> {
    let Some(model) = sparse_model(config) else {
        NamedTensors::decode_checked(bytes, &config.tensors, f32::MAX)?;
        return Ok(());
    };
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
pub fn upload_limit(model: &SparseModel) -> usize {
    let dense: usize = model.dense.iter().map(TensorSpec::numel).sum();
    let rows: usize = model
        .tables
        .values()
        .map(|t| (t.rows as usize).min(MAX_ROWS_PER_UPDATE) * (t.width * 4 + 8))
        .sum();
    dense * 4 + rows + 64 * 1024 + (model.dense.len() + 2 * model.tables.len()) * 256
}

/// One accepted update, checked for its task's strategy. A dense update keeps its body and is
/// read in place (see [`TensorLayout`]); a sparse one is decoded (it is a few rows).
pub enum RoundUpdate {
    Dense { body: Bytes, layout: TensorLayout },
    Sparse(SparseTensors),
}

/// A round's running sums for its task's strategy.
pub enum RoundSums {
    Dense(FedAvgAccumulator),
    Sparse(SubAvgAccumulator),
}

impl RoundSums {
    pub fn new(config: &TaskConfig) -> Self {
        match sparse_model(config) {
            Some(m) => RoundSums::Sparse(SubAvgAccumulator::new(m.form, &m.dense, m.tables.into_keys())),
            // Dense strategies; MC-PSGD's uploads also carry its chain update and losses.
            None => RoundSums::Dense(FedAvgAccumulator::new(&upload_specs(config))),
        }
    }

    pub fn add(&mut self, num_samples: u64, update: &RoundUpdate) -> Result<(), AggregateError> {
        match (self, update) {
            (RoundSums::Dense(acc), RoundUpdate::Dense { body, layout }) => {
                acc.add_with(num_samples, |name| {
                    layout
                        .values(body, name)
                        .expect("the layout was checked against the accumulator's specs")
                })
            }
            (RoundSums::Sparse(acc), RoundUpdate::Sparse(s)) => acc.add(num_samples, s),
            _ => unreachable!("sums and updates are built from the same task config"),
        }
    }
}

/// Checks an update body for the task's strategy (blocking: run off the async threads).
pub fn decode_update(config: &TaskConfig, body: &Bytes) -> Result<RoundUpdate, ApiError> {
    match sparse_model(config) {
        Some(m) => Ok(RoundUpdate::Sparse(SparseTensors::decode_checked(
            body,
            &m.dense,
            &m.tables,
            DELTA_LIMIT,
        )?)),
        None => Ok(RoundUpdate::Dense {
            layout: TensorLayout::check(body, &upload_specs(config), DELTA_LIMIT)?,
            body: body.clone(),
        }),
    }
}

/// Table files, per-task table locks, and which tasks' journals this process has replayed.
pub struct SparseState {
    pub tables: TableStore,
    locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    replayed: Mutex<HashSet<String>>,
}

impl SparseState {
    pub fn new(tables: TableStore) -> Self {
        SparseState {
            tables,
            locks: Mutex::default(),
            replayed: Mutex::default(),
        }
    }

    /// The lock that orders table reads (shared) against in-place commits (exclusive).
    fn lock(&self, task_id: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.locks
            .lock()
            .expect("table locks")
            .entry(task_id.to_string())
            .or_default()
            .clone()
    }
}

fn journal_prefix(task_id: &str) -> String {
    format!("journals/{task_id}")
}

fn journal_key(task_id: &str, version: i64) -> String {
    format!("journals/{task_id}/{version:020}.safetensors")
}

fn blocking_err(e: tokio::task::JoinError) -> ApiError {
    ApiError::Internal(e.to_string())
}

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

impl Coordinator {
    async fn sparse_task(&self, task_id: &str) -> Result<(TaskRow, SparseModel), ApiError> {
        let task = self
            .db()
            .task(task_id)
            .await?
            .ok_or_else(|| ApiError::UnknownTask(task_id.to_string()))?;
        let model = sparse_model(&task.config).ok_or_else(|| ApiError::NotSparse(task_id.to_string()))?;
        Ok((task, model))
    }

    /// Stores a new FedSubAvg task's initial weights: dense tensors as model version 0, each table
    /// as a row-addressable file (zeros where the weights leave it out). `weights` passed
    /// [`check_initial_model`] already.
    pub(crate) async fn store_sparse_model(
        &self,
        task_id: &str,
        model: &SparseModel,
        weights: Bytes,
    ) -> Result<(), ApiError> {
        let tables = self.sparse.tables.clone();
        let task = task_id.to_string();
        let model_tables = model.tables.clone();
        let dense = tokio::task::spawn_blocking(move || {
            let all = NamedTensors::decode(&weights)?;
            for (name, shape) in &model_tables {
                if !all.0.contains_key(name) {
                    tables.create(&task, name, *shape, |_, row| row.fill(0.0))?;
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
            Ok::<_, ApiError>(Bytes::from(dense.encode()))
        })
        .await
        .map_err(blocking_err)??;
        self.blobs.put(&model_key(task_id, 0), dense).await?;
        Ok(())
    }

    /// Enrols a device's feature set, or re-enrols it with a changed one: heat moves by one device
    /// for each row gained or dropped; the same set again changes nothing.
    pub async fn enrol(
        &self,
        task_id: &str,
        device_id: &str,
        features: FeatureSet,
    ) -> Result<Enrolment, ApiError> {
        check_device_id(device_id)?;
        let (_, model) = self.sparse_task(task_id).await?;
        if features.num_samples == 0 || features.num_samples > MAX_UPDATE_SAMPLES {
            return Err(AggregateError::BadSampleCount(features.num_samples).into());
        }
        let rows = checked_rows(&model, &features.rows)?;
        // Heat must not move while a round is being finalised (a re-run must see the same heat).
        let _frozen = self.finalize_lock.lock().await;
        if let Some(round) = self.db().active_round(task_id).await?
            && round.state == "closing"
        {
            return Err(ApiError::RoundClosing(round.id));
        }
        let (changed, population) = enrol_device(
            self.db().pool(),
            task_id,
            device_id,
            features.num_samples,
            &rows,
            now_ms(),
        )
        .await?;
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
    pub async fn heat(&self, task_id: &str, request: RowsRequest) -> Result<HeatReport, ApiError> {
        let (_, model) = self.sparse_task(task_id).await?;
        let mut out = BTreeMap::new();
        for (table, ids) in &request.rows {
            checked_rows(&model, &BTreeMap::from([(table.clone(), ids.clone())]))?;
            let heat = read_heat(self.db().pool(), task_id, table, ids).await?;
            out.insert(
                table.clone(),
                ids.iter()
                    .map(|id| heat.get(id).copied().unwrap_or_default())
                    .collect(),
            );
        }
        Ok(HeatReport {
            population: read_population(self.db().pool(), task_id).await?,
            rows: out,
        })
    }

    /// The dense tensors and the requested rows of the current model version, as a sparse
    /// safetensors body. A version other than the current one is refused (tables keep only the
    /// latest version): the device's round has ended and its upload would be refused anyway.
    pub async fn submodel(&self, task_id: &str, request: RowsRequest) -> Result<(i64, Bytes), ApiError> {
        let (_, model) = self.sparse_task(task_id).await?;
        let rows = checked_rows(&model, &request.rows)?;
        self.ensure_tables_current(task_id).await?;
        let lock = self.sparse.lock(task_id);
        let _reading = lock.read().await;
        // Read under the lock: the version and the table rows then belong together.
        let task = self
            .db()
            .task(task_id)
            .await?
            .ok_or_else(|| ApiError::UnknownTask(task_id.to_string()))?;
        let current = task.model_version;
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
        let (_, dense) = self.model(task_id, Some(current)).await?;
        let tables = self.sparse.tables.clone();
        let task_id = task_id.to_string();
        let body = tokio::task::spawn_blocking(move || {
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
        .await
        .map_err(blocking_err)??;
        Ok((current, body))
    }

    /// Refuses an update that touches a row no enrolled device holds (its heat is 0).
    pub(crate) async fn check_rows_held(
        &self,
        task_id: &str,
        update: &SparseTensors,
    ) -> Result<(), ApiError> {
        for (table, rows) in &update.tables {
            let heat = read_heat(self.db().pool(), task_id, table, &rows.ids).await?;
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
    /// of the touched rows' new absolute values for `new_version`. The caller holds the task's
    /// table lock (see [`Self::table_write_lock`]) and the finalise lock (heat frozen).
    pub(crate) async fn write_sparse_version(
        &self,
        task: &TaskRow,
        round: &RoundRow,
        acc: SubAvgAccumulator,
        new_version: i64,
    ) -> Result<(), ApiError> {
        let model = sparse_model(&task.config).expect("a FedSubAvg task");
        self.apply_committed_journals(&task.id).await?;
        let population = read_population(self.db().pool(), &task.id).await?;
        let mut heat = BTreeMap::new();
        for table in model.tables.keys() {
            let ids = acc.touched(table);
            let h = read_heat(self.db().pool(), &task.id, table, &ids).await?;
            let h: Vec<Heat> = ids
                .iter()
                .map(|id| h.get(id).copied().unwrap_or_default())
                .collect();
            heat.insert(table.clone(), (ids, h));
        }
        let (_, base) = self.model(&task.id, Some(round.base_version)).await?;
        let tables = self.sparse.tables.clone();
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
        .await
        .map_err(blocking_err)??;
        self.blobs.put(&model_key(&task.id, new_version), dense).await?;
        self.blobs
            .put(&journal_key(&task.id, new_version), journal)
            .await?;
        Ok(())
    }

    /// The task's table lock, held exclusively by a finalisation from before its journal is
    /// written until the journal has been applied.
    pub(crate) async fn table_write_lock(&self, task_id: &str) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.sparse.lock(task_id).write_owned().await
    }

    /// Applies, in version order, every journal whose version has committed, then removes it.
    /// The caller holds the task's table lock exclusively.
    pub(crate) async fn apply_committed_journals(&self, task_id: &str) -> Result<(), ApiError> {
        let task = self
            .db()
            .task(task_id)
            .await?
            .ok_or_else(|| ApiError::UnknownTask(task_id.to_string()))?;
        let model = sparse_model(&task.config).expect("a FedSubAvg task");
        let mut versions: Vec<i64> = self
            .blobs
            .list(&journal_prefix(task_id))
            .await?
            .iter()
            .filter_map(|name| name.strip_suffix(".safetensors")?.parse().ok())
            .collect();
        versions.sort_unstable();
        let result = async {
            for version in versions.into_iter().filter(|&v| v <= task.model_version) {
                let key = journal_key(task_id, version);
                let bytes = self.blobs.get(&key).await?;
                let tables = self.sparse.tables.clone();
                let (task, model) = (task_id.to_string(), model.clone());
                tokio::task::spawn_blocking(move || {
                    let journal = SparseTensors::decode_checked(&bytes, &[], &model.tables, f32::MAX)?;
                    for (table, rows) in &journal.tables {
                        tables.write_rows(&task, table, rows)?;
                    }
                    Ok::<_, ApiError>(())
                })
                .await
                .map_err(blocking_err)??;
                self.blobs.delete(&key).await?;
                info!(task = %task_id, version, "table journal applied");
            }
            Ok::<_, ApiError>(())
        }
        .await;
        let mut replayed = self.sparse.replayed.lock().expect("replayed set");
        match result {
            Ok(()) => replayed.insert(task_id.to_string()),
            Err(_) => replayed.remove(task_id),
        };
        result
    }

    /// Replays committed journals left by a crash, once per task and process.
    async fn ensure_tables_current(&self, task_id: &str) -> Result<(), ApiError> {
        if self
            .sparse
            .replayed
            .lock()
            .expect("replayed set")
            .contains(task_id)
        {
            return Ok(());
        }
        let _writing = self.table_write_lock(task_id).await;
        self.apply_committed_journals(task_id).await
    }
}

/// Inserts or updates a device's enrolment and moves heat and population by the difference, in one
/// transaction. Returns whether anything changed and the population afterwards.
async fn enrol_device(
    pool: &AnyPool,
    task_id: &str,
    device_id: &str,
    num_samples: u64,
    rows: &BTreeMap<String, Vec<u64>>,
    now_ms: i64,
) -> Result<(bool, Heat), DbError> {
    let features = serde_json::to_string(rows)?;
    let mut tx = pool.begin().await?;
    let old =
        sqlx::query("SELECT num_samples, features FROM sparse_devices WHERE task_id = $1 AND device_id = $2")
            .bind(task_id)
            .bind(device_id)
            .fetch_optional(&mut *tx)
            .await?;
    let old: Option<(i64, BTreeMap<String, Vec<u64>>)> = match old {
        Some(r) => Some((
            r.try_get("num_samples")?,
            serde_json::from_str(&r.try_get::<String, _>("features")?)?,
        )),
        None => None,
    };
    let new_n = num_samples as i64;
    if let Some((n, set)) = &old
        && *n == new_n
        && set == rows
    {
        tx.commit().await?;
        return Ok((false, read_population(pool, task_id).await?));
    }
    // Per (table, row): change in devices and samples. A kept row only moves by the sample change.
    let mut delta: BTreeMap<(&str, u64), (i64, i64)> = BTreeMap::new();
    if let Some((n, set)) = &old {
        for (table, ids) in set {
            for &id in ids {
                let e = delta.entry((table.as_str(), id)).or_default();
                e.0 -= 1;
                e.1 -= n;
            }
        }
    }
    for (table, ids) in rows {
        for &id in ids {
            let e = delta.entry((table.as_str(), id)).or_default();
            e.0 += 1;
            e.1 += new_n;
        }
    }
    let changes: Vec<_> = delta.into_iter().filter(|(_, d)| *d != (0, 0)).collect();
    for chunk in changes.chunks(200) {
        // Only integers are spliced into the SQL; the task id and table names are bound.
        let mut values = Vec::with_capacity(chunk.len());
        let mut tables: Vec<&str> = Vec::new();
        for ((table, id), (d, s)) in chunk {
            let idx = match tables.iter().position(|t| t == table) {
                Some(i) => i,
                None => {
                    tables.push(*table);
                    tables.len() - 1
                }
            };
            values.push(format!("($1, ${}, {id}, {d}, {s})", idx + 2));
        }
        let statement = format!(
            "INSERT INTO sparse_heat (task_id, table_name, row_id, devices, samples) VALUES {} \
             ON CONFLICT (task_id, table_name, row_id) DO UPDATE SET \
             devices = sparse_heat.devices + excluded.devices, samples = sparse_heat.samples + excluded.samples",
            values.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statement)).bind(task_id);
        for t in tables {
            query = query.bind(t);
        }
        query.execute(&mut *tx).await?;
    }
    // Rows the device dropped may now be held by nobody: remove them (only those, not a scan).
    let mut dropped: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((table, id), (d, _)) in &changes {
        if *d < 0 {
            dropped.entry(table).or_default().push(id.to_string());
        }
    }
    for (table, ids) in dropped {
        for chunk in ids.chunks(500) {
            let statement = format!(
                "DELETE FROM sparse_heat WHERE task_id = $1 AND table_name = $2 AND devices = 0 AND row_id IN ({})",
                chunk.join(", ")
            );
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(task_id)
                .bind(table)
                .execute(&mut *tx)
                .await?;
        }
    }
    let (new_device, old_n) = match &old {
        Some((n, _)) => (0i64, *n),
        None => (1, 0),
    };
    sqlx::query(
        "INSERT INTO sparse_population (task_id, devices, samples) VALUES ($1, $2, $3) \
         ON CONFLICT (task_id) DO UPDATE SET devices = sparse_population.devices + excluded.devices, \
         samples = sparse_population.samples + excluded.samples",
    )
    .bind(task_id)
    .bind(new_device)
    .bind(new_n - old_n)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO sparse_devices (task_id, device_id, num_samples, features, updated_ms) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (task_id, device_id) DO UPDATE SET num_samples = excluded.num_samples, \
         features = excluded.features, updated_ms = excluded.updated_ms",
    )
    .bind(task_id)
    .bind(device_id)
    .bind(new_n)
    .bind(&features)
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((true, read_population(pool, task_id).await?))
}

async fn read_population(pool: &AnyPool, task_id: &str) -> Result<Heat, DbError> {
    let row = sqlx::query("SELECT devices, samples FROM sparse_population WHERE task_id = $1")
        .bind(task_id)
        .fetch_optional(pool)
        .await?;
    Ok(match row {
        Some(r) => Heat {
            devices: r.try_get::<i64, _>("devices")? as u64,
            samples: r.try_get::<i64, _>("samples")? as u64,
        },
        None => Heat::default(),
    })
}

/// Heat of the given rows; rows nobody holds are absent from the map.
async fn read_heat(
    pool: &AnyPool,
    task_id: &str,
    table: &str,
    ids: &[u64],
) -> Result<HashMap<u64, Heat>, DbError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
        // Only integers (row ids) are spliced into the SQL.
        let statement = format!(
            "SELECT row_id, devices, samples FROM sparse_heat WHERE task_id = $1 AND table_name = $2 AND row_id IN ({})",
            list.join(", ")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(task_id)
            .bind(table)
            .fetch_all(pool)
            .await?;
        for r in rows {
            let id = r.try_get::<i64, _>("row_id")? as u64;
            let heat = Heat {
                devices: r.try_get::<i64, _>("devices")? as u64,
                samples: r.try_get::<i64, _>("samples")? as u64,
            };
            out.insert(id, heat);
        }
    }
    Ok(out)
}
