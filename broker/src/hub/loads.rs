//! Messages read back from the log for delivery, off the hub task. A queued message that is no
//! longer cached (its queue is far behind) is read by the loader: `load_when_asked`, a task
//! the server starts, or `load_asked`, which a simulation runs when its seed says. The hub asks
//! for the next few such messages of a queue at once and leaves the queue where it stands;
//! when they come back (`Hub::take_loaded`) they are cached and the queues that waited go on.
//! So a handler never waits for the disk, and a session that needs many old messages (after a
//! restart, say) gets them a batch at a time.

use super::Hub;
use crate::delivery::cache::MessageCache;
use crate::delivery::queue::QueueEntry;
use crate::delivery::record::{PublishRecord, QueueId};
use crate::limits::{LOAD_REQUESTS_MAX, LOADS_PER_REQUEST};
use crate::message::Message;
use spool_storage::Wal;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Sequence numbers of publish records to read, in order, and where to send what was read.
#[derive(Debug)]
pub struct LoadRequest {
    seqs: Vec<u64>,
    /// Reading stops once this many bytes are read (after one message at least), so that
    /// the loads under way together take at most half of the cache.
    bytes_max: usize,
    reply: mpsc::Sender<Loaded>,
}

/// A message read back, with the bytes it keeps alive; `None` if it could not be (logged).
type LoadedMessage = Option<(Arc<Message>, usize)>;

/// Messages read for a [`LoadRequest`].
#[derive(Debug)]
pub struct Loaded {
    messages: Vec<(u64, LoadedMessage)>,
    /// Not read (past `bytes_max`, or the reading thread failed): asked for again when
    /// needed.
    unread: Vec<u64>,
}

/// Whether `entry`'s message must be read back before it is sent: it needs one (not a
/// release, not a retained message, which the entry holds) and it is neither cached nor known
/// to be unreadable.
pub(super) fn to_read(
    cache: &MessageCache,
    unreadable: &BTreeSet<u64>,
    entry: &QueueEntry,
) -> bool {
    !entry.released
        && entry.retained.is_none()
        && !cache.contains(entry.seq)
        && !unreadable.contains(&entry.seq)
}

impl Hub {
    /// Asks the loader for the next messages of `queue` that must be read back, as many as
    /// `session`'s window holds; the session goes on once a load comes back. A session that
    /// waits already does not ask again.
    pub(super) fn ask_for_loads(&mut self, session: u64, queue: QueueId, window: usize) {
        if !self.waiting_for_loads.insert(session) {
            return;
        }
        let Some(queue) = self.queues.get(&queue) else {
            return;
        };
        let seqs: Vec<u64> = queue
            .entries
            .waiting()
            .filter(|entry| to_read(&self.cache, &self.unreadable, entry))
            .map(|entry| entry.seq)
            .filter(|seq| !self.loading.contains(seq))
            .take(window.min(LOADS_PER_REQUEST))
            .collect();
        if seqs.is_empty() || self.loads_outstanding >= LOAD_REQUESTS_MAX {
            return; // asked for already, or asked again when a load under way comes back
        }
        let request = LoadRequest {
            seqs: seqs.clone(),
            bytes_max: self.limits.message_cache_bytes / (2 * LOAD_REQUESTS_MAX),
            reply: self.loaded_sender.clone(),
        };
        match self.loads.try_send(request) {
            Ok(()) => {
                self.loading.extend(seqs);
                self.loads_outstanding += 1;
            }
            Err(TrySendError::Full(_)) => unreachable!("no more loads under way than it holds"),
            Err(TrySendError::Closed(_)) => {
                // Only when the server stops: nothing will come to wait for.
                tracing::error!("the loader stopped");
                self.waiting_for_loads.remove(&session);
            }
        }
    }

    /// Takes in the messages the loader read, if some came back, and lets the queues that
    /// waited for them go on.
    pub fn take_loaded(&mut self) {
        while let Ok(loaded) = self.loaded_received.try_recv() {
            self.loaded(loaded);
        }
    }

    pub(super) fn loaded(&mut self, loaded: Loaded) {
        self.loads_outstanding -= 1;
        for seq in loaded.unread {
            self.loading.remove(&seq);
        }
        // The first needed is cached last: were the cache too small for all, it stays.
        for (seq, message) in loaded.messages.into_iter().rev() {
            self.loading.remove(&seq);
            match message {
                Some((message, bytes)) => self.cache.insert(seq, message, bytes),
                None => {
                    self.unreadable.insert(seq);
                }
            }
        }
        for session in std::mem::take(&mut self.waiting_for_loads) {
            self.pump(session);
        }
    }
}

/// Reads the publish records `seqs` in order and decodes their messages, until `bytes_max`.
fn read_messages(wal: &Wal, seqs: &[u64], bytes_max: usize) -> Loaded {
    let mut messages = Vec::new();
    let mut bytes_read = 0;
    for &seq in seqs {
        if bytes_read >= bytes_max && !messages.is_empty() {
            break;
        }
        let message = match wal.read(seq) {
            Ok(Some(record)) => {
                let bytes = record.payload.len();
                bytes_read += bytes;
                match PublishRecord::decode(record.payload) {
                    Ok(publish) => Some((Arc::new(publish.message), bytes)),
                    Err(e) => {
                        tracing::error!(seq, "undecodable publish record: {e}");
                        None
                    }
                }
            }
            Ok(None) => {
                tracing::error!(seq, "a queued message is no longer in the log");
                None
            }
            Err(e) => {
                tracing::error!(seq, "failed to read a queued message: {e}");
                None
            }
        };
        messages.push((seq, message));
    }
    let unread = seqs[messages.len()..].to_vec();
    Loaded { messages, unread }
}

/// Answers the hub's load requests, one at a time, on a blocking thread. Ends when the hub
/// does.
pub async fn load_when_asked(wal: Wal, mut requests: mpsc::Receiver<LoadRequest>) {
    while let Some(request) = requests.recv().await {
        let LoadRequest {
            seqs,
            bytes_max,
            reply,
        } = request;
        let wal = wal.clone();
        let asked = seqs.clone();
        let read = tokio::task::spawn_blocking(move || read_messages(&wal, &seqs, bytes_max));
        let loaded = match read.await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!("a read of queued messages failed: {e}");
                Loaded {
                    messages: Vec::new(),
                    unread: asked,
                }
            }
        };
        // An error means the hub stopped.
        let _ = reply.send(loaded).await;
    }
}

/// Answers the load requests asked so far, on this thread: the loader of a simulation.
/// Returns how many it answered.
pub fn load_asked(wal: &Wal, requests: &mut mpsc::Receiver<LoadRequest>) -> usize {
    let mut answered = 0;
    while let Ok(request) = requests.try_recv() {
        let loaded = read_messages(wal, &request.seqs, request.bytes_max);
        // Room for it: the hub has no more loads under way than its reply channel holds (and
        // an error means the hub stopped).
        let _ = request.reply.try_send(loaded);
        answered += 1;
    }
    answered
}
