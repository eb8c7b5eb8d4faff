//! Law 1 through the whole server: no PUBACK before the message is fsynced. The server runs
//! in this process with its write-ahead log on `FaultyFs`, a publisher streams QoS 1 messages,
//! and the file system loses power mid-stream (only fsynced bytes survive, the last writes
//! torn). Every message acknowledged before the power loss must be in the recovered log, in
//! order. (A SIGKILL cannot show this: the page cache survives it.)
#![allow(clippy::unwrap_used)]

mod common;

use common::{connect_v311, publish_v311, raw_connect};
use spool_broker::config::{Config, ServeArgs};
use spool_broker::delivery::record::{KIND_PUBLISH, PublishRecord};
use spool_broker::server::Server;
use spool_storage::{CrashMode, FaultyFs, Wal, WalOptions};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

const MESSAGES: u16 = 60_000;
/// Publishes sent ahead of their PUBACKs (below the 1024 spool allows a 3.1.1 client).
const WINDOW: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_reaches_a_publisher_before_its_message_is_fsynced() {
    for round in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(FaultyFs::new());
        fs.set_sync_latency(Duration::from_micros(500));
        let config = Config::resolve(ServeArgs {
            data_dir: Some(dir.path().to_path_buf()),
            mqtt_bind: Some("127.0.0.1:0".into()),
            mqtts_bind: Some(String::new()),
            ..ServeArgs::default()
        })
        .unwrap();
        let server = Server::start_on(&config, fs.clone()).await.unwrap();
        let publisher = Publisher::start(server.mqtt_addr.unwrap()).await;

        tokio::time::sleep(Duration::from_millis(30 + 45 * round)).await;
        // Holding the list while the power goes: every PUBACK in it arrived before the loss.
        let acked = {
            let acked = publisher.acked.lock().unwrap();
            fs.crash(CrashMode::TornWrites { seed: round });
            acked.clone()
        };
        assert!(
            !acked.is_empty(),
            "round {round}: no PUBACK before the power loss"
        );
        let _ = server.stop().await; // the log failed with the power: an error is expected
        publisher.stop();

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

/// A raw MQTT 3.1.1 client publishing messages 1, 2, ... (payload = packet id) at QoS 1,
/// `WINDOW` ahead of their PUBACKs, and recording the PUBACKs.
struct Publisher {
    acked: Arc<Mutex<Vec<u16>>>,
    tasks: [JoinHandle<()>; 2],
}

impl Publisher {
    async fn start(addr: SocketAddr) -> Publisher {
        let (stream, _) = raw_connect(addr, &connect_v311("publisher", true)).await;
        let (mut reader, mut writer) = stream.into_split();
        let window = Arc::new(Semaphore::new(WINDOW));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let publishing = tokio::spawn({
            let window = Arc::clone(&window);
            async move {
                for n in 1..=MESSAGES {
                    window.acquire().await.unwrap().forget();
                    let publish = publish_v311(1, false, n, "law1", &n.to_be_bytes());
                    if writer.write_all(&publish).await.is_err() {
                        return; // the server closed the connection after the power loss
                    }
                }
            }
        });
        let reading = tokio::spawn({
            let acked = Arc::clone(&acked);
            async move {
                let mut puback = [0u8; 4];
                while reader.read_exact(&mut puback).await.is_ok() {
                    assert_eq!(puback[..2], [0x40, 2], "only PUBACKs come back");
                    let packet_id = u16::from_be_bytes([puback[2], puback[3]]);
                    acked.lock().unwrap().push(packet_id);
                    window.add_permits(1);
                }
            }
        });
        Publisher {
            acked,
            tasks: [publishing, reading],
        }
    }

    fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// The payloads of the publish records in the log, reopened (and recovered) after the crash.
fn logged_payloads(fs: &Arc<FaultyFs>, wal_dir: &std::path::Path) -> Vec<u16> {
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
