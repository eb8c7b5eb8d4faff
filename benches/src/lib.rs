//! spool-bench: what the benchmarks in `benches/` share. The MQTT load generator (`spool-load`)
//! joins it with the MQTT server.
//!
//! The raw baselines are the physical limit the WAL is measured against: the same bytes, written
//! in the same batch sizes to a plain file, with one `fdatasync` per batch and nothing else. Two
//! files: one appended to (each fdatasync also commits the file's new size), and one zero-filled
//! and synced up front, so every fdatasync flushes data only: the best this disk can do, and
//! what the WAL's preallocation aims for.

#![allow(clippy::unwrap_used)] // benchmark code: a failure should stop the run loudly

use bytes::Bytes;
use spool_storage::{Wal, WalOptions};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes of framing the WAL adds to each record; the raw baseline writes the same amount.
pub const FRAME_OVERHEAD_BYTES: usize = 17;

/// The raw file is restarted past this size, as the WAL rolls its segments.
const RAW_FILE_BYTES_MAX: u64 = 64 << 20;

/// Where benchmarks put their files: `SPOOL_BENCH_DIR`, else `default_base` (the bench's
/// `CARGO_TARGET_TMPDIR`, on the same disk as the build). Never tmpfs: fsync would be free there.
#[must_use]
pub fn bench_dir(default_base: &str) -> tempfile::TempDir {
    let base = std::env::var("SPOOL_BENCH_DIR").unwrap_or_else(|_| default_base.to_string());
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Opens a fresh WAL for a benchmark, with default options but for
/// `SPOOL_BENCH_PREALLOCATE_BYTES` (to compare preallocation on and off).
#[must_use]
pub fn open_wal(dir: &Path) -> Wal {
    let mut options = WalOptions::default();
    if let Ok(bytes) = std::env::var("SPOOL_BENCH_PREALLOCATE_BYTES") {
        options.preallocate_bytes = bytes.parse().unwrap();
    }
    Wal::open(&dir.join("wal"), options).unwrap().0
}

/// Appends `count` records, keeping `window` of them outstanding; returns the elapsed time.
pub async fn append_with_window(wal: &Wal, count: u64, window: usize, payload: &Bytes) -> Duration {
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(window);
    for _ in 0..count {
        if in_flight.len() == window {
            let oldest: spool_storage::PendingAppend = in_flight.pop_front().unwrap();
            oldest.await.unwrap();
        }
        in_flight.push_back(wal.submit(1, payload.clone()).await.unwrap());
    }
    for pending in in_flight {
        pending.await.unwrap();
    }
    started.elapsed()
}

/// A plain file written in batches, one fdatasync per batch: the physical limit.
pub struct RawFile {
    file: File,
    offset: u64,
    buffer: Vec<u8>,
    preallocated: bool,
}

impl RawFile {
    /// A file that every batch appends to.
    #[must_use]
    pub fn create(path: &Path) -> RawFile {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        RawFile {
            file,
            offset: 0,
            buffer: Vec::new(),
            preallocated: false,
        }
    }

    /// A file zero-filled and fdatasynced up front, that batches overwrite (wrapping around).
    #[must_use]
    pub fn create_preallocated(path: &Path) -> RawFile {
        let mut raw = RawFile::create(path);
        let zeros = vec![0u8; 1 << 20];
        for at in (0..RAW_FILE_BYTES_MAX + (8 << 20)).step_by(zeros.len()) {
            raw.file.write_all_at(&zeros, at).unwrap();
        }
        raw.file.sync_all().unwrap();
        raw.preallocated = true;
        raw
    }

    /// Writes `count` records of `record_bytes` (framing included) in batches of `batch`, with
    /// one fdatasync per batch; returns the elapsed time.
    pub fn write_batches(&mut self, count: u64, batch: usize, record_bytes: usize) -> Duration {
        let started = Instant::now();
        let mut left = count;
        while left > 0 {
            let records = left.min(batch as u64);
            self.write_one_batch(records as usize * record_bytes);
            left -= records;
        }
        started.elapsed()
    }

    /// Writes one batch of `bytes` and fdatasyncs it.
    pub fn write_one_batch(&mut self, bytes: usize) {
        if self.offset > RAW_FILE_BYTES_MAX {
            if !self.preallocated {
                self.file.set_len(0).unwrap();
            }
            self.offset = 0;
        }
        self.buffer.clear();
        self.buffer.resize(bytes, 0xa5);
        self.file.write_all_at(&self.buffer, self.offset).unwrap();
        self.file.sync_data().unwrap();
        self.offset += bytes as u64;
    }
}

/// The value at quantile `q` (0..=1) of sorted samples.
#[must_use]
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    assert!(!sorted.is_empty());
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
