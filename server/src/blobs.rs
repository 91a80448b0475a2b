//! Blob store for model and update tensors: a local directory by default.
//!
//! Writes are atomic and durable (write to a temp file, fsync, rename, fsync the directory), so a blob
//! that a database row points to is complete after any crash. Keys are relative paths with `/`.
//! An object store (S3) can take this module's place behind the same four operations.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use bytes::Bytes;

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    latency: crate::telemetry::StorageLatency,
}

impl BlobStore {
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(BlobStore {
            root,
            latency: Default::default(),
        })
    }

    /// Times this store's reads and writes into a server's metrics.
    pub fn with_latency(mut self, latency: crate::telemetry::StorageLatency) -> Self {
        self.latency = latency;
        self
    }

    fn path(&self, key: &str) -> PathBuf {
        debug_assert!(!key.contains(".."), "blob keys are generated, never user input");
        self.root.join(key)
    }

    /// Stores `data` under `key`, replacing any previous blob, durably.
    pub async fn put(&self, key: &str, data: Bytes) -> std::io::Result<()> {
        let path = self.path(key);
        let write = async {
            tokio::task::spawn_blocking(move || write_durably(&path, &data))
                .await
                .map_err(std::io::Error::other)?
        };
        self.latency.time("blobs", "put", write).await
    }

    /// Whether the store can be used: its root is a directory that is not read-only.
    pub async fn check(&self) -> std::io::Result<()> {
        let meta = tokio::fs::metadata(&self.root).await?;
        if !meta.is_dir() || meta.permissions().readonly() {
            return Err(std::io::Error::other(format!(
                "{} is not a writable directory",
                self.root.display()
            )));
        }
        Ok(())
    }

    pub async fn get(&self, key: &str) -> std::io::Result<Bytes> {
        let read = tokio::fs::read(self.path(key));
        Ok(Bytes::from(self.latency.time("blobs", "get", read).await?))
    }

    /// Removes one blob (missing is fine).
    pub async fn delete(&self, key: &str) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Names of the blobs directly in the folder `prefix` (none if it does not exist).
    pub async fn list(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        let mut dir = match tokio::fs::read_dir(self.path(prefix)).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        while let Some(entry) = dir.next_entry().await? {
            if let Some(name) = entry.file_name().to_str()
                && !name.starts_with(".tmp-")
            {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    /// The directory that holds the blobs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes every blob under the folder `prefix` (missing is fine).
    pub async fn delete_prefix(&self, prefix: &str) -> std::io::Result<()> {
        let remove = tokio::fs::remove_dir_all(self.path(prefix));
        match self.latency.time("blobs", "delete_prefix", remove).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("blob keys have a folder");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(data)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = format!(".tmp-{:016x}", rand::random::<u64>());
    let path = dir.join(name);
    let file = std::fs::File::create_new(&path)?;
    Ok((path, file))
}
