//! Will messages: published when a connection ends without a normal DISCONNECT, not after one;
//! MQTT 5 will delay holds it back, and a session resumed within the delay cancels it. Clients
//! are raw sockets, so a test can drop the connection abruptly.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Seen, Spool, connect, field, options, packet, raw_connect, varint};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// CONNECT with a QoS 1 will on `topic`. MQTT 5 when `v5` is `Some((will_delay_secs,
/// session_expiry_secs))`, else 3.1.1; clean start either way.
fn connect_with_will(
    client_id: &str,
    topic: &str,
    payload: &[u8],
    v5: Option<(u32, u32)>,
) -> Vec<u8> {
    let mut body = Vec::new();
    field(b"MQTT", &mut body);
    body.push(if v5.is_some() { 5 } else { 4 });
    body.extend_from_slice(&[0x02 | 0x04 | 1 << 3, 0, 60]);
    if let Some((_, expiry)) = v5 {
        body.extend_from_slice(&[5, 0x11]);
        body.extend_from_slice(&expiry.to_be_bytes());
    }
    field(client_id.as_bytes(), &mut body);
    if let Some((delay, _)) = v5 {
        let mut properties = vec![0x18];
        properties.extend_from_slice(&delay.to_be_bytes());
        varint(properties.len(), &mut body);
        body.extend_from_slice(&properties);
    }
    field(topic.as_bytes(), &mut body);
    field(payload, &mut body);
    packet(0x10, &body)
}

async fn connect_raw(addr: SocketAddr, connect: &[u8]) -> TcpStream {
    let (stream, connack) = raw_connect(addr, connect).await;
    assert_eq!(connack[1], 0, "accepted");
    stream
}

/// A subscriber to `will/#`; returns the payloads it receives within `wait`.
async fn wills_within(watcher: &mut common::Client, wait: Duration) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, watcher.events.recv()).await {
        if let Seen::Publish(p) = event {
            seen.push(p.payload.to_vec());
        }
    }
    seen
}

async fn watcher(spool: &Spool) -> common::Client {
    let mut watcher = connect(options(spool.addr, "watcher", true));
    watcher.connected().await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    watcher
}

#[tokio::test]
async fn a_dropped_connection_publishes_its_will_and_a_disconnect_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut watcher = watcher(&spool).await;

    let dropped = connect_raw(spool.addr, &connect_with_will("d", "will/d", b"gone", None)).await;
    let mut polite = connect_raw(spool.addr, &connect_with_will("p", "will/p", b"bye", None)).await;
    polite.write_all(&[0xE0, 0]).await.unwrap(); // DISCONNECT
    drop(polite);
    drop(dropped);
    assert_eq!(
        wills_within(&mut watcher, Duration::from_secs(2)).await,
        vec![b"gone".to_vec()]
    );

    // MQTT 5: DISCONNECT with reason 0x04 asks for the will.
    let mut asks = connect_raw(
        spool.addr,
        &connect_with_will("a", "will/a", b"asked", Some((0, 0))),
    )
    .await;
    asks.write_all(&[0xE0, 1, 0x04]).await.unwrap();
    assert_eq!(
        wills_within(&mut watcher, Duration::from_secs(2)).await,
        vec![b"asked".to_vec()]
    );
}

#[tokio::test]
async fn v5_will_delay_holds_the_will_back_and_a_resumed_session_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut watcher = watcher(&spool).await;

    let delayed = connect_raw(
        spool.addr,
        &connect_with_will("late", "will/late", b"late", Some((2, 60))),
    )
    .await;
    drop(delayed);
    assert!(
        wills_within(&mut watcher, Duration::from_millis(1000))
            .await
            .is_empty(),
        "held back for its 2 s delay"
    );
    assert_eq!(
        wills_within(&mut watcher, Duration::from_secs(4)).await,
        vec![b"late".to_vec()]
    );

    let resumed = connect_raw(
        spool.addr,
        &connect_with_will("back", "will/back", b"back", Some((2, 60))),
    )
    .await;
    drop(resumed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The same client id again, resuming the session (clean start off).
    let mut body = Vec::new();
    field(b"MQTT", &mut body);
    body.extend_from_slice(&[5, 0, 0, 60, 5, 0x11, 0, 0, 0, 60]);
    field(b"back", &mut body);
    let _again = connect_raw(spool.addr, &packet(0x10, &body)).await;
    assert!(
        wills_within(&mut watcher, Duration::from_secs(4))
            .await
            .is_empty(),
        "the session resumed within the delay: no will"
    );

    // A delay longer than the session's expiry: the will goes when the session ends.
    let short = connect_raw(
        spool.addr,
        &connect_with_will("short", "will/short", b"short", Some((60, 1))),
    )
    .await;
    drop(short);
    assert_eq!(
        wills_within(&mut watcher, Duration::from_secs(5)).await,
        vec![b"short".to_vec()]
    );
}

#[tokio::test]
async fn an_invalid_will_topic_is_refused_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let connect = connect_with_will("bad", "will/#", b"x", Some((0, 0)));
    let (_, connack) = raw_connect(spool.addr, &connect).await;
    assert_eq!(connack[1], 0x90, "CONNACK: topic name invalid");
}

#[tokio::test]
async fn a_will_with_too_many_user_properties_is_refused_at_connect() {
    // Goal: a will is held to the same user-property limit as a PUBLISH (its log record counts
    // them in a u16): the CONNECT is refused with 0x83 instead of the will failing later.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut body = Vec::new();
    field(b"MQTT", &mut body);
    body.extend_from_slice(&[5, 0x02 | 0x04 | 1 << 3, 0, 60, 0]);
    field(b"crowded", &mut body);
    let mut properties = Vec::new();
    for _ in 0..2000 {
        properties.extend_from_slice(&[0x26, 0, 0, 0, 0]); // an empty user property
    }
    varint(properties.len(), &mut body);
    body.extend_from_slice(&properties);
    field(b"will/crowded", &mut body);
    field(b"x", &mut body);
    let (_, connack) = raw_connect(spool.addr, &packet(0x10, &body)).await;
    assert_eq!(connack[1], 0x83, "CONNACK: implementation specific");
}
