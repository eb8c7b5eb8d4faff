//! MQTT 5 behaviour with a real MQTT 5 client (rumqttc's v5 client) against a real
//! `spool serve`: every QoS with user properties, topic aliases from the client, the client's
//! receive maximum and maximum packet size, subscription options, assigned client ids, and
//! message expiry while a persistent session is offline. (Reason codes on bad input are in
//! `mqtt_compliance.rs`, with raw packets; retain handling in `retained.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::Spool;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties, RetainForwardRule};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::time::Duration;
use tokio::sync::mpsc;

/// What an MQTT 5 test client saw.
#[derive(Debug)]
enum Seen {
    ConnAck {
        session_present: bool,
        assigned_client_id: Option<String>,
    },
    SubAck,
    PubAck,
    PubComp,
    Publish(Publish),
    Disconnected(#[expect(dead_code, reason = "shown by Debug when a test fails")] String),
}

/// An MQTT 5 client whose event loop runs in a task (no reconnection).
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Seen>,
}

fn options(spool: &Spool, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, spool.addr.ip().to_string(), spool.addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// A persistent session: kept for five minutes after the connection ends.
fn persistent(mut options: MqttOptions) -> MqttOptions {
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(300));
    options
}

impl Client {
    fn connect(options: MqttOptions) -> Client {
        let (client, mut event_loop) = AsyncClient::new(options, 1000);
        let (sender, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let seen = match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => Seen::ConnAck {
                        session_present: ack.session_present,
                        assigned_client_id: ack
                            .properties
                            .and_then(|p| p.assigned_client_identifier),
                    },
                    Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                    Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
                    Ok(Event::Incoming(Packet::PubComp(_))) => Seen::PubComp,
                    Ok(Event::Incoming(Packet::Publish(publish))) => Seen::Publish(publish),
                    Ok(_) => continue,
                    Err(error) => {
                        let _ = sender.send(Seen::Disconnected(error.to_string()));
                        return;
                    }
                };
                if sender.send(seen).is_err() {
                    return;
                }
            }
        });
        Client { client, events }
    }

    async fn next(&mut self, secs: u64) -> Seen {
        tokio::time::timeout(Duration::from_secs(secs), self.events.recv())
            .await
            .expect("timed out waiting for the broker")
            .expect("event loop ended")
    }

    /// Waits for the CONNACK; returns its session-present flag.
    async fn connected(&mut self) -> bool {
        match self.next(10).await {
            Seen::ConnAck {
                session_present, ..
            } => session_present,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        match self.next(10).await {
            Seen::SubAck => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Waits for `count` PUBACKs or PUBCOMPs.
    async fn acks(&mut self, count: usize) {
        for _ in 0..count {
            match self.next(10).await {
                Seen::PubAck | Seen::PubComp => {}
                other => panic!("expected an acknowledgement, got {other:?}"),
            }
        }
    }

    async fn publish(&mut self) -> Publish {
        match self.next(10).await {
            Seen::Publish(publish) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Whatever arrives within `millis`, if anything.
    async fn within(&mut self, millis: u64) -> Option<Seen> {
        tokio::time::timeout(Duration::from_millis(millis), self.events.recv())
            .await
            .ok()
            .flatten()
    }

    async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        while !matches!(self.next(10).await, Seen::Disconnected(_)) {}
    }
}

fn with_user_property(key: &str, value: &str) -> PublishProperties {
    PublishProperties {
        user_properties: vec![(key.to_string(), value.to_string())],
        ..PublishProperties::default()
    }
}

fn expiring_in(secs: u32) -> PublishProperties {
    PublishProperties {
        message_expiry_interval: Some(secs),
        ..PublishProperties::default()
    }
}

#[tokio::test]
async fn every_qos_arrives_with_its_user_properties_at_the_lower_qos() {
    // Goal: an MQTT 5 publisher's messages reach an MQTT 5 subscriber in order, at
    // min(publish QoS, subscription QoS), with their user properties intact.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut qos2_subscriber = Client::connect(options(&spool, "sub-qos2"));
    qos2_subscriber.connected().await;
    qos2_subscriber
        .subscribe("plant/+/temperature", QoS::ExactlyOnce)
        .await;
    let mut qos1_subscriber = Client::connect(options(&spool, "sub-qos1"));
    qos1_subscriber.connected().await;
    qos1_subscriber.subscribe("plant/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(options(&spool, "pub"));
    publisher.connected().await;
    let sent = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for (i, qos) in sent.into_iter().enumerate() {
        publisher
            .client
            .publish_with_properties(
                "plant/line-1/temperature",
                qos,
                false,
                format!("reading {i}"),
                with_user_property("sequence", &i.to_string()),
            )
            .await
            .unwrap();
    }
    publisher.acks(2).await;
    for (subscriber, granted) in [
        (&mut qos2_subscriber, QoS::ExactlyOnce),
        (&mut qos1_subscriber, QoS::AtLeastOnce),
    ] {
        for (i, qos) in sent.into_iter().enumerate() {
            let publish = subscriber.publish().await;
            assert_eq!(publish.payload, Bytes::from(format!("reading {i}")));
            assert_eq!(publish.topic, Bytes::from("plant/line-1/temperature"));
            let lower = if (qos as u8) < (granted as u8) {
                qos
            } else {
                granted
            };
            assert_eq!(publish.qos, lower, "message {i}");
            let properties = publish.properties.expect("user properties are forwarded");
            assert_eq!(
                properties.user_properties,
                vec![("sequence".to_string(), i.to_string())]
            );
        }
    }
}

#[tokio::test]
async fn a_topic_alias_set_by_the_client_names_the_topic_of_later_publishes() {
    // Goal: a publish that sets topic alias 1 and later ones that send only the alias (empty
    // topic) all arrive on the full topic.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = Client::connect(options(&spool, "alias-sub"));
    subscriber.connected().await;
    subscriber.subscribe("telemetry/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(options(&spool, "alias-pub"));
    publisher.connected().await;
    let alias = |alias| PublishProperties {
        topic_alias: Some(alias),
        ..PublishProperties::default()
    };
    let sends = [
        ("telemetry/engine", 1, "set"),
        ("", 1, "reused once"),
        ("telemetry/pump", 2, "second alias"),
        ("", 1, "reused twice"),
        ("", 2, "second reused"),
    ];
    for (topic, number, payload) in sends {
        publisher
            .client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, alias(number))
            .await
            .unwrap();
    }
    publisher.acks(sends.len()).await;
    let expected = [
        ("telemetry/engine", "set"),
        ("telemetry/engine", "reused once"),
        ("telemetry/pump", "second alias"),
        ("telemetry/engine", "reused twice"),
        ("telemetry/pump", "second reused"),
    ];
    for (topic, payload) in expected {
        let publish = subscriber.publish().await;
        assert_eq!(
            (publish.topic, publish.payload),
            (Bytes::from(topic), Bytes::from(payload))
        );
    }
}

#[tokio::test]
async fn no_more_than_the_clients_receive_maximum_is_in_flight() {
    // Goal: a subscriber that allows 2 unacknowledged QoS 1 messages is sent 2, then one more
    // per acknowledgement, in order; nothing is lost.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber_options = options(&spool, "slow-sub");
    subscriber_options.set_receive_maximum(Some(2));
    subscriber_options.set_manual_acks(true);
    let mut subscriber = Client::connect(subscriber_options);
    subscriber.connected().await;
    subscriber.subscribe("work/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(options(&spool, "busy-pub"));
    publisher.connected().await;
    for i in 0..10 {
        publisher
            .client
            .publish("work/items", QoS::AtLeastOnce, false, format!("item {i}"))
            .await
            .unwrap();
    }
    publisher.acks(10).await;
    let mut unacknowledged = vec![subscriber.publish().await, subscriber.publish().await];
    if let Some(extra) = subscriber.within(700).await {
        panic!("a third message arrived with two unacknowledged: {extra:?}");
    }
    let mut received = Vec::new();
    while received.len() < 10 {
        let oldest = unacknowledged.remove(0);
        subscriber.client.ack(&oldest).await.unwrap();
        received.push(oldest.payload);
        if received.len() + unacknowledged.len() < 10 {
            unacknowledged.push(subscriber.publish().await);
        }
        assert!(unacknowledged.len() <= 2);
    }
    let expected: Vec<Bytes> = (0..10).map(|i| Bytes::from(format!("item {i}"))).collect();
    assert_eq!(received, expected);
}

#[tokio::test]
async fn a_message_that_expires_while_its_subscriber_is_offline_is_not_delivered() {
    // Goal: message expiry bounds what waits for an offline session. An expired message is
    // dropped; the others arrive in order, and their expiry interval is reduced by the time
    // they waited (MQTT 5 §3.3.2.3.3).
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut subscriber = Client::connect(persistent(options(&spool, "offline-sub")));
    subscriber.connected().await;
    subscriber.subscribe("alerts/#", QoS::AtLeastOnce).await;
    subscriber.disconnect().await;
    let mut publisher = Client::connect(options(&spool, "alert-pub"));
    publisher.connected().await;
    let sends = [
        ("short-lived", Some(1)),
        ("no expiry", None),
        ("long-lived", Some(60)),
    ];
    for (payload, expiry) in sends {
        let properties = expiry.map(expiring_in).unwrap_or_default();
        publisher
            .client
            .publish_with_properties("alerts/fire", QoS::AtLeastOnce, false, payload, properties)
            .await
            .unwrap();
    }
    publisher.acks(sends.len()).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut subscriber = Client::connect(persistent(options(&spool, "offline-sub")));
    assert!(subscriber.connected().await, "the session was kept");
    let first = subscriber.publish().await;
    assert_eq!(first.payload, Bytes::from("no expiry"));
    assert_eq!(
        first.properties.and_then(|p| p.message_expiry_interval),
        None
    );
    let second = subscriber.publish().await;
    assert_eq!(second.payload, Bytes::from("long-lived"));
    let left = second.properties.and_then(|p| p.message_expiry_interval);
    assert!(
        left.is_some_and(|secs| (50..60).contains(&secs)),
        "the expiry interval counts down while the message waits: {left:?}"
    );
    if let Some(extra) = subscriber.within(500).await {
        panic!("nothing else should arrive: {extra:?}");
    }
}

#[tokio::test]
async fn no_local_and_retain_as_published_subscriptions() {
    // Goal: a no-local subscription does not get its own client's messages back, and a
    // retain-as-published one sees RETAIN as the publisher set it on a live message, where a
    // plain subscription sees it cleared.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut chatter = Client::connect(options(&spool, "chatter"));
    chatter.connected().await;
    let options_set = Filter {
        path: "chat/#".to_string(),
        qos: QoS::AtLeastOnce,
        nolocal: true,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    chatter.client.subscribe_many([options_set]).await.unwrap();
    assert!(matches!(chatter.next(10).await, Seen::SubAck));
    let mut plain = Client::connect(options(&spool, "plain"));
    plain.connected().await;
    plain.subscribe("chat/#", QoS::AtLeastOnce).await;
    chatter
        .client
        .publish("chat/room", QoS::AtLeastOnce, false, "from chatter")
        .await
        .unwrap();
    chatter.acks(1).await;
    let mut other = Client::connect(options(&spool, "other"));
    other.connected().await;
    other
        .client
        .publish("chat/room", QoS::AtLeastOnce, true, "from other")
        .await
        .unwrap();
    other.acks(1).await;
    let seen = chatter.publish().await;
    assert_eq!(seen.payload, Bytes::from("from other"), "no-local");
    assert!(seen.retain, "retain as published");
    if let Some(extra) = chatter.within(500).await {
        panic!("nothing else should arrive: {extra:?}");
    }
    for (payload, retain) in [("from chatter", false), ("from other", false)] {
        let seen = plain.publish().await;
        assert_eq!((seen.payload, seen.retain), (Bytes::from(payload), retain));
    }
}

#[tokio::test]
async fn a_client_without_an_id_is_assigned_one_it_can_use() {
    // Goal: an MQTT 5 CONNECT with an empty client id gets one in the CONNACK, and works.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let mut anonymous = Client::connect(options(&spool, ""));
    match anonymous.next(10).await {
        Seen::ConnAck {
            assigned_client_id: Some(id),
            ..
        } => assert!(!id.is_empty()),
        other => panic!("expected a CONNACK with an assigned client id, got {other:?}"),
    }
    anonymous.subscribe("echo", QoS::AtLeastOnce).await;
    anonymous
        .client
        .publish("echo", QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match anonymous.next(10).await {
            Seen::PubAck => seen.push("puback".to_string()),
            Seen::Publish(publish) => {
                seen.push(String::from_utf8(publish.payload.to_vec()).unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, ["hello", "puback"]);
}

#[tokio::test]
async fn a_message_larger_than_the_clients_maximum_packet_size_is_not_sent_to_it() {
    // Goal: spool never sends a client a packet above the maximum it announced (MQTT 5
    // §3.1.2.25); that message is skipped for that client only and counts as delivered: with
    // one message in flight allowed, what follows still arrives, in order, and the session
    // does not meet the skipped message again when it reconnects.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let small_options = || {
        let mut small_options = persistent(options(&spool, "small-sub"));
        small_options.set_max_packet_size(Some(256));
        small_options.set_receive_maximum(Some(1));
        small_options
    };
    let mut small = Client::connect(small_options());
    small.connected().await;
    small.subscribe("blobs/#", QoS::AtLeastOnce).await;
    let mut large = Client::connect(options(&spool, "large-sub"));
    large.connected().await;
    large.subscribe("blobs/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(options(&spool, "blob-pub"));
    publisher.connected().await;
    let payloads = [vec![b'a'; 10], vec![b'b'; 1000], vec![b'c'; 10]];
    for payload in &payloads {
        publisher
            .client
            .publish("blobs/x", QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    publisher.acks(payloads.len()).await;
    for payload in &payloads {
        assert_eq!(large.publish().await.payload, Bytes::from(payload.clone()));
    }
    for payload in [&payloads[0], &payloads[2]] {
        assert_eq!(small.publish().await.payload, Bytes::from(payload.clone()));
    }
    if let Some(extra) = small.within(500).await {
        panic!("nothing else should arrive: {extra:?}");
    }
    small.disconnect().await;
    let mut small = Client::connect(small_options());
    assert!(small.connected().await, "the session was kept");
    if let Some(extra) = small.within(500).await {
        panic!("nothing should be resent: {extra:?}");
    }
}
