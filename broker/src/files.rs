//! Files spool writes whole for people and other programs (certificates, exported identities):
//! durably, and never half-written or readable by others when they hold secrets.

use anyhow::Context;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` durably: a new temporary file beside it (readable by its owner
/// only if `private`), fsynced, renamed over `path`, and the directory fsynced. A file already
/// at `path` is replaced whole, so its permissions never apply to the new contents, and a
/// failed write leaves it as it was.
///
/// # Errors
/// What could not be created, written, renamed or synced.
pub fn write_durably(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let mut temporary = PathBuf::from(path);
    temporary.as_mut_os_string().push(".tmp");
    // One left by a failed run goes first: it may have other permissions.
    let _ = std::fs::remove_file(&temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options
        .open(&temporary)
        .with_context(|| format!("create {}", temporary.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("rename {} to {}", temporary.display(), path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))
}
