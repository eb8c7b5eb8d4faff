//! [`Queue`]: a delivery queue as an endpoint. It exists, fills, is checkpointed and is rebuilt
//! after a restart on its own, whether or not a consumer is attached; publish records name it
//! (`QueueId`), not a connection. An MQTT session's queue is consumed by the session's
//! connection while it has one; a route endpoint's (a module input, `$upstream`) by the
//! session that subscribed to it (`Queue::consumer`). Several consumers sharing one queue by
//! key attach here (see `reference/ordered-replicas.md` §10): `consumer` becomes the set of
//! consumers with the keys each holds, while the queue keeps order and the log positions, and
//! consumers only windows.

use crate::delivery::drop_worth_logging;
use crate::delivery::queue::{DeliveryQueue, Pushed, QueueEntry, QueueLimits};
use crate::delivery::record::QueueId;

/// One delivery queue; see the module documentation.
#[derive(Debug)]
pub struct Queue {
    pub id: QueueId,
    /// Who the queue is for, in log lines (an MQTT client id).
    pub name: String,
    /// The entries waiting and in flight, in log order.
    pub entries: DeliveryQueue,
    /// Records up to this sequence number are not for this queue: they were routed before it
    /// existed, or acknowledged before the last restart.
    pub replay_floor: u64,
    /// The checkpoint last committed durably: everything up to it was acknowledged.
    pub checkpoint: u64,
    /// The session whose connection takes a route endpoint's messages, while one does (an MQTT
    /// session's own queue has its session, and no consumer here).
    pub consumer: Option<u64>,
}

impl Queue {
    /// An empty queue that takes records after `replay_floor`.
    #[must_use]
    pub fn new(id: QueueId, name: String, limits: QueueLimits, replay_floor: u64) -> Queue {
        Queue {
            id,
            name,
            entries: DeliveryQueue::new(limits),
            replay_floor,
            checkpoint: replay_floor,
            consumer: None,
        }
    }

    /// Queues an entry; beyond the queue's limits its oldest waiting entries go, counted and
    /// logged (`queue_full`): the first drop, then every thousandth, so a long-offline client
    /// does not flood the log (a restart replays its whole backlog through here).
    pub fn enqueue(&mut self, entry: QueueEntry) {
        if self.entries.push(entry) == Pushed::DroppedOldest
            && drop_worth_logging(self.entries.dropped_full)
        {
            tracing::warn!(
                queue = %self.name,
                dropped = self.entries.dropped_full,
                "queue full: dropped its oldest message (queue_full; `dropped` counts this queue's since start)"
            );
        }
    }

    /// Whether the entry's message expired by `now_ms` before it was sent; an expired one is
    /// counted and logged (`ttl_expiry`) like a drop for room. Once sent, a message is
    /// delivered to the end (the client may hold its packet id).
    pub fn expired(&mut self, entry: &QueueEntry, now_ms: u64) -> bool {
        if entry.redelivery || entry.deadline_ms.is_none_or(|at| at > now_ms) {
            return false;
        }
        self.entries.dropped_expired += 1;
        if drop_worth_logging(self.entries.dropped_expired) {
            tracing::info!(
                queue = %self.name,
                seq = entry.seq,
                dropped = self.entries.dropped_expired,
                "message expired before delivery (ttl_expiry; `dropped` counts this queue's since start)"
            );
        }
        true
    }

    /// Drops the waiting entries at the front whose deadline passed by `now_ms`, counted and
    /// logged as [`Queue::expired`] does, whether or not a consumer is attached: even a queue
    /// no one consumes frees its messages' log space as they expire, not when a consumer
    /// comes back. An entry behind one that has not expired goes when it reaches the front, or
    /// when it would be sent; one sent before, or whose QoS 2 PUBREC is logged, is delivered
    /// to the end.
    pub fn expire_waiting_front(&mut self, now_ms: u64) {
        let due = |e: &QueueEntry| {
            !e.redelivery
                && !e.released
                && e.packet_id.is_none()
                && e.deadline_ms.is_some_and(|at| at <= now_ms)
        };
        while self.entries.waiting().next().is_some_and(due) {
            let Some(entry) = self.entries.next_to_send(usize::MAX) else {
                break;
            };
            let expired = self.expired(&entry, now_ms);
            debug_assert!(expired, "checked above");
        }
    }

    /// The key of the queue's checkpoint in the metadata store.
    #[must_use]
    pub fn checkpoint_key(&self) -> String {
        checkpoint_key(self.id)
    }

    /// The checkpoint to commit now: the sequence before the first entry still needed, or
    /// `read_through` (everything the hub has read) when the queue is empty. It never moves
    /// back.
    #[must_use]
    pub fn checkpoint_due(&self, read_through: u64) -> u64 {
        self.entries
            .first_needed()
            .map_or(read_through, |first| first.saturating_sub(1))
    }
}

/// The key of a queue's checkpoint in the metadata store.
#[must_use]
pub fn checkpoint_key(id: QueueId) -> String {
    match id {
        QueueId::Session(session) => format!("session/{session}"),
        QueueId::Endpoint(number) => format!("endpoint/{number}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;

    /// Goal: a queue fills with no consumer, and its checkpoint stops before its first entry
    /// still needed, or covers everything read once it is empty.
    #[test]
    fn a_queue_fills_alone_and_checkpoints_before_its_first_entry() {
        let limits = QueueLimits {
            entries_max: 10,
            bytes_max: 0,
        };
        let mut queue = Queue::new(QueueId::Session(7), "c".into(), limits, 4);
        assert_eq!(
            (queue.checkpoint, queue.checkpoint_key()),
            (4, "session/7".into())
        );
        assert_eq!(queue.checkpoint_due(9), 9, "empty: everything read");
        for seq in [5, 8] {
            queue.enqueue(QueueEntry::new(seq, QoS::AtLeastOnce, false, Vec::new()));
        }
        assert_eq!(queue.checkpoint_due(9), 4);
        assert_eq!(queue.entries.next_to_send(1).map(|e| e.seq), Some(5));
        assert_eq!(
            queue.checkpoint_due(9),
            7,
            "5 went (QoS 0 would), 8 is next"
        );
    }

    /// Goal: expired entries at the front of a queue no one consumes go (counted), up to the
    /// first that has not expired, and the checkpoint moves past them.
    #[test]
    fn expired_entries_leave_the_front_of_an_unconsumed_queue() {
        let limits = QueueLimits {
            entries_max: 10,
            bytes_max: 0,
        };
        let mut queue = Queue::new(QueueId::Endpoint(1), "e".into(), limits, 0);
        for (seq, deadline_ms) in [(1, Some(100)), (2, Some(150)), (3, None), (4, Some(50))] {
            queue.enqueue(QueueEntry {
                deadline_ms,
                ..QueueEntry::new(seq, QoS::AtLeastOnce, false, Vec::new())
            });
        }
        queue.expire_waiting_front(120);
        assert_eq!(queue.entries.dropped_expired, 1);
        queue.expire_waiting_front(200);
        assert_eq!(
            queue.entries.dropped_expired, 2,
            "up to 3, which never expires"
        );
        assert_eq!(queue.checkpoint_due(9), 2);
    }
}
