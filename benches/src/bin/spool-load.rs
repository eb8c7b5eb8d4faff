//! `spool-load`: an MQTT load generator with three workloads.
//!
//! `throughput` (the default): `--publishers` publishers send `--count` QoS 1 messages in all,
//! of `--size` bytes, each keeping `--inflight` unacknowledged, to one subscriber. It reports
//! messages per second end to end (first publish to last delivery) and checks that every
//! message arrived and that each publisher's messages arrived in the order sent.
//!
//! `iotedge`: the same through the IoT Edge path: the publishers are modules
//! `{device}/pub{n}` sending telemetry to their output `out1` with a property `k=v`, and the
//! subscriber is the module `{device}/sink` taking its inputs, all over TLS (`--ca`, the CA
//! file to trust; host `localhost`) with SAS tokens signed with `--key` (base64, the same key
//! for every module). The broker must route that telemetry to `sink`'s input (spool:
//! `scripts/iotedge-bench.sh` writes the identities and the deployment, with a `WHERE`).
//!
//! `storm`: what a hub meets after a failover, when every module reconnects at once.
//! - `--phase prepare` makes `--clients` persistent sessions (clean session off), each
//!   subscribed to its own topic, disconnects them, and queues one QoS 1 message for each.
//! - `--phase reconnect` then connects all of them at once, retrying until the broker accepts
//!   (so it can be started before the broker is), has each subscribe again as the Azure IoT
//!   SDKs do, and reports how long it took until every client had its SUBACK and its queued
//!   message, timed from the start of this phase. `scripts/reconnect-storm.sh` kills and
//!   restarts spool between the phases.
//!
//! Run it against spool and against another broker on the same machine, one after the other
//! (`scripts/compare.sh` does both side by side):
//! `cargo run --release -p spool-bench --bin spool-load -- --port 1883 --publishers 10`

#![allow(clippy::unwrap_used)] // a load generator: any failure should stop the run loudly

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration,
    Transport,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use spool_broker::auth::sas::{resource_uri, sign};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a run may take before it is called stuck.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Throughput,
    IotEdge,
    StormPrepare,
    StormReconnect,
}

#[derive(Debug, Clone)]
struct Args {
    workload: Workload,
    /// The IoT Edge workload's CA file, key and edge device.
    ca: Option<String>,
    key: Option<String>,
    device: String,
    host: String,
    port: u16,
    count: u64,
    size: usize,
    inflight: u16,
    publishers: u32,
    clients: u32,
}

const USAGE: &str = "usage: spool-load [throughput] [--host H] [--port P] [--count N] [--size B] \
                     [--inflight N] [--publishers N] [--ca FILE]\n       spool-load iotedge --ca FILE \
                     --key BASE64 [--device D] [--port P] [--count N] [--size B] [--inflight N] \
                     [--publishers N]\n       spool-load storm --phase \
                     prepare|reconnect [--host H] [--port P] [--clients N]";

fn parse_args() -> Args {
    let mut args = Args {
        workload: Workload::Throughput,
        ca: None,
        key: None,
        device: "edge".into(),
        host: "127.0.0.1".into(),
        port: 1883,
        count: 100_000,
        size: 256,
        inflight: 64,
        publishers: 1,
        clients: 1000,
    };
    let mut words = std::env::args().skip(1).peekable();
    let mut storm = false;
    let mut iotedge = false;
    match words.peek().map(String::as_str) {
        Some("throughput") => drop(words.next()),
        Some("iotedge") => {
            iotedge = true;
            words.next();
        }
        Some("storm") => {
            storm = true;
            words.next();
        }
        _ => {}
    }
    let mut phase = None;
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--host" => args.host = value,
            "--port" => args.port = value.parse().unwrap(),
            "--count" => args.count = value.parse().unwrap(),
            "--size" => args.size = value.parse().unwrap(),
            "--inflight" => args.inflight = value.parse().unwrap(),
            "--publishers" => args.publishers = value.parse().unwrap(),
            "--clients" => args.clients = value.parse().unwrap(),
            "--phase" => phase = Some(value),
            "--ca" => args.ca = Some(value),
            "--key" => args.key = Some(value),
            "--device" => args.device = value,
            other => panic!("unknown flag {other}\n{USAGE}"),
        }
    }
    args.workload = match (storm, iotedge, phase.as_deref()) {
        (false, false, None) => Workload::Throughput,
        (false, true, None) if args.ca.is_some() && args.key.is_some() => Workload::IotEdge,
        (true, false, Some("prepare")) => Workload::StormPrepare,
        (true, false, Some("reconnect")) => Workload::StormReconnect,
        _ => panic!("{USAGE}"),
    };
    assert!(args.publishers > 0 && args.clients > 0, "{USAGE}");
    args
}

/// A plain client's options; over TLS trusting `--ca` when it is given (the listener must let
/// anonymous clients in: `--mqtts-auth anonymous`), to tell TLS's cost from the IoT Edge path's.
fn options(args: &Args, client_id: &str) -> MqttOptions {
    let host = match args.ca {
        Some(_) => "localhost".to_owned(),
        None => args.host.clone(),
    };
    let mut options = MqttOptions::new(client_id, host, args.port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(args.inflight);
    options.set_max_packet_size(1 << 20, 1 << 20);
    if args.ca.is_some() {
        options.set_transport(tls_transport(args));
    }
    options
}

/// TLS trusting the certificates of `--ca`.
fn tls_transport(args: &Args) -> Transport {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(args.ca.as_deref().unwrap()).unwrap();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config)))
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let run = async {
        match args.workload {
            Workload::Throughput => throughput(&args, &Path::plain(&args)).await,
            Workload::IotEdge => throughput(&args, &Path::iot_edge(&args)).await,
            Workload::StormPrepare => storm_prepare(&args).await,
            Workload::StormReconnect => storm_reconnect(&args).await,
        }
    };
    tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .expect("the run did not finish in time");
}

/// Polls until the broker acknowledges a subscription.
async fn wait_for_suback(events: &mut EventLoop) {
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            return;
        }
    }
}

/// Where the throughput workload's messages go, and who sends and takes them.
struct Path {
    /// The topic publisher `n` publishes on.
    topic: Box<dyn Fn(u32) -> String>,
    filter: String,
    /// The options of publisher `n`, and of the subscriber (`None`).
    client: Box<dyn Fn(Option<u32>) -> MqttOptions>,
    what: &'static str,
}

impl Path {
    /// Plain MQTT: one topic, anonymous clients (over TLS with `--ca`).
    fn plain(args: &Args) -> Path {
        let what = match args.ca {
            Some(_) => "plain MQTT over TLS",
            None => "plain MQTT",
        };
        let args = args.clone();
        Path {
            topic: Box::new(|_| "spool-load/t".into()),
            filter: "spool-load/t".into(),
            client: Box::new(move |publisher| match publisher {
                Some(n) => options(&args, &format!("spool-load-pub-{n}")),
                None => options(&args, "spool-load-sub"),
            }),
            what,
        }
    }

    /// IoT Edge modules over TLS with SAS tokens, through a route (see the module docs).
    fn iot_edge(args: &Args) -> Path {
        let args = args.clone();
        let device = args.device.clone();
        let filter = format!("devices/{device}/modules/sink/inputs/#");
        Path {
            topic: Box::new(move |n| {
                format!("devices/{device}/modules/pub{n}/messages/events/%24.on=out1&k=v")
            }),
            filter,
            client: Box::new(move |publisher| match publisher {
                Some(n) => module_options(&args, &format!("pub{n}")),
                None => module_options(&args, "sink"),
            }),
            what: "IoT Edge modules over TLS with SAS, through a route",
        }
    }
}

/// The options of module `{device}/{module}`: TLS trusting `--ca`, and a SAS token signed with
/// `--key`, valid for a day.
fn module_options(args: &Args, module: &str) -> MqttOptions {
    use base64::Engine as _;
    let device = &args.device;
    let id = format!("{device}/{module}");
    let mut options = MqttOptions::new(&id, "localhost", args.port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(args.inflight);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let key = base64::engine::general_purpose::STANDARD
        .decode(args.key.as_deref().unwrap())
        .unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let expiry = now.unwrap().as_secs() + 86_400;
    let token = sign(
        &key,
        &resource_uri("localhost", device, Some(module)),
        expiry,
    );
    options.set_credentials(format!("localhost/{id}/?api-version=2020-09-30"), token);
    options.set_transport(tls_transport(args));
    options
}

async fn throughput(args: &Args, path: &Path) {
    let (subscriber, mut subscriber_loop) = AsyncClient::new((path.client)(None), 1024);
    subscriber
        .subscribe(path.filter.clone(), QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for_suback(&mut subscriber_loop).await;
    let publishers = args.publishers;
    let per_publisher = args.count / u64::from(publishers);
    let total = per_publisher * u64::from(publishers);
    let receiving = tokio::spawn(async move {
        let mut next = vec![0u64; publishers as usize];
        let mut received = 0;
        while received < total {
            if let Event::Incoming(Packet::Publish(publish)) = subscriber_loop.poll().await.unwrap()
            {
                let publisher = u32::from_le_bytes(publish.payload[..4].try_into().unwrap());
                let number = u64::from_le_bytes(publish.payload[4..12].try_into().unwrap());
                let expected = &mut next[publisher as usize];
                assert_eq!(
                    number, *expected,
                    "publisher {publisher}: out of order or lost"
                );
                *expected += 1;
                received += 1;
            }
        }
        Instant::now()
    });
    let started = Instant::now();
    let mut sending = Vec::new();
    for publisher in 0..publishers {
        let (client, mut events) = AsyncClient::new((path.client)(Some(publisher)), 1024);
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let size = args.size.max(12);
        let topic = (path.topic)(publisher);
        sending.push(tokio::spawn(async move {
            for number in 0..per_publisher {
                let mut payload = vec![0x5a; size];
                payload[..4].copy_from_slice(&publisher.to_le_bytes());
                payload[4..12].copy_from_slice(&number.to_le_bytes());
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
        }));
    }
    for publisher in sending {
        publisher.await.unwrap();
    }
    let finished = receiving.await.unwrap();
    let seconds = (finished - started).as_secs_f64();
    println!(
        "{total} messages of {} B at QoS 1 from {publishers} publisher(s), {}, {} in flight \
         each: {:.0} msg/s end to end ({seconds:.2} s)",
        args.size,
        path.what,
        args.inflight,
        total as f64 / seconds
    );
}

fn storm_client_id(client: u32) -> String {
    format!("spool-load-storm-{client}")
}

fn storm_topic(client: u32) -> String {
    format!("spool-load/storm/{client}")
}

fn storm_options(args: &Args, client: u32) -> MqttOptions {
    let mut options = options(args, &storm_client_id(client));
    options.set_clean_session(false);
    options
}

/// Makes the persistent sessions and queues one message for each while they are offline.
async fn storm_prepare(args: &Args) {
    let mut sessions = Vec::new();
    for client in 0..args.clients {
        sessions.push(tokio::spawn(make_session(
            storm_options(args, client),
            client,
        )));
    }
    for session in sessions {
        session.await.unwrap();
    }
    let (publisher, mut events) = AsyncClient::new(options(args, "spool-load-storm-pub"), 1024);
    let clients = args.clients;
    let sender = publisher.clone();
    tokio::spawn(async move {
        for client in 0..clients {
            sender
                .publish(storm_topic(client), QoS::AtLeastOnce, false, vec![0x5a; 64])
                .await
                .unwrap();
        }
    });
    let mut acknowledged = 0;
    while acknowledged < clients {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
            acknowledged += 1;
        }
    }
    publisher.disconnect().await.unwrap();
    while events.poll().await.is_ok() {}
    println!(
        "prepared {clients} persistent sessions, each with one message waiting; restart the \
         broker, then run --phase reconnect"
    );
}

/// Connects a persistent session, subscribes it, and disconnects.
async fn make_session(options: MqttOptions, client: u32) {
    let (session, mut events) = AsyncClient::new(options, 16);
    session
        .subscribe(storm_topic(client), QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for_suback(&mut events).await;
    session.disconnect().await.unwrap();
    while events.poll().await.is_ok() {}
}

async fn storm_reconnect(args: &Args) {
    let started = Instant::now();
    let mut clients = Vec::new();
    for client in 0..args.clients {
        clients.push(tokio::spawn(reconnect_one(
            storm_options(args, client),
            client,
            started,
        )));
    }
    let mut ready = Vec::new();
    for client in clients {
        ready.push(client.await.unwrap());
    }
    ready.sort();
    let quantile = |q: f64| ready[((ready.len() - 1) as f64 * q).round() as usize];
    println!(
        "{} persistent clients reconnecting at once: all subscribed and receiving after \
         {:.2} s (p50 {:.2} s, p99 {:.2} s)",
        args.clients,
        quantile(1.0).as_secs_f64(),
        quantile(0.5).as_secs_f64(),
        quantile(0.99).as_secs_f64(),
    );
}

/// Reconnects one persistent session (retrying until the broker is up), subscribes again, and
/// returns when it has both its SUBACK and the message queued for it.
async fn reconnect_one(options: MqttOptions, client: u32, started: Instant) -> Duration {
    let (session, mut events) = AsyncClient::new(options, 16);
    session
        .subscribe(storm_topic(client), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (mut subscribed, mut received) = (false, false);
    while !(subscribed && received) {
        match events.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => subscribed = true,
            Ok(Event::Incoming(Packet::Publish(_))) => received = true,
            Ok(_) => {}
            // The broker is not up yet, or is refusing while it starts: try again shortly.
            Err(ConnectionError::Io(_) | ConnectionError::ConnectionRefused(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("client {client}: {e}"),
        }
    }
    let ready = started.elapsed();
    // Lets the PUBACK and the DISCONNECT go out, so the session is left with nothing queued.
    session.disconnect().await.unwrap();
    while events.poll().await.is_ok() {}
    ready
}
