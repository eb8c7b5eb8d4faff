//! [`Session`]: one client's MQTT session as the hub keeps it: its subscriptions, its packet
//! identifiers, the connection it is attached to, if any, and the route endpoints that
//! connection takes messages from (its own delivery queue is an endpoint too,
//! `delivery::endpoint`). It owns no socket: the hub hands it packets to send through the
//! connection's bounded channel.

pub mod persist;
pub mod receipts;

use crate::auth::identity::IdentityId;
use crate::delivery::endpoint::Queue;
use crate::delivery::queue::QueueEntry;
use crate::delivery::record::QueueId;
use crate::hub::events::{Delivery, OutboundSender, Protocol};
use crate::id_hash::IdMap;
use crate::message::{QoS, Will};
use crate::routing::SubscriptionOptions;
use receipts::SharedReceipts;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

/// The connection a session is attached to.
#[derive(Debug)]
pub struct Attachment {
    /// Identifies the connection, so a late `Disconnected` from a taken-over one is ignored.
    pub connection: u64,
    pub protocol: Protocol,
    pub outbound: OutboundSender,
    /// The in-flight window: the client's receive maximum, capped by the broker's.
    pub window: usize,
    /// Direct-method requests for the connection (`hub::methods`), sent ahead of the queues
    /// as the channel has room; they go with the connection if it ends first.
    pub method_requests: VecDeque<WaitingRequest>,
    /// Tells the connection that the hub let go of it, when the attachment is dropped.
    pub _released: DropGuard,
}

/// A direct-method request waiting for room in the connection's channel.
#[derive(Debug)]
pub struct WaitingRequest {
    pub delivery: Delivery,
    /// Cancelled when its caller stopped waiting: then it is not sent.
    pub abandoned: CancellationToken,
}

/// Where a session stands with its client.
#[derive(Debug)]
pub enum SessionState {
    /// A connection is attached: messages go out through it.
    Connected(Attachment),
    /// No connection since `since`: messages wait in the queue until one comes back, or the
    /// session expires.
    Offline { since: Instant },
    /// As `Offline`, and the will of the connection that ended goes out at `due` unless a
    /// connection resumes the session first (MQTT 5 will delay).
    AwaitingWill {
        since: Instant,
        will: Box<Will>,
        due: Instant,
    },
}

/// One client's session.
#[derive(Debug)]
pub struct Session {
    /// The session's number: what WAL records name as a target. Never reused.
    pub id: u64,
    pub client_id: String,
    /// How long the session outlives its connection; zero for a clean session.
    pub expiry: Duration,
    /// Read it freely; change it through `attach`, `detach`, `await_will` and `cancel_will`,
    /// which keep its transitions to those the protocol allows.
    pub(crate) state: SessionState,
    pub subscriptions: BTreeMap<String, SubscriptionOptions>,
    /// Whether the metadata store holds a copy, to be removed with the session.
    pub stored: bool,
    /// The QoS 2 packet ids its client sent and has not released, shared with its connection.
    pub receipts: SharedReceipts,
    /// The receipts as last stored (encoded), so unchanged ones are not written again.
    pub receipts_stored: Option<Vec<u8>>,
    /// How many times its stored copy was forgotten: a progress commit taken before the last
    /// forget must not mark anything of it stored.
    pub forgotten: u64,
    /// The IoT Hub identity its client proved when it last connected; `None` for a plain MQTT
    /// client.
    pub identity: Option<IdentityId>,
    /// The route endpoints its connection takes messages from while connected (a module's
    /// subscribed inputs), in the order they are served: by priority, and those of one
    /// priority in turns. They share the session's window and packet ids.
    pub consumes: Vec<Consumed>,
    /// Endpoints it stopped consuming while connected (unsubscribed): what it was sent from
    /// them stays in flight, taking its packet ids, until the client acknowledges it or the
    /// connection ends (then it goes back to the front of its queue).
    pub held: Vec<QueueId>,
    next_packet_id: u16,
}

/// A route endpoint a session takes messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumed {
    pub queue: QueueId,
    pub priority: u32,
    /// The QoS its subscription granted: messages go at most at this QoS.
    pub qos: QoS,
}

impl Session {
    /// A session that is offline from `now` until a connection attaches it.
    #[must_use]
    pub fn new(id: u64, client_id: String, expiry: Duration, now: Instant) -> Session {
        Session {
            id,
            client_id,
            expiry,
            state: SessionState::Offline { since: now },
            subscriptions: BTreeMap::new(),
            stored: false,
            next_packet_id: 0,
            receipts: SharedReceipts::default(),
            receipts_stored: None,
            forgotten: 0,
            identity: None,
            consumes: Vec::new(),
            held: Vec::new(),
        }
    }

    /// The packet id to first send an entry with, or `None` while it is taken by another
    /// in-flight message of any of the session's queues (its `sources`, found in `queues`;
    /// the queue then waits for that one's acknowledgement). A logged message's id comes from
    /// its sequence number, so it is the same when the message is sent again after a restart,
    /// and a QoS 2 receiver that already has it recognises it (MQTT §4.3.3). A retained
    /// message, not logged for this queue, takes any free id; the window is far below 65535,
    /// so one is always free.
    pub fn packet_id_for(
        &mut self,
        entry: &QueueEntry,
        queues: &IdMap<QueueId, Queue>,
    ) -> Option<u16> {
        let consumed = self.consumes.iter().map(|c| c.queue);
        let sources = std::iter::once(self.queue())
            .chain(consumed)
            .chain(self.held.iter().copied());
        let in_use = |packet_id| {
            sources.clone().any(|queue| {
                queues
                    .get(&queue)
                    .is_some_and(|q| q.entries.packet_id_in_use(packet_id))
            })
        };
        if entry.retained.is_none() {
            let id = u16::try_from(entry.seq % u64::from(u16::MAX)).expect("below u16::MAX") + 1;
            return (!in_use(id)).then_some(id);
        }
        for _ in 0..u16::MAX {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !in_use(self.next_packet_id) {
                return Some(self.next_packet_id);
            }
        }
        None
    }

    /// The queues its connection sends from, in order: its own, then the endpoints it
    /// consumes, with the QoS each may go at.
    pub fn sources(&self) -> impl Iterator<Item = (QueueId, QoS)> + '_ {
        (0..=self.consumes.len()).filter_map(|index| self.source(index))
    }

    /// The `index`th of its `sources`.
    #[must_use]
    pub fn source(&self, index: usize) -> Option<(QueueId, QoS)> {
        match index {
            0 => Some((self.queue(), QoS::ExactlyOnce)),
            _ => self.consumes.get(index - 1).map(|c| (c.queue, c.qos)),
        }
    }

    /// Moves `queue` behind the other endpoints of its priority that it consumes, once it sent
    /// a message: inputs of one priority take turns, and a long backlog on one does not hold
    /// the others back.
    pub fn took_turn(&mut self, queue: QueueId) {
        let Some(at) = self.consumes.iter().position(|c| c.queue == queue) else {
            return;
        };
        let priority = self.consumes[at].priority;
        let end = self.consumes[at..]
            .iter()
            .position(|c| c.priority != priority)
            .map_or(self.consumes.len(), |n| at + n);
        self.consumes[at..end].rotate_left(1);
    }

    /// The id of the session's queue.
    #[must_use]
    pub fn queue(&self) -> QueueId {
        QueueId::Session(self.id)
    }

    /// Whether the session outlives its connection, and so is stored.
    #[must_use]
    pub fn is_persistent(&self) -> bool {
        !self.expiry.is_zero()
    }

    /// What of the session is stored, with its queue's replay floor.
    #[must_use]
    pub fn to_persisted(&self, replay_floor: u64) -> persist::PersistedSession {
        persist::PersistedSession {
            id: self.id,
            expiry_secs: self.expiry.as_secs(),
            replay_floor,
            subscriptions: self.subscriptions.clone(),
        }
    }

    /// Whether an offline session has outlived its expiry.
    #[must_use]
    pub fn is_expired(&self, now: Instant) -> bool {
        match self.state {
            SessionState::Connected(_) => false,
            SessionState::Offline { since } | SessionState::AwaitingWill { since, .. } => {
                now.saturating_duration_since(since) >= self.expiry
            }
        }
    }

    /// The connection the session is attached to, if it is connected.
    #[must_use]
    pub fn attachment(&self) -> Option<&Attachment> {
        match &self.state {
            SessionState::Connected(attachment) => Some(attachment),
            SessionState::Offline { .. } | SessionState::AwaitingWill { .. } => None,
        }
    }

    /// As [`Session::attachment`], to change.
    pub fn attachment_mut(&mut self) -> Option<&mut Attachment> {
        match &mut self.state {
            SessionState::Connected(attachment) => Some(attachment),
            SessionState::Offline { .. } | SessionState::AwaitingWill { .. } => None,
        }
    }

    /// The options of the subscription whose filter `topic` matches first, if any.
    #[must_use]
    pub fn subscription_for(&self, topic: &str) -> Option<&SubscriptionOptions> {
        self.subscriptions
            .iter()
            .find(|(filter, _)| crate::routing::topic::matches(filter, topic))
            .map(|(_, options)| options)
    }

    /// Attaches a connection to a session that has none (detach a previous one first).
    ///
    /// # Panics
    /// If a connection is attached already.
    pub fn attach(&mut self, attachment: Attachment) {
        assert!(
            self.attachment().is_none(),
            "detach the previous connection first"
        );
        assert!(
            !matches!(self.state, SessionState::AwaitingWill { .. }),
            "a resumed session's will is cancelled first"
        );
        self.state = SessionState::Connected(attachment);
    }

    /// Detaches the connection, if one is attached, and returns it; the session is offline
    /// from `now`.
    pub fn detach(&mut self, now: Instant) -> Option<Attachment> {
        if !matches!(self.state, SessionState::Connected(_)) {
            return None;
        }
        match std::mem::replace(&mut self.state, SessionState::Offline { since: now }) {
            SessionState::Connected(attachment) => Some(attachment),
            SessionState::Offline { .. } | SessionState::AwaitingWill { .. } => None,
        }
    }

    /// Holds an offline session's will until `due`.
    ///
    /// # Panics
    /// If the session is not offline.
    pub fn await_will(&mut self, will: Box<Will>, due: Instant) {
        let SessionState::Offline { since } = self.state else {
            panic!("only an offline session awaits a will");
        };
        self.state = SessionState::AwaitingWill { since, will, due };
    }

    /// Takes the will the session awaits, if any (it resumed, or ends); it stays offline.
    pub fn cancel_will(&mut self) -> Option<Box<Will>> {
        let SessionState::AwaitingWill { since, .. } = self.state else {
            return None;
        };
        match std::mem::replace(&mut self.state, SessionState::Offline { since }) {
            SessionState::AwaitingWill { will, .. } => Some(will),
            SessionState::Offline { .. } | SessionState::Connected(_) => None,
        }
    }

    /// Whether the session awaits a will due by `now`.
    #[must_use]
    pub fn will_is_due(&self, now: Instant) -> bool {
        matches!(self.state, SessionState::AwaitingWill { due, .. } if due <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::events::outbound_channel;
    use crate::message::{Message, MessageProperties, QoS};
    use tokio_util::sync::CancellationToken;

    fn attachment(connection: u64) -> Attachment {
        Attachment {
            connection,
            protocol: Protocol::V5,
            outbound: outbound_channel(4).0,
            window: 1,
            method_requests: VecDeque::new(),
            _released: CancellationToken::new().drop_guard(),
        }
    }

    fn will() -> Box<Will> {
        Box::new(Will {
            message: Message {
                topic: "w".into(),
                payload: bytes::Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: MessageProperties::default(),
            },
            delay_secs: 5,
            expiry_interval_secs: None,
        })
    }

    /// Goal: a session goes connected -> offline -> awaiting its will -> offline (resumed or
    /// due), and expires only while offline.
    #[test]
    fn a_session_moves_between_its_states_as_the_protocol_allows() {
        let start = Instant::now();
        let mut session = Session::new(1, "c".into(), Duration::from_secs(60), start);
        assert!(session.attachment().is_none() && session.detach(start).is_none());
        session.attach(attachment(7));
        assert_eq!(session.attachment().map(|a| a.connection), Some(7));
        assert!(!session.is_expired(start + Duration::from_secs(600)));
        assert_eq!(session.detach(start).map(|a| a.connection), Some(7));
        session.await_will(will(), start + Duration::from_secs(5));
        assert!(!session.will_is_due(start + Duration::from_secs(4)));
        assert!(session.will_is_due(start + Duration::from_secs(5)));
        assert!(session.cancel_will().is_some() && session.cancel_will().is_none());
        assert!(!session.is_expired(start + Duration::from_secs(59)));
        assert!(session.is_expired(start + Duration::from_secs(60)));
        session.attach(attachment(8));
    }
}
