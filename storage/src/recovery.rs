//! Recovery: rebuilding the picture of the log from the files on open, and repairing exactly what
//! a crash may leave behind (law 6).

use crate::fs::{self, FileSystem, OpenMode};
use crate::layout::{
    FRAME_HEADER_BYTES, Frame, FrameCheck, KIND_BATCH_START, SEGMENT_HEADER_BYTES, SegmentHeader,
    TEMP_SUFFIX, check_frame, moved_file_name, parse_moved_file_name, parse_segment_file_name,
    unchecked_frame_seq,
};
use crate::moved::{MovedFile, MovedSet, scan_moved_file, write_moved_file};
use crate::segment::{Segment, SegmentSet};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What recovery found and did; the broker logs it at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in the log after recovery.
    pub segments: u64,
    /// Records in the log after recovery.
    pub records: u64,
    /// The first sequence number in the log (the next one to be written if it is empty).
    pub first_seq: u64,
    /// The last sequence number in the log; `first_seq - 1` if it is empty.
    pub last_seq: u64,
    /// Bytes cut from the end of the last segment (a torn tail).
    pub bytes_truncated: u64,
    /// Whole records inside the cut tail: written by the last, unsynced write, never acknowledged.
    pub unacknowledged_records_discarded: u64,
    /// Whether a newest segment whose header never became durable was removed.
    pub torn_segment_removed: bool,
    /// Records moved out of removed segments (`Wal::reclaim`), kept below the first segment.
    pub moved_records: u64,
    /// Moved records also found in a segment (a crash came before the segment's removal), and
    /// dropped from the moved files.
    pub moved_duplicates_dropped: u64,
    /// Wall-clock time recovery took.
    pub duration: Duration,
}

/// The result of recovery, for the writer to continue from.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub segments: SegmentSet,
    pub moved: MovedSet,
    /// The sequence number the next append gets.
    pub next_seq: u64,
    /// The highest epoch found in any segment header.
    pub epoch_floor: u64,
    pub report: RecoveryReport,
}

/// A repair that recovery decided on; applied only after every check passed.
enum Repair {
    /// Erases the torn bytes `at..end`: cuts the file at `at` if they run to its end, or
    /// overwrites them with zeros if allocated zeros follow them (keeping the allocation).
    EraseTail {
        path: PathBuf,
        at: u64,
        end: u64,
        file_len: u64,
    },
    RemoveSegment {
        path: PathBuf,
    },
}

/// Recovers the log in `dir`.
///
/// The rules, one row per case; every file is checked, the last segment with the most care
/// because only it can hold unsynced bytes (the writer fdatasyncs a segment before it rolls):
///
/// | case                                                      | action                          |
/// |-----------------------------------------------------------|---------------------------------|
/// | every segment parses to its end, or to zeros that run to  | clean (the zeros are space the  |
/// |   the end of the file                                      |   writer allocated ahead)       |
/// | last segment ends in an incomplete or invalid record, and  | torn tail: truncate to the last |
/// |   no later record carries the batch-start flag             |   good record, fsync, report    |
/// | a bad record that a batch-start record follows (it was     | refuse: `Corrupt{path, offset}` |
/// |   fsynced before that later write began)                   |                                 |
/// | a bad record, or a short file, in a segment before the last| refuse: `Corrupt{path, offset}` |
/// | a record with a valid checksum but the wrong sequence     | refuse: `Corrupt{path, offset}` |
/// | last segment's header invalid and nothing after it         | remove the segment (it was     |
/// |   (created, crashed before its header was durable)        |   never written to), report     |
/// | a header that is invalid anywhere else, or names another  | refuse: `Corrupt{path, 0}`      |
/// |   first sequence than its file name                        |                                 |
/// | a segment's first sequence is past the previous one's end | refuse: `MissingSegment`        |
/// | metadata needs a sequence past the recovered end           | refuse: `MetadataAhead`         |
/// | a moved file with any bad byte (it is renamed into place  | refuse: `Corrupt{path, offset}` |
/// |   whole), records out of order, or overlapping another    |                                 |
/// | moved records at or past the first segment (a crash came  | drop them from the moved file:  |
/// |   between moving them and removing their segment)         |   the segment still holds them  |
///
/// Damage inside the very last write cannot be told from a torn write (nothing after it proves
/// it was ever fsynced), so it is truncated as a torn tail; it is always reported, never silent.
/// Repairs are applied only after the whole log has been checked, so a refused open changes
/// nothing on disk.
///
/// # Errors
/// The refusals above, or `Error::Io`.
pub(crate) fn recover(
    fs: &dyn FileSystem,
    dir: &Path,
    required_last_seq: u64,
) -> Result<Recovered> {
    let started = Instant::now();
    let mut names = fs.list_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    names.sort();
    remove_stale_temp_files(fs, dir, &names)?;
    let mut report = RecoveryReport::default();
    let Scanned {
        segments,
        repairs,
        epoch_floor,
        next_seq,
    } = scan_segments(fs, dir, &names, &mut report)?;
    let first_segment_seq = segments.first_seq().unwrap_or(next_seq);
    let moved_files = scan_moved_files(fs, dir, &names)?;
    let last_seq = next_seq - 1;
    if required_last_seq > last_seq {
        return Err(Error::MetadataAhead {
            required: required_last_seq,
            last_seq,
        });
    }
    for repair in repairs {
        apply(fs, dir, repair)?;
    }
    let moved = keep_moved(
        fs,
        dir,
        epoch_floor,
        moved_files,
        first_segment_seq,
        &mut report,
    )?;
    report.segments = segments.len() as u64;
    report.first_seq = first_segment_seq;
    report.last_seq = last_seq;
    report.records = next_seq - report.first_seq;
    report.duration = started.elapsed();
    Ok(Recovered {
        segments,
        moved,
        next_seq,
        epoch_floor,
        report,
    })
}

/// What the scan of the segments found, before any repair.
struct Scanned {
    segments: SegmentSet,
    repairs: Vec<Repair>,
    epoch_floor: u64,
    /// The sequence number the next append gets.
    next_seq: u64,
}

/// Checks every segment, in order, and decides the repairs (see `recover`).
fn scan_segments(
    fs: &dyn FileSystem,
    dir: &Path,
    names: &[String],
    report: &mut RecoveryReport,
) -> Result<Scanned> {
    let mut first_seqs: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_segment_file_name(n))
        .collect();
    first_seqs.sort_unstable();
    let mut segments = SegmentSet::default();
    let mut repairs = Vec::new();
    let mut epoch_floor = 0;
    let mut next_seq = 1;
    for (position, &first_seq) in first_seqs.iter().enumerate() {
        let is_last = position + 1 == first_seqs.len();
        let path = crate::layout::segment_path(dir, first_seq);
        let bytes = fs::read_file(fs, &path)?;
        if let Some(previous) = segments.last_mut().map(|s| s.last_seq) {
            check_contiguous(previous, first_seq, &path)?;
        }
        let scanned = match scan_segment(&path, first_seq, &bytes, is_last)? {
            Scan::TornHeader => {
                next_seq = first_seq;
                repairs.push(Repair::RemoveSegment { path });
                report.torn_segment_removed = true;
                continue;
            }
            Scan::Segment(scanned) => scanned,
        };
        epoch_floor = epoch_floor.max(scanned.epoch);
        if let Some((at, end)) = scanned.torn {
            report.bytes_truncated = end - at;
            report.unacknowledged_records_discarded = scanned.discarded;
            repairs.push(Repair::EraseTail {
                path,
                at,
                end,
                file_len: bytes.len() as u64,
            });
        }
        segments.push(scanned.segment);
    }
    if let Some(last) = segments.last_mut() {
        next_seq = last.last_seq + 1;
    }
    Ok(Scanned {
        segments,
        repairs,
        epoch_floor,
        next_seq,
    })
}

/// Reads and checks every moved file, in order; they must not overlap.
fn scan_moved_files(fs: &dyn FileSystem, dir: &Path, names: &[String]) -> Result<Vec<MovedFile>> {
    let mut name_seqs: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_moved_file_name(n))
        .collect();
    name_seqs.sort_unstable();
    let mut files: Vec<MovedFile> = Vec::with_capacity(name_seqs.len());
    for name_seq in name_seqs {
        let path = dir.join(moved_file_name(name_seq));
        let file = scan_moved_file(fs, &path, name_seq)?;
        if let Some(previous) = files.last()
            && previous.last_seq() >= file.first_seq()
        {
            return Err(Error::Corrupt {
                path,
                offset: 0,
                detail: format!("moved records overlap those of {}", previous.path.display()),
            });
        }
        files.push(file);
    }
    Ok(files)
}

/// The moved records to keep: those of every moved file below the first segment.
fn keep_moved(
    fs: &dyn FileSystem,
    dir: &Path,
    epoch: u64,
    files: Vec<MovedFile>,
    first_segment_seq: u64,
    report: &mut RecoveryReport,
) -> Result<MovedSet> {
    let mut moved = MovedSet::default();
    for file in files {
        let (kept, dropped) = drop_duplicates(fs, dir, epoch, file, first_segment_seq)?;
        report.moved_duplicates_dropped += dropped;
        if let Some(file) = kept {
            report.moved_records += file.records.len() as u64;
            moved.insert(file);
        }
    }
    Ok(moved)
}

/// Drops from a moved file the records a segment still holds: rewrites the file with the rest,
/// or removes it when none is left. Returns the file as kept, and how many were dropped.
fn drop_duplicates(
    fs: &dyn FileSystem,
    dir: &Path,
    epoch: u64,
    file: MovedFile,
    first_segment_seq: u64,
) -> Result<(Option<MovedFile>, u64)> {
    let kept = file.records.partition_point(|r| r.seq < first_segment_seq);
    let dropped = (file.records.len() - kept) as u64;
    if dropped == 0 && kept > 0 {
        return Ok((Some(file), 0));
    }
    if kept == 0 {
        fs.remove_file(&file.path)
            .map_err(|e| Error::io("remove moved records", &file.path, e))?;
        fs.sync_dir(dir)
            .map_err(|e| Error::io("fsync directory", dir, e))?;
        return Ok((None, dropped));
    }
    let records = (0..kept)
        .map(|index| file.read(fs, index))
        .collect::<Result<Vec<_>>>()?;
    let rewritten = write_moved_file(fs, dir, epoch, file.name_seq, &records)?;
    Ok((Some(rewritten), dropped))
}

fn check_contiguous(previous_last: u64, first_seq: u64, path: &Path) -> Result<()> {
    if first_seq > previous_last + 1 {
        return Err(Error::MissingSegment {
            first_missing: previous_last + 1,
            last_missing: first_seq - 1,
            next_path: path.to_path_buf(),
        });
    }
    if first_seq <= previous_last {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            detail: format!("segment starts at {first_seq}, inside the previous segment"),
        });
    }
    Ok(())
}

/// A staging file of `durable_replace` that a crash left behind; its rename never happened.
fn remove_stale_temp_files(fs: &dyn FileSystem, dir: &Path, names: &[String]) -> Result<()> {
    for name in names.iter().filter(|n| n.ends_with(TEMP_SUFFIX)) {
        let path = dir.join(name);
        fs.remove_file(&path)
            .map_err(|e| Error::io("remove stale temporary file", &path, e))?;
    }
    Ok(())
}

enum Scan {
    TornHeader,
    Segment(ScannedSegment),
}

struct ScannedSegment {
    segment: Segment,
    epoch: u64,
    /// The torn bytes to erase, `(start, end)`, if there are any.
    torn: Option<(u64, u64)>,
    /// Whole records found inside the torn tail.
    discarded: u64,
}

fn scan_segment(path: &Path, first_seq: u64, bytes: &[u8], is_last: bool) -> Result<Scan> {
    let corrupt = |offset: u64, detail: String| Error::Corrupt {
        path: path.to_path_buf(),
        offset,
        detail,
    };
    let header = match SegmentHeader::decode(bytes) {
        Ok(header) => header,
        Err(detail) => {
            // The salt is in the damaged header, so records after it cannot be checked. The
            // writer fdatasyncs the header before the first record goes in, so a segment with
            // records after a bad header was damaged after it was durable; a segment that is
            // no longer than its header may be one whose header write was torn.
            if is_last && bytes.len() <= SEGMENT_HEADER_BYTES as usize {
                return Ok(Scan::TornHeader);
            }
            return Err(corrupt(0, detail));
        }
    };
    if header.first_seq != first_seq {
        return Err(corrupt(
            0,
            format!("header says the segment starts at {}", header.first_seq),
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut segment = Segment::empty(dir, first_seq, header.salt);
    let mut offset = SEGMENT_HEADER_BYTES as usize;
    while offset < bytes.len() {
        let detail = match check_frame(&bytes[offset..], header.salt) {
            FrameCheck::Valid(frame) if frame.seq == segment.last_seq + 1 => {
                segment.push_record(frame.seq, offset as u64, frame.total_bytes());
                offset += usize::try_from(frame.total_bytes()).expect("frame fits in memory");
                continue;
            }
            FrameCheck::Valid(frame) => {
                let expected = segment.last_seq + 1;
                return Err(corrupt(
                    offset as u64,
                    format!(
                        "record has sequence {} where {expected} was expected",
                        frame.seq
                    ),
                ));
            }
            FrameCheck::Incomplete => "record cut short".to_string(),
            FrameCheck::Invalid(reason) => reason.to_string(),
        };
        return end_of_segment(path, segment, header.epoch, bytes, offset, detail, is_last);
    }
    Ok(Scan::Segment(ScannedSegment {
        segment,
        epoch: header.epoch,
        torn: None,
        discarded: 0,
    }))
}

/// Decides between "torn tail" and "corruption" for a bad record at `offset`.
fn end_of_segment(
    path: &Path,
    segment: Segment,
    epoch: u64,
    bytes: &[u8],
    offset: usize,
    detail: String,
    is_last: bool,
) -> Result<Scan> {
    let corrupt = |detail: String| Error::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        detail,
    };
    let end = offset
        + bytes[offset..]
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |at| at + 1);
    if end == offset {
        // Only zeros from here: the space the writer allocated ahead, not yet written.
        return Ok(Scan::Segment(ScannedSegment {
            segment,
            epoch,
            torn: None,
            discarded: 0,
        }));
    }
    if !is_last {
        return Err(corrupt(format!("{detail} in a sealed segment")));
    }
    let tail = TailSearch {
        bytes,
        salt: segment.salt,
        last_good: segment.last_seq,
        bad_at: offset,
    };
    if let Some(found) = tail.batch_start_after(offset + 1) {
        return Err(corrupt(format!(
            "{detail}, followed by a valid record (sequence {found}) written after it was synced"
        )));
    }
    let mut discarded = 0;
    let mut at = offset + 1;
    while let Some(next) = tail.frame_end_after(at) {
        discarded += 1;
        at = next;
    }
    Ok(Scan::Segment(ScannedSegment {
        segment,
        epoch,
        torn: Some((offset as u64, end as u64)),
        discarded,
    }))
}

/// A search of every byte offset after a bad record for records written after it.
///
/// Only frames that could follow `last_good` count: their sequence must be above it, and the
/// records between `last_good` and it must fit between the bad record and it. That cheap
/// filter runs before the checksum, so the search stays linear in practice, and the salt keeps
/// payload bytes from passing for frames.
struct TailSearch<'a> {
    bytes: &'a [u8],
    salt: u32,
    last_good: u64,
    /// Where the bad record starts.
    bad_at: usize,
}

impl TailSearch<'_> {
    /// The frame at `at`, if one that could follow `last_good` is there.
    fn frame_at(&self, at: usize) -> Option<Frame> {
        let rest = &self.bytes[at..];
        let seq = unchecked_frame_seq(rest)?;
        let seq_max = self.last_good + 1 + (at - self.bad_at) as u64 / FRAME_HEADER_BYTES;
        if seq <= self.last_good || seq > seq_max {
            return None;
        }
        match check_frame(rest, self.salt) {
            FrameCheck::Valid(frame) => Some(frame),
            _ => None,
        }
    }

    /// The sequence of the first batch-start frame at or after `from`.
    fn batch_start_after(&self, from: usize) -> Option<u64> {
        (from..self.bytes.len())
            .filter_map(|at| self.frame_at(at))
            .find(|frame| frame.kind & KIND_BATCH_START != 0)
            .map(|frame| frame.seq)
    }

    /// The offset just past the first frame at or after `from`.
    fn frame_end_after(&self, from: usize) -> Option<usize> {
        (from..self.bytes.len()).find_map(|at| {
            let frame = self.frame_at(at)?;
            Some(at + usize::try_from(frame.total_bytes()).expect("frame fits in memory"))
        })
    }
}

fn apply(fs: &dyn FileSystem, dir: &Path, repair: Repair) -> Result<()> {
    match repair {
        Repair::EraseTail {
            path,
            at,
            end,
            file_len,
        } => {
            let file = fs
                .open(&path, OpenMode::ReadWrite)
                .map_err(|e| Error::io("open", &path, e))?;
            if end == file_len {
                file.set_len(at)
                    .map_err(|e| Error::io("truncate torn tail of", &path, e))?;
            } else {
                let zeros = vec![0u8; usize::try_from(end - at).expect("inside a file read whole")];
                file.write_all_at(&zeros, at)
                    .map_err(|e| Error::io("erase torn tail of", &path, e))?;
            }
            file.sync_data().map_err(|e| Error::io("fsync", &path, e))?;
        }
        Repair::RemoveSegment { path } => {
            fs.remove_file(&path)
                .map_err(|e| Error::io("remove torn segment", &path, e))?;
            fs.sync_dir(dir)
                .map_err(|e| Error::io("fsync directory", dir, e))?;
        }
    }
    Ok(())
}
