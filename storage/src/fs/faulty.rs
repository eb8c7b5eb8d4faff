//! [`FaultyFs`]: an in-memory file system for crash and fault tests.
//!
//! Every file has two images: `live` (what reads see) and `durable` (what survives a power loss).
//! `sync_data` copies live to durable for one file; `sync_dir` does the same for a directory's
//! names. [`FaultyFs::crash`] throws away everything that was not made durable, optionally keeping
//! a random subset of the unsynced 512-byte sectors, which is what a real disk may do with the
//! last write before a power cut (a torn write, possibly with holes). Directories themselves are
//! created durable: the WAL creates its directory once, before anything else.
//!
//! Faults can also be injected: a failing fsync, or writes that fail once a byte budget is spent
//! (a full disk).

use super::{FileHandle, FileSystem, OpenMode};
use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Sector size of the simulated disk: the unit that survives or not in a torn write.
const SECTOR_BYTES: usize = 512;

/// What a crash keeps of the data that was written but not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Nothing unsynced survives.
    PowerLoss,
    /// Each unsynced sector independently survives or not, and the file's size lands anywhere
    /// between its durable and its written size; `seed` makes it reproducible.
    TornWrites { seed: u64 },
}

/// Counters of what the WAL asked of the file system.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Calls to `sync_data` that succeeded.
    pub file_syncs: u64,
    /// Calls to `sync_dir` that succeeded.
    pub dir_syncs: u64,
    /// Calls to `write_all_at`.
    pub writes: u64,
}

/// An in-memory file system with power-loss semantics and injectable faults.
#[derive(Debug, Clone, Default)]
pub struct FaultyFs {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Bumped by every crash; handles and locks from before it stop working.
    generation: u64,
    next_inode: u64,
    inodes: HashMap<u64, Inode>,
    dirs: HashMap<PathBuf, Dir>,
    locks: HashSet<PathBuf>,
    /// Successful syncs left before every further `sync_data` fails; `None` = never fail.
    syncs_before_failure: Option<u64>,
    /// Bytes that may still be written before writes fail with "no space"; `None` = unlimited.
    write_bytes_budget: Option<u64>,
    /// The size of the simulated disk: files named in a directory may take this many bytes in
    /// all; a write or extension beyond fails with "no space". `None` = unlimited.
    capacity_bytes: Option<u64>,
    /// How long each `sync_data` takes, as on a real disk.
    sync_latency: Duration,
    stats: FsStats,
}

#[derive(Debug, Default)]
struct Dir {
    live: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
}

impl FaultyFs {
    /// An empty file system.
    #[must_use]
    pub fn new() -> FaultyFs {
        FaultyFs::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Simulates a power loss: the process's handles and locks die, and every file and directory
    /// goes back to what was made durable (plus, with `TornWrites`, some unsynced sectors).
    pub fn crash(&self, mode: CrashMode) {
        let mut state = self.state();
        state.generation += 1;
        state.locks.clear();
        let mut reachable = HashSet::new();
        for dir in state.dirs.values_mut() {
            dir.live = dir.durable.clone();
            reachable.extend(dir.live.values().copied());
        }
        state.inodes.retain(|id, _| reachable.contains(id));
        let mut rng = match mode {
            CrashMode::PowerLoss => None,
            CrashMode::TornWrites { seed } => Some(SplitMix64(seed)),
        };
        let mut ids: Vec<u64> = state.inodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let inode = state.inodes.get_mut(&id).expect("listed above");
            let survived = match rng.as_mut() {
                None => inode.durable.clone(),
                Some(rng) => torn_image(&inode.live, &inode.durable, rng),
            };
            inode.live.clone_from(&survived);
            inode.durable = survived;
        }
    }

    /// Makes every `sync_data` after the next `successes` ones fail with an I/O error.
    pub fn fail_syncs_after(&self, successes: u64) {
        self.state().syncs_before_failure = Some(successes);
    }

    /// Makes writes fail with "no space left" once `bytes` more bytes have been written.
    pub fn fail_writes_after_bytes(&self, bytes: u64) {
        self.state().write_bytes_budget = Some(bytes);
    }

    /// Makes the disk `bytes` large (`None`: unlimited): writes that would make the files
    /// larger in all fail with "no space left", after writing what fits, as on a real disk.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state().capacity_bytes = bytes;
    }

    /// Makes every `sync_data` take `latency` before it completes, as a disk would: without it
    /// a sync is instant, and an acknowledgement sent before its sync would still almost
    /// always come after it.
    pub fn set_sync_latency(&self, latency: Duration) {
        self.state().sync_latency = latency;
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        let mut state = self.state();
        state.syncs_before_failure = None;
        state.write_bytes_budget = None;
    }

    /// Bytes the files it names take now (for a test that fills the volume to a set point).
    #[must_use]
    pub fn used_bytes(&self) -> u64 {
        self.state().used_bytes()
    }

    /// What the file system was asked to do so far.
    #[must_use]
    pub fn stats(&self) -> FsStats {
        self.state().stats
    }

    /// Runs `edit` on the live and durable bytes of an existing file, to simulate media
    /// corruption or a lost write behind the WAL's back.
    ///
    /// # Panics
    /// If the file does not exist (a test bug).
    pub fn edit_file(&self, path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
        let mut state = self.state();
        let id = state.lookup(path).expect("edit_file: no such file");
        let inode = state
            .inodes
            .get_mut(&id)
            .expect("directory entries point at inodes");
        edit(&mut inode.live);
        inode.durable.clone_from(&inode.live);
    }
}

/// What survives of one file in a torn-write crash: any unsynced sector may or may not have
/// reached the disk, and the size may or may not have been updated (a file that grew keeps
/// any length in between; one truncated since its last sync keeps the old or the new one).
fn torn_image(live: &[u8], durable: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let len = match live.len().cmp(&durable.len()) {
        std::cmp::Ordering::Greater => durable.len() + rng.below(live.len() - durable.len() + 1),
        std::cmp::Ordering::Less if rng.below(2) == 1 => live.len(),
        std::cmp::Ordering::Less | std::cmp::Ordering::Equal => durable.len(),
    };
    let mut image = vec![0u8; len];
    let keep = durable.len().min(len);
    image[..keep].copy_from_slice(&durable[..keep]);
    for start in (0..len).step_by(SECTOR_BYTES) {
        let end = (start + SECTOR_BYTES).min(len);
        let live_end = end.min(live.len());
        if start >= live_end {
            continue; // cut from the live file: the old bytes stay
        }
        let differs = live_end < end || live[start..live_end] != image[start..live_end];
        if differs && rng.below(2) == 1 {
            image[start..live_end].copy_from_slice(&live[start..live_end]);
        }
    }
    image
}

/// A tiny deterministic generator, so crash images are reproducible from a seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        assert!(bound > 0);
        usize::try_from(self.next() % bound as u64).expect("below a usize bound")
    }
}

impl State {
    /// Bytes of every file a directory names (removed files are freed at once).
    fn used_bytes(&self) -> u64 {
        let named: HashSet<u64> = self
            .dirs
            .values()
            .flat_map(|d| d.live.values().copied())
            .collect();
        named
            .iter()
            .map(|id| self.inodes[id].live.len() as u64)
            .sum()
    }

    /// Bytes a file may still grow by.
    fn room_bytes(&self) -> u64 {
        self.capacity_bytes.map_or(u64::MAX, |capacity| {
            capacity.saturating_sub(self.used_bytes())
        })
    }

    fn lookup(&self, path: &Path) -> Option<u64> {
        let (dir, name) = split(path).ok()?;
        self.dirs.get(dir)?.live.get(name).copied()
    }

    fn dir_mut(&mut self, dir: &Path) -> io::Result<&mut Dir> {
        self.dirs
            .get_mut(dir)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such directory"))
    }
}

fn split(path: &Path) -> io::Result<(&Path, &str)> {
    let dir = path.parent().ok_or(io::ErrorKind::InvalidInput)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or(io::ErrorKind::InvalidInput)?;
    Ok((dir, name))
}

fn stale() -> io::Error {
    io::Error::other("file handle from before a simulated crash")
}

impl FileSystem for FaultyFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        for ancestor in dir.ancestors() {
            state.dirs.entry(ancestor.to_path_buf()).or_default();
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state();
        let dir = state
            .dirs
            .get(dir)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such directory"))?;
        Ok(dir.live.keys().cloned().collect())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileHandle>> {
        let mut state = self.state();
        let (dir, name) = split(path)?;
        let existing = state.dir_mut(dir)?.live.get(name).copied();
        let inode = match (mode, existing) {
            (OpenMode::CreateNew, Some(_)) => return Err(io::ErrorKind::AlreadyExists.into()),
            (OpenMode::CreateNew, None) => {
                state.next_inode += 1;
                let id = state.next_inode;
                state.inodes.insert(id, Inode::default());
                state.dir_mut(dir)?.live.insert(name.to_string(), id);
                id
            }
            (_, Some(id)) => id,
            (_, None) => return Err(io::ErrorKind::NotFound.into()),
        };
        Ok(Box::new(FaultyFile {
            fs: self.clone(),
            inode,
            generation: state.generation,
            writable: mode != OpenMode::Read,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        let (dir, name) = split(path)?;
        match state.dir_mut(dir)?.live.remove(name) {
            Some(_) => Ok(()),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state();
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        let id = state
            .dir_mut(from_dir)?
            .live
            .remove(from_name)
            .ok_or(io::ErrorKind::NotFound)?;
        state.dir_mut(to_dir)?.live.insert(to_name.to_string(), id);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        let entry = state.dir_mut(dir)?;
        entry.durable = entry.live.clone();
        state.stats.dir_syncs += 1;
        Ok(())
    }

    fn available_bytes(&self, _dir: &Path) -> io::Result<u64> {
        Ok(self.state().room_bytes())
    }

    fn lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let mut state = self.state();
        if !state.locks.insert(path.to_path_buf()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Box::new(FaultyLock {
            fs: self.clone(),
            path: path.to_path_buf(),
            generation: state.generation,
        }))
    }
}

/// A held lock; dropping it releases the lock unless a crash already did.
#[derive(Debug)]
struct FaultyLock {
    fs: FaultyFs,
    path: PathBuf,
    generation: u64,
}

impl Drop for FaultyLock {
    fn drop(&mut self) {
        let mut state = self.fs.state();
        if state.generation == self.generation {
            state.locks.remove(&self.path);
        }
    }
}

#[derive(Debug)]
struct FaultyFile {
    fs: FaultyFs,
    inode: u64,
    generation: u64,
    writable: bool,
}

impl FaultyFile {
    fn with_inode<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.fs.state();
        if state.generation != self.generation || !state.inodes.contains_key(&self.inode) {
            return Err(stale());
        }
        f(&mut state, self.inode)
    }
}

impl FileHandle for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with_inode(|state, id| {
            let live = &state.inodes[&id].live;
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(live.len());
            let n = buf.len().min(live.len() - start);
            buf[..n].copy_from_slice(&live[start..start + n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.with_inode(|state, id| {
            state.stats.writes += 1;
            let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
            let mut allowed = buf.len();
            if let Some(budget) = state.write_bytes_budget {
                allowed = allowed.min(usize::try_from(budget).unwrap_or(usize::MAX));
                state.write_bytes_budget = Some(budget - allowed as u64);
            }
            let len = state.inodes[&id].live.len();
            let room = usize::try_from(state.room_bytes()).unwrap_or(usize::MAX);
            allowed = allowed.min(len.saturating_add(room).saturating_sub(start));
            let live = &mut state.inodes.get_mut(&id).expect("checked").live;
            if live.len() < start + allowed {
                live.resize(start + allowed, 0);
            }
            live[start..start + allowed].copy_from_slice(&buf[..allowed]);
            if allowed < buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on simulated device",
                ));
            }
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        let latency = self.fs.state().sync_latency;
        if !latency.is_zero() {
            // A crash while this sleeps makes the handle stale: the sync then fails, as a
            // sync cut by a power loss never completed.
            std::thread::sleep(latency);
        }
        self.with_inode(|state, id| {
            if let Some(left) = state.syncs_before_failure {
                if left == 0 {
                    return Err(io::Error::other("injected fsync failure"));
                }
                state.syncs_before_failure = Some(left - 1);
            }
            state.stats.file_syncs += 1;
            let inode = state.inodes.get_mut(&id).expect("checked");
            inode.durable.clone_from(&inode.live);
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with_inode(|state, id| {
            let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
            let growth = len.saturating_sub(state.inodes[&id].live.len()) as u64;
            if growth > state.room_bytes() {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on simulated device",
                ));
            }
            state
                .inodes
                .get_mut(&id)
                .expect("checked")
                .live
                .resize(len, 0);
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with_inode(|state, id| Ok(state.inodes[&id].live.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(fs: &FaultyFs, path: &Path, bytes: &[u8]) -> Box<dyn FileHandle> {
        let file = fs.open(path, OpenMode::CreateNew).unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    #[test]
    fn power_loss_keeps_only_synced_data_and_names() {
        // Goal: the model itself is right: unsynced bytes and unsynced names vanish on a crash.
        let fs = FaultyFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let synced = write_file(&fs, &dir.join("a"), b"hello");
        synced.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        synced.write_all_at(b" world", 5).unwrap();
        write_file(&fs, &dir.join("b"), b"never named durably")
            .sync_data()
            .unwrap();
        fs.crash(CrashMode::PowerLoss);
        assert_eq!(fs.list_dir(dir).unwrap(), vec!["a".to_string()]);
        let mut buf = [0u8; 32];
        let file = fs.open(&dir.join("a"), OpenMode::Read).unwrap();
        assert_eq!(file.read_at(&mut buf, 0).unwrap(), 5);
        assert!(synced.size().is_err(), "handles die with the crash");
    }

    #[test]
    fn torn_writes_keep_synced_prefix_intact() {
        // Goal: whatever a torn crash keeps, the synced prefix is untouched.
        for seed in 0..50 {
            let fs = FaultyFs::new();
            let dir = Path::new("/d");
            fs.create_dir_all(dir).unwrap();
            let file = write_file(&fs, &dir.join("a"), &[1u8; 1000]);
            file.sync_data().unwrap();
            fs.sync_dir(dir).unwrap();
            file.write_all_at(&[2u8; 3000], 1000).unwrap();
            fs.crash(CrashMode::TornWrites { seed });
            let image = super::super::read_file(&fs, &dir.join("a")).unwrap();
            assert!(image.len() >= 1000 && image.len() <= 4000);
            assert!(image[..1000].iter().all(|&b| b == 1));
            assert!(image[1000..].iter().all(|&b| b == 2 || b == 0));
        }
    }

    #[test]
    fn injected_faults_fail_syncs_and_writes() {
        let fs = FaultyFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let file = write_file(&fs, &dir.join("a"), b"x");
        fs.fail_syncs_after(1);
        file.sync_data().unwrap();
        assert!(file.sync_data().is_err());
        fs.fail_writes_after_bytes(3);
        let err = file.write_all_at(b"12345", 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        fs.clear_faults();
        file.sync_data().unwrap();
    }

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let fs = FaultyFs::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        let guard = fs.lock_exclusive(Path::new("/d/LOCK")).unwrap();
        let err = fs.lock_exclusive(Path::new("/d/LOCK")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(guard);
        fs.lock_exclusive(Path::new("/d/LOCK")).unwrap();
    }
}
