//! The messages between connections (and the deployment's reloads) and the hub: [`Event`] (connection to hub, over one bounded
//! channel) and [`Outbound`] (hub to one connection, over its bounded channel, by `try_send`).

use crate::auth::identity::IdentityId;
use crate::auth::policy::Policy;
use crate::iothub::ModuleInput;
use crate::message::{Message, QoS, Will};
use crate::method::{MethodDelivery, MethodRequest};
use crate::routing::SubscriptionOptions;
use crate::routing::endpoints::EndpointName;
use crate::session::receipts::SharedReceipts;
use crate::twin::DesiredPatch;
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// What a connection asks of the hub.
#[derive(Debug)]
pub enum Event {
    Connect(ConnectRequest),
    Subscribe {
        session: u64,
        filters: Vec<(String, SubscriptionOptions)>,
        /// The QoS granted for each filter, in order, or why it was refused.
        reply: oneshot::Sender<Vec<Result<QoS, SubscribeRefusal>>>,
    },
    Unsubscribe {
        session: u64,
        filters: Vec<String>,
        reply: oneshot::Sender<Vec<bool>>,
    },
    /// The client acknowledged a message the hub sent it: PUBACK, PUBCOMP, or a PUBREC that
    /// refused it (MQTT 5).
    Acknowledge {
        session: u64,
        /// The connection it came through: one taken over since is not listened to, as its
        /// messages went back to the queue and to the new connection.
        connection: u64,
        packet_id: u16,
    },
    /// The client received a QoS 2 message (PUBREC): release it (PUBREL).
    Received {
        session: u64,
        /// As for `Acknowledge`.
        connection: u64,
        packet_id: u16,
    },
    /// The connection made room in its outbound channel after the hub asked for it
    /// ([`OutboundSender::ask_for_room`]): send what waits.
    Drained {
        session: u64,
    },
    /// A reloaded deployment reaches new endpoints (numbered in the metadata store with their
    /// checkpoint): their queues are made, and `done` answered, before their routes are
    /// installed.
    AddEndpoints {
        added: Vec<(EndpointName, u64)>,
        checkpoint: u64,
        done: oneshot::Sender<()>,
    },
    /// A deployment's authorization policy is in force (at start, and on every reload): the
    /// subscriptions it does not allow are dropped, and new ones are held to it.
    PolicyChanged {
        policy: Arc<Policy>,
    },
    /// A deployment changed modules' desired properties (stored already): each patch goes to
    /// its module's session, if it is subscribed to them.
    DesiredPatches {
        patches: Vec<DesiredPatch>,
    },
    /// A direct-method call's request: it goes to its target's connection if the target is
    /// connected and subscribed to its topic, which `reply` says.
    MethodRequest {
        request: MethodRequest,
        reply: oneshot::Sender<MethodDelivery>,
    },
    /// The connection ended; with its will if it did not end with a normal DISCONNECT, and
    /// the session expiry its MQTT 5 DISCONNECT set, if any.
    Disconnected {
        session: u64,
        connection: u64,
        will: Option<Box<Will>>,
        session_expiry_secs: Option<u32>,
    },
}

/// A CONNECT, validated by the connection.
#[derive(Debug)]
pub struct ConnectRequest {
    pub connection: u64,
    pub client_id: String,
    pub protocol: Protocol,
    /// Start a new session, discarding any previous one.
    pub clean_start: bool,
    /// Seconds the session outlives the connection (MQTT 5; 3.1.1 persistent sessions get the
    /// configured default, clean ones 0).
    pub session_expiry_secs: u32,
    /// The client's receive maximum: the in-flight window towards it.
    pub receive_max: u16,
    pub outbound: OutboundSender,
    /// Cancelled when the hub lets go of this connection (its session was taken over or
    /// removed), so a connection waiting for something else (room in the log) stops waiting.
    pub released: CancellationToken,
    /// The IoT Hub identity the client proved, if any. An identity keeps to its own topics:
    /// a resumed session loses the subscriptions it may not hold (given before the client was
    /// an identity). A module's session takes the messages routes send to its inputs.
    pub identity: Option<IdentityId>,
    pub reply: oneshot::Sender<Result<ConnectOutcome, ConnectRefusal>>,
}

/// The hub's answer to a CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectOutcome {
    pub session: u64,
    pub session_present: bool,
    /// The session's unreleased QoS 2 packet ids from its client.
    pub receipts: SharedReceipts,
}

/// Why the hub refused a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// The session limit is reached and this session would be new.
    SessionsFull,
}

/// Why the hub refused a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRefusal {
    /// The session already holds `SUBSCRIPTIONS_PER_SESSION_MAX` subscriptions.
    QuotaExceeded,
    /// The subscription could not be stored durably (or the session is gone).
    Unavailable,
    /// IoT Hub's rules or the authorization policy do not allow it.
    NotAuthorized,
}

/// A connection's outbound channel, whose sender the hub holds and never waits on: what does
/// not fit stays in the session's queue, and the hub asks the connection to say when it has
/// made room (without that, a session no acknowledgement wakes, QoS 0 only, would stall).
#[must_use]
pub fn outbound_channel(capacity: usize) -> (OutboundSender, OutboundReceiver) {
    let (sender, receiver) = mpsc::channel(capacity);
    let room_wanted = Arc::new(AtomicBool::new(false));
    let hub_side = OutboundSender {
        sender,
        room_wanted: Arc::clone(&room_wanted),
    };
    (
        hub_side,
        OutboundReceiver {
            receiver,
            room_wanted,
        },
    )
}

/// The hub's side of a connection's outbound channel.
#[derive(Debug)]
pub struct OutboundSender {
    sender: mpsc::Sender<Outbound>,
    /// Set by the hub when something did not fit; cleared by the connection as it answers.
    room_wanted: Arc<AtomicBool>,
}

impl OutboundSender {
    /// Sends without waiting.
    ///
    /// # Errors
    /// The channel is full or the connection is gone.
    pub fn try_send(&self, outbound: Outbound) -> Result<(), TrySendError<Outbound>> {
        self.sender.try_send(outbound)
    }

    /// Free slots.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.sender.capacity()
    }

    /// Whether the connection is gone (its end of the channel dropped).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Asks the connection for an [`Event::Drained`] once it has made room; true if `needed`
    /// slots are free already (then no event may come). Raising the flag before looking
    /// again means a connection draining meanwhile cannot miss it.
    #[must_use]
    pub fn ask_for_room(&self, needed: usize) -> bool {
        self.room_wanted.store(true, Ordering::SeqCst);
        self.sender.capacity() >= needed
    }
}

/// The connection's side of its outbound channel.
#[derive(Debug)]
pub struct OutboundReceiver {
    receiver: mpsc::Receiver<Outbound>,
    room_wanted: Arc<AtomicBool>,
}

impl OutboundReceiver {
    pub async fn recv(&mut self) -> Option<Outbound> {
        self.receiver.recv().await
    }

    /// What the hub sent, if anything, without waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.receiver.try_recv().ok()
    }

    /// Whether the hub asked for room and the channel is at least half free now: the
    /// connection then sends [`Event::Drained`] (once: this clears the request).
    pub fn room_made(&self) -> bool {
        let half_free = self.receiver.capacity() * 2 >= self.receiver.max_capacity();
        half_free
            && self.room_wanted.load(Ordering::SeqCst)
            && self.room_wanted.swap(false, Ordering::SeqCst)
    }
}

/// What the hub sends a connection.
#[derive(Debug)]
pub enum Outbound {
    Publish(Delivery),
    /// PUBREL for a QoS 2 message the client received.
    Release(u16),
    /// Another connection took the session over: disconnect (MQTT 5 reason 0x8E).
    SessionTakenOver,
}

/// A message to send to the client.
#[derive(Debug)]
pub struct Delivery {
    /// `None` for QoS 0.
    pub packet_id: Option<u16>,
    pub qos: QoS,
    pub dup: bool,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The message as logged: for a module input, the telemetry as its sender published it.
    pub message: Arc<Message>,
    /// The module input it goes to, whose topic it is sent on (`ModuleInput::topic`).
    pub input: Option<Arc<ModuleInput>>,
}

impl Delivery {
    /// A message the hub itself sends a client at QoS 0, logged nowhere: the answer to a twin
    /// request, a direct-method request.
    #[must_use]
    pub fn unlogged(topic: String, payload: bytes::Bytes, subscription_ids: Vec<u32>) -> Delivery {
        let message = Message {
            topic,
            payload,
            qos: QoS::AtMostOnce,
            retain: false,
            properties: crate::message::MessageProperties::default(),
        };
        Delivery {
            packet_id: None,
            qos: QoS::AtMostOnce,
            dup: false,
            retain: false,
            subscription_ids,
            message: Arc::new(message),
            input: None,
        }
    }

    /// The topic the client gets the message on: its input's, for a module input
    /// (`ModuleInput::topic`, made here, off the hub's task), else the message's own.
    #[must_use]
    pub fn topic(&self) -> Cow<'_, str> {
        match &self.input {
            Some(input) => Cow::Owned(input.topic(&self.message)),
            None => Cow::Borrowed(&self.message.topic),
        }
    }
}
