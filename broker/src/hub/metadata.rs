//! [`MetaWriter`]: the hub's writes to the metadata store (sessions created, subscribed,
//! unsubscribed, forgotten), made off the hub task and grouped: one thread takes every write
//! queued while the previous commit ran and commits them in one durable transaction. After a
//! failover every module reconnects and subscribes at once; one fsync each, on the hub task,
//! would stall delivery to everyone. What a write confirms to a client (a SUBACK, a CONNACK)
//! goes out from its completion, once the write is durable.

use crate::limits::METADATA_WRITES_MAX;
use spool_storage::{Commit, Meta, MetaChange};
use std::sync::Arc;
use std::sync::mpsc::{self, TrySendError};

/// Runs once a write is durable, or failed, with the outcome.
pub(super) type Completion = Box<dyn FnOnce(spool_storage::Result<()>) + Send>;

/// Changes to commit, and what to do after.
struct Write {
    changes: Vec<MetaChange>,
    done: Option<Completion>,
}

/// The queue of metadata writes and the thread that commits them. Dropping it commits what
/// is queued and waits for the thread (at shutdown: nothing queued is lost).
pub(super) struct MetaWriter {
    meta: Arc<Meta>,
    /// `None` once dropping began.
    writes: Option<mpsc::SyncSender<Write>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MetaWriter {
    fn drop(&mut self) {
        drop(self.writes.take());
        if let Some(thread) = self.thread.take() {
            // A panic there is a bug that already failed its writes' completions.
            let _ = thread.join();
        }
    }
}

impl MetaWriter {
    /// Starts the writer thread; it stops once the writer is dropped and its queue is done.
    ///
    /// # Errors
    /// If the thread cannot be started.
    pub(super) fn start(meta: Arc<Meta>) -> std::io::Result<MetaWriter> {
        let (writes, queue) = mpsc::sync_channel(METADATA_WRITES_MAX);
        let committing = Arc::clone(&meta);
        let thread = std::thread::Builder::new()
            .name("spool-meta-writer".into())
            .spawn(move || commit_batches(&committing, queue))?;
        Ok(MetaWriter {
            meta,
            writes: Some(writes),
            thread: Some(thread),
        })
    }

    /// Queues `changes`, committed in order with every other write; `done` runs once they are
    /// durable. It does not wait for the writer unless `METADATA_WRITES_MAX` writes are queued
    /// already (a disk that slow): then it waits for room, since committing here would put
    /// this write before older ones for the same session.
    pub(super) fn write(&self, changes: Vec<MetaChange>, done: Option<Completion>) {
        let write = Write { changes, done };
        let Some(writes) = &self.writes else {
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

/// Commits everything queued while the previous commit ran, in one transaction.
fn commit_batches(meta: &Meta, queue: mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < METADATA_WRITES_MAX {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let changes: Vec<MetaChange> = batch
            .iter_mut()
            .flat_map(|write| std::mem::take(&mut write.changes))
            .collect();
        let result = meta.apply(&changes, Commit::Durable);
        for write in batch {
            finish(write.done, result.clone());
        }
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
