//! The WAL's behaviour seen through its public API: appends resolve in order once durable,
//! readers see exactly the durable records, group commit batches fsyncs, and the bounds (queue,
//! quota, record size), retention, the lock and fencing hold. Runs on the fault-injecting file
//! system unless a test needs the real one.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::{open_faulty, payload_for, read_all, small_segments};
use spool_storage::{
    CrashMode, Error, FaultyFs, LockPolicy, SyncPolicy, Wal, WalOptions, WriterMode,
};
use std::time::Duration;

#[tokio::test]
async fn appends_resolve_with_consecutive_sequence_numbers_and_read_back() {
    // Goal: what was appended is read back, in order, across segment rolls.
    let fs = FaultyFs::new();
    let (wal, report) = open_faulty(&fs, small_segments()).unwrap();
    assert_eq!((report.records, report.first_seq), (0, 1));
    for expected in 1..=100u64 {
        let seq = wal.append(1, payload_for(expected, 0)).await.unwrap();
        assert_eq!(seq, expected);
    }
    assert!(wal.segment_count() > 3, "small segments must have rolled");
    let records = read_all(&wal);
    assert_eq!(records.len(), 100);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.seq, i as u64 + 1);
        assert_eq!(record.kind, 1);
        assert_eq!(record.payload, payload_for(record.seq, 0));
    }
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs() {
    // Goal: group commit. 1000 appends submitted at once need far fewer than 1000 fsyncs, and
    // each still resolves only with its own sequence number.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, WalOptions::default()).unwrap();
    let syncs_before = fs.stats().file_syncs;
    let mut pending = Vec::new();
    for i in 1..=1000u64 {
        pending.push(wal.submit(2, payload_for(i, 0)).await.unwrap());
    }
    for (i, append) in pending.into_iter().enumerate() {
        assert_eq!(append.seq(), i as u64 + 1);
        assert_eq!(append.await.unwrap(), i as u64 + 1);
    }
    let syncs = fs.stats().file_syncs - syncs_before;
    assert!(
        (1..100).contains(&syncs),
        "1000 appends took {syncs} fsyncs"
    );
    assert_eq!(wal.durable_seq(), 1000);
}

#[tokio::test]
async fn reader_waits_for_new_records_and_follows_rolls() {
    // Goal: a reader at the end of the log wakes up for each new record, without polling.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    let mut reader = wal.reader(1).unwrap();
    let consumer = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 200 {
            let record = reader.next().await.unwrap();
            seen.push(record.seq);
        }
        seen
    });
    for i in 1..=200u64 {
        wal.append(3, payload_for(i, 0)).await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn reader_starts_anywhere_and_sees_only_durable_records() {
    // Goal: readers start at any sequence (the sparse index) and never see past durability.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    for i in 1..=300u64 {
        wal.append(1, payload_for(i, 0)).await.unwrap();
    }
    for start in [1u64, 2, 37, 150, 299, 300] {
        let mut reader = wal.reader(start).unwrap();
        let first = reader.try_next().unwrap().unwrap();
        assert_eq!(first.seq, start);
        assert_eq!(first.payload, payload_for(start, 0));
    }
    let mut reader = wal.reader(301).unwrap();
    assert_eq!(reader.try_next().unwrap(), None);
    // Stall the disk: the next append is written but cannot become durable.
    fs.fail_syncs_after(0);
    let stalled = wal.append(1, payload_for(301, 0)).await;
    assert!(
        matches!(stalled, Err(Error::Poisoned { .. })),
        "{stalled:?}"
    );
    assert_eq!(
        reader.try_next().unwrap(),
        None,
        "a never-synced record must stay invisible"
    );
}

#[tokio::test]
async fn failed_fsync_poisons_the_log_for_good() {
    // Goal: after one failed fsync every append fails with the same cause; nothing is retried.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, WalOptions::default()).unwrap();
    wal.append(1, Bytes::from_static(b"durable")).await.unwrap();
    fs.fail_syncs_after(0);
    let first = wal
        .append(1, Bytes::from_static(b"lost"))
        .await
        .unwrap_err();
    fs.clear_faults();
    let second = wal
        .append(1, Bytes::from_static(b"refused"))
        .await
        .unwrap_err();
    assert!(matches!(first, Error::Poisoned { .. }));
    assert_eq!(first.to_string(), second.to_string());
    assert!(wal.try_submit(1, Bytes::new()).is_err());
    assert!(wal.close().is_err());
}

#[tokio::test]
async fn records_a_killed_process_wrote_but_never_synced_are_synced_at_open() {
    // Goal: after a process crash the page cache may hold records that were written but not
    // fdatasynced. The next open counts them as durable (and the broker acknowledges resends
    // of them), so it must make them durable first, or a power loss would take them back.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, WalOptions::default()).unwrap();
    wal.append(1, Bytes::from_static(b"synced")).await.unwrap();
    fs.fail_syncs_after(0);
    let unsynced = wal.append(1, Bytes::from_static(b"written only")).await;
    assert!(unsynced.is_err());
    let _ = wal.close();
    drop(wal); // the process dies; its writes stay in the page cache
    fs.clear_faults();

    let (wal, _) = open_faulty(&fs, WalOptions::default()).unwrap();
    let durable = wal.durable_seq();
    assert_eq!(durable, 2, "recovery found the written record");
    wal.close().unwrap();
    drop(wal);
    fs.crash(CrashMode::PowerLoss);
    let (wal, _) = open_faulty(&fs, WalOptions::default()).unwrap();
    assert_eq!(
        read_all(&wal).len(),
        2,
        "what the open called durable survived"
    );
}

#[tokio::test]
async fn waiting_for_durability_ends_with_the_log_failure() {
    // Goal: a caller waiting for a record it did not append (a resent QoS 2 publish) is not
    // left waiting for good when the log fails.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, WalOptions::default()).unwrap();
    wal.append(1, Bytes::from_static(b"durable")).await.unwrap();
    fs.fail_syncs_after(0);
    let lost = wal.submit(1, Bytes::from_static(b"lost")).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(10), wal.wait_durable(lost.seq()));
    assert!(matches!(waited.await, Ok(Err(Error::Poisoned { .. }))));
    assert!(
        wal.wait_durable(1).await.is_ok(),
        "what was durable stays so"
    );
}

#[tokio::test]
async fn enospc_in_a_write_waits_for_room_instead_of_stopping_the_log() {
    // Goal: a write that meets a full disk (ENOSPC, here past the reserve check) made nothing
    // durable: the writer waits and writes again once there is room, the appends in flight
    // complete then, and the log was never poisoned. A close while it waits fails them.
    let fs = FaultyFs::new();
    let options = WalOptions {
        disk_free_min_bytes: 0,
        ..small_segments()
    };
    let (wal, _) = open_faulty(&fs, options.clone()).unwrap();
    for i in 1..=10u64 {
        wal.append(1, payload_for(i, 0)).await.unwrap();
    }
    fs.fail_writes_after_bytes(100);
    let pending = wal.submit(1, payload_for(11, 0)).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(300), pending).await;
    assert!(waiting.is_err(), "the append waits for room");
    fs.clear_faults();
    let seq = wal.append(1, payload_for(12, 0)).await.unwrap();
    assert_eq!(seq, 12, "the waiting append went through first");
    assert_eq!(read_all(&wal).len(), 12);

    fs.fail_writes_after_bytes(0);
    let pending = wal.submit(1, payload_for(13, 0)).await.unwrap();
    wal.close().unwrap_err();
    assert!(pending.await.is_err(), "closed while waiting for room");
    fs.clear_faults();
    fs.crash(spool_storage::CrashMode::PowerLoss);
    let (wal, _) = open_faulty(&fs, options).unwrap();
    assert_eq!(read_all(&wal).len(), 12, "what was acknowledged stays");
}

#[tokio::test]
async fn a_full_disk_holds_appends_back_until_space_is_freed() {
    // Goal: below the free-space reserve, appends are refused as back-pressure (`DiskFull`),
    // not as a failure; the log reopens on the full disk (its epoch file fits the reserve);
    // freeing space lets appends go on, and a waiter on `watch_space_freed` is told.
    // No zeros are allocated ahead: the writer seals the active segment once appends are
    // refused, and trimming them would give room back at a moment the test cannot know.
    let fs = FaultyFs::new();
    let options = WalOptions {
        disk_free_min_bytes: 8 * 1024,
        preallocate_bytes: 0,
        ..small_segments()
    };
    fs.set_capacity(Some(64 * 1024));
    let (wal, _) = open_faulty(&fs, options.clone()).unwrap();
    let mut last = 0;
    let refused = loop {
        match wal.append(1, payload_for(last + 1, 0)).await {
            Ok(seq) => last = seq,
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, Error::DiskFull { .. }), "{refused:?}");
    assert!(refused.is_back_pressure());
    drop(wal);
    let (wal, _) = open_faulty(&fs, options).unwrap();
    assert_eq!(
        read_all(&wal).len() as u64,
        last,
        "reopened on the full disk"
    );
    assert!(matches!(
        wal.append(1, payload_for(last + 1, 0)).await,
        Err(Error::DiskFull { .. })
    ));
    let mut freed = wal.watch_space_freed();
    freed.borrow_and_update();
    wal.remove_segments_below(last).unwrap();
    assert!(freed.has_changed().unwrap(), "waiters are told");
    assert_eq!(
        wal.append(1, payload_for(last + 1, 0)).await.unwrap(),
        last + 1
    );
}

#[tokio::test]
async fn quota_refuses_appends_until_retention_frees_space() {
    // Goal: a full quota is back-pressure (a typed error), and retention makes room again.
    let fs = FaultyFs::new();
    let options = WalOptions {
        quota_bytes: Some(16 * 1024),
        ..small_segments()
    };
    let (wal, _) = open_faulty(&fs, options).unwrap();
    let mut last = 0;
    let refused = loop {
        match wal.append(1, payload_for(last + 1, 0)).await {
            Ok(seq) => last = seq,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(refused, Error::QuotaExceeded { quota_bytes: 16384 }),
        "{refused:?}"
    );
    assert!(refused.is_back_pressure());
    assert!(wal.usage_bytes() <= 16 * 1024);
    let freed = wal.remove_segments_below(last).unwrap();
    assert!(freed.segments_removed > 0 && freed.bytes_freed > 0);
    let seq = wal.append(1, payload_for(last + 1, 0)).await.unwrap();
    assert_eq!(
        seq,
        last + 1,
        "no sequence number is skipped by a refused append"
    );
}

#[tokio::test]
async fn retention_removes_only_whole_segments_below_the_floor() {
    // Goal: segments wholly below the lowest needed sequence go; everything from it stays
    // readable, the active segment is never removed, and removal survives a restart.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    for i in 1..=200u64 {
        wal.append(1, payload_for(i, 0)).await.unwrap();
    }
    let segments_before = wal.segment_count();
    wal.remove_segments_below(120).unwrap();
    let first = wal.first_seq();
    assert!(first > 1 && first <= 120, "first sequence now {first}");
    assert!(wal.segment_count() < segments_before);
    let mut reader = wal.reader(120).unwrap();
    assert_eq!(reader.try_next().unwrap().unwrap().seq, 120);
    let mut reader = wal.reader(1).unwrap();
    assert_eq!(
        reader.try_next().unwrap().unwrap().seq,
        first,
        "a reader from a removed record starts at the first one kept"
    );
    assert_eq!(wal.read(1).unwrap(), None);
    wal.remove_segments_below(u64::MAX).unwrap();
    assert_eq!(wal.segment_count(), 1, "the active segment stays");
    let last_first = wal.first_seq();
    drop(wal);
    fs.crash(spool_storage::CrashMode::PowerLoss);
    let (wal, report) = open_faulty(&fs, small_segments()).unwrap();
    assert_eq!(report.first_seq, last_first);
    assert_eq!(report.last_seq, 200);
    assert_eq!(wal.append(1, payload_for(201, 0)).await.unwrap(), 201);
}

#[tokio::test]
async fn bounded_queue_reports_full_without_waiting() {
    // Goal: law 5: the writer's queue is bounded; try_submit says QueueFull instead of growing.
    // A long linger holds the writer back, so the queue must fill.
    let fs = FaultyFs::new();
    let options = WalOptions {
        queue_bytes_max: 2048,
        record_payload_bytes_max: 1024,
        segment_size_bytes: 8192,
        batch_linger: Duration::from_secs(60),
        ..WalOptions::default()
    };
    let (wal, _) = open_faulty(&fs, options).unwrap();
    let mut accepted = Vec::new();
    let full = loop {
        match wal.try_submit(1, Bytes::from(vec![7u8; 500])) {
            Ok(pending) => accepted.push(pending),
            Err(e) => break e,
        }
    };
    assert!(matches!(full, Error::QueueFull), "{full:?}");
    assert_eq!(accepted.len(), 3, "2048 bytes hold three 517-byte frames");
    wal.close().unwrap();
    for pending in accepted {
        pending.await.unwrap();
    }
}

#[tokio::test]
async fn oversized_and_reserved_records_are_refused() {
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    let big = wal
        .append(1, Bytes::from(vec![0u8; 1025]))
        .await
        .unwrap_err();
    assert!(matches!(
        big,
        Error::RecordTooLarge {
            size: 1025,
            max: 1024
        }
    ));
    assert!(wal.append(0x80, Bytes::new()).await.is_err());
    assert_eq!(wal.append(0x7f, Bytes::new()).await.unwrap(), 1);
}

#[test]
fn second_open_of_a_locked_directory_fails() {
    // Goal: law 3 on the real file system: flock refuses a second writer, also in-process.
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let second = Wal::open(dir.path(), WalOptions::default()).unwrap_err();
    assert!(matches!(second, Error::Locked { .. }), "{second:?}");
    assert!(
        second
            .to_string()
            .contains("locked by another spool instance")
    );
    drop(wal);
    Wal::open(dir.path(), WalOptions::default()).unwrap();
}

#[tokio::test]
async fn a_newer_epoch_fences_the_old_writer() {
    // Goal: law 3 where flock cannot help (a volume mounted twice): the second opener bumps the
    // epoch, and the first stops writing when it rolls a segment.
    let fs = FaultyFs::new();
    let unlocked = WalOptions {
        lock: LockPolicy::SkipForFencingTests,
        ..small_segments()
    };
    let (old, _) = open_faulty(&fs, unlocked.clone()).unwrap();
    old.append(1, payload_for(1, 0)).await.unwrap();
    let (new, _) = open_faulty(&fs, unlocked).unwrap();
    assert!(new.epoch() > old.epoch());
    let mut fenced = None;
    for i in 2..100u64 {
        if let Err(e) = old.append(1, payload_for(i, 0)).await {
            fenced = Some(e);
            break;
        }
    }
    let fenced = fenced.expect("the old writer must be fenced by its next roll");
    assert!(matches!(fenced, Error::Fenced { .. }), "{fenced:?}");
    assert!(
        old.append(1, Bytes::new()).await.is_err(),
        "fencing is sticky"
    );
}

#[tokio::test]
async fn unsafe_no_fsync_mode_never_syncs_segments() {
    // Goal: the benchmark-only mode really skips fdatasync (and is therefore not the default).
    assert_eq!(WalOptions::default().sync, SyncPolicy::Always);
    let fs = FaultyFs::new();
    let options = WalOptions {
        sync: SyncPolicy::UnsafeNoFsync,
        ..WalOptions::default()
    };
    let (wal, _) = open_faulty(&fs, options).unwrap();
    let before = fs.stats().file_syncs;
    for i in 1..=10u64 {
        wal.append(1, payload_for(i, 0)).await.unwrap();
    }
    assert_eq!(fs.stats().file_syncs, before);
}

#[test]
fn inconsistent_options_are_refused() {
    let fs = FaultyFs::new();
    for options in [
        WalOptions {
            segment_size_bytes: 100,
            ..WalOptions::default()
        },
        WalOptions {
            record_payload_bytes_max: u32::MAX,
            ..WalOptions::default()
        },
        WalOptions {
            queue_bytes_max: 10,
            ..WalOptions::default()
        },
        WalOptions {
            batch_records_max: 0,
            ..WalOptions::default()
        },
    ] {
        let err = open_faulty(&fs, options).unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{err:?}");
    }
}

#[tokio::test]
async fn close_drains_queued_appends() {
    // Goal: close waits until everything queued is durable, then refuses new appends.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, WalOptions::default()).unwrap();
    let mut pending = Vec::new();
    for i in 1..=50u64 {
        pending.push(wal.submit(1, payload_for(i, 0)).await.unwrap());
    }
    wal.close().unwrap();
    for append in pending {
        append.await.unwrap();
    }
    assert!(matches!(
        wal.append(1, Bytes::new()).await,
        Err(Error::Closed)
    ));
    assert_eq!(wal.durable_seq(), 50);
}

#[tokio::test]
async fn a_disk_that_fills_anywhere_in_a_write_or_a_roll_loses_and_repeats_nothing() {
    // Goal: wherever the disk fills up (inside a write, in the zeros written ahead, or while a
    // new segment is created), the appends wait and then complete once there is room, with
    // consecutive sequence numbers and every record read back once, in order. Method: the
    // same 60 appends on disks filled at 40 different sizes around the second segment roll.
    for capacity in (7000..11000).step_by(100) {
        let fs = FaultyFs::new();
        let options = WalOptions {
            disk_free_min_bytes: 0,
            ..small_segments()
        };
        fs.set_capacity(Some(capacity));
        let (wal, _) = open_faulty(&fs, options.clone()).unwrap();
        let mut pending = Vec::new();
        for i in 1..=60u64 {
            pending.push(wal.submit(1, payload_for(i, 0)).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        fs.set_capacity(None);
        for (i, append) in pending.into_iter().enumerate() {
            assert_eq!(append.await.unwrap(), i as u64 + 1, "capacity {capacity}");
        }
        drop(wal);
        fs.crash(CrashMode::PowerLoss);
        let (wal, _) = open_faulty(&fs, options).unwrap();
        let records = read_all(&wal);
        assert_eq!(records.len(), 60, "capacity {capacity}");
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.payload, payload_for(i as u64 + 1, 0));
        }
    }
}

#[tokio::test]
async fn a_segment_larger_than_the_free_space_is_sealed_so_it_can_be_freed() {
    // Goal: when the disk fills before the active segment does, the writer seals that segment
    // (only sealed ones are reclaimed), so once its records are consumed the space comes
    // back; otherwise a volume smaller than a segment would stay full for good.
    let fs = FaultyFs::new();
    let options = WalOptions {
        segment_size_bytes: 1 << 20,
        disk_free_min_bytes: 4096,
        ..small_segments()
    };
    fs.set_capacity(Some(64 * 1024));
    let (wal, _) = open_faulty(&fs, options).unwrap();
    let mut last = 0;
    while let Ok(seq) = wal.append(1, payload_for(last + 1, 0)).await {
        last = seq;
    }
    assert_eq!(wal.segment_count(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while wal.segment_count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "never sealed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = wal.remove_segments_below(last + 1).unwrap();
    assert_eq!(report.segments_removed, 1);
    assert_eq!(
        wal.append(1, payload_for(last + 1, 0)).await.unwrap(),
        last + 1
    );
}

#[tokio::test]
async fn a_write_that_meets_a_full_disk_seals_its_segment_so_it_can_be_freed() {
    // Goal: when something else fills the volume and a write fails part-way (ENOSPC) in a
    // segment that holds consumed records, the writer seals that segment and writes the
    // records again in a new one, so that consuming the old records frees the space the
    // append waits for; nothing is lost or renumbered, and nothing half-written survives.
    let fs = FaultyFs::new();
    let options = WalOptions {
        segment_size_bytes: 1 << 20,
        disk_free_min_bytes: 0,
        preallocate_bytes: 0,
        ..small_segments()
    };
    let (wal, _) = open_faulty(&fs, options.clone()).unwrap();
    let record = |seq: u64| Bytes::from(vec![u8::try_from(seq % 251).unwrap(); 1000]);
    for seq in 1..=40 {
        assert_eq!(wal.append(1, record(seq)).await.unwrap(), seq);
    }
    // Another tenant of the volume leaves room for a segment header, not for a record.
    fs.set_capacity(Some(fs.used_bytes() + 500));
    let waiting = tokio::spawn({
        let wal = wal.clone();
        async move { wal.append(1, record(41)).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while wal.segment_count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the segment was never sealed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiting.is_finished(), "no room for the record yet");
    let report = wal.remove_segments_below(41).unwrap();
    assert_eq!(report.segments_removed, 1, "the consumed records' segment");
    let appended = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the append goes on once the space is freed")
        .unwrap();
    assert_eq!(appended.unwrap(), 41, "no sequence number skipped");
    fs.crash(CrashMode::PowerLoss);
    drop(wal);
    let (wal, _) = open_faulty(&fs, options).unwrap();
    let records = read_all(&wal);
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].seq, &records[0].payload), (41, &record(41)));
}

#[tokio::test]
async fn a_writer_run_by_the_caller_makes_records_durable_only_when_asked() {
    // Goal: with `WriterMode::Caller` (deterministic simulations), appends stay queued until
    // the caller writes them, a power cut before that loses exactly them, and a close writes
    // what is queued.
    let fs = FaultyFs::new();
    let options = WalOptions {
        writer: WriterMode::Caller,
        ..small_segments()
    };
    let (wal, _) = open_faulty(&fs, options.clone()).unwrap();
    let first = wal.submit(1, payload_for(1, 0)).await.unwrap();
    let second = wal.submit(1, payload_for(2, 0)).await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(
        wal.durable_seq(),
        0,
        "nothing written before the caller asks"
    );
    assert_eq!(wal.write_queued(), 2);
    assert_eq!((first.await.unwrap(), second.await.unwrap()), (1, 2));
    let lost = wal.submit(1, payload_for(3, 0)).await.unwrap();
    fs.crash(CrashMode::PowerLoss);
    drop(wal);
    assert!(
        lost.await.is_err(),
        "queued, never written: not acknowledged"
    );
    let (wal, _) = open_faulty(&fs, options.clone()).unwrap();
    assert_eq!(read_all(&wal).len(), 2, "only what was written survived");
    let closed = wal.submit(1, payload_for(3, 0)).await.unwrap();
    wal.close().unwrap();
    assert_eq!(closed.await.unwrap(), 3, "a close writes what is queued");
}
