//! [`DeliveryQueue`]: one session's queue, an ordered index of WAL sequence numbers (the
//! messages live in the log, not here), with the in-flight window of messages sent and not yet
//! acknowledged.
//!
//! Order (law 2): entries are pushed in WAL order and sent in queue order; an in-flight message
//! that was not acknowledged goes back to the front, in order, when the connection drops, and is
//! resent first, with DUP set and its packet id kept (a QoS 2 message the client already
//! received is resent as PUBREL instead).

use crate::message::{Message, QoS};
use std::collections::VecDeque;
use std::sync::Arc;

/// One message waiting in a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// The message's record in the log; for a retained message, the last record read when it
    /// was queued (its place in the order).
    pub seq: u64,
    /// A retained message sent because of a new subscription: carried here, since its own
    /// record may be long gone from the log.
    pub retained: Option<Arc<Message>>,
    pub qos: QoS,
    pub retain_as_published: bool,
    pub subscription_ids: Vec<u32>,
    /// Sent before and not acknowledged: resend with DUP.
    pub redelivery: bool,
    /// The packet id it was first sent with (QoS 1 and 2), kept for resends.
    pub packet_id: Option<u16>,
    /// A QoS 2 message the client received (PUBREC): only its PUBREL remains to be sent.
    pub released: bool,
    /// The bytes its message takes (`Message::size_bytes`), for the queue's byte limit.
    pub bytes: u64,
    /// Wall-clock time (ms since the epoch) after which the entry is dropped unsent
    /// (`ttl_expiry`): the earlier of the message's expiry and the queue's own deadline,
    /// fixed when it was routed.
    pub deadline_ms: Option<u64>,
    /// The log record of that PUBREC (a persistent session's): recovery needs it as long as
    /// the entry is kept, or it would send the message again instead of its PUBREL.
    pub received_record: Option<u64>,
}

impl QueueEntry {
    /// An entry for a logged message, not sent yet.
    #[must_use]
    pub fn new(seq: u64, qos: QoS, retain_as_published: bool, subscription_ids: Vec<u32>) -> Self {
        QueueEntry {
            seq,
            retained: None,
            qos,
            retain_as_published,
            subscription_ids,
            redelivery: false,
            packet_id: None,
            released: false,
            bytes: 0,
            deadline_ms: None,
            received_record: None,
        }
    }
}

/// What pushing an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was at its limit: its oldest waiting entry was dropped to make room.
    DroppedOldest,
}

/// What a queue keeps at most; beyond either, its oldest waiting entries go (`queue_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Entries, waiting and in flight.
    pub entries_max: usize,
    /// Bytes of their messages; 0 for no limit but the log's quota.
    pub bytes_max: u64,
}

/// A session's delivery queue.
#[derive(Debug)]
pub struct DeliveryQueue {
    waiting: VecDeque<QueueEntry>,
    /// Sent and awaiting acknowledgement, in the order sent; each has a packet id.
    in_flight: VecDeque<QueueEntry>,
    /// Packet ids of in-flight QoS 2 messages the client received, whose PUBREL is not sent yet.
    releases_due: VecDeque<u16>,
    limits: QueueLimits,
    /// Bytes of the entries held (waiting and in flight).
    bytes: u64,
    /// Entries dropped because the queue was full (`queue_full`).
    pub dropped_full: u64,
    /// Entries dropped because their message expired (`ttl_expiry`).
    pub dropped_expired: u64,
}

impl DeliveryQueue {
    #[must_use]
    pub fn new(limits: QueueLimits) -> DeliveryQueue {
        assert!(limits.entries_max > 0);
        DeliveryQueue {
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            releases_due: VecDeque::new(),
            limits,
            bytes: 0,
            dropped_full: 0,
            dropped_expired: 0,
        }
    }

    /// Appends an entry in WAL order (a retained message takes the place of the last record
    /// read, so it may share a sequence number with the entry before it).
    pub fn push(&mut self, entry: QueueEntry) -> Pushed {
        if let Some(last) = self.waiting.back().or(self.in_flight.back()) {
            assert!(
                entry.seq > last.seq || (entry.retained.is_some() && entry.seq == last.seq),
                "queues are filled in WAL order"
            );
        }
        let mut pushed = Pushed::Queued;
        // An entry sent before keeps its place: the client may hold its packet id (QoS 2),
        // and would take a later message with that id for a copy. So does one it received
        // before a restart (released, its packet id not given again yet). Those are at most a
        // window's worth, so the queue stays bounded.
        while self.over_limits(&entry)
            && let Some(at) = self
                .waiting
                .iter()
                .position(|e| e.packet_id.is_none() && !e.released)
        {
            let dropped = self.waiting.remove(at).expect("found above");
            self.bytes -= dropped.bytes;
            self.dropped_full += 1;
            pushed = Pushed::DroppedOldest;
        }
        self.bytes += entry.bytes;
        self.waiting.push_back(entry);
        pushed
    }

    /// Whether `entry` does not fit beside what the queue holds.
    fn over_limits(&self, entry: &QueueEntry) -> bool {
        let limits = self.limits;
        self.len() >= limits.entries_max
            || (limits.bytes_max > 0 && self.bytes + entry.bytes > limits.bytes_max)
    }

    /// The next entry to send, if the window has room.
    pub fn next_to_send(&mut self, window: usize) -> Option<QueueEntry> {
        if self.in_flight.len() >= window {
            return None;
        }
        let entry = self.waiting.pop_front()?;
        self.bytes -= entry.bytes;
        Some(entry)
    }

    /// The entries waiting to be sent, next first.
    pub fn waiting(&self) -> impl Iterator<Item = &QueueEntry> {
        self.waiting.iter()
    }

    /// Puts back an entry that could not be sent (the connection's channel was full).
    pub fn unsend(&mut self, entry: QueueEntry) {
        self.bytes += entry.bytes;
        self.waiting.push_front(entry);
    }

    /// Records an entry as sent, awaiting acknowledgement.
    pub fn sent(&mut self, entry: QueueEntry) {
        assert!(entry.qos != QoS::AtMostOnce, "QoS 0 is never in flight");
        assert!(
            entry.packet_id.is_some(),
            "in-flight messages have packet ids"
        );
        self.bytes += entry.bytes;
        self.in_flight.push_back(entry);
    }

    /// Acknowledges an in-flight message (PUBACK, PUBCOMP); false if no message had that
    /// packet id.
    pub fn acknowledge(&mut self, packet_id: u16) -> bool {
        match self.position(packet_id) {
            Some(at) => {
                let done = self.in_flight.remove(at).expect("found above");
                self.bytes -= done.bytes;
                self.releases_due.retain(|&due| due != packet_id);
                true
            }
            None => false,
        }
    }

    /// The client received an in-flight QoS 2 message (PUBREC); false if no such message had
    /// that packet id. It stays in flight, and needed, until PUBCOMP; its PUBREL is due.
    pub fn received(&mut self, packet_id: u16) -> bool {
        match self.position(packet_id) {
            Some(at) if self.in_flight[at].qos == QoS::ExactlyOnce => {
                if !self.in_flight[at].released {
                    self.in_flight[at].released = true;
                    self.releases_due.push_back(packet_id);
                }
                true
            }
            Some(_) | None => false,
        }
    }

    /// The client received the QoS 2 message logged at `seq`, and its PUBREC is logged and
    /// durable at `record`: from now on only its PUBREL is sent, whether the entry is in
    /// flight or waiting to be resent. False if the queue no longer holds it.
    pub fn received_logged(&mut self, seq: u64, record: u64) -> bool {
        let logged_qos2 = |e: &QueueEntry| e.retained.is_none() && e.qos == QoS::ExactlyOnce;
        if let Some(at) = self
            .in_flight
            .iter()
            .position(|e| e.seq == seq && logged_qos2(e))
        {
            self.in_flight[at].received_record = Some(record);
            let packet_id = self.in_flight[at].packet_id.expect("in flight");
            return self.received(packet_id);
        }
        // Waiting entries are in sequence order.
        let from = self.waiting.partition_point(|e| e.seq < seq);
        let waiting = self
            .waiting
            .range_mut(from..)
            .take_while(|e| e.seq == seq)
            .find(|e| logged_qos2(e));
        match waiting {
            Some(entry) => {
                entry.released = true;
                entry.received_record = Some(record);
                true
            }
            None => false,
        }
    }

    /// The entries below `horizon` (waiting entries are in sequence order: a binary search).
    #[must_use]
    pub fn count_below(&self, horizon: u64) -> usize {
        let in_flight = self.in_flight.iter().filter(|e| e.seq < horizon).count();
        in_flight + self.waiting.partition_point(|e| e.seq < horizon)
    }

    /// Adds to `live` the log records this queue still needs below `horizon`: its messages
    /// (but retained messages carried in memory) and the PUBREC records of those received.
    /// Waiting entries are in sequence order, so only those below the horizon are looked at.
    pub fn records_needed_below(&self, horizon: u64, live: &mut Vec<u64>) {
        let waiting = self.waiting.iter().take_while(|e| e.seq < horizon);
        for entry in self.in_flight.iter().chain(waiting) {
            if entry.retained.is_none() && entry.seq < horizon {
                live.push(entry.seq);
            }
            live.extend(entry.received_record.filter(|&record| record < horizon));
        }
    }

    /// The in-flight entry with `packet_id`, if any.
    #[must_use]
    pub fn in_flight(&self, packet_id: u16) -> Option<&QueueEntry> {
        self.position(packet_id).map(|at| &self.in_flight[at])
    }

    /// The next PUBREL to send, if any; put it back with `release_unsent` if it cannot go.
    pub fn take_release(&mut self) -> Option<u16> {
        self.releases_due.pop_front()
    }

    pub fn release_unsent(&mut self, packet_id: u16) {
        self.releases_due.push_front(packet_id);
    }

    fn position(&self, packet_id: u16) -> Option<usize> {
        self.in_flight
            .iter()
            .position(|f| f.packet_id == Some(packet_id))
    }

    /// Whether a packet id is held: by an in-flight message, or by one sent before and waiting
    /// to be sent again (those are at the front: `requeue_in_flight`), which keeps its id. The
    /// client may still acknowledge that id, so no other message may take it meanwhile.
    #[must_use]
    pub fn packet_id_in_use(&self, packet_id: u16) -> bool {
        self.position(packet_id).is_some()
            || self
                .waiting
                .iter()
                .take_while(|e| e.packet_id.is_some())
                .any(|e| e.packet_id == Some(packet_id))
    }

    /// The connection dropped: everything in flight goes back to the front, in order, to be
    /// resent with DUP.
    pub fn requeue_in_flight(&mut self) {
        self.releases_due.clear(); // their entries go back as `released`, resent as PUBREL
        while let Some(mut entry) = self.in_flight.pop_back() {
            entry.redelivery = true;
            self.waiting.push_front(entry);
        }
    }

    /// The lowest sequence number still needed (in flight or waiting).
    #[must_use]
    pub fn first_needed(&self) -> Option<u64> {
        let in_flight = self.in_flight.front().map(|f| f.seq);
        let waiting = self.waiting.front().map(|e| e.seq);
        in_flight.into_iter().chain(waiting).min()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[must_use]
    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(entries_max: usize) -> QueueLimits {
        QueueLimits {
            entries_max,
            bytes_max: 0,
        }
    }

    fn entry(seq: u64) -> QueueEntry {
        QueueEntry::new(seq, QoS::AtLeastOnce, false, Vec::new())
    }

    fn send(queue: &mut DeliveryQueue, packet_id: u16) {
        let mut entry = queue.next_to_send(2).unwrap();
        entry.packet_id = Some(packet_id);
        queue.sent(entry);
    }

    #[test]
    fn window_bounds_in_flight_and_requeue_keeps_order_and_packet_ids() {
        let mut queue = DeliveryQueue::new(entries(100));
        for seq in 1..=5 {
            queue.push(entry(seq));
        }
        send(&mut queue, 1);
        send(&mut queue, 2);
        assert_eq!(queue.next_to_send(2), None, "window of 2 is full");
        assert!(queue.acknowledge(1));
        assert!(!queue.acknowledge(1));
        assert_eq!(queue.first_needed(), Some(2));
        queue.requeue_in_flight();
        assert!(
            queue.packet_id_in_use(2),
            "held while waiting to be resent: the client may still acknowledge it"
        );
        assert!(!queue.packet_id_in_use(1));
        let resent = queue.next_to_send(2).unwrap();
        assert_eq!(
            (resent.seq, resent.redelivery, resent.packet_id),
            (2, true, Some(2))
        );
        assert_eq!(queue.next_to_send(2).unwrap().seq, 3);
    }

    #[test]
    fn a_received_qos2_message_stays_needed_until_completed_and_resends_as_a_release() {
        let mut queue = DeliveryQueue::new(entries(100));
        queue.push(QueueEntry::new(7, QoS::ExactlyOnce, false, Vec::new()));
        queue.push(entry(8));
        send(&mut queue, 9);
        assert!(
            queue.received(9) && queue.received(9),
            "a repeated PUBREC is harmless"
        );
        assert_eq!(
            (queue.take_release(), queue.take_release()),
            (Some(9), None)
        );
        assert_eq!(queue.first_needed(), Some(7), "needed until PUBCOMP");
        queue.requeue_in_flight();
        let resent = queue.next_to_send(2).unwrap();
        assert!(resent.released && resent.packet_id == Some(9));
        queue.sent(resent);
        assert!(queue.acknowledge(9));
        assert_eq!(queue.first_needed(), Some(8));
    }

    #[test]
    fn a_logged_pubrec_releases_the_message_in_flight_or_waiting_after_a_restart() {
        let qos2 = |seq| QueueEntry::new(seq, QoS::ExactlyOnce, false, Vec::new());
        let mut queue = DeliveryQueue::new(entries(100));
        queue.push(qos2(3));
        queue.push(QueueEntry {
            retained: Some(Arc::new(Message {
                topic: "t".into(),
                payload: bytes::Bytes::new(),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: crate::message::MessageProperties::default(),
            })),
            ..qos2(3)
        });
        queue.push(qos2(5));
        send(&mut queue, 4);
        assert!(queue.received_logged(3, 10), "in flight: its PUBREL is due");
        assert_eq!(queue.take_release(), Some(4));
        // As rebuilt after a restart: waiting, no packet id yet.
        assert!(queue.received_logged(5, 11));
        assert!(
            !queue.received_logged(6, 12),
            "not queued (completed before)"
        );
        let mut live = Vec::new();
        queue.records_needed_below(11, &mut live);
        assert_eq!(
            live,
            vec![3, 10, 5],
            "the retained message is not in the log"
        );
        assert_eq!(queue.count_below(11), 3);
        assert_eq!(queue.count_below(4), 2);
        let retained = queue.next_to_send(2).unwrap();
        assert!(retained.retained.is_some() && !retained.released);
        assert!(queue.next_to_send(2).unwrap().released);
    }

    #[test]
    fn a_full_queue_keeps_a_message_the_client_received_before_a_restart() {
        let mut queue = DeliveryQueue::new(entries(2));
        queue.push(QueueEntry::new(1, QoS::ExactlyOnce, false, Vec::new()));
        assert!(queue.received_logged(1, 2));
        queue.push(entry(2));
        assert_eq!(queue.push(entry(3)), Pushed::DroppedOldest);
        let kept = queue.next_to_send(10).unwrap();
        assert!(kept.seq == 1 && kept.released, "its PUBREL is still owed");
        assert_eq!(queue.next_to_send(10).unwrap().seq, 3);
    }

    /// Goal: a byte limit drops as many of the oldest waiting entries as a new one needs,
    /// counting each, and in-flight bytes count until acknowledged.
    #[test]
    fn a_queue_over_its_byte_limit_drops_its_oldest_waiting_entries() {
        let mut queue = DeliveryQueue::new(QueueLimits {
            entries_max: 100,
            bytes_max: 1000,
        });
        let sized = |seq, bytes| QueueEntry {
            bytes,
            ..entry(seq)
        };
        for seq in 1..=4 {
            assert_eq!(queue.push(sized(seq, 250)), Pushed::Queued);
        }
        send(&mut queue, 1); // 1 in flight: kept, its bytes still count
        assert_eq!(queue.push(sized(5, 600)), Pushed::DroppedOldest);
        assert_eq!(queue.dropped_full, 3, "2, 3 and 4 made room for 600 bytes");
        assert!(queue.acknowledge(1));
        assert_eq!(queue.push(sized(6, 400)), Pushed::Queued, "1000 bytes fit");
        assert_eq!(queue.next_to_send(10).map(|e| e.seq), Some(5));
    }

    #[test]
    fn a_full_queue_drops_its_oldest_waiting_entry_and_counts_it() {
        let mut queue = DeliveryQueue::new(entries(3));
        for seq in 1..=3 {
            assert_eq!(queue.push(entry(seq)), Pushed::Queued);
        }
        assert_eq!(queue.push(entry(4)), Pushed::DroppedOldest);
        assert_eq!(queue.dropped_full, 1);
        assert_eq!(queue.next_to_send(10).unwrap().seq, 2);
    }
}
