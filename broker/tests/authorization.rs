//! Authorization policies, black-box: a deployment manifest's `mqttBroker.authorizations`
//! decide who may connect, and who may publish and subscribe on topics other than IoT Hub's,
//! and a reload of the manifest applies to connected clients and held subscriptions at once.
//! The module is a rumqttc client with a SAS token; the others are plain MQTT clients on the
//! anonymous listener.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Client, Seen, Spool, connect, identities_file, module_options, options};
use rumqttc::{QoS, SubscribeReasonCode};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const KEY: [u8; 32] = [5; 32];

/// A manifest at schema 1.2 with `authorizations` as its policy and no routes.
fn manifest(authorizations: &str) -> String {
    format!(
        r#"{{"modulesContent": {{"$edgeHub": {{"properties.desired": {{
            "schemaVersion": "1.2",
            "routes": {{}},
            "storeAndForwardConfiguration": {{ "timeToLiveSecs": 7200 }},
            "mqttBroker": {{ "authorizations": {authorizations} }}
        }}}}}}}}"#
    )
}

/// Before the reload: a rogue client is turned away; nobody subscribes to the Paho suite's
/// `test/nosubscribe`; the module works on alerts, except a secret one.
const FIRST: &str = r#"[
  {"identities": ["rogue"], "deny": [{"operations": ["mqtt:connect"]}]},
  {"identities": ["{{mqtt:client_id}}"],
   "deny": [{"operations": ["mqtt:subscribe"], "resources": ["test/nosubscribe"]}]},
  {"identities": ["edge/filter"],
   "deny": [{"operations": ["mqtt:publish"], "resources": ["alerts/secret"]}],
   "allow": [{"operations": ["mqtt:publish", "mqtt:subscribe"], "resources": ["alerts/#"]}]}
]"#;

/// After it: the watcher may not connect any more, nobody subscribes to `probe/…`, and the
/// module may subscribe to `alerts/ok` only.
const SECOND: &str = r#"[
  {"identities": ["watcher"], "deny": [{"operations": ["mqtt:connect"]}]},
  {"identities": ["{{mqtt:client_id}}"],
   "deny": [{"operations": ["mqtt:subscribe"], "resources": ["probe/#"]}]},
  {"identities": ["edge/filter"],
   "allow": [{"operations": ["mqtt:subscribe"], "resources": ["alerts/ok"]}]}
]"#;

/// Starts spool with modules `edge/filter` and `edge/other` registered and a manifest with
/// `policy`; returns it and the manifest's path.
fn start(dir: &Path, policy: &str) -> (Spool, std::path::PathBuf) {
    let identities = identities_file(dir, &["edge/filter", "edge/other"], &KEY);
    let deployment = dir.join("deployment.json");
    std::fs::write(&deployment, manifest(policy)).unwrap();
    let args = [
        "--identities",
        identities.to_str().unwrap(),
        "--deployment",
        deployment.to_str().unwrap(),
    ];
    (Spool::start(&dir.join("data"), &args), deployment)
}

/// Module `edge/{name}`, connected (persistent session).
async fn module(addr: SocketAddr, name: &str) -> Client {
    let mut client = connect(module_options(addr, &format!("edge/{name}"), &KEY, false));
    client.connected().await;
    client
}

async fn plain(addr: SocketAddr, client_id: &str) -> Client {
    let mut client = connect(options(addr, client_id, true));
    client.connected().await;
    client
}

/// Subscribes to `filter`; returns whether the SUBACK granted it.
async fn subscribe(client: &mut Client, filter: &str) -> bool {
    client
        .client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match client.next(10).await {
            Seen::SubAck(ack) => return ack.return_codes[0] != SubscribeReasonCode::Failure,
            Seen::Publish(_) | Seen::PubAck(_) => {}
            other => panic!("expected a SUBACK, got {other:?}"),
        }
    }
}

/// The next message `client` receives: its topic.
async fn received(client: &mut Client) -> String {
    loop {
        if let Seen::Publish(p) = client.next(10).await {
            return p.topic;
        }
    }
}

/// Waits until the hub has `SECOND`: it refuses a probe subscription then (it is told after
/// the connections).
async fn hub_reloaded(addr: SocketAddr) {
    let mut probe = plain(addr, "probe").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while subscribe(&mut probe, "probe/x").await {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_deployments_policy_decides_who_connects_publishes_and_subscribes_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, deployment) = start(dir.path(), FIRST);
    let addr = spool.addr;

    let mut rogue = connect(options(addr, "rogue", true));
    match rogue.next(10).await {
        Seen::Disconnected(why) => assert!(why.contains("NotAuthorized"), "{why}"),
        other => panic!("the rogue client was let in: {other:?}"),
    }

    // The Paho interoperability suite's subscribe failure: refused. A wildcard is granted,
    // but what the deny names is not delivered through it.
    let mut paho = plain(addr, "myclientid").await;
    assert!(!subscribe(&mut paho, "test/nosubscribe").await);
    assert!(subscribe(&mut paho, "test/#").await);
    let publisher = plain(addr, "publisher").await;
    for topic in ["test/nosubscribe", "test/other"] {
        publisher
            .publish(topic, QoS::AtLeastOnce, b"x".to_vec())
            .await;
    }
    assert_eq!(
        received(&mut paho).await,
        "test/other",
        "test/nosubscribe, published first, was delivered"
    );

    // The module publishes and subscribes on what the policy grants it, beyond its own IoT
    // Hub topics, and on nothing else.
    let mut filter = module(addr, "filter").await;
    assert!(subscribe(&mut filter, "alerts/#").await);
    assert!(subscribe(&mut filter, "alerts/ok").await);
    assert!(!subscribe(&mut filter, "other/#").await);
    let mut watcher = plain(addr, "watcher").await;
    assert!(subscribe(&mut watcher, "alerts/#").await);
    filter
        .publish("alerts/fire", QoS::AtLeastOnce, b"hot".to_vec())
        .await;
    // Its own copy may come before or after its PUBACK.
    let (mut acknowledged, mut own) = (false, None);
    while !acknowledged || own.is_none() {
        match filter.next(10).await {
            Seen::PubAck(_) => acknowledged = true,
            Seen::Publish(p) => own = Some(p.topic),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(own.as_deref(), Some("alerts/fire"));
    assert_eq!(received(&mut watcher).await, "alerts/fire");

    // The reload: the watcher is disconnected, and the module's subscription to alerts/# is
    // dropped while alerts/ok stays.
    std::fs::write(&deployment, manifest(SECOND)).unwrap();
    match watcher.next(10).await {
        Seen::Disconnected(_) => {}
        other => panic!("the watcher stayed connected: {other:?}"),
    }
    hub_reloaded(addr).await;
    for topic in ["alerts/x", "alerts/ok"] {
        publisher
            .publish(topic, QoS::AtLeastOnce, b"x".to_vec())
            .await;
    }
    assert_eq!(
        received(&mut filter).await,
        "alerts/ok",
        "alerts/x, published first, reached a dropped subscription"
    );

    // A publish the policy denies ends a 3.1.1 connection (it cannot be told otherwise).
    filter
        .publish("alerts/secret", QoS::AtLeastOnce, b"x".to_vec())
        .await;
    loop {
        match filter.next(10).await {
            Seen::Disconnected(_) => break,
            Seen::PubAck(_) => panic!("a denied publish was acknowledged"),
            _ => {}
        }
    }
    let mut watcher = connect(options(addr, "watcher", true));
    assert!(matches!(watcher.next(10).await, Seen::Disconnected(_)));
}

#[tokio::test]
async fn a_wildcard_grant_reaches_no_other_identitys_iot_hub_topics() {
    // Goal: a module the policy lets subscribe to `#` gets what the policy grants, but never
    // another module's telemetry, which IoT Hub's rules keep to its own routes.
    let dir = tempfile::tempdir().unwrap();
    let everything = r##"[{"identities": ["edge/filter"],
        "allow": [{"operations": ["mqtt:subscribe"], "resources": ["#"]}]}]"##;
    let (spool, _) = start(dir.path(), everything);
    let mut filter = module(spool.addr, "filter").await;
    assert!(subscribe(&mut filter, "#").await);
    let mut other = module(spool.addr, "other").await;
    other
        .publish(
            "devices/edge/modules/other/messages/events/",
            QoS::AtLeastOnce,
            b"private".to_vec(),
        )
        .await;
    other.acks(1).await;
    let mut tool = plain(spool.addr, "tool").await;
    tool.publish("alerts/x", QoS::AtLeastOnce, b"x".to_vec())
        .await;
    tool.acks(1).await;
    assert_eq!(
        received(&mut filter).await,
        "alerts/x",
        "the other module's telemetry, logged first, reached the wildcard"
    );
}
