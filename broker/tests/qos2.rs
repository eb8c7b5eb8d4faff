//! QoS 2, exactly once, both ways: a publish is logged once per packet id however often the
//! client resends it, across reconnects and SIGKILL restarts; towards a subscriber, the
//! packet id survives a restart and a received message is released (PUBREL), not resent.
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    PUBACK, PUBCOMP, PUBREC, PUBREL, Spool, ack, connect, connect_v5, connect_v311, options,
    publish_v5, publish_v311, raw_connect, read_packet, subscribe_v311,
};
use rumqttc::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects over raw TCP and checks the CONNACK's session-present flag.
async fn connect_raw(spool: &Spool, client_id: &str, present: bool) -> TcpStream {
    let (stream, connack) = raw_connect(spool.addr, &connect_v311(client_id, false)).await;
    assert_eq!(connack, vec![u8::from(present), 0], "{client_id}");
    stream
}

/// A new persistent session "sub" subscribed to `q2/t` at QoS 2.
async fn qos2_subscriber(spool: &Spool) -> TcpStream {
    let mut subscriber = connect_raw(spool, "sub", false).await;
    subscriber
        .write_all(&subscribe_v311(1, "q2/t", 2))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut subscriber).await, (0x90, vec![0, 1, 2]));
    subscriber
}

/// Sends `packet` and checks that `expected` (kind, packet id) comes back.
async fn exchange(stream: &mut TcpStream, packet: &[u8], expected: (u8, u16)) {
    stream.write_all(packet).await.unwrap();
    let (kind, body) = read_packet(stream).await;
    assert_eq!(
        (kind, u16::from_be_bytes([body[0], body[1]])),
        expected,
        "{body:?}"
    );
}

/// Reads a QoS 2 PUBLISH (DUP may be set): its packet id and payload.
async fn read_qos2_publish(stream: &mut TcpStream, topic: &str) -> (u16, Vec<u8>) {
    let (kind, body) = read_packet(stream).await;
    assert_eq!(kind & !0x08, 0x34, "a QoS 2 PUBLISH");
    let at = 2 + topic.len();
    assert_eq!(&body[2..at], topic.as_bytes());
    (
        u16::from_be_bytes([body[at], body[at + 1]]),
        body[at + 2..].to_vec(),
    )
}

/// Publishes at QoS 2 through the whole exchange: PUBREC, then PUBREL and PUBCOMP.
async fn publish_exactly_once(publisher: &mut TcpStream, publish: &[u8], packet_id: u16) {
    exchange(publisher, publish, (PUBREC, packet_id)).await;
    exchange(publisher, &ack(PUBREL, packet_id), (PUBCOMP, packet_id)).await;
}

/// Expects the PUBREL of `packet_id` next and answers it with PUBCOMP.
async fn complete_release(subscriber: &mut TcpStream, packet_id: u16) {
    let (kind, body) = read_packet(subscriber).await;
    assert_eq!((kind, body), (PUBREL, packet_id.to_be_bytes().to_vec()));
    subscriber
        .write_all(&ack(PUBCOMP, packet_id))
        .await
        .unwrap();
}

/// Sends PINGREQ and waits for PINGRESP: everything sent before has been handled.
async fn ping(stream: &mut TcpStream) {
    stream.write_all(&[0xC0, 0]).await.unwrap();
    assert_eq!(read_packet(stream).await, (0xD0, vec![]));
}

/// Nothing more arrives on `stream` within half a second.
async fn assert_quiet(stream: &mut TcpStream) {
    let more = tokio::time::timeout(Duration::from_millis(500), read_packet(stream)).await;
    if let Ok((kind, body)) = more {
        panic!("unexpected packet {kind:#04x} {body:?}");
    }
}

#[tokio::test]
async fn qos2_messages_arrive_once_and_in_order_with_rumqttc() {
    // Goal: a real client publishing at QoS 2 to a QoS 2 subscription gets every PUBCOMP, and
    // the subscriber gets every message once, in order, at QoS 2.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "q2-sub", true));
    subscriber.connected().await;
    subscriber.subscribe("q2/#", QoS::ExactlyOnce).await;
    let mut publisher = connect(options(spool.addr, "q2-pub", true));
    publisher.connected().await;
    for i in 0..200u32 {
        publisher
            .publish("q2/n", QoS::ExactlyOnce, i.to_be_bytes().to_vec())
            .await;
    }
    publisher.acks(200).await;
    let seen = subscriber.publishes(200).await;
    for (i, publish) in seen.iter().enumerate() {
        assert_eq!(publish.qos, QoS::ExactlyOnce);
        assert_eq!(
            publish.payload.as_ref(),
            &u32::try_from(i).unwrap().to_be_bytes()
        );
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), subscriber.publishes(1)).await;
    assert!(extra.is_err(), "a message arrived twice");
}

/// A publisher's QoS 2 publish is PUBREC'd, spool is killed `after` that, and the publisher
/// resends it (DUP, same packet id) to the restarted spool, then reuses the id once released.
async fn resend_across_a_restart(after: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    drop(qos2_subscriber(&spool).await);

    let mut publisher = connect_raw(&spool, "pub", false).await;
    let first = publish_v311(2, false, 7, "q2/t", b"first");
    exchange(&mut publisher, &first, (PUBREC, 7)).await;
    tokio::time::sleep(after).await;
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    let mut publisher = connect_raw(&spool, "pub", true).await;
    let resent = publish_v311(2, true, 7, "q2/t", b"first");
    exchange(&mut publisher, &resent, (PUBREC, 7)).await;
    exchange(&mut publisher, &ack(PUBREL, 7), (PUBCOMP, 7)).await;
    let second = publish_v311(2, false, 7, "q2/t", b"second");
    publish_exactly_once(&mut publisher, &second, 7).await;

    let mut subscriber = connect_raw(&spool, "sub", true).await;
    let mut packet_ids = Vec::new();
    for expected in [&b"first"[..], b"second"] {
        let (packet_id, payload) = read_qos2_publish(&mut subscriber, "q2/t").await;
        assert_eq!(payload, expected);
        packet_ids.push(packet_id);
    }
    for packet_id in packet_ids {
        exchange(
            &mut subscriber,
            &ack(PUBREC, packet_id),
            (PUBREL, packet_id),
        )
        .await;
        subscriber
            .write_all(&ack(PUBCOMP, packet_id))
            .await
            .unwrap();
    }
    assert_quiet(&mut subscriber).await;
}

#[tokio::test]
async fn a_resent_qos2_publish_is_logged_once_across_a_restart() {
    // Goal: exactly once holds when spool dies right after the PUBREC (the receipt is rebuilt
    // from the log) and after its periodic commit (the receipt is read from the metadata
    // store). Keeping receipts only in memory, or only per connection, delivers "first" twice.
    resend_across_a_restart(Duration::ZERO).await;
    resend_across_a_restart(Duration::from_millis(1500)).await;
}

#[tokio::test]
async fn a_received_qos2_message_is_released_not_resent_and_keeps_its_packet_id() {
    // Goal: a subscriber that has not answered a QoS 2 PUBLISH gets it again with the same
    // packet id after spool restarts (so a client holding that id drops the copy); once it
    // answered PUBREC, a reconnect brings the PUBREL again, not the message.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = qos2_subscriber(&spool).await;
    let mut publisher = connect_raw(&spool, "pub", false).await;
    // Two QoS 1 messages first, acknowledged and checkpointed, so that a packet id counter
    // restarting with the process would give "once" another id than before.
    for (packet_id, payload) in [(10, &b"warm-1"[..]), (11, b"warm-2")] {
        let warm = publish_v311(1, false, packet_id, "q2/t", payload);
        exchange(&mut publisher, &warm, (PUBACK, packet_id)).await;
        let (kind, body) = read_packet(&mut subscriber).await;
        assert_eq!((kind, &body[body.len() - payload.len()..]), (0x32, payload));
        let packet_id = u16::from_be_bytes([body[6], body[7]]);
        subscriber.write_all(&ack(PUBACK, packet_id)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let message = publish_v311(2, false, 1, "q2/t", b"once");
    publish_exactly_once(&mut publisher, &message, 1).await;
    let (packet_id, payload) = read_qos2_publish(&mut subscriber, "q2/t").await;
    assert_eq!(payload, b"once");
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect_raw(&spool, "sub", true).await;
    let (again, payload) = read_qos2_publish(&mut subscriber, "q2/t").await;
    assert_eq!((again, payload.as_slice()), (packet_id, &b"once"[..]));
    exchange(
        &mut subscriber,
        &ack(PUBREC, packet_id),
        (PUBREL, packet_id),
    )
    .await;
    drop(subscriber);

    let mut subscriber = connect_raw(&spool, "sub", true).await;
    complete_release(&mut subscriber, packet_id).await;
    // The PINGRESP proves the PUBCOMP was handled before the next connection takes over.
    ping(&mut subscriber).await;
    drop(subscriber);
    let mut subscriber = connect_raw(&spool, "sub", true).await;
    assert_quiet(&mut subscriber).await;
}

#[tokio::test]
async fn a_received_qos2_message_is_released_not_resent_after_a_crash() {
    // Goal: once a persistent subscriber answered PUBREC, no crash makes spool send the
    // message again (the client may have passed it on): the PUBREC is logged before the
    // PUBREL goes out. Crashes with the PUBCOMP still owed, then right after it (before the
    // checkpoint commit that would forget the message).
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = qos2_subscriber(&spool).await;
    let mut publisher = connect_raw(&spool, "pub", false).await;
    let message = publish_v311(2, false, 1, "q2/t", b"once");
    publish_exactly_once(&mut publisher, &message, 1).await;
    let (packet_id, _) = read_qos2_publish(&mut subscriber, "q2/t").await;
    exchange(
        &mut subscriber,
        &ack(PUBREC, packet_id),
        (PUBREL, packet_id),
    )
    .await;
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect_raw(&spool, "sub", true).await;
    complete_release(&mut subscriber, packet_id).await;
    ping(&mut subscriber).await; // the PUBCOMP was handled
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect_raw(&spool, "sub", true).await;
    // The PUBREL may come once more (the client answers PUBCOMP, as MQTT requires even for an
    // id it no longer holds); the message must not.
    let wait = Duration::from_millis(500);
    while let Ok((kind, body)) = tokio::time::timeout(wait, read_packet(&mut subscriber)).await {
        assert_eq!((kind, &body), (PUBREL, &packet_id.to_be_bytes().to_vec()));
        subscriber
            .write_all(&ack(PUBCOMP, packet_id))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_retained_qos2_copy_is_logged_for_a_persistent_subscriber() {
    // Goal: a retained message sent at QoS 2 to a new subscription of a persistent session
    // survives a crash like any other delivery: after the client's PUBREC, the restart brings
    // the PUBREL (the client still holds the packet id), not silence.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut publisher = connect_raw(&spool, "pub", false).await;
    let mut retained = publish_v311(2, false, 1, "q2/t", b"state");
    retained[0] |= 0x01; // RETAIN
    publish_exactly_once(&mut publisher, &retained, 1).await;
    let mut subscriber = qos2_subscriber(&spool).await;
    let (kind, body) = read_packet(&mut subscriber).await;
    assert_eq!(kind & !0x08, 0x35, "a retained QoS 2 PUBLISH");
    assert!(body.ends_with(b"state"));
    let packet_id = u16::from_be_bytes([body[6], body[7]]);
    exchange(
        &mut subscriber,
        &ack(PUBREC, packet_id),
        (PUBREL, packet_id),
    )
    .await;
    spool.kill();

    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect_raw(&spool, "sub", true).await;
    complete_release(&mut subscriber, packet_id).await;
    assert_quiet(&mut subscriber).await;
}

#[tokio::test]
async fn a_connection_held_back_at_the_log_quota_ends_when_its_session_is_taken_over() {
    // Goal: a 3.1.1 publisher waiting for room in the log (held back at the quota) stops when
    // a new connection takes its session over, instead of logging later a QoS 2 packet id
    // that only the old connection knew: the new one would take its own next publish with
    // that id for a resend, and lose it.
    // At QoS 1, the late publish would land after the successor's newer ones (law 2).
    held_back_until_taken_over(2).await;
    held_back_until_taken_over(1).await;
}

/// A 3.1.1 client "dev" publishes at `qos` while the log is at its quota; a new connection
/// takes its session over; the old connection must end.
async fn held_back_until_taken_over(qos: u8) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &common::SMALL_LOG);
    // An offline persistent subscriber keeps what is published: 50 × 60 KB fill the quota,
    // so the log has no room for one more record of that size.
    let mut sink = connect_raw(&spool, "sink", false).await;
    sink.write_all(&subscribe_v311(1, "fill", 1)).await.unwrap();
    assert_eq!(read_packet(&mut sink).await.0, 0x90);
    drop(sink);
    let mut filler = connect_raw(&spool, "filler", false).await;
    for packet_id in 1..=50 {
        let fill = publish_v311(1, false, packet_id, "fill", &[0; 60_000]);
        filler.write_all(&fill).await.unwrap();
    }
    // Once the PUBACKs stop coming, the filler is held back: the log is at its quota.
    let mut acknowledged = 0;
    let wait = Duration::from_millis(500);
    while let Ok((kind, _)) = tokio::time::timeout(wait, read_packet(&mut filler)).await {
        assert_eq!(kind, PUBACK);
        acknowledged += 1;
    }
    assert!(acknowledged < 50, "the quota was never reached");
    let mut old = connect_raw(&spool, "dev", false).await;
    old.write_all(&publish_v311(qos, false, 7, "q2/t", &[1; 60_000]))
        .await
        .unwrap();
    assert_quiet(&mut old).await; // held back: no PUBACK or PUBREC
    let _new = connect_raw(&spool, "dev", true).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), old.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the old connection ended: {closed:?}"
    );
}

#[tokio::test]
async fn an_mqtt5_client_beyond_the_receive_maximum_is_disconnected_with_0x93() {
    // Goal: the server's receive maximum bounds the QoS 2 publishes a client may leave
    // unreleased; a resend of one it holds is not a new one.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &["--max-inflight", "2"]);
    let (mut client, connack) = raw_connect(spool.addr, &connect_v5("greedy")).await;
    // Receive Maximum property (0x21) with value 2.
    assert!(connack.windows(3).any(|w| w == [0x21, 0, 2]), "{connack:?}");
    for packet_id in 1..=2 {
        let publish = publish_v5(2, false, packet_id, "q2/t", b"x");
        exchange(&mut client, &publish, (PUBREC, packet_id)).await;
    }
    exchange(
        &mut client,
        &publish_v5(2, true, 1, "q2/t", b"x"),
        (PUBREC, 1),
    )
    .await;
    // The publish beyond the limit, then more that the client sends before it reads the
    // DISCONNECT: spool must keep reading them for a moment instead of resetting the
    // connection, which would fail these writes and could destroy the DISCONNECT.
    let beyond = publish_v5(2, false, 3, "q2/t", b"x");
    client.write_all(&beyond).await.unwrap();
    for packet_id in 4..14 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let more = publish_v5(2, false, packet_id, "q2/t", b"x");
        client.write_all(&more).await.unwrap();
    }
    let (kind, body) = read_packet(&mut client).await;
    assert_eq!(
        (kind, body[0]),
        (0xE0, 0x93),
        "DISCONNECT, receive maximum exceeded"
    );

    // A PUBREL for an id the server does not hold: PUBCOMP with 0x92.
    let (mut client, _) = raw_connect(spool.addr, &connect_v5("stray")).await;
    client.write_all(&ack(PUBREL, 9)).await.unwrap();
    let (kind, body) = read_packet(&mut client).await;
    assert_eq!(
        (kind, &body[..3]),
        (PUBCOMP, &[0, 9, 0x92][..]),
        "packet id not found"
    );
}
