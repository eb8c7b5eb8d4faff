//! `spool-load`: an MQTT load generator. One publisher sends `--count` QoS 1 messages of
//! `--size` bytes, keeping `--inflight` unacknowledged, and one subscriber receives them; the
//! run reports messages per second end to end (first publish to last delivery) and checks that
//! every message arrived, in order.
//!
//! Run it against spool and against another broker on the same machine, one after the other:
//! `cargo run --release -p spool-bench --bin spool-load -- --port 1883`

#![allow(clippy::unwrap_used)] // a load generator: any failure should stop the run loudly

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};

struct Args {
    host: String,
    port: u16,
    count: u64,
    size: usize,
    inflight: u16,
}

fn parse_args() -> Args {
    let mut args = Args {
        host: "127.0.0.1".into(),
        port: 1883,
        count: 100_000,
        size: 256,
        inflight: 64,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--host" => args.host = value,
            "--port" => args.port = value.parse().unwrap(),
            "--count" => args.count = value.parse().unwrap(),
            "--size" => args.size = value.parse().unwrap(),
            "--inflight" => args.inflight = value.parse().unwrap(),
            other => panic!("unknown flag {other}; flags: --host --port --count --size --inflight"),
        }
    }
    args
}

fn options(args: &Args, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, args.host.clone(), args.port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(args.inflight);
    options.set_max_packet_size(1 << 20, 1 << 20);
    options
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    let (subscriber, mut subscriber_loop) =
        AsyncClient::new(options(&args, "spool-load-sub"), 1024);
    subscriber
        .subscribe("spool-load/t", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = subscriber_loop.poll().await.unwrap() {
            break;
        }
    }
    let count = args.count;
    let receiving = tokio::spawn(async move {
        let mut next = 0u64;
        while next < count {
            if let Event::Incoming(Packet::Publish(publish)) = subscriber_loop.poll().await.unwrap()
            {
                let number = u64::from_le_bytes(publish.payload[..8].try_into().unwrap());
                assert_eq!(number, next, "out of order or lost");
                next += 1;
            }
        }
        Instant::now()
    });
    let (publisher, mut publisher_loop) = AsyncClient::new(options(&args, "spool-load-pub"), 1024);
    tokio::spawn(async move { while publisher_loop.poll().await.is_ok() {} });
    let started = Instant::now();
    for number in 0..args.count {
        let mut payload = vec![0x5a; args.size.max(8)];
        payload[..8].copy_from_slice(&number.to_le_bytes());
        publisher
            .publish("spool-load/t", QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let finished = tokio::time::timeout(Duration::from_secs(600), receiving)
        .await
        .unwrap()
        .unwrap();
    let seconds = (finished - started).as_secs_f64();
    println!(
        "{} messages of {} B at QoS 1, {} in flight: {:.0} msg/s end to end ({seconds:.2} s)",
        args.count,
        args.size,
        args.inflight,
        args.count as f64 / seconds
    );
}
