//! The WAL's tunables, with defaults that are safe, and their validation.

use crate::fence::LockPolicy;
use crate::layout::{FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use crate::limits::{
    BATCH_BYTES_MAX_DEFAULT, BATCH_RECORDS_MAX_DEFAULT, DISK_FREE_MIN_BYTES_DEFAULT,
    PREALLOCATE_BYTES_DEFAULT, PREALLOCATE_BYTES_MAX, QUEUE_BYTES_MAX_DEFAULT,
    RECORD_PAYLOAD_BYTES_MAX, SEGMENT_SIZE_BYTES_DEFAULT, SEGMENT_SIZE_BYTES_MIN,
};
use crate::{Error, Result};
use std::time::Duration;

/// When the writer calls `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// After every batch, before any of its appends resolves. The only safe policy.
    #[default]
    Always,
    /// Never. Appends resolve as soon as they are written to the page cache, so a power loss or
    /// a kernel crash loses acknowledged records. This breaks law 1 and exists only to measure
    /// what fsync costs in benchmarks; never use it for data that matters.
    UnsafeNoFsync,
}

/// Who runs the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriterMode {
    /// A thread of its own, which group-commits appends as they come. The mode for service.
    #[default]
    Thread,
    /// The caller, through [`crate::Wal::write_queued`]: nothing becomes durable until it is
    /// called. For deterministic simulations, where one thread decides what happens when and
    /// a seed replays it exactly. A write that meets a full disk waits on the caller's thread.
    Caller,
}

/// Options of [`crate::Wal::open`].
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A segment is rolled once the next record would make it larger than this.
    pub segment_size_bytes: u64,
    /// The largest payload accepted by `append`.
    pub record_payload_bytes_max: u32,
    /// The most bytes written between two fdatasyncs (a single larger record is written alone).
    pub batch_bytes_max: u64,
    /// The most records written between two fdatasyncs.
    pub batch_records_max: u32,
    /// How long the writer waits for more appends before writing a batch. Zero (the default)
    /// means a batch is whatever queued while the previous fdatasync ran: no added latency.
    pub batch_linger: Duration,
    /// The most bytes queued for the writer; further appends wait or fail with `QueueFull`.
    pub queue_bytes_max: u64,
    /// The most bytes the log (segments plus queued appends) may occupy; further appends fail
    /// with `QuotaExceeded` until retention frees space. `None`: no quota.
    pub quota_bytes: Option<u64>,
    /// Bytes the file system must keep free: appends are refused with `DiskFull` (back-pressure,
    /// like the quota) below it, so that what the log and its caller must still write (segment
    /// rolls, moved records, the epoch file, metadata commits) finds room. 0 turns it off.
    pub disk_free_min_bytes: u64,
    /// How far ahead of the write position a segment is zero-filled (never past its size), so
    /// most fdatasyncs flush data only; 0 turns it off.
    pub preallocate_bytes: u64,
    /// When to fdatasync.
    pub sync: SyncPolicy,
    /// Whether to take the directory lock.
    pub lock: LockPolicy,
    /// Who runs the writer.
    pub writer: WriterMode,
    /// The highest sequence number the caller's metadata refers to (e.g. the highest durable
    /// checkpoint). Recovery refuses a log that ends before it (`MetadataAhead`).
    pub required_last_seq: u64,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            segment_size_bytes: SEGMENT_SIZE_BYTES_DEFAULT,
            record_payload_bytes_max: 16 << 20,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            batch_linger: Duration::ZERO,
            queue_bytes_max: QUEUE_BYTES_MAX_DEFAULT,
            quota_bytes: None,
            disk_free_min_bytes: DISK_FREE_MIN_BYTES_DEFAULT,
            preallocate_bytes: PREALLOCATE_BYTES_DEFAULT,
            sync: SyncPolicy::Always,
            lock: LockPolicy::Exclusive,
            writer: WriterMode::Thread,
            required_last_seq: 0,
        }
    }
}

impl WalOptions {
    /// The bytes one maximal record occupies on disk.
    #[must_use]
    pub fn frame_bytes_max(&self) -> u64 {
        FRAME_HEADER_BYTES + u64::from(self.record_payload_bytes_max)
    }

    /// Checks that the options fit together.
    ///
    /// # Errors
    /// `Error::InvalidOptions` saying which bound is wrong.
    pub fn validate(&self) -> Result<()> {
        let invalid = |why: String| Err(Error::InvalidOptions(why));
        if self.record_payload_bytes_max > RECORD_PAYLOAD_BYTES_MAX {
            return invalid(format!(
                "record_payload_bytes_max {} is above the limit of {RECORD_PAYLOAD_BYTES_MAX}",
                self.record_payload_bytes_max
            ));
        }
        if self.segment_size_bytes < SEGMENT_SIZE_BYTES_MIN
            || self.segment_size_bytes < SEGMENT_HEADER_BYTES + self.frame_bytes_max()
        {
            return invalid(format!(
                "segment_size_bytes {} must be at least {SEGMENT_SIZE_BYTES_MIN} and hold one \
                 maximal record ({} bytes)",
                self.segment_size_bytes,
                self.frame_bytes_max()
            ));
        }
        if self.queue_bytes_max < self.frame_bytes_max() {
            return invalid("queue_bytes_max must hold at least one maximal record".into());
        }
        if self.queue_bytes_max > tokio::sync::Semaphore::MAX_PERMITS as u64 {
            return invalid("queue_bytes_max is too large".into());
        }
        if self.preallocate_bytes > PREALLOCATE_BYTES_MAX {
            return invalid(format!(
                "preallocate_bytes must be at most {PREALLOCATE_BYTES_MAX}"
            ));
        }
        if self.batch_bytes_max == 0 || self.batch_records_max == 0 {
            return invalid("batch bounds must be positive".into());
        }
        if self
            .quota_bytes
            .is_some_and(|q| q < 2 * self.segment_size_bytes)
        {
            return invalid("quota_bytes must be at least two segments".into());
        }
        Ok(())
    }
}
