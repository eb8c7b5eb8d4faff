//! The in-memory picture of the log's segments: which sequence numbers each holds, how large it
//! is, and a sparse index from sequence number to byte offset so readers can start anywhere.
//!
//! Only the writer adds segments and records (at the end) and only retention removes segments
//! (at the front, never the last one), so the set stays contiguous: each segment's first
//! sequence number is the previous one's last plus one.

use crate::fs::{FileHandle, FileSystem, OpenMode};
use crate::layout::{SEGMENT_HEADER_BYTES, SegmentHeader, segment_path};
use crate::limits::INDEX_INTERVAL_BYTES;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One segment file.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub first_seq: u64,
    pub path: PathBuf,
    /// The seed of its frame checksums, from its header.
    pub salt: u32,
    /// Size of the file in bytes, header included.
    pub bytes: u64,
    /// The last sequence number written to it; `first_seq - 1` while it is empty.
    pub last_seq: u64,
    /// `(seq, offset)` pairs, ascending, at least `INDEX_INTERVAL_BYTES` apart; the first record
    /// is always indexed.
    index: Vec<(u64, u64)>,
}

impl Segment {
    /// A segment with no records yet.
    pub fn empty(dir: &Path, first_seq: u64, salt: u32) -> Segment {
        Segment {
            first_seq,
            path: segment_path(dir, first_seq),
            salt,
            bytes: SEGMENT_HEADER_BYTES,
            last_seq: first_seq - 1,
            index: Vec::new(),
        }
    }

    /// Notes a record written at `offset`, occupying `frame_bytes`.
    pub fn push_record(&mut self, seq: u64, offset: u64, frame_bytes: u64) {
        assert_eq!(
            seq,
            self.last_seq + 1,
            "records are appended in sequence order"
        );
        assert_eq!(offset, self.bytes, "records are appended at the end");
        let due = self
            .index
            .last()
            .is_none_or(|&(_, indexed)| offset - indexed >= INDEX_INTERVAL_BYTES);
        if due {
            self.index.push((seq, offset));
        }
        self.last_seq = seq;
        self.bytes = offset + frame_bytes;
    }

    /// The offset of an indexed record at or before `seq` (which this segment must hold).
    pub fn seek_offset(&self, seq: u64) -> (u64, u64) {
        assert!(seq >= self.first_seq && seq <= self.last_seq);
        let at = self.index.partition_point(|&(indexed, _)| indexed <= seq);
        assert!(at > 0, "the first record is always indexed");
        self.index[at - 1]
    }
}

/// All segments, by first sequence number.
#[derive(Debug, Default)]
pub(crate) struct SegmentSet {
    segments: BTreeMap<u64, Segment>,
}

impl SegmentSet {
    pub fn push(&mut self, segment: Segment) {
        if let Some(last) = self.segments.values().next_back() {
            assert_eq!(
                segment.first_seq,
                last.last_seq + 1,
                "segments are contiguous"
            );
        }
        self.segments.insert(segment.first_seq, segment);
    }

    pub fn last_mut(&mut self) -> Option<&mut Segment> {
        self.segments.values_mut().next_back()
    }

    pub fn get_mut(&mut self, first_seq: u64) -> Option<&mut Segment> {
        self.segments.get_mut(&first_seq)
    }

    /// The segment holding `seq`, if it is still there.
    pub fn find(&self, seq: u64) -> Option<&Segment> {
        let (_, segment) = self.segments.range(..=seq).next_back()?;
        (seq <= segment.last_seq).then_some(segment)
    }

    /// The first sequence number still in the log (the next one to be written if it is empty).
    pub fn first_seq(&self) -> Option<u64> {
        self.segments.keys().next().copied()
    }

    /// The first sequence number of the segment after the first `count`, or of the last one
    /// if there are not that many before it.
    pub fn first_seq_after(&self, count: usize) -> u64 {
        let last = self.segments.len().saturating_sub(1);
        *self
            .segments
            .keys()
            .nth(count.min(last))
            .expect("the log always has an active segment")
    }

    /// The first sequence number of the last (active) segment.
    pub fn last_first_seq(&self) -> Option<u64> {
        self.segments.keys().next_back().copied()
    }

    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn total_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Segments every record of which is below `seq`, oldest first, never the last segment.
    pub fn wholly_below(&self, seq: u64) -> Vec<Segment> {
        let count = self.segments.len().saturating_sub(1);
        self.segments
            .values()
            .take(count)
            .take_while(|s| s.last_seq < seq)
            .cloned()
            .collect()
    }

    /// Puts back the segment `remove` just took from the front.
    pub fn restore_front(&mut self, segment: Segment) {
        if let Some(first) = self.first_seq() {
            assert_eq!(segment.last_seq + 1, first, "segments are contiguous");
        }
        self.segments.insert(segment.first_seq, segment);
    }

    pub fn remove(&mut self, first_seq: u64) -> Option<Segment> {
        assert_eq!(
            self.first_seq(),
            Some(first_seq),
            "retention removes from the front"
        );
        self.segments.remove(&first_seq)
    }
}

/// Creates a new, empty segment with a fresh salt: header written and fdatasynced, then the
/// directory fsynced so the file's name survives a power loss before any record goes in.
///
/// # Errors
/// `Error::Io` naming the segment.
pub(crate) fn create_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    epoch: u64,
    first_seq: u64,
) -> Result<(Box<dyn FileHandle>, Segment)> {
    let path = segment_path(dir, first_seq);
    let file = fs
        .open(&path, OpenMode::CreateNew)
        .map_err(|e| Error::io("create segment", &path, e))?;
    let salt = unpredictable_salt(epoch, first_seq);
    let header = SegmentHeader {
        epoch,
        first_seq,
        salt,
    }
    .encode();
    file.write_all_at(&header, 0)
        .map_err(|e| Error::io("write segment header", &path, e))?;
    file.sync_data()
        .map_err(|e| Error::io("fsync segment", &path, e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))?;
    Ok((file, Segment::empty(dir, first_seq, salt)))
}

/// A salt no client can predict. std's `RandomState` is seeded from the operating system's
/// random source, which is all this needs (it is not a secret key, only unguessable), without a
/// dependency.
pub(crate) fn unpredictable_salt(epoch: u64, first_seq: u64) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(epoch);
    hasher.write_u64(first_seq);
    let hash = hasher.finish();
    (hash ^ (hash >> 32)) as u32
}
