//! Helpers shared by the storage integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use spool_storage::{FaultyFs, FileSystem, Record, RecoveryReport, Wal, WalOptions};
use std::path::Path;
use std::sync::Arc;

/// Options with tiny segments, so a few records already roll segments.
pub fn small_segments() -> WalOptions {
    WalOptions {
        segment_size_bytes: 4096,
        record_payload_bytes_max: 1024,
        queue_bytes_max: 1 << 20,
        ..WalOptions::default()
    }
}

pub fn open_faulty(
    fs: &FaultyFs,
    options: WalOptions,
) -> spool_storage::Result<(Wal, RecoveryReport)> {
    let fs: Arc<dyn FileSystem> = Arc::new(fs.clone());
    Wal::open_with_fs(fs, Path::new("/data/wal"), options)
}

/// A payload that names its sequence number, with a length that varies with it.
pub fn payload_for(seq: u64, tag: u64) -> Bytes {
    let mut text = format!("record {seq} tag {tag} ");
    let pad = (seq.wrapping_mul(2_654_435_761) % 200) as usize;
    text.extend(std::iter::repeat_n('x', pad));
    Bytes::from(text)
}

/// Every durable record from the start of the log.
pub fn read_all(wal: &Wal) -> Vec<Record> {
    let mut reader = wal.reader(wal.first_seq()).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.try_next().unwrap() {
        records.push(record);
    }
    records
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
