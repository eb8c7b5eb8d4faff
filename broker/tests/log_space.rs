//! The log's space, black-box: what one queue holds costs its own bytes, not everything written
//! after it. A real `spool serve` with a small quota carries many times that quota between
//! online clients while one message waits for an offline persistent session, which then gets
//! it, also after a SIGKILL and restart.
#![allow(clippy::unwrap_used)]

mod common;

use common::{SMALL_LOG, Spool, connect, options};
use rumqttc::QoS;
use std::time::Duration;

/// 10 KB messages: ten times the quota in all.
const FLOW_MESSAGES: u64 = 2600;
const FLOW_MESSAGE_BYTES: usize = 10_000;

#[tokio::test]
async fn one_waiting_message_does_not_hold_the_log_for_everyone() {
    // Goal: one message parked for an offline persistent session does not stop the hub at its
    // quota (as it did while old segments were freed only when no queue needed anything in
    // them): the flow between online clients completes, in order, and the parked message is
    // delivered when its session returns.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &SMALL_LOG);
    park_one_message(&spool).await;
    flow_many_times_the_quota(&spool).await;
    assert_parked_message_arrives(&spool).await;
}

#[tokio::test]
async fn the_waiting_message_survives_a_kill_after_its_segment_is_gone() {
    // Goal: as above, with a SIGKILL and a restart between the flow and the session's return:
    // the parked message, moved out of the segments that were freed, is still delivered.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &SMALL_LOG);
    park_one_message(&spool).await;
    flow_many_times_the_quota(&spool).await;
    // Give the hub a reclaim and a checkpoint after the flow, as it would have in service.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    spool.kill();
    let moved = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "moved")
        })
        .count();
    assert_eq!(moved, 1, "the parked message was moved out of its segment");
    let spool = Spool::start(dir.path(), &SMALL_LOG);
    assert_parked_message_arrives(&spool).await;
}

/// A persistent session subscribes and goes offline; one message is published for it.
async fn park_one_message(spool: &Spool) {
    let mut parked = connect(options(spool.addr, "parked", false));
    parked.connected().await;
    parked.subscribe("parked/t", QoS::AtLeastOnce).await;
    parked.client.disconnect().await.unwrap();
    let mut publisher = connect(options(spool.addr, "parker", true));
    publisher.connected().await;
    publisher
        .publish("parked/t", QoS::AtLeastOnce, b"the parked one".to_vec())
        .await;
    publisher.acks(1).await;
}

/// Ten times the quota from one client to another, every message acknowledged and received
/// in order.
async fn flow_many_times_the_quota(spool: &Spool) {
    let mut receiver = connect(options(spool.addr, "receiver", true));
    receiver.connected().await;
    receiver.subscribe("flow/t", QoS::AtLeastOnce).await;
    let mut sender = connect(options(spool.addr, "sender", true));
    sender.connected().await;
    let sending = tokio::spawn(async move {
        for number in 0..FLOW_MESSAGES {
            let mut payload = vec![0x5a; FLOW_MESSAGE_BYTES];
            payload[..8].copy_from_slice(&number.to_le_bytes());
            sender.publish("flow/t", QoS::AtLeastOnce, payload).await;
        }
        sender.acks(FLOW_MESSAGES).await;
    });
    for expected in 0..FLOW_MESSAGES {
        let publish = receiver.publishes(1).await.remove(0);
        let number = u64::from_le_bytes(publish.payload[..8].try_into().unwrap());
        assert_eq!(number, expected, "out of order or lost");
    }
    tokio::time::timeout(Duration::from_secs(60), sending)
        .await
        .expect("every publish acknowledged")
        .unwrap();
}

async fn assert_parked_message_arrives(spool: &Spool) {
    let mut parked = connect(options(spool.addr, "parked", false));
    assert!(parked.connected().await, "the session is still there");
    let publish = parked.publishes(1).await.remove(0);
    assert_eq!(&publish.payload[..], b"the parked one");
}
