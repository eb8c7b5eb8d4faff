//! Progress: checkpoints, retained messages and QoS 2 receipts committed once a second, and the
//! log's space reclaimed from what the queues still need.

use super::{Hub, RECEIPTS_CHECKPOINT};
use crate::hub::retained::RETAINED_CHECKPOINT;
use crate::limits::{RECLAIM_LIVE_ENTRIES_MAX, RECLAIM_SEGMENTS_PER_RUN};
use crate::session::receipts;
use spool_storage::{Commit, Liveness, StateTable};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

impl Hub {
    /// Commits every persistent session's progress durably, with the retained messages and
    /// QoS 2 receipts. A checkpoint is the sequence before the first message still needed (or
    /// everything the hub has read, for an empty queue), so it never moves back.
    pub(super) fn commit_checkpoints(&mut self) {
        let read_through = self.tail.next_seq() - 1;
        let mut updates = Vec::new();
        for session in self.sessions.values().filter(|s| s.is_persistent()) {
            let checkpoint = session
                .queue
                .first_needed()
                .map_or(read_through, |first| first.saturating_sub(1));
            if checkpoint > session.checkpoint {
                updates.push((session.checkpoint_key(), checkpoint, session.id));
            }
        }
        if read_through > self.retained.checkpoint() || self.retained.has_uncommitted() {
            // Replaying after a restart, `read_through` may still be below the checkpoint.
            let checkpoint = read_through.max(self.retained.checkpoint());
            updates.push((RETAINED_CHECKPOINT.to_string(), checkpoint, 0));
        }
        // Receipts are complete through any durable record (see `session::receipts`).
        let receipts_through = self.wal.durable_seq().max(self.receipts_checkpoint);
        if receipts_through > self.receipts_checkpoint {
            updates.push((RECEIPTS_CHECKPOINT.to_string(), receipts_through, 0));
        }
        if !updates.is_empty() && self.commit_progress(&updates, read_through, receipts_through) {
            for (_, checkpoint, id) in updates {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.checkpoint = checkpoint;
                }
            }
        }
    }

    /// Lets the log free what no one needs any more (see `Wal::reclaim`): every record from
    /// the first one a replay after a restart reads whole (retained messages, QoS 2 receipts)
    /// or that the hub has not read yet, and below that, only what the queues still hold. A
    /// record no queue holds was acknowledged, expired or dropped by a counted rule; after a
    /// crash a queue may find older records again (at least once), never lose one it held.
    pub(super) fn reclaim_log_space(&mut self) {
        // Only sealed segments are reclaimed; and one reclaim at a time, on a slow disk.
        if self.wal.segment_count() < 2 || self.retention_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = ReclaimRunning(Arc::clone(&self.retention_running));
        let needed_from = self
            .tail
            .next_seq()
            .min(self.retained.replay_from())
            .min(self.receipts_checkpoint + 1);
        let liveness = self.liveness(needed_from);
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || {
            let _running = running;
            match wal.reclaim(&liveness) {
                Ok(report) if report.records_moved > 0 => tracing::debug!(
                    records_moved = report.records_moved,
                    segments_removed = report.segments_removed,
                    bytes_freed = report.bytes_freed,
                    "moved the few live records out of old log segments"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!("failed to free log space: {e}"),
            }
        });
    }

    /// What the queues still need of the log below `needed_from`, gathered only as far as
    /// that stays cheap on the hub task: over the oldest `RECLAIM_SEGMENTS_PER_RUN` segments,
    /// or fewer, down to the first, while the queues hold more than `RECLAIM_LIVE_ENTRIES_MAX`
    /// entries there (counted in O(log n) a queue). When even the first holds more, nothing is
    /// moved: only what lies below every queue's first entry can go.
    pub(super) fn liveness(&self, needed_from: u64) -> Liveness {
        let mut segments = RECLAIM_SEGMENTS_PER_RUN;
        while segments > 0 {
            let horizon = self.wal.reclaim_horizon(segments).min(needed_from);
            let entries: usize = self
                .sessions
                .values()
                .map(|s| s.queue.count_below(horizon))
                .sum();
            if entries <= RECLAIM_LIVE_ENTRIES_MAX {
                let mut live = Vec::with_capacity(entries);
                for session in self.sessions.values() {
                    session.queue.records_needed_below(horizon, &mut live);
                }
                live.sort_unstable();
                live.dedup();
                return Liveness {
                    needed_from: horizon,
                    live,
                };
            }
            segments /= 2;
        }
        let first_needed = self
            .sessions
            .values()
            .filter_map(|s| s.queue.first_needed());
        Liveness {
            needed_from: first_needed.fold(needed_from, u64::min),
            live: Vec::new(),
        }
    }

    /// Commits checkpoints with the retained changes read through `read_through` and the
    /// receipts complete through `receipts_through`, in one durable transaction.
    pub(super) fn commit_progress(
        &mut self,
        updates: &[(String, u64, u64)],
        read_through: u64,
        receipts_through: u64,
    ) -> bool {
        let receipts: Vec<(u64, String, Vec<u8>)> = self
            .sessions
            .values()
            .filter(|s| s.is_persistent())
            .filter_map(|s| {
                let current = receipts::lock(&s.receipts).through(receipts_through);
                let encoded = current.encode();
                let unchanged = match &s.receipts_stored {
                    Some(before) => *before == encoded,
                    None => current.is_empty(),
                };
                (!unchanged).then(|| (s.id, s.id.to_string(), encoded))
            })
            .collect();
        let retained = self.retained.changes();
        let changes: Vec<(StateTable, &str, Option<&[u8]>)> = retained
            .iter()
            .map(|(topic, message)| (StateTable::Retained, topic.as_str(), message.as_deref()))
            .chain(receipts.iter().map(|(_, key, stored)| {
                (StateTable::Qos2Receipts, key.as_str(), Some(&stored[..]))
            }))
            .collect();
        let pairs: Vec<(&str, u64)> = updates.iter().map(|(k, c, _)| (k.as_str(), *c)).collect();
        let committed = self
            .meta
            .set_checkpoints_and_state(&pairs, &changes, Commit::Durable);
        if let Err(e) = committed {
            tracing::error!("failed to commit checkpoints: {e}");
            return false;
        }
        self.retained.committed(read_through);
        self.receipts_checkpoint = receipts_through;
        for (id, _, stored) in receipts {
            if let Some(session) = self.sessions.get_mut(&id) {
                session.receipts_stored = Some(stored);
            }
        }
        true
    }
}

/// Held by a reclaim under way; lets the next one start when dropped, even by a panic.
struct ReclaimRunning(Arc<AtomicBool>);

impl Drop for ReclaimRunning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
