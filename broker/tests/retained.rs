//! Retained messages: the last retained message of each topic reaches every later matching
//! subscription with RETAIN set, an empty retained publish clears it, retained messages survive
//! a crash (they are durable once acknowledged), and MQTT 5 retain handling is honoured.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Seen, Spool, connect, connect_v5, options, raw_connect, read_packet, subscribe_v5};
use rumqttc::QoS;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Subscribes a fresh clean client to `filter` and returns the retained messages it gets, as
/// (topic, payload, retain flag), sorted by topic.
async fn retained_seen(
    spool: &Spool,
    client_id: &str,
    filter: &str,
) -> Vec<(String, Vec<u8>, bool)> {
    let mut client = connect(options(spool.addr, client_id, true));
    client.connected().await;
    client.subscribe(filter, QoS::AtLeastOnce).await;
    let mut seen = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), client.events.recv()).await
    {
        if let Seen::Publish(p) = event {
            seen.push((p.topic.clone(), p.payload.to_vec(), p.retain));
        }
    }
    seen.sort();
    seen
}

async fn publish_retained(spool: &Spool, topic: &str, payload: &[u8]) {
    let mut publisher = connect(options(spool.addr, "retainer", true));
    publisher.connected().await;
    publisher
        .client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        .await
        .unwrap();
    publisher.acks(1).await;
}

#[tokio::test]
async fn later_subscribers_get_the_last_retained_message_and_an_empty_one_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut live = connect(options(spool.addr, "live", true));
    live.connected().await;
    live.subscribe("r/#", QoS::AtLeastOnce).await;

    publish_retained(&spool, "r/a", b"first").await;
    publish_retained(&spool, "r/a", b"second").await;
    publish_retained(&spool, "r/b", b"other").await;
    let live_seen = live.publishes(3).await;
    assert!(
        live_seen.iter().all(|p| !p.retain),
        "a live delivery clears RETAIN (3.1.1, and MQTT 5 without retain-as-published)"
    );

    assert_eq!(
        retained_seen(&spool, "late", "r/+").await,
        vec![
            ("r/a".to_string(), b"second".to_vec(), true),
            ("r/b".to_string(), b"other".to_vec(), true),
        ]
    );
    assert_eq!(
        retained_seen(&spool, "exact", "r/b").await,
        vec![("r/b".to_string(), b"other".to_vec(), true)]
    );

    publish_retained(&spool, "r/a", b"").await;
    assert_eq!(
        retained_seen(&spool, "after-clear", "r/#").await,
        vec![("r/b".to_string(), b"other".to_vec(), true)]
    );
}

#[tokio::test]
async fn retained_messages_survive_a_crash_right_after_their_puback() {
    // Goal: a retained message is durable once acknowledged: killed before the hub's periodic
    // commit, spool rebuilds it from the log; killed after, from the metadata store.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    publish_retained(&spool, "state/a", b"from the log").await;
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    assert_eq!(
        retained_seen(&spool, "check-1", "state/#").await,
        vec![("state/a".to_string(), b"from the log".to_vec(), true)]
    );
    publish_retained(&spool, "state/b", b"second").await;
    publish_retained(&spool, "state/a", b"").await;
    // Past the once-a-second commit of retained messages and checkpoints.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    assert_eq!(
        retained_seen(&spool, "check-2", "state/#").await,
        vec![("state/b".to_string(), b"second".to_vec(), true)]
    );
}

/// Subscribes `stream` with a raw MQTT 5 options byte; returns how many PUBLISH packets arrive
/// within half a second after the SUBACK.
async fn v5_subscribe_count(stream: &mut TcpStream, packet_id: u16, options: u8) -> usize {
    stream
        .write_all(&subscribe_v5(packet_id, "h/#", options))
        .await
        .unwrap();
    let (kind, _) = read_packet(stream).await;
    assert_eq!(kind, 0x90, "SUBACK first");
    let mut publishes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok((kind, body)) = tokio::time::timeout_at(deadline, read_packet(stream)).await {
        assert_eq!(kind & 0xf1, 0x31, "a PUBLISH with RETAIN set");
        if kind & 0x06 != 0 {
            // QoS 1: acknowledge it (packet id after the topic).
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let id = &body[2 + topic_len..4 + topic_len];
            stream.write_all(&[0x40, 2, id[0], id[1]]).await.unwrap();
        }
        publishes += 1;
    }
    publishes
}

#[tokio::test]
async fn v5_retain_handling_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    publish_retained(&spool, "h/x", b"kept").await;
    let (mut stream, connack) = raw_connect(spool.addr, &connect_v5("v5-retain")).await;
    assert_eq!(connack[1], 0, "accepted");

    let qos1 = 1;
    assert_eq!(
        v5_subscribe_count(&mut stream, 1, qos1 | 2 << 4).await,
        0,
        "2: never"
    );
    assert_eq!(
        v5_subscribe_count(&mut stream, 2, qos1 | 1 << 4).await,
        0,
        "1: only for a new subscription, and h/# exists now"
    );
    assert_eq!(
        v5_subscribe_count(&mut stream, 3, qos1).await,
        1,
        "0: always"
    );
}
