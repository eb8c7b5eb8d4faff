//! Delivery: durable records from the log into queues (sessions' and route endpoints'), and
//! from queues to connections within their windows; acknowledgements from clients (PUBACK,
//! PUBREC, PUBCOMP).

use super::appends::{Metering, OwnAppend};
use super::{Hub, loads, methods};
use crate::auth::policy::Client;
use crate::delivery::endpoint::Queue;
use crate::delivery::queue::QueueEntry;
use crate::delivery::record::{
    KIND_PUBLISH, KIND_QOS2_RECEIVED, PublishRecord, QueueId, ReceivedRecord,
};
use crate::hub::events::{Delivery, Outbound};
use crate::id_hash::IdMap;
use crate::iothub;
use crate::message::{Message, QoS};
use crate::routing::endpoints::EndpointTarget;
use crate::session::Session;
use bytes::Bytes;
use spool_storage::Record;
use std::sync::Arc;
use tokio::sync::mpsc::error::TrySendError;

impl Hub {
    /// PUBACK or PUBCOMP: whichever of the session's queues sent that packet id (they share
    /// the ids), or one it stopped consuming since, takes its message off.
    pub(super) fn acknowledge(&mut self, id: u64, packet_id: u16) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let held = session.held.iter().copied();
        let found = session
            .sources()
            .map(|(queue, _)| queue)
            .chain(held)
            .any(|queue| {
                self.queues
                    .get_mut(&queue)
                    .is_some_and(|q| q.entries.acknowledge(packet_id))
            });
        if !found {
            let client_id = &session.client_id;
            tracing::debug!(%client_id, packet_id, "acknowledgement for no message in flight");
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

    /// A record became durable: a publish is queued in every target queue that still
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
            let consumer = match target.queue {
                QueueId::Session(session) => Some(session),
                QueueId::Endpoint(_) => queue.consumer,
            };
            if let Some(consumer) = consumer {
                self.pump(consumer);
            }
        }
    }

    /// Sends the PUBRELs due, then what the session's window allows, from its own queue and
    /// the endpoints it consumes (`Session::sources`), which share the window and the packet
    /// ids. The connection's channel always keeps a slot per in-flight message, so a PUBREL
    /// never waits behind QoS 0 messages for an acknowledgement that cannot come before it.
    pub(super) fn pump(&mut self, id: u64) {
        loop {
            match self.send_release_due(id) {
                Step::Again => continue,
                Step::Stop => return,
                Step::Go => {}
            }
            match self.send_method_request_due(id) {
                Step::Again => continue,
                Step::Stop => return,
                Step::Go => {}
            }
            let (queue_id, entry) = match self.next_to_send(id) {
                Ok(next) => next,
                Err(Step::Again) => continue,
                Err(_) => return,
            };
            let outbound = match (entry.released, entry.packet_id) {
                (true, Some(packet_id)) => Outbound::Release(packet_id),
                _ => match self.delivery(queue_id, &entry) {
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

    /// Sends the next PUBREL due on session `id`'s own queue (QoS 2 goes there only:
    /// endpoints deliver at QoS 1 at most), if one is due and the session is connected.
    fn send_release_due(&mut self, id: u64) -> Step {
        let Some(session) = self.sessions.get(&id) else {
            return Step::Stop;
        };
        let Some(attachment) = session.attachment() else {
            return Step::Stop;
        };
        let Some(queue) = self.queues.get_mut(&session.queue()) else {
            return Step::Go;
        };
        let Some(packet_id) = queue.entries.take_release() else {
            return Step::Go;
        };
        match attachment.outbound.try_send(Outbound::Release(packet_id)) {
            Ok(()) => Step::Again,
            Err(TrySendError::Full(_)) if attachment.outbound.ask_for_room(1) => {
                queue.entries.release_unsent(packet_id);
                Step::Again
            }
            Err(_) => {
                queue.entries.release_unsent(packet_id);
                Step::Stop // sent when the connection makes room (Event::Drained)
            }
        }
    }

    /// Sends the next direct-method request waiting for session `id`'s connection, if there
    /// is one and the channel has room beyond the slots its in-flight messages keep.
    fn send_method_request_due(&mut self, id: u64) -> Step {
        let Some(session) = self.sessions.get_mut(&id) else {
            return Step::Stop;
        };
        let reserved = match session.attachment() {
            None => return Step::Stop,
            Some(attachment) if attachment.method_requests.is_empty() => return Step::Go,
            Some(_) => in_flight(session, &self.queues),
        };
        let Some(attachment) = session.attachment_mut() else {
            return Step::Stop;
        };
        if attachment.outbound.capacity() <= reserved {
            return match attachment.outbound.ask_for_room(reserved + 1) {
                true => Step::Again,
                false => Step::Stop,
            };
        }
        let Some(request) = methods::next_method_request(attachment) else {
            return Step::Go;
        };
        match attachment.outbound.try_send(request) {
            Ok(()) => Step::Again,
            Err(_) => Step::Stop, // closed: the connection is ending
        }
    }

    /// The next entry session `id` sends, with the queue it comes from, its QoS capped by the
    /// subscription and its packet id given, if the window and the connection's channel have
    /// room. Its sources are tried in order: one whose next message must be read back first
    /// stops the round (a load is asked for), one whose next message's packet id is taken by
    /// another in flight is passed over until that one is acknowledged.
    fn next_to_send(&mut self, id: u64) -> Result<(QueueId, QueueEntry), Step> {
        let session = self.sessions.get_mut(&id).ok_or(Step::Stop)?;
        let attachment = session.attachment().ok_or(Step::Stop)?;
        let reserved = in_flight(session, &self.queues);
        let window = attachment.window;
        if attachment.outbound.capacity() <= reserved {
            return Err(match attachment.outbound.ask_for_room(reserved + 1) {
                true => Step::Again,
                false => Step::Stop,
            });
        }
        if reserved >= window {
            return Err(Step::Stop);
        }
        let mut to_load = None;
        let mut index = 0;
        while let Some((queue_id, qos_max)) = session.source(index) {
            index += 1;
            let Some(queue) = self.queues.get_mut(&queue_id) else {
                continue;
            };
            let Some(mut entry) = queue.entries.next_to_send(usize::MAX) else {
                continue;
            };
            if loads::to_read(&self.cache, &self.unreadable, &entry) {
                queue.entries.unsend(entry); // the queue goes on once it is read
                to_load = Some(queue_id);
                break;
            }
            if entry.packet_id.is_none() {
                // Capped when first sent: a resent message keeps its QoS and packet id.
                let qos = entry.qos.min(qos_max);
                if qos != QoS::AtMostOnce {
                    let Some(packet_id) = session.packet_id_for(&entry, &self.queues) else {
                        if let Some(queue) = self.queues.get_mut(&queue_id) {
                            queue.entries.unsend(entry); // its id is in flight: after that ack
                        }
                        continue;
                    };
                    entry.packet_id = Some(packet_id);
                }
                entry.qos = qos;
            }
            session.took_turn(queue_id);
            return Ok((queue_id, entry));
        }
        if let Some(queue_id) = to_load {
            self.ask_for_loads(id, queue_id, window);
        }
        Err(Step::Stop)
    }

    /// The PUBLISH for an entry of `queue`, or `None` if its message expired or cannot be
    /// read. A module input's message is addressed to the input: its connection gives it the
    /// input's topic (`ModuleInput::topic`), off the hub's task.
    pub(super) fn delivery(&mut self, queue: QueueId, entry: &QueueEntry) -> Option<Delivery> {
        let now_ms = self.clock.unix_ms();
        // The deadline is the entry's: no message is read back to find it expired.
        if self.queues.get_mut(&queue)?.expired(entry, now_ms) {
            return None;
        }
        let message = match &entry.retained {
            Some(message) => Arc::clone(message),
            None => self.message(entry.seq)?,
        };
        if let QueueId::Session(id) = queue
            && !entry.redelivery
            && !self.may_receive(id, &message.topic)
        {
            return None;
        }
        let input = match queue {
            QueueId::Endpoint(number) => match self.endpoints.get(&number).map(|e| &e.target) {
                Some(EndpointTarget::ModuleInput(to)) => Some(Arc::clone(to)),
                _ => None,
            },
            QueueId::Session(_) => None,
        };
        Some(Delivery {
            packet_id: entry.packet_id,
            qos: entry.qos,
            dup: entry.redelivery,
            retain: entry.retained.is_some() || (entry.retain_as_published && message.retain),
            subscription_ids: entry.subscription_ids.clone(),
            message,
            input,
        })
    }

    /// Whether session `id`'s client may receive a message on `topic`, checked as it is sent
    /// (the message's topic taken as a filter): a wildcard subscription reaches no further
    /// than its client's rights (not another identity's IoT Hub topics, not what the policy
    /// denies it), whatever the policy was when the message was queued.
    fn may_receive(&self, id: u64, topic: &str) -> bool {
        let Some(session) = self.sessions.get(&id) else {
            return true;
        };
        if session.identity.is_none() && !self.policy.denies_subscriptions() {
            return true; // a plain client, and nothing it could be denied
        }
        let client = Client {
            client_id: &session.client_id,
            identity: session.identity.as_ref(),
        };
        let allowed = iothub::check_subscribe(&client, topic, &self.policy);
        if !allowed {
            let client_id = &session.client_id;
            tracing::debug!(%client_id, topic, "not delivered: the authorization policy denies it");
        }
        allowed
    }

    /// A logged message from the cache (`pump` has it read first), or `None` if it cannot be
    /// read.
    pub(super) fn message(&self, seq: u64) -> Option<Arc<Message>> {
        let message = self.cache.get(seq);
        debug_assert!(message.is_some() || self.unreadable.contains(&seq));
        message
    }
}

/// How many messages `session`'s connection has in flight, over all its queues (in `queues`):
/// the channel keeps a slot for each.
fn in_flight(session: &Session, queues: &IdMap<QueueId, Queue>) -> usize {
    session
        .sources()
        .filter_map(|(queue, _)| queues.get(&queue))
        .map(|queue| queue.entries.in_flight_len())
        .sum()
}

/// What `pump` does after a step.
enum Step {
    /// Try again: something was sent, or room was made meanwhile.
    Again,
    /// Wait for an acknowledgement, room in the channel or a load.
    Stop,
    /// Go on to the next kind of thing to send.
    Go,
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
