//! The protocol-neutral publish path: a publisher and a message go in; out comes a refusal
//! with its reason, or the routing decision logged in the write-ahead log with a [`Durable`]
//! to wait on before acknowledging (law 1). MQTT connections call it today; HTTP, AMQP and
//! WebSocket will call the same path, so what happens to a message before its acknowledgement
//! (routing by the current snapshot, the log's quota and free space, QoS 2 receipts) is
//! written once. It knows no packets: each protocol turns its outcome into its own answer.
//!
//! A QoS 2 publish is logged once per packet id until the publisher releases it: its record
//! names the packet id, and a release record frees it (see `session::receipts`), so neither a
//! resend nor a restart can log it twice.

use crate::auth::identity::IdentityId;
use crate::auth::policy::{Client, Policy};
use crate::clock::Clock;
use crate::delivery::drop_worth_logging;
use crate::delivery::record::{
    KIND_PUBLISH, KIND_QOS2_RELEASE, PublishRecord, ReleaseRecord, Target,
};
use crate::iothub::message::IotMessage;
use crate::iothub::property_bag::Properties;
use crate::iothub::{self, PublishRefusal};
use crate::message::{Message, QoS};
use crate::routing::Router;
use crate::session::receipts::{self, SharedReceipts};
use crate::twin::{CHANGE_NOTIFICATION_PROPERTIES, ReportedPatch};
use bytes::Bytes;
use spool_storage::{PendingAppend, Reservation, Wal};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// What the routes made of an identity's telemetry.
struct RoutedTelemetry {
    targets: Vec<Target>,
    /// Its route source, when no route took it.
    source: Option<String>,
}

/// The publish path, shared by every connection.
#[derive(Debug)]
pub struct Ingest {
    wal: Wal,
    router: Arc<Router>,
    shutdown: CancellationToken,
    /// The hub's clock: message expiry is stamped and read on it.
    clock: Arc<dyn Clock>,
    /// Telemetry that no route and no subscription took (`no_route`), since start.
    no_route: AtomicU64,
}

/// Who publishes, as the publish path needs to know them.
#[derive(Debug, Clone, Copy)]
pub struct Publisher<'a> {
    /// Its client id, and the IoT Hub identity it proved, if any: an identity's telemetry goes
    /// where the deployment's routes say, stamped with it as the sender.
    pub client: Client<'a>,
    /// The deployment's authorization policy, as the connection last saw it.
    pub policy: &'a Policy,
    /// The publishing session: records name it, and routing honours its no-local
    /// subscriptions.
    pub session: u64,
    /// The connection it publishes through; only the one its session is attached to may
    /// change its QoS 2 receipts.
    pub connection: u64,
    /// The session's unreleased QoS 2 packet ids.
    pub receipts: &'a SharedReceipts,
    /// Cancelled when the hub let go of the connection (another took its session over): one
    /// waiting for room in the log stops waiting.
    pub released: &'a CancellationToken,
    /// What to do when the log has no room (quota or disk).
    pub when_full: WhenFull,
}

/// What a publisher gets when the log has no room for its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// A refusal at once: the protocol can tell it to come back later (MQTT 5: quota
    /// exceeded) and nothing was accepted.
    Refuse,
    /// A wait until room is freed: the protocol has no way to say "later" (MQTT 3.1.1), so the
    /// acknowledgement is withheld (and the connection stops reading: back-pressure).
    Wait,
}

/// What became of a publish.
#[derive(Debug)]
pub enum Ingested {
    /// In the log: acknowledge once `Durable` resolves.
    Logged(Durable),
    /// Not logged, the log having no room, and the publisher can be told (`WhenFull::Refuse`).
    Refused,
    /// Not logged: a QoS 0 message when the log has no room, which promises nothing.
    Dropped,
    /// Not logged: IoT Hub's rules refuse it (`iothub::check_publish`).
    Forbidden(PublishRefusal),
}

/// Why a publish could not go through; the connection ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// Another connection took the session over while this one was publishing.
    #[error("session taken over")]
    TakenOver,
    #[error("server shutting down")]
    ShuttingDown,
    /// Larger than a log record may be (the packet limit keeps messages below it).
    #[error("message of {size} bytes above {max}")]
    TooLarge { size: u64, max: u64 },
    /// The write-ahead log failed (logged where it happened).
    #[error("the write-ahead log failed")]
    LogFailed,
}

/// The record an acknowledgement waits for.
#[derive(Debug)]
pub enum Durable {
    /// Appended for this acknowledgement.
    Append(PendingAppend),
    /// Logged before at this sequence number (a resent QoS 2 publish), or for 0 nothing to
    /// wait for (a refusal, which still goes out in order behind earlier acknowledgements).
    Through(u64),
}

/// What a log error means for the publisher, logged where it is not the publisher's doing.
fn failure(error: &spool_storage::Error) -> IngestError {
    match *error {
        spool_storage::Error::RecordTooLarge { size, max } => IngestError::TooLarge { size, max },
        _ => {
            tracing::error!("failed to log a publish: {error}");
            IngestError::LogFailed
        }
    }
}

/// Why a record was not queued.
enum Submit {
    Log(spool_storage::Error),
    /// The session was taken over by a newer connection.
    TakenOver,
}

impl From<spool_storage::Error> for Submit {
    fn from(error: spool_storage::Error) -> Submit {
        Submit::Log(error)
    }
}

impl Ingest {
    #[must_use]
    pub fn new(
        wal: Wal,
        router: Arc<Router>,
        shutdown: CancellationToken,
        clock: Arc<dyn Clock>,
    ) -> Ingest {
        Ingest {
            wal,
            router,
            shutdown,
            clock,
            no_route: AtomicU64::new(0),
        }
    }

    /// The wall-clock time in milliseconds on the hub's clock, which message expiry counts
    /// from: a protocol stamps a message's expiry interval with it, and tells the time left
    /// from it when it delivers.
    #[must_use]
    pub fn now_ms(&self) -> u64 {
        self.clock.unix_ms()
    }

    /// The hub's clock itself, for what reads the time beside the publish path.
    #[must_use]
    pub fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    /// Checks a message against IoT Hub's rules, routes it by the current routing snapshot (an
    /// identity's telemetry by the deployment's routes too) and logs it with its routing
    /// decision.
    /// A QoS 2 message whose packet id the publisher still holds is a resend: it is not logged
    /// again, and its acknowledgement waits for the first record.
    ///
    /// # Errors
    /// See [`IngestError`].
    pub async fn publish(
        &self,
        publisher: &Publisher<'_>,
        message: Message,
        packet_id: u16,
    ) -> Result<Ingested, IngestError> {
        let body_bytes = message.payload.len();
        let checked = iothub::check_publish(
            &publisher.client,
            &message.topic,
            body_bytes,
            publisher.policy,
        );
        let telemetry = match checked {
            Ok(telemetry) => telemetry,
            Err(refusal) => return Ok(Ingested::Forbidden(refusal)),
        };
        let qos = message.qos;
        // The bag borrows the topic: routes are evaluated before the message moves on.
        let routed = match (publisher.client.identity, &telemetry) {
            (Some(identity), Some(properties)) => {
                Some(self.route_telemetry(identity, properties, &message.payload))
            }
            _ => None,
        };
        let mut record = self.router.snapshot().record(message, publisher.session);
        if let (Some(identity), Some(routed)) = (publisher.client.identity, routed) {
            // An identity's client id is its id (CONNECT checks it): no formatting per message.
            debug_assert_eq!(publisher.client.client_id, identity.to_string());
            record.message.properties.sender = Some(publisher.client.client_id.to_owned());
            record.targets.extend(routed.targets);
            if record.targets.is_empty() {
                self.count_unrouted(identity, routed.source);
            }
        }
        if qos == QoS::ExactlyOnce {
            record.qos2_packet_id = Some(packet_id);
        }
        self.append(publisher, KIND_PUBLISH, record.encode(), qos, packet_id)
            .await
    }

    /// Where the deployment's routes send an identity's telemetry (module inputs, `$upstream`),
    /// each with its route's time to live from now; and its route source if no route takes it
    /// (for `count_unrouted`).
    fn route_telemetry(
        &self,
        identity: &IdentityId,
        properties: &Properties<'_>,
        body: &[u8],
    ) -> RoutedTelemetry {
        let routed = IotMessage::new(identity, properties, body);
        let targets = self.router.routes().targets(&routed, self.now_ms());
        let source = targets.is_empty().then(|| routed.source());
        RoutedTelemetry { targets, source }
    }

    /// Telemetry that no route and no subscription takes is dropped and counted (`no_route`),
    /// and still acknowledged, as edgeHub does.
    fn count_unrouted(&self, identity: &IdentityId, source: Option<String>) {
        let dropped = self.no_route.fetch_add(1, Ordering::Relaxed) + 1;
        if drop_worth_logging(dropped) {
            let source = source.unwrap_or_default();
            tracing::info!(
                %identity,
                source,
                dropped,
                "telemetry no route or subscription takes: dropped (no_route; `dropped` counts every such message since start)"
            );
        }
    }

    /// A module's reported properties changed (stored already): the twin change notification
    /// goes where the deployment's routes send `/twinChangeNotifications`, logged like
    /// telemetry from that module. Not waited for: the change itself is durable, and a log
    /// that cannot take the notification at once drops it with a log line.
    pub fn twin_changed(&self, identity: &IdentityId, change: &ReportedPatch) {
        let (topic, body) = change.change_notification(identity);
        let properties: Properties<'_> = CHANGE_NOTIFICATION_PROPERTIES
            .iter()
            .map(|&(key, value)| (key.into(), Some(value.into())))
            .collect();
        let routed = IotMessage::twin_change(identity, &properties, &body);
        let targets = self.router.routes().targets(&routed, self.now_ms());
        if targets.is_empty() {
            return;
        }
        let message = Message {
            topic,
            payload: body.into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: crate::message::MessageProperties {
                sender: Some(identity.to_string()),
                ..Default::default()
            },
        };
        let record = PublishRecord::of_spool(message, targets);
        if let Err(e) = self.wal.try_submit(KIND_PUBLISH, record.encode()) {
            tracing::warn!(%identity, "dropped a twin change notification: {e}");
        }
    }

    /// Logs the release (PUBREL) of a QoS 2 packet id; the completion (PUBCOMP) goes out once
    /// the returned record is durable. Returns whether the id was held: a release of one not
    /// held is not logged, and its completion waits for every record queued so far (among
    /// them the release that freed it). A release never meets the quota: it frees a packet id
    /// and refusing it could keep the log full for good.
    ///
    /// # Errors
    /// See [`IngestError`].
    pub async fn release(
        &self,
        publisher: &Publisher<'_>,
        packet_id: u16,
    ) -> Result<(Durable, bool), IngestError> {
        let record = ReleaseRecord {
            session: publisher.session,
            packet_id,
        }
        .encode();
        let kind = KIND_QOS2_RELEASE;
        match self
            .submit(publisher, kind, record, QoS::ExactlyOnce, packet_id)
            .await
        {
            Ok(durable) => {
                let found = matches!(durable, Durable::Append(_));
                Ok((durable, found))
            }
            Err(Submit::TakenOver) => Err(IngestError::TakenOver),
            Err(Submit::Log(error)) => Err(failure(&error)),
        }
    }

    /// Waits until the record an acknowledgement waits for is durable.
    ///
    /// # Errors
    /// The log's failure.
    pub async fn durable(&self, durable: &mut Durable) -> spool_storage::Result<()> {
        match durable {
            Durable::Append(append) => append.await.map(|_| ()),
            Durable::Through(seq) => self.wal.wait_durable(*seq).await,
        }
    }

    /// Queues a record in the log, holding the publisher back as it asked while the log has
    /// no room (its quota, or the disk's free-space reserve), until room is freed (the log
    /// says when), its session is taken over or the server stops.
    async fn append(
        &self,
        publisher: &Publisher<'_>,
        kind: u8,
        record: Bytes,
        qos: QoS,
        packet_id: u16,
    ) -> Result<Ingested, IngestError> {
        let mut held_back = false;
        // Watched only once the log is full (a shared counter is not touched per publish): a
        // freeing between the refusal and the watch is caught by trying once more right after.
        let mut space_freed = None;
        loop {
            let error = match self
                .submit(publisher, kind, record.clone(), qos, packet_id)
                .await
            {
                Ok(durable) => return Ok(Ingested::Logged(durable)),
                Err(Submit::TakenOver) => return Err(IngestError::TakenOver),
                Err(Submit::Log(error)) => error,
            };
            match error {
                spool_storage::Error::QuotaExceeded { .. }
                | spool_storage::Error::DiskFull { .. } => {
                    if !held_back {
                        tracing::warn!("{error}: holding back publishes");
                        held_back = true;
                    }
                }
                other => return Err(failure(&other)),
            }
            if qos == QoS::AtMostOnce {
                return Ok(Ingested::Dropped); // counted in the log line above
            }
            if publisher.when_full == WhenFull::Refuse {
                return Ok(Ingested::Refused);
            }
            let Some(space_freed) = space_freed.as_mut() else {
                space_freed = Some(self.wal.watch_space_freed());
                continue;
            };
            // A taken-over connection must not log later what its successor published
            // meanwhile (law 2: the sender's order).
            tokio::select! {
                biased;
                () = publisher.released.cancelled() => return Err(IngestError::TakenOver),
                () = self.shutdown.cancelled() => return Err(IngestError::ShuttingDown),
                // The sender lives as long as the log this holds.
                _ = space_freed.changed() => {}
            }
        }
    }

    /// Waits for room in the log's queue, then queues the record, deciding for QoS 2 under
    /// the receipts' lock.
    async fn submit(
        &self,
        publisher: &Publisher<'_>,
        kind: u8,
        record: Bytes,
        qos: QoS,
        packet_id: u16,
    ) -> Result<Durable, Submit> {
        let reservation = self.wal.reserve(kind, record).await?;
        if qos == QoS::ExactlyOnce {
            return self.submit_exactly_once(publisher, reservation, kind, packet_id);
        }
        Ok(Durable::Append(reservation.submit()?))
    }

    /// Submits a QoS 2 publish or release under the receipts' lock, so the log holds them in
    /// the order the receipts change. A publish whose packet id is held is a resend: it is not
    /// logged again, and its acknowledgement waits for the first record.
    fn submit_exactly_once(
        &self,
        publisher: &Publisher<'_>,
        reservation: Reservation<'_>,
        kind: u8,
        packet_id: u16,
    ) -> Result<Durable, Submit> {
        let mut receipts = receipts::lock(publisher.receipts);
        if receipts.owner() != publisher.connection {
            return Err(Submit::TakenOver);
        }
        if kind == KIND_QOS2_RELEASE {
            if receipts.get(packet_id).is_none() {
                return Ok(Durable::Through(self.wal.last_submitted_seq()));
            }
            // Bounded by the receive maximum.
            let append = reservation.submit_beyond_quota()?;
            receipts.release(packet_id);
            return Ok(Durable::Append(append));
        }
        if let Some(seq) = receipts.get(packet_id) {
            return Ok(Durable::Through(seq));
        }
        let append = reservation.submit()?;
        receipts.insert(packet_id, append.seq());
        Ok(Durable::Append(append))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::record::PublishRecord;
    use crate::delivery::record::QueueId;
    use crate::message::MessageProperties;
    use crate::routing::{RetainHandling, SubscriptionOptions, SubscriptionTable};
    use spool_storage::{FaultyFs, WalOptions};
    use std::path::Path;

    fn open(quota_bytes: Option<u64>) -> (Ingest, Wal) {
        let options = WalOptions {
            segment_size_bytes: 64 << 10,
            record_payload_bytes_max: 16 << 10,
            queue_bytes_max: 1 << 20,
            quota_bytes,
            ..WalOptions::default()
        };
        let fs: Arc<dyn spool_storage::FileSystem> = Arc::new(FaultyFs::new());
        let (wal, _) = Wal::open_with_fs(fs, Path::new("/wal"), options).expect("open");
        let mut table = SubscriptionTable::default();
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
            retain_handling: RetainHandling::AtSubscribe,
        };
        table.subscribe(7, "t/#", options);
        let router = Arc::new(Router::default());
        router.install(table);
        let clock = Arc::new(crate::clock::SystemClock);
        let ingest = Ingest::new(wal.clone(), router, CancellationToken::new(), clock);
        (ingest, wal)
    }

    fn message(qos: QoS, bytes: usize) -> Message {
        Message {
            topic: "t/a".into(),
            payload: Bytes::from(vec![1; bytes]),
            qos,
            retain: false,
            properties: MessageProperties::default(),
        }
    }

    /// Goal: a publish is logged with its routing decision, and its acknowledgement waits for
    /// that record to be durable; a QoS 2 resend waits for the first record, logged once.
    #[tokio::test]
    async fn a_publish_is_logged_with_its_route_and_a_resend_is_not_logged_again() {
        let (ingest, wal) = open(None);
        let (receipts, released) = (SharedReceipts::default(), CancellationToken::new());
        receipts::lock(&receipts).set_owner(1);
        let policy = Policy::default();
        let publisher = Publisher {
            client: Client {
                client_id: "publisher",
                identity: None,
            },
            policy: &policy,
            session: 3,
            connection: 1,
            receipts: &receipts,
            released: &released,
            when_full: WhenFull::Wait,
        };
        for _ in 0..2 {
            let Ok(Ingested::Logged(mut durable)) = ingest
                .publish(&publisher, message(QoS::ExactlyOnce, 10), 9)
                .await
            else {
                panic!("logged");
            };
            ingest.durable(&mut durable).await.expect("durable");
        }
        assert_eq!(wal.durable_seq(), 1, "the resend was not logged");
        let record = wal.read(1).expect("read").expect("there");
        let logged = PublishRecord::decode(record.payload).expect("decodes");
        assert_eq!(logged.targets.len(), 1);
        assert_eq!(
            (logged.targets[0].queue, logged.qos2_packet_id),
            (QueueId::Session(7), Some(9))
        );
        let (_, found) = ingest.release(&publisher, 9).await.expect("released");
        let (_, found_again) = ingest.release(&publisher, 9).await.expect("released");
        assert!(found && !found_again);
    }

    /// Goal: at the quota, a publisher that can be told is refused, QoS 0 is dropped, one
    /// that cannot waits, and a waiting one stops when its connection is let go.
    #[tokio::test]
    async fn a_full_log_refuses_drops_or_holds_back_as_the_publisher_needs() {
        let (ingest, _wal) = open(Some(128 << 10));
        let (receipts, released) = (SharedReceipts::default(), CancellationToken::new());
        let policy = Policy::default();
        let mut publisher = Publisher {
            client: Client {
                client_id: "publisher",
                identity: None,
            },
            policy: &policy,
            session: 3,
            connection: 1,
            receipts: &receipts,
            released: &released,
            when_full: WhenFull::Refuse,
        };
        while let Ok(Ingested::Logged(_)) = ingest
            .publish(&publisher, message(QoS::AtLeastOnce, 8 << 10), 1)
            .await
        {}
        let refused = ingest.publish(&publisher, message(QoS::AtLeastOnce, 8 << 10), 1);
        assert!(matches!(refused.await, Ok(Ingested::Refused)));
        let dropped = ingest.publish(&publisher, message(QoS::AtMostOnce, 8 << 10), 0);
        assert!(matches!(dropped.await, Ok(Ingested::Dropped)));
        publisher.when_full = WhenFull::Wait;
        let waiting = ingest.publish(&publisher, message(QoS::AtLeastOnce, 8 << 10), 2);
        released.cancel();
        assert_eq!(waiting.await.map(|_| ()), Err(IngestError::TakenOver));
    }
}
