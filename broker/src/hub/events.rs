//! The messages between connections and the hub: [`Event`] (connection to hub, over one bounded
//! channel) and [`Outbound`] (hub to one connection, over its bounded channel, by `try_send`).

use crate::message::{Message, QoS, Will};
use crate::routing::SubscriptionOptions;
use crate::session::receipts::SharedReceipts;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

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
        packet_id: u16,
    },
    /// The client received a QoS 2 message (PUBREC): release it (PUBREL).
    Received {
        session: u64,
        packet_id: u16,
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
    pub outbound: mpsc::Sender<Outbound>,
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
    pub message: Arc<Message>,
}
