//! The storage core's error type: one enum, so that callers can branch on what went wrong
//! (back-pressure, fencing, corruption) without parsing messages.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything the WAL and the metadata store can fail with.
#[derive(Debug, thiserror::Error, Clone)]
pub enum Error {
    /// An I/O call failed; `op` names what was being done (a verb phrase).
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// A record that was acknowledged, or a segment header, does not check out. Start-up stops
    /// here: law 6 forbids truncating data that valid records follow.
    #[error("corrupt write-ahead log: {path} at byte offset {offset}: {detail}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },

    /// A segment is missing between two others: records that were acknowledged are gone.
    #[error(
        "write-ahead log has a gap: records {first_missing}..={last_missing} are missing \
         (expected a segment starting at {first_missing} before {next_path})"
    )]
    MissingSegment {
        first_missing: u64,
        last_missing: u64,
        next_path: PathBuf,
    },

    /// The metadata store remembers a sequence number the log does not reach: the log lost
    /// records that consumers had already seen.
    #[error(
        "metadata is ahead of the write-ahead log: a checkpoint refers to sequence {required}, \
         but the log ends at {last_seq}"
    )]
    MetadataAhead { required: u64, last_seq: u64 },

    /// Another process (or another handle in this one) holds the directory's lock.
    #[error(
        "data directory {dir} is locked by another spool instance; only one writer may use a \
         data directory (law 3)"
    )]
    Locked { dir: PathBuf },

    /// A newer instance bumped the epoch: this one must stop writing.
    #[error("fenced: this writer holds epoch {ours}, but the data directory is at epoch {found}")]
    Fenced { ours: u64, found: u64 },

    /// The total size quota of the log would be exceeded; retention must free space first.
    #[error("write-ahead log quota of {quota_bytes} bytes reached")]
    QuotaExceeded { quota_bytes: u64 },

    /// The file system has less free space than the log keeps in reserve (see
    /// `WalOptions::disk_free_min_bytes`): back-pressure until consumers free space.
    #[error(
        "file system almost full: {available_bytes} bytes free, the write-ahead log keeps \
         {reserve_bytes} in reserve"
    )]
    DiskFull {
        available_bytes: u64,
        reserve_bytes: u64,
    },

    /// The writer's queue is full (only from `try_append`; `append` waits instead).
    #[error("write-ahead log queue is full")]
    QueueFull,

    /// The record is larger than the configured maximum.
    #[error("record of {size} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge { size: u64, max: u64 },

    /// The requested sequence number was removed by retention.
    #[error("sequence {requested} was removed by retention; the log starts at {first_available}")]
    SequenceRemoved {
        requested: u64,
        first_available: u64,
    },

    /// An earlier write or fsync failed. The writer never retries an fsync (a failed fsync may
    /// have dropped dirty pages), so every later append fails with the original cause until the
    /// process restarts and recovery re-reads what is really on disk.
    #[error("write-ahead log stopped after an earlier failure: {cause}")]
    Poisoned { cause: Box<Error> },

    /// The log was closed.
    #[error("write-ahead log is closed")]
    Closed,

    /// The options do not make sense together.
    #[error("invalid storage options: {0}")]
    InvalidOptions(String),

    /// A caller tried to move a queue's checkpoint backwards.
    #[error("checkpoint of queue {queue} cannot move backwards from {from} to {to}")]
    CheckpointBackwards { queue: String, from: u64, to: u64 },

    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Meta(String),
}

impl Error {
    /// Wraps an I/O error with what was being done and on which path.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    /// True when the error means "try again later" rather than "something is broken".
    #[must_use]
    pub fn is_back_pressure(&self) -> bool {
        matches!(
            self,
            Error::QuotaExceeded { .. } | Error::DiskFull { .. } | Error::QueueFull
        )
    }

    /// True for an I/O error that says the file system has no room (ENOSPC, or a disk quota):
    /// the writer waits for room instead of stopping, since nothing was made durable by it.
    #[must_use]
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            Error::Io { source, .. }
                if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
        )
    }
}

/// The storage core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
