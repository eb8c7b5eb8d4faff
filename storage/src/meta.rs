//! [`Meta`]: the metadata store, on redb, for small state that changes often and must survive a
//! restart: queue checkpoints, sessions, retained messages, QoS 2 receipts and identities;
//! twins later.
//!
//! Checkpoints are committed cheaply (`Commit::Deferred`, not fsynced) as consumers acknowledge,
//! and made durable in batches (`Commit::Durable`, or `Meta::make_durable`). A crash loses at
//! most the deferred ones, and a lost checkpoint only means a queue resumes a little earlier and
//! redelivers: duplicates, never loss (law 2). (The log's space is reclaimed from what queues
//! hold in memory, not from checkpoints: see `Wal::reclaim`.)

use crate::fs::{FileHandle, FileSystem, OpenMode, RealFs};
use crate::{Error, Result};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::any::Any;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// queue name -> the highest sequence number up to which the queue's consumer acknowledged
/// everything.
const CHECKPOINTS: TableDefinition<&str, u64> = TableDefinition::new("checkpoints");

/// client id -> the broker's encoding of a persistent session (opaque to storage).
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// topic -> the broker's encoding of the message retained on it (opaque to storage).
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// session -> the broker's encoding of the QoS 2 packet ids its client sent that are logged and
/// await PUBREL (opaque to storage).
const QOS2_RECEIPTS: TableDefinition<&str, &[u8]> = TableDefinition::new("qos2_receipts");

/// identity (`device` or `device/module`) -> the broker's encoding of it: credentials, status
/// (opaque to storage).
const IDENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("identities");

/// endpoint (a module input or `$upstream`, at a priority) -> its queue's number (opaque to
/// storage).
const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
const TWINS: TableDefinition<&str, &[u8]> = TableDefinition::new("twins");

/// The tables of keyed state, opaque to storage, that the broker commits together with the
/// checkpoint saying how far in the log they are complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateTable {
    /// topic -> the message retained on it.
    Retained,
    /// session -> the QoS 2 packet ids its client sent that are logged and await PUBREL.
    Qos2Receipts,
    /// device or module -> its credentials and status.
    Identities,
    /// endpoint -> its queue's number.
    Endpoints,
    /// device or module -> its twin's desired and reported properties.
    Twins,
}

impl StateTable {
    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            StateTable::Retained => RETAINED,
            StateTable::Qos2Receipts => QOS2_RECEIPTS,
            StateTable::Identities => IDENTITIES,
            StateTable::Endpoints => ENDPOINTS,
            StateTable::Twins => TWINS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            StateTable::Retained => "retained messages",
            StateTable::Qos2Receipts => "QoS 2 receipts",
            StateTable::Identities => "identities",
            StateTable::Endpoints => "endpoints",
            StateTable::Twins => "twins",
        }
    }
}

/// How a metadata write is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Visible at once, durable with the next durable commit; a crash may lose it.
    Deferred,
    /// Fsynced before the call returns, with every deferred commit before it.
    Durable,
}

/// One change of [`Meta::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaChange {
    /// Stores (`Some`) or removes (`None`) a session.
    Session {
        client_id: String,
        state: Option<Vec<u8>>,
    },
    /// Advances a queue's checkpoint (never backwards: `CheckpointBackwards`).
    Checkpoint { queue: String, seq: u64 },
    /// Removes a queue's checkpoint (its queue is gone).
    RemoveCheckpoint(String),
    /// Stores or removes an entry of keyed state.
    State {
        table: StateTable,
        key: String,
        value: Option<Vec<u8>>,
    },
}

/// The metadata store.
#[derive(Debug)]
pub struct Meta {
    db: Database,
}

/// redb's storage, through the file-system seam.
struct FsBackend {
    file: Box<dyn FileHandle>,
    /// Held for as long as redb keeps the backend.
    _lock: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for FsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsBackend")
            .field("file", &self.file)
            .finish()
    }
}

impl redb::StorageBackend for FsBackend {
    fn len(&self) -> io::Result<u64> {
        self.file.size()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        while filled < out.len() {
            match self
                .file
                .read_at(&mut out[filled..], offset + filled as u64)?
            {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                read => filled += read,
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
}

fn meta_error(context: &str, error: impl std::fmt::Display) -> Error {
    Error::Meta(format!("failed to {context}: {error}"))
}

impl Meta {
    /// Opens (creating if needed) the store at `path` on the real file system.
    ///
    /// # Errors
    /// As [`Meta::open_with_fs`].
    pub fn open(path: &Path) -> Result<Meta> {
        Meta::open_with_fs(Arc::new(RealFs), path)
    }

    /// Opens (creating if needed) the store at `path` on `fs`, the same seam the log uses, so
    /// tests can cut the power under the metadata store too. It takes an exclusive lock on the
    /// file, so a second open fails.
    ///
    /// # Errors
    /// `Error::Locked` if another holds the store, `Error::Meta` when the file cannot be
    /// opened or is damaged.
    pub fn open_with_fs(fs: Arc<dyn FileSystem>, path: &Path) -> Result<Meta> {
        let failed = |e: &dyn std::fmt::Display| {
            meta_error(&format!("open metadata store {}", path.display()), e)
        };
        let lock = match fs.lock_exclusive(path) {
            Ok(lock) => lock,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(Error::Locked {
                    dir: path.to_path_buf(),
                });
            }
            Err(e) => return Err(failed(&e)),
        };
        let file = match fs.open(path, OpenMode::ReadWrite) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs.open(path, OpenMode::CreateNew),
            opened => opened,
        }
        .map_err(|e| failed(&e))?;
        // The file's name must survive a power loss before anything is committed in it.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        fs.sync_dir(dir).map_err(|e| failed(&e))?;
        let backend = FsBackend { file, _lock: lock };
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| failed(&e))?;
        Ok(Meta { db })
    }

    /// Every queue's checkpoint, including deferred ones.
    ///
    /// # Errors
    /// `Error::Meta`.
    pub fn checkpoints(&self) -> Result<BTreeMap<String, u64>> {
        self.read_table(CHECKPOINTS, "checkpoints", |seq| seq)
    }

    /// Every entry of a table keyed by name, converted by `value`; empty if the table was never
    /// written.
    fn read_table<V: redb::Value + 'static, T>(
        &self,
        definition: TableDefinition<&'static str, V>,
        what: &str,
        value: impl Fn(V::SelfType<'_>) -> T,
    ) -> Result<BTreeMap<String, T>> {
        let read = self
            .db
            .begin_read()
            .map_err(|e| meta_error(&format!("read {what}"), e))?;
        let table = match read.open_table(definition) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(meta_error(&format!("open {what}"), e)),
        };
        let mut entries = BTreeMap::new();
        let rows = table
            .iter()
            .map_err(|e| meta_error(&format!("read {what}"), e))?;
        for row in rows {
            let (key, stored) = row.map_err(|e| meta_error(&format!("read {what}"), e))?;
            entries.insert(key.value().to_string(), value(stored.value()));
        }
        Ok(entries)
    }

    /// One queue's checkpoint, if it has one.
    ///
    /// # Errors
    /// `Error::Meta`.
    pub fn checkpoint(&self, queue: &str) -> Result<Option<u64>> {
        Ok(self.checkpoints()?.get(queue).copied())
    }

    /// The highest checkpoint of any queue (0 if none): the log must reach at least this far,
    /// which is what `WalOptions::required_last_seq` checks at recovery.
    ///
    /// # Errors
    /// `Error::Meta`.
    pub fn highest_checkpoint(&self) -> Result<u64> {
        Ok(self.checkpoints()?.into_values().max().unwrap_or(0))
    }

    /// Advances checkpoints. A checkpoint never moves backwards: that would redeliver messages
    /// already acknowledged, so it is refused as a caller bug.
    ///
    /// # Errors
    /// `Error::Meta`, or `CheckpointBackwards` (and then nothing is written).
    pub fn set_checkpoints(&self, updates: &[(&str, u64)], commit: Commit) -> Result<()> {
        self.write_checkpoints(commit, |table| advance_checkpoints(table, updates))
    }

    /// Applies changes to keyed state (`Some`: store, `None`: remove) and advances checkpoints
    /// in one transaction: a checkpoint that says "every change up to here is stored" commits
    /// atomically with those changes.
    ///
    /// # Errors
    /// `Error::Meta`, or `CheckpointBackwards` (and then nothing is written).
    pub fn set_checkpoints_and_state(
        &self,
        updates: &[(&str, u64)],
        changes: &[(StateTable, &str, Option<&[u8]>)],
        commit: Commit,
    ) -> Result<()> {
        let state = changes
            .iter()
            .map(|&(table, key, value)| MetaChange::State {
                table,
                key: key.to_owned(),
                value: value.map(<[u8]>::to_vec),
            });
        let checkpoints = updates.iter().map(|&(queue, seq)| MetaChange::Checkpoint {
            queue: queue.to_owned(),
            seq,
        });
        self.apply(&state.chain(checkpoints).collect::<Vec<_>>(), commit)
    }

    /// Every entry of a keyed state table.
    ///
    /// # Errors
    /// `Error::Meta`.
    pub fn state(&self, table: StateTable) -> Result<BTreeMap<String, Vec<u8>>> {
        self.read_table(table.definition(), table.name(), <[u8]>::to_vec)
    }

    /// Removes a queue's checkpoint (the queue was deleted).
    ///
    /// # Errors
    /// `Error::Meta`.
    pub fn remove_checkpoint(&self, queue: &str, commit: Commit) -> Result<()> {
        self.apply(&[MetaChange::RemoveCheckpoint(queue.to_owned())], commit)
    }

    /// Runs `change` on the checkpoint table in one write transaction, committed as `commit`
    /// says; an error from `change` aborts the transaction.
    fn write_checkpoints(
        &self,
        commit: Commit,
        change: impl FnOnce(&mut redb::Table<'_, &'static str, u64>) -> Result<()>,
    ) -> Result<()> {
        self.write(commit, "commit checkpoints", |write| {
            let mut table = write
                .open_table(CHECKPOINTS)
                .map_err(|e| meta_error("open checkpoints", e))?;
            change(&mut table)
        })
    }

    /// Runs `change` in one write transaction, committed as `commit` says; an error from
    /// `change` aborts the transaction.
    fn write(
        &self,
        commit: Commit,
        what: &str,
        change: impl FnOnce(&redb::WriteTransaction) -> Result<()>,
    ) -> Result<()> {
        let mut write = self
            .db
            .begin_write()
            .map_err(|e| meta_error(&format!("begin to {what}"), e))?;
        let durability = match commit {
            Commit::Deferred => Durability::None,
            Commit::Durable => Durability::Immediate,
        };
        write
            .set_durability(durability)
            .map_err(|e| meta_error("set durability", e))?;
        change(&write)?;
        write.commit().map_err(|e| meta_error(what, e))
    }

    /// Every stored session, by client id.
    ///
    /// # Errors
    /// `Error::Meta`.
    pub fn sessions(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        self.read_table(SESSIONS, "sessions", <[u8]>::to_vec)
    }

    /// Applies `changes`, in order, in one transaction committed as `commit` says: many
    /// changes, one fsync.
    ///
    /// # Errors
    /// `Error::Meta`; then none of the changes is made.
    pub fn apply(&self, changes: &[MetaChange], commit: Commit) -> Result<()> {
        self.write(commit, "commit metadata", |write| {
            for change in changes {
                apply_change(write, change)?;
            }
            Ok(())
        })
    }

    /// Makes every deferred commit durable (one fsync).
    ///
    /// # Errors
    /// `Error::Meta`.
    pub fn make_durable(&self) -> Result<()> {
        self.set_checkpoints(&[], Commit::Durable)
    }
}

fn apply_change(write: &redb::WriteTransaction, change: &MetaChange) -> Result<()> {
    let (definition, name, key, value) = match change {
        MetaChange::Session { client_id, state } => {
            (SESSIONS, "sessions", client_id, state.as_deref())
        }
        MetaChange::State { table, key, value } => {
            (table.definition(), table.name(), key, value.as_deref())
        }
        MetaChange::Checkpoint { queue, seq } => {
            let mut table = write
                .open_table(CHECKPOINTS)
                .map_err(|e| meta_error("open checkpoints", e))?;
            return advance_checkpoints(&mut table, &[(queue.as_str(), *seq)]);
        }
        MetaChange::RemoveCheckpoint(queue) => {
            let mut table = write
                .open_table(CHECKPOINTS)
                .map_err(|e| meta_error("open checkpoints", e))?;
            table
                .remove(queue.as_str())
                .map_err(|e| meta_error("remove checkpoint", e))?;
            return Ok(());
        }
    };
    let mut table = write
        .open_table(definition)
        .map_err(|e| meta_error(&format!("open {name}"), e))?;
    match value {
        Some(value) => table.insert(key.as_str(), value).map(|_| ()),
        None => table.remove(key.as_str()).map(|_| ()),
    }
    .map_err(|e| meta_error(&format!("write {name}"), e))
}

/// Advances checkpoints in `table`. A checkpoint never moves backwards: that would redeliver
/// messages already acknowledged, so it is refused as a caller bug.
fn advance_checkpoints(
    table: &mut redb::Table<'_, &'static str, u64>,
    updates: &[(&str, u64)],
) -> Result<()> {
    for &(queue, seq) in updates {
        let current = table
            .get(queue)
            .map_err(|e| meta_error("read checkpoint", e))?
            .map(|v| v.value());
        if let Some(current) = current
            && seq < current
        {
            return Err(Error::CheckpointBackwards {
                queue: queue.to_string(),
                from: current,
                to: seq,
            });
        }
        table
            .insert(queue, seq)
            .map_err(|e| meta_error("write checkpoint", e))?;
    }
    Ok(())
}
