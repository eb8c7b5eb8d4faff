//! SIGTERM, as Kubernetes sends it before moving the pod: spool stops reading, acknowledges every
//! publish it already logged, tells MQTT 5 clients why it is going (DISCONNECT 0x8B), and
//! exits 0. Nothing acknowledged is lost, and nothing is logged without its acknowledgement.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Seen, Spool, StreamingPublisher, connect, connect_v5, options, raw_connect};
use rumqttc::QoS;
use std::time::Duration;

#[tokio::test]
async fn sigterm_acknowledges_what_was_logged_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "sink", false));
    subscriber.connected().await;
    subscriber.subscribe("drain", QoS::AtLeastOnce).await;
    subscriber.client.disconnect().await.unwrap();
    let (mut bystander, _) = raw_connect(spool.addr, &connect_v5("bystander")).await;
    let publisher = StreamingPublisher::start(spool.addr, "drain").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let status = spool.terminate();
    assert!(status.success(), "spool exited with {status}");
    let (kind, body) = common::read_packet(&mut bystander).await;
    assert_eq!((kind, body.first()), (0xE0, Some(&0x8B)), "DISCONNECT 0x8B");
    // Read to the end of the connection: every PUBACK spool sent before it exited.
    let acked = publisher
        .acknowledged_until_closed(Duration::from_secs(10))
        .await;
    let expected: Vec<u16> = (1..).take(acked.len()).collect();
    assert!(!acked.is_empty());
    assert_eq!(acked, expected, "PUBACKs in order, with no gap");

    // Every acknowledged message is delivered after the restart, and nothing more: what was
    // logged was acknowledged before the exit.
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "sink", false));
    assert!(subscriber.connected().await, "the session survived");
    let received: Vec<u16> = subscriber
        .publishes(acked.len())
        .await
        .iter()
        .map(|p| u16::from_be_bytes([p.payload[0], p.payload[1]]))
        .collect();
    assert_eq!(received, expected);
    let more = tokio::time::timeout(Duration::from_millis(500), subscriber.next(1)).await;
    assert!(
        !matches!(more, Ok(Seen::Publish(_))),
        "a message logged but never acknowledged: {more:?}"
    );
    eprintln!("{} messages acknowledged before SIGTERM", acked.len());
}
