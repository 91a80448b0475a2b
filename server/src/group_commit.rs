//! Group commit: accepted updates that arrive together are recorded in one SQL transaction.
//!
//! Each accepted update used to commit its own transaction, and each commit waits for the
//! database's log to reach the disk (an fsync of SQLite's WAL, or of PostgreSQL's WAL on its
//! server). Here the first upload to find no commit running starts one for every update queued
//! at that moment; updates arriving while it runs queue for the next. There is no timer: the
//! window is the time the previous commit takes, as with PostgreSQL's own group commit at its
//! default `commit_delay = 0`, so a lone upload waits for nothing but its own commit.
//!
//! No upload is acknowledged before the transaction holding its row has committed; a failed
//! commit fails every upload in it, and none of them counts (the device retries with the same
//! token). The commit runs in a task of its own, so an upload whose request is dropped mid-way
//! (the client went away) does not cancel the others' commit.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

use crate::db::{Accept, Db, DbError, UpdateRow};

/// Updates recorded by one transaction at most, so that one commit's statements stay short.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Option<UpdateRow>, DbError>>;

/// The queue of updates waiting to be recorded, shared by the uploads of one server.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    db: Db,
    queue: Arc<Mutex<Queue>>,
    /// Updates per committed transaction (`fedhive_group_commit_updates`).
    batch_sizes: Histogram,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: Vec<(Accept, Reply)>,
    /// A commit task is running; it takes `waiting` once its transaction is done.
    committing: bool,
}

/// The commit task's hold on the queue: if the task panics, fails the updates still queued (they
/// would otherwise wait for an upload that may never come to start the next task) and clears
/// [`Queue::committing`]; all of them, and the panicked batch's, get `GroupCommitStopped` and count
/// only if their transaction committed (a retry then gets the stored receipt).
struct Committing(Arc<Mutex<Queue>>);

impl Drop for Committing {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(mut queue) = self.0.lock()
        {
            queue.waiting.clear();
            queue.committing = false;
        }
    }
}

impl GroupCommit {
    pub fn new(db: Db, batch_sizes: Histogram) -> Self {
        GroupCommit {
            db,
            queue: Arc::default(),
            batch_sizes,
        }
    }

    /// Records `update` (see [`Db::accept_updates`]) together with whatever else is waiting, and
    /// returns once its transaction has committed: the stored row, or `None` when the round no
    /// longer takes it or its token already has a row.
    pub async fn accept(&self, update: Accept) -> Result<Option<UpdateRow>, DbError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().expect("commit queue");
            queue.waiting.push((update, reply));
            !std::mem::replace(&mut queue.committing, true)
        };
        if start {
            let committing = Committing(self.queue.clone());
            tokio::spawn(commit_while_waiting(
                self.db.clone(),
                committing,
                self.batch_sizes.clone(),
            ));
        }
        answer.await.unwrap_or(Err(DbError::GroupCommitStopped))
    }
}

/// Commits batches until none is waiting.
async fn commit_while_waiting(db: Db, committing: Committing, batch_sizes: Histogram) {
    loop {
        let batch: Vec<(Accept, Reply)> = {
            let mut queue = committing.0.lock().expect("commit queue");
            if queue.waiting.is_empty() {
                // Cleared under the lock that found the queue empty: an upload queueing after it
                // starts the next task.
                queue.committing = false;
                return;
            }
            let n = queue.waiting.len().min(MAX_BATCH);
            queue.waiting.drain(..n).collect()
        };
        let (updates, replies): (Vec<Accept>, Vec<Reply>) = batch.into_iter().unzip();
        match db.accept_updates(&updates, crate::store::now_ms()).await {
            Ok(stored) => {
                batch_sizes.observe(updates.len() as f64);
                for (reply, row) in replies.into_iter().zip(stored) {
                    // An upload whose request went away no longer listens; its row stands, and the
                    // round's finaliser reads its update from the blob store.
                    let _ = reply.send(Ok(row));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(DbError::GroupCommit(e.clone())));
                }
            }
        }
    }
}
