//! What a device keeps between runs of its app, in a directory the app chooses.
//!
//! A phone app is killed whenever the OS wants its memory, between any two steps of a round. So
//! every fact a later run needs is on disk before the step that depends on it: the credential as
//! soon as the server issues it (it is shown once), the assignment before training (an enrolled
//! device gets one upload token per round), the encoded update before it is sent (a retry must
//! send the same bytes, which the server then counts once), the receipt before the metrics. Each
//! file is replaced atomically (written beside, fsynced, renamed, directory fsynced), so a kill
//! leaves the old version or the new one, never half of either.
//!
//! Layout (`dir/`):
//! - `credentials.json`: the device's enrolment (`device_id`, `device_secret`).
//! - `tasks/<task>/model.safetensors` and `model.json`: the last model downloaded and its version
//!   (the download's ETag), reused while the version stays the same.
//! - `tasks/<task>/control.safetensors` and `control.json`: DC-CCL's control model `F_m` and its
//!   version, downloaded once per version.
//! - `tasks/<task>/round.json` and `update.bin`: the round in progress ([`PendingRound`]).
//! - `tasks/<task>/features.json`: FedSubAvg's enrolled feature set ([`EnrolledFeatures`]).
//! - `tasks/<task>/private/`: per-task private state (e.g. an anonymous embedding's distribution),
//!   never sent anywhere.
//!
//! A file that does not parse is [`StateError::Corrupt`], naming the file and how to start over
//! ([`DeviceState::reset_task`], or deleting the file); reading state never panics.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedhive_shared::sparse::FeatureSet;
use fedhive_shared::wire::{Assignment, DeviceCredentials, UploadReceipt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

/// Why device state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("device state {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("device state {path} is corrupt ({reason}); delete it, or reset the task's state, to start over")]
    Corrupt { path: PathBuf, reason: String },
    #[error("task id `{0}` cannot name a state directory (letters, digits, `-` and `_` only)")]
    BadTaskId(String),
}

/// A round the device has started and not finished, by how far it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRound {
    pub assignment: Assignment,
    pub stage: RoundStage,
}

/// A pending round and, once it is trained, its encoded update.
pub type RoundInProgress = (PendingRound, Option<Vec<u8>>);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum RoundStage {
    /// Checked in: the assignment (and its upload token) is held; nothing trained yet.
    Assigned,
    /// Trained: the encoded update is in `update.bin` (its SHA-256 here), waiting to be sent.
    Trained {
        num_samples: u64,
        loss: f32,
        update_sha256: String,
    },
    /// The server acknowledged the update; the metrics report is still to send.
    Uploaded {
        receipt: UploadReceipt,
        num_samples: u64,
        loss: f32,
    },
}

/// FedSubAvg: a feature set the server has acknowledged, under the device id it was sent with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolledFeatures {
    pub device_id: String,
    pub features: FeatureSet,
}

/// The last model a task's device downloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CachedModel {
    version: i64,
    sha256: String,
}

/// A device's state directory.
#[derive(Debug, Clone)]
pub struct DeviceState {
    dir: PathBuf,
}

impl DeviceState {
    /// The state in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<DeviceState, StateError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(DeviceState { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn credentials(&self) -> Result<Option<DeviceCredentials>, StateError> {
        read_json(&self.dir.join("credentials.json"))
    }

    pub fn save_credentials(&self, credentials: &DeviceCredentials) -> Result<(), StateError> {
        write_json(&self.dir.join("credentials.json"), credentials)
    }

    fn task_dir(&self, task_id: &str) -> Result<PathBuf, StateError> {
        let safe = !task_id.is_empty()
            && task_id.len() <= 128
            && task_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !safe {
            return Err(StateError::BadTaskId(task_id.to_string()));
        }
        let dir = self.dir.join("tasks").join(task_id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// A directory for `task_id`'s private state, created if missing.
    pub fn private_dir(&self, task_id: &str) -> Result<PathBuf, StateError> {
        let dir = self.task_dir(task_id)?.join("private");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// The cached model of `task_id` if it is version `version` (its bytes checked against the
    /// digest stored with them).
    pub fn cached_model(&self, task_id: &str, version: i64) -> Result<Option<Vec<u8>>, StateError> {
        self.cached(task_id, "model", version)
    }

    /// Keeps `bytes` as `task_id`'s model of version `version`.
    pub fn save_model(&self, task_id: &str, version: i64, bytes: &[u8]) -> Result<(), StateError> {
        self.save_cached(task_id, "model", version, bytes)
    }

    /// DC-CCL: the cached control model `F_m` of `task_id` if it is version `version`.
    pub fn cached_control(&self, task_id: &str, version: i64) -> Result<Option<Vec<u8>>, StateError> {
        self.cached(task_id, "control", version)
    }

    /// DC-CCL: keeps `bytes` as `task_id`'s control model of version `version`.
    pub fn save_control(&self, task_id: &str, version: i64, bytes: &[u8]) -> Result<(), StateError> {
        self.save_cached(task_id, "control", version, bytes)
    }

    /// `<stem>.safetensors` if `<stem>.json` names version `version` and the bytes match its digest.
    fn cached(&self, task_id: &str, stem: &str, version: i64) -> Result<Option<Vec<u8>>, StateError> {
        let dir = self.task_dir(task_id)?;
        let meta_name = format!("{stem}.json");
        let Some(meta) = read_json::<CachedModel>(&dir.join(&meta_name))? else {
            return Ok(None);
        };
        if meta.version != version {
            return Ok(None);
        }
        let path = dir.join(format!("{stem}.safetensors"));
        let bytes = read_bytes(&path)?.ok_or_else(|| StateError::Corrupt {
            path: path.clone(),
            reason: format!("{meta_name} names a model that is missing"),
        })?;
        if sha256_hex(&bytes) != meta.sha256 {
            return Err(StateError::Corrupt {
                path,
                reason: format!("its bytes do not match the digest in {meta_name}"),
            });
        }
        Ok(Some(bytes))
    }

    /// The bytes are written before the version that names them, so a kill between the two
    /// leaves a digest mismatch at worst, which [`DeviceState::cached`] reports, not a wrong model.
    fn save_cached(&self, task_id: &str, stem: &str, version: i64, bytes: &[u8]) -> Result<(), StateError> {
        let dir = self.task_dir(task_id)?;
        write_atomically(&dir.join(format!("{stem}.safetensors")), bytes)?;
        let meta = CachedModel {
            version,
            sha256: sha256_hex(bytes),
        };
        write_json(&dir.join(format!("{stem}.json")), &meta)
    }

    /// The round in progress for `task_id`, with the update's bytes once it is trained.
    pub fn pending_round(&self, task_id: &str) -> Result<Option<RoundInProgress>, StateError> {
        let dir = self.task_dir(task_id)?;
        let Some(round) = read_json::<PendingRound>(&dir.join("round.json"))? else {
            return Ok(None);
        };
        let update = match &round.stage {
            RoundStage::Trained { update_sha256, .. } => {
                let path = dir.join("update.bin");
                let bytes = read_bytes(&path)?.ok_or_else(|| StateError::Corrupt {
                    path: path.clone(),
                    reason: "round.json names an update that is missing".into(),
                })?;
                if &sha256_hex(&bytes) != update_sha256 {
                    return Err(StateError::Corrupt {
                        path,
                        reason: "its bytes do not match the digest in round.json".into(),
                    });
                }
                Some(bytes)
            }
            _ => None,
        };
        Ok(Some((round, update)))
    }

    /// Records a new assignment (the round starts).
    pub fn save_assignment(&self, assignment: &Assignment) -> Result<(), StateError> {
        let round = PendingRound {
            assignment: assignment.clone(),
            stage: RoundStage::Assigned,
        };
        write_json(&self.task_dir(&assignment.task_id)?.join("round.json"), &round)
    }

    /// Records the trained update: its bytes first, then the stage that names them.
    pub fn save_update(
        &self,
        assignment: &Assignment,
        update: &[u8],
        num_samples: u64,
        loss: f32,
    ) -> Result<(), StateError> {
        let dir = self.task_dir(&assignment.task_id)?;
        write_atomically(&dir.join("update.bin"), update)?;
        let round = PendingRound {
            assignment: assignment.clone(),
            stage: RoundStage::Trained {
                num_samples,
                loss,
                update_sha256: sha256_hex(update),
            },
        };
        write_json(&dir.join("round.json"), &round)
    }

    /// Records the server's receipt for the round's update.
    pub fn save_receipt(
        &self,
        assignment: &Assignment,
        receipt: &UploadReceipt,
        num_samples: u64,
        loss: f32,
    ) -> Result<(), StateError> {
        let round = PendingRound {
            assignment: assignment.clone(),
            stage: RoundStage::Uploaded {
                receipt: receipt.clone(),
                num_samples,
                loss,
            },
        };
        write_json(&self.task_dir(&assignment.task_id)?.join("round.json"), &round)
    }

    /// FedSubAvg: the feature set this device last enrolled in `task_id`, and the id it used.
    pub fn enrolled_features(&self, task_id: &str) -> Result<Option<EnrolledFeatures>, StateError> {
        read_json(&self.task_dir(task_id)?.join("features.json"))
    }

    pub fn save_enrolled_features(
        &self,
        task_id: &str,
        enrolled: &EnrolledFeatures,
    ) -> Result<(), StateError> {
        write_json(&self.task_dir(task_id)?.join("features.json"), enrolled)
    }

    /// Ends the round in progress (finished, or given up: its deadline passed).
    pub fn clear_round(&self, task_id: &str) -> Result<(), StateError> {
        let dir = self.task_dir(task_id)?;
        remove_if_present(&dir.join("round.json"))?;
        remove_if_present(&dir.join("update.bin"))?;
        sync_dir(&dir)
    }

    /// Forgets everything kept for `task_id` (its cached model, round in progress and private
    /// state): the way out of a corrupt file. The credential stays.
    pub fn reset_task(&self, task_id: &str) -> Result<(), StateError> {
        let dir = self.task_dir(task_id)?;
        std::fs::remove_dir_all(&dir).map_err(io(&dir))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.into(),
        source,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// The JSON value stored at `path`, `None` when there is none.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let Some(bytes) = read_bytes(path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StateError::Corrupt {
            path: path.into(),
            reason: e.to_string(),
        })
}

/// Replaces `path` with `value` as JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    write_atomically(path, &serde_json::to_vec(value).expect("state values serialise"))
}

/// Replaces `path` with `bytes` so that a kill at any moment leaves the old file or the new one:
/// a temporary file beside it, fsync, rename over, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

fn remove_if_present(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use fedhive_shared::wire::{TrainingParams, UploadKind};

    use super::*;

    fn assignment() -> Assignment {
        Assignment {
            task_id: "task-1".into(),
            round_id: 7,
            model_version: 3,
            model: "mlp".into(),
            training: TrainingParams {
                local_epochs: 1,
                max_local_steps: 0,
                batch_size: 8,
                learning_rate: 0.05,
                learning_rate_schedule: None,
            },
            upload_token: "tok".into(),
            deadline_unix: 0,
            upload: UploadKind::Delta,
            encoding: Default::default(),
            block: None,
            control: None,
        }
    }

    #[test]
    fn a_round_survives_a_restart_stage_by_stage() {
        let dir = tempfile::tempdir().unwrap();
        let a = assignment();
        let state = DeviceState::open(dir.path()).unwrap();
        assert!(state.pending_round("task-1").unwrap().is_none());
        state.save_assignment(&a).unwrap();
        let reopened = DeviceState::open(dir.path()).unwrap();
        let (round, update) = reopened.pending_round("task-1").unwrap().unwrap();
        assert_eq!(
            (round.assignment, round.stage, update),
            (a.clone(), RoundStage::Assigned, None)
        );

        state.save_update(&a, b"update bytes", 12, 0.5).unwrap();
        let (round, update) = reopened.pending_round("task-1").unwrap().unwrap();
        assert!(matches!(round.stage, RoundStage::Trained { num_samples: 12, .. }));
        assert_eq!(update.as_deref(), Some(&b"update bytes"[..]));

        state.clear_round("task-1").unwrap();
        assert!(reopened.pending_round("task-1").unwrap().is_none());
    }

    #[test]
    fn the_cached_model_is_kept_by_version() {
        let dir = tempfile::tempdir().unwrap();
        let state = DeviceState::open(dir.path()).unwrap();
        state.save_model("task-1", 4, b"weights v4").unwrap();
        assert_eq!(
            state.cached_model("task-1", 4).unwrap().as_deref(),
            Some(&b"weights v4"[..])
        );
        assert_eq!(state.cached_model("task-1", 5).unwrap(), None);
        // The control model has a slot of its own: neither evicts the other.
        state.save_control("task-1", 2, b"control v2").unwrap();
        assert_eq!(
            state.cached_control("task-1", 2).unwrap().as_deref(),
            Some(&b"control v2"[..])
        );
        assert_eq!(
            state.cached_model("task-1", 4).unwrap().as_deref(),
            Some(&b"weights v4"[..])
        );
        assert_eq!(state.cached_control("task-1", 4).unwrap(), None);
    }

    #[test]
    fn corrupt_state_is_a_clear_error_and_reset_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = DeviceState::open(dir.path()).unwrap();
        let a = assignment();
        state.save_update(&a, b"update bytes", 12, 0.5).unwrap();

        // A torn update file: the digest in round.json no longer matches.
        std::fs::write(dir.path().join("tasks/task-1/update.bin"), b"upd").unwrap();
        let err = state.pending_round("task-1").unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("update.bin"), "{err}");

        // Garbage where JSON belongs.
        std::fs::write(dir.path().join("tasks/task-1/round.json"), b"\x00{not json").unwrap();
        let err = state.pending_round("task-1").unwrap_err();
        assert!(
            err.to_string().contains("round.json") && err.to_string().contains("start over"),
            "{err}"
        );
        std::fs::write(dir.path().join("credentials.json"), b"[1,2]").unwrap();
        assert!(matches!(state.credentials(), Err(StateError::Corrupt { .. })));

        state.reset_task("task-1").unwrap();
        assert!(state.pending_round("task-1").unwrap().is_none());
    }

    #[test]
    fn task_ids_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = DeviceState::open(dir.path()).unwrap();
        for id in ["../x", "a/b", "", "."] {
            assert!(
                matches!(state.private_dir(id), Err(StateError::BadTaskId(_))),
                "{id}"
            );
        }
    }
}
