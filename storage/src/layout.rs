//! The on-disk layout of a WAL directory, in one place.
//!
//! ```text
//! <dir>/LOCK                          flock'ed by the one writer (law 3); empty
//! <dir>/EPOCH                         the fencing epoch: MAGIC_EPOCH u64:epoch u32:crc32c
//! <dir>/<first_seq:020>.seg           segments, named by the first sequence number they hold
//! <dir>/<first_seq:020>.moved         records moved out of removed segments (see `moved.rs`):
//!                                     a segment header, then frames of ascending, not
//!                                     necessarily consecutive, sequence numbers
//! <dir>/*.tmp                         staging files of `fs::durable_replace`; ignored, removed
//! ```
//!
//! A segment is a header followed by records:
//!
//! ```text
//! header (36 bytes, little-endian):
//!   magic "SPOOLWAL" | version u32 | epoch u64 | first_seq u64 | salt u32 | crc32c u32 (of the 32 bytes before)
//! record:
//!   len u32 | crc32c u32 | seq u64 | kind u8 | payload [len bytes]
//!   crc32c, seeded with the segment's salt, covers len, seq, kind and payload (every byte of
//!   the frame except itself)
//! ```
//!
//! The salt is random per segment. Payloads come from clients, so a client could embed bytes that
//! look like a whole frame; without the salt, recovery's search for a later record (below) could
//! take such a payload for a real record. A client cannot know the salt, so it cannot make a
//! checksum that matches it.
//!
//! The top bit of `kind` is the writer's own: `KIND_BATCH_START` marks the first record written
//! after an fdatasync, so every record before it was durable when it was written. Recovery uses it
//! to tell a torn tail (damage inside the last, unsynced write) from corruption of acknowledged
//! data (damage that a batch-start record follows). Callers use the low seven bits.

use crate::Error;
use crate::limits::RECORD_PAYLOAD_BYTES_MAX;
use std::path::{Path, PathBuf};

/// Name of the lock file taken with an exclusive flock.
pub const LOCK_FILE_NAME: &str = "LOCK";
/// Name of the file that holds the fencing epoch.
pub const EPOCH_FILE_NAME: &str = "EPOCH";
/// Suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of moved-record files.
pub const MOVED_SUFFIX: &str = ".moved";
/// Suffix of staging files that `durable_replace` renames into place.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Magic bytes that open every segment.
pub const MAGIC_SEGMENT: [u8; 8] = *b"SPOOLWAL";
/// Magic bytes that open the epoch file.
pub const MAGIC_EPOCH: [u8; 8] = *b"SPOOLEPO";
/// Version of the segment and record format; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 2;

/// Size of the segment header.
pub const SEGMENT_HEADER_BYTES: u64 = 36;
/// Size of a record's frame header (everything before the payload).
pub const FRAME_HEADER_BYTES: u64 = 17;
/// Size of the epoch file.
pub const EPOCH_FILE_BYTES: usize = 20;

/// Set on the first record of each write: everything before it was fdatasynced.
pub const KIND_BATCH_START: u8 = 0x80;
/// The bits of `kind` that belong to the caller.
pub const KIND_USER_MASK: u8 = 0x7f;

const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX as u64 + FRAME_HEADER_BYTES <= u32::MAX as u64);

/// The file name of the segment whose first record is `first_seq`.
#[must_use]
pub fn segment_file_name(first_seq: u64) -> String {
    seq_file_name(first_seq, SEGMENT_SUFFIX)
}

/// The first sequence number encoded in a segment file name, or `None` if `name` is not one.
#[must_use]
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    parse_seq_file_name(name, SEGMENT_SUFFIX)
}

/// The file name of the moved records whose first sequence number is `first_seq`.
#[must_use]
pub fn moved_file_name(first_seq: u64) -> String {
    seq_file_name(first_seq, MOVED_SUFFIX)
}

/// The sequence number encoded in a moved-record file name, or `None` if `name` is not one.
#[must_use]
pub fn parse_moved_file_name(name: &str) -> Option<u64> {
    parse_seq_file_name(name, MOVED_SUFFIX)
}

/// Log files are named by a sequence number in 20 digits (sorting by name sorts by number).
fn seq_file_name(seq: u64, suffix: &str) -> String {
    format!("{seq:020}{suffix}")
}

fn parse_seq_file_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The path of a segment file.
#[must_use]
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(segment_file_name(first_seq))
}

/// The fixed header at the start of every segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The epoch of the writer that created the segment.
    pub epoch: u64,
    /// The sequence number of the segment's first record (also in its file name).
    pub first_seq: u64,
    /// The seed of every frame checksum in the segment.
    pub salt: u32,
}

impl SegmentHeader {
    /// Encodes the header with its checksum.
    #[must_use]
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES as usize];
        bytes[0..8].copy_from_slice(&MAGIC_SEGMENT);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[12..20].copy_from_slice(&self.epoch.to_le_bytes());
        bytes[20..28].copy_from_slice(&self.first_seq.to_le_bytes());
        bytes[28..32].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[0..32]);
        bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and checks a header.
    ///
    /// # Errors
    /// A description of what is wrong, for the caller to wrap with the file's path.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, String> {
        if bytes.len() < SEGMENT_HEADER_BYTES as usize {
            return Err(format!(
                "header is {} bytes, expected {SEGMENT_HEADER_BYTES}",
                bytes.len()
            ));
        }
        if bytes[0..8] != MAGIC_SEGMENT {
            return Err("not a spool segment (bad magic)".into());
        }
        // The version comes before the checksum: another version's header may have another
        // length, and its checksum in another place.
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "unsupported format version {version} (this spool reads version \
                 {FORMAT_VERSION}), or a damaged header"
            ));
        }
        let stored_crc = u32_at(bytes, 32);
        if crc32c::crc32c(&bytes[0..32]) != stored_crc {
            return Err("segment header checksum mismatch".into());
        }
        Ok(SegmentHeader {
            epoch: u64_at(bytes, 12),
            first_seq: u64_at(bytes, 20),
            salt: u32_at(bytes, 28),
        })
    }
}

/// Appends one framed record to `buf`, checksummed with the segment's `salt`.
pub fn encode_frame(buf: &mut Vec<u8>, salt: u32, seq: u64, kind: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload length checked against the maximum");
    assert!(len <= RECORD_PAYLOAD_BYTES_MAX);
    assert!(seq > 0, "sequence numbers start at 1");
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    let crc = frame_crc(salt, &buf[start..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The checksum of a whole frame (its own crc field is skipped).
fn frame_crc(salt: u32, frame: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(salt, &frame[0..4]);
    crc32c::crc32c_append(crc, &frame[8..])
}

/// The sequence number a frame at the start of `bytes` would have, read without checking
/// anything: a cheap filter before `check_frame` when searching every offset.
#[must_use]
pub fn unchecked_frame_seq(bytes: &[u8]) -> Option<u64> {
    (bytes.len() >= FRAME_HEADER_BYTES as usize).then(|| u64_at(bytes, 8))
}

/// A frame as found in a buffer: its header fields and where its payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The record's sequence number.
    pub seq: u64,
    /// The kind byte, including `KIND_BATCH_START`.
    pub kind: u8,
    /// Payload length.
    pub len: u32,
}

impl Frame {
    /// Total bytes the frame occupies.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        FRAME_HEADER_BYTES + u64::from(self.len)
    }
}

/// What a buffer holds at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCheck {
    /// A whole, checksummed frame.
    Valid(Frame),
    /// The buffer ends before the frame does (a torn tail, or read more).
    Incomplete,
    /// The bytes are not a valid frame.
    Invalid(&'static str),
}

/// Checks whether `bytes` starts with a valid frame of a segment with this `salt`. Never panics
/// on any input.
#[must_use]
pub fn check_frame(bytes: &[u8], salt: u32) -> FrameCheck {
    if bytes.len() < FRAME_HEADER_BYTES as usize {
        return FrameCheck::Incomplete;
    }
    let len = u32_at(bytes, 0);
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return FrameCheck::Invalid("record length beyond the maximum");
    }
    let total = FRAME_HEADER_BYTES as usize + len as usize;
    if bytes.len() < total {
        return FrameCheck::Incomplete;
    }
    if frame_crc(salt, &bytes[..total]) != u32_at(bytes, 4) {
        return FrameCheck::Invalid("record checksum mismatch");
    }
    let seq = u64_at(bytes, 8);
    if seq == 0 {
        return FrameCheck::Invalid("record has sequence number 0");
    }
    FrameCheck::Valid(Frame {
        seq,
        kind: bytes[16],
        len,
    })
}

/// Encodes the epoch file's content.
#[must_use]
pub fn encode_epoch(epoch: u64) -> [u8; EPOCH_FILE_BYTES] {
    let mut bytes = [0u8; EPOCH_FILE_BYTES];
    bytes[0..8].copy_from_slice(&MAGIC_EPOCH);
    bytes[8..16].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..16]);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Decodes the epoch file's content.
///
/// # Errors
/// `Error::Corrupt` naming `path` when the content is not a valid epoch file.
pub fn decode_epoch(path: &Path, bytes: &[u8]) -> Result<u64, Error> {
    let corrupt = |detail: &str| Error::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        detail: detail.to_string(),
    };
    if bytes.len() != EPOCH_FILE_BYTES {
        return Err(corrupt("epoch file has the wrong size"));
    }
    if bytes[0..8] != MAGIC_EPOCH {
        return Err(corrupt("epoch file has a bad magic"));
    }
    if crc32c::crc32c(&bytes[0..16]) != u32_at(bytes, 16) {
        return Err(corrupt("epoch file checksum mismatch"));
    }
    Ok(u64_at(bytes, 8))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn segment_names_round_trip_and_sort_by_sequence() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.seg"), None);
        assert!(segment_file_name(9) < segment_file_name(10));
    }

    #[test]
    fn header_rejects_every_single_byte_flip() {
        let header = SegmentHeader {
            epoch: 7,
            first_seq: 1000,
            salt: 0xdead_beef,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        for at in 0..bytes.len() {
            let mut damaged = bytes;
            damaged[at] ^= 0x01;
            assert!(
                SegmentHeader::decode(&damaged).is_err(),
                "flip at {at} accepted"
            );
        }
    }

    #[test]
    fn a_header_of_another_version_is_named_as_such() {
        // Version 1 had no salt: magic | version | epoch | first_seq | crc32c, 32 bytes.
        let mut old = MAGIC_SEGMENT.to_vec();
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&[0; 16]);
        let crc = crc32c::crc32c(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        old.extend_from_slice(&[0xAB; 4]); // the first bytes of a record
        let error = SegmentHeader::decode(&old).unwrap_err();
        assert!(error.contains("unsupported format version 1"), "{error}");
    }

    proptest! {
        /// Goal: any frame decodes back to what was encoded, and any prefix is "incomplete",
        /// never "valid".
        #[test]
        fn frame_round_trips(seq in 1u64.., kind: u8, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = Vec::new();
            encode_frame(&mut buf, 7, seq, kind, &payload);
            let frame = Frame { seq, kind, len: payload.len() as u32 };
            prop_assert_eq!(check_frame(&buf, 7), FrameCheck::Valid(frame));
            for cut in 0..buf.len() {
                prop_assert_eq!(check_frame(&buf[..cut], 7), FrameCheck::Incomplete);
            }
        }

        /// Goal: a flipped bit anywhere in a frame is never taken for a valid frame.
        #[test]
        fn frame_detects_any_bit_flip(seq in 1u64..1000, payload in proptest::collection::vec(any::<u8>(), 0..64), at: prop::sample::Index, bit in 0u8..8) {
            let mut buf = Vec::new();
            encode_frame(&mut buf, 7, seq, 1, &payload);
            let at = at.index(buf.len());
            buf[at] ^= 1 << bit;
            prop_assert!(!matches!(check_frame(&buf, 7), FrameCheck::Valid(_)));
        }

        /// Goal: a frame written under one segment's salt is not valid in another segment, so
        /// a client cannot forge a record inside a payload without knowing the salt.
        #[test]
        fn frame_is_bound_to_its_salt(seq in 1u64.., payload in proptest::collection::vec(any::<u8>(), 0..64), salt: u32, other: u32) {
            prop_assume!(salt != other);
            let mut buf = Vec::new();
            encode_frame(&mut buf, salt, seq, 1, &payload);
            prop_assert!(!matches!(check_frame(&buf, other), FrameCheck::Valid(_)));
        }

        /// Goal: arbitrary bytes never panic the frame checker.
        #[test]
        fn frame_check_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = check_frame(&bytes, 0);
        }
    }
}
