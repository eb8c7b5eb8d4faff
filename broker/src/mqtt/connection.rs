//! One client connection: the CONNECT handshake, then a loop over four sources: packets from
//! the socket, packets from the hub, the durability of this client's own publishes, and the
//! keep-alive deadline.
//!
//! A publish goes through the publish path (`ingest`), which routes and logs it; its PUBACK (or
//! PUBREC, for QoS 2) goes out only once that record is durable (law 1), and a PUBREL's
//! PUBCOMP once the release record is. Acknowledgements go out in the order the packets came
//! in, because the log resolves appends in sequence order. With `PUBLISHES_IN_FLIGHT_MAX`
//! publishes waiting for durability, the connection stops reading its socket: back-pressure,
//! not memory.

use crate::auth::authenticator::{Authenticated, ListenerAuth, Presented};
use crate::auth::identity::IdentityId;
use crate::auth::policy::{Client, Policy};
use crate::auth::sas::CLOCK_SKEW_SECS;
use crate::delivery::drop_worth_logging;
use crate::hub::events::{
    ConnectOutcome, ConnectRefusal, ConnectRequest, Delivery, Event, Outbound, OutboundReceiver,
    Protocol, SubscribeRefusal, outbound_channel,
};
use crate::ingest::{Durable, Ingest, IngestError, Ingested, Publisher, WhenFull};
use crate::iothub;
use crate::iothub::PublishRefusal;
use crate::limits::{
    CLOSE_DRAIN, CONNECT_TIMEOUT_SECS, CONNECTION_OUTBOUND_EXTRA, PUBLISHES_IN_FLIGHT_MAX,
    SEND_BURST_MAX, USER_PROPERTIES_MAX,
};
use crate::message::{Message, QoS, Will, expires_at_ms};
use crate::method::MethodAnswer;
use crate::mqtt::codec::{
    self, ClientPacket, ConnAck, DecodeError, EncodeError, InboundPublish, Reason, ServerPacket,
};
use crate::mqtt::{ConnectionLimits, ServerContext};
use crate::routing::topic;
use crate::session::receipts::{self, SharedReceipts};
use crate::twin::{self, TwinError, TwinRequest};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rmqtt_codec::{MqttCodec, MqttPacket};
use rustls_pki_types::CertificateDer;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why a connection ends: with a reason to send (MQTT 5 DISCONNECT), or quietly.
#[derive(Debug)]
struct Close {
    reason: Option<Reason>,
    why: String,
}

impl Close {
    fn with(reason: Reason, why: impl Into<String>) -> Close {
        Close {
            reason: Some(reason),
            why: why.into(),
        }
    }

    fn quietly(why: impl Into<String>) -> Close {
        Close {
            reason: None,
            why: why.into(),
        }
    }
}

/// An acknowledgement waiting for a record to be durable.
struct AwaitingDurability {
    ack: Ack,
    durable: Durable,
}

/// What goes out once the record is durable.
#[derive(Debug, Clone, Copy)]
enum Ack {
    /// PUBACK; its reason is success, or quota exceeded for a publish not logged.
    Accepted(u16, Reason),
    /// PUBREC, with a reason as for PUBACK.
    Received(u16, Reason),
    /// PUBCOMP; `found`: the packet id was held (MQTT 5 says 0x92 otherwise).
    Completed { packet_id: u16, found: bool },
}

/// Serves one client until it disconnects or breaks the protocol.
pub async fn serve<S>(
    stream: S,
    client: ClientTransport,
    auth: ListenerAuth,
    context: Arc<ServerContext>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let connection_id = context.next_connection_id();
    let peer = client.peer;
    let span = tracing::info_span!("conn", conn_id = connection_id, %peer, client_id = tracing::field::Empty);
    async move {
        let handshake = handshake(stream, connection_id, auth, client.certificates, &context);
        let Some(mut connection) = handshake.await else {
            return;
        };
        tracing::Span::current().record("client_id", connection.client_id.as_str());
        tracing::debug!("connected");
        let close = connection.run().await;
        connection.finish(close).await;
    }
    .instrument(span)
    .await;
}

/// Who a connection's client is at the transport: its address, and the certificate chain it
/// presented over TLS, if any.
#[derive(Debug, Clone)]
pub struct ClientTransport {
    pub peer: SocketAddr,
    pub certificates: Option<Vec<CertificateDer<'static>>>,
}

/// Reads the protocol header and CONNECT, within the connect deadline.
async fn read_connect<S>(
    stream: S,
    context: &ServerContext,
) -> Option<(Framed<S, MqttCodec>, Protocol, Box<codec::Connect>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut framed = Framed::new(stream, codec::version_codec());
    let deadline = Duration::from_secs(CONNECT_TIMEOUT_SECS);
    let version = match timeout(deadline, framed.next()).await {
        Ok(Some(Ok((MqttPacket::Version(version), _)))) => version,
        Ok(Some(Err(e))) => {
            tracing::info!("refused a connection that is not MQTT 3.1.1 or 5: {e}");
            return None;
        }
        Ok(_) | Err(_) => {
            tracing::debug!("no CONNECT before the deadline");
            return None;
        }
    };
    let (codec, protocol) = codec::codec_for(version, context.limits.packet_size_max);
    *framed.codec_mut() = codec;
    match timeout(deadline, framed.next()).await {
        Ok(Some(Ok((packet, _)))) => match codec::from_wire(packet) {
            ClientPacket::Connect(connect) => Some((framed, protocol, connect)),
            _ => None,
        },
        Ok(Some(Err(DecodeError::InvalidClientId))) => {
            refuse(&mut framed, protocol, Reason::ClientIdentifierNotValid).await
        }
        Ok(Some(Err(e))) => {
            tracing::info!("malformed CONNECT: {e}");
            None
        }
        Ok(None) | Err(_) => None,
    }
}

/// What a client presented at CONNECT to prove who it is; its connection presents it again
/// whenever the registry or the authorization policy changes (`Connection::credentials`).
struct ClientCredentials {
    auth: ListenerAuth,
    username: Option<String>,
    password: Option<Bytes>,
    certificates: Option<Vec<CertificateDer<'static>>>,
}

impl ClientCredentials {
    /// What `connect` presents (taken out of it), on a listener that asks `auth`, with the
    /// certificate chain of its TLS handshake, if any.
    fn take(
        connect: &mut codec::Connect,
        auth: ListenerAuth,
        certificates: Option<Vec<CertificateDer<'static>>>,
    ) -> ClientCredentials {
        ClientCredentials {
            auth,
            username: connect.username.take(),
            password: connect.password.take(),
            certificates,
        }
    }

    fn presented<'a>(&'a self, client_id: &'a str) -> Presented<'a> {
        Presented {
            client_id,
            username: self.username.as_deref(),
            password: self.password.as_deref(),
            certificates: self.certificates.as_deref(),
        }
    }
}

/// Resolves with `changes` when the registry or the authorization policy changes; never once
/// the authenticator is gone. One future waits across many turns of the connection's loop,
/// so that each turn does not register a waiter anew.
async fn admission_changed(mut changes: watch::Receiver<u64>) -> watch::Receiver<u64> {
    if changes.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    changes
}

fn send_failed(error: EncodeError) -> Close {
    Close::quietly(format!("failed to send: {error}"))
}

/// Reads CONNECT, authenticates the client, registers the session with the hub and answers
/// CONNACK.
async fn handshake<S>(
    stream: S,
    connection_id: u64,
    auth: ListenerAuth,
    certificates: Option<Vec<CertificateDer<'static>>>,
    context: &Arc<ServerContext>,
) -> Option<Connection<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut framed, protocol, mut connect) = read_connect(stream, context).await?;
    let limits = &context.limits;
    // Watched before authenticating: a change from now on is checked again.
    let changes = context.authenticator.changes();
    let policy = context.authenticator.policy();
    let credentials = ClientCredentials::take(&mut connect, auth, certificates);
    // Assigned first: the policy names a client by the id it will have.
    let assigned = connect
        .client_id
        .is_empty()
        .then(|| format!("spool-{connection_id}-{}", context.ingest.now_ms()));
    let client_id = assigned.as_ref().unwrap_or(&connect.client_id).clone();
    let admitted = admit(context, &credentials, &connect, &client_id, &policy);
    let (identity, token_expires) = match admitted {
        Ok(admitted) => admitted,
        Err(reason) => return refuse(&mut framed, protocol, reason).await,
    };
    let registered = register(
        context,
        connection_id,
        &connect,
        protocol,
        &client_id,
        identity.as_ref(),
    );
    let (outbound, released, outcome) = match registered.await {
        Ok(registered) => registered,
        Err(reason) => return refuse(&mut framed, protocol, reason).await,
    };
    if let Some(size) = connect.packet_size_max {
        codec::limit_outbound(framed.codec_mut(), size);
    }
    let server_keep_alive_secs = server_keep_alive(protocol, connect.keep_alive_secs, limits);
    let keep_alive_secs = server_keep_alive_secs.unwrap_or(connect.keep_alive_secs);
    let assigned_client_id = assigned.filter(|_| protocol == Protocol::V5);
    let connack = accepted(limits, &outcome, assigned_client_id, server_keep_alive_secs);
    let mut connection = Connection {
        framed,
        protocol,
        context: Arc::clone(context),
        connection_id,
        session: outcome.session,
        client_id,
        outbound,
        released,
        awaiting_durability: VecDeque::new(),
        publishes_awaiting_ack: 0,
        receipts: outcome.receipts,
        topic_aliases: HashMap::new(),
        keep_alive: keep_alive_window(keep_alive_secs),
        credentials,
        changes,
        policy,
        identity,
        token_expires,
        will: connect.will.take().map(Box::new),
        connect_session_expiry_secs: connect.session_expiry_secs,
        session_expiry_update: None,
        discarded_too_large: 0,
    };
    if connection.send(connack).await.is_err() || connection.flush().await.is_err() {
        connection
            .finish(Close::quietly("connection lost during CONNACK"))
            .await;
        return None;
    }
    Some(connection)
}

/// The CONNACK of an accepted CONNECT.
fn accepted(
    limits: &ConnectionLimits,
    outcome: &ConnectOutcome,
    assigned_client_id: Option<String>,
    server_keep_alive_secs: Option<u16>,
) -> ServerPacket {
    ServerPacket::ConnAck(ConnAck {
        session_present: outcome.session_present,
        reason: Reason::Success,
        assigned_client_id,
        receive_max: limits.receive_max,
        packet_size_max: limits.packet_size_max,
        topic_alias_max: limits.topic_alias_max,
        server_keep_alive_secs,
    })
}

/// Whether a CONNECT is let in: its client authenticated (`authenticate`), and its will one
/// it may publish (`refuse_will`). Its identity and token expiry, or the refusal's reason.
fn admit(
    context: &ServerContext,
    credentials: &ClientCredentials,
    connect: &codec::Connect,
    client_id: &str,
    policy: &Policy,
) -> Result<(Option<IdentityId>, Option<Instant>), Reason> {
    let admitted = authenticate(context, credentials, client_id).ok_or(Reason::NotAuthorized)?;
    let client = Client {
        client_id,
        identity: admitted.0.as_ref(),
    };
    match connect
        .will
        .as_ref()
        .and_then(|w| refuse_will(w, &client, policy))
    {
        Some(reason) => Err(reason),
        None => Ok(admitted),
    }
}

/// Who the client is, by its credentials and what the listener asks (see `auth`): `None` if
/// it is refused (logged), else its identity and when its SAS token stops being valid, if it
/// has them.
fn authenticate(
    context: &ServerContext,
    credentials: &ClientCredentials,
    client_id: &str,
) -> Option<(Option<IdentityId>, Option<Instant>)> {
    let now_ms = context.ingest.now_ms();
    let presented = credentials.presented(client_id);
    let authenticated =
        context
            .authenticator
            .authenticate(credentials.auth, &presented, now_ms / 1000);
    match authenticated {
        Ok(Authenticated::Anonymous) => Some((None, None)),
        Ok(Authenticated::Identity { id, token_expiry }) => {
            // Valid as long as it was accepted: up to the clock skew past its expiry.
            let expires = token_expiry.map(|expiry| {
                let valid_until = expiry.saturating_add(CLOCK_SKEW_SECS);
                let left = valid_until.saturating_mul(1000).saturating_sub(now_ms);
                Instant::now() + Duration::from_millis(left)
            });
            Some((Some(id), expires))
        }
        Err(e) => {
            tracing::info!(client_id, "refused a CONNECT: {e}");
            None
        }
    }
}

/// Why a CONNECT's will cannot be accepted, if it cannot.
fn refuse_will(will: &Will, client: &Client<'_>, policy: &Policy) -> Option<Reason> {
    let message = &will.message;
    if client.identity.is_some() && HubExchange::parse(&message.topic).is_some() {
        // Addressed to the hub, not to other clients: a will is never handed to it.
        let topic = &message.topic;
        tracing::info!(
            "refused a CONNECT whose will is a twin request or method answer: {topic:?}"
        );
        return Some(Reason::NotAuthorized);
    }
    let checked = iothub::check_publish(client, &message.topic, message.payload.len(), policy);
    if let Err(refusal) = checked {
        tracing::info!("refused a CONNECT's will: {refusal}");
        return Some(refusal_reason(&refusal));
    }
    if let Err(e) = topic::validate_name(&will.message.topic) {
        let topic = &will.message.topic;
        tracing::info!("refused a CONNECT with will topic {topic:?}: {e}");
        return Some(Reason::TopicNameInvalid);
    }
    if will.message.properties.user.len() > USER_PROPERTIES_MAX {
        tracing::info!(
            "refused a CONNECT whose will has more than {USER_PROPERTIES_MAX} user properties"
        );
        return Some(Reason::ImplementationSpecificError);
    }
    None
}

/// The MQTT reason for a refusal by IoT Hub's rules.
fn refusal_reason(refusal: &PublishRefusal) -> Reason {
    match refusal {
        PublishRefusal::NotAuthorized(_) => Reason::NotAuthorized,
        PublishRefusal::MalformedBag(_) => Reason::ProtocolError,
        PublishRefusal::TooLarge { .. } => Reason::PacketTooLarge,
    }
}

/// The hub's acceptance of a CONNECT, with the connection's ends of what it shares with the
/// hub.
type Registration = (OutboundReceiver, CancellationToken, ConnectOutcome);

/// Asks the hub to attach this connection to the client's session; an identity's session
/// keeps only the subscriptions it may hold.
async fn register(
    context: &ServerContext,
    connection_id: u64,
    connect: &codec::Connect,
    protocol: Protocol,
    client_id: &str,
    identity: Option<&IdentityId>,
) -> Result<Registration, Reason> {
    let limits = &context.limits;
    let window = connect
        .receive_max
        .unwrap_or(limits.receive_max)
        .min(limits.receive_max);
    let (outbound_tx, outbound) = outbound_channel(usize::from(window) + CONNECTION_OUTBOUND_EXTRA);
    let (reply, outcome) = oneshot::channel();
    let released = CancellationToken::new();
    let request = ConnectRequest {
        released: released.clone(),
        connection: connection_id,
        client_id: client_id.to_string(),
        protocol,
        clean_start: connect.clean_start,
        session_expiry_secs: connect.session_expiry_secs,
        receive_max: window,
        outbound: outbound_tx,
        identity: identity.cloned(),
        reply,
    };
    let unavailable = |_| Reason::ServerUnavailable;
    context
        .hub
        .send(Event::Connect(request))
        .await
        .map_err(|_| Reason::ServerUnavailable)?;
    match outcome.await.map_err(unavailable)? {
        Ok(outcome) => Ok((outbound, released, outcome)),
        Err(ConnectRefusal::SessionsFull) => Err(Reason::QuotaExceeded),
    }
}

/// Answers a refused CONNECT (best effort) before closing; there is no connection.
async fn refuse<S, T>(
    framed: &mut Framed<S, MqttCodec>,
    protocol: Protocol,
    reason: Reason,
) -> Option<T>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let connack = ServerPacket::ConnAck(ConnAck {
        session_present: false,
        reason,
        assigned_client_id: None,
        receive_max: 1,
        packet_size_max: 0,
        topic_alias_max: 0,
        server_keep_alive_secs: None,
    });
    if let Some(packet) = codec::to_wire(connack, protocol) {
        let _ = framed.send(packet).await;
    }
    None
}

struct Connection<S> {
    framed: Framed<S, MqttCodec>,
    protocol: Protocol,
    context: Arc<ServerContext>,
    connection_id: u64,
    session: u64,
    client_id: String,
    outbound: OutboundReceiver,
    /// Cancelled when the hub lets go of this connection (a newer one took its session).
    released: CancellationToken,
    /// Acknowledgements of this client's packets, in arrival order, until their records are
    /// durable.
    awaiting_durability: VecDeque<AwaitingDurability>,
    /// The QoS 1 publishes among them (QoS 2 ones count in `receipts` until PUBCOMP).
    publishes_awaiting_ack: usize,
    /// The session's unreleased QoS 2 packet ids, shared with the hub.
    receipts: SharedReceipts,
    /// MQTT 5 topic aliases the client established.
    topic_aliases: HashMap<u16, String>,
    /// 1.5 times the client's keep-alive.
    keep_alive: Option<Duration>,
    /// The IoT Hub identity the client proved, which keeps it to its own IoT Hub topics;
    /// `None` for an anonymous MQTT client.
    identity: Option<IdentityId>,
    /// When the SAS token the client connected with stops being valid (its expiry, plus the
    /// clock skew allowed): the connection ends then, and the client connects again with a
    /// new one (as the SDKs do before its expiry).
    token_expires: Option<Instant>,
    /// The client's credentials, checked again when the registry or the authorization policy
    /// changes (announced on the receiver): a client whose identity was removed or disabled,
    /// whose token's key was rotated, or that the policy no longer lets connect, is
    /// disconnected.
    credentials: ClientCredentials,
    /// Announces the changes of the registry and the policy.
    changes: watch::Receiver<u64>,
    /// The deployment's authorization policy, as of the last change announced.
    policy: Arc<Policy>,
    /// Published if the connection ends without a normal DISCONNECT.
    will: Option<Box<Will>>,
    /// The session expiry the CONNECT asked for (MQTT 5).
    connect_session_expiry_secs: u32,
    /// A new session expiry from the client's DISCONNECT (MQTT 5).
    session_expiry_update: Option<u32>,
    /// Messages not sent because they exceed the client's maximum packet size (MQTT 5).
    discarded_too_large: u64,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn run(&mut self) -> Close {
        // The timers and watches live across the loop's turns: making them anew on every
        // packet registered (and removed) a timer or waiter each time.
        let mut last_packet = Instant::now();
        let keep_alive = self.keep_alive;
        let mut keep_alive_due = pin!(sleep_until(keep_alive.map(|k| last_packet + k)));
        let mut token_expired = pin!(sleep_until(self.token_expires));
        let mut shutdown = pin!(self.context.shutdown.clone().cancelled_owned());
        let mut admission = pin!(admission_changed(self.changes.clone()));
        loop {
            let reading = self.awaiting_durability.len() < PUBLISHES_IN_FLIGHT_MAX;
            let result = tokio::select! {
                () = &mut shutdown => Err(self.acknowledge_logged().await),
                durable = next_durable(&mut self.awaiting_durability, &self.context.ingest) => self.acknowledge_ready(durable).await,
                outbound = self.outbound.recv() => self.send_ready(outbound).await,
                packet = self.framed.next(), if reading => {
                    last_packet = Instant::now();
                    match packet {
                        None => Err(Close::quietly("client closed the connection")),
                        Some(Err(e)) => Err(decode_failure(&e)),
                        Some(Ok((packet, _))) => self.on_packet(codec::from_wire(packet)).await,
                    }
                }
                () = &mut keep_alive_due => {
                    // Set for the last packet seen when it was armed: packets since push it on.
                    let due = keep_alive.map(|k| last_packet + k);
                    if due.is_some_and(|due| due <= Instant::now()) {
                        Err(Close::with(Reason::KeepAliveTimeout, "keep-alive expired"))
                    } else {
                        keep_alive_due.set(sleep_until(due));
                        Ok(())
                    }
                }
                () = &mut token_expired => Err(Close::with(Reason::NotAuthorized, "its SAS token expired")),
                changes = &mut admission => {
                    admission.set(admission_changed(changes));
                    self.check_admission_again()
                }
            };
            let flushed = match result {
                Ok(()) if !self.framed.write_buffer().is_empty() => self.flush().await,
                other => other,
            };
            if let Err(close) = flushed {
                return close;
            }
        }
    }

    /// Queues the acknowledgement `first`, and those after it whose records are durable
    /// already (at most `SEND_BURST_MAX` in all): a group commit makes many durable at once.
    async fn acknowledge_ready(
        &mut self,
        first: (Ack, spool_storage::Result<()>),
    ) -> Result<(), Close> {
        self.acknowledge(first).await?;
        for _ in 1..SEND_BURST_MAX {
            let next = next_durable(&mut self.awaiting_durability, &self.context.ingest);
            match ready_now(next) {
                Some(durable) => self.acknowledge(durable).await?,
                None => break,
            }
        }
        Ok(())
    }

    /// Queues what the hub sent, `first` and whatever else waits in the channel (at most
    /// `SEND_BURST_MAX` in all); tells the hub when it asked for room and there is.
    async fn send_ready(&mut self, first: Option<Outbound>) -> Result<(), Close> {
        self.on_outbound(first).await?;
        for _ in 1..SEND_BURST_MAX {
            match self.outbound.try_recv() {
                Some(next) => self.on_outbound(Some(next)).await?,
                None => break,
            }
        }
        match self.outbound.room_made() {
            true => {
                self.tell_hub(Event::Drained {
                    session: self.session,
                })
                .await
            }
            false => Ok(()),
        }
    }

    /// The registry or the policy changed: the client must still be let in, as at CONNECT;
    /// later publishes are checked against the new policy.
    fn check_admission_again(&mut self) -> Result<(), Close> {
        let credentials = &self.credentials;
        let now_secs = self.context.ingest.now_ms() / 1000;
        let presented = credentials.presented(&self.client_id);
        let authenticated =
            self.context
                .authenticator
                .authenticate(credentials.auth, &presented, now_secs);
        self.policy = self.context.authenticator.policy();
        match authenticated {
            Ok(_) => Ok(()),
            Err(e) => Err(Close::with(
                Reason::NotAuthorized,
                format!("it is no longer let in: {e}"),
            )),
        }
    }

    /// The server is stopping: reads nothing more, but acknowledges every publish already
    /// in the log once it is durable (the log stays open until connections finish), so the
    /// client does not resend what is stored.
    async fn acknowledge_logged(&mut self) -> Close {
        while !self.awaiting_durability.is_empty() {
            let durable = next_durable(&mut self.awaiting_durability, &self.context.ingest).await;
            // Each as it is durable: a log waiting for room must not hold back the others.
            let acknowledged = match self.acknowledge(durable).await {
                Ok(()) => self.flush().await,
                failed => failed,
            };
            if let Err(close) = acknowledged {
                return close;
            }
        }
        Close::with(Reason::ServerShuttingDown, "server shutting down")
    }

    /// Tells the hub, says goodbye with a reason where the protocol has one, and logs why.
    async fn finish(&mut self, close: Close) {
        let _ = self
            .context
            .hub
            .send(Event::Disconnected {
                session: self.session,
                connection: self.connection_id,
                will: self.will.take(),
                session_expiry_secs: self.session_expiry_update,
            })
            .await;
        if let Some(reason) = close.reason {
            let sent = self.send(ServerPacket::Disconnect(reason)).await;
            if sent.is_ok() && self.flush().await.is_ok() {
                self.close_after_disconnect().await;
            }
            tracing::info!(
                "disconnected (reason {:#04x}): {}",
                reason.code(),
                close.why
            );
        } else {
            tracing::debug!("disconnected: {}", close.why);
        }
    }

    /// Lets the client read the DISCONNECT: closing a socket that still holds unread bytes
    /// (publishes the client sent before it saw the DISCONNECT) sends a TCP reset, and the
    /// client's kernel may throw the DISCONNECT away before the client reads it. So: FIN
    /// first, then read and drop what still comes, for at most `CLOSE_DRAIN`.
    async fn close_after_disconnect(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stream = self.framed.get_mut();
        let _ = stream.shutdown().await;
        let drain = async {
            let mut discard = [0u8; 4096];
            while let Ok(1..) = stream.read(&mut discard).await {}
        };
        let _ = timeout(CLOSE_DRAIN, drain).await;
    }

    /// Queues a packet to send: the connection's loop writes what is queued at the end of
    /// each turn (`flush`), so that a burst of deliveries or acknowledgements goes out in one
    /// write (and, over TLS, in one record) instead of one each.
    async fn send(&mut self, packet: ServerPacket) -> Result<(), Close> {
        self.try_send(packet).await.map_err(send_failed)
    }

    /// Encodes and queues a packet (nothing, for one this protocol version does not have).
    async fn try_send(&mut self, packet: ServerPacket) -> Result<(), EncodeError> {
        match codec::to_wire(packet, self.protocol) {
            Some(packet) => self.framed.feed(packet).await,
            None => Ok(()),
        }
    }

    /// Writes what is queued.
    async fn flush(&mut self) -> Result<(), Close> {
        self.framed.flush().await.map_err(send_failed)
    }

    async fn acknowledge(
        &mut self,
        (ack, result): (Ack, spool_storage::Result<()>),
    ) -> Result<(), Close> {
        if let Err(e) = result {
            tracing::error!("failed to log a record: {e}");
            return Err(Close::with(
                Reason::ServerUnavailable,
                "the write-ahead log failed",
            ));
        }
        let packet = match ack {
            Ack::Accepted(packet_id, reason) => {
                self.publishes_awaiting_ack -= 1;
                ServerPacket::PubAck { packet_id, reason }
            }
            Ack::Received(packet_id, reason) => ServerPacket::PubRec { packet_id, reason },
            Ack::Completed { packet_id, found } => ServerPacket::PubComp {
                packet_id,
                reason: if found {
                    Reason::Success
                } else {
                    Reason::PacketIdentifierNotFound
                },
            },
        };
        self.send(packet).await
    }

    async fn on_outbound(&mut self, outbound: Option<Outbound>) -> Result<(), Close> {
        match outbound {
            Some(Outbound::Publish(delivery)) => self.deliver(delivery).await,
            Some(Outbound::Release(packet_id)) => {
                let reason = Reason::Success;
                self.send(ServerPacket::PubRel { packet_id, reason }).await
            }
            Some(Outbound::SessionTakenOver) => {
                Err(Close::with(Reason::SessionTakenOver, "session taken over"))
            }
            None => Err(Close::with(Reason::ServerShuttingDown, "the hub stopped")),
        }
    }

    /// Sends a message. One larger than the client's maximum packet size is not sent: MQTT 5
    /// (§3.1.2.25) has the server discard it and go on as if it had been delivered, so the hub
    /// takes it as acknowledged. (Ending the connection instead would meet the same message
    /// again after every reconnect of a persistent session.) A QoS 2 message resent (DUP) may
    /// already be held by the client, which then waits for its PUBREL with that packet id and
    /// would take the next message with the id for a copy: it is taken as received instead,
    /// so the PUBREL goes out (a client without it answers PUBCOMP 0x92).
    async fn deliver(&mut self, delivery: Delivery) -> Result<(), Close> {
        let (packet_id, qos, dup) = (delivery.packet_id, delivery.qos, delivery.dup);
        let expiry = delivery.message.properties.expires_at_ms.map(|at| {
            u32::try_from(
                at.saturating_sub(self.context.ingest.now_ms())
                    .div_ceil(1000),
            )
            .unwrap_or(u32::MAX)
            .max(1)
        });
        match self
            .try_send(ServerPacket::Publish(Box::new(delivery), expiry))
            .await
        {
            Ok(()) => Ok(()),
            Err(EncodeError::OverMaxPacketSize { size, max }) => {
                self.discarded_too_large += 1;
                if drop_worth_logging(self.discarded_too_large) {
                    tracing::warn!(
                        remaining_length = size,
                        remaining_length_max = max,
                        discarded = self.discarded_too_large,
                        "a message larger than the client's maximum packet size was not sent to it (`discarded` counts this connection's)"
                    );
                }
                match packet_id {
                    Some(packet_id) if qos == QoS::ExactlyOnce && dup => {
                        self.tell_hub(self.received(packet_id)).await
                    }
                    Some(packet_id) if qos != QoS::AtMostOnce => {
                        self.tell_hub(self.acknowledged(packet_id)).await
                    }
                    _ => Ok(()),
                }
            }
            Err(e) => Err(send_failed(e)),
        }
    }

    async fn on_packet(&mut self, packet: ClientPacket) -> Result<(), Close> {
        match packet {
            ClientPacket::Publish(publish) => self.on_publish(*publish).await,
            ClientPacket::PubAck(packet_id)
            | ClientPacket::PubComp(packet_id)
            | ClientPacket::PubRec {
                packet_id,
                refused: true,
            } => self.tell_hub(self.acknowledged(packet_id)).await,
            ClientPacket::PubRec {
                packet_id,
                refused: false,
            } => self.tell_hub(self.received(packet_id)).await,
            ClientPacket::PubRel(packet_id) => self.on_release(packet_id).await,
            ClientPacket::Subscribe { packet_id, filters } => {
                self.on_subscribe(packet_id, filters).await
            }
            ClientPacket::Unsubscribe { packet_id, filters } => {
                self.on_unsubscribe(packet_id, filters).await
            }
            ClientPacket::PingReq => self.send(ServerPacket::PingResp).await,
            ClientPacket::Disconnect {
                publish_will,
                session_expiry_secs,
            } => {
                if session_expiry_secs.is_some_and(|secs| secs > 0)
                    && self.connect_session_expiry_secs == 0
                {
                    // MQTT 5 §3.14.2.2.2: a session that ends with the connection stays so.
                    return Err(Close::with(
                        Reason::ProtocolError,
                        "DISCONNECT set a session expiry after CONNECT set none",
                    ));
                }
                self.session_expiry_update = session_expiry_secs;
                if !publish_will {
                    self.will = None;
                }
                Err(Close::quietly("client disconnected"))
            }
            ClientPacket::Connect(_) => Err(Close::with(Reason::ProtocolError, "a second CONNECT")),
            ClientPacket::Unexpected(what) => Err(Close::with(
                Reason::ProtocolError,
                format!("unexpected {what} from a client"),
            )),
        }
    }

    /// Validates, routes and logs a publish; its acknowledgement follows once it is durable.
    async fn on_publish(&mut self, publish: InboundPublish) -> Result<(), Close> {
        if publish.has_subscription_ids {
            return Err(Close::with(
                Reason::ProtocolError,
                "PUBLISH with a subscription identifier",
            ));
        }
        if publish.properties.user.len() > USER_PROPERTIES_MAX {
            let why = format!("more than {USER_PROPERTIES_MAX} user properties");
            return Err(Close::with(Reason::ImplementationSpecificError, why));
        }
        let topic = self.resolve_topic(publish.topic, publish.topic_alias)?;
        topic::validate_name(&topic)
            .map_err(|e| Close::with(Reason::TopicNameInvalid, format!("topic {topic:?}: {e}")))?;
        let packet_id = publish.packet_id.unwrap_or(0);
        self.check_receive_maximum(publish.qos, packet_id)?;
        let mut properties = publish.properties;
        let now_ms = self.context.ingest.now_ms();
        properties.expires_at_ms = expires_at_ms(now_ms, publish.expiry_interval_secs);
        if let (Some(identity), Some(exchange)) = (&self.identity, HubExchange::parse(&topic)) {
            if publish.qos == QoS::ExactlyOnce {
                // IoT Hub takes QoS 0 and 1 only; these have no receipt to resend by.
                let why = format!("{topic:?} at QoS 2");
                return Err(Close::with(Reason::ImplementationSpecificError, why));
            }
            match exchange {
                HubExchange::Twin(request) => {
                    let identity = identity.clone();
                    self.answer_twin(identity, request, publish.payload).await?;
                }
                HubExchange::MethodAnswer(answer) => {
                    self.context
                        .methods
                        .respond(identity, &answer, &publish.payload);
                }
            }
            return self.acknowledge_unlogged(publish.qos, packet_id, Reason::Success);
        }
        let message = Message {
            topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
        };
        let ingested = self
            .context
            .ingest
            .publish(&self.publisher(), message, packet_id)
            .await
            .map_err(refused)?;
        match ingested {
            Ingested::Logged(durable) => self.acknowledge_when(publish.qos, packet_id, durable),
            Ingested::Refused => {
                self.acknowledge_unlogged(publish.qos, packet_id, Reason::QuotaExceeded)
            }
            Ingested::Dropped => Ok(()),
            Ingested::Forbidden(refusal) => {
                let reason = self.iot_refusal(refusal)?;
                self.acknowledge_unlogged(publish.qos, packet_id, reason)
            }
        }
    }

    /// Answers an identity's twin request on `$iothub/twin/res/…` (at QoS 0, as IoT Hub
    /// does): its twin for a GET; for a reported patch, 204 with the new `$version` once the
    /// patch is on disk. A patch IoT Hub refuses gets 400, a store that fails 500.
    async fn answer_twin(
        &mut self,
        identity: IdentityId,
        request: TwinRequest,
        body: Bytes,
    ) -> Result<(), Close> {
        let twins = Arc::clone(&self.context.twins);
        let answered = match &request {
            TwinRequest::Get { .. } => Ok((200, Some(twins.get(&identity).document()), None)),
            TwinRequest::PatchReported { .. } => {
                let id = identity.clone();
                let patched = tokio::task::spawn_blocking(move || twins.patch_reported(&id, &body));
                match patched.await {
                    Ok(Ok(patched)) => {
                        self.context.ingest.twin_changed(&identity, &patched);
                        Ok((204, None, Some(patched.version)))
                    }
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(TwinError::Failed(e.to_string())),
                }
            }
        };
        let (status, body, version) = answered.unwrap_or_else(|error| {
            tracing::info!("refused a twin request: {error}");
            let body = serde_json::json!({ "message": error.to_string() });
            (error.status(), Some(body), None)
        });
        let topic = twin::answer_topic(status, request.rid(), version);
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let delivery = Delivery::unlogged(topic, payload, Vec::new());
        self.send(ServerPacket::Publish(Box::new(delivery), None))
            .await
    }

    /// Acknowledges a publish with `reason`, in order behind the others, nothing logged.
    fn acknowledge_unlogged(
        &mut self,
        qos: QoS,
        packet_id: u16,
        reason: Reason,
    ) -> Result<(), Close> {
        let ack = match qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Ack::Accepted(packet_id, reason),
            QoS::ExactlyOnce => Ack::Received(packet_id, reason),
        };
        self.queue_ack(ack, Durable::Through(0));
        Ok(())
    }

    /// Acknowledges a logged publish once `durable` is (law 1).
    fn acknowledge_when(
        &mut self,
        qos: QoS,
        packet_id: u16,
        durable: Durable,
    ) -> Result<(), Close> {
        let ack = match qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Ack::Accepted(packet_id, Reason::Success),
            QoS::ExactlyOnce => Ack::Received(packet_id, Reason::Success),
        };
        self.queue_ack(ack, durable);
        Ok(())
    }

    fn queue_ack(&mut self, ack: Ack, durable: Durable) {
        self.publishes_awaiting_ack += usize::from(matches!(ack, Ack::Accepted(..)));
        self.awaiting_durability
            .push_back(AwaitingDurability { ack, durable });
    }

    /// A publish IoT Hub's rules refused: MQTT 5 is told it may not use that topic (the
    /// reason to answer with); anything else ends the connection (MQTT 3.1.1 has no refusal,
    /// and a malformed or oversized message is a protocol error, logged and never
    /// acknowledged).
    fn iot_refusal(&self, refusal: PublishRefusal) -> Result<Reason, Close> {
        let reason = refusal_reason(&refusal);
        if reason == Reason::NotAuthorized && self.protocol == Protocol::V5 {
            tracing::info!("refused a publish: {refusal}");
            return Ok(reason);
        }
        Err(Close::with(reason, refusal.to_string()))
    }

    /// MQTT 5 clients may have at most the receive maximum the CONNACK announced of QoS 1 and
    /// 2 publishes unacknowledged (§3.3.4); 3.1.1 clients, which were not told, get
    /// `PUBLISHES_IN_FLIGHT_MAX`. A resent QoS 2 publish is not a new one.
    fn check_receive_maximum(&self, qos: QoS, packet_id: u16) -> Result<(), Close> {
        if qos == QoS::AtMostOnce {
            return Ok(());
        }
        let receipts = receipts::lock(&self.receipts);
        if qos == QoS::ExactlyOnce && receipts.get(packet_id).is_some() {
            return Ok(());
        }
        let limit = match self.protocol {
            Protocol::V5 => usize::from(self.context.limits.receive_max),
            Protocol::V311 => PUBLISHES_IN_FLIGHT_MAX,
        };
        let unacknowledged = self.publishes_awaiting_ack + receipts.len();
        if unacknowledged < limit {
            return Ok(());
        }
        Err(Close::with(
            Reason::ReceiveMaximumExceeded,
            format!("more than {limit} QoS 1 and 2 publishes unacknowledged"),
        ))
    }

    /// PUBREL: logs the release of a held QoS 2 packet id, then answers PUBCOMP once that is
    /// durable (see `submit_exactly_once` for an id not held).
    async fn on_release(&mut self, packet_id: u16) -> Result<(), Close> {
        let (durable, found) = self
            .context
            .ingest
            .release(&self.publisher(), packet_id)
            .await
            .map_err(refused)?;
        self.awaiting_durability.push_back(AwaitingDurability {
            ack: Ack::Completed { packet_id, found },
            durable,
        });
        Ok(())
    }

    /// This connection's client, as the publish path knows it.
    fn publisher(&self) -> Publisher<'_> {
        Publisher {
            client: Client {
                client_id: &self.client_id,
                identity: self.identity.as_ref(),
            },
            policy: &self.policy,
            session: self.session,
            connection: self.connection_id,
            receipts: &self.receipts,
            released: &self.released,
            when_full: match self.protocol {
                Protocol::V5 => WhenFull::Refuse,
                Protocol::V311 => WhenFull::Wait,
            },
        }
    }

    fn acknowledged(&self, packet_id: u16) -> Event {
        Event::Acknowledge {
            session: self.session,
            connection: self.connection_id,
            packet_id,
        }
    }

    fn received(&self, packet_id: u16) -> Event {
        Event::Received {
            session: self.session,
            connection: self.connection_id,
            packet_id,
        }
    }

    async fn tell_hub(&mut self, event: Event) -> Result<(), Close> {
        self.context
            .hub
            .send(event)
            .await
            .map_err(|_| Close::with(Reason::ServerShuttingDown, "the hub stopped"))
    }

    /// The topic of an MQTT 5 publish that may use a topic alias (§3.3.2.3.4).
    fn resolve_topic(&mut self, topic: String, alias: Option<u16>) -> Result<String, Close> {
        let Some(alias) = alias else {
            return Ok(topic);
        };
        if alias == 0 || alias > self.context.limits.topic_alias_max {
            return Err(Close::with(
                Reason::TopicAliasInvalid,
                format!("topic alias {alias}"),
            ));
        }
        if topic.is_empty() {
            return self.topic_aliases.get(&alias).cloned().ok_or_else(|| {
                Close::with(
                    Reason::ProtocolError,
                    format!("unknown topic alias {alias}"),
                )
            });
        }
        self.topic_aliases.insert(alias, topic.clone());
        Ok(topic)
    }

    async fn on_subscribe(
        &mut self,
        packet_id: u16,
        filters: Vec<(String, crate::routing::SubscriptionOptions)>,
    ) -> Result<(), Close> {
        let mut granted: Vec<Result<QoS, Reason>> = Vec::with_capacity(filters.len());
        let mut valid = Vec::new();
        for (filter, options) in filters {
            if filter.starts_with("$share/") {
                // CONNACK said shared subscriptions are not available: refuse rather than
                // grant a filter that no topic would ever match (MQTT 5 §3.9.3).
                tracing::info!("refused shared subscription {filter:?}: not supported");
                granted.push(Err(Reason::SharedSubscriptionsNotSupported));
                continue;
            }
            match topic::validate_filter(&filter) {
                Ok(()) => {
                    granted.push(Ok(options.qos));
                    valid.push((filter, options));
                }
                Err(e) => {
                    tracing::info!("refused subscription to {filter:?}: {e}");
                    granted.push(Err(Reason::TopicFilterInvalid));
                }
            }
        }
        let session = self.session;
        let granted_by_hub = ask_hub(&self.context.hub, |reply| Event::Subscribe {
            session,
            filters: valid,
            reply,
        })
        .await?;
        let mut granted_by_hub = granted_by_hub.into_iter();
        for slot in granted.iter_mut().filter(|g| g.is_ok()) {
            *slot = match granted_by_hub.next() {
                Some(Ok(qos)) => Ok(qos),
                Some(Err(SubscribeRefusal::QuotaExceeded)) => Err(Reason::QuotaExceeded),
                Some(Err(SubscribeRefusal::NotAuthorized)) => Err(Reason::NotAuthorized),
                Some(Err(SubscribeRefusal::Unavailable)) | None => Err(Reason::UnspecifiedError),
            };
        }
        self.send(ServerPacket::SubAck { packet_id, granted }).await
    }

    async fn on_unsubscribe(&mut self, packet_id: u16, filters: Vec<String>) -> Result<(), Close> {
        let session = self.session;
        let existed = ask_hub(&self.context.hub, |reply| Event::Unsubscribe {
            session,
            filters,
            reply,
        })
        .await?;
        let results = existed
            .into_iter()
            .map(|existed| {
                if existed {
                    Reason::Success
                } else {
                    Reason::NoSubscriptionExisted
                }
            })
            .collect();
        self.send(ServerPacket::UnsubAck { packet_id, results })
            .await
    }
}

/// Sends the hub a request and waits for its answer.
async fn ask_hub<T>(
    hub: &mpsc::Sender<Event>,
    request: impl FnOnce(oneshot::Sender<T>) -> Event,
) -> Result<T, Close> {
    let hub_stopped = || Close::with(Reason::ServerShuttingDown, "the hub stopped");
    let (reply, answer) = oneshot::channel();
    hub.send(request(reply)).await.map_err(|_| hub_stopped())?;
    answer.await.map_err(|_| hub_stopped())
}

/// `future`'s output if it is ready at once, without waiting.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// Waits for the oldest acknowledgement's record to become durable (never, if there is none).
async fn next_durable(
    awaiting: &mut VecDeque<AwaitingDurability>,
    ingest: &Ingest,
) -> (Ack, spool_storage::Result<()>) {
    let Some(front) = awaiting.front_mut() else {
        return std::future::pending().await;
    };
    let result = ingest.durable(&mut front.durable).await;
    let done = awaiting.pop_front().expect("front exists");
    (done.ack, result)
}

/// A publish an identity makes to the hub itself rather than to other clients: nothing of it
/// is logged, and the hub answers it at once.
enum HubExchange {
    /// A twin GET or reported patch.
    Twin(TwinRequest),
    /// The answer to a direct-method call.
    MethodAnswer(MethodAnswer),
}

impl HubExchange {
    fn parse(topic: &str) -> Option<HubExchange> {
        if !topic.starts_with("$iothub/") {
            return None;
        }
        TwinRequest::parse(topic)
            .map(HubExchange::Twin)
            .or_else(|| MethodAnswer::parse(topic).map(HubExchange::MethodAnswer))
    }
}

/// How a publish the publish path could not take ends the connection.
fn refused(error: IngestError) -> Close {
    let reason = match error {
        IngestError::TakenOver => Reason::SessionTakenOver,
        IngestError::ShuttingDown => Reason::ServerShuttingDown,
        IngestError::TooLarge { .. } => Reason::PacketTooLarge,
        IngestError::LogFailed => Reason::ServerUnavailable,
    };
    Close::with(reason, error.to_string())
}

/// The keep-alive an MQTT 5 client is told to use instead of its own (§3.2.2.3.14): the
/// configured maximum, when it asked for more or for none. MQTT 3.1.1 has no way to say it.
fn server_keep_alive(
    protocol: Protocol,
    requested_secs: u16,
    limits: &crate::mqtt::ConnectionLimits,
) -> Option<u16> {
    let max = limits.keep_alive_max_secs;
    (protocol == Protocol::V5 && (requested_secs == 0 || requested_secs > max)).then_some(max)
}

/// How long a client may stay silent: one and a half keep-alive periods (MQTT §3.1.2.10).
fn keep_alive_window(keep_alive_secs: u16) -> Option<Duration> {
    (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How a decoding failure ends the connection (MQTT 5 reason codes, §4.13).
fn decode_failure(error: &DecodeError) -> Close {
    let reason = match error {
        DecodeError::MaxSizeExceeded { .. } => Reason::PacketTooLarge,
        DecodeError::InvalidTopicName => Reason::TopicNameInvalid,
        DecodeError::InvalidTopicFilter => Reason::TopicFilterInvalid,
        DecodeError::Io(_) => return Close::quietly(format!("connection error: {error}")),
        _ => Reason::MalformedPacket,
    };
    Close::with(reason, format!("bad packet: {error}"))
}
