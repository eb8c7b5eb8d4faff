//! The hub: the single owner of sessions, subscriptions and delivery queues.
//!
//! It processes connection events with synchronous handlers (no `.await` inside a handler) and
//! follows the write-ahead log with a reader that sees only durable records: each publish record
//! names the sessions it goes to, so the hub appends its sequence number to their queues and
//! sends what their windows allow. It never blocks on a connection: packets go out with a bounded
//! `try_send`, and what does not fit stays in the queue until the next acknowledgement.

pub mod events;

use crate::delivery::cache::MessageCache;
use crate::delivery::queue::{Pushed, QueueEntry};
use crate::delivery::record::{KIND_PUBLISH, PublishRecord};
use crate::hub::events::{ConnectOutcome, ConnectRequest, Delivery, Event, Outbound};
use crate::limits::MESSAGE_CACHE_BYTES_MAX;
use crate::message::{Message, QoS, now_ms};
use crate::routing::{SubscriptionOptions, SubscriptionTable};
use crate::session::{Attachment, Session};
use spool_storage::{Record, Wal, WalReader};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

/// The limits the hub enforces on sessions.
#[derive(Debug, Clone)]
pub struct HubLimits {
    /// The most messages in flight towards one client.
    pub in_flight_max: u16,
    /// The most messages one session's queue keeps.
    pub session_queue_max: usize,
    /// How long a persistent MQTT 3.1.1 session outlives its connection.
    pub session_expiry_v311: Duration,
}

/// The hub's state; see the module documentation.
pub struct Hub {
    wal: Wal,
    tail: WalReader,
    router: Arc<RwLock<SubscriptionTable>>,
    sessions: HashMap<u64, Session>,
    session_by_client: HashMap<String, u64>,
    next_session_id: u64,
    cache: MessageCache,
    limits: HubLimits,
}

impl Hub {
    /// A hub that delivers every record logged from now on.
    ///
    /// # Errors
    /// If the log cannot be read.
    pub fn new(
        wal: Wal,
        router: Arc<RwLock<SubscriptionTable>>,
        limits: HubLimits,
    ) -> spool_storage::Result<Hub> {
        let tail = wal.reader(wal.durable_seq() + 1)?;
        Ok(Hub {
            wal,
            tail,
            router,
            sessions: HashMap::new(),
            session_by_client: HashMap::new(),
            next_session_id: 1,
            cache: MessageCache::new(MESSAGE_CACHE_BYTES_MAX),
            limits,
        })
    }

    /// Runs until `shutdown` is cancelled or the log stops.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut expiry = tokio::time::interval(Duration::from_secs(1));
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
                _ = expiry.tick() => self.expire_sessions(Instant::now()),
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
            Event::Acknowledge { session, packet_id } => self.acknowledge(session, packet_id),
            Event::Disconnected {
                session,
                connection,
            } => self.disconnected(session, connection),
        }
    }

    fn router(&self) -> std::sync::RwLockWriteGuard<'_, SubscriptionTable> {
        self.router.write().unwrap_or_else(PoisonError::into_inner)
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
            }
        }
        let session_present = existing.is_some() && !request.clean_start;
        let id = match self.session_by_client.get(&request.client_id) {
            Some(&id) => id,
            None => {
                let id = self.next_session_id;
                self.next_session_id += 1;
                let session = Session::new(
                    id,
                    request.client_id.clone(),
                    expiry,
                    self.limits.session_queue_max,
                );
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
        });
        let _ = request.reply.send(ConnectOutcome {
            session: id,
            session_present,
        });
        self.pump(id);
    }

    fn subscribe(&mut self, id: u64, filters: Vec<(String, SubscriptionOptions)>) -> Vec<QoS> {
        let mut outcomes = Vec::with_capacity(filters.len());
        for (filter, mut options) in filters {
            // QoS 2 towards subscribers comes with durable exactly-once state; until then the
            // broker grants at most QoS 1, which MQTT allows (the SUBACK says so).
            options.qos = options.qos.min(QoS::AtLeastOnce);
            self.router().subscribe(id, &filter, options);
            if let Some(session) = self.sessions.get_mut(&id) {
                session.subscriptions.insert(filter, options);
            }
            outcomes.push(options.qos);
        }
        outcomes
    }

    fn unsubscribe(&mut self, id: u64, filters: &[String]) -> Vec<bool> {
        filters
            .iter()
            .map(|filter| {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.subscriptions.remove(filter);
                }
                self.router().unsubscribe(id, filter)
            })
            .collect()
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

    fn disconnected(&mut self, id: u64, connection: u64) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if session.attachment.as_ref().map(|a| a.connection) != Some(connection) {
            return; // a connection that was already taken over
        }
        session.attachment = None;
        session.queue.requeue_in_flight();
        if session.expiry.is_zero() {
            self.remove_session(id);
        } else {
            session.detached_at = Some(Instant::now());
        }
    }

    fn remove_session(&mut self, id: u64) {
        if let Some(session) = self.sessions.remove(&id) {
            self.session_by_client.remove(&session.client_id);
            self.router().remove_session(id);
        }
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

    /// A record became durable: queue it for every target session that still exists.
    fn on_record(&mut self, record: &Record) {
        if record.kind != KIND_PUBLISH {
            return;
        }
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
        self.cache.insert(record.seq, Arc::clone(&message));
        for target in publish.targets {
            let Some(session) = self.sessions.get_mut(&target.session) else {
                continue;
            };
            let entry = QueueEntry {
                seq: record.seq,
                qos: target.qos,
                retain_as_published: target.retain_as_published,
                subscription_ids: target.subscription_ids,
                redelivery: false,
            };
            if session.queue.push(entry) == Pushed::DroppedOldest {
                tracing::warn!(client_id = %session.client_id, "queue full: dropped its oldest message (queue_full)");
            }
            self.pump(target.session);
        }
    }

    /// Sends what the session's window allows.
    fn pump(&mut self, id: u64) {
        loop {
            let Some(session) = self.sessions.get_mut(&id) else {
                return;
            };
            let Some(window) = session.attachment.as_ref().map(|a| a.window) else {
                return;
            };
            let Some(entry) = session.queue.next_to_send(window) else {
                return;
            };
            let Some(message) = self.message(entry.seq) else {
                continue; // unreadable: logged by `message`, and skipped
            };
            let session = self.sessions.get_mut(&id).expect("looked up above");
            if message.is_expired(now_ms()) {
                session.queue.dropped_expired += 1;
                continue;
            }
            let packet_id = (entry.qos != QoS::AtMostOnce).then(|| session.allocate_packet_id());
            let delivery = Delivery {
                packet_id,
                qos: entry.qos,
                dup: entry.redelivery,
                retain: entry.retain_as_published && message.retain,
                subscription_ids: entry.subscription_ids.clone(),
                message,
            };
            let outbound = &session.attachment.as_ref().expect("attached").outbound;
            match outbound.try_send(Outbound::Publish(delivery)) {
                Ok(()) => {
                    if let Some(packet_id) = packet_id {
                        session.queue.sent(packet_id, entry);
                    }
                }
                Err(TrySendError::Full(_) | TrySendError::Closed(_)) => {
                    session.queue.unsend(entry);
                    return;
                }
            }
        }
    }

    /// A logged message, from the cache or read back from the log.
    fn message(&mut self, seq: u64) -> Option<Arc<Message>> {
        if let Some(message) = self.cache.get(seq) {
            return Some(message);
        }
        let read = self
            .wal
            .reader(seq)
            .and_then(|mut reader| reader.try_next());
        match read {
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
