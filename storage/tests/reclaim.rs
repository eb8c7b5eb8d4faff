//! `Wal::reclaim`: the log's space follows what its consumers still need. Old segments go; the
//! few records still needed in them are moved first and keep their sequence numbers; moved
//! records survive a power loss, read back in order, and are dropped once no longer needed.
#![allow(clippy::unwrap_used)]

mod common;

use common::{open_faulty, payload_for, small_segments};
use spool_storage::{CrashMode, Error, FaultyFs, Liveness, LockPolicy, Wal, WalOptions};

async fn append(wal: &Wal, count: u64) {
    for i in 1..=count {
        assert_eq!(wal.append(1, payload_for(i, 0)).await.unwrap(), i);
    }
}

/// Every record from `from` on, as sequence numbers.
fn seqs_from(wal: &Wal, from: u64) -> Vec<u64> {
    let mut reader = wal.reader(from).unwrap();
    let mut seqs = Vec::new();
    while let Some(record) = reader.try_next().unwrap() {
        assert_eq!(
            record.payload,
            payload_for(record.seq, 0),
            "record {}",
            record.seq
        );
        seqs.push(record.seq);
    }
    seqs
}

#[tokio::test]
async fn a_few_live_records_do_not_keep_their_segments() {
    // Goal: two old records still needed (3 and 50) cost their own bytes, not the segments
    // written after them: those go, the two are moved, keep their numbers and read back in
    // order before the rest; records no one needs are gone.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    append(&wal, 300).await;
    let segments_before = wal.segment_count();
    let usage_before = wal.usage_bytes();
    let report = wal
        .reclaim(&Liveness {
            needed_from: 290,
            live: vec![3, 50],
        })
        .unwrap();
    assert_eq!(report.records_moved, 2);
    assert!(
        report.segments_removed > 0 && report.bytes_freed > 0,
        "{report:?}"
    );
    assert!(wal.segment_count() < segments_before);
    assert!(wal.usage_bytes() < usage_before);
    let first = wal.first_seq();
    assert!(
        first > 50 && first <= 290,
        "first segment now starts at {first}"
    );
    assert_eq!(wal.read(3).unwrap().unwrap().payload, payload_for(3, 0));
    assert_eq!(wal.read(50).unwrap().unwrap().payload, payload_for(50, 0));
    assert_eq!(wal.read(4).unwrap(), None, "not needed, removed");
    let expected: Vec<u64> = [3, 50].into_iter().chain(first..=300).collect();
    assert_eq!(seqs_from(&wal, 1), expected);
    assert_eq!(seqs_from(&wal, 4), expected[1..]);

    drop(wal);
    fs.crash(CrashMode::PowerLoss);
    let (wal, report) = open_faulty(&fs, small_segments()).unwrap();
    assert_eq!(report.moved_records, 2);
    assert_eq!(
        seqs_from(&wal, 1),
        expected,
        "moved records survive a power loss"
    );
    assert_eq!(wal.append(1, payload_for(301, 0)).await.unwrap(), 301);
}

#[tokio::test]
async fn moved_records_go_once_no_longer_needed() {
    // Goal: a moved file that lost half its bytes is rewritten without the dead records, and
    // removed once none is left, across restarts.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    append(&wal, 300).await;
    let keep = |live: Vec<u64>| Liveness {
        needed_from: 290,
        live,
    };
    wal.reclaim(&keep(vec![3, 50])).unwrap();
    let with_two = wal.usage_bytes();
    let report = wal.reclaim(&keep(vec![50])).unwrap();
    assert_eq!(report.moved_files_compacted, 1);
    assert!(wal.usage_bytes() < with_two);
    assert_eq!(wal.read(3).unwrap(), None);
    assert_eq!(seqs_from(&wal, 1)[0], 50);
    drop(wal);
    let (wal, report) = open_faulty(&fs, small_segments()).unwrap();
    assert_eq!(report.moved_records, 1);
    let report = wal.reclaim(&keep(vec![])).unwrap();
    assert_eq!(report.moved_files_compacted, 1);
    assert_eq!(seqs_from(&wal, 1)[0], wal.first_seq());
    drop(wal);
    let (_, report) = open_faulty(&fs, small_segments()).unwrap();
    assert_eq!(report.moved_records, 0);
}

#[tokio::test]
async fn a_dense_segment_stays_and_keeps_those_after_it() {
    // Goal: a segment most of whose records are still needed is not copied (without quota
    // pressure), and segments only go from the front, so the log stays contiguous.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    append(&wal, 300).await;
    let first_segment: Vec<u64> = (1..=8).collect();
    let report = wal
        .reclaim(&Liveness {
            needed_from: 290,
            live: first_segment,
        })
        .unwrap();
    assert_eq!(report.segments_removed, 0);
    assert_eq!(report.records_moved, 0);
    assert_eq!(wal.first_seq(), 1);
}

#[tokio::test]
async fn a_damaged_moved_file_stops_the_open() {
    // Goal: moved files are renamed into place whole, so a bad byte in one is corruption of
    // acknowledged data: the open is refused, naming the file.
    let fs = FaultyFs::new();
    let (wal, _) = open_faulty(&fs, small_segments()).unwrap();
    append(&wal, 300).await;
    wal.reclaim(&Liveness {
        needed_from: 290,
        live: vec![3, 50],
    })
    .unwrap();
    drop(wal);
    let path = std::path::Path::new("/data/wal/00000000000000000003.moved");
    fs.edit_file(path, |bytes| {
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
    });
    let error = open_faulty(&fs, small_segments()).unwrap_err();
    assert!(
        matches!(&error, spool_storage::Error::Corrupt { path: p, .. } if p == path),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_move_held_back_for_room_is_made_once_there_is_room() {
    // Goal: when a reclaim cannot move a segment's few live records for want of disk space
    // (not because the segment is dense), the next reclaim with room moves them: the segment
    // is not remembered as too dense, which would pin the log for good.
    let fs = FaultyFs::new();
    let options = spool_storage::WalOptions {
        disk_free_min_bytes: 0,
        ..small_segments()
    };
    let (wal, _) = open_faulty(&fs, options).unwrap();
    append(&wal, 300).await;
    let dir = std::path::Path::new("/data/wal");
    let probe = 1 << 30;
    fs.set_capacity(Some(probe));
    let used = probe - spool_storage::FileSystem::available_bytes(&fs, dir).unwrap();
    fs.set_capacity(Some(used + 100)); // room for no moved file at all
    let live = Liveness {
        needed_from: 290,
        live: vec![3],
    };
    let cramped = wal.reclaim(&live).unwrap();
    assert_eq!((cramped.records_moved, cramped.segments_removed), (0, 0));
    fs.set_capacity(None);
    let roomy = wal.reclaim(&live).unwrap();
    assert_eq!(roomy.records_moved, 1);
    assert!(roomy.segments_removed > 0);
}

#[tokio::test]
async fn a_fenced_writer_leaves_the_moved_records_alone() {
    // Goal: law 3 for moved files, whose names are the same in every epoch: a writer fenced by
    // a newer one (a volume mounted twice) must not remove moved records the newer one needs,
    // even when it has no segment left to remove.
    let fs = FaultyFs::new();
    let unlocked = WalOptions {
        lock: LockPolicy::SkipForFencingTests,
        ..small_segments()
    };
    let (old, _) = open_faulty(&fs, unlocked.clone()).unwrap();
    append(&old, 300).await;
    let live = |live: Vec<u64>| Liveness {
        needed_from: 290,
        live,
    };
    assert_eq!(old.reclaim(&live(vec![3, 50])).unwrap().records_moved, 2);
    let (new, _) = open_faulty(&fs, unlocked).unwrap();
    let fenced = old.reclaim(&live(Vec::new())).unwrap_err();
    assert!(matches!(fenced, Error::Fenced { .. }), "{fenced:?}");
    assert_eq!(seqs_from(&new, 1)[..2], [3, 50]);
}
