//! Recovery on the real file system, one test per row of the decision table documented on
//! `recovery::recover`: clean, torn tail, corruption followed by valid records, a missing middle
//! segment, a torn new segment, metadata ahead of the log. Damage is made with plain file edits
//! between a clean close and a reopen.
#![allow(clippy::unwrap_used)]

mod common;

use common::{payload_for, read_all, runtime, small_segments};
use spool_storage::layout::{
    KIND_BATCH_START, SEGMENT_HEADER_BYTES, encode_frame, parse_segment_file_name,
    segment_file_name,
};
use spool_storage::{Error, Wal, WalOptions};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `count` records, each its own batch (each awaited), and closes the log.
fn write_records(dir: &Path, count: u64, options: &WalOptions) {
    let (wal, _) = Wal::open(dir, options.clone()).unwrap();
    runtime().block_on(async {
        for i in 1..=count {
            wal.append(1, payload_for(i, 0)).await.unwrap();
        }
    });
    wal.close().unwrap();
}

/// Options whose segments end with their last record (no zeros written ahead), so tests can
/// damage "the end of the file".
fn unpreallocated() -> WalOptions {
    WalOptions {
        preallocate_bytes: 0,
        ..WalOptions::default()
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_segment_file_name)
                .is_some()
        })
        .collect();
    paths.sort();
    paths
}

/// The byte offset of the record with sequence `seq` inside a segment file.
fn offset_of(path: &Path, seq: u64) -> u64 {
    let bytes = fs::read(path).unwrap();
    let mut offset = SEGMENT_HEADER_BYTES as usize;
    loop {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        let found = u64::from_le_bytes(bytes[offset + 8..offset + 16].try_into().unwrap());
        if found == seq {
            return offset as u64;
        }
        offset += 17 + len;
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[test]
fn clean_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 50, &small_segments());
    let (wal, report) = Wal::open(dir.path(), small_segments()).unwrap();
    assert_eq!(
        (report.first_seq, report.last_seq, report.records),
        (1, 50, 50)
    );
    assert_eq!(report.bytes_truncated, 0);
    assert_eq!(report.segments, segments(dir.path()).len() as u64);
    assert_eq!(read_all(&wal).len(), 50);
}

#[test]
fn flipped_byte_followed_by_valid_records_refuses_the_open() {
    // Goal: law 6: damage to acknowledged data is an error naming file and offset, and the open
    // changes nothing on disk. Every record here was its own batch, so valid batch-start records
    // follow the damaged one in the same (last) segment.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 10, &WalOptions::default());
    let segment = segments(dir.path()).pop().unwrap();
    let damaged_at = offset_of(&segment, 5);
    flip_byte(&segment, damaged_at + 20);
    let size_before = fs::metadata(&segment).unwrap().len();
    let err = Wal::open(dir.path(), WalOptions::default()).unwrap_err();
    match &err {
        Error::Corrupt { path, offset, .. } => {
            assert_eq!(path, &segment);
            assert_eq!(*offset, damaged_at);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&segment_file_name(1)), "{message}");
    assert!(
        message.contains(&format!("byte offset {damaged_at}")),
        "{message}"
    );
    assert_eq!(
        fs::metadata(&segment).unwrap().len(),
        size_before,
        "a refused open repairs nothing"
    );
}

#[test]
fn flipped_byte_in_a_sealed_segment_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 100, &small_segments());
    let all = segments(dir.path());
    assert!(all.len() >= 3);
    let sealed = &all[1];
    let first = parse_segment_file_name(sealed.file_name().unwrap().to_str().unwrap()).unwrap();
    let at = offset_of(sealed, first + 1);
    flip_byte(sealed, at + 3);
    let err = Wal::open(dir.path(), small_segments()).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path, offset, .. } if path == sealed && *offset == at),
        "{err:?}"
    );
}

#[test]
fn missing_middle_segment_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 100, &small_segments());
    let all = segments(dir.path());
    fs::remove_file(&all[1]).unwrap();
    let err = Wal::open(dir.path(), small_segments()).unwrap_err();
    match &err {
        Error::MissingSegment { next_path, .. } => assert_eq!(next_path, &all[2]),
        other => panic!("expected MissingSegment, got {other:?}"),
    }
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    // Goal: a record cut short at the end of the last segment (a crash mid-write) is cut off,
    // reported, and the log continues from the record before it.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 20, &unpreallocated());
    let segment = segments(dir.path()).pop().unwrap();
    let last_at = offset_of(&segment, 20);
    let full = fs::metadata(&segment).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(full - 7)
        .unwrap();
    let (wal, report) = Wal::open(dir.path(), unpreallocated()).unwrap();
    assert_eq!(report.last_seq, 19);
    assert_eq!(report.bytes_truncated, full - 7 - last_at);
    assert_eq!(fs::metadata(&segment).unwrap().len(), last_at);
    assert_eq!(read_all(&wal).len(), 19);
    let seq = runtime()
        .block_on(wal.append(1, payload_for(20, 1)))
        .unwrap();
    assert_eq!(
        seq, 20,
        "the cut record's sequence number is reused by the next append"
    );
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    // Goal: zeroes or garbage after the last record (a write whose data never landed) are cut.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 5, &unpreallocated());
    let segment = segments(dir.path()).pop().unwrap();
    let end = fs::metadata(&segment).unwrap().len();
    let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
    file.write_all(&[0u8; 700]).unwrap();
    file.write_all(b"not a record at all").unwrap();
    drop(file);
    let (_, report) = Wal::open(dir.path(), unpreallocated()).unwrap();
    assert_eq!(report.last_seq, 5);
    assert_eq!(report.bytes_truncated, 719);
    assert_eq!(fs::metadata(&segment).unwrap().len(), end);
}

#[test]
fn forged_record_inside_a_payload_does_not_turn_a_torn_tail_into_corruption() {
    // Goal: payloads come from clients. A client that embeds a well-formed, batch-start frame
    // for the next sequence numbers in its payload must not make recovery refuse a torn tail
    // (which would stop the hub) by passing the forgery off as a later, synced record.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 19, &unpreallocated());
    let mut forged = Vec::new();
    for seq in 20..30 {
        // The forger does not know the segment's salt; 0 is as good a guess as any.
        encode_frame(&mut forged, 0, seq, KIND_BATCH_START | 1, b"forged");
    }
    let (wal, _) = Wal::open(dir.path(), unpreallocated()).unwrap();
    runtime().block_on(wal.append(1, forged.into())).unwrap();
    wal.close().unwrap();
    drop(wal);
    let segment = segments(dir.path()).pop().unwrap();
    let last_at = offset_of(&segment, 20);
    flip_byte(&segment, last_at + 4);

    let (wal, report) = Wal::open(dir.path(), unpreallocated()).unwrap();
    assert_eq!(report.last_seq, 19);
    assert_eq!(report.unacknowledged_records_discarded, 0);
    assert_eq!(fs::metadata(&segment).unwrap().len(), last_at);
    assert_eq!(read_all(&wal).len(), 19);
}

#[test]
fn zeros_written_ahead_are_the_end_of_the_log_not_a_tear() {
    // Goal: the zeros the writer allocates ahead of the last record are free space: a clean
    // reopen reports nothing cut and appends continue right after the last record, in place.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 10, &WalOptions::default());
    let segment = segments(dir.path()).pop().unwrap();
    let allocated = fs::metadata(&segment).unwrap().len();
    let data_end = offset_of(&segment, 10) + 17 + payload_for(10, 0).len() as u64;
    assert!(allocated > data_end, "the writer allocated ahead");

    let (wal, report) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!((report.last_seq, report.bytes_truncated), (10, 0));
    let seq = runtime()
        .block_on(wal.append(1, payload_for(11, 0)))
        .unwrap();
    assert_eq!(seq, 11);
    assert_eq!(offset_of(&segment, 11), data_end);
    assert_eq!(fs::metadata(&segment).unwrap().len(), allocated);
    assert_eq!(read_all(&wal).len(), 11);
}

#[test]
fn torn_write_inside_allocated_zeros_is_erased_and_the_allocation_kept() {
    // Goal: a write torn inside the zeros written ahead is erased back to zeros (reported),
    // and the file keeps its size, so later writes still land in allocated space.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 10, &WalOptions::default());
    let segment = segments(dir.path()).pop().unwrap();
    let allocated = fs::metadata(&segment).unwrap().len();
    let data_end = offset_of(&segment, 10) + 17 + payload_for(10, 0).len() as u64;
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 100], data_end).unwrap();
    drop(file);

    let (wal, report) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!((report.last_seq, report.bytes_truncated), (10, 100));
    assert_eq!(fs::metadata(&segment).unwrap().len(), allocated);
    let bytes = fs::read(&segment).unwrap();
    assert!(bytes[data_end as usize..].iter().all(|&b| b == 0));
    assert_eq!(read_all(&wal).len(), 10);
}

#[test]
fn damage_early_in_a_large_batch_that_a_later_batch_follows_refuses_the_open() {
    // Goal: law 6 when a later synced batch sits far after the damage: the search for it must
    // accept any sequence number the records in between could account for, not only nearby
    // ones. 100 small records written as one batch (the linger gathers them), the second
    // damaged, then one more batch.
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        batch_linger: std::time::Duration::from_millis(200),
        ..unpreallocated()
    };
    let (wal, _) = Wal::open(dir.path(), options).unwrap();
    runtime().block_on(async {
        let mut pending = Vec::new();
        for i in 1..=100 {
            pending.push(wal.submit(1, payload_for(i, 0)).await.unwrap());
        }
        for append in pending {
            append.await.unwrap();
        }
        wal.append(1, payload_for(101, 0)).await.unwrap();
    });
    wal.close().unwrap();
    drop(wal);
    let segment = segments(dir.path()).pop().unwrap();
    flip_byte(&segment, offset_of(&segment, 2) + 20);
    let refused = Wal::open(dir.path(), unpreallocated());
    assert!(
        matches!(refused, Err(Error::Corrupt { .. })),
        "acknowledged records must not be cut as a torn tail: {refused:?}"
    );
}

#[test]
fn torn_header_of_a_new_last_segment_is_removed() {
    // Goal: a segment created just before a crash, whose header never reached the disk, held
    // nothing: it is removed and the log continues at its first sequence number.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 10, &WalOptions::default());
    let torn = dir.path().join(segment_file_name(11));
    fs::write(&torn, [0u8; 12]).unwrap();
    let (wal, report) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert!(report.torn_segment_removed);
    assert!(!torn.exists());
    assert_eq!(
        runtime()
            .block_on(wal.append(1, payload_for(11, 0)))
            .unwrap(),
        11
    );
}

#[test]
fn damaged_header_of_a_sealed_segment_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 100, &small_segments());
    let first = segments(dir.path()).remove(0);
    flip_byte(&first, 2);
    let err = Wal::open(dir.path(), small_segments()).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { path, offset: 0, .. } if *path == first),
        "{err:?}"
    );
}

#[test]
fn metadata_ahead_of_the_log_refuses_the_open() {
    // Goal: if a checkpoint refers past the end of the log, the log lost records that consumers
    // already saw: refuse, do not quietly hand out those sequence numbers again.
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 10, &WalOptions::default());
    let options = WalOptions {
        required_last_seq: 11,
        ..WalOptions::default()
    };
    let err = Wal::open(dir.path(), options).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MetadataAhead {
                required: 11,
                last_seq: 10
            }
        ),
        "{err:?}"
    );
    let options = WalOptions {
        required_last_seq: 10,
        ..WalOptions::default()
    };
    Wal::open(dir.path(), options).unwrap();
}

#[test]
fn stale_temporary_files_are_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 3, &WalOptions::default());
    let stale = dir.path().join("EPOCH.tmp");
    fs::write(&stale, b"half-written").unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert!(!stale.exists());
    assert_eq!(read_all(&wal).len(), 3);
}

#[test]
fn epoch_grows_with_every_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for _ in 0..3 {
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert!(wal.epoch() > last);
        last = wal.epoch();
    }
}
