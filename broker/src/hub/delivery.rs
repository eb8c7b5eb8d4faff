//! Delivery: durable records from the log into session queues, and from queues to connections
//! within their windows; acknowledgements from clients (PUBACK, PUBREC, PUBCOMP).

use super::appends::{Metering, OwnAppend};
use super::{Hub, loads};
use crate::delivery::queue::QueueEntry;
use crate::delivery::record::{
    KIND_PUBLISH, KIND_QOS2_RECEIVED, PublishRecord, QueueId, ReceivedRecord,
};
use crate::hub::events::{Delivery, Outbound};
use crate::message::{Message, QoS};
use crate::session::SessionState;
use bytes::Bytes;
use spool_storage::Record;
use std::sync::Arc;
use tokio::sync::mpsc::error::TrySendError;

impl Hub {
    pub(super) fn acknowledge(&mut self, id: u64, packet_id: u16) {
        let Some(queue) = self.queues.get_mut(&QueueId::Session(id)) else {
            return;
        };
        if !queue.entries.acknowledge(packet_id) {
            tracing::debug!(queue = %queue.name, packet_id, "acknowledgement for no message in flight");
        }
        self.pump(id);
    }

    /// PUBREC: the client has the QoS 2 message; its PUBREL is due. A persistent session logs
    /// the PUBREC first and sends the PUBREL once that record is durable (`on_received`): after
    /// a crash it then resends the PUBREL, never the message the client may already have
    /// passed on. (A retained copy sent from memory, when the log could not take it, has no
    /// record to point at.)
    pub(super) fn received(&mut self, id: u64, packet_id: u16) {
        let (Some(session), Some(queue)) = (
            self.sessions.get(&id),
            self.queues.get_mut(&QueueId::Session(id)),
        ) else {
            return;
        };
        let entry = queue
            .entries
            .in_flight(packet_id)
            .filter(|e| e.qos == QoS::ExactlyOnce);
        match entry {
            None => {
                tracing::debug!(queue = %queue.name, packet_id, "PUBREC for no QoS 2 message in flight");
            }
            Some(entry)
                if session.is_persistent() && entry.retained.is_none() && !entry.released =>
            {
                let record = ReceivedRecord {
                    session: id,
                    seq: entry.seq,
                };
                self.log_received(record);
            }
            Some(_) => {
                queue.entries.received(packet_id);
                self.pump(id);
            }
        }
    }

    /// Logs a subscriber's PUBREC without making the hub wait: the hub's tail sees the record
    /// once it is durable. It may go past the log's quota, as it lets a message complete and
    /// its space be freed; the in-flight window bounds how many there are.
    pub(super) fn log_received(&mut self, record: ReceivedRecord) {
        // If it cannot be logged, the PUBREL never goes out; the message is resent after a
        // reconnect.
        self.append_own(OwnAppend {
            kind: KIND_QOS2_RECEIVED,
            payload: record.encode(),
            metering: Metering::BeyondQuota,
            what: "a subscriber's PUBREC",
        });
    }

    /// Processes the durable records the tail has not delivered yet, without waiting (`run`
    /// follows the log as records come instead).
    pub fn read_durable_records(&mut self) {
        loop {
            match self.tail.try_next() {
                Ok(Some(record)) => self.on_record(&record),
                Ok(None) => return,
                Err(e) => {
                    // The run loop's reader meets the same error and stops the hub.
                    tracing::error!("failed to read the write-ahead log: {e}");
                    return;
                }
            }
        }
    }

    /// A record became durable: a publish is queued for every target session that still
    /// exists; a subscriber's PUBREC makes its PUBREL due.
    pub(super) fn on_record(&mut self, record: &Record) {
        match record.kind {
            KIND_PUBLISH => self.on_publish(record),
            KIND_QOS2_RECEIVED => self.on_received(record),
            _ => {}
        }
    }

    pub(super) fn on_received(&mut self, record: &Record) {
        let received = match ReceivedRecord::decode(record.payload.clone()) {
            Ok(received) => received,
            Err(e) => {
                tracing::error!(
                    seq = record.seq,
                    "skipping an undecodable PUBREC record: {e}"
                );
                return;
            }
        };
        let Some(queue) = self.queues.get_mut(&QueueId::Session(received.session)) else {
            return;
        };
        // Not found: the message was completed (PUBCOMP) before the last checkpoint.
        if queue.entries.received_logged(received.seq, record.seq) {
            self.pump(received.session);
        }
    }

    pub(super) fn on_publish(&mut self, record: &Record) {
        let publish = match PublishRecord::decode(record.payload.clone()) {
            Ok(publish) => publish,
            Err(e) => {
                tracing::error!(
                    seq = record.seq,
                    "skipping an undecodable publish record: {e}"
                );
                return;
            }
        };
        let message = Arc::new(publish.message);
        self.cache
            .insert(record.seq, Arc::clone(&message), record.payload.len());
        if message.retain && !publish.retained_copy {
            // Kept for long: its own copy of the payload, not a share of the whole record.
            let retained = Message {
                payload: Bytes::copy_from_slice(&message.payload),
                ..Message::clone(&message)
            };
            self.retained.apply(record.seq, &Arc::new(retained));
        }
        for target in publish.targets {
            let Some(queue) = self.queues.get_mut(&target.queue) else {
                continue; // a queue that is gone
            };
            if record.seq <= queue.replay_floor {
                continue; // acknowledged before the last restart
            }
            let entry = QueueEntry {
                bytes: message.size_bytes() as u64,
                deadline_ms: earliest(target.deadline_ms, message.properties.expires_at_ms),
                ..QueueEntry::new(
                    record.seq,
                    target.qos,
                    target.retain_as_published,
                    target.subscription_ids,
                )
            };
            queue.enqueue(entry);
            let QueueId::Session(consumer) = target.queue;
            self.pump(consumer);
        }
    }

    /// Sends the PUBRELs due, then what the session's window allows. The connection's channel
    /// always keeps a slot per in-flight message, so a PUBREL never waits behind QoS 0
    /// messages for an acknowledgement that cannot come before it.
    pub(super) fn pump(&mut self, id: u64) {
        let queue_id = QueueId::Session(id);
        loop {
            let (Some(session), Some(queue)) =
                (self.sessions.get_mut(&id), self.queues.get_mut(&queue_id))
            else {
                return;
            };
            let entries = &mut queue.entries;
            let SessionState::Connected(attachment) = &session.state else {
                return;
            };
            let window = attachment.window;
            if let Some(packet_id) = entries.take_release() {
                match attachment.outbound.try_send(Outbound::Release(packet_id)) {
                    Ok(()) => continue,
                    Err(TrySendError::Full(_)) if attachment.outbound.ask_for_room(1) => {
                        entries.release_unsent(packet_id);
                        continue;
                    }
                    Err(_) => {
                        entries.release_unsent(packet_id);
                        return; // sent when the connection makes room (Event::Drained)
                    }
                }
            }
            let reserved = entries.in_flight_len();
            if attachment.outbound.capacity() <= reserved {
                if attachment.outbound.ask_for_room(reserved + 1) {
                    continue;
                }
                return;
            }
            let Some(mut entry) = entries.next_to_send(window) else {
                return;
            };
            if loads::to_read(&self.cache, &self.unreadable, &entry) {
                entries.unsend(entry); // the queue goes on once it is read
                self.ask_for_loads(id, window);
                return;
            }
            if entry.qos != QoS::AtMostOnce && entry.packet_id.is_none() {
                let Some(packet_id) = session.packet_id_for(&entry, entries) else {
                    entries.unsend(entry); // its id is in flight: wait for that ack
                    return;
                };
                entry.packet_id = Some(packet_id);
            }
            let outbound = match (entry.released, entry.packet_id) {
                (true, Some(packet_id)) => Outbound::Release(packet_id),
                _ => match self.delivery(id, &entry) {
                    Some(delivery) => Outbound::Publish(delivery),
                    None => continue, // expired or unreadable: counted and logged, and skipped
                },
            };
            let session = self.sessions.get(&id).expect("looked up above");
            let entries = &mut self
                .queues
                .get_mut(&queue_id)
                .expect("looked up above")
                .entries;
            let channel = &session.attachment().expect("attached").outbound;
            match channel.try_send(outbound) {
                Ok(()) if entry.qos != QoS::AtMostOnce => entries.sent(entry),
                Ok(()) => {}
                // Not full: the hub is the only sender and saw room above. Closed, then.
                Err(_) => {
                    entries.unsend(entry);
                    return;
                }
            }
        }
    }

    /// The PUBLISH for a queue entry, or `None` if its message expired or cannot be read.
    pub(super) fn delivery(&mut self, id: u64, entry: &QueueEntry) -> Option<Delivery> {
        let now_ms = self.clock.unix_ms();
        // The deadline is the entry's: no message is read back to find it expired.
        if self
            .queues
            .get_mut(&QueueId::Session(id))?
            .expired(entry, now_ms)
        {
            return None;
        }
        let message = match &entry.retained {
            Some(message) => Arc::clone(message),
            None => self.message(entry.seq)?,
        };
        Some(Delivery {
            packet_id: entry.packet_id,
            qos: entry.qos,
            dup: entry.redelivery,
            retain: entry.retained.is_some() || (entry.retain_as_published && message.retain),
            subscription_ids: entry.subscription_ids.clone(),
            message,
        })
    }

    /// A logged message from the cache (`pump` has it read first), or `None` if it cannot be
    /// read.
    pub(super) fn message(&self, seq: u64) -> Option<Arc<Message>> {
        let message = self.cache.get(seq);
        debug_assert!(message.is_some() || self.unreadable.contains(&seq));
        message
    }
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
