//! The hub: the single owner of sessions, subscriptions and delivery queues.
//!
//! It processes connection events with synchronous handlers (no `.await` inside a handler) and
//! follows the write-ahead log with a reader that sees only durable records: each publish record
//! names the sessions it goes to, so the hub appends its sequence number to their queues and
//! sends what their windows allow. It never blocks on a connection: packets go out with a bounded
//! `try_send`, and what does not fit stays in the queue until the next acknowledgement.

pub mod events;
pub mod retained;

use crate::delivery::cache::MessageCache;
use crate::delivery::queue::QueueEntry;
use crate::delivery::record::{
    KIND_PUBLISH, KIND_QOS2_RECEIVED, KIND_QOS2_RELEASE, PublishRecord, ReceivedRecord,
    ReleaseRecord, Target,
};
use crate::encoding::FormatError;
use crate::hub::events::{
    ConnectOutcome, ConnectRefusal, ConnectRequest, Delivery, Event, Outbound, SubscribeRefusal,
};
use crate::hub::retained::{RETAINED_CHECKPOINT, RetainedMessages};
use crate::limits::{
    MESSAGE_CACHE_BYTES_MAX, RECLAIM_INTERVAL, RECLAIM_LIVE_ENTRIES_MAX, RECLAIM_SEGMENTS_PER_RUN,
    SUBSCRIPTIONS_PER_SESSION_MAX,
};
use crate::message::{Message, QoS, Will, expires_at_ms, now_ms};
use crate::routing::{RetainHandling, Router, SubscriptionOptions, SubscriptionTable};
use crate::session::persist::PersistedSession;
use crate::session::receipts::{self, Qos2Receipts};
use crate::session::{Attachment, Session};
use bytes::Bytes;
use spool_storage::{Commit, Liveness, Meta, Record, StateTable, Wal, WalReader};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

/// The limits the hub enforces on sessions.
#[derive(Debug, Clone)]
pub struct HubLimits {
    /// The most messages in flight towards one client.
    pub in_flight_max: u16,
    /// The most sessions, connected or not; a CONNECT that would create one more is refused.
    pub sessions_max: usize,
    /// The most messages one session's queue keeps.
    pub session_queue_max: usize,
    /// How long a persistent MQTT 3.1.1 session outlives its connection.
    pub session_expiry_v311: Duration,
}

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] spool_storage::Error),
    #[error("the stored session of client {client_id:?} is corrupt: {source}")]
    CorruptSession {
        client_id: String,
        source: FormatError,
    },
    #[error("the stored retained message of topic {topic:?} is corrupt: {source}")]
    CorruptRetained { topic: String, source: FormatError },
    #[error("the stored QoS 2 receipts of client {client_id:?} are corrupt: {source}")]
    CorruptReceipts {
        client_id: String,
        source: FormatError,
    },
}

/// The checkpoint of the stored QoS 2 receipts: every publish and release record up to it is
/// reflected in them.
const RECEIPTS_CHECKPOINT: &str = "qos2-receipts";

/// The hub's state; see the module documentation.
pub struct Hub {
    wal: Wal,
    meta: Arc<Meta>,
    tail: WalReader,
    /// Every subscription; the hub changes it and installs a snapshot of it in `router`.
    subscriptions: SubscriptionTable,
    router: Arc<Router>,
    sessions: HashMap<u64, Session>,
    session_by_client: HashMap<String, u64>,
    /// Session ids are the log's epoch in the high 32 bits and a counter in the low ones, so an
    /// id is never reused across restarts and old records can never reach a new session.
    next_session_id: u64,
    cache: MessageCache,
    retained: RetainedMessages,
    /// Where the stored QoS 2 receipts are complete (see `session::receipts`).
    receipts_checkpoint: u64,
    /// A removal of old log segments is under way (on a blocking thread).
    retention_running: Arc<AtomicBool>,
    limits: HubLimits,
}

impl Hub {
    /// A hub with the persistent sessions of `meta`, whose queues it rebuilds by replaying the
    /// log from their checkpoints (through the same path as live delivery).
    ///
    /// # Errors
    /// If the log or the metadata cannot be read, or a stored session is corrupt.
    pub fn new(
        wal: Wal,
        meta: Arc<Meta>,
        router: Arc<Router>,
        limits: HubLimits,
    ) -> Result<Hub, StartError> {
        let tail = wal.reader(wal.durable_seq() + 1)?;
        let next_session_id = (wal.epoch() << 32) + 1;
        let retained = RetainedMessages::load(&meta)?;
        let mut hub = Hub {
            wal,
            meta,
            tail,
            subscriptions: SubscriptionTable::default(),
            router,
            sessions: HashMap::new(),
            session_by_client: HashMap::new(),
            next_session_id,
            cache: MessageCache::new(MESSAGE_CACHE_BYTES_MAX),
            retained,
            receipts_checkpoint: 0,
            retention_running: Arc::new(AtomicBool::new(false)),
            limits,
        };
        let replay_from = hub.load_sessions()?.min(hub.retained.replay_from());
        hub.router.install(hub.subscriptions.clone());
        hub.restore_receipts()?;
        // Records below the log's first segment that a queue still held were moved, not
        // removed: the reader yields them first, in sequence order.
        hub.tail = hub.wal.reader(replay_from)?;
        // Replay before any client connects: a session must have its queue, with the PUBRECs
        // it logged, before it is attached, or it would send a released QoS 2 message again.
        hub.read_durable_records();
        tracing::info!(
            retained = hub.retained.len(),
            replayed_through = hub.tail.next_seq() - 1,
            "restored retained messages and session queues"
        );
        Ok(hub)
    }

    /// Restores stored sessions; returns where the log replay must start for them.
    fn load_sessions(&mut self) -> Result<u64, StartError> {
        let checkpoints = self.meta.checkpoints()?;
        let mut replay_from = self.wal.durable_seq() + 1;
        let now = Instant::now();
        for (client_id, stored) in self.meta.sessions()? {
            let stored =
                PersistedSession::decode(&stored).map_err(|source| StartError::CorruptSession {
                    client_id: client_id.clone(),
                    source,
                })?;
            let expiry = Duration::from_secs(stored.expiry_secs);
            let mut session = Session::new(
                stored.id,
                client_id.clone(),
                expiry,
                self.limits.session_queue_max,
            );
            let checkpoint = checkpoints
                .get(&session.checkpoint_key())
                .copied()
                .unwrap_or(0);
            session.replay_floor = checkpoint.max(stored.replay_floor);
            session.checkpoint = session.replay_floor;
            session.stored = true;
            // The expiry clock restarts with the process: the time spent down is not counted.
            session.detached_at = Some(now);
            for (filter, options) in &stored.subscriptions {
                self.subscriptions.subscribe(stored.id, filter, *options);
            }
            session.subscriptions = stored.subscriptions;
            replay_from = replay_from.min(session.replay_floor + 1);
            self.session_by_client.insert(client_id, stored.id);
            self.sessions.insert(stored.id, session);
        }
        tracing::info!(
            sessions = self.sessions.len(),
            replay_from,
            "restored persistent sessions"
        );
        Ok(replay_from)
    }

    /// Rebuilds the stored sessions' QoS 2 receipts: as stored at their checkpoint, then every
    /// publish and release record after it. This happens before any client connects, and
    /// stored receipts of sessions that no longer exist are removed.
    fn restore_receipts(&mut self) -> Result<(), StartError> {
        self.receipts_checkpoint = self.meta.checkpoint(RECEIPTS_CHECKPOINT)?.unwrap_or(0);
        let mut orphans = Vec::new();
        for (key, bytes) in self.meta.state(StateTable::Qos2Receipts)? {
            let Some(session) = key.parse().ok().and_then(|id| self.sessions.get_mut(&id)) else {
                orphans.push(key);
                continue;
            };
            let stored =
                Qos2Receipts::decode(&bytes).map_err(|source| StartError::CorruptReceipts {
                    client_id: session.client_id.clone(),
                    source,
                })?;
            *receipts::lock(&session.receipts) = stored;
            session.receipts_stored = Some(bytes);
        }
        let removals: Vec<_> = orphans
            .iter()
            .map(|key| (StateTable::Qos2Receipts, key.as_str(), None))
            .collect();
        self.meta
            .set_checkpoints_and_state(&[], &removals, Commit::Durable)?;
        let first = self.wal.first_seq();
        if self.receipts_checkpoint + 1 < first {
            tracing::warn!(
                checkpoint = self.receipts_checkpoint,
                first,
                "records the QoS 2 receipts needed were already removed from the log"
            );
        }
        let mut reader = self.wal.reader((self.receipts_checkpoint + 1).max(first))?;
        while let Some(record) = reader.try_next()? {
            self.apply_to_receipts(&record);
        }
        Ok(())
    }

    /// Replays one record into the receipts of its session (undecodable records are reported
    /// when the hub delivers them).
    fn apply_to_receipts(&mut self, record: &Record) {
        let change = match record.kind {
            KIND_PUBLISH => PublishRecord::decode(record.payload.clone())
                .ok()
                .and_then(|p| Some((p.publisher, p.qos2_packet_id?, true))),
            KIND_QOS2_RELEASE => ReleaseRecord::decode(record.payload.clone())
                .ok()
                .map(|r| (r.session, r.packet_id, false)),
            _ => None,
        };
        let Some((id, packet_id, logged)) = change else {
            return;
        };
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let mut receipts = receipts::lock(&session.receipts);
        if logged {
            receipts.insert(packet_id, record.seq);
        } else {
            receipts.release(packet_id);
        }
    }

    /// Runs until `shutdown` is cancelled or the log stops.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut expiry = tokio::time::interval(Duration::from_secs(1));
        let mut reclaim = tokio::time::interval(RECLAIM_INTERVAL);
        reclaim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                Some(event) = events.recv() => self.handle(event),
                record = self.tail.next() => match record {
                    Ok(record) => self.on_record(&record),
                    Err(spool_storage::Error::Closed) => return,
                    Err(e) => {
                        tracing::error!("failed to read the write-ahead log: {e}");
                        return;
                    }
                },
                _ = expiry.tick() => {
                    self.expire_sessions(Instant::now());
                    self.publish_due_wills(Instant::now());
                    self.retained.expire(now_ms());
                    self.commit_checkpoints();
                }
                _ = reclaim.tick() => self.reclaim_log_space(),
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connect(request) => self.connect(request),
            Event::Subscribe {
                session,
                filters,
                reply,
            } => {
                let _ = reply.send(self.subscribe(session, filters));
            }
            Event::Unsubscribe {
                session,
                filters,
                reply,
            } => {
                let _ = reply.send(self.unsubscribe(session, &filters));
            }
            Event::Acknowledge {
                session,
                connection,
                packet_id,
            } if self.is_attached(session, connection) => self.acknowledge(session, packet_id),
            Event::Received {
                session,
                connection,
                packet_id,
            } if self.is_attached(session, connection) => self.received(session, packet_id),
            Event::Acknowledge { .. } | Event::Received { .. } => {} // from a taken-over connection
            Event::Drained { session } => self.pump(session),
            Event::Disconnected {
                session,
                connection,
                will,
                session_expiry_secs,
            } => self.disconnected(session, connection, will, session_expiry_secs),
        }
    }

    fn connect(&mut self, request: ConnectRequest) {
        let expiry = match request.protocol {
            events::Protocol::V5 => Duration::from_secs(u64::from(request.session_expiry_secs)),
            events::Protocol::V311 if request.clean_start => Duration::ZERO,
            events::Protocol::V311 => self.limits.session_expiry_v311,
        };
        let existing = self.session_by_client.get(&request.client_id).copied();
        if let Some(id) = existing {
            let session = self
                .sessions
                .get_mut(&id)
                .expect("index and sessions agree");
            if let Some(old) = session.attachment.take() {
                tracing::info!(client_id = %request.client_id, "session taken over by a new connection");
                let _ = old.outbound.try_send(Outbound::SessionTakenOver);
                session.queue.requeue_in_flight();
            }
            if request.clean_start {
                self.remove_session(id);
            } else if session.pending_will.take().is_some() {
                tracing::debug!(client_id = %request.client_id, "session resumed within its will delay: will not published");
            }
        }
        let session_present = existing.is_some() && !request.clean_start;
        let id = match self.session_by_client.get(&request.client_id) {
            Some(&id) => id,
            None if self.sessions.len() >= self.limits.sessions_max => {
                let max = self.limits.sessions_max;
                tracing::warn!(client_id = %request.client_id, "refused a new session: {max} sessions exist");
                let _ = request.reply.send(Err(ConnectRefusal::SessionsFull));
                return;
            }
            None => {
                let id = self.next_session_id;
                self.next_session_id += 1;
                let mut session = Session::new(
                    id,
                    request.client_id.clone(),
                    expiry,
                    self.limits.session_queue_max,
                );
                session.replay_floor = self.tail.next_seq() - 1;
                session.checkpoint = session.replay_floor;
                self.sessions.insert(id, session);
                self.session_by_client.insert(request.client_id.clone(), id);
                id
            }
        };
        let session = self.sessions.get_mut(&id).expect("just ensured");
        session.expiry = expiry;
        session.detached_at = None;
        session.attachment = Some(Attachment {
            connection: request.connection,
            protocol: request.protocol,
            outbound: request.outbound,
            window: usize::from(request.receive_max.min(self.limits.in_flight_max).max(1)),
            _released: request.released.drop_guard(),
        });
        receipts::lock(&session.receipts).set_owner(request.connection);
        let receipts = Arc::clone(&session.receipts);
        if let Err(e) = self.store_session(id) {
            // The session works; only its survival across a restart is at risk. Subscribing
            // stores it again, and refuses the subscription if that fails too.
            tracing::error!(client_id = %request.client_id, "failed to store the session: {e}");
        }
        let _ = request.reply.send(Ok(ConnectOutcome {
            session: id,
            session_present,
            receipts,
        }));
        self.pump(id);
    }

    fn subscribe(
        &mut self,
        id: u64,
        filters: Vec<(String, SubscriptionOptions)>,
    ) -> Vec<Result<QoS, SubscribeRefusal>> {
        // A retained publish acknowledged before this SUBSCRIBE must be seen by it: take in
        // every record that is already durable (its PUBACK may have gone out) first.
        self.read_durable_records();
        let Some(session) = self.sessions.get_mut(&id) else {
            // The session ended (taken over with a clean start) while this request waited.
            return vec![Err(SubscribeRefusal::Unavailable); filters.len()];
        };
        let mut outcomes = Vec::with_capacity(filters.len());
        let mut retained_for = Vec::new();
        for (filter, options) in filters {
            let full = session.subscriptions.len() >= SUBSCRIPTIONS_PER_SESSION_MAX
                && !session.subscriptions.contains_key(&filter);
            if full {
                outcomes.push(Err(SubscribeRefusal::QuotaExceeded));
                continue;
            }
            self.subscriptions.subscribe(id, &filter, options);
            let is_new = session
                .subscriptions
                .insert(filter.clone(), options)
                .is_none();
            let send_retained = match options.retain_handling {
                RetainHandling::AtSubscribe => true,
                RetainHandling::AtNewSubscribe => is_new,
                RetainHandling::Never => false,
            };
            if send_retained {
                retained_for.push((filter, options));
            }
            outcomes.push(Ok(options.qos));
        }
        // Publishers see the new subscriptions only after the retained copies are queued in
        // the log, so a publish routed to them cannot overtake the copies.
        self.queue_retained(id, &retained_for);
        self.router.install(self.subscriptions.clone());
        self.pump(id);
        // A persistent session's subscriptions are durable before the SUBACK says granted.
        if let Err(e) = self.store_session(id) {
            tracing::error!(session = id, "failed to store subscriptions: {e}");
            return vec![Err(SubscribeRefusal::Unavailable); outcomes.len()];
        }
        outcomes
    }

    /// Queues the retained messages matching new subscriptions (the caller pumps); they go out
    /// after the SUBACK (the connection sends it before it takes more from its channel), with
    /// RETAIN set. A persistent session gets them at QoS 1 and 2 as logged copies (see
    /// `log_retained_copy`).
    fn queue_retained(&mut self, id: u64, subscriptions: &[(String, SubscriptionOptions)]) {
        let now = now_ms();
        let position = self.tail.next_seq() - 1;
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let persistent = session.is_persistent();
        for (filter, options) in subscriptions {
            for message in self.retained.matching(filter, now) {
                // MQTT requires the lower of the two QoS even here.
                let qos = message.qos.min(options.qos);
                let ids: Vec<u32> = options.subscription_id.into_iter().collect();
                if persistent
                    && qos != QoS::AtMostOnce
                    && log_retained_copy(&self.wal, id, &message, qos, ids.clone())
                {
                    continue;
                }
                let entry = QueueEntry {
                    retained: Some(message),
                    ..QueueEntry::new(position, qos, true, ids)
                };
                session.enqueue(entry);
            }
        }
    }

    fn unsubscribe(&mut self, id: u64, filters: &[String]) -> Vec<bool> {
        if !self.sessions.contains_key(&id) {
            return vec![false; filters.len()];
        }
        let existed = filters
            .iter()
            .map(|filter| {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.subscriptions.remove(filter);
                }
                self.subscriptions.unsubscribe(id, filter)
            })
            .collect();
        self.router.install(self.subscriptions.clone());
        if let Err(e) = self.store_session(id) {
            tracing::error!(session = id, "failed to store subscriptions: {e}");
        }
        existed
    }

    fn acknowledge(&mut self, id: u64, packet_id: u16) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if !session.queue.acknowledge(packet_id) {
            tracing::debug!(client_id = %session.client_id, packet_id, "acknowledgement for no message in flight");
        }
        self.pump(id);
    }

    /// PUBREC: the client has the QoS 2 message; its PUBREL is due. A persistent session logs
    /// the PUBREC first and sends the PUBREL once that record is durable (`on_received`): after
    /// a crash it then resends the PUBREL, never the message the client may already have
    /// passed on. (A retained copy sent from memory, when the log could not take it, has no
    /// record to point at.)
    fn received(&mut self, id: u64, packet_id: u16) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let entry = session
            .queue
            .in_flight(packet_id)
            .filter(|e| e.qos == QoS::ExactlyOnce);
        match entry {
            None => {
                tracing::debug!(client_id = %session.client_id, packet_id, "PUBREC for no QoS 2 message in flight");
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
                session.queue.received(packet_id);
                self.pump(id);
            }
        }
    }

    /// Logs a subscriber's PUBREC without making the hub wait: the hub's tail sees the record
    /// once it is durable. It may go past the log's quota, as it lets a message complete and
    /// its space be freed; the in-flight window bounds how many there are.
    fn log_received(&self, record: ReceivedRecord) {
        let wal = self.wal.clone();
        tokio::spawn(async move {
            let logged = match wal.reserve(KIND_QOS2_RECEIVED, record.encode()).await {
                Ok(reservation) => reservation.submit_beyond_quota().map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = logged {
                // The PUBREL never goes out; the message is resent after a reconnect.
                tracing::error!("failed to log a subscriber's PUBREC: {e}");
            }
        });
    }

    /// Whether session `id` is attached to `connection` (and not to one that took it over).
    fn is_attached(&self, id: u64, connection: u64) -> bool {
        self.sessions
            .get(&id)
            .and_then(|s| s.attachment.as_ref())
            .is_some_and(|a| a.connection == connection)
    }

    fn disconnected(
        &mut self,
        id: u64,
        connection: u64,
        will: Option<Box<Will>>,
        session_expiry_secs: Option<u32>,
    ) {
        let attached = self.is_attached(id, connection);
        if let Some(will) = will {
            self.will_due(id, attached, will);
        }
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if !attached {
            return; // a connection that was already taken over
        }
        session.attachment = None;
        session.queue.requeue_in_flight();
        if let Some(secs) = session_expiry_secs {
            session.expiry = Duration::from_secs(u64::from(secs));
        }
        if session.expiry.is_zero() {
            self.remove_session(id);
            return;
        }
        session.detached_at = Some(Instant::now());
        if session_expiry_secs.is_some()
            && let Err(e) = self.store_session(id)
        {
            tracing::error!(
                session = id,
                "failed to store the session's new expiry: {e}"
            );
        }
    }

    /// A connection ended without a normal DISCONNECT: its will is published at once, or after
    /// its delay (capped by the session's expiry) if the session stays detached that long, or
    /// never if the session was already resumed by a newer connection (MQTT 5 §3.1.2.5).
    fn will_due(&mut self, id: u64, attached: bool, will: Box<Will>) {
        let delay = Duration::from_secs(u64::from(will.delay_secs));
        match self.sessions.get_mut(&id) {
            Some(session) if !delay.is_zero() && attached && !session.expiry.is_zero() => {
                session.pending_will = Some((will, Instant::now() + delay.min(session.expiry)));
            }
            Some(_) if !delay.is_zero() && !attached => {}
            Some(_) | None => self.publish_will(id, *will),
        }
    }

    fn publish_due_wills(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.pending_will.as_ref().is_some_and(|(_, at)| *at <= now))
            .map(|s| s.id)
            .collect();
        for id in due {
            let will = self
                .sessions
                .get_mut(&id)
                .and_then(|s| s.pending_will.take());
            if let Some((will, _)) = will {
                self.publish_will(id, *will);
            }
        }
    }

    /// Routes and logs a will like any publish from its session. The hub does not wait for
    /// the log: a task does, and a will that cannot be logged (quota) is lost with a log line,
    /// as there is no client left to hold back.
    fn publish_will(&mut self, publisher: u64, will: Will) {
        let mut message = will.message;
        message.properties.expires_at_ms = expires_at_ms(will.expiry_interval_secs);
        tracing::info!(topic = %message.topic, "publishing a will");
        let record = self.subscriptions.record(message, publisher).encode();
        let wal = self.wal.clone();
        tokio::spawn(async move {
            let logged = match wal.submit(KIND_PUBLISH, record).await {
                Ok(append) => append.await,
                Err(e) => Err(e),
            };
            if let Err(e) = logged {
                tracing::warn!("failed to log a will: {e}");
            }
        });
    }

    fn remove_session(&mut self, id: u64) {
        let Some(mut session) = self.sessions.remove(&id) else {
            return;
        };
        self.session_by_client.remove(&session.client_id);
        for filter in session.subscriptions.keys() {
            self.subscriptions.unsubscribe(id, filter);
        }
        self.router.install(self.subscriptions.clone());
        if let Some((will, _)) = session.pending_will.take() {
            self.publish_will(id, *will);
        }
        if session.stored {
            forget_stored(&self.meta, &mut session);
        }
    }

    /// Stores a persistent session (durably). A session that stopped being persistent (an
    /// MQTT 5 client reconnecting with expiry 0) loses its stored copy: after a crash it must
    /// not come back, and neither must QoS 2 receipts no longer kept up to date.
    fn store_session(&mut self, id: u64) -> spool_storage::Result<()> {
        match self.sessions.get_mut(&id) {
            Some(session) if session.is_persistent() => {
                let stored = session.to_persisted().encode();
                self.meta.put_session(&session.client_id, Some(&stored))?;
                session.stored = true;
                Ok(())
            }
            Some(session) if session.stored => {
                forget_stored(&self.meta, session);
                Ok(())
            }
            Some(_) | None => Ok(()),
        }
    }

    /// Commits every persistent session's progress durably, with the retained messages and
    /// QoS 2 receipts. A checkpoint is the sequence before the first message still needed (or
    /// everything the hub has read, for an empty queue), so it never moves back.
    fn commit_checkpoints(&mut self) {
        let read_through = self.tail.next_seq() - 1;
        let mut updates = Vec::new();
        for session in self.sessions.values().filter(|s| s.is_persistent()) {
            let checkpoint = session
                .queue
                .first_needed()
                .map_or(read_through, |first| first.saturating_sub(1));
            if checkpoint > session.checkpoint {
                updates.push((session.checkpoint_key(), checkpoint, session.id));
            }
        }
        if read_through > self.retained.checkpoint() || self.retained.has_uncommitted() {
            // Replaying after a restart, `read_through` may still be below the checkpoint.
            let checkpoint = read_through.max(self.retained.checkpoint());
            updates.push((RETAINED_CHECKPOINT.to_string(), checkpoint, 0));
        }
        // Receipts are complete through any durable record (see `session::receipts`).
        let receipts_through = self.wal.durable_seq().max(self.receipts_checkpoint);
        if receipts_through > self.receipts_checkpoint {
            updates.push((RECEIPTS_CHECKPOINT.to_string(), receipts_through, 0));
        }
        if !updates.is_empty() && self.commit_progress(&updates, read_through, receipts_through) {
            for (_, checkpoint, id) in updates {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.checkpoint = checkpoint;
                }
            }
        }
    }

    /// Lets the log free what no one needs any more (see `Wal::reclaim`): every record from
    /// the first one a replay after a restart reads whole (retained messages, QoS 2 receipts)
    /// or that the hub has not read yet, and below that, only what the queues still hold. A
    /// record no queue holds was acknowledged, expired or dropped by a counted rule; after a
    /// crash a queue may find older records again (at least once), never lose one it held.
    fn reclaim_log_space(&mut self) {
        // Only sealed segments are reclaimed; and one reclaim at a time, on a slow disk.
        if self.wal.segment_count() < 2 || self.retention_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = ReclaimRunning(Arc::clone(&self.retention_running));
        let needed_from = self
            .tail
            .next_seq()
            .min(self.retained.replay_from())
            .min(self.receipts_checkpoint + 1);
        let liveness = self.liveness(needed_from);
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || {
            let _running = running;
            match wal.reclaim(&liveness) {
                Ok(report) if report.records_moved > 0 => tracing::debug!(
                    records_moved = report.records_moved,
                    segments_removed = report.segments_removed,
                    bytes_freed = report.bytes_freed,
                    "moved the few live records out of old log segments"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!("failed to free log space: {e}"),
            }
        });
    }

    /// What the queues still need of the log below `needed_from`, gathered only as far as
    /// that stays cheap on the hub task: over the oldest `RECLAIM_SEGMENTS_PER_RUN` segments,
    /// or fewer, down to the first, while the queues hold more than `RECLAIM_LIVE_ENTRIES_MAX`
    /// entries there (counted in O(log n) a queue). When even the first holds more, nothing is
    /// moved: only what lies below every queue's first entry can go.
    fn liveness(&self, needed_from: u64) -> Liveness {
        let mut segments = RECLAIM_SEGMENTS_PER_RUN;
        while segments > 0 {
            let horizon = self.wal.reclaim_horizon(segments).min(needed_from);
            let entries: usize = self
                .sessions
                .values()
                .map(|s| s.queue.count_below(horizon))
                .sum();
            if entries <= RECLAIM_LIVE_ENTRIES_MAX {
                let mut live = Vec::with_capacity(entries);
                for session in self.sessions.values() {
                    session.queue.records_needed_below(horizon, &mut live);
                }
                live.sort_unstable();
                live.dedup();
                return Liveness {
                    needed_from: horizon,
                    live,
                };
            }
            segments /= 2;
        }
        let first_needed = self
            .sessions
            .values()
            .filter_map(|s| s.queue.first_needed());
        Liveness {
            needed_from: first_needed.fold(needed_from, u64::min),
            live: Vec::new(),
        }
    }

    /// Commits checkpoints with the retained changes read through `read_through` and the
    /// receipts complete through `receipts_through`, in one durable transaction.
    fn commit_progress(
        &mut self,
        updates: &[(String, u64, u64)],
        read_through: u64,
        receipts_through: u64,
    ) -> bool {
        let receipts: Vec<(u64, String, Vec<u8>)> = self
            .sessions
            .values()
            .filter(|s| s.is_persistent())
            .filter_map(|s| {
                let current = receipts::lock(&s.receipts).through(receipts_through);
                let encoded = current.encode();
                let unchanged = match &s.receipts_stored {
                    Some(before) => *before == encoded,
                    None => current.is_empty(),
                };
                (!unchanged).then(|| (s.id, s.id.to_string(), encoded))
            })
            .collect();
        let retained = self.retained.changes();
        let changes: Vec<(StateTable, &str, Option<&[u8]>)> = retained
            .iter()
            .map(|(topic, message)| (StateTable::Retained, topic.as_str(), message.as_deref()))
            .chain(receipts.iter().map(|(_, key, stored)| {
                (StateTable::Qos2Receipts, key.as_str(), Some(&stored[..]))
            }))
            .collect();
        let pairs: Vec<(&str, u64)> = updates.iter().map(|(k, c, _)| (k.as_str(), *c)).collect();
        let committed = self
            .meta
            .set_checkpoints_and_state(&pairs, &changes, Commit::Durable);
        if let Err(e) = committed {
            tracing::error!("failed to commit checkpoints: {e}");
            return false;
        }
        self.retained.committed(read_through);
        self.receipts_checkpoint = receipts_through;
        for (id, _, stored) in receipts {
            if let Some(session) = self.sessions.get_mut(&id) {
                session.receipts_stored = Some(stored);
            }
        }
        true
    }

    fn expire_sessions(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.attachment.is_none() && s.is_expired(now))
            .map(|s| s.id)
            .collect();
        for id in expired {
            tracing::info!(session = id, "session expired");
            self.remove_session(id);
        }
    }

    /// Processes the durable records the tail has not delivered yet, without waiting.
    fn read_durable_records(&mut self) {
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
    fn on_record(&mut self, record: &Record) {
        match record.kind {
            KIND_PUBLISH => self.on_publish(record),
            KIND_QOS2_RECEIVED => self.on_received(record),
            _ => {}
        }
    }

    fn on_received(&mut self, record: &Record) {
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
        let Some(session) = self.sessions.get_mut(&received.session) else {
            return;
        };
        // Not found: the message was completed (PUBCOMP) before the last checkpoint.
        if session.queue.received_logged(received.seq, record.seq) {
            self.pump(received.session);
        }
    }

    fn on_publish(&mut self, record: &Record) {
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
            let Some(session) = self.sessions.get_mut(&target.session) else {
                continue;
            };
            if record.seq <= session.replay_floor {
                continue; // acknowledged before the last restart
            }
            let entry = QueueEntry::new(
                record.seq,
                target.qos,
                target.retain_as_published,
                target.subscription_ids,
            );
            session.enqueue(entry);
            self.pump(target.session);
        }
    }

    /// Sends the PUBRELs due, then what the session's window allows. The connection's channel
    /// always keeps a slot per in-flight message, so a PUBREL never waits behind QoS 0
    /// messages for an acknowledgement that cannot come before it.
    fn pump(&mut self, id: u64) {
        loop {
            let Some(session) = self.sessions.get_mut(&id) else {
                return;
            };
            let Some(attachment) = session.attachment.as_ref() else {
                return;
            };
            let window = attachment.window;
            if let Some(packet_id) = session.queue.take_release() {
                match attachment.outbound.try_send(Outbound::Release(packet_id)) {
                    Ok(()) => continue,
                    Err(TrySendError::Full(_)) if attachment.outbound.ask_for_room(1) => {
                        session.queue.release_unsent(packet_id);
                        continue;
                    }
                    Err(_) => {
                        session.queue.release_unsent(packet_id);
                        return; // sent when the connection makes room (Event::Drained)
                    }
                }
            }
            let reserved = session.queue.in_flight_len();
            if attachment.outbound.capacity() <= reserved {
                if attachment.outbound.ask_for_room(reserved + 1) {
                    continue;
                }
                return;
            }
            let Some(mut entry) = session.queue.next_to_send(window) else {
                return;
            };
            if entry.qos != QoS::AtMostOnce && entry.packet_id.is_none() {
                let Some(packet_id) = session.packet_id_for(&entry) else {
                    session.queue.unsend(entry); // its id is in flight: wait for that ack
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
            let session = self.sessions.get_mut(&id).expect("looked up above");
            let channel = &session.attachment.as_ref().expect("attached").outbound;
            match channel.try_send(outbound) {
                Ok(()) if entry.qos != QoS::AtMostOnce => session.queue.sent(entry),
                Ok(()) => {}
                // Not full: the hub is the only sender and saw room above. Closed, then.
                Err(_) => {
                    session.queue.unsend(entry);
                    return;
                }
            }
        }
    }

    /// The PUBLISH for a queue entry, or `None` if its message expired or cannot be read.
    fn delivery(&mut self, id: u64, entry: &QueueEntry) -> Option<Delivery> {
        let message = match &entry.retained {
            Some(message) => Arc::clone(message),
            None => self.message(entry.seq)?,
        };
        let session = self.sessions.get_mut(&id)?;
        // Once sent, a message is delivered to the end (the client may hold its packet id).
        if !entry.redelivery && message.is_expired(now_ms()) {
            session.queue.dropped_expired += 1;
            if crate::delivery::drop_worth_logging(session.queue.dropped_expired) {
                tracing::info!(
                    client_id = %session.client_id,
                    seq = entry.seq,
                    dropped = session.queue.dropped_expired,
                    "message expired before delivery (ttl_expiry; `dropped` counts this session's since start)"
                );
            }
            return None;
        }
        Some(Delivery {
            packet_id: entry.packet_id,
            qos: entry.qos,
            dup: entry.redelivery,
            retain: entry.retained.is_some() || (entry.retain_as_published && message.retain),
            subscription_ids: entry.subscription_ids.clone(),
            message,
        })
    }

    /// A logged message, from the cache or read back from the log.
    fn message(&mut self, seq: u64) -> Option<Arc<Message>> {
        if let Some(message) = self.cache.get(seq) {
            return Some(message);
        }
        match self.wal.read(seq) {
            Ok(Some(record)) => match PublishRecord::decode(record.payload) {
                Ok(publish) => Some(Arc::new(publish.message)),
                Err(e) => {
                    tracing::error!(seq, "undecodable publish record: {e}");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::error!(seq, "failed to read a queued message: {e}");
                None
            }
        }
    }
}

/// Held by a reclaim under way; lets the next one start when dropped, even by a panic.
struct ReclaimRunning(Arc<AtomicBool>);

impl Drop for ReclaimRunning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Logs a retained message for a new subscription of a persistent session: its own record may
/// be long gone from the log, and without one a crash would lose the delivery (and, at QoS 2,
/// the client's packet id state). The hub's tail queues it once durable. False when the log
/// cannot take it at once (its queue or quota is full): the copy then waits in memory only.
fn log_retained_copy(
    wal: &Wal,
    session: u64,
    message: &Message,
    qos: QoS,
    subscription_ids: Vec<u32>,
) -> bool {
    let record = PublishRecord {
        message: message.clone(),
        publisher: 0,
        qos2_packet_id: None,
        retained_copy: true,
        targets: vec![Target {
            session,
            qos,
            retain_as_published: true,
            subscription_ids,
        }],
    };
    match wal.try_submit(KIND_PUBLISH, record.encode()) {
        Ok(_durable) => true,
        Err(e) => {
            tracing::warn!(topic = %message.topic, "retained message queued without a log record: {e}");
            false
        }
    }
}

/// Removes what the metadata store holds of a session: the session, its checkpoint and its
/// QoS 2 receipts.
fn forget_stored(meta: &Meta, session: &mut Session) {
    let receipts_key = session.id.to_string();
    let forget = meta
        .put_session(&session.client_id, None)
        .and_then(|()| meta.remove_checkpoint(&session.checkpoint_key(), Commit::Durable))
        .and_then(|()| match session.receipts_stored {
            // A leftover is harmless: it is removed at the next start.
            Some(_) => meta.set_checkpoints_and_state(
                &[],
                &[(StateTable::Qos2Receipts, &receipts_key, None)],
                Commit::Deferred,
            ),
            None => Ok(()),
        });
    if let Err(e) = forget {
        tracing::error!(client_id = %session.client_id, "failed to remove a stored session: {e}");
    }
    session.stored = false;
    session.receipts_stored = None;
}
