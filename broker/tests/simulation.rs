//! A deterministic simulation of the hub: laws 1 and 2 checked against a model, with every
//! step chosen by one seed, so that a failing seed replays exactly.
//!
//! The hub is wired as the server wires it (`server::open_storage`, `server::hub_limits`),
//! with its log and metadata store on `FaultyFs`, but nothing in it runs on its own: the
//! simulation runs the log's writer (`WriterMode::Caller`), the metadata writer
//! (`MetaWriter::run_by_caller`), the appender (`append_handed_over`), the loader of messages
//! no longer cached (`load_asked`, with a cache of a few hundred messages) and the reclaimer
//! (`Wal::reclaim`); it drives the hub through its step API (`handle`,
//! `read_durable_records`, `tick`, `reclaim_tick`); the clock is a `ManualClock`; and the
//! clients are played through the hub's events and outbound channels, publishing through the
//! same `Ingest` as MQTT connections. So the seed picks every interleaving: when records become
//! durable, when the hub reads them, when metadata commits, when old messages are read back,
//! when clients publish, receive,
//! acknowledge, leave and come back, and when the power goes (its torn writes too).
//!
//! The publishers' telemetry comes from a module to the publish path, so it goes where a
//! deployment's route says: to a module input's endpoint queue, which a module subscriber
//! consumes (in a second test, urgent telemetry also goes to a second input at a higher
//! priority: one message in two queues that share the module's window and packet ids). The checker requires, for every subscriber, every message acknowledged to a
//! publisher on a topic it follows (or routed to it), in each publisher's order: redeliveries
//! allowed, no gap, no reordering.
//! A message lost or reordered by any recovery shows at the end, since the subscribers'
//! sessions never end.
//!
//! `scripts/test.sh` runs `SEEDS_DEFAULT` seeds in seconds; `SPOOL_SIM_SEEDS=<count>` runs
//! more, and `SPOOL_SIM_SEED=<n>` one. A failing seed prints its number; run alone with
//! `SPOOL_SIM_TRACE=1`, it prints every step it takes.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::SeededRng;
use spool_broker::auth::identity::IdentityId;
use spool_broker::auth::policy::{Client, Policy};
use spool_broker::clock::ManualClock;
use spool_broker::config::{Config, ServeArgs};
use spool_broker::hub::events::{
    ConnectOutcome, ConnectRefusal, ConnectRequest, Event, Outbound, OutboundReceiver, Protocol,
    SubscribeRefusal, outbound_channel,
};
use spool_broker::hub::{
    HelperRequests, Hub, HubHelpers, HubLimits, MetaWriter, append_handed_over, load_asked,
};
use spool_broker::ingest::{Durable, Ingest, Ingested, Publisher, WhenFull};
use spool_broker::message::{Message, MessageProperties, QoS};
use spool_broker::routing::endpoints::{EndpointCatalog, EndpointRoutes};
use spool_broker::routing::routes::table::RouteTable;
use spool_broker::routing::{RetainHandling, Router, SubscriptionOptions};
use spool_broker::server::{hub_limits, open_storage};
use spool_storage::{CrashMode, FaultyFs, Meta, PendingAppend, Wal, WriterMode};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Seeds `scripts/test.sh` runs.
const SEEDS_DEFAULT: u64 = 16;
/// Steps of one schedule before everyone comes back for what they are owed.
const STEPS: u32 = 1200;
/// Subscribers and the filter each subscribes to: the rare one is offline most of the time, so
/// its messages pin old segments and are moved by reclaims; the module `edge/sink` subscribes
/// to its inputs.
const SUBSCRIBERS: [(&str, &str); 4] = [
    ("all", "t/#"),
    ("only-a", "t/a"),
    ("rare", "r/+"),
    (SINK, "devices/edge/modules/sink/inputs/#"),
];
/// What is checked: each subscriber's messages, or a module's on one input, and the topics
/// owed to it (as a filter).
const STREAMS: [(&str, &str); 5] = [
    ("all", "t/#"),
    ("only-a", "t/a"),
    ("rare", "r/+"),
    (
        "edge/sink in1",
        "devices/edge/modules/filter/messages/events/+",
    ),
    ("edge/sink in2", URGENT),
];
const SINK: &str = "edge/sink";
/// Telemetry of the module `edge/filter` to its output `out1`, which a route takes to the
/// sink's input `in1`; the urgent kind goes to `in2` too, at a higher priority: the same
/// message in two of the sink's queues, which share its window and packet ids.
const TELEMETRY: &str = "devices/edge/modules/filter/messages/events/%24.on=out1";
const URGENT: &str = "devices/edge/modules/filter/messages/events/%24.on=out1&urgent=1";
/// What publishers publish on (telemetry is urgent one time in two).
const TOPICS: [&str; 4] = ["t/a", "t/b", "r/x", TELEMETRY];
const DEPLOYMENT: &str = r#"{"schemaVersion": "1.0", "routes": {"toSink":
    "FROM /messages/modules/filter/outputs/out1 INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")"}}"#;
/// `DEPLOYMENT`, and urgent telemetry to `in2` too.
const TWO_INPUTS: &str = r#"{"schemaVersion": "1.1", "routes": {
    "toSink": "FROM /messages/modules/filter/outputs/out1 INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")",
    "urgent": {"route": "FROM /messages/modules/filter/outputs/out1 WHERE urgent = '1' INTO BrokeredEndpoint(\"/modules/sink/inputs/in2\")",
               "priority": 0}},
    "storeAndForwardConfiguration": {"timeToLiveSecs": -1}}"#;
const PUBLISHERS: usize = 2;
/// Large enough that a few hundred fill a segment, so schedules roll, reclaim and move.
const PAYLOAD_BYTES: usize = 4_000;
/// A subscriber's receive maximum, and its outbound channel's capacity (smaller, so the
/// channel fills and the hub waits for `Drained`).
const RECEIVE_MAX: u16 = 16;
const OUTBOUND_CAPACITY: usize = 6;
/// The hub's message cache: a few hundred messages, so that queues fall behind it and have
/// their messages read back by the loader.
const CACHE_BYTES: usize = 200 * PAYLOAD_BYTES;

/// The seeds to run: `SPOOL_SIM_SEED`, or the first `SPOOL_SIM_SEEDS` (else `default`).
fn seeds(default: u64) -> Vec<u64> {
    match std::env::var("SPOOL_SIM_SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => {
            let count = std::env::var("SPOOL_SIM_SEEDS").map_or(default, |n| n.parse().unwrap());
            (1..=count).collect()
        }
    }
}

/// Runs `seeds` with `deployment`; returns their totals.
fn simulate(seeds: Vec<u64>, deployment: &'static str) -> Totals {
    let mut totals = Totals::default();
    for seed in seeds {
        let outcome = Simulation::new(seed, deployment).run();
        outcome.check(seed);
        totals.add(&outcome);
    }
    eprintln!("{totals:?}");
    totals
}

#[test]
fn seeded_simulations_keep_every_acknowledged_message_in_order() {
    let totals = simulate(seeds(SEEDS_DEFAULT), DEPLOYMENT);
    assert!(totals.power_cuts > 0, "the schedules cut the power");
    assert!(totals.records_moved > 0, "the schedules moved live records");
    assert!(totals.refused > 0, "the schedules reached the quota");
    assert!(totals.loads > 0, "queues fell behind the cache");
}

#[test]
fn a_message_in_two_inputs_of_one_module_keeps_order_and_packet_ids_apart() {
    // Goal: with urgent telemetry routed to two inputs of the sink, one at a higher priority,
    // the same message waits in two of its queues, which share its window and packet ids:
    // each input still gets everything in order across power cuts and reconnections, and no
    // packet id is in flight twice (`receive` checks).
    let mut seeds = seeds(SEEDS_DEFAULT / 2);
    if std::env::var_os("SPOOL_SIM_SEED").is_none() {
        // It sent a packet id twice before ids held by messages waiting to be sent again
        // counted as taken (the schedules change with this file: find one anew then).
        seeds.push(296);
    }
    let totals = simulate(seeds, TWO_INPUTS);
    assert!(totals.power_cuts > 0 && totals.received > 0);
}

#[test]
fn a_seed_replays_exactly() {
    // Goal: what a failing seed did happens again when it is run again, so it can be debugged.
    let first = Simulation::new(7, DEPLOYMENT).run();
    let second = Simulation::new(7, DEPLOYMENT).run();
    assert_eq!(
        first.trace, second.trace,
        "the same steps, in the same order"
    );
    assert_eq!(first.received, second.received);
    assert_eq!(first.acknowledged, second.acknowledged);
}

/// What the clients were told and saw, and what happened.
#[derive(Default)]
struct Outcome {
    /// (publisher, number) -> topic, for every message acknowledged to its publisher.
    acknowledged: BTreeMap<(u8, u32), &'static str>,
    /// Per stream (`STREAMS`), what it received, in order.
    received: BTreeMap<String, Vec<(u8, u32)>>,
    /// Every step taken, with what it saw: equal for two runs of one seed.
    trace: Vec<String>,
    power_cuts: u32,
    records_moved: u64,
    refused: u64,
    loads: usize,
}

#[derive(Debug, Default)]
struct Totals {
    acknowledged: usize,
    received: usize,
    power_cuts: u32,
    records_moved: u64,
    refused: u64,
    loads: usize,
}

impl Totals {
    fn add(&mut self, outcome: &Outcome) {
        self.acknowledged += outcome.acknowledged.len();
        self.received += outcome.received.values().map(Vec::len).sum::<usize>();
        self.power_cuts += outcome.power_cuts;
        self.records_moved += outcome.records_moved;
        self.refused += outcome.refused;
        self.loads += outcome.loads;
    }
}

impl Outcome {
    /// Every acknowledged message on a topic a subscriber follows reached it, each publisher's
    /// in order: a number at or below the highest seen so far is a redelivery of one received
    /// before, and none acknowledged is skipped.
    fn check(&self, seed: u64) {
        for (name, follows) in STREAMS {
            let received = self.received.get(name).cloned().unwrap_or_default();
            let owed = |publisher: u8, number: u32| {
                self.acknowledged
                    .get(&(publisher, number))
                    .is_some_and(|topic| spool_broker::routing::topic::matches(follows, topic))
            };
            for publisher in 0..PUBLISHERS {
                let publisher = u8::try_from(publisher).unwrap();
                let numbers: Vec<u32> = received
                    .iter()
                    .filter(|(from, _)| *from == publisher)
                    .map(|(_, number)| *number)
                    .collect();
                let mut highest: Option<u32> = None;
                for (at, &number) in numbers.iter().enumerate() {
                    match highest {
                        Some(high) if number <= high => assert!(
                            numbers[..at].contains(&number),
                            "SPOOL_SIM_SEED={seed}: {name} got p{publisher}'s {number} after \
                             {high}, never before: reordered ({numbers:?})"
                        ),
                        _ => {
                            let from = highest.map_or(0, |high| high + 1);
                            let skipped: Vec<u32> =
                                (from..number).filter(|&n| owed(publisher, n)).collect();
                            assert!(
                                skipped.is_empty(),
                                "SPOOL_SIM_SEED={seed}: {name} skipped p{publisher}'s \
                                 {skipped:?} before {number} ({numbers:?})"
                            );
                            highest = Some(number);
                        }
                    }
                }
            }
            for (&(publisher, number), topic) in &self.acknowledged {
                if owed(publisher, number) {
                    assert!(
                        received.contains(&(publisher, number)),
                        "SPOOL_SIM_SEED={seed}: {name} never received p{publisher}'s {number} \
                         on {topic}, acknowledged to its publisher"
                    );
                }
            }
        }
    }
}

/// Polls a future once: the simulation never waits, it takes another step.
fn poll_once<F: Future>(future: F) -> Poll<F::Output> {
    let mut future = pin!(future);
    future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
}

/// The hub and the storage under it, as the server wires them, with nothing running on its own.
struct Node {
    hub: Hub,
    wal: Wal,
    ingest: Ingest,
    clock: Arc<ManualClock>,
    /// What the hub asks of its helpers, which the simulation runs.
    requests: HelperRequests,
}

impl Node {
    /// Opens the storage on `fs` and starts the hub on it; a failure (recovery refusing a
    /// log that lost what the metadata refers to, say) fails `seed`.
    fn start(fs: &Arc<FaultyFs>, config: &Config, seed: u64, deployment: &str) -> Node {
        let (meta, wal) = open_storage(config, fs.clone(), WriterMode::Caller)
            .unwrap_or_else(|e| panic!("SPOOL_SIM_SEED={seed}: the node cannot start: {e:#}"));
        let metadata = MetaWriter::run_by_caller(Arc::clone(&meta));
        let (helpers, requests) = HubHelpers::new(metadata);
        let clock = Arc::new(ManualClock::new());
        let router = Arc::new(Router::default());
        install_routes(deployment, &meta, &wal, &router, seed);
        let limits = HubLimits {
            // Queues that fall behind have their messages read back.
            message_cache_bytes: CACHE_BYTES,
            ..hub_limits(config)
        };
        let hub = Hub::new(
            wal.clone(),
            &meta,
            Arc::clone(&router),
            limits,
            helpers,
            Arc::clone(&clock) as _,
        )
        .unwrap_or_else(|e| panic!("SPOOL_SIM_SEED={seed}: the hub cannot start: {e}"));
        let ingest = Ingest::new(
            wal.clone(),
            router,
            CancellationToken::new(),
            Arc::clone(&clock) as _,
        );
        Node {
            hub,
            wal,
            ingest,
            clock,
            requests,
        }
    }
}

/// Numbers the endpoints of `DEPLOYMENT` (once: a restart finds them numbered) and installs
/// its routes, as the server does before the hub starts.
fn install_routes(deployment: &str, meta: &Meta, wal: &Wal, router: &Router, seed: u64) {
    let table = RouteTable::from_manifest(deployment).unwrap();
    let mut catalog = EndpointCatalog::load(meta, wal.epoch()).unwrap();
    let endpoints = EndpointRoutes::endpoints(&table, "edge");
    catalog
        .number(meta, endpoints, wal.durable_seq())
        .unwrap_or_else(|e| panic!("SPOOL_SIM_SEED={seed}: endpoints not stored: {e}"));
    router.install_routes(EndpointRoutes::new(table, "edge", &catalog).unwrap());
}

/// One connection of a client, as a protocol adapter holds it.
struct Connection {
    id: u64,
    outbound: OutboundReceiver,
    released: CancellationToken,
    connack: Option<oneshot::Receiver<Result<ConnectOutcome, ConnectRefusal>>>,
    /// Set once the CONNACK came.
    session: Option<ConnectOutcome>,
    suback: Option<oneshot::Receiver<Vec<Result<QoS, SubscribeRefusal>>>>,
    /// Packet ids received and not yet acknowledged.
    unacknowledged: Vec<u16>,
}

/// A message published and not yet acknowledged: publisher, number, topic, the append.
type InFlight = (u8, u32, &'static str, PendingAppend);

struct Simulation {
    seed: u64,
    /// The deployment manifest the node applies.
    deployment: &'static str,
    rng: SeededRng,
    fs: Arc<FaultyFs>,
    config: Config,
    node: Node,
    next_connection: u64,
    subscribers: [Option<Connection>; SUBSCRIBERS.len()],
    publishers: [Option<Connection>; PUBLISHERS],
    next_number: [u32; PUBLISHERS],
    in_flight: Vec<InFlight>,
    outcome: Outcome,
}

impl Simulation {
    fn new(seed: u64, deployment: &'static str) -> Simulation {
        let fs = Arc::new(FaultyFs::new());
        let config = Config::resolve(ServeArgs {
            data_dir: Some("/sim".into()),
            mqtt_bind: Some("127.0.0.1:0".into()),
            mqtts_bind: Some(String::new()),
            admin_bind: Some(String::new()),
            max_packet_size: Some(16_384),
            wal_segment_bytes: Some(1_200_000),
            wal_quota_bytes: Some(6_000_000),
            ..ServeArgs::default()
        })
        .unwrap();
        let node = Node::start(&fs, &config, seed, deployment);
        Simulation {
            seed,
            deployment,
            rng: SeededRng::new(seed),
            fs,
            config,
            node,
            next_connection: 1,
            subscribers: [None, None, None, None],
            publishers: [None, None],
            next_number: [0; PUBLISHERS],
            in_flight: Vec::new(),
            outcome: Outcome::default(),
        }
    }

    fn run(mut self) -> Outcome {
        // Every subscriber's subscription is durable before anything is published: from then
        // on, every acknowledged message on its topics is owed to it.
        for index in 0..SUBSCRIBERS.len() {
            self.join(index);
        }
        self.settle();
        for index in 0..SUBSCRIBERS.len() {
            let connection = self.subscribers[index].as_ref().unwrap();
            assert!(
                connection.suback.is_none(),
                "subscribed before the schedule"
            );
        }
        for _ in 0..STEPS {
            self.step();
        }
        for index in 0..SUBSCRIBERS.len() {
            if self.subscribers[index].is_none() {
                self.join(index);
            }
        }
        self.settle();
        self.outcome
    }

    /// Notes a step; `SPOOL_SIM_TRACE=1` prints them as they happen.
    fn trace(&mut self, step: String) {
        if std::env::var_os("SPOOL_SIM_TRACE").is_some() {
            eprintln!("{step}");
        }
        self.outcome.trace.push(step);
    }

    /// One step, picked by the seed.
    fn step(&mut self) {
        match self.rng.below(100) {
            0..=19 => {
                let publisher = self.rng.index(PUBLISHERS);
                let mut topic = TOPICS[self.rng.index(TOPICS.len())];
                if topic == TELEMETRY && self.deployment == TWO_INPUTS && self.rng.below(2) == 0 {
                    topic = URGENT;
                }
                let count = 1 + self.rng.below(12);
                self.publish(publisher, topic, count);
            }
            20..=34 => self.write_log(),
            35..=44 => self.node.hub.read_durable_records(),
            45..=52 => self.commit_metadata(),
            53..=56 => self.load(),
            57..=84 => {
                let index = self.rng.index(SUBSCRIBERS.len());
                self.subscriber_step(index);
            }
            85..=94 => {
                self.node.clock.advance(Duration::from_secs(1));
                self.node.hub.tick();
                self.trace("tick".into());
            }
            95..=98 => self.reclaim(),
            _ => self.power_cut(),
        }
    }

    /// What a subscriber does: an offline one comes back (the rare one seldom); an online one
    /// reads what came, acknowledges some of it, or leaves.
    fn subscriber_step(&mut self, index: usize) {
        if self.subscribers[index].is_none() {
            let rare = SUBSCRIBERS[index].0 == "rare";
            if !rare || self.rng.below(6) == 0 {
                self.join(index);
            }
            return;
        }
        // With two inputs, the sink reconnects often: what it was sent waits again in both
        // queues, holding its packet ids.
        let stays = match (SUBSCRIBERS[index].0, self.deployment) {
            (SINK, TWO_INPUTS) => 3,
            _ => 10,
        };
        match self.rng.below(stays) {
            0 => self.leave(index),
            _ => {
                let count = self.rng.index(10);
                self.receive(index, count);
                let acknowledge = self.rng.index(8);
                self.acknowledge(index, acknowledge);
            }
        }
    }

    fn connect(&mut self, client_id: &str, persistent: bool, identity: Option<&str>) -> Connection {
        let (outbound, outbound_rx) = outbound_channel(OUTBOUND_CAPACITY);
        let (reply, connack) = oneshot::channel();
        let released = CancellationToken::new();
        let id = self.next_connection;
        self.next_connection += 1;
        self.node.hub.handle(Event::Connect(ConnectRequest {
            connection: id,
            client_id: client_id.to_owned(),
            protocol: Protocol::V5,
            clean_start: !persistent,
            session_expiry_secs: if persistent { u32::MAX } else { 0 },
            receive_max: RECEIVE_MAX,
            outbound,
            released: released.clone(),
            identity: identity.map(|id| IdentityId::parse(id).unwrap()),
            reply,
        }));
        self.trace(format!("connect {client_id} as {id}"));
        Connection {
            id,
            outbound: outbound_rx,
            released,
            connack: Some(connack),
            session: None,
            suback: None,
            unacknowledged: Vec::new(),
        }
    }

    /// A subscriber connects to its persistent session; it subscribes again once connected,
    /// as the IoT SDKs do.
    fn join(&mut self, index: usize) {
        let name = SUBSCRIBERS[index].0;
        let identity = (name == SINK).then_some(SINK);
        let connection = self.connect(name, true, identity);
        self.subscribers[index] = Some(connection);
    }

    fn leave(&mut self, index: usize) {
        let Some(connection) = self.subscribers[index].take() else {
            return;
        };
        self.trace(format!("{} leaves", SUBSCRIBERS[index].0));
        if let Some(session) = &connection.session {
            self.node.hub.handle(Event::Disconnected {
                session: session.session,
                connection: connection.id,
                will: None,
                session_expiry_secs: None,
            });
        }
        // A CONNACK still to come is for a connection that is gone: the hub lets go of it.
    }

    /// Takes a pending CONNACK (then subscribes) or SUBACK of a subscriber.
    fn answers(&mut self, index: usize) {
        let (name, filter) = SUBSCRIBERS[index];
        let Some(connection) = self.subscribers[index].as_mut() else {
            return;
        };
        if let Some(connack) = connection.connack.as_mut() {
            let Ok(answer) = connack.try_recv() else {
                return;
            };
            connection.connack = None;
            let outcome = answer.unwrap();
            let options = SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                subscription_id: None,
                retain_handling: RetainHandling::AtSubscribe,
            };
            let (reply, suback) = oneshot::channel();
            let session = outcome.session;
            connection.session = Some(outcome);
            connection.suback = Some(suback);
            self.node.hub.handle(Event::Subscribe {
                session,
                filters: vec![(filter.to_owned(), options)],
                reply,
            });
            self.trace(format!("{name} connected, subscribes"));
        }
        let Some(connection) = self.subscribers[index].as_mut() else {
            return;
        };
        if let Some(suback) = connection.suback.as_mut()
            && let Ok(granted) = suback.try_recv()
        {
            connection.suback = None;
            assert_eq!(
                granted,
                vec![Ok(QoS::AtLeastOnce)],
                "SPOOL_SIM_SEED={}",
                self.seed
            );
            self.trace(format!("{name} subscribed"));
        }
    }

    /// Reads up to `count` packets the hub sent a subscriber, noting each message.
    fn receive(&mut self, index: usize, count: usize) {
        self.answers(index);
        let name = SUBSCRIBERS[index].0;
        let Some(connection) = self.subscribers[index].as_mut() else {
            return;
        };
        let mut seen = Vec::new();
        let mut taken_over = false;
        for _ in 0..count {
            match connection.outbound.try_recv() {
                Some(Outbound::Publish(delivery)) => {
                    let stream = match name {
                        SINK => {
                            // On the topic the connection sends it on.
                            let topic = delivery.topic();
                            let input = topic.split('/').nth(5).unwrap();
                            format!("{SINK} {input}")
                        }
                        _ => name.to_owned(),
                    };
                    let payload = &delivery.message.payload;
                    let number = u32::from_be_bytes(payload[1..5].try_into().unwrap());
                    seen.push((stream, payload[0], number));
                    let packet_id = delivery.packet_id.unwrap();
                    assert!(
                        !connection.unacknowledged.contains(&packet_id),
                        "SPOOL_SIM_SEED={}: packet id {packet_id} sent to {name} twice before \
                         its acknowledgement",
                        self.seed
                    );
                    connection.unacknowledged.push(packet_id);
                }
                Some(Outbound::Release(_)) => unreachable!("no QoS 2 here"),
                Some(Outbound::SessionTakenOver) => taken_over = true,
                None => break,
            }
        }
        let drained = connection.outbound.room_made();
        let session = connection.session.as_ref().map(|s| s.session);
        assert!(
            !taken_over,
            "SPOOL_SIM_SEED={}: one connection per client",
            self.seed
        );
        if drained && let Some(session) = session {
            self.node.hub.handle(Event::Drained { session });
        }
        if !seen.is_empty() {
            self.trace(format!("{name} received {seen:?}"));
        }
        for (stream, publisher, number) in seen {
            let received = self.outcome.received.entry(stream).or_default();
            received.push((publisher, number));
        }
    }

    /// Acknowledges up to `count` of what a subscriber received, in the order received or,
    /// now and then, out of it (MQTT allows either).
    fn acknowledge(&mut self, index: usize, count: usize) {
        let shuffle = self.rng.below(4) == 0;
        let pick = self.rng.next_u64();
        let Some(connection) = self.subscribers[index].as_mut() else {
            return;
        };
        let Some(session) = connection.session.as_ref().map(|s| s.session) else {
            return;
        };
        let count = count.min(connection.unacknowledged.len());
        let mut packet_ids: Vec<u16> = connection.unacknowledged.drain(..count).collect();
        if shuffle && count > 1 {
            let at = usize::try_from(pick % count as u64).unwrap();
            packet_ids.swap(0, at);
        }
        let id = connection.id;
        for &packet_id in &packet_ids {
            self.node.hub.handle(Event::Acknowledge {
                session,
                connection: id,
                packet_id,
            });
        }
        if !packet_ids.is_empty() {
            self.trace(format!(
                "{} acknowledged {packet_ids:?}",
                SUBSCRIBERS[index].0
            ));
        }
    }

    /// Publishes up to `count` numbered QoS 1 messages; at the quota the rest is refused, as
    /// MQTT 5 publishers are told (quota exceeded).
    fn publish(&mut self, publisher: usize, topic: &'static str, count: u64) {
        if self.publishers[publisher].is_none() {
            let connection = self.connect(&format!("p{publisher}"), false, None);
            self.publishers[publisher] = Some(connection);
        }
        let connection = self.publishers[publisher].as_mut().unwrap();
        if let Some(connack) = connection.connack.as_mut() {
            match connack.try_recv() {
                Ok(answer) => connection.session = Some(answer.unwrap()),
                Err(_) => return, // not connected yet
            }
            connection.connack = None;
        }
        let session = connection.session.as_ref().unwrap();
        // Telemetry comes from the module `edge/filter` to the publish path, and is routed.
        let filter = IdentityId::parse("edge/filter").unwrap();
        let policy = Policy::default();
        let from = Publisher {
            client: Client {
                client_id: "edge/filter",
                identity: topic.starts_with("devices/").then_some(&filter),
            },
            policy: &policy,
            session: session.session,
            connection: connection.id,
            receipts: &session.receipts,
            released: &connection.released,
            when_full: WhenFull::Refuse,
        };
        let mut logged = Vec::new();
        let mut refused = 0;
        for _ in 0..count {
            let number = self.next_number[publisher];
            self.next_number[publisher] += 1;
            let mut payload = vec![0x5a; PAYLOAD_BYTES];
            payload[0] = u8::try_from(publisher).unwrap();
            payload[1..5].copy_from_slice(&number.to_be_bytes());
            let message = Message {
                topic: topic.to_owned(),
                payload: Bytes::from(payload),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: MessageProperties::default(),
            };
            let packet_id = u16::try_from(number % 65_535 + 1).unwrap();
            let Poll::Ready(ingested) =
                poll_once(self.node.ingest.publish(&from, message, packet_id))
            else {
                panic!("a publish that is refused when the log is full never waits");
            };
            match ingested.unwrap() {
                Ingested::Logged(Durable::Append(append)) => logged.push((number, append)),
                Ingested::Refused => refused += 1,
                other => panic!("QoS 1 is logged or refused, not {other:?}"),
            }
        }
        self.outcome.refused += refused;
        let numbers: Vec<u32> = logged.iter().map(|(number, _)| *number).collect();
        self.trace(format!(
            "p{publisher} logged {numbers:?} on {topic}, {refused} refused"
        ));
        let publisher = u8::try_from(publisher).unwrap();
        self.in_flight.extend(
            logged
                .into_iter()
                .map(|(number, append)| (publisher, number, topic, append)),
        );
    }

    /// The log's writer writes what is queued; the publishers learn what is durable.
    fn write_log(&mut self) {
        let written = self.node.wal.write_queued();
        self.trace(format!("wrote {written}"));
        self.take_acknowledgements();
    }

    /// Notes the publishes whose appends resolved: those made durable are acknowledged (a
    /// PUBACK), those that failed are not.
    fn take_acknowledgements(&mut self) {
        let mut acknowledged = Vec::new();
        self.in_flight.retain_mut(
            |(publisher, number, topic, append)| match poll_once(append) {
                Poll::Pending => true,
                Poll::Ready(Ok(_)) => {
                    acknowledged.push((*publisher, *number, *topic));
                    false
                }
                Poll::Ready(Err(_)) => false,
            },
        );
        for &(publisher, number, topic) in &acknowledged {
            self.outcome.acknowledged.insert((publisher, number), topic);
        }
        if !acknowledged.is_empty() {
            self.trace(format!("acknowledged {}", acknowledged.len()));
        }
    }

    /// The loader reads the messages the hub asked for; the hub takes them in.
    fn load(&mut self) {
        let answered = load_asked(&self.node.wal, &mut self.node.requests.loads);
        self.outcome.loads += answered;
        self.node.hub.take_loaded();
        self.trace(format!("loaded {answered}"));
    }

    fn commit_metadata(&mut self) {
        let committed = self.node.hub.commit_metadata();
        self.node.hub.take_progress_report();
        self.trace(format!("committed {committed} metadata writes"));
    }

    /// The hub asks for a reclaim and hands over its own records; the simulation runs both.
    fn reclaim(&mut self) {
        self.node.hub.reclaim_tick();
        append_handed_over(&self.node.wal, &mut self.node.requests.appends);
        while let Ok(liveness) = self.node.requests.reclaims.try_recv() {
            let report = self.node.wal.reclaim(&liveness).unwrap();
            self.outcome.records_moved += report.records_moved;
            self.trace(format!(
                "reclaimed: {} moved, {} segments removed",
                report.records_moved, report.segments_removed
            ));
        }
    }

    /// The power goes: what was not durable is lost (with some torn sectors), every client
    /// loses its connection, and the node starts again on what survived.
    fn power_cut(&mut self) {
        let torn = CrashMode::TornWrites {
            seed: self.rng.next_u64(),
        };
        self.fs.crash(torn);
        self.outcome.power_cuts += 1;
        self.subscribers = [None, None, None, None];
        self.publishers = [None, None];
        // The old node is dropped once the new one started: its file handles died with the
        // power, so nothing it still tries to write on the way out reaches the disk.
        self.node = Node::start(&self.fs, &self.config, self.seed, self.deployment);
        // Appends the old node resolved before the power went were acknowledged.
        self.take_acknowledgements();
        assert!(self.in_flight.is_empty(), "SPOOL_SIM_SEED={}", self.seed);
        self.trace("power cut, restarted".into());
    }

    /// Runs the node and the subscribers until nothing moves any more: every subscriber
    /// connected, subscribed, and has received and acknowledged everything owed to it.
    fn settle(&mut self) {
        let mut quiet_rounds = 0;
        while quiet_rounds < 8 {
            let before = self.outcome.trace.len();
            self.write_log();
            self.node.hub.read_durable_records();
            self.commit_metadata();
            self.load();
            for index in 0..SUBSCRIBERS.len() {
                self.receive(index, usize::MAX);
                self.acknowledge(index, usize::MAX);
            }
            self.node.clock.advance(Duration::from_secs(1));
            self.node.hub.tick();
            let idle = ["tick", "wrote 0", "committed 0 ", "loaded 0"];
            let moved = self.outcome.trace[before..]
                .iter()
                .any(|step| !idle.iter().any(|quiet| step.starts_with(quiet)));
            quiet_rounds = if moved { 0 } else { quiet_rounds + 1 };
        }
    }
}
