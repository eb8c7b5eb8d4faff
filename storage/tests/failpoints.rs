//! Failpoints on the real file system (built only with `--features failpoints`, which
//! scripts/test.sh turns on): an fsync, a write, a segment roll or a retention removal fails,
//! and afterwards, with the failpoint cleared and the log reopened, no acknowledged record is
//! lost and the log is contiguous.
#![allow(clippy::unwrap_used)]

mod common;

use common::{payload_for, read_all, runtime, small_segments};
use spool_storage::{Error, Wal};
use std::path::Path;

/// Appends until one fails (or `limit` succeed); returns the acknowledged sequence numbers.
fn append_until_failure(wal: &Wal, from: u64, limit: u64) -> (Vec<u64>, Option<Error>) {
    runtime().block_on(async {
        let mut acknowledged = Vec::new();
        for i in from..from + limit {
            match wal.append(1, payload_for(i, 0)).await {
                Ok(seq) => acknowledged.push(seq),
                Err(e) => return (acknowledged, Some(e)),
            }
        }
        (acknowledged, None)
    })
}

fn assert_log_holds(dir: &Path, acknowledged: &[u64]) {
    let (wal, _) = Wal::open(dir, small_segments()).unwrap();
    let records = read_all(&wal);
    let first = wal.first_seq();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.seq, first + i as u64);
        assert_eq!(record.payload, payload_for(record.seq, 0));
    }
    let last = records.last().map_or(first - 1, |r| r.seq);
    for &seq in acknowledged.iter().filter(|&&s| s >= first) {
        assert!(seq <= last, "acknowledged {seq} lost");
    }
}

fn failing_io_point(name: &str, after_successes: usize) -> (tempfile::TempDir, Vec<u64>, Error) {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_segments()).unwrap();
    let (mut acknowledged, failure) = append_until_failure(&wal, 1, 20);
    assert!(failure.is_none());
    fail::cfg(name, &format!("{after_successes}*off->return")).unwrap();
    let (more, failure) = append_until_failure(&wal, 21, 500);
    fail::remove(name);
    acknowledged.extend(more);
    let failure = failure.unwrap_or_else(|| panic!("failpoint {name} never fired"));
    (dir, acknowledged, failure)
}

#[test]
fn failed_fsync_poisons_and_loses_nothing_acknowledged() {
    let scenario = fail::FailScenario::setup();
    let (dir, acknowledged, failure) = failing_io_point("storage.segment.fsync", 3);
    assert!(matches!(failure, Error::Poisoned { .. }), "{failure:?}");
    assert!(failure.to_string().contains("fsync"), "{failure}");
    assert_log_holds(dir.path(), &acknowledged);
    scenario.teardown();
}

#[test]
fn failed_write_poisons_and_loses_nothing_acknowledged() {
    let scenario = fail::FailScenario::setup();
    let (dir, acknowledged, failure) = failing_io_point("storage.segment.write", 5);
    assert!(matches!(failure, Error::Poisoned { .. }), "{failure:?}");
    assert_log_holds(dir.path(), &acknowledged);
    scenario.teardown();
}

#[test]
fn failed_segment_roll_poisons_and_loses_nothing_acknowledged() {
    let scenario = fail::FailScenario::setup();
    let (dir, acknowledged, failure) = failing_io_point("storage.segment.roll", 1);
    assert!(matches!(failure, Error::Poisoned { .. }), "{failure:?}");
    assert_log_holds(dir.path(), &acknowledged);
    scenario.teardown();
}

#[test]
fn failed_retention_removal_leaves_a_contiguous_log() {
    // Goal: a segment removal that fails midway leaves the oldest segments gone and the rest
    // intact: never a hole in the middle.
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_segments()).unwrap();
    let (acknowledged, failure) = append_until_failure(&wal, 1, 200);
    assert!(failure.is_none());
    fail::cfg("storage.segment.remove", "2*off->return").unwrap();
    let err = wal.remove_segments_below(150).unwrap_err();
    fail::remove("storage.segment.remove");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    let first = wal.first_seq();
    assert!(first > 1, "the first two removals went through");
    let (more, failure) = append_until_failure(&wal, 201, 10);
    assert!(
        failure.is_none(),
        "a failed retention does not stop appends"
    );
    drop(wal);
    let mut all = acknowledged;
    all.extend(more);
    assert_log_holds(dir.path(), &all);
    scenario.teardown();
}

#[test]
fn a_reclaim_cut_between_moving_and_removing_keeps_each_record_once() {
    // Goal: when a reclaim stops after its moved records are durable but before the segments
    // they came from are removed (here: the first removal fails, as a crash would stop it),
    // the reopened log holds each record once, in order: the copies the segments still hold
    // win, and the moved file is cut back.
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_segments()).unwrap();
    let (acknowledged, failure) = append_until_failure(&wal, 1, 300);
    assert!(failure.is_none());
    // The first removal is that of a stale staging file, before the moved file is written.
    fail::cfg("storage.segment.remove", "1*off->return").unwrap();
    let liveness = spool_storage::Liveness {
        needed_from: 290,
        live: vec![3, 50],
    };
    let err = wal.reclaim(&liveness).unwrap_err();
    fail::remove("storage.segment.remove");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_eq!(
        wal.first_seq(),
        1,
        "the segment whose removal failed is still listed"
    );
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), small_segments()).unwrap();
    assert_eq!(report.moved_duplicates_dropped, 2);
    assert_eq!(wal.first_seq(), 1, "no segment was removed");
    drop(wal);
    assert_log_holds(dir.path(), &acknowledged);
    let (wal, _) = Wal::open(dir.path(), small_segments()).unwrap();
    let report = wal.reclaim(&liveness).unwrap();
    assert_eq!(report.records_moved, 2, "the reclaim can run again");
    scenario.teardown();
}

#[test]
fn a_reclaim_that_failed_midway_is_finished_by_the_next_one() {
    // Goal: when a removal fails after the live records were moved, the next reclaim in the
    // same process moves nothing twice (no overlapping moved files) and frees the segments,
    // and the log reopens whole, with each record once.
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_segments()).unwrap();
    let (acknowledged, _) = append_until_failure(&wal, 1, 300);
    let liveness = spool_storage::Liveness {
        needed_from: 290,
        live: vec![3, 50],
    };
    fail::cfg("storage.segment.remove", "2*off->return").unwrap();
    assert!(wal.reclaim(&liveness).is_err(), "the second segment stays");
    fail::remove("storage.segment.remove");
    let report = wal.reclaim(&liveness).unwrap();
    assert_eq!(report.records_moved, 0, "already moved");
    assert!(report.segments_removed > 0);
    assert_eq!(wal.read(50).unwrap().unwrap().payload, payload_for(50, 0));
    let first = wal.first_seq();
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), small_segments()).unwrap();
    assert_eq!((report.moved_records, wal.first_seq()), (2, first));
    let kept: Vec<u64> = acknowledged
        .iter()
        .copied()
        .filter(|&s| s == 3 || s == 50 || s >= first)
        .collect();
    let mut reader = wal.reader(1).unwrap();
    let mut read = Vec::new();
    while let Some(record) = reader.try_next().unwrap() {
        read.push(record.seq);
    }
    assert_eq!(read, kept);
    scenario.teardown();
}
