//! A FedSubAvg task's committed tables in the blob store, from which every replica brings its own
//! copy ([`crate::tables::TableStore`]) up to date: any replica serves rows and finalises rounds.
//!
//! - `table-snapshots/<task>/<version>/<table>.f32`: every table at a committed version, raw
//!   fixed-stride f32 as in the local files; `table-snapshots/<task>/<version>.json`, written last,
//!   makes the snapshot complete and names the tables left out because they are all zeros (a new
//!   task's tables that its initial weights leave out: a 10M-row table of zeros is not uploaded).
//! - `journals/<task>/<version>.safetensors`: the absolute values, after `version`, of the rows that
//!   version's round touched. The finaliser writes it before the commit transaction; it counts once
//!   the task's model version has reached it. A journal of a version that never committed is
//!   ignored, and written again, identically, when the round is finalised again.
//!
//! A replica whose copy holds version `a` applies journals `a+1..=v` in order; one with no copy, or
//! whose next journals are gone, downloads the newest snapshot and applies the journals after it.
//! Rows are absolute values, so a journal applied again (after a crash mid-way) changes nothing.
//! The finaliser writes a new snapshot once the journals since the last one outweigh the tables,
//! then removes the older snapshots and the journals it covers, so that catching up costs at most
//! about twice the tables' size. A replica that loses a race with that removal starts again.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Error, ErrorKind},
};

use bytes::Bytes;
use fedhive_shared::sparse::{SparseTensors, TableShape};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::SparseModel;
use crate::{
    blobs::BlobStore,
    tables::{self, TableStore},
};

/// How often a catch-up starts again after a snapshot or journal it listed was removed meanwhile.
const CATCH_UP_TRIES: usize = 3;

pub(super) fn journal_key(task_id: &str, version: i64) -> String {
    format!("journals/{task_id}/{version:020}.safetensors")
}

fn manifest_key(task_id: &str, version: i64) -> String {
    format!("table-snapshots/{task_id}/{version:020}.json")
}

fn snapshot_folder(task_id: &str, version: i64) -> String {
    format!("table-snapshots/{task_id}/{version:020}")
}

fn snapshot_table_key(task_id: &str, version: i64, table: &str) -> String {
    format!(
        "{}/{}",
        snapshot_folder(task_id, version),
        tables::file_name(table)
    )
}

/// What a snapshot's `.json` says besides its version (in its name).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Tables not stored because every value is zero.
    zeros: BTreeSet<String>,
}

/// Versions (and sizes) of the blobs named `<version:020><suffix>` among `names`.
fn by_version(names: Vec<(String, u64)>, suffix: &str) -> BTreeMap<i64, u64> {
    names
        .into_iter()
        .filter_map(|(name, size)| Some((name.strip_suffix(suffix)?.parse().ok()?, size)))
        .collect()
}

/// One task's history in `blobs`, seen from this replica's copy `tables`.
pub(super) struct History<'a> {
    pub blobs: &'a BlobStore,
    pub tables: &'a TableStore,
    pub task_id: &'a str,
    pub model: &'a SparseModel,
}

impl History<'_> {
    async fn snapshots(&self) -> std::io::Result<BTreeMap<i64, u64>> {
        let listed = self
            .blobs
            .list_sizes(&format!("table-snapshots/{}", self.task_id))
            .await?;
        Ok(by_version(listed, ".json"))
    }

    /// Committed or not: the caller compares with the task's model version.
    async fn journals(&self) -> std::io::Result<BTreeMap<i64, u64>> {
        let listed = self
            .blobs
            .list_sizes(&format!("journals/{}", self.task_id))
            .await?;
        Ok(by_version(listed, ".safetensors"))
    }

    /// Uploads the local files, which hold `version`, as that version's snapshot (tables in
    /// `zeros` are all zeros and not uploaded); the manifest last.
    pub async fn write_snapshot(&self, version: i64, zeros: BTreeSet<String>) -> std::io::Result<()> {
        for table in self.model.tables.keys().filter(|t| !zeros.contains(*t)) {
            let path = self.tables.path(self.task_id, table);
            let key = snapshot_table_key(self.task_id, version, table);
            self.blobs.put_file(&key, &path).await?;
        }
        let manifest = serde_json::to_vec(&Manifest { zeros }).map_err(Error::other)?;
        self.blobs
            .put(&manifest_key(self.task_id, version), Bytes::from(manifest))
            .await?;
        info!(task = %self.task_id, version, "table snapshot written");
        Ok(())
    }

    /// Brings this replica's files from `local` (the version they hold, if known) to the committed
    /// version `target`, and records it. The caller holds the task's local write lock.
    pub async fn catch_up(&self, mut local: Option<i64>, target: i64) -> std::io::Result<()> {
        for attempt in 1..=CATCH_UP_TRIES {
            match self.try_catch_up(local, target).await {
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < CATCH_UP_TRIES => {
                    warn!(task = %self.task_id, error = %e, "table history changed while catching up; starting again");
                    local = self.tables.version(self.task_id)?;
                }
                done => return done,
            }
        }
        unreachable!("the last try returns")
    }

    async fn try_catch_up(&self, local: Option<i64>, target: i64) -> std::io::Result<()> {
        if local == Some(target) {
            return Ok(());
        }
        let journals = self.journals().await?;
        let have_journals = |from: i64| (from + 1..=target).all(|v| journals.contains_key(&v));
        let mut adopted = false;
        let from = match local {
            Some(a) if a < target && have_journals(a) => a,
            _ => match self.snapshots().await?.range(..=target).next_back() {
                Some((&s, _)) => {
                    self.load_snapshot(s).await?;
                    s
                }
                None => {
                    adopted = true;
                    self.adopt_unversioned_files(&journals, target)?
                }
            },
        };
        for version in from + 1..=target {
            self.apply_journal(version).await?;
        }
        self.tables.set_version(self.task_id, target)?;
        if adopted {
            // So that other replicas can start from them (if this fails, the finaliser's next
            // compaction writes one: see `compact_if_due`).
            if let Err(e) = self.write_snapshot(target, BTreeSet::new()).await {
                warn!(task = %self.task_id, error = %e, "snapshotting adopted table files failed");
            }
        }
        if local.is_none() && from < target {
            info!(task = %self.task_id, from, version = target, "tables brought up to date");
        }
        Ok(())
    }

    /// Tables made before they had a history in the blob store: the local files hold every
    /// committed version whose journal is gone (journals were removed once applied). Adopted as
    /// they are, and snapshotted for the other replicas.
    fn adopt_unversioned_files(&self, journals: &BTreeMap<i64, u64>, target: i64) -> std::io::Result<i64> {
        if !self.tables.has_unversioned_files(self.task_id)? {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "task `{}` has no table snapshot up to version {target} in the blob store",
                    self.task_id
                ),
            ));
        }
        let first_pending = journals.range(..=target).next().map(|(&v, _)| v);
        let held = first_pending.map_or(target, |v| v - 1);
        warn!(task = %self.task_id, version = held, "adopting table files that have no history in the blob store");
        Ok(held)
    }

    /// Replaces the local files by snapshot `version`; the version file is cleared first, so that
    /// a crash half-way leaves files that are not trusted.
    async fn load_snapshot(&self, version: i64) -> std::io::Result<()> {
        let bytes = self.blobs.get(&manifest_key(self.task_id, version)).await?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(Error::other)?;
        let local = self.tables;
        local.clear_version(self.task_id)?;
        for (table, &shape) in &self.model.tables {
            if manifest.zeros.contains(table) {
                local.create_zeros(self.task_id, table, shape)?;
                continue;
            }
            let staged = local.staging_path(self.task_id)?;
            let key = snapshot_table_key(self.task_id, version, table);
            if let Err(e) = self.blobs.get_to_file(&key, &staged).await {
                std::fs::remove_file(&staged).ok();
                return Err(e);
            }
            local.install(self.task_id, table, shape, &staged)?;
        }
        info!(task = %self.task_id, version, "table snapshot loaded");
        Ok(())
    }

    async fn apply_journal(&self, version: i64) -> std::io::Result<()> {
        let bytes = self.blobs.get(&journal_key(self.task_id, version)).await?;
        let (local, task_id, shapes) = (
            self.tables.clone(),
            self.task_id.to_string(),
            self.model.tables.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let journal = SparseTensors::decode_checked(&bytes, &[], &shapes, f32::MAX)
                .map_err(|e| Error::other(format!("journal of version {version}: {e}")))?;
            for (table, rows) in &journal.tables {
                local.write_rows(&task_id, table, rows)?;
            }
            Ok(())
        })
        .await
        .map_err(Error::other)?
    }

    /// After the finaliser applied `version` to its files: if the journals since the newest
    /// snapshot weigh more than the tables, snapshots `version` and removes what it covers. The
    /// caller holds the task's local lock (shared is enough: the files must not move meanwhile).
    pub async fn compact_if_due(&self, version: i64) -> std::io::Result<()> {
        let snapshots = self.snapshots().await?;
        let newest = snapshots.keys().next_back().copied().unwrap_or(-1);
        let journals = self.journals().await?;
        let since: u64 = journals.range(newest + 1..=version).map(|(_, size)| size).sum();
        let tables: u64 = self.model.tables.values().map(TableShape::bytes).sum();
        // Adopted tables whose snapshot failed have none yet: one is due at once.
        if newest >= version || (since <= tables && !snapshots.is_empty()) {
            return Ok(());
        }
        self.write_snapshot(version, BTreeSet::new()).await?;
        for &old in snapshots.keys().filter(|&&s| s < version) {
            self.blobs.delete(&manifest_key(self.task_id, old)).await?;
            self.blobs
                .delete_prefix(&snapshot_folder(self.task_id, old))
                .await?;
        }
        for &old in journals.keys().filter(|&&v| v <= version) {
            self.blobs.delete(&journal_key(self.task_id, old)).await?;
        }
        info!(task = %self.task_id, version, journal_bytes = since, table_bytes = tables, "table history compacted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use fedhive_shared::{
        fedsubavg::SubAvgForm,
        sparse::{SparseRows, TableShape},
    };

    use super::*;

    const TASK: &str = "t";

    fn model() -> SparseModel {
        SparseModel {
            form: SubAvgForm::Paper,
            server_lr: 1.0,
            dense: Vec::new(),
            tables: BTreeMap::from([
                ("emb".to_string(), TableShape { rows: 100, width: 2 }),
                ("cold".to_string(), TableShape { rows: 10, width: 3 }),
            ]),
        }
    }

    /// Every value of every table of a copy.
    fn read_all(tables: &TableStore, model: &SparseModel) -> BTreeMap<String, Vec<f32>> {
        model
            .tables
            .iter()
            .map(|(name, &shape)| {
                let ids: Vec<u64> = (0..shape.rows).collect();
                let rows = tables.read_rows(TASK, name, shape, &ids).unwrap();
                (name.clone(), rows.values)
            })
            .collect()
    }

    /// Version v's journal (rows v, v + 10, ... of `emb`, row v % 10 of `cold`), stored, and
    /// applied to `expected`.
    async fn commit_journal(blobs: &BlobStore, v: i64, expected: &mut BTreeMap<String, Vec<f32>>) {
        let mut journal = SparseTensors::default();
        let mut emb = SparseRows::new(2);
        for id in (v as u64 % 10..100).step_by(10) {
            let row = [v as f32, id as f32 * 0.5];
            emb.push(id, &row);
            expected.get_mut("emb").unwrap()[id as usize * 2..id as usize * 2 + 2].copy_from_slice(&row);
        }
        let mut cold = SparseRows::new(3);
        let id = v as usize % 10;
        cold.push(id as u64, &[v as f32; 3]);
        expected.get_mut("cold").unwrap()[id * 3..id * 3 + 3].copy_from_slice(&[v as f32; 3]);
        journal.tables.insert("emb".into(), emb);
        journal.tables.insert("cold".into(), cold);
        blobs
            .put(&journal_key(TASK, v), Bytes::from(journal.encode()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn copies_catch_up_from_snapshots_and_journals_and_compaction_bounds_them() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let model = model();
        let copies: Vec<TableStore> = ["a", "b", "c"]
            .iter()
            .map(|c| TableStore::new(dir.path().join(c)))
            .collect();
        let history = |tables| History {
            blobs: &blobs,
            tables,
            task_id: TASK,
            model: &model,
        };
        // Version 0, made on copy a: `emb` given, `cold` zeros (not uploaded).
        let a = &copies[0];
        a.create(TASK, "emb", model.tables["emb"], |m, row| {
            row.copy_from_slice(&[-1.0, m as f32])
        })
        .unwrap();
        a.create_zeros(TASK, "cold", model.tables["cold"]).unwrap();
        history(a)
            .write_snapshot(0, BTreeSet::from(["cold".to_string()]))
            .await
            .unwrap();
        a.set_version(TASK, 0).unwrap();
        let mut expected = read_all(a, &model);
        assert!(expected["cold"].iter().all(|&v| v == 0.0));
        // Copy c catches up to version 0, then lags behind.
        let c = &copies[2];
        history(c).catch_up(None, 0).await.unwrap();
        assert_eq!(read_all(c, &model), expected);

        // Six commits on copy a, each compacting when due.
        let table_bytes: u64 = 100 * 2 * 4 + 10 * 3 * 4;
        for v in 1..=6 {
            commit_journal(&blobs, v, &mut expected).await;
            history(a).catch_up(Some(v - 1), v).await.unwrap();
            assert_eq!(read_all(a, &model), expected, "copy a at version {v}");
            history(a).compact_if_due(v).await.unwrap();
        }
        let history_a = history(a);
        let snapshots = history_a.snapshots().await.unwrap();
        let journals = history_a.journals().await.unwrap();
        let newest = *snapshots.keys().next_back().unwrap();
        assert_eq!(snapshots.len(), 1, "older snapshots removed: {snapshots:?}");
        assert!(newest > 0 && journals.keys().all(|&v| v > newest), "{journals:?}");
        assert!(journals.values().sum::<u64>() <= table_bytes);

        // Copy b has nothing: the snapshot and the journals after it.
        let b = &copies[1];
        history(b).catch_up(None, 6).await.unwrap();
        assert_eq!(read_all(b, &model), expected);
        assert_eq!(b.version(TASK).unwrap(), Some(6));
        // Copy c's next journals are gone: it reloads the snapshot.
        history(c).catch_up(Some(0), 6).await.unwrap();
        assert_eq!(read_all(c, &model), expected);
        // A journal of a version that has not committed is not applied.
        let at_6 = expected.clone();
        commit_journal(&blobs, 7, &mut expected).await;
        b.clear_version(TASK).unwrap();
        history(b).catch_up(None, 6).await.unwrap();
        assert_eq!(read_all(b, &model), at_6);
        // A copy left half-replaced (no version file) is loaded again, whatever its files hold.
        c.clear_version(TASK).unwrap();
        let mut junk = SparseRows::new(2);
        junk.push(3, &[f32::NAN, 9.0]);
        c.write_rows(TASK, "emb", &junk).unwrap();
        history(c).catch_up(None, 7).await.unwrap();
        assert_eq!(read_all(c, &model), expected);
    }

    #[tokio::test]
    async fn files_from_before_the_history_are_adopted_and_snapshotted() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let model = model();
        let old = TableStore::new(dir.path().join("old"));
        let history = History {
            blobs: &blobs,
            tables: &old,
            task_id: TASK,
            model: &model,
        };
        // Files holding version 2 (no version file, no snapshot), and version 3's journal, which
        // the old layout had not applied yet.
        old.create(TASK, "emb", model.tables["emb"], |m, row| {
            row.copy_from_slice(&[2.0, m as f32])
        })
        .unwrap();
        old.create_zeros(TASK, "cold", model.tables["cold"]).unwrap();
        let mut expected = read_all(&old, &model);
        commit_journal(&blobs, 3, &mut expected).await;
        history.catch_up(None, 3).await.unwrap();
        assert_eq!(read_all(&old, &model), expected);
        assert_eq!(old.version(TASK).unwrap(), Some(3));
        // What a new copy holds once it has caught up to version 3 from the blobs alone.
        let new_copy = |name: &str| {
            let tables = TableStore::new(dir.path().join(name));
            let (history, model) = (&history, &model);
            async move {
                History {
                    tables: &tables,
                    ..*history
                }
                .catch_up(None, 3)
                .await
                .unwrap();
                read_all(&tables, model)
            }
        };
        // Snapshotted at once, for the other replicas.
        assert_eq!(new_copy("fresh").await, expected);
        // Had that snapshot failed, the finaliser's next compaction writes one.
        blobs
            .delete_prefix(&format!("table-snapshots/{TASK}"))
            .await
            .unwrap();
        history.compact_if_due(3).await.unwrap();
        assert_eq!(new_copy("again").await, expected);
        // Without files or a snapshot there is nothing to start from.
        let empty = TableStore::new(dir.path().join("empty"));
        let missing = History {
            task_id: "other",
            tables: &empty,
            ..history
        }
        .catch_up(None, 1)
        .await
        .unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
    }
}
