//! Records the hub logs itself (a subscriber's PUBREC, a will), without waiting and without a
//! task of its own: queued in the log at once, or, while the log's queue is full, kept in order
//! and tried again on the next tick. The hub's tail sees them once they are durable.

use super::Hub;
use bytes::Bytes;

/// A record the hub logs itself.
#[derive(Debug)]
pub(super) struct OwnAppend {
    pub kind: u8,
    pub payload: Bytes,
    pub metering: Metering,
    /// What it is, for log lines.
    pub what: &'static str,
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
    /// Logs `append` now, or after those still waiting for room in the log's queue.
    pub(super) fn append_own(&mut self, append: OwnAppend) {
        self.own_appends.push_back(append);
        self.retry_own_appends();
    }

    /// Queues the waiting records of the hub's own, in order, while the log takes them.
    pub(super) fn retry_own_appends(&mut self) {
        while let Some(append) = self.own_appends.front() {
            let payload = append.payload.clone();
            let submitted = match append.metering {
                Metering::Quota => self.wal.try_submit(append.kind, payload),
                Metering::BeyondQuota => self.wal.try_submit_beyond_quota(append.kind, payload),
            };
            match submitted {
                Ok(_durable_later) => {}
                Err(spool_storage::Error::QueueFull) => return, // the next tick tries again
                Err(e) => tracing::warn!("failed to log {}: {e}", append.what),
            }
            self.own_appends.pop_front();
        }
    }
}
