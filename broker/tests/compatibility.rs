//! Data written by an earlier release still opens and delivers. `fixtures/log-v2` is a data
//! directory written by spool at the start of issue 10 (publish records of version 2, its
//! metadata store, a clean stop); `fixtures/log-v3` the same, written by the release before
//! endpoint queues (version 3, whose targets name queues; its segment cut 64 bytes after its
//! last record, for size). In both, a persistent session "fixture-sub" subscribed to
//! `fixture/#` at QoS 2 and went offline; then "one" (QoS 1, `fixture/a`), "two" (QoS 2,
//! `fixture/b`), "three" (QoS 1, retained, `fixture/c`) and "four" (MQTT 5, QoS 1, a user
//! property and an expiry about 126 years off, `fixture/d`) were published, made with
//! mosquitto_sub and mosquitto_pub. Keep the fixture as it is: it stands for logs in the field.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Spool, connect, options};
use rumqttc::QoS;
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_log_of_version_2_opens_and_delivers() {
    opens_and_delivers("log-v2").await;
}

#[tokio::test]
async fn a_log_of_version_3_opens_and_delivers() {
    opens_and_delivers("log-v3").await;
}

/// Goal: today's spool opens the fixture's directory, rebuilds the session's queue from the
/// old records and delivers every message in order at its QoS, and keeps the retained one.
async fn opens_and_delivers(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    copy_dir(&fixture, dir.path());
    let spool = Spool::start(dir.path(), &["--max-packet-size", "65536"]);
    let mut queued = connect(options(spool.addr, "fixture-sub", false));
    assert!(queued.connected().await, "the stored session is back");
    let delivered: Vec<(String, Vec<u8>, QoS)> = queued
        .publishes(4)
        .await
        .into_iter()
        .map(|p| (p.topic, p.payload.to_vec(), p.qos))
        .collect();
    let expected = [
        ("fixture/a", "one", QoS::AtLeastOnce),
        ("fixture/b", "two", QoS::ExactlyOnce),
        ("fixture/c", "three", QoS::AtLeastOnce),
        ("fixture/d", "four", QoS::AtLeastOnce),
    ]
    .map(|(topic, payload, qos)| (topic.to_string(), payload.as_bytes().to_vec(), qos));
    assert_eq!(delivered, expected);
    let mut newcomer = connect(options(spool.addr, "newcomer", true));
    newcomer.connected().await;
    newcomer.subscribe("fixture/#", QoS::AtLeastOnce).await;
    let retained = newcomer.publishes(1).await.remove(0);
    assert_eq!(
        (
            retained.topic.as_str(),
            &retained.payload[..],
            retained.retain
        ),
        ("fixture/c", &b"three"[..], true)
    );
}
