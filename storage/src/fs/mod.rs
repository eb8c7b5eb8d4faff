//! The file-system seam: every file the WAL touches goes through [`FileSystem`], so the same WAL
//! code runs over the real disk ([`RealFs`]) and over [`FaultyFs`], an in-memory file system that
//! keeps a "written" and a "durable" image of every file and can crash to the durable one.
//!
//! The trait is deliberately small and synchronous: the WAL's writer is one thread, and readers
//! read page-cache-hot data in small chunks.

mod faulty;
mod real;

pub use faulty::{CrashMode, FaultyFs};
pub use real::RealFs;

use crate::layout::TEMP_SUFFIX;
use crate::{Error, Result};
use std::any::Any;
use std::fmt;
use std::io;
use std::path::Path;

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// A new file that must not exist yet, for reading and writing.
    CreateNew,
}

/// An open file. Writes are positional: the WAL tracks its own offsets.
pub trait FileHandle: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at the end of the file.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// The underlying I/O error; part of `buf` may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data (and its size) durable: `fdatasync`.
    ///
    /// # Errors
    /// The underlying I/O error. After a failed sync the file's durable content is unknown.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's current size.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn size(&self) -> io::Result<u64>;
}

/// The operations the WAL needs from a file system.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Creates a directory and its parents.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries of a directory, in no particular order.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file.
    ///
    /// # Errors
    /// `NotFound`, `AlreadyExists` (for `CreateNew`) or another I/O error.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileHandle>>;
    /// Removes a file (the removal is durable only after `sync_dir`).
    ///
    /// # Errors
    /// The underlying I/O error.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` (durable only after `sync_dir`).
    ///
    /// # Errors
    /// The underlying I/O error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, removals, renames) durable.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive, non-blocking lock on `path` (created if missing); the lock is held
    /// until the returned guard is dropped.
    ///
    /// # Errors
    /// `WouldBlock` when someone else holds it, or another I/O error.
    fn lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
    /// Bytes an unprivileged writer may still use on the file system that holds `dir`
    /// (statvfs: free blocks for users times the block size).
    ///
    /// # Errors
    /// The underlying I/O error.
    fn available_bytes(&self, dir: &Path) -> io::Result<u64>;
}

/// Reads a whole (small) file.
///
/// # Errors
/// `Error::Io` naming the path.
pub fn read_file(fs: &dyn FileSystem, path: &Path) -> Result<Vec<u8>> {
    let file = fs
        .open(path, OpenMode::Read)
        .map_err(|e| Error::io("open", path, e))?;
    let len = file.size().map_err(|e| Error::io("stat", path, e))?;
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    let mut filled = 0;
    while filled < bytes.len() {
        let n = file
            .read_at(&mut bytes[filled..], filled as u64)
            .map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    bytes.truncate(filled);
    Ok(bytes)
}

/// Replaces `path` with `content` so that a crash leaves either the old or the new content,
/// never a mix, and the new content is durable when this returns. This is the only way the
/// storage core replaces a file:
/// 1. write `<path>.tmp` and `fdatasync` it, so the data is on disk before its name is;
/// 2. rename it over `path`;
/// 3. `fsync` the directory, so the rename itself survives a power loss.
///
/// # Errors
/// `Error::Io` naming the step and path that failed.
pub fn durable_replace(fs: &dyn FileSystem, dir: &Path, name: &str, content: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let temp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    match fs.remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale", &temp, e)),
    }
    let file = fs
        .open(&temp, OpenMode::CreateNew)
        .map_err(|e| Error::io("create", &temp, e))?;
    file.write_all_at(content, 0)
        .map_err(|e| Error::io("write", &temp, e))?;
    file.sync_data().map_err(|e| Error::io("fsync", &temp, e))?;
    drop(file);
    fs.rename(&temp, &path)
        .map_err(|e| Error::io("rename", &temp, e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))
}
