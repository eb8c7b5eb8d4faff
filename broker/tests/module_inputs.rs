//! Routes and module inputs, black-box: a deployment manifest's routes send a module's
//! telemetry to another module's inputs, through durable endpoint queues that fill whether or
//! not that module is connected, keep order per input and priority, expire by their route's
//! time to live, and survive a SIGKILL. The modules are rumqttc clients with SAS tokens, on the
//! plain listener (credentials are checked there too).
#![allow(clippy::unwrap_used)]

mod common;

use common::{Client, Seen, Spool, connect, identities_file, module_options};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const KEY: [u8; 32] = [9; 32];

const DEPLOYMENT: &str = r#"{
  "modulesContent": {
    "$edgeHub": {
      "properties.desired": {
        "schemaVersion": "1.1",
        "routes": {
          "toSink": "FROM /messages/modules/filter/outputs/out1 INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")",
          "hot": {
            "route": "FROM /messages/modules/filter/outputs/alerts WHERE as_number(temp) > 30 INTO BrokeredEndpoint(\"/modules/sink/inputs/alerts\")",
            "priority": 0
          },
          "bothToIn1": "FROM /messages/modules/filter/outputs/both INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")",
          "bothToIn2": "FROM /messages/modules/filter/outputs/both INTO BrokeredEndpoint(\"/modules/sink/inputs/in2\")",
          "brief": {
            "route": "FROM /messages/modules/filter/outputs/brief INTO BrokeredEndpoint(\"/modules/sink/inputs/brief\")",
            "timeToLiveSecs": 1
          }
        },
        "storeAndForwardConfiguration": { "timeToLiveSecs": 7200 }
      }
    }
  }
}"#;

/// The arguments that start spool with modules `edge/filter` and `edge/sink` registered and
/// `DEPLOYMENT` applied (files written in `dir`).
fn edge_args(dir: &Path) -> Vec<String> {
    let identities_file = identities_file(dir, &["edge/filter", "edge/sink"], &KEY);
    let deployment = dir.join("deployment.json");
    std::fs::write(&deployment, DEPLOYMENT).unwrap();
    let path = |p: PathBuf| p.to_str().unwrap().to_owned();
    vec![
        "--identities".into(),
        path(identities_file),
        "--deployment".into(),
        path(deployment),
    ]
}

fn start(dir: &Path, args: &[String]) -> Spool {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Spool::start(&dir.join("data"), &args)
}

/// A module's connection, with a SAS token valid for an hour; with `manual_acks`, it
/// acknowledges only what `receive` takes.
fn module(addr: SocketAddr, id: &str, clean: bool, manual_acks: bool) -> Client {
    let mut options = module_options(addr, id, &KEY, clean);
    options.set_manual_acks(manual_acks);
    connect(options)
}

/// Sends `filter`'s telemetry to output `output`, with the application properties `bag`
/// (encoded), and waits for every PUBACK.
async fn send(filter: &mut Client, output: &str, bags: &[String]) {
    for bag in bags {
        let topic = format!("devices/edge/modules/filter/messages/events/%24.on={output}&{bag}");
        filter.publish(&topic, QoS::AtLeastOnce, bag.clone()).await;
    }
    filter.acks(bags.len() as u64).await;
}

/// Subscribes `sink` to its inputs, as the SDKs do, and collects `count` messages (with any
/// that come before the SUBACK), acknowledging each.
async fn receive(sink: &mut Client, count: usize) -> Vec<(String, String)> {
    sink.client
        .subscribe("devices/edge/modules/sink/inputs/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < count {
        match sink.next(20).await {
            Seen::Publish(p) => {
                sink.client.ack(&p).await.unwrap();
                let payload = String::from_utf8(p.payload.to_vec()).unwrap();
                seen.push((p.topic, payload));
            }
            Seen::SubAck(_) => {}
            other => panic!("expected input messages, got {other:?}"),
        }
    }
    seen
}

/// Nothing more arrives within `wait`.
async fn nothing_more(sink: &mut Client, wait: Duration) {
    if let Ok(Some(Seen::Publish(p))) = tokio::time::timeout(wait, sink.events.recv()).await {
        panic!("unexpected message on {}", p.topic);
    }
}

#[tokio::test]
async fn routed_telemetry_waits_for_a_module_that_never_connected_and_survives_a_kill() {
    // Goal: messages routed to a module input are kept for it before it ever connects, across
    // a SIGKILL, and delivered in order on the input's topic, with the sender's ids in the
    // bag; what it acknowledged before a second kill is not delivered again; telemetry no
    // route takes goes nowhere.
    let dir = tempfile::tempdir().unwrap();
    let args = edge_args(dir.path());
    let spool = start(dir.path(), &args);
    let mut filter = module(spool.addr, "edge/filter", true, false);
    filter.connected().await;
    let bags: Vec<String> = (1..=200).map(|i| format!("seq={i}")).collect();
    send(&mut filter, "out1", &bags).await;
    send(&mut filter, "nowhere", &["seq=0".to_owned()]).await;
    spool.kill();

    let spool = start(dir.path(), &args);
    let mut sink = module(spool.addr, "edge/sink", false, true);
    sink.connected().await;
    let first = receive(&mut sink, 100).await;
    let expected = |i: usize| {
        let topic =
            format!("devices/edge/modules/sink/inputs/in1/seq={i}&%24.cdid=edge&%24.cmid=filter");
        (topic, format!("seq={i}"))
    };
    assert_eq!(first, (1..=100).map(expected).collect::<Vec<_>>());
    // The first 100 acknowledged, and checkpointed within a second; the window's worth after
    // them delivered and not acknowledged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    spool.kill();

    let spool = start(dir.path(), &args);
    let mut sink = module(spool.addr, "edge/sink", false, true);
    sink.connected().await;
    let rest = receive(&mut sink, 100).await;
    assert_eq!(rest, (101..=200).map(expected).collect::<Vec<_>>());
    nothing_more(&mut sink, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_higher_priority_goes_first_a_condition_filters_and_a_time_to_live_expires() {
    // Goal: while the sink is away, its higher-priority input fills with what the route's
    // condition lets through, and its short-lived messages expire by their route's time to
    // live; when it connects, priority 0 comes first, then the default priority, in order.
    let dir = tempfile::tempdir().unwrap();
    let args = edge_args(dir.path());
    let spool = start(dir.path(), &args);
    let mut filter = module(spool.addr, "edge/filter", true, false);
    filter.connected().await;
    send(&mut filter, "brief", &["n=1".to_owned()]).await;
    let normal: Vec<String> = (1..=3).map(|i| format!("n={i}")).collect();
    send(&mut filter, "out1", &normal).await;
    let temps: Vec<String> = [31, 12, 35, 40].map(|t| format!("temp={t}")).to_vec();
    send(&mut filter, "alerts", &temps).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the brief route's 1 s

    let mut sink = module(spool.addr, "edge/sink", true, true);
    sink.connected().await;
    let inputs: Vec<(String, String)> = receive(&mut sink, 6)
        .await
        .into_iter()
        .map(|(topic, payload)| {
            let input = topic.split('/').nth(5).unwrap().to_owned();
            (input, payload)
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("alerts", "temp=31"),
        ("alerts", "temp=35"),
        ("alerts", "temp=40"),
        ("in1", "n=1"),
        ("in1", "n=2"),
        ("in1", "n=3"),
    ]
    .map(|(input, payload)| (input.to_owned(), payload.to_owned()))
    .to_vec();
    assert_eq!(inputs, expected);
    nothing_more(&mut sink, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_changed_manifest_reroutes_new_messages_and_a_refused_one_changes_nothing() {
    // Goal: rewriting the manifest reroutes new messages without a restart, to an endpoint
    // that did not exist; a manifest that does not parse leaves the routes in force.
    let dir = tempfile::tempdir().unwrap();
    let args = edge_args(dir.path());
    let spool = start(dir.path(), &args);
    let mut filter = module(spool.addr, "edge/filter", true, false);
    filter.connected().await;
    let mut sink = module(spool.addr, "edge/sink", true, true);
    sink.connected().await;
    send(&mut filter, "out1", &["n=0".to_owned()]).await;
    let input_of = |(topic, _): &(String, String)| topic.split('/').nth(5).unwrap().to_owned();
    assert_eq!(input_of(&receive(&mut sink, 1).await[0]), "in1");

    let deployment = dir.path().join("deployment.json");
    let rerouted = DEPLOYMENT.replace("/modules/sink/inputs/in1", "/modules/sink/inputs/in2");
    std::fs::write(&deployment, rerouted).unwrap();
    let mut probes = 0;
    loop {
        probes += 1;
        assert!(probes < 100, "the new route never took effect");
        send(&mut filter, "out1", &[format!("n={probes}")]).await;
        if input_of(&receive(&mut sink, 1).await[0]) == "in2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&deployment, "{\"schemaVersion\": \"1.1\", \"routes\": {").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await; // read (and refused) meanwhile
    send(&mut filter, "out1", &["n=last".to_owned()]).await;
    let last = receive(&mut sink, 1).await;
    assert_eq!(input_of(&last[0]), "in2", "the routes in force are kept");
}

#[tokio::test]
async fn an_input_unsubscribed_before_its_acknowledgement_keeps_its_packet_id_taken() {
    // Goal: one message routed to two inputs of a module goes out on one at a time (the copies
    // share a packet id); when the module unsubscribes from the first input before
    // acknowledging it, the id stays taken until the module acknowledges it, so the second
    // copy never goes out under an id the client still holds, and goes once it is free.
    let dir = tempfile::tempdir().unwrap();
    let args = edge_args(dir.path());
    let spool = start(dir.path(), &args);
    let mut sink = module(spool.addr, "edge/sink", true, true);
    sink.connected().await;
    for input in ["in1", "in2"] {
        let filter = format!("devices/edge/modules/sink/inputs/{input}/#");
        sink.subscribe(&filter, QoS::AtLeastOnce).await;
    }
    let mut filter = module(spool.addr, "edge/filter", true, false);
    filter.connected().await;
    send(&mut filter, "both", &["n=1".to_owned()]).await;
    let first = match sink.next(10).await {
        Seen::Publish(p) => p,
        other => panic!("expected the first copy, got {other:?}"),
    };
    let first_input = first.topic.split('/').nth(5).unwrap().to_owned();
    let first_filter = format!("devices/edge/modules/sink/inputs/{first_input}/#");
    sink.client.unsubscribe(first_filter).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new message makes the hub send what it can: not the second copy yet.
    send(&mut filter, "both", &["n=2".to_owned()]).await;
    nothing_more(&mut sink, Duration::from_millis(700)).await;
    sink.client.ack(&first).await.unwrap();
    let second = match sink.next(10).await {
        Seen::Publish(p) => p,
        other => panic!("expected the second copy, got {other:?}"),
    };
    assert_ne!(second.topic.split('/').nth(5), Some(first_input.as_str()));
    assert_eq!(second.payload, first.payload);
}
