//! [`WalReader`]: iterates the log from any sequence number, across moved records and segments,
//! while appends continue, and waits for new records without polling.
//!
//! Below the first segment, what is left of the log is its moved records (see `moved.rs`), all
//! older than any segment's: a reader goes through them first, then on through the segments, so
//! it sees every record still kept, in sequence order.
//!
//! A reader never goes past the durable watermark, so no consumer can be handed (and then
//! acknowledge) a record that a power cut could still take away. Reads are small positional reads
//! of page-cache-hot data; a reader is not meant to be shared between tasks.

use crate::fs::{FileHandle, OpenMode};
use crate::layout::{FrameCheck, KIND_USER_MASK, check_frame};
use crate::limits::{READ_CHUNK_BYTES, READ_FIRST_CHUNK_BYTES};
use crate::wal::Shared;
use crate::{Error, Result};
use bytes::Bytes;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use tokio::sync::watch;

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// The caller's kind (the writer's own flag bit removed).
    pub kind: u8,
    pub payload: Bytes,
}

/// A position in the log and an open segment to read from.
#[derive(Debug)]
pub struct WalReader {
    shared: Arc<Shared>,
    durable: watch::Receiver<u64>,
    next_seq: u64,
    cursor: Option<Cursor>,
}

#[derive(Debug)]
struct Cursor {
    path: PathBuf,
    file: Box<dyn FileHandle>,
    salt: u32,
    /// The last sequence number the segment held when last looked up (it may grow).
    last_seq: u64,
    /// Where that record ends. Reads stop here: past it lie zeros allocated ahead or a write
    /// in progress, which must never be taken for records or cached as such.
    end: u64,
    /// Bytes read from the file, starting at file offset `buffer_offset`.
    buffer: Vec<u8>,
    buffer_offset: u64,
    /// Position of the next frame inside `buffer`.
    position: usize,
    /// Bytes the next read fetches at most (see `READ_FIRST_CHUNK_BYTES`).
    chunk_bytes: usize,
}

impl WalReader {
    pub(crate) fn new(shared: Arc<Shared>, from_seq: u64) -> Result<WalReader> {
        assert!(from_seq > 0, "sequence numbers start at 1");
        let durable = shared.durable.subscribe();
        Ok(WalReader {
            shared,
            durable,
            next_seq: from_seq,
            cursor: None,
        })
    }

    /// Where the reader stands: the next record has this sequence number or, below the first
    /// segment, the first one still kept after it.
    #[must_use]
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next record if it is already durable, without waiting.
    ///
    /// # Errors
    /// `SequenceRemoved` if a reclaim removed it while it was being read, `Corrupt` if it does
    /// not check out, `Io`.
    pub fn try_next(&mut self) -> Result<Option<Record>> {
        let durable = *self.durable.borrow_and_update();
        if self.next_seq > durable {
            self.close_finished_segment();
            return Ok(None);
        }
        if let Some(record) = self.next_moved()? {
            assert!(record.seq >= self.next_seq);
            self.next_seq = record.seq + 1;
            return Ok(Some(record));
        }
        if self.next_seq > durable {
            return Ok(None); // moved on to an active segment that has nothing durable yet
        }
        let record = self.read_next()?;
        assert_eq!(record.seq, self.next_seq);
        self.next_seq += 1;
        Ok(Some(record))
    }

    /// Closes the segment file the reader has read to its end once a newer segment exists: a
    /// reader waiting there (the hub's, between records) would otherwise keep the file, and
    /// its disk space, after the log removed it.
    fn close_finished_segment(&mut self) {
        let Some(cursor) = &self.cursor else {
            return;
        };
        if self.next_seq <= cursor.last_seq {
            return;
        }
        let sealed = self
            .shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .last_first_seq()
            .is_some_and(|last| last > cursor.last_seq);
        if sealed {
            self.cursor = None;
        }
    }

    /// Below the first segment: the next moved record, or, when none is left, a move of the
    /// position to the first segment (and `None`).
    fn next_moved(&mut self) -> Result<Option<Record>> {
        let in_cursor = self
            .cursor
            .as_ref()
            .is_some_and(|c| self.next_seq <= c.last_seq);
        if in_cursor {
            return Ok(None);
        }
        let first_seq = self
            .shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .first_seq()
            .expect("the log always has an active segment");
        if self.next_seq >= first_seq {
            return Ok(None);
        }
        // Held while reading: a reclaim does not replace or remove a moved file under it.
        let moved = self
            .shared
            .moved
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match moved.at_or_after(self.next_seq) {
            Some((file, index)) if file.records[index].seq < first_seq => {
                file.read(self.shared.fs.as_ref(), index).map(Some)
            }
            _ => {
                self.next_seq = first_seq;
                Ok(None)
            }
        }
    }

    /// The next record, waiting until it is durable.
    ///
    /// # Errors
    /// As [`WalReader::try_next`]; `Closed` once the log is closed (or failed) and every durable
    /// record was read.
    pub async fn next(&mut self) -> Result<Record> {
        loop {
            if let Some(record) = self.try_next()? {
                return Ok(record);
            }
            if self.shared.is_stopped() && self.next_seq > *self.durable.borrow() {
                return Err(Error::Closed);
            }
            // The sender lives in `Shared`, which this reader holds, so this cannot fail.
            let _ = self.durable.changed().await;
        }
    }

    fn read_next(&mut self) -> Result<Record> {
        let seq = self.next_seq;
        let in_cursor = self.cursor.as_ref().is_some_and(|c| seq <= c.last_seq);
        if !in_cursor {
            self.open_cursor(seq)?;
        }
        let cursor = self.cursor.as_mut().expect("opened above");
        loop {
            let (record, frame_bytes) = cursor.frame()?;
            cursor.position += frame_bytes;
            if record.seq == seq {
                return Ok(record);
            }
            if record.seq > seq {
                return Err(
                    cursor.corrupt(format!("found sequence {} looking for {seq}", record.seq))
                );
            }
        }
    }

    /// Opens the segment that holds `seq`, positioned at the indexed record at or before it.
    fn open_cursor(&mut self, seq: u64) -> Result<()> {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(segment) = segments.find(seq) else {
            let first_available = segments.first_seq().unwrap_or(seq);
            assert!(
                seq < first_available,
                "durable sequence {seq} is in no segment"
            );
            return Err(Error::SequenceRemoved {
                requested: seq,
                first_available,
            });
        };
        let (path, last_seq, salt, end) = (
            segment.path.clone(),
            segment.last_seq,
            segment.salt,
            segment.bytes,
        );
        let (_, offset) = segment.seek_offset(seq);
        let first_available = segments.first_seq().unwrap_or(seq);
        drop(segments);
        if let Some(cursor) = self.cursor.as_mut().filter(|c| c.path == path) {
            // Still the same segment, which grew: carry on from where the cursor stands, which
            // is `seq` because reading is sequential.
            cursor.last_seq = last_seq;
            cursor.end = end;
            return Ok(());
        }
        let file = match self.shared.fs.open(&path, OpenMode::Read) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::SequenceRemoved {
                    requested: seq,
                    first_available,
                });
            }
            Err(e) => return Err(Error::io("open segment", &path, e)),
        };
        self.cursor = Some(Cursor {
            path,
            file,
            salt,
            last_seq,
            end,
            buffer: Vec::new(),
            buffer_offset: offset,
            position: 0,
            chunk_bytes: READ_FIRST_CHUNK_BYTES,
        });
        Ok(())
    }
}

impl Cursor {
    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            offset: self.buffer_offset + self.position as u64,
            detail,
        }
    }

    /// The frame at the current position and its size; reads more of the file as needed.
    fn frame(&mut self) -> Result<(Record, usize)> {
        loop {
            match check_frame(&self.buffer[self.position..], self.salt) {
                FrameCheck::Valid(frame) => {
                    let start = self.position + crate::layout::FRAME_HEADER_BYTES as usize;
                    let end = start + frame.len as usize;
                    let record = Record {
                        seq: frame.seq,
                        kind: frame.kind & KIND_USER_MASK,
                        payload: Bytes::copy_from_slice(&self.buffer[start..end]),
                    };
                    return Ok((record, end - self.position));
                }
                FrameCheck::Invalid(reason) => return Err(self.corrupt(reason.to_string())),
                FrameCheck::Incomplete => {
                    if !self.read_more()? {
                        return Err(self.corrupt("durable record cut short".into()));
                    }
                }
            }
        }
    }

    /// Appends the next chunk of the file to the buffer; false at the end of the file.
    fn read_more(&mut self) -> Result<bool> {
        if self.position > 0 {
            self.buffer.drain(..self.position);
            self.buffer_offset += self.position as u64;
            self.position = 0;
        }
        let filled = self.buffer.len();
        let unread = self.end.saturating_sub(self.buffer_offset + filled as u64);
        let chunk = usize::try_from(unread).map_or(self.chunk_bytes, |u| u.min(self.chunk_bytes));
        if chunk == 0 {
            return Ok(false);
        }
        self.chunk_bytes = (self.chunk_bytes * 2).min(READ_CHUNK_BYTES);
        self.buffer.resize(filled + chunk, 0);
        let read = self
            .file
            .read_at(
                &mut self.buffer[filled..],
                self.buffer_offset + filled as u64,
            )
            .map_err(|e| Error::io("read segment", &self.path, e));
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                self.buffer.truncate(filled);
                return Err(e);
            }
        };
        self.buffer.truncate(filled + read);
        Ok(read > 0)
    }
}
