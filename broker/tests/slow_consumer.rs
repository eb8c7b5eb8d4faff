//! A subscriber that stops reading for a while: spool never waits on it and never drops for
//! it, and once it reads again everything queued meanwhile arrives, with no other event
//! needed to restart delivery, and a QoS 2 PUBREL is not lost behind QoS 0 messages.
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    PUBREC, PUBREL, Spool, ack, connect_v311, publish_v311, raw_connect, read_packet,
    subscribe_v311,
};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_subscriber_that_stops_reading_gets_everything_once_it_reads_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let (mut subscriber, _) = raw_connect(spool.addr, &connect_v311("slow", true)).await;
    subscriber
        .write_all(&subscribe_v311(1, "q0", 0))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut subscriber).await.0, 0x90);
    subscriber
        .write_all(&subscribe_v311(2, "q2", 2))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut subscriber).await.0, 0x90);
    let (mut publisher, _) = raw_connect(spool.addr, &connect_v311("fast", true)).await;
    publisher
        .write_all(&publish_v311(2, false, 1, "q2", b"exactly once"))
        .await
        .unwrap();
    let (kind, body) = read_packet(&mut subscriber).await;
    assert_eq!(kind, 0x34, "the QoS 2 message");
    let packet_id = u16::from_be_bytes([body[4], body[5]]);

    // The subscriber answers PUBREC but reads nothing while 3000 QoS 0 messages of 1 KB (far
    // more than its socket and its channel in spool hold) come in, then stop.
    subscriber.write_all(&ack(PUBREC, packet_id)).await.unwrap();
    for _ in 0..3000 {
        let message = publish_v311(0, false, 0, "q0", &[7; 1000]);
        publisher.write_all(&message).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (mut qos0, mut released) = (0, false);
    let wait = Duration::from_secs(3);
    while let Ok((kind, body)) = tokio::time::timeout(wait, read_packet(&mut subscriber)).await {
        match kind {
            0x30 => qos0 += 1,
            PUBREL => {
                assert_eq!(body, packet_id.to_be_bytes());
                released = true;
            }
            other => panic!("unexpected packet {other:#04x}"),
        }
        if qos0 == 3000 && released {
            return;
        }
    }
    panic!("received {qos0} of 3000 QoS 0 messages; PUBREL received: {released}");
}
