//! Moved records: the few live records of old segments, moved out of them so that one queue
//! still needing an old message does not keep everything written after it.
//!
//! `Wal::reclaim` copies the records a caller still needs from the oldest segments into a moved
//! file, makes it durable, and only then removes those segments. A moved record keeps its
//! sequence number (its identity for queue order, QoS 2 packet ids and stored receipts), so a
//! moved file's records ascend but are not consecutive. Every moved record is older than every
//! record still in a segment, and moved files do not overlap (each holds records of segments
//! below those of the next), so reading moved files in name order, then the segments, yields the
//! log in sequence order, as before, less the records no one needed.
//!
//! A moved file is written whole, then renamed into place (`fs::durable_replace`): a crash leaves
//! it whole or absent, so any damage found in one is corruption, never a torn tail. It is
//! replaced the same way, under the same name, when enough of its records died.
//!
//! Moved records are read only from files that are durable, and they come from sealed segments,
//! every record of which was durable: readers still see only durable records.

use crate::fs::{self, FileSystem, OpenMode};
use crate::layout::{
    FRAME_HEADER_BYTES, FrameCheck, KIND_USER_MASK, SEGMENT_HEADER_BYTES, SegmentHeader,
    check_frame, encode_frame, moved_file_name,
};
use crate::reader::Record;
use crate::{Error, Result};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where one moved record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MovedRecord {
    pub seq: u64,
    pub offset: u64,
    pub frame_bytes: u64,
}

/// One moved file: its records, all indexed (there are few, and the file never changes).
#[derive(Debug, Clone)]
pub(crate) struct MovedFile {
    /// The sequence number in its name: at or below its first record.
    pub name_seq: u64,
    pub path: PathBuf,
    pub salt: u32,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Ascending by sequence number.
    pub records: Vec<MovedRecord>,
}

impl MovedFile {
    pub fn first_seq(&self) -> u64 {
        self.records.first().map_or(self.name_seq, |r| r.seq)
    }

    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(self.name_seq, |r| r.seq)
    }

    /// Reads the record at `index` and checks it is what the index says.
    pub fn read(&self, fs: &dyn FileSystem, index: usize) -> Result<Record> {
        let at = self.records[index];
        let file = fs
            .open(&self.path, OpenMode::Read)
            .map_err(|e| Error::io("open moved records", &self.path, e))?;
        let mut frame = vec![0u8; usize::try_from(at.frame_bytes).expect("a record fits")];
        let mut filled = 0;
        while filled < frame.len() {
            let read = file
                .read_at(&mut frame[filled..], at.offset + filled as u64)
                .map_err(|e| Error::io("read moved records", &self.path, e))?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        let corrupt = |detail: &str| Error::Corrupt {
            path: self.path.clone(),
            offset: at.offset,
            detail: detail.to_string(),
        };
        match check_frame(&frame[..filled], self.salt) {
            FrameCheck::Valid(found) if found.seq == at.seq => Ok(Record {
                seq: found.seq,
                kind: found.kind & KIND_USER_MASK,
                payload: Bytes::copy_from_slice(&frame[FRAME_HEADER_BYTES as usize..filled]),
            }),
            FrameCheck::Valid(_) => Err(corrupt("moved record has another sequence number")),
            FrameCheck::Incomplete => Err(corrupt("moved record cut short")),
            FrameCheck::Invalid(reason) => Err(corrupt(reason)),
        }
    }
}

/// Every moved file, by the sequence number in its name.
#[derive(Debug, Default)]
pub(crate) struct MovedSet {
    files: BTreeMap<u64, MovedFile>,
}

impl MovedSet {
    /// Adds a file whose records come after every other's (recovery checks that of the files
    /// it finds; a reclaim moves only records newer than those already moved).
    pub fn insert(&mut self, file: MovedFile) {
        assert!(
            !file.records.is_empty(),
            "an empty moved file is removed, not kept"
        );
        if let Some((_, previous)) = self.files.range(..file.name_seq).next_back() {
            assert!(
                previous.last_seq() < file.first_seq(),
                "moved files overlap"
            );
        }
        if let Some((_, next)) = self.files.range(file.name_seq..).next() {
            assert!(file.last_seq() < next.first_seq(), "moved files overlap");
        }
        self.files.insert(file.name_seq, file);
    }

    /// Whether `seq` is among the moved records.
    pub fn contains(&self, seq: u64) -> bool {
        self.at_or_after(seq)
            .is_some_and(|(file, index)| file.records[index].seq == seq)
    }

    pub fn remove(&mut self, name_seq: u64) -> Option<MovedFile> {
        self.files.remove(&name_seq)
    }

    pub fn files(&self) -> impl Iterator<Item = &MovedFile> {
        self.files.values()
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }

    /// The first moved record at or after `seq`: its file and its index there.
    pub fn at_or_after(&self, seq: u64) -> Option<(&MovedFile, usize)> {
        let candidates = self
            .files
            .range(..=seq)
            .next_back()
            .into_iter()
            .chain(self.files.range(seq.saturating_add(1)..));
        for (_, file) in candidates {
            let index = file.records.partition_point(|r| r.seq < seq);
            if index < file.records.len() {
                return Some((file, index));
            }
        }
        None
    }
}

/// Writes `records` (ascending) as a moved file named after the first of them, durably: it is
/// whole on disk, under its name, when this returns. An existing file of that name is replaced.
///
/// # Errors
/// `Error::Io` naming the step that failed.
pub(crate) fn write_moved_file(
    fs: &dyn FileSystem,
    dir: &Path,
    epoch: u64,
    name_seq: u64,
    records: &[Record],
) -> Result<MovedFile> {
    assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(records.first().is_none_or(|r| r.seq >= name_seq));
    let salt = crate::segment::unpredictable_salt(epoch, name_seq);
    let header = SegmentHeader {
        epoch,
        first_seq: name_seq,
        salt,
    };
    let mut content = header.encode().to_vec();
    let mut index = Vec::with_capacity(records.len());
    for record in records {
        let offset = content.len() as u64;
        encode_frame(&mut content, salt, record.seq, record.kind, &record.payload);
        index.push(MovedRecord {
            seq: record.seq,
            offset,
            frame_bytes: content.len() as u64 - offset,
        });
    }
    let name = moved_file_name(name_seq);
    fs::durable_replace(fs, dir, &name, &content)?;
    Ok(MovedFile {
        name_seq,
        path: dir.join(name),
        salt,
        bytes: content.len() as u64,
        records: index,
    })
}

/// Reads and checks a moved file found at start-up. It was renamed into place whole, so any
/// bad byte is corruption: refused with the file and offset named.
///
/// # Errors
/// `Error::Corrupt`, or `Error::Io`.
pub(crate) fn scan_moved_file(
    fs: &dyn FileSystem,
    path: &Path,
    name_seq: u64,
) -> Result<MovedFile> {
    let bytes = fs::read_file(fs, path)?;
    let corrupt = |offset: usize, detail: String| Error::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        detail,
    };
    let header = SegmentHeader::decode(&bytes).map_err(|detail| corrupt(0, detail))?;
    if header.first_seq != name_seq {
        return Err(corrupt(
            0,
            format!(
                "header says the moved records start at {}",
                header.first_seq
            ),
        ));
    }
    let mut records: Vec<MovedRecord> = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES as usize;
    while offset < bytes.len() {
        let frame = match check_frame(&bytes[offset..], header.salt) {
            FrameCheck::Valid(frame) => frame,
            FrameCheck::Incomplete => return Err(corrupt(offset, "moved record cut short".into())),
            FrameCheck::Invalid(reason) => return Err(corrupt(offset, reason.into())),
        };
        let in_order = match records.last() {
            Some(last) => frame.seq > last.seq,
            None => frame.seq >= name_seq,
        };
        if !in_order {
            return Err(corrupt(
                offset,
                format!("moved record {} is out of order", frame.seq),
            ));
        }
        records.push(MovedRecord {
            seq: frame.seq,
            offset: offset as u64,
            frame_bytes: frame.total_bytes(),
        });
        offset += usize::try_from(frame.total_bytes()).expect("frame fits in memory");
    }
    Ok(MovedFile {
        name_seq,
        path: path.to_path_buf(),
        salt: header.salt,
        bytes: bytes.len() as u64,
        records,
    })
}
