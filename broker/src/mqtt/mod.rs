//! The protocol edge: bytes and packets only. Listeners accept sockets, the codec adapter turns
//! bytes into packets, and each connection task talks to the hub through bounded channels.

pub mod codec;
pub mod connection;
pub mod listener;

use crate::auth::authenticator::Authenticator;
use crate::hub::events::Event;
use crate::ingest::Ingest;
use crate::method::Methods;
use crate::twin::TwinStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Per-connection limits, from the configuration.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// The largest packet accepted (and advertised in CONNACK).
    pub packet_size_max: u32,
    /// The in-flight window towards each client, and the receive maximum advertised to it.
    pub receive_max: u16,
    /// Topic aliases a client may establish (MQTT 5).
    pub topic_alias_max: u16,
    /// The longest keep-alive an MQTT 5 client gets (server keep-alive).
    pub keep_alive_max_secs: u16,
}

/// What every connection task shares.
pub struct ServerContext {
    pub hub: mpsc::Sender<Event>,
    pub ingest: Ingest,
    /// Who a CONNECT is.
    pub authenticator: Arc<Authenticator>,
    /// The twins, which identities read and report on `$iothub/twin/…`.
    pub twins: Arc<TwinStore>,
    /// The direct-method calls waiting for the answers identities publish on
    /// `$iothub/methods/res/…`.
    pub methods: Arc<Methods>,
    pub limits: ConnectionLimits,
    pub shutdown: CancellationToken,
    next_connection: AtomicU64,
}

impl ServerContext {
    #[must_use]
    pub fn new(
        hub: mpsc::Sender<Event>,
        ingest: Ingest,
        authenticator: Arc<Authenticator>,
        twins: Arc<TwinStore>,
        methods: Arc<Methods>,
        limits: ConnectionLimits,
        shutdown: CancellationToken,
    ) -> ServerContext {
        ServerContext {
            hub,
            ingest,
            authenticator,
            twins,
            methods,
            limits,
            shutdown,
            next_connection: AtomicU64::new(1),
        }
    }

    /// A number for a new connection, unique in this process.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}
