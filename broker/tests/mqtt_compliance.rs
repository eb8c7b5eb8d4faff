//! MQTT protocol behaviour, black-box: a real `spool serve` and rumqttc clients. Delivery at
//! each QoS and in order, wildcards, sessions kept across reconnects, takeover, oversized and
//! malformed input. (Storage and restarts are in `crash.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use common::{Seen, Spool, connect, options, packet, varint};
use rumqttc::QoS;
use std::io::{Read, Write};
use std::time::Duration;

fn payload(i: usize) -> Vec<u8> {
    format!("message {i}").into_bytes()
}

#[tokio::test]
async fn qos1_messages_arrive_in_order_with_wildcards() {
    // Goal: what one publisher sends at QoS 1 reaches a wildcard subscriber, all of it, in order.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "sub", true));
    subscriber.connected().await;
    subscriber
        .subscribe("sensors/+/temperature", QoS::AtLeastOnce)
        .await;
    let mut publisher = connect(options(spool.addr, "pub", true));
    publisher.connected().await;
    for i in 0..200 {
        let topic = format!("sensors/{}/temperature", i % 3);
        publisher
            .publish(&topic, QoS::AtLeastOnce, payload(i))
            .await;
    }
    publisher
        .publish("sensors/0/humidity", QoS::AtLeastOnce, "not matched")
        .await;
    let received = subscriber.publishes(200).await;
    for (i, publish) in received.iter().enumerate() {
        assert_eq!(publish.payload.as_ref(), payload(i).as_slice());
        assert_eq!(publish.qos, QoS::AtLeastOnce);
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), subscriber.publishes(1)).await;
    assert!(extra.is_err(), "a non-matching topic was delivered");
}

#[tokio::test]
async fn qos0_and_qos_downgrade() {
    // Goal: QoS 0 is delivered, and a QoS 1 publish to a QoS 0 subscription arrives at QoS 0.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "sub", true));
    subscriber.connected().await;
    subscriber.subscribe("t", QoS::AtMostOnce).await;
    let mut publisher = connect(options(spool.addr, "pub", true));
    publisher.connected().await;
    publisher.publish("t", QoS::AtMostOnce, "zero").await;
    publisher.publish("t", QoS::AtLeastOnce, "one").await;
    let received = subscriber.publishes(2).await;
    assert_eq!(received[0].payload.as_ref(), b"zero");
    assert_eq!(received[1].payload.as_ref(), b"one");
    assert!(received.iter().all(|p| p.qos == QoS::AtMostOnce));
}

#[tokio::test]
async fn puback_comes_back_for_every_qos1_publish() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut publisher = connect(options(spool.addr, "pub", true));
    publisher.connected().await;
    for i in 0..50 {
        publisher
            .publish("nobody/listens", QoS::AtLeastOnce, payload(i))
            .await;
    }
    publisher.acks(50).await;
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_messages_while_offline() {
    // Goal: a clean_session=false subscriber that disconnects gets, on reconnect, everything
    // published meanwhile, in order, and the broker says the session was present.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = connect(options(spool.addr, "durable-sub", false));
    assert!(!subscriber.connected().await);
    subscriber.subscribe("orders/#", QoS::AtLeastOnce).await;
    subscriber.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut publisher = connect(options(spool.addr, "pub", true));
    publisher.connected().await;
    for i in 0..30 {
        publisher
            .publish("orders/new", QoS::AtLeastOnce, payload(i))
            .await;
    }
    publisher.acks(30).await;
    let mut subscriber = connect(options(spool.addr, "durable-sub", false));
    assert!(subscriber.connected().await, "session_present must be set");
    let received = subscriber.publishes(30).await;
    for (i, publish) in received.iter().enumerate() {
        assert_eq!(publish.payload.as_ref(), payload(i).as_slice());
    }
}

#[tokio::test]
async fn an_offline_session_beyond_its_queue_limit_keeps_the_newest_messages() {
    // Goal: the per-session limits, in messages and in bytes, bound what waits for an offline
    // client: beyond them the oldest messages go (`queue_full`) and the newest arrive, in
    // order, also when the queue is rebuilt from the log after a crash.
    keeps_the_newest_ten(&["--session-queue-max", "10"]).await;
    // Ten two-digit messages, as a queue counts them (their own bytes, not the record's).
    let message = spool_broker::message::Message {
        topic: "events/door".into(),
        payload: payload(10).into(),
        qos: spool_broker::message::QoS::AtLeastOnce,
        retain: false,
        properties: spool_broker::message::MessageProperties::default(),
    };
    let ten_messages = (10 * message.size_bytes()).to_string();
    keeps_the_newest_ten(&["--session-queue-max-bytes", &ten_messages]).await;
}

async fn keeps_the_newest_ten(limit: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::start(dir.path(), limit);
    let mut subscriber = connect(options(spool.addr, "dead-letter", false));
    subscriber.connected().await;
    subscriber.subscribe("events/#", QoS::AtLeastOnce).await;
    leave(subscriber).await;
    for (round, range) in [(0, 0..25), (1, 25..50)] {
        // A witness of a marker published after the messages: once it has the marker, the hub
        // has queued every message before it (it applies records in log order), so the
        // session's limit was applied before the session is resumed.
        let mut witness = connect(options(spool.addr, "witness", true));
        witness.connected().await;
        witness.subscribe("marker", QoS::AtLeastOnce).await;
        let mut publisher = connect(options(spool.addr, "pub", true));
        publisher.connected().await;
        for i in range.clone() {
            publisher
                .publish("events/door", QoS::AtLeastOnce, payload(i))
                .await;
        }
        publisher
            .publish("marker", QoS::AtLeastOnce, "all sent")
            .await;
        publisher.acks(26).await;
        witness.publishes(1).await;
        if round == 1 {
            spool.kill();
            spool = Spool::start(dir.path(), limit);
        }
        let mut subscriber = connect(options(spool.addr, "dead-letter", false));
        assert!(subscriber.connected().await);
        let received = subscriber.publishes(10).await;
        let expected: Vec<Vec<u8>> = range.skip(15).map(payload).collect();
        let received: Vec<Vec<u8>> = received.iter().map(|p| p.payload.to_vec()).collect();
        assert_eq!(received, expected, "{limit:?}, round {round}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        leave(subscriber).await;
    }
}

/// Disconnects and waits until spool closed the connection: it told the hub first, so the
/// session is offline for whatever connects next (a fixed sleep was not always long enough on
/// a loaded machine, and the messages then went out to the leaving connection).
async fn leave(mut client: common::Client) {
    client.client.disconnect().await.unwrap();
    while !matches!(client.next(10).await, common::Seen::Disconnected(_)) {}
}

#[tokio::test]
async fn a_second_connection_takes_the_session_over() {
    // Goal: the same client id connecting again disconnects the first connection and keeps the
    // session's subscriptions (edgeHub lost them: iotedge #5292).
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut first = connect(options(spool.addr, "module-a", false));
    first.connected().await;
    first.subscribe("to/module-a", QoS::AtLeastOnce).await;
    let mut second = connect(options(spool.addr, "module-a", false));
    assert!(second.connected().await);
    loop {
        match first.next(10).await {
            Seen::Disconnected(_) => break,
            Seen::Publish(_) | Seen::PubAck(_) => {}
            other => panic!("expected the first connection to drop, got {other:?}"),
        }
    }
    let mut publisher = connect(options(spool.addr, "pub", true));
    publisher.connected().await;
    publisher
        .publish("to/module-a", QoS::AtLeastOnce, "still subscribed")
        .await;
    let received = second.publishes(1).await;
    assert_eq!(received[0].payload.as_ref(), b"still subscribed");
}

#[tokio::test]
async fn oversized_packet_ends_only_that_connection() {
    // Goal: a packet above the maximum closes that connection; everyone else keeps working.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &["--max-packet-size", "1024"]);
    let mut bystander = connect(options(spool.addr, "bystander", true));
    bystander.connected().await;
    bystander.subscribe("t", QoS::AtLeastOnce).await;
    let mut big = options(spool.addr, "big", true);
    big.set_max_packet_size(1 << 20, 1 << 20);
    let mut offender = connect(big);
    offender.connected().await;
    offender
        .publish("t", QoS::AtLeastOnce, vec![0u8; 4096])
        .await;
    loop {
        match offender.next(10).await {
            Seen::Disconnected(_) => break,
            Seen::PubAck(_) => panic!("an oversized publish was acknowledged"),
            _ => {}
        }
    }
    let mut publisher = connect(options(spool.addr, "pub", true));
    publisher.connected().await;
    publisher.publish("t", QoS::AtLeastOnce, "small").await;
    assert_eq!(bystander.publishes(1).await[0].payload.as_ref(), b"small");
}

#[test]
fn malformed_bytes_close_the_connection() {
    // Goal: garbage after a valid CONNECT closes that connection without taking the broker down.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut socket = std::net::TcpStream::connect(spool.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 60, client id "raw".
    socket
        .write_all(&[
            0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 3, b'r', b'a', b'w',
        ])
        .unwrap();
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    // A SUBSCRIBE with reserved flags 0000 (must be 0010): malformed.
    socket.write_all(&[0x80, 6, 0, 1, 0, 1, b't', 0]).unwrap();
    let mut rest = Vec::new();
    let read = socket.read_to_end(&mut rest);
    assert!(read.is_ok(), "the broker closes the connection: {read:?}");
    let mut other = std::net::TcpStream::connect(spool.addr).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    other
        .write_all(&[
            0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 3, b'o', b'k', b'!',
        ])
        .unwrap();
    other.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "the broker still serves others");
}

#[test]
fn too_many_user_properties_end_only_that_connection() {
    // Goal: a valid MQTT 5 PUBLISH beyond spool's user-property limit gets a DISCONNECT with
    // reason 0x83 (implementation specific) instead of crashing anything; others keep working.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut socket = std::net::TcpStream::connect(spool.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // CONNECT, MQTT 5, clean start, keep-alive 60, no properties, client id "v5".
    let connect = [
        0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 2, b'v', b'5',
    ];
    socket.write_all(&packet(0x10, &connect)).unwrap();
    let mut header = [0u8; 2];
    socket.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0x20, "CONNACK");
    let mut connack = vec![0u8; usize::from(header[1])];
    socket.read_exact(&mut connack).unwrap();
    assert_eq!(connack[1], 0, "accepted");
    // PUBLISH QoS 0 to "t" with 2000 empty user properties.
    let mut properties = Vec::new();
    for _ in 0..2000 {
        properties.extend_from_slice(&[0x26, 0, 0, 0, 0]);
    }
    let mut body = vec![0, 1, b't'];
    varint(properties.len(), &mut body);
    body.extend_from_slice(&properties);
    body.extend_from_slice(b"payload");
    socket.write_all(&packet(0x30, &body)).unwrap();
    let mut rest = Vec::new();
    let _ = socket.read_to_end(&mut rest);
    assert!(rest.len() >= 3, "expected a DISCONNECT, got {rest:?}");
    assert_eq!((rest[0], rest[2]), (0xE0, 0x83), "DISCONNECT with 0x83");
    let mut other = std::net::TcpStream::connect(spool.addr).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    other.write_all(&packet(0x10, &connect)).unwrap();
    other.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0x20, "the broker still serves others");
}

#[tokio::test]
async fn server_keep_alive_replaces_a_longer_one_and_is_enforced() {
    // Goal: with --max-keep-alive 1, an MQTT 5 client asking for 60 s is told 1 s in CONNACK
    // (server keep-alive, property 0x13) and is disconnected with 0x8D once silent for 1.5 s,
    // while an MQTT 3.1.1 client keeps its own keep-alive.
    use common::{connect_v5, connect_v311, raw_connect, read_packet};
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &["--max-keep-alive", "1"]);
    let (mut v5, connack) = raw_connect(spool.addr, &connect_v5("short")).await;
    assert!(connack.windows(3).any(|w| w == [0x13, 0, 1]), "{connack:?}");
    let (mut v311, connack) = raw_connect(spool.addr, &connect_v311("long", true)).await;
    assert_eq!(connack, vec![0, 0]);
    // read_packet waits 10 s: far less than the 90 s the client's own keep-alive allows.
    let (kind, body) = read_packet(&mut v5).await;
    assert_eq!(
        (kind, body[0]),
        (0xE0, 0x8D),
        "DISCONNECT, keep-alive timeout"
    );
    v311.write_all(&[0xC0, 0]).await.unwrap();
    assert_eq!(
        read_packet(&mut v311).await,
        (0xD0, vec![]),
        "still connected"
    );
}

#[tokio::test]
async fn a_new_session_beyond_the_session_limit_is_refused() {
    // Goal: with --max-sessions 2, persistent sessions count while offline; a third client id
    // is refused (MQTT 5: quota exceeded, 3.1.1: server unavailable), an existing one resumes,
    // and a slot freed by a clean disconnect is usable again.
    use common::{connect_v5, connect_v311, raw_connect};
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &["--max-sessions", "2"]);
    let connack = |client_id: &str, v5: bool, clean: bool| {
        let connect = if v5 {
            connect_v5(client_id)
        } else {
            connect_v311(client_id, clean)
        };
        async move {
            let (stream, connack) = raw_connect(spool.addr, &connect).await;
            (stream, connack[1])
        }
    };
    let (offline, accepted) = connack("kept", false, false).await;
    assert_eq!(accepted, 0);
    drop(offline);
    let (_online, accepted) = connack("online", false, true).await;
    assert_eq!(accepted, 0);
    assert_eq!(connack("third", true, true).await.1, 0x97, "quota exceeded");
    assert_eq!(
        connack("third", false, true).await.1,
        3,
        "server unavailable"
    );
    assert_eq!(
        connack("kept", false, false).await.1,
        0,
        "an existing session resumes"
    );
    let (mut kept, _) = connack("kept", false, true).await; // clean: the stored session ends
    kept.write_all(&[0xE0, 0]).await.unwrap();
    drop(kept);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(connack("third", false, true).await.1, 0, "a slot was freed");
}

#[tokio::test]
async fn a_v5_disconnect_can_change_the_session_expiry() {
    // Goal: MQTT 5 DISCONNECT's session expiry replaces the CONNECT's (Paho's
    // test_session_expiry), and one that would revive a session that ends with its connection
    // is a protocol error (§3.14.2.2.2).
    use common::{field, raw_connect, read_packet};
    use tokio::io::AsyncWriteExt;
    fn connect(client_id: &str, clean_start: bool, expiry: u32) -> Vec<u8> {
        let mut body = Vec::new();
        field(b"MQTT", &mut body);
        body.extend_from_slice(&[5, if clean_start { 2 } else { 0 }, 0, 60, 5, 0x11]);
        body.extend_from_slice(&expiry.to_be_bytes());
        field(client_id.as_bytes(), &mut body);
        packet(0x10, &body)
    }
    let disconnect_with_expiry = |expiry: u32| {
        let mut body = vec![0, 5, 0x11];
        body.extend_from_slice(&expiry.to_be_bytes());
        packet(0xE0, &body)
    };
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let session_present = |client_id: &'static str, clean_start: bool, expiry: u32| async move {
        let connect = connect(client_id, clean_start, expiry);
        let (stream, connack) = raw_connect(spool.addr, &connect).await;
        assert_eq!(connack[1], 0, "accepted");
        (stream, connack[0] == 1)
    };
    let (mut stream, _) = session_present("longer", true, 1).await;
    stream.write_all(&disconnect_with_expiry(5)).await.unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_stream, present) = session_present("longer", false, 1).await;
    assert!(present, "the DISCONNECT's 5 s replaced the CONNECT's 1 s");

    let (mut stream, _) = session_present("none", true, 0).await;
    stream.write_all(&disconnect_with_expiry(5)).await.unwrap();
    let (kind, body) = read_packet(&mut stream).await;
    assert_eq!((kind, body[0]), (0xE0, 0x82), "DISCONNECT, protocol error");
}

#[tokio::test]
async fn a_shared_subscription_is_refused_not_granted() {
    // Goal: spool has no shared subscriptions (its CONNACK says so), so a `$share/...` filter
    // gets 0x9E in the SUBACK (0x80 for 3.1.1) while the other filters are granted; granting it
    // would leave the client waiting for messages that never come.
    use common::{
        connect_v5, connect_v311, raw_connect, read_packet, subscribe_v5, subscribe_v311,
    };
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let (mut v5, _) = raw_connect(spool.addr, &connect_v5("sharer")).await;
    v5.write_all(&subscribe_v5(1, "$share/group/a", 1))
        .await
        .unwrap();
    let (kind, body) = read_packet(&mut v5).await;
    assert_eq!((kind, body.last()), (0x90, Some(&0x9E)), "{body:?}");
    v5.write_all(&subscribe_v5(2, "a/b", 1)).await.unwrap();
    let (kind, body) = read_packet(&mut v5).await;
    assert_eq!(
        (kind, body.last()),
        (0x90, Some(&1)),
        "an ordinary filter is granted"
    );
    let (mut v311, connack) = raw_connect(spool.addr, &connect_v311("sharer-3", true)).await;
    assert_eq!(connack, vec![0, 0]);
    v311.write_all(&subscribe_v311(1, "$share/group/a", 1))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut v311).await, (0x90, vec![0, 1, 0x80]));
}
