//! spool-storage: the storage core of spool.
//!
//! It owns law 1 ("no acknowledgement before durability"), law 3 ("one writer") and law 6
//! ("recovery is exact") of DESIGN.md, and knows nothing of MQTT: it stores opaque records, each
//! with a caller-chosen kind byte, under consecutive sequence numbers.
//!
//! # Layout
//! - [`wal`]: the [`Wal`] handle: append (group-committed, resolved once durable), read, retain.
//! - `writer`: the one writer that batches, writes and fdatasyncs, on its own thread (or the
//!   caller's, `WriterMode::Caller`, for deterministic simulations).
//! - [`reader`]: [`WalReader`], which iterates durable records and waits for new ones.
//! - `recovery`: rebuilding and repairing the log on open, by the decision table it documents.
//! - [`layout`]: file names, the segment header and the record frame, in one place.
//! - `segment`: the in-memory segment list and sparse index.
//! - `moved`: records moved out of old segments by `Wal::reclaim`, so no queue pins the log.
//! - [`fence`]: the directory lock and the fencing epoch.
//! - [`fs`]: the file-system seam, with the real file system and the fault-injecting [`FaultyFs`].
//! - [`meta`]: [`Meta`], the redb metadata store (queue checkpoints).
//! - [`options`], [`limits`], [`error`].

pub mod error;
pub mod fence;
pub mod fs;
pub mod layout;
pub mod limits;
pub mod meta;
mod moved;
pub mod options;
pub mod reader;
mod recovery;
mod segment;
pub mod wal;
mod writer;

pub use error::{Error, Result};
pub use fence::LockPolicy;
pub use fs::{CrashMode, FaultyFs, FileSystem, RealFs};
pub use meta::{Commit, Meta, MetaChange, StateTable};
pub use options::{SyncPolicy, WalOptions, WriterMode};
pub use reader::{Record, WalReader};
pub use recovery::RecoveryReport;
pub use wal::{Liveness, PendingAppend, ReclaimReport, Reservation, Wal};
