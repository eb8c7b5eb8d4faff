//! [`MetaWriter`]: the hub's writes to the metadata store (sessions created, subscribed,
//! unsubscribed, forgotten), made off the hub task and grouped: one thread takes every write
//! queued while the previous commit ran and commits them in one durable transaction. After a
//! failover every module reconnects and subscribes at once; one fsync each, on the hub task,
//! would stall delivery to everyone. What a write confirms to a client (a SUBACK, a CONNACK)
//! goes out from its completion, once the write is durable.

use crate::limits::METADATA_WRITES_MAX;
use spool_storage::{Commit, Meta, MetaChange};
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

/// Runs once a write is durable, or failed, with the outcome.
pub(super) type Completion = Box<dyn FnOnce(spool_storage::Result<()>) + Send>;

/// Changes to commit, and what to do after.
struct Write {
    changes: Vec<MetaChange>,
    done: Option<Completion>,
}

/// The queue of metadata writes and who commits them: a thread of its own, or the caller
/// ([`MetaWriter::commit_queued`], for deterministic simulations). Dropping it commits what is
/// queued and waits for the thread (at shutdown: nothing queued is lost).
pub struct MetaWriter {
    meta: Arc<Meta>,
    committer: Committer,
}

enum Committer {
    Thread {
        /// `None` once dropping began.
        writes: Option<mpsc::SyncSender<Write>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    Caller(Mutex<Vec<Write>>),
}

impl std::fmt::Debug for MetaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let committer = match self.committer {
            Committer::Thread { .. } => "thread",
            Committer::Caller(_) => "caller",
        };
        f.debug_struct("MetaWriter")
            .field("committer", &committer)
            .finish_non_exhaustive()
    }
}

impl Drop for MetaWriter {
    fn drop(&mut self) {
        match &mut self.committer {
            Committer::Thread { writes, thread } => {
                drop(writes.take());
                if let Some(thread) = thread.take() {
                    // A panic there is a bug that already failed its writes' completions.
                    let _ = thread.join();
                }
            }
            Committer::Caller(_) => {
                self.commit_queued();
            }
        }
    }
}

impl MetaWriter {
    /// Starts the writer thread; it stops once the writer is dropped and its queue is done.
    ///
    /// # Errors
    /// If the thread cannot be started.
    pub fn start(meta: Arc<Meta>) -> std::io::Result<MetaWriter> {
        let (writes, queue) = mpsc::sync_channel(METADATA_WRITES_MAX);
        let committing = Arc::clone(&meta);
        let thread = std::thread::Builder::new()
            .name("spool-meta-writer".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < METADATA_WRITES_MAX {
                        match queue.try_recv() {
                            Ok(write) => batch.push(write),
                            Err(_) => break,
                        }
                    }
                    commit_batch(&committing, batch);
                }
            })?;
        Ok(MetaWriter {
            meta,
            committer: Committer::Thread {
                writes: Some(writes),
                thread: Some(thread),
            },
        })
    }

    /// A writer whose writes wait for [`MetaWriter::commit_queued`]: a simulation on one
    /// thread then decides when they become durable.
    #[must_use]
    pub fn run_by_caller(meta: Arc<Meta>) -> MetaWriter {
        MetaWriter {
            meta,
            committer: Committer::Caller(Mutex::default()),
        }
    }

    /// Commits every queued write in one transaction and runs their completions; returns how
    /// many. Only a writer made by [`MetaWriter::run_by_caller`] queues writes for this.
    pub fn commit_queued(&self) -> usize {
        let Committer::Caller(queued) = &self.committer else {
            return 0;
        };
        let batch = std::mem::take(&mut *queued.lock().unwrap_or_else(PoisonError::into_inner));
        let count = batch.len();
        if count > 0 {
            commit_batch(&self.meta, batch);
        }
        count
    }

    /// Queues `changes`, committed in order with every other write; `done` runs once they are
    /// durable. It does not wait for the writer unless `METADATA_WRITES_MAX` writes are queued
    /// already (a disk that slow): then it waits for room, since committing here would put
    /// this write before older ones for the same session.
    pub(super) fn write(&self, changes: Vec<MetaChange>, done: Option<Completion>) {
        let write = Write { changes, done };
        let writes = match &self.committer {
            Committer::Caller(queued) => {
                queued
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(write);
                return;
            }
            Committer::Thread { writes, .. } => writes,
        };
        let Some(writes) = writes else {
            return finish(write.done, Err(spool_storage::Error::Closed));
        };
        let write = match writes.try_send(write) {
            Ok(()) => return,
            Err(TrySendError::Full(write)) => {
                tracing::warn!(
                    "metadata writes are {METADATA_WRITES_MAX} behind: the hub waits for the disk"
                );
                match writes.send(write) {
                    Ok(()) => return,
                    Err(mpsc::SendError(write)) => write,
                }
            }
            Err(TrySendError::Disconnected(write)) => write,
        };
        // The writer thread is gone (it panicked): commit here rather than lose the write.
        let result = self.meta.apply(&write.changes, Commit::Durable);
        finish(write.done, result);
    }
}

/// Commits `batch` in one transaction and runs its completions.
fn commit_batch(meta: &Meta, mut batch: Vec<Write>) {
    let changes: Vec<MetaChange> = batch
        .iter_mut()
        .flat_map(|write| std::mem::take(&mut write.changes))
        .collect();
    let result = meta.apply(&changes, Commit::Durable);
    for write in batch {
        finish(write.done, result.clone());
    }
}

fn finish(done: Option<Completion>, result: spool_storage::Result<()>) {
    match done {
        Some(done) => done(result),
        None => {
            if let Err(e) = result {
                tracing::error!("failed to store session metadata: {e}");
            }
        }
    }
}
