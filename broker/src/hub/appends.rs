//! Records the hub logs itself (a subscriber's PUBREC, a will). The hub hands them to the
//! appender (`append_when_asked`, a task the server starts), which waits its turn for room in
//! the log like any publisher, so they are neither starved by busy publishers nor waited for on
//! the hub's task. While the appender's queue is full they wait here, in order, and are handed
//! over on the next tick; past `OWN_APPENDS_MAX` waiting, more are refused with a log line.
//! The hub's tail sees them once they are durable.

use super::Hub;
use crate::limits::OWN_APPENDS_MAX;
use bytes::Bytes;
use spool_storage::{Reservation, Wal};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// A record the hub logs itself.
#[derive(Debug)]
pub struct OwnAppend {
    pub(super) kind: u8,
    pub(super) payload: Bytes,
    pub(super) metering: Metering,
    /// What it is, for log lines.
    pub(super) what: &'static str,
}

/// Whether a record of the hub's own counts against the log's quota and disk reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Metering {
    /// Refused at the quota like a client's publish (a will: it has no client left to wait).
    Quota,
    /// Logged even at the quota: it lets a message complete and its space be freed (a
    /// subscriber's PUBREC); the in-flight windows bound how many there are.
    BeyondQuota,
}

impl Hub {
    /// Hands `append` to the appender, after those still waiting here.
    pub(super) fn append_own(&mut self, append: OwnAppend) {
        if self.own_appends.len() >= OWN_APPENDS_MAX {
            tracing::error!(
                "not logging {}: {OWN_APPENDS_MAX} records of the hub's own wait for the log already",
                append.what
            );
            return;
        }
        self.own_appends.push_back(append);
        self.hand_over_own_appends();
    }

    /// Hands the waiting records of the hub's own to the appender, in order, while it takes
    /// them.
    pub(super) fn hand_over_own_appends(&mut self) {
        while let Some(append) = self.own_appends.pop_front() {
            match self.appender.try_send(append) {
                Ok(()) => {}
                Err(TrySendError::Full(append)) => {
                    self.own_appends.push_front(append);
                    return; // the next tick tries again
                }
                Err(TrySendError::Closed(append)) => {
                    tracing::warn!("not logging {}: the appender stopped", append.what);
                }
            }
        }
    }
}

impl OwnAppend {
    /// Queues the record in the room taken for it in the log, or says why it could not.
    fn submit(self, room: spool_storage::Result<Reservation<'_>>) {
        let submitted = room.and_then(|room| match self.metering {
            Metering::Quota => room.submit(),
            Metering::BeyondQuota => room.submit_beyond_quota(),
        });
        if let Err(e) = submitted {
            tracing::warn!("failed to log {}: {e}", self.what);
        }
    }
}

/// Logs the records the hub hands over, in order, each waiting its turn for room in the log.
/// Ends when the hub does.
pub async fn append_when_asked(wal: Wal, mut requests: mpsc::Receiver<OwnAppend>) {
    while let Some(append) = requests.recv().await {
        let room = wal.reserve(append.kind, append.payload.clone()).await;
        append.submit(room);
    }
}

/// Logs the records handed over so far, in order, without waiting: the appender of a
/// simulation that runs on one thread (where a record that finds no room in the log's queue
/// is not logged, and says so). Returns how many it took.
pub fn append_handed_over(wal: &Wal, requests: &mut mpsc::Receiver<OwnAppend>) -> usize {
    let mut taken = 0;
    while let Ok(append) = requests.try_recv() {
        let room = wal.try_reserve(append.kind, append.payload.clone());
        append.submit(room);
        taken += 1;
    }
    taken
}
