//! [`Session`]: one client's MQTT session as the hub keeps it: its subscriptions, its delivery
//! queue, its packet identifiers, and the connection it is attached to, if any. It owns no
//! socket: the hub hands it packets to send through the connection's bounded channel.

pub mod persist;
pub mod receipts;

use crate::delivery::drop_worth_logging;
use crate::delivery::queue::{DeliveryQueue, Pushed, QueueEntry};
use crate::hub::events::{OutboundSender, Protocol};
use crate::message::Will;
use crate::routing::SubscriptionOptions;
use receipts::SharedReceipts;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::DropGuard;

/// The connection a session is attached to.
#[derive(Debug)]
pub struct Attachment {
    /// Identifies the connection, so a late `Disconnected` from a taken-over one is ignored.
    pub connection: u64,
    pub protocol: Protocol,
    pub outbound: OutboundSender,
    /// The in-flight window: the client's receive maximum, capped by the broker's.
    pub window: usize,
    /// Tells the connection that the hub let go of it, when the attachment is dropped.
    pub _released: DropGuard,
}

/// One client's session.
#[derive(Debug)]
pub struct Session {
    /// The session's number: what WAL records name as a target. Never reused.
    pub id: u64,
    pub client_id: String,
    /// How long the session outlives its connection; zero for a clean session.
    pub expiry: Duration,
    pub attachment: Option<Attachment>,
    pub subscriptions: BTreeMap<String, SubscriptionOptions>,
    pub queue: DeliveryQueue,
    /// When the connection dropped, for expiry.
    pub detached_at: Option<Instant>,
    /// Records up to this sequence number are not for this queue: they were routed before the
    /// session existed, or acknowledged before the last restart.
    pub replay_floor: u64,
    /// The checkpoint last committed durably: everything up to it was acknowledged.
    pub checkpoint: u64,
    /// Whether the metadata store holds a copy, to be removed with the session.
    pub stored: bool,
    /// A will waiting for its delay while the session is detached, and when it is due.
    pub pending_will: Option<(Box<Will>, Instant)>,
    /// The QoS 2 packet ids its client sent and has not released, shared with its connection.
    pub receipts: SharedReceipts,
    /// The receipts as last stored (encoded), so unchanged ones are not written again.
    pub receipts_stored: Option<Vec<u8>>,
    next_packet_id: u16,
}

impl Session {
    #[must_use]
    pub fn new(id: u64, client_id: String, expiry: Duration, queue_limit: usize) -> Session {
        Session {
            id,
            client_id,
            expiry,
            attachment: None,
            subscriptions: BTreeMap::new(),
            queue: DeliveryQueue::new(queue_limit),
            detached_at: None,
            replay_floor: 0,
            checkpoint: 0,
            stored: false,
            next_packet_id: 0,
            pending_will: None,
            receipts: SharedReceipts::default(),
            receipts_stored: None,
        }
    }

    /// The packet id to first send an entry with, or `None` while it is taken by another
    /// in-flight message (the queue then waits for that one's acknowledgement). A logged
    /// message's id comes from its sequence number, so it is the same when the message is
    /// sent again after a restart, and a QoS 2 receiver that already has it recognises it
    /// (MQTT §4.3.3). A retained message, not logged for this queue, takes any free id; the
    /// window is far below 65535, so one is always free.
    pub fn packet_id_for(&mut self, entry: &QueueEntry) -> Option<u16> {
        if entry.retained.is_none() {
            let id = u16::try_from(entry.seq % u64::from(u16::MAX)).expect("below u16::MAX") + 1;
            return (!self.queue.packet_id_in_use(id)).then_some(id);
        }
        assert!(self.queue.in_flight_len() < usize::from(u16::MAX));
        loop {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.queue.packet_id_in_use(self.next_packet_id) {
                return Some(self.next_packet_id);
            }
        }
    }

    /// Queues an entry; at the queue's limit the oldest waiting entry goes, counted and logged
    /// (`queue_full`): the first drop, then every thousandth, so a long-offline client does
    /// not flood the log (a restart replays its whole backlog through here).
    pub fn enqueue(&mut self, entry: QueueEntry) {
        if self.queue.push(entry) == Pushed::DroppedOldest
            && drop_worth_logging(self.queue.dropped_full)
        {
            tracing::warn!(
                client_id = %self.client_id,
                dropped = self.queue.dropped_full,
                "queue full: dropped its oldest message (queue_full; `dropped` counts this session's since start)"
            );
        }
    }

    /// Whether the session outlives its connection, and so is stored.
    #[must_use]
    pub fn is_persistent(&self) -> bool {
        !self.expiry.is_zero()
    }

    /// The key of the session's checkpoint in the metadata store.
    #[must_use]
    pub fn checkpoint_key(&self) -> String {
        format!("session/{}", self.id)
    }

    /// What of the session is stored.
    #[must_use]
    pub fn to_persisted(&self) -> persist::PersistedSession {
        persist::PersistedSession {
            id: self.id,
            expiry_secs: self.expiry.as_secs(),
            replay_floor: self.replay_floor,
            subscriptions: self.subscriptions.clone(),
        }
    }

    /// Whether an offline session has outlived its expiry.
    #[must_use]
    pub fn is_expired(&self, now: Instant) -> bool {
        self.detached_at
            .is_some_and(|at| now.saturating_duration_since(at) >= self.expiry)
    }
}
