//! Law 1 through the whole server: no PUBACK before the message is fsynced. The server runs
//! in this process with its write-ahead log and metadata store on `FaultyFs`, a publisher streams QoS 1 messages,
//! and the file system loses power mid-stream (only fsynced bytes survive, the last writes
//! torn). Every message acknowledged before the power loss must be in the recovered log, in
//! order. (A SIGKILL cannot show this: the page cache survives it.) The same harness counts
//! the log's writes, to show what a client cannot make spool write.
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    PUBCOMP, PUBREL, StreamingPublisher, ack, connect_v5, connect_v311, raw_connect, read_packet,
};
use spool_broker::config::{Config, ServeArgs};
use spool_broker::delivery::record::{KIND_PUBLISH, PublishRecord};
use spool_broker::server::Server;
use spool_storage::{CrashMode, FaultyFs, Wal, WalOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_reaches_a_publisher_before_its_message_is_fsynced() {
    for round in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(FaultyFs::new());
        fs.set_sync_latency(Duration::from_micros(500));
        let server = start_on(&fs, dir.path()).await;
        let publisher = StreamingPublisher::start(server.mqtt_addr.unwrap(), "law1").await;

        // The power goes at another moment in each round, counted from the first PUBACK (on a
        // loaded machine connecting alone can take longer than the shortest of them).
        let waiting = std::time::Instant::now();
        while publisher.acked.lock().unwrap().is_empty() {
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "round {round}: no PUBACK within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(30 + 45 * round)).await;
        // Holding the list while the power goes: every PUBACK in it arrived before the loss.
        let acked = {
            let acked = publisher.acked.lock().unwrap();
            fs.crash(CrashMode::TornWrites { seed: round });
            acked.clone()
        };
        publisher.stop();
        let _ = server.stop().await; // the log failed with the power: an error is expected

        let logged = logged_payloads(&fs, &dir.path().join("wal"));
        let expected: Vec<u16> = (1..).take(logged.len()).collect();
        assert_eq!(
            logged, expected,
            "round {round}: the log holds a prefix, in order"
        );
        let last_acked = acked.iter().copied().max().unwrap();
        assert!(
            usize::from(last_acked) <= logged.len(),
            "round {round}: message {last_acked} was acknowledged but only {} survived",
            logged.len()
        );
        eprintln!(
            "round {round}: {} acknowledged, {} survived the power loss",
            acked.len(),
            logged.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_and_what_it_was_promised_survive_a_power_loss() {
    // Goal: with the log and the metadata store both on the file system that loses power, a
    // session whose SUBACK came before the loss is still there after it, with every message
    // acknowledged to its publisher, in order (duplicates allowed, no gap). Method: a
    // persistent subscriber subscribes and goes offline, a publisher streams QoS 1, the power
    // goes (torn writes) at another moment in each round, the server starts again on what
    // survived, and the subscriber comes back.
    for round in 0..4u64 {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(FaultyFs::new());
        fs.set_sync_latency(Duration::from_micros(200));
        let server = start_on(&fs, dir.path()).await;
        let addr = server.mqtt_addr.unwrap();
        let mut sink = common::connect(common::options(addr, "sink", false));
        sink.connected().await;
        sink.subscribe("law/t", rumqttc::QoS::AtLeastOnce).await;
        sink.client.disconnect().await.unwrap();
        let publisher = StreamingPublisher::start(addr, "law/t").await;
        let waiting = std::time::Instant::now();
        while publisher.acked.lock().unwrap().len() < 10 {
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "round {round}: no PUBACK"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20 + 40 * round)).await;
        let last_acked = {
            let acked = publisher.acked.lock().unwrap();
            fs.crash(CrashMode::TornWrites { seed: 100 + round });
            acked.iter().copied().max().unwrap()
        };
        publisher.stop();
        let _ = server.stop().await; // the storage failed with the power: an error is expected

        let server = start_on(&fs, dir.path()).await;
        let mut sink = common::connect(common::options(server.mqtt_addr.unwrap(), "sink", false));
        assert!(
            sink.connected().await,
            "round {round}: the session survived"
        );
        let mut next = 1u16;
        while next <= last_acked {
            let publish = sink.publishes(1).await.remove(0);
            let number = u16::from_be_bytes([publish.payload[0], publish.payload[1]]);
            assert!(number <= next, "round {round}: {number} came before {next}");
            next = next.max(number + 1);
        }
        eprintln!("round {round}: all {last_acked} acknowledged messages delivered after the loss");
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn stray_pubrels_write_nothing_to_the_log() {
    // Goal: a PUBREL for a packet id the session does not hold is answered (PUBCOMP, 0x92 in
    // MQTT 5) without a record, so a client looping on them cannot fill the log, whose quota
    // release records may exceed.
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFs::new());
    let server = start_on(&fs, dir.path()).await;
    let addr = server.mqtt_addr.unwrap();
    let (mut v311, _) = raw_connect(addr, &connect_v311("stray-3", true)).await;
    let (mut v5, _) = raw_connect(addr, &connect_v5("stray-5")).await;
    let writes_before = fs.stats().writes;
    for packet_id in 1..=500 {
        v311.write_all(&ack(PUBREL, packet_id)).await.unwrap();
        v5.write_all(&ack(PUBREL, packet_id)).await.unwrap();
    }
    for packet_id in 1..=500u16 {
        let id = packet_id.to_be_bytes();
        assert_eq!(read_packet(&mut v311).await, (PUBCOMP, id.to_vec()));
        assert_eq!(
            read_packet(&mut v5).await,
            (PUBCOMP, vec![id[0], id[1], 0x92, 0])
        );
    }
    assert_eq!(
        fs.stats().writes,
        writes_before,
        "stray PUBRELs wrote to the log"
    );
    server.stop().await.unwrap();
}

/// A server on ephemeral ports (no MQTTS), its log on `fs`, its metadata in `dir`.
async fn start_on(fs: &Arc<FaultyFs>, dir: &Path) -> Server {
    let config = Config::resolve(ServeArgs {
        data_dir: Some(dir.to_path_buf()),
        mqtt_bind: Some("127.0.0.1:0".into()),
        mqtts_bind: Some(String::new()),
        admin_bind: Some(String::new()),
        ..ServeArgs::default()
    })
    .unwrap();
    Server::start_on(&config, fs.clone()).await.unwrap()
}

/// The payloads of the publish records in the log, reopened (and recovered) after the crash.
fn logged_payloads(fs: &Arc<FaultyFs>, wal_dir: &Path) -> Vec<u16> {
    let (wal, _) = Wal::open_with_fs(fs.clone(), wal_dir, WalOptions::default()).unwrap();
    let mut reader = wal.reader(1).unwrap();
    let mut payloads = Vec::new();
    while let Some(record) = reader.try_next().unwrap() {
        if record.kind == KIND_PUBLISH {
            let publish = PublishRecord::decode(record.payload).unwrap();
            let payload = &publish.message.payload;
            payloads.push(u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
    wal.close().unwrap();
    payloads
}
