//! Progress: checkpoints, retained messages and QoS 2 receipts committed once a second, and the
//! log's space reclaimed from what the queues still need.

use super::{Hub, RECEIPTS_CHECKPOINT};
use crate::delivery::record::QueueId;
use crate::hub::retained::{self, RETAINED_CHECKPOINT};
use crate::id_hash::IdMap;
use crate::limits::{RECLAIM_LIVE_ENTRIES_MAX, RECLAIM_SEGMENTS_PER_RUN};
use crate::message::Message;
use crate::session::{Session, receipts};
use spool_storage::{Liveness, MetaChange, StateTable, Wal};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

impl Hub {
    /// Commits every persistent session's progress, with the retained messages and QoS 2
    /// receipts, in one durable transaction made by the metadata writer, off the hub task; its
    /// outcome comes back as a [`ProgressReport`]. One at a time: the next waits for the tick
    /// after. A checkpoint is the sequence before the first message still needed (or
    /// everything the hub has read, for an empty queue), so it never moves back.
    pub(super) fn commit_checkpoints(&mut self) {
        if self.progress_in_flight {
            return;
        }
        let read_through = self.tail.next_seq() - 1;
        let mut report = ProgressReport {
            committed: false,
            read_through,
            // Receipts are complete through any durable record (see `session::receipts`).
            receipts_through: self.wal.durable_seq().max(self.receipts_checkpoint),
            ..ProgressReport::default()
        };
        let mut changes = Vec::new();
        // Route endpoints' queues and persistent sessions' are checkpointed: the others do not
        // outlive spool.
        let persistent = self.sessions.values().filter(|s| s.is_persistent());
        let sessions = persistent.map(|s| (s.queue(), s.forgotten));
        let endpoints = self.endpoints.keys().map(|&n| (QueueId::Endpoint(n), 0));
        for (id, forgotten) in sessions.chain(endpoints) {
            let Some(queue) = self.queues.get(&id) else {
                continue;
            };
            let checkpoint = queue.checkpoint_due(read_through);
            if checkpoint > queue.checkpoint {
                changes.push(checkpoint_change(queue.checkpoint_key(), checkpoint));
                report.queues.push((id, forgotten, checkpoint));
            }
        }
        if read_through > self.retained.checkpoint() || self.retained.has_uncommitted() {
            // Replaying after a restart, `read_through` may still be below the checkpoint.
            let checkpoint = read_through.max(self.retained.checkpoint());
            changes.push(checkpoint_change(RETAINED_CHECKPOINT.into(), checkpoint));
            report.retained = self.retained.take_changes();
            changes.extend(
                report
                    .retained
                    .iter()
                    .map(|(topic, message)| MetaChange::State {
                        table: StateTable::Retained,
                        key: topic.clone(),
                        value: message.as_deref().map(retained::encode),
                    }),
            );
        }
        if report.receipts_through > self.receipts_checkpoint {
            let through = report.receipts_through;
            changes.push(checkpoint_change(RECEIPTS_CHECKPOINT.into(), through));
        }
        report.receipts = self.changed_receipts(report.receipts_through);
        changes.extend(
            report
                .receipts
                .iter()
                .map(|(id, _, stored)| MetaChange::State {
                    table: StateTable::Qos2Receipts,
                    key: id.to_string(),
                    value: Some(stored.clone()),
                }),
        );
        if changes.is_empty() {
            return;
        }
        self.progress_in_flight = true;
        let mut outcome = ReportOnDrop {
            report: Some(report),
            reports: self.progress_reports.clone(),
        };
        let done = move |result: spool_storage::Result<()>| {
            if let Err(e) = &result {
                tracing::error!("failed to commit checkpoints: {e}");
            }
            outcome.send(result.is_ok());
        };
        self.metadata.write(changes, Some(Box::new(done)));
    }

    /// The outcome of `commit_checkpoints`: committed progress counts from now on (retention
    /// trusts it, and what is unchanged is not written again); failed, it is tried again.
    pub(super) fn progress_committed(&mut self, report: ProgressReport) {
        self.progress_in_flight = false;
        if !report.committed {
            self.retained.restore(report.retained);
            return;
        }
        self.retained.committed(report.read_through);
        self.receipts_checkpoint = self.receipts_checkpoint.max(report.receipts_through);
        // What a session forgot since the commit was taken is not stored any more.
        let current = |sessions: &IdMap<u64, Session>, id: u64, forgotten: u64| {
            sessions.get(&id).is_some_and(|s| s.forgotten == forgotten)
        };
        for (id, forgotten, checkpoint) in report.queues {
            let current = match id {
                QueueId::Session(session) => current(&self.sessions, session, forgotten),
                QueueId::Endpoint(_) => true, // never removed
            };
            if current && let Some(queue) = self.queues.get_mut(&id) {
                queue.checkpoint = queue.checkpoint.max(checkpoint);
            }
        }
        for (id, forgotten, stored) in report.receipts {
            if current(&self.sessions, id, forgotten)
                && let Some(session) = self.sessions.get_mut(&id)
            {
                session.receipts_stored = Some(stored);
            }
        }
    }

    /// The persistent sessions' QoS 2 receipts that differ from what is stored, encoded.
    fn changed_receipts(&self, receipts_through: u64) -> Vec<(u64, u64, Vec<u8>)> {
        self.sessions
            .values()
            .filter(|s| s.is_persistent())
            .filter_map(|s| {
                let current = receipts::lock(&s.receipts).through(receipts_through);
                let encoded = current.encode();
                let unchanged = match &s.receipts_stored {
                    Some(before) => *before == encoded,
                    None => current.is_empty(),
                };
                (!unchanged).then_some((s.id, s.forgotten, encoded))
            })
            .collect()
    }

    /// Asks the reclaimer (`reclaim_when_asked`) to free what no queue needs any more. One
    /// request waits at most: while one does, the next tick asks again.
    pub(super) fn reclaim_log_space(&mut self) {
        // Only sealed segments are reclaimed.
        if self.wal.segment_count() < 2 || self.reclaims.capacity() == 0 {
            return;
        }
        let needed_from = self
            .tail
            .next_seq()
            .min(self.retained.replay_from())
            .min(self.receipts_checkpoint + 1);
        let _ = self.reclaims.try_send(self.liveness(needed_from));
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
                .queues
                .values()
                .map(|q| q.entries.count_below(horizon))
                .sum();
            if entries <= RECLAIM_LIVE_ENTRIES_MAX {
                let mut live = Vec::with_capacity(entries);
                for queue in self.queues.values() {
                    queue.entries.records_needed_below(horizon, &mut live);
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
            .queues
            .values()
            .filter_map(|q| q.entries.first_needed());
        Liveness {
            needed_from: first_needed.fold(needed_from, u64::min),
            live: Vec::new(),
        }
    }
}

/// Runs the reclaims the hub asks for (`Hub::reclaim_log_space`), one at a time, on a blocking
/// thread: they read, write and remove files, which the hub never does itself. Ends when the
/// hub does.
pub async fn reclaim_when_asked(wal: Wal, mut requests: mpsc::Receiver<Liveness>) {
    while let Some(liveness) = requests.recv().await {
        let wal = wal.clone();
        match tokio::task::spawn_blocking(move || wal.reclaim(&liveness)).await {
            Ok(Ok(report)) if report.records_moved > 0 => tracing::debug!(
                records_moved = report.records_moved,
                segments_removed = report.segments_removed,
                bytes_freed = report.bytes_freed,
                "moved the few live records out of old log segments"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("failed to free log space: {e}"),
            Err(e) => tracing::error!("a reclaim of log space failed: {e}"),
        }
    }
}

/// Sends a progress report back to the hub once: as committed or not by the completion, or as
/// failed if the completion is dropped without running (the writer thread died), so that the
/// hub never waits for it for good.
struct ReportOnDrop {
    report: Option<ProgressReport>,
    reports: mpsc::Sender<ProgressReport>,
}

impl ReportOnDrop {
    fn send(&mut self, committed: bool) {
        if let Some(mut report) = self.report.take() {
            report.committed = committed;
            // Room for it: one report is in flight at a time.
            let _ = self.reports.try_send(report);
        }
    }
}

impl Drop for ReportOnDrop {
    fn drop(&mut self) {
        self.send(false);
    }
}

fn checkpoint_change(queue: String, seq: u64) -> MetaChange {
    MetaChange::Checkpoint { queue, seq }
}

/// What a progress commit was, and whether it went through.
#[derive(Debug, Default)]
pub(super) struct ProgressReport {
    committed: bool,
    read_through: u64,
    receipts_through: u64,
    /// Queues (a session's with how often it was forgotten then) and their checkpoints.
    queues: Vec<(QueueId, u64, u64)>,
    /// The retained-message changes committed (given back if the commit failed).
    retained: BTreeMap<String, Option<Arc<Message>>>,
    /// Sessions (with how often they were forgotten then) and the receipts stored for them.
    receipts: Vec<(u64, u64, Vec<u8>)>,
}
