//! Law 3, one writer: an exclusive lock on the directory, and a fencing epoch.
//!
//! The flock stops a second writer on the same machine (or any file system that shares flocks).
//! The epoch covers what a lock cannot: a volume that is mounted by two nodes during a failover.
//! Every open bumps the epoch; a writer re-reads it on every segment roll and periodically, and
//! stops with `Error::Fenced` as soon as it sees a newer one.

use crate::fs::{self, FileSystem};
use crate::layout::{EPOCH_FILE_NAME, LOCK_FILE_NAME, decode_epoch, encode_epoch};
use crate::{Error, Result};
use std::any::Any;
use std::io;
use std::path::Path;

/// Whether opening a directory takes its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockPolicy {
    /// Take the exclusive lock; fail with `Error::Locked` if it is held.
    #[default]
    Exclusive,
    /// Skip the lock. Only for tests that need two writers on one directory on purpose, to show
    /// that the epoch fences the older one.
    SkipForFencingTests,
}

/// The held lock; the directory is ours until this is dropped.
pub struct DirLock {
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for DirLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirLock")
            .field("held", &self._guard.is_some())
            .finish()
    }
}

/// Takes the directory's lock (or not, per `policy`).
///
/// # Errors
/// `Error::Locked` if another writer holds it; `Error::Io` otherwise.
pub fn lock_dir(fs: &dyn FileSystem, dir: &Path, policy: LockPolicy) -> Result<DirLock> {
    if policy == LockPolicy::SkipForFencingTests {
        return Ok(DirLock { _guard: None });
    }
    let path = dir.join(LOCK_FILE_NAME);
    match fs.lock_exclusive(&path) {
        Ok(guard) => Ok(DirLock {
            _guard: Some(guard),
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Error::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(e) => Err(Error::io("lock", path, e)),
    }
}

/// Reads the directory's epoch; 0 if it has none yet.
///
/// # Errors
/// `Error::Corrupt` for a damaged epoch file, `Error::Io` otherwise.
pub fn read_epoch(fs: &dyn FileSystem, dir: &Path) -> Result<u64> {
    let path = dir.join(EPOCH_FILE_NAME);
    match fs::read_file(fs, &path) {
        Ok(bytes) => decode_epoch(&path, &bytes),
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Makes this opener the newest writer: the new epoch is above both the epoch file and every
/// epoch found in a segment header (`floor`), and is durable before this returns.
///
/// # Errors
/// As `read_epoch`, or `Error::Io` when the new epoch cannot be written.
pub fn bump_epoch(fs: &dyn FileSystem, dir: &Path, floor: u64) -> Result<u64> {
    let epoch = read_epoch(fs, dir)?.max(floor) + 1;
    fs::durable_replace(fs, dir, EPOCH_FILE_NAME, &encode_epoch(epoch))?;
    Ok(epoch)
}

/// Fails with `Error::Fenced` when someone bumped the epoch past `ours`.
///
/// # Errors
/// `Error::Fenced`, or the errors of `read_epoch`.
pub fn check_epoch(fs: &dyn FileSystem, dir: &Path, ours: u64) -> Result<()> {
    let found = read_epoch(fs, dir)?;
    assert!(
        found >= ours,
        "the epoch file went backwards: {found} < {ours}"
    );
    if found > ours {
        return Err(Error::Fenced { ours, found });
    }
    Ok(())
}
