//! `spool-load`: an MQTT load generator with two workloads.
//!
//! `throughput` (the default): `--publishers` publishers send `--count` QoS 1 messages in all,
//! of `--size` bytes, each keeping `--inflight` unacknowledged, to one subscriber. It reports
//! messages per second end to end (first publish to last delivery) and checks that every
//! message arrived and that each publisher's messages arrived in the order sent.
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

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};

/// How long a run may take before it is called stuck.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Throughput,
    StormPrepare,
    StormReconnect,
}

#[derive(Debug, Clone)]
struct Args {
    workload: Workload,
    host: String,
    port: u16,
    count: u64,
    size: usize,
    inflight: u16,
    publishers: u32,
    clients: u32,
}

const USAGE: &str = "usage: spool-load [throughput] [--host H] [--port P] [--count N] [--size B] \
                     [--inflight N] [--publishers N]\n       spool-load storm --phase \
                     prepare|reconnect [--host H] [--port P] [--clients N]";

fn parse_args() -> Args {
    let mut args = Args {
        workload: Workload::Throughput,
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
    match words.peek().map(String::as_str) {
        Some("throughput") => drop(words.next()),
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
            other => panic!("unknown flag {other}\n{USAGE}"),
        }
    }
    args.workload = match (storm, phase.as_deref()) {
        (false, None) => Workload::Throughput,
        (true, Some("prepare")) => Workload::StormPrepare,
        (true, Some("reconnect")) => Workload::StormReconnect,
        _ => panic!("{USAGE}"),
    };
    assert!(args.publishers > 0 && args.clients > 0, "{USAGE}");
    args
}

fn options(args: &Args, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, args.host.clone(), args.port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(args.inflight);
    options.set_max_packet_size(1 << 20, 1 << 20);
    options
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let run = async {
        match args.workload {
            Workload::Throughput => throughput(&args).await,
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

async fn throughput(args: &Args) {
    let (subscriber, mut subscriber_loop) = AsyncClient::new(options(args, "spool-load-sub"), 1024);
    subscriber
        .subscribe("spool-load/t", QoS::AtLeastOnce)
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
        let (client, mut events) =
            AsyncClient::new(options(args, &format!("spool-load-pub-{publisher}")), 1024);
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let size = args.size.max(12);
        sending.push(tokio::spawn(async move {
            for number in 0..per_publisher {
                let mut payload = vec![0x5a; size];
                payload[..4].copy_from_slice(&publisher.to_le_bytes());
                payload[4..12].copy_from_slice(&number.to_le_bytes());
                client
                    .publish("spool-load/t", QoS::AtLeastOnce, false, payload)
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
        "{total} messages of {} B at QoS 1 from {publishers} publisher(s), {} in flight each: \
         {:.0} msg/s end to end ({seconds:.2} s)",
        args.size,
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
