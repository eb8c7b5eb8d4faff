//! The writer: group commit, on a thread of its own (or the caller's, `WriterMode::Caller`).
//!
//! It takes every append queued while the previous fdatasync ran (bounded by the batch limits),
//! writes them with one positional write per segment, fdatasyncs once, advances the durable
//! watermark, and only then resolves the batch's appends, in sequence order. One thread owns the
//! active segment, so there is exactly one write and one fsync in flight at any time.
//!
//! Any failed write, fsync or epoch check stops the log for good (`Shared::fail`): after a
//! failed fsync the kernel may have dropped the dirty pages, so retrying could acknowledge
//! records that are not on disk. One exception: a write (or a segment's creation) that finds
//! the file system full (ENOSPC) made nothing durable and acknowledged nothing, so the writer
//! waits for room and writes the same records again: a full disk is back-pressure, not the end
//! of the log. When that write went to a segment that already has records, the writer first
//! seals the segment where its durable records end and writes the records again at the start of
//! a new one: only sealed segments are reclaimed, so waiting on the old one could keep for good
//! the space its consumed records hold.

use crate::fence;
use crate::fs::FileHandle;
use crate::layout::{FRAME_HEADER_BYTES, KIND_BATCH_START, SEGMENT_HEADER_BYTES, encode_frame};
use crate::limits::{
    DISK_RECHECK_INTERVAL_MS, EPOCH_CHECK_INTERVAL_MS, GATHER_RECORDS_MIN, GATHER_WAIT_US_MAX,
    PREALLOCATE_WRITE_BYTES_MAX,
};
use crate::options::{SyncPolicy, WalOptions};
use crate::segment::{Segment, create_segment};
use crate::wal::{Queue, QueueState, Shared, Submission};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

/// The segment being appended to.
pub(crate) struct ActiveSegment {
    pub first_seq: u64,
    pub path: PathBuf,
    pub file: Box<dyn FileHandle>,
    /// Bytes of header and records; the next write goes here.
    pub len: u64,
    /// The file's size: `len` plus zeros written ahead (preallocation).
    pub allocated: u64,
    pub salt: u32,
}

impl ActiveSegment {
    /// Appends go to `file`, the segment `segment` describes, whose size is `allocated`.
    pub fn new(file: Box<dyn FileHandle>, segment: &Segment, allocated: u64) -> ActiveSegment {
        ActiveSegment {
            first_seq: segment.first_seq,
            path: segment.path.clone(),
            file,
            len: segment.bytes,
            allocated,
            salt: segment.salt,
        }
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    active: ActiveSegment,
    /// Frames encoded but not yet written.
    buffer: Vec<u8>,
    /// `(seq, offset, frame_bytes)` of each frame in `buffer`.
    buffered: Vec<(u64, u64, u64)>,
    epoch_checked_at: Instant,
    /// Records in the previous batch: the concurrency the writer expects to see again.
    last_batch_records: usize,
    /// A moving average of how long an fdatasync takes here.
    sync_duration: Duration,
    /// The active segment was sealed in this low-space episode (see `seal_active_segment`).
    sealed_while_low: bool,
    /// Set when a write to a segment with records found the disk full: the first record the
    /// write held, which `write_batch` writes again in a new segment.
    unwritten_for_room: Option<u64>,
}

impl Writer {
    pub fn new(shared: Arc<Shared>, active: ActiveSegment) -> Writer {
        Writer {
            shared,
            active,
            buffer: Vec::new(),
            buffered: Vec::new(),
            epoch_checked_at: Instant::now(),
            last_batch_records: 0,
            sync_duration: Duration::ZERO,
            sealed_while_low: false,
            unwritten_for_room: None,
        }
    }

    /// Runs until the log is closed and drained, or fails.
    pub fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            if !self.commit(batch) {
                return;
            }
        }
        self.finish();
    }

    /// Writes every append queued now, in batches, on the caller's thread
    /// (`WriterMode::Caller`); returns how many it wrote.
    pub fn write_queued(&mut self) -> usize {
        let mut written = 0;
        loop {
            let batch = {
                let mut queue = self.shared.lock_queue();
                if matches!(queue.state, QueueState::Failed(_)) {
                    return written;
                }
                take_batch(&mut queue, &self.shared.options)
            };
            self.last_batch_records = batch.len();
            if batch.is_empty() {
                return written;
            }
            written += batch.len();
            if !self.commit(batch) {
                return written;
            }
        }
    }

    /// Writes what is queued and stops (`WriterMode::Caller`, once the log is closing).
    pub fn drain(mut self) {
        self.write_queued();
        if !matches!(self.shared.lock_queue().state, QueueState::Failed(_)) {
            self.finish();
        }
    }

    /// Writes and syncs `batch`, then resolves its appends; false if the log stopped.
    fn commit(&mut self, batch: Vec<Submission>) -> bool {
        match self.write_batch(&batch) {
            Ok(last_seq) => {
                self.shared.durable.send_replace(last_seq);
                for submission in batch {
                    let _ = submission.done.send(Ok(submission.seq));
                }
                // After the acknowledgements, not before: they need no statvfs.
                self.shared.disk_measured(self.shared.measure_available());
                true
            }
            Err(cause) => {
                self.stop(cause, batch);
                false
            }
        }
    }

    /// The log closed and everything queued is durable: no appends any more.
    fn finish(&self) {
        self.shared.queue_room.close();
        self.shared.durable.send_modify(|_| {});
    }

    /// Stops the log for good after `cause`, failing `batch` and everything queued.
    fn stop(&self, cause: Error, batch: Vec<Submission>) {
        let error = match cause {
            Error::Fenced { .. } => cause,
            other => Error::Poisoned {
                cause: Box::new(other),
            },
        };
        tracing::error!(dir = %self.shared.dir.display(), "write-ahead log stopped: {error}");
        for submission in batch {
            let _ = submission.done.send(Err(error.clone()));
        }
        self.shared.fail(&error);
    }

    /// Waits for appends and takes the next batch; `None` once closed and drained, or failed.
    fn next_batch(&mut self) -> Option<Vec<Submission>> {
        let shared = Arc::clone(&self.shared);
        let options = &shared.options;
        let mut queue = self.shared.lock_queue();
        loop {
            match queue.state {
                QueueState::Failed(_) => return None,
                QueueState::Closing if queue.pending.is_empty() => return None,
                QueueState::Open | QueueState::Closing if !queue.pending.is_empty() => break,
                QueueState::Open | QueueState::Closing => {}
            }
            queue.writer_wakes_at = Some(1);
            if queue.disk_low {
                // Idle while appends wait for room: look at the free space now and then.
                let recheck = Duration::from_millis(DISK_RECHECK_INTERVAL_MS);
                queue = self
                    .shared
                    .queue_changed
                    .wait_timeout(queue, recheck)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                drop(queue);
                self.shared.disk_measured(self.shared.measure_available());
                if let Err(e) = self.seal_active_segment() {
                    self.stop(e, Vec::new());
                    return None;
                }
                queue = self.shared.lock_queue();
                continue;
            }
            queue = self
                .shared
                .queue_changed
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let (wanted, wait) = self.gather_target();
        let deadline = Instant::now() + wait.max(options.batch_linger);
        while queue.pending.len() < wanted && matches!(queue.state, QueueState::Open) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            queue.writer_wakes_at = Some(wanted);
            queue = self
                .shared
                .queue_changed
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        queue.writer_wakes_at = None;
        let batch = take_batch(&mut queue, options);
        self.last_batch_records = batch.len();
        Some(batch)
    }

    /// How many appends to gather before writing, and for how long at most.
    ///
    /// Clients with a window of outstanding appends refill it as their acks arrive, one by one;
    /// a writer that starts the next write on the first refill syncs batches of 1 and N-1 in
    /// turn and halves throughput. So when the previous batch showed concurrency, wait for the
    /// queue to refill to its size, for at most a quarter of an fsync (bounded), which is cheap
    /// next to the fsync the wait saves. Under light load (small batches) nothing is waited for.
    fn gather_target(&self) -> (usize, Duration) {
        let records_max = self.shared.options.batch_records_max as usize;
        if self.last_batch_records < GATHER_RECORDS_MIN {
            return (records_max, Duration::ZERO);
        }
        let wait = (self.sync_duration / 4).min(Duration::from_micros(GATHER_WAIT_US_MAX));
        (self.last_batch_records.min(records_max), wait)
    }

    /// Writes and syncs a batch; returns its last sequence number once it is durable.
    fn write_batch(&mut self, batch: &[Submission]) -> Result<u64> {
        assert!(!batch.is_empty());
        if self.epoch_checked_at.elapsed() >= Duration::from_millis(EPOCH_CHECK_INTERVAL_MS) {
            fence::check_epoch(self.shared.fs.as_ref(), &self.shared.dir, self.shared.epoch)?;
            self.epoch_checked_at = Instant::now();
        }
        let mut rest = batch;
        loop {
            let written = self.write_records(rest);
            match self.unwritten_for_room.take() {
                Some(unwritten) => {
                    // A write to a segment with records found the disk full (`flush`). What
                    // it left is not durable: it goes, and the records go to a new segment.
                    let error = written.expect_err("set only with a failed write");
                    self.buffer.clear();
                    self.buffered.clear();
                    self.seal_for_room(unwritten, &error)?;
                    let from = rest
                        .iter()
                        .position(|submission| submission.seq == unwritten)
                        .expect("the unwritten records are the batch's");
                    rest = &rest[from..];
                }
                None => {
                    written?;
                    return Ok(batch.last().expect("batch is not empty").seq);
                }
            }
        }
    }

    /// Encodes `records` into the active segment (rolling at its size) and makes them durable.
    fn write_records(&mut self, records: &[Submission]) -> Result<()> {
        let segment_size = self.shared.options.segment_size_bytes;
        for submission in records {
            let frame_bytes = FRAME_HEADER_BYTES + submission.payload.len() as u64;
            let offset = self.active.len + self.buffer.len() as u64;
            let segment_has_records = offset > SEGMENT_HEADER_BYTES;
            if offset + frame_bytes > segment_size && segment_has_records {
                self.flush()?;
                self.roll(submission.seq)?;
            }
            let offset = self.active.len + self.buffer.len() as u64;
            // The first record of every write: everything before it is already durable.
            let kind = if self.buffer.is_empty() {
                submission.kind | KIND_BATCH_START
            } else {
                submission.kind
            };
            encode_frame(
                &mut self.buffer,
                self.active.salt,
                submission.seq,
                kind,
                &submission.payload,
            );
            self.buffered.push((submission.seq, offset, frame_bytes));
        }
        self.flush()
    }

    /// Writes the buffered frames to the active segment and makes them durable.
    fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.preallocate();
        if self.active.len > SEGMENT_HEADER_BYTES {
            // Out of space, this segment is sealed instead of waited on (`write_batch`); only
            // a write's failure says so, never an fsync's (a failed fsync stops the log).
            if let Err(error) = self.write_buffer() {
                if error.is_out_of_space() {
                    self.unwritten_for_room = self.buffered.first().map(|&(seq, _, _)| seq);
                }
                return Err(error);
            }
        } else {
            self.until_space_frees(Writer::write_buffer)?;
        }
        let path = &self.active.path;
        if self.shared.options.sync == SyncPolicy::Always {
            let started = Instant::now();
            self.active
                .file
                .sync_data()
                .map_err(|e| Error::io("fsync segment", path, e))?;
            self.sync_duration = (self.sync_duration * 7 + started.elapsed()) / 8;
        }
        let mut segments = self
            .shared
            .segments
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let segment = segments
            .get_mut(self.active.first_seq)
            .expect("the active segment is never removed");
        for &(seq, offset, frame_bytes) in &self.buffered {
            segment.push_record(seq, offset, frame_bytes);
        }
        drop(segments);
        self.active.len += self.buffer.len() as u64;
        self.buffer.clear();
        self.buffered.clear();
        Ok(())
    }

    /// Writes the buffered frames at the end of the active segment, not yet durable.
    fn write_buffer(&mut self) -> Result<()> {
        let path = &self.active.path;
        fail::fail_point!("storage.segment.write", |_| Err(Error::io(
            "write segment",
            path,
            std::io::Error::other("failpoint storage.segment.write")
        )));
        self.active
            .file
            .write_all_at(&self.buffer, self.active.len)
            .map_err(|e| Error::io("write segment", path, e))
    }

    /// Runs `step` until it does not fail for want of space: between tries, waits for the
    /// disk to have room (or for the log to close, which ends the wait with the error). The
    /// step must be one that can be repeated: nothing it did is durable or acknowledged yet.
    fn until_space_frees<T>(&mut self, mut step: impl FnMut(&mut Self) -> Result<T>) -> Result<T> {
        let mut waited = false;
        loop {
            let error = match step(self) {
                Err(error) if error.is_out_of_space() => error,
                done => {
                    if waited {
                        tracing::info!(dir = %self.shared.dir.display(), "file system has room: the write-ahead log goes on");
                    }
                    return done;
                }
            };
            let mut queue = self.shared.lock_queue();
            if !matches!(queue.state, QueueState::Open) {
                return Err(error);
            }
            if !waited {
                tracing::warn!(dir = %self.shared.dir.display(), "file system full, the write-ahead log waits for room: {error}");
                waited = true;
            }
            queue.disk_low = true;
            let recheck = Duration::from_millis(DISK_RECHECK_INTERVAL_MS);
            drop(self.shared.queue_changed.wait_timeout(queue, recheck));
        }
    }

    /// When the write being flushed grows the file anyway (its fdatasync commits metadata),
    /// zero-fills ahead in the same fdatasync, so the writes after it land in allocated,
    /// durable zeros and their fdatasyncs flush data only. Recovery reads zeros after the last
    /// record as the end of the segment.
    ///
    /// It is only an optimisation: when the zeros cannot be written (a full disk, say), the
    /// records are written without them.
    fn preallocate(&mut self) {
        let written_end = self.active.len + self.buffer.len() as u64;
        let ahead = self.shared.options.preallocate_bytes;
        if written_end <= self.active.allocated {
            return;
        }
        if ahead == 0 || self.buffer.len() as u64 >= PREALLOCATE_WRITE_BYTES_MAX {
            self.active.allocated = written_end;
            return;
        }
        let target = (written_end + ahead).min(self.shared.options.segment_size_bytes);
        if target > written_end {
            let zeros = vec![0u8; usize::try_from(target - written_end).expect("bounded")];
            if let Err(e) = self.active.file.write_all_at(&zeros, written_end) {
                // Part of the zeros may be there, taking room a roll must give back: it trims
                // what is allocated past the records.
                tracing::debug!(segment = %self.active.path.display(), "could not preallocate: {e}");
                let size = self.active.file.size().unwrap_or(target);
                self.active.allocated = size.max(written_end);
                return;
            }
        }
        self.active.allocated = target.max(written_end);
    }

    /// While appends wait for room on the disk, seals the active segment (once it has records):
    /// only sealed segments are reclaimed, so a segment larger than the free space would keep
    /// what consumers are done with for good.
    fn seal_active_segment(&mut self) -> Result<()> {
        if !self.shared.lock_queue().disk_low {
            self.sealed_while_low = false;
            return Ok(());
        }
        // Once an episode: appends that still fit go on into the new segment meanwhile.
        if self.sealed_while_low || self.active.len <= SEGMENT_HEADER_BYTES {
            return Ok(());
        }
        self.sealed_while_low = true;
        let last_seq = self
            .shared
            .segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(self.active.first_seq)
            .expect("the active segment is never removed")
            .last_seq;
        tracing::info!(segment = %self.active.path.display(), "file system almost full: sealing the active segment, so that it can be freed once consumed");
        self.roll(last_seq + 1)
    }

    /// After a write to the active segment found the disk full: cuts off what the write left
    /// past the segment's durable records (and any zeros allocated ahead), and goes on in a
    /// new segment from `first_unwritten` (waiting for room to create it). The sealed segment
    /// can then be reclaimed once its records are consumed, which may be the only way the
    /// disk gets room again.
    fn seal_for_room(&mut self, first_unwritten: u64, cause: &Error) -> Result<()> {
        tracing::warn!(segment = %self.active.path.display(), "file system full during a write: sealing the segment, the write goes to a new one once there is room: {cause}");
        self.shared.lock_queue().disk_low = true;
        self.sealed_while_low = true;
        // The failed write may have grown the file past what the writer allocated.
        let size = self.active.file.size().unwrap_or(u64::MAX);
        self.active.allocated = self.active.allocated.max(size);
        self.roll(first_unwritten)
    }

    /// Creates the segment that starts at `first_seq`. One that could not be made for want of
    /// space is removed again (it has no record), so that the next try can create it anew.
    fn create_segment(&mut self, first_seq: u64) -> Result<(Box<dyn FileHandle>, Segment)> {
        let (fs, dir) = (self.shared.fs.as_ref(), &self.shared.dir);
        let created = create_segment(fs, dir, self.shared.epoch, first_seq);
        if created.as_ref().is_err_and(Error::is_out_of_space) {
            let path = crate::layout::segment_path(dir, first_seq);
            match fs.remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove unfinished segment", path, e)),
            }
        }
        created
    }

    /// Starts a new segment at `first_seq`; the previous one is already synced. Its zeros
    /// written ahead are cut off first, so a sealed segment ends with its last record.
    fn roll(&mut self, first_seq: u64) -> Result<()> {
        assert!(self.buffer.is_empty(), "flush before rolling");
        // Fenced first: a newer owner may have recovered this segment and appended to it,
        // and the trim below would cut its records off.
        fence::check_epoch(self.shared.fs.as_ref(), &self.shared.dir, self.shared.epoch)?;
        self.epoch_checked_at = Instant::now();
        if self.active.allocated > self.active.len {
            let path = &self.active.path;
            self.active
                .file
                .set_len(self.active.len)
                .map_err(|e| Error::io("trim segment", path, e))?;
            self.active
                .file
                .sync_data()
                .map_err(|e| Error::io("fsync segment", path, e))?;
        }
        fail::fail_point!("storage.segment.roll", |_| Err(Error::io(
            "create segment",
            crate::layout::segment_path(&self.shared.dir, first_seq),
            std::io::Error::other("failpoint storage.segment.roll")
        )));
        let (file, segment) = self.until_space_frees(|writer| writer.create_segment(first_seq))?;
        self.active = ActiveSegment::new(file, &segment, SEGMENT_HEADER_BYTES);
        self.shared
            .segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(segment);
        self.shared.lock_queue().usage_bytes += SEGMENT_HEADER_BYTES;
        Ok(())
    }
}

/// Takes the next batch from the front of the queue, as large as the batch limits allow.
fn take_batch(queue: &mut Queue, options: &WalOptions) -> Vec<Submission> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.pending.front() {
        let frame_bytes = FRAME_HEADER_BYTES + next.payload.len() as u64;
        let full = batch.len() as u64 >= u64::from(options.batch_records_max)
            || (!batch.is_empty() && bytes + frame_bytes > options.batch_bytes_max);
        if full {
            break;
        }
        bytes += frame_bytes;
        batch.push(queue.pending.pop_front().expect("front exists"));
    }
    batch
}
