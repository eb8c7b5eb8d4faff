//! The hub without sockets, on a clock the test moves: an hour of will delay, two hours of
//! session expiry and a minute of message expiry pass in seconds, and nothing fires early.
//! Also what a connection whose channel is full gets once it makes room.
//!
//! The hub is wired as the server wires it (log, metadata store, appender, reclaimer), with
//! connections played by the test through the hub's events.

use bytes::Bytes;
use spool_broker::auth::identity::IdentityId;
use spool_broker::auth::policy::{Client, Policy};
use spool_broker::clock::{Clock, ManualClock};
use spool_broker::delivery::queue::QueueLimits;
use spool_broker::delivery::record::{KIND_PUBLISH, PublishRecord};
use spool_broker::hub::events::{
    ConnectOutcome, ConnectRequest, Event, Outbound, OutboundReceiver, Protocol, outbound_channel,
};
use spool_broker::hub::{Hub, HubHelpers, HubLimits, MetaWriter};
use spool_broker::ingest::{Ingest, Ingested, Publisher, WhenFull};
use spool_broker::message::{Message, MessageProperties, QoS, Will};
use spool_broker::method::{MethodDelivery, MethodRequest};
use spool_broker::routing::{RetainHandling, Router, SubscriptionOptions};
use spool_storage::{Meta, Wal, WalOptions, WalReader};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);
/// Longer than the hub's tick (one second), so a tick has looked at the clock since it moved.
const TICKS: Duration = Duration::from_millis(2500);

struct TestHub {
    events: mpsc::Sender<Event>,
    ingest: Ingest,
    clock: Arc<ManualClock>,
    wal: Wal,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl TestHub {
    fn start() -> TestHub {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (wal, _) = Wal::open(&dir.path().join("wal"), WalOptions::default()).expect("log");
        let meta = Arc::new(Meta::open(&dir.path().join("meta.redb")).expect("metadata store"));
        let limits = HubLimits {
            in_flight_max: 16,
            sessions_max: 100,
            session_queue: QueueLimits {
                entries_max: 1000,
                bytes_max: 0,
            },
            endpoint_queue: QueueLimits {
                entries_max: 1000,
                bytes_max: 0,
            },
            session_expiry_v311: HOUR,
            message_cache_bytes: 1 << 20,
        };
        let clock = Arc::new(ManualClock::new());
        let router = Arc::new(Router::default());
        let metadata = MetaWriter::start(Arc::clone(&meta)).expect("metadata writer");
        let (helpers, requests) = HubHelpers::new(metadata);
        let hub = Hub::new(
            wal.clone(),
            &meta,
            Arc::clone(&router),
            limits,
            helpers,
            Arc::clone(&clock) as _,
        )
        .expect("hub");
        let (events, events_rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        tokio::spawn(hub.run(events_rx, shutdown.clone()));
        requests.spawn(&wal);
        TestHub {
            events,
            ingest: Ingest::new(
                wal.clone(),
                router,
                shutdown.clone(),
                Arc::clone(&clock) as _,
            ),
            clock,
            wal,
            shutdown,
            _dir: dir,
        }
    }

    /// Connects `client_id` as connection `connection` with a persistent MQTT 5 session. The
    /// connection lives while its outbound channel does: the hub lets go of a closed one.
    async fn connect(
        &self,
        connection: u64,
        client_id: &str,
        expiry: Duration,
    ) -> (ConnectOutcome, OutboundReceiver) {
        self.connect_as(connection, client_id, expiry, None).await
    }

    /// [`TestHub::connect`] as IoT Hub identity `identity`, if given.
    async fn connect_as(
        &self,
        connection: u64,
        client_id: &str,
        expiry: Duration,
        identity: Option<IdentityId>,
    ) -> (ConnectOutcome, OutboundReceiver) {
        let (outbound, outbound_rx) = outbound_channel(16);
        let (reply, answer) = oneshot::channel();
        let request = ConnectRequest {
            connection,
            client_id: client_id.to_owned(),
            protocol: Protocol::V5,
            clean_start: false,
            session_expiry_secs: u32::try_from(expiry.as_secs()).expect("expiry fits"),
            receive_max: 16,
            outbound,
            released: CancellationToken::new(),
            identity,
            reply,
        };
        self.send(Event::Connect(request)).await;
        let outcome = answer
            .await
            .expect("the hub answers")
            .expect("the hub accepts the session");
        (outcome, outbound_rx)
    }

    async fn disconnect(&self, session: u64, connection: u64, will: Option<Box<Will>>) {
        self.send(Event::Disconnected {
            session,
            connection,
            will,
            session_expiry_secs: None,
        })
        .await;
    }

    async fn subscribe(&self, session: u64, filter: &str) {
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
            retain_handling: RetainHandling::default(),
        };
        let (reply, answer) = oneshot::channel();
        self.send(Event::Subscribe {
            session,
            filters: vec![(filter.to_owned(), options)],
            reply,
        })
        .await;
        let granted = answer.await.expect("the hub answers");
        assert_eq!(granted, vec![Ok(QoS::AtLeastOnce)]);
    }

    /// Publishes `message` from the connected session `publisher` and waits until it is
    /// durable, as before a PUBACK.
    async fn publish(&self, publisher: &ConnectOutcome, connection: u64, message: Message) {
        let released = CancellationToken::new();
        let policy = Policy::default();
        let from = Publisher {
            client: Client {
                client_id: "publisher",
                identity: None,
            },
            policy: &policy,
            session: publisher.session,
            connection,
            receipts: &publisher.receipts,
            released: &released,
            when_full: WhenFull::Refuse,
        };
        let ingested = self.ingest.publish(&from, message, 1).await;
        let Ok(Ingested::Logged(mut durable)) = ingested else {
            panic!("the publish was not logged: {ingested:?}");
        };
        self.ingest.durable(&mut durable).await.expect("durable");
    }

    /// Waits until the hub has handled every event sent before: it handles them in order, and
    /// this one (for no session) is answered at once.
    async fn settle(&self) {
        let (reply, answer) = oneshot::channel();
        self.send(Event::Unsubscribe {
            session: 0,
            filters: Vec::new(),
            reply,
        })
        .await;
        answer.await.expect("the hub answers");
    }

    async fn send(&self, event: Event) {
        self.events.send(event).await.expect("the hub runs");
    }

    /// The next publish record in the log, if one is logged within `wait`.
    async fn next_publish(&self, reader: &mut WalReader, wait: Duration) -> Option<Message> {
        let record = tokio::time::timeout(wait, reader.next()).await.ok()?;
        let record = record.expect("the log reads");
        assert_eq!(record.kind, KIND_PUBLISH, "only a will is logged here");
        Some(
            PublishRecord::decode(record.payload)
                .expect("a publish record")
                .message,
        )
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn message(topic: &str, payload: &'static [u8], expires_at_ms: Option<u64>) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: MessageProperties {
            expires_at_ms,
            ..MessageProperties::default()
        },
    }
}

fn will(delay: Duration) -> Box<Will> {
    Box::new(Will {
        message: message("status/sensor", b"offline", None),
        expiry_interval_secs: None,
        delay_secs: u32::try_from(delay.as_secs()).expect("delay fits"),
    })
}

/// Goal: a will delayed by an hour goes out when the hub's clock has moved an hour, not a
/// second before; a session with two hours of expiry is gone after two hours, while one with a
/// day of expiry is still there. Without the hub reading time from its clock, this would take
/// a day, or nothing would fire.
#[tokio::test]
async fn a_delayed_will_and_session_expiry_follow_the_hubs_clock() {
    let hub = TestHub::start();
    let mut log = hub.wal.reader(1).expect("log reader");

    let (sensor, _sensor_connection) = hub.connect(1, "sensor", 2 * HOUR).await;
    let (keeper, _keeper_connection) = hub.connect(2, "keeper", 24 * HOUR).await;
    hub.disconnect(sensor.session, 1, Some(will(HOUR))).await;
    hub.disconnect(keeper.session, 2, None).await;
    hub.settle().await;

    hub.clock.advance(HOUR - Duration::from_secs(1));
    assert_eq!(
        hub.next_publish(&mut log, TICKS).await,
        None,
        "the will went out before its delay"
    );

    hub.clock.advance(Duration::from_secs(1));
    let published = hub
        .next_publish(&mut log, Duration::from_secs(10))
        .await
        .expect("the will goes out once its delay has passed");
    assert_eq!(published.topic, "status/sensor");
    assert_eq!(published.payload, Bytes::from_static(b"offline"));

    hub.clock.advance(HOUR);
    tokio::time::sleep(TICKS).await;
    let (sensor_again, _) = hub.connect(3, "sensor", 2 * HOUR).await;
    assert!(
        !sensor_again.session_present,
        "the session outlived its two hours of expiry"
    );
    let (keeper_again, _) = hub.connect(4, "keeper", 24 * HOUR).await;
    assert!(
        keeper_again.session_present,
        "a session with a day of expiry was removed after two hours"
    );
}

/// Goal: a message queued for an offline session with a minute to live is not delivered once
/// the hub's clock has passed that minute, and the one queued behind it, which does not
/// expire, is. (By the machine's clock the minute has not passed.)
#[tokio::test]
async fn a_queued_message_expires_by_the_hubs_clock() {
    let hub = TestHub::start();
    let (writer, _writer_connection) = hub.connect(1, "writer", HOUR).await;
    let (reader, reader_connection) = hub.connect(2, "reader", 24 * HOUR).await;
    hub.subscribe(reader.session, "data/#").await;
    hub.disconnect(reader.session, 2, None).await;
    drop(reader_connection);
    hub.settle().await;

    let in_a_minute = hub.clock.unix_ms() + 60_000;
    hub.publish(
        &writer,
        1,
        message("data/a", b"short-lived", Some(in_a_minute)),
    )
    .await;
    hub.publish(&writer, 1, message("data/a", b"kept", None))
        .await;
    hub.clock.advance(Duration::from_secs(61));

    let (resumed, mut connection) = hub.connect(3, "reader", 24 * HOUR).await;
    assert!(resumed.session_present);
    let delivered = tokio::time::timeout(Duration::from_secs(10), connection.recv())
        .await
        .expect("a delivery within 10 s")
        .expect("the connection is open");
    let Outbound::Publish(delivery) = delivered else {
        panic!("expected a publish, got {delivered:?}");
    };
    assert_eq!(
        delivery.message.payload,
        Bytes::from_static(b"kept"),
        "the first delivery is the message that does not expire"
    );
}

#[tokio::test]
async fn method_requests_waiting_for_room_go_once_their_callers_stop_waiting() {
    // Goal (law 5): direct-method requests for a connection whose channel is full wait for
    // room, but only while their callers wait: those abandoned meanwhile are never sent, so
    // what waits is bounded by the calls under way, however long the connection stays full.
    let hub = TestHub::start();
    let module = IdentityId::parse("edge/m").expect("id");
    let client_id = module.to_string();
    let (session, mut outbound) = hub
        .connect_as(1, &client_id, HOUR, Some(module.clone()))
        .await;
    hub.subscribe(session.session, "$iothub/methods/POST/#")
        .await;
    let request = |name: &str, abandoned: &CancellationToken| {
        let (reply, answer) = oneshot::channel();
        let request = MethodRequest {
            target: module.clone(),
            topic: format!("$iothub/methods/POST/{name}/?$rid=1"),
            payload: Bytes::from_static(b"null"),
            abandoned: abandoned.clone(),
        };
        (Event::MethodRequest { request, reply }, answer)
    };
    let waiting = CancellationToken::new();
    let mut topics = Vec::new();
    for name in ["fills"; 16]
        .into_iter()
        .chain(["gives-up"; 20])
        .chain(["waits"])
    {
        let abandoned = match name {
            "gives-up" => CancellationToken::new(),
            _ => waiting.clone(),
        };
        let (event, answer) = request(name, &abandoned);
        hub.send(event).await;
        assert_eq!(answer.await.expect("answered"), MethodDelivery::Sent);
        if name == "gives-up" {
            abandoned.cancel(); // its caller timed out
        }
    }
    // Room is made: what still waits goes, what was abandoned does not.
    while let Some(Outbound::Publish(delivery)) = outbound.try_recv() {
        topics.push(delivery.message.topic.clone());
    }
    hub.send(Event::Drained {
        session: session.session,
    })
    .await;
    hub.settle().await;
    while let Some(Outbound::Publish(delivery)) = outbound.try_recv() {
        topics.push(delivery.message.topic.clone());
    }
    let sent: Vec<&str> = topics
        .iter()
        .map(|t| t.split('/').nth(3).unwrap())
        .collect();
    let mut expected = vec!["fills"; 16];
    expected.push("waits");
    assert_eq!(sent, expected);
}
