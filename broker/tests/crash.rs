//! Durability and order across crashes, black-box: a real `spool serve` is killed with SIGKILL
//! and restarted on the same data directory while rumqttc clients publish and subscribe. What a
//! publisher saw acknowledged (PUBACK) must reach a persistent subscriber, in that publisher's
//! order, with no gap; duplicates are allowed (at least once) and counted.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Client, Seen, Spool, connect, options};
use rumqttc::QoS;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[tokio::test]
async fn persistent_session_survives_a_kill() {
    // Goal: a subscription made before a SIGKILL still routes after the restart, and messages
    // acknowledged before the kill while the subscriber was offline are delivered after it.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "sink", false));
    subscriber.connected().await;
    subscriber.subscribe("plant/#", QoS::AtLeastOnce).await;
    subscriber.client.disconnect().await.unwrap();
    let mut publisher = connect(options(spool.addr, "source", true));
    publisher.connected().await;
    publish_acknowledged(&mut publisher, "plant/a", 0..10).await;
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    let mut publisher = connect(options(spool.addr, "source", true));
    publisher.connected().await;
    publish_acknowledged(&mut publisher, "plant/b", 10..20).await;
    let mut subscriber = connect(options(spool.addr, "sink", false));
    assert!(
        subscriber.connected().await,
        "the session survived the kill"
    );
    let received = subscriber.publishes(20).await;
    let numbers: Vec<u64> = received.iter().map(|p| parse(&p.payload).1).collect();
    assert_eq!(numbers, (0..20).collect::<Vec<_>>());
}

/// Publishes QoS 1 messages numbered by `range` and waits for every PUBACK.
async fn publish_acknowledged(client: &mut Client, topic: &str, range: std::ops::Range<u64>) {
    let count = range.end - range.start;
    for n in range {
        client
            .publish(topic, QoS::AtLeastOnce, format!("0:{n}"))
            .await;
    }
    client.acks(count).await;
}

fn parse(payload: &[u8]) -> (u64, u64) {
    let text = std::str::from_utf8(payload).unwrap();
    let (publisher, number) = text.split_once(':').unwrap();
    (publisher.parse().unwrap(), number.parse().unwrap())
}

/// One publisher across broker lifetimes: it numbers its messages, counts PUBACKs (which come in
/// publish order), and after a reconnect resends from its first unacknowledged number, as a
/// real client would.
struct Publisher {
    id: u64,
    next: u64,
    acknowledged: u64,
}

impl Publisher {
    /// Publishes until the connection breaks or `until` passes; keeps at most 20 in flight.
    async fn run(&mut self, addr: SocketAddr, until: Instant) {
        let mut client = connect(options(addr, &format!("publisher-{}", self.id), true));
        if !matches!(client.next(10).await, Seen::ConnAck(_)) {
            return;
        }
        self.next = self.acknowledged;
        loop {
            while self.next < self.acknowledged + 20 && Instant::now() < until {
                let payload = format!("{}:{}", self.id, self.next);
                if client
                    .client
                    .try_publish("load/x", QoS::AtLeastOnce, false, payload)
                    .is_err()
                {
                    break;
                }
                self.next += 1;
            }
            let left = until.saturating_duration_since(Instant::now());
            let event =
                tokio::time::timeout(left.max(Duration::from_millis(1)), client.events.recv())
                    .await;
            match event {
                Ok(Some(Seen::PubAck(_))) => self.acknowledged += 1,
                Ok(Some(Seen::Disconnected(_)) | None) => return,
                Ok(Some(_)) => {}
                Err(_) if Instant::now() >= until => return,
                Err(_) => {}
            }
        }
    }
}

#[tokio::test]
async fn acknowledged_messages_survive_repeated_kills_in_publisher_order() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "sink", false));
    subscriber.connected().await;
    subscriber.subscribe("load/#", QoS::AtLeastOnce).await;
    drop(subscriber);
    let mut publishers: Vec<Publisher> = (0..3)
        .map(|id| Publisher {
            id,
            next: 0,
            acknowledged: 0,
        })
        .collect();
    for round in 0..4u64 {
        let until = Instant::now() + Duration::from_millis(300 + 150 * round);
        let addr = spool.addr;
        let runs = publishers.iter_mut().map(|p| p.run(addr, until));
        let kill_at = tokio::time::sleep_until((until - Duration::from_millis(100)).into());
        let ((), _) = tokio::join!(kill_at, futures_join_all(runs));
        spool.kill();
        spool = Spool::start(dir.path(), &[]);
        eprintln!("[{:?}] round {round} restarted", started.elapsed());
    }
    let expected: BTreeMap<u64, u64> = publishers.iter().map(|p| (p.id, p.acknowledged)).collect();
    eprintln!("[{:?}] publishing done: {expected:?}", started.elapsed());
    assert!(
        expected.values().all(|&n| n > 10),
        "too few acknowledged to mean anything: {expected:?}"
    );
    let mut subscriber = connect(options(spool.addr, "sink", false));
    assert!(subscriber.connected().await);
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut distinct: BTreeMap<u64, std::collections::HashSet<u64>> = BTreeMap::new();
    let mut duplicates = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while expected
        .iter()
        .any(|(p, &n)| distinct.get(p).map_or(0, |d| d.len()) < n as usize)
    {
        assert!(
            Instant::now() < deadline,
            "timed out; seen {:?}",
            summarize(&seen)
        );
        if let Seen::Publish(publish) = subscriber.next(30).await {
            let (publisher, number) = parse(&publish.payload);
            duplicates += usize::from(!distinct.entry(publisher).or_default().insert(number));
            seen.entry(publisher).or_default().push(number);
        }
    }
    for (publisher, &acknowledged) in &expected {
        let order = first_occurrences(seen.get(publisher));
        // Every acknowledged message, no gap, in order (first occurrences must count up).
        for (i, &number) in order.iter().enumerate().take(acknowledged as usize) {
            assert_eq!(
                number, i as u64,
                "publisher {publisher}: gap or reorder at {i}"
            );
        }
    }
    println!("delivered with {duplicates} duplicates; acknowledged per publisher {expected:?}");
}

fn first_occurrences(numbers: Option<&Vec<u64>>) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    numbers
        .into_iter()
        .flatten()
        .copied()
        .filter(|n| seen.insert(*n))
        .collect()
}

fn summarize(seen: &BTreeMap<u64, Vec<u64>>) -> Vec<(u64, usize)> {
    seen.iter().map(|(p, v)| (*p, v.len())).collect()
}

async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    futures::future::join_all(futures).await;
}
