//! A full disk is back-pressure, not death, black-box: a real `spool serve` on a 40 MiB tmpfs
//! (mounted by the test; it needs root, as CI has) with the default quota and segment size.
//! Publishers fill the volume and are held back; spool keeps serving; killed and restarted on
//! the full volume it starts, delivers what it holds, and takes publishes again as the
//! consumer frees space.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Seen, Spool, connect, connect_v5, publish_v5, raw_connect, read_packet};
use rumqttc::QoS;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const MESSAGE_BYTES: usize = 20_000;

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallVolume {
    dir: tempfile::TempDir,
}

impl SmallVolume {
    /// `None` when not root: mounting needs it (CI runs as root).
    fn mount(size: &str) -> Option<SmallVolume> {
        let uid = Command::new("id").arg("-u").output().unwrap().stdout;
        if String::from_utf8_lossy(&uid).trim() != "0" {
            eprintln!("skipped: mounting a small file system needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount a {size} tmpfs");
        Some(SmallVolume { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Client options for messages of `MESSAGE_BYTES`.
fn options(addr: std::net::SocketAddr, client_id: &str, clean: bool) -> rumqttc::MqttOptions {
    let mut options = common::options(addr, client_id, clean);
    options.set_max_packet_size(1 << 20, 1 << 20);
    options
}

fn numbered(number: u64) -> Vec<u8> {
    let mut payload = vec![0x5a; MESSAGE_BYTES];
    payload[..8].copy_from_slice(&number.to_le_bytes());
    payload
}

fn number_of(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload[..8].try_into().unwrap())
}

#[tokio::test]
async fn a_full_disk_holds_publishers_back_and_spool_recovers_when_space_is_freed() {
    // Goal: filling the volume holds publishers back (3.1.1: acknowledgements withheld; MQTT
    // 5: quota exceeded) instead of stopping the log; spool keeps accepting clients; it starts
    // again on the full volume after a SIGKILL; the offline subscriber gets every acknowledged
    // message in order, and as it drains, publishers are acknowledged again.
    let Some(volume) = SmallVolume::mount("40m") else {
        return;
    };
    let data = volume.path().join("data");
    let spool = Spool::start(&data, &["--max-packet-size", "65536"]);
    let mut sink = connect(options(spool.addr, "sink", false));
    sink.connected().await;
    sink.subscribe("fill/t", QoS::AtLeastOnce).await;
    sink.client.disconnect().await.unwrap();

    let acknowledged = fill_until_held_back(&spool).await;
    assert!(
        acknowledged > 100 && acknowledged < 2000,
        "{acknowledged} acknowledged"
    );
    // An MQTT 5 publisher is told (once what the log gave back when it sealed its segment,
    // the zeros it had written ahead, is used up).
    let (mut v5, _) = raw_connect(spool.addr, &connect_v5("v5")).await;
    let mut told = false;
    for packet_id in 1..=200 {
        let publish = publish_v5(1, false, packet_id, "elsewhere", &numbered(0));
        v5.write_all(&publish).await.unwrap();
        let (kind, body) = read_packet(&mut v5).await;
        assert_eq!((kind, &body[..2]), (0x40, &packet_id.to_be_bytes()[..]));
        if body.get(2) == Some(&0x97) {
            told = true;
            break;
        }
    }
    assert!(told, "quota exceeded (0x97) for an MQTT 5 publisher");
    // spool still serves: a new client is accepted.
    let mut late = connect(options(spool.addr, "late", true));
    late.connected().await;

    spool.kill();
    let spool = Spool::start(&data, &["--max-packet-size", "65536"]);
    let mut sink = connect(options(spool.addr, "sink", false));
    assert!(sink.connected().await, "the session survived");
    let mut publisher = connect(options(spool.addr, "after", true));
    publisher.connected().await;
    let more: Vec<u64> = (1_000_000..1_000_500).collect();
    let numbers = more.clone();
    let publishing = tokio::spawn(async move {
        for number in numbers {
            publisher
                .publish("fill/t", QoS::AtLeastOnce, numbered(number))
                .await;
        }
        publisher.acks(500).await;
    });
    // Every acknowledged message first, in order (duplicates allowed), then the new ones.
    let mut next = 0;
    let mut expected_more = more.iter().copied().peekable();
    while expected_more.peek().is_some() {
        let publish = sink.publishes(1).await.remove(0);
        let number = number_of(&publish.payload);
        if number < 1_000_000 {
            assert!(number <= next, "gap before {number}: expected {next}");
            next = next.max(number + 1);
        } else {
            assert!(
                next >= acknowledged,
                "only {next} of {acknowledged} arrived"
            );
            assert_eq!(
                Some(number),
                expected_more.next(),
                "the new messages in order"
            );
        }
    }
    tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("the new publishes were acknowledged once space was freed")
        .unwrap();
}

/// Publishes numbered messages until spool stops acknowledging them; returns how many it did.
async fn fill_until_held_back(spool: &Spool) -> u64 {
    let mut filler = connect(options(spool.addr, "filler", true));
    filler.connected().await;
    let client = filler.client.clone();
    tokio::spawn(async move {
        for number in 0..2000 {
            let sent = client
                .publish("fill/t", QoS::AtLeastOnce, false, numbered(number))
                .await;
            if sent.is_err() {
                return;
            }
        }
    });
    let mut acknowledged = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), filler.events.recv()).await {
            Ok(Some(Seen::PubAck(_))) => acknowledged += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return acknowledged,
        }
    }
}
