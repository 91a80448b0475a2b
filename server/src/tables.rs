//! This replica's copy of FedSubAvg's sparse tables: one fixed-stride file per table.
//!
//! Row `m` of a `rows x width` f32 table lives at byte `m * width * 4` of its file, little-endian, so
//! fetching R rows is R positioned reads (`pread`) whatever the table's size: a 10M-row table is
//! never read whole, neither from disk nor into memory. The files are a cache: the committed
//! history (snapshots and journals of absolute row values) lives in the blob store, where every
//! replica brings its copy up to date from (see `strategy::fedsubavg::history`). A `version` file
//! beside the tables says which committed version they hold; without it they are not trusted.

use std::{
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use fedhive_shared::sparse::{SparseRows, TableShape};

/// The file beside a task's tables that names the version they hold.
const VERSION_FILE: &str = "version";

/// A table's file name: table names are tensor paths and may hold any character.
pub fn file_name(table: &str) -> String {
    format!("{}.f32", hex::encode(table.as_bytes()))
}

#[derive(Debug, Clone)]
pub struct TableStore {
    root: PathBuf,
}

/// Rows written per `write` call while creating a table.
const CREATE_CHUNK_ROWS: u64 = 1 << 16;

impl TableStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        TableStore { root: root.into() }
    }

    fn dir(&self, task_id: &str) -> PathBuf {
        self.root.join(task_id)
    }

    /// `<root>/<task>/<table name, hex>.f32`: table names are tensor paths and may hold any character.
    pub fn path(&self, task_id: &str, table: &str) -> PathBuf {
        self.dir(task_id).join(file_name(table))
    }

    /// The committed version the task's files hold, if they are known to hold one.
    pub fn version(&self, task_id: &str) -> std::io::Result<Option<i64>> {
        match std::fs::read_to_string(self.dir(task_id).join(VERSION_FILE)) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| std::io::Error::other(format!("table version file holds `{text}`"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records that the task's files hold `version` (after they were synced).
    pub fn set_version(&self, task_id: &str, version: i64) -> std::io::Result<()> {
        let tmp = self.staging_path(task_id)?;
        let mut file = File::create_new(&tmp)?;
        file.write_all(version.to_string().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir(task_id).join(VERSION_FILE))?;
        File::open(self.dir(task_id))?.sync_all()
    }

    /// Marks the task's files as holding no known version, before they are replaced one by one.
    pub fn clear_version(&self, task_id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir(task_id).join(VERSION_FILE)) {
            Ok(()) => File::open(self.dir(task_id))?.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the task has table files but no version file: a copy made before tables had a
    /// history in the blob store (its files hold every committed version whose journal is gone).
    pub fn has_unversioned_files(&self, task_id: &str) -> std::io::Result<bool> {
        if self.version(task_id)?.is_some() {
            return Ok(false);
        }
        match std::fs::read_dir(self.dir(task_id)) {
            Ok(entries) => Ok(entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with(".f32"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A new path in the task's folder to download a table to before [`Self::install`].
    pub fn staging_path(&self, task_id: &str) -> std::io::Result<PathBuf> {
        let dir = self.dir(task_id);
        std::fs::create_dir_all(&dir)?;
        Ok(dir.join(format!(".tmp-{:016x}", rand::random::<u64>())))
    }

    /// Moves a synced file from [`Self::staging_path`] into place as the table, once its size
    /// matches the shape.
    pub fn install(
        &self,
        task_id: &str,
        table: &str,
        shape: TableShape,
        staged: &Path,
    ) -> std::io::Result<()> {
        let len = std::fs::metadata(staged)?.len();
        if len != shape.bytes() {
            std::fs::remove_file(staged).ok();
            return Err(std::io::Error::other(format!(
                "table `{table}` is {len} bytes, expected {} rows of {} f32",
                shape.rows, shape.width
            )));
        }
        std::fs::rename(staged, self.path(task_id, table))?;
        File::open(self.dir(task_id))?.sync_all()
    }

    /// Creates (or replaces) an all-zero table without writing its bytes (a sparse file).
    pub fn create_zeros(&self, task_id: &str, table: &str, shape: TableShape) -> std::io::Result<()> {
        let staged = self.staging_path(task_id)?;
        let file = File::create_new(&staged)?;
        file.set_len(shape.bytes())?;
        file.sync_all()?;
        self.install(task_id, table, shape, &staged)
    }

    /// Creates (or replaces) a table, row `m` filled by `fill(m, row)`, durably and atomically.
    pub fn create(
        &self,
        task_id: &str,
        table: &str,
        shape: TableShape,
        mut fill: impl FnMut(u64, &mut [f32]),
    ) -> std::io::Result<()> {
        let tmp = self.staging_path(task_id)?;
        let file = File::create_new(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        let mut chunk = vec![0f32; (CREATE_CHUNK_ROWS as usize) * shape.width];
        let mut start = 0;
        while start < shape.rows {
            let n = CREATE_CHUNK_ROWS.min(shape.rows - start);
            let part = &mut chunk[..n as usize * shape.width];
            for (k, row) in part.chunks_exact_mut(shape.width).enumerate() {
                fill(start + k as u64, row);
            }
            out.write_all(bytemuck::cast_slice(part))?;
            start += n;
        }
        out.flush()?;
        drop(out);
        file.sync_all()?;
        self.install(task_id, table, shape, &tmp)
    }

    /// Reads rows `ids` (each `< shape.rows`; the caller checked) with one positioned read each.
    pub fn read_rows(
        &self,
        task_id: &str,
        table: &str,
        shape: TableShape,
        ids: &[u64],
    ) -> std::io::Result<SparseRows> {
        let file = File::open(self.path(task_id, table))?;
        let stride = (shape.width * 4) as u64;
        let mut rows = SparseRows {
            ids: ids.to_vec(),
            values: vec![0f32; ids.len() * shape.width],
            width: shape.width,
        };
        for (k, &id) in ids.iter().enumerate() {
            debug_assert!(id < shape.rows);
            let dst = &mut rows.values[k * shape.width..(k + 1) * shape.width];
            file.read_exact_at(bytemuck::cast_slice_mut(dst), id * stride)?;
        }
        Ok(rows)
    }

    /// Overwrites the given rows in place and syncs the file (absolute values: applying the same
    /// rows again changes nothing).
    pub fn write_rows(&self, task_id: &str, table: &str, rows: &SparseRows) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(task_id, table))?;
        let stride = (rows.width * 4) as u64;
        for (k, &id) in rows.ids.iter().enumerate() {
            file.write_all_at(bytemuck::cast_slice(rows.row(k)), id * stride)?;
        }
        file.sync_data()
    }

    /// Size of a table's file in bytes (for checks and benchmarks).
    pub fn file_len(&self, task_id: &str, table: &str) -> std::io::Result<u64> {
        Ok(std::fs::metadata(self.path(task_id, table))?.len())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = TableStore::new(dir.path());
        let shape = TableShape {
            rows: 100_000,
            width: 3,
        };
        store
            .create("t", "emb.weight", shape, |m, row| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = m as f32 + j as f32 * 0.5;
                }
            })
            .unwrap();
        assert_eq!(store.file_len("t", "emb.weight").unwrap(), 100_000 * 12);
        let rows = store
            .read_rows("t", "emb.weight", shape, &[99_999, 0, 65_536])
            .unwrap();
        assert_eq!(rows.row(0), &[99_999.0, 99_999.5, 100_000.0]);
        assert_eq!(rows.row(1), &[0.0, 0.5, 1.0]);
        assert_eq!(rows.row(2), &[65_536.0, 65_536.5, 65_537.0]);
        let mut new = SparseRows::new(3);
        new.push(7, &[-1.0, -2.0, -3.0]);
        store.write_rows("t", "emb.weight", &new).unwrap();
        store.write_rows("t", "emb.weight", &new).unwrap();
        let back = store.read_rows("t", "emb.weight", shape, &[6, 7, 8]).unwrap();
        assert_eq!(back.values, vec![6.0, 6.5, 7.0, -1.0, -2.0, -3.0, 8.0, 8.5, 9.0]);
        assert!(store.read_rows("other", "emb.weight", shape, &[0]).is_err());
    }
}
