//! `Wal::reclaim`: frees the log's space by liveness, so that the space a queue holds is its own
//! backlog, not everything written since its oldest entry.
//!
//! The caller (the hub) says what it still needs: every record from `needed_from` on (replays
//! that read every record: retained messages, QoS 2 receipts, and whatever it has not read yet),
//! and below that, the sequence numbers its queues still hold. The oldest segments go, front to
//! back: one that holds no live record is removed; one that holds a few has them moved first
//! (see `moved.rs`), durably, before it is removed. A segment is moved when its live records
//! take at most an eighth of it, or at most half of it while the log is above half its quota;
//! the first segment that is denser stops the run, since segments only ever go from the front.
//! Moved files that have lost at least half their bytes to records no longer needed are
//! rewritten without them, or removed once none is left.
//!
//! Cost: a record is copied when its segment is reclaimed while it is still live, and again
//! only when its moved file is rewritten, which happens after at least half of that file died;
//! so a record is written at most about three times in all, and a log where consumers keep up
//! copies nothing. The log's size is then at most about twice what its queues hold, plus the
//! segments not yet sealed; one old message costs its own bytes, not a segment.

use super::Wal;
use crate::fence;
use crate::layout::FRAME_HEADER_BYTES;
use crate::moved::{MovedFile, write_moved_file};
use crate::reader::Record;
use crate::segment::Segment;
use crate::{Error, Result};
use std::io;
use std::sync::PoisonError;

/// The most bytes of live records one reclaim moves; the rest waits for the next run.
pub const RECLAIM_MOVE_BYTES_MAX: u64 = 64 << 20;

/// A segment whose live records take at most 1/this of it is always worth moving.
const SPARSE_SEGMENT_RATIO: u64 = 8;

/// What the caller still needs of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Every record from this sequence number on is needed.
    pub needed_from: u64,
    /// Below `needed_from`, the sequence numbers still needed, ascending.
    pub live: Vec<u64>,
}

impl Liveness {
    /// The live sequence numbers from `first` through `last`.
    fn live_within(&self, first: u64, last: u64) -> &[u64] {
        let from = self.live.partition_point(|&seq| seq < first);
        let to = self.live.partition_point(|&seq| seq <= last);
        &self.live[from..to]
    }
}

/// What `Wal::reclaim` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    pub segments_removed: u64,
    /// Live records moved out of the removed segments.
    pub records_moved: u64,
    /// Moved files rewritten without their dead records, or removed.
    pub moved_files_compacted: u64,
    /// Bytes freed, less the bytes the moves wrote.
    pub bytes_freed: u64,
}

impl Wal {
    /// Removes the segments no one needs and moves the few live records out of the oldest
    /// ones, as the module documentation says. The active segment is never touched. Moved
    /// records are durable before the segments they came from are removed, and segments go
    /// oldest first, each removal durable before the next, so a crash leaves no hole.
    ///
    /// # Errors
    /// `Fenced` if a newer writer owns the directory (its log must not be touched), `Corrupt`
    /// if a record to move does not check out, `Io`; what was not done yet stays.
    pub fn reclaim(&self, liveness: &Liveness) -> Result<ReclaimReport> {
        assert!(liveness.live.windows(2).all(|w| w[0] < w[1]));
        let _running = self
            .owner
            .retention
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shared = self.shared();
        fence::check_epoch(shared.fs.as_ref(), &shared.dir, shared.epoch)?;
        let needed_from = liveness.needed_from.min(self.durable_seq() + 1);
        let live = Liveness {
            needed_from,
            live: liveness
                .live_within(0, needed_from.saturating_sub(1))
                .to_vec(),
        };
        let (freeing, moving) = self.plan_reclaim(&live)?;
        let mut report = ReclaimReport::default();
        let mut written = 0;
        if let Some(first) = moving.first() {
            let moved = write_moved_file(
                shared.fs.as_ref(),
                &shared.dir,
                shared.epoch,
                first.seq,
                &moving,
            )?;
            written = moved.bytes;
            report.records_moved = moving.len() as u64;
            self.add_usage(moved.bytes);
            shared
                .moved
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(moved);
        }
        let mut freed = 0;
        for segment in freeing {
            self.remove_file(&segment.path, "remove segment")?;
            shared
                .segments
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(segment.first_seq);
            self.release_usage(segment.bytes);
            freed += segment.bytes;
            report.segments_removed += 1;
        }
        let (compacted, compacted_freed) = self.compact_moved_files(&live)?;
        report.moved_files_compacted = compacted;
        report.bytes_freed = (freed + compacted_freed).saturating_sub(written);
        Ok(report)
    }

    /// Removes every segment all of whose records are below `lowest_needed_seq`, moving none:
    /// [`Wal::reclaim`] for a caller that needs everything from there on.
    ///
    /// # Errors
    /// As [`Wal::reclaim`].
    pub fn remove_segments_below(&self, lowest_needed_seq: u64) -> Result<ReclaimReport> {
        self.reclaim(&Liveness {
            needed_from: lowest_needed_seq,
            live: Vec::new(),
        })
    }

    /// The segments to remove, oldest first, and the live records to move out of them.
    fn plan_reclaim(&self, live: &Liveness) -> Result<(Vec<Segment>, Vec<Record>)> {
        let shared = self.shared();
        let candidates = shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .wholly_below(live.needed_from);
        let pressed = shared
            .options
            .quota_bytes
            .is_some_and(|quota| 2 * self.usage_bytes() > quota);
        let (mut freeing, mut moving, mut moving_bytes) = (Vec::new(), Vec::new(), 0);
        for segment in candidates {
            let mut records = Vec::new();
            let mut bytes = 0;
            for &seq in live.live_within(segment.first_seq, segment.last_seq) {
                let record = self.read(seq)?.ok_or_else(|| Error::Corrupt {
                    path: segment.path.clone(),
                    offset: 0,
                    detail: format!("live record {seq} cannot be found"),
                })?;
                bytes += FRAME_HEADER_BYTES + record.payload.len() as u64;
                records.push(record);
            }
            let sparse = bytes * SPARSE_SEGMENT_RATIO <= segment.bytes;
            let worth_it = sparse || (pressed && 2 * bytes <= segment.bytes);
            if !worth_it || moving_bytes + bytes > RECLAIM_MOVE_BYTES_MAX {
                break;
            }
            moving_bytes += bytes;
            moving.extend(records);
            freeing.push(segment);
        }
        Ok((freeing, moving))
    }

    /// Rewrites the moved files that lost at least half their bytes without their dead
    /// records, and removes those that lost them all. Returns how many, and the bytes freed.
    fn compact_moved_files(&self, live: &Liveness) -> Result<(u64, u64)> {
        let shared = self.shared();
        let files: Vec<MovedFile> = shared
            .moved
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .files()
            .cloned()
            .collect();
        let (mut compacted, mut freed) = (0, 0);
        for file in files {
            let needed =
                |seq: u64| seq >= live.needed_from || live.live.binary_search(&seq).is_ok();
            let kept: Vec<usize> = (0..file.records.len())
                .filter(|&i| needed(file.records[i].seq))
                .collect();
            let kept_bytes: u64 = kept.iter().map(|&i| file.records[i].frame_bytes).sum();
            if kept.len() == file.records.len() || 2 * kept_bytes > file.bytes {
                continue;
            }
            // Readers of moved records hold this lock while they read, so none reads a file
            // while it is replaced or removed under it.
            let mut moved = shared.moved.write().unwrap_or_else(PoisonError::into_inner);
            let mut rewritten_bytes = 0;
            if kept.is_empty() {
                self.remove_file(&file.path, "remove moved records")?;
                moved.remove(file.name_seq);
            } else {
                let fs = shared.fs.as_ref();
                let records = kept
                    .iter()
                    .map(|&i| file.read(fs, i))
                    .collect::<Result<Vec<_>>>()?;
                let rewritten =
                    write_moved_file(fs, &shared.dir, shared.epoch, file.name_seq, &records)?;
                rewritten_bytes = rewritten.bytes;
                moved.remove(file.name_seq);
                moved.insert(rewritten);
            }
            self.add_usage(rewritten_bytes);
            self.release_usage(file.bytes);
            freed += file.bytes - rewritten_bytes;
            compacted += 1;
        }
        Ok((compacted, freed))
    }

    /// Removes a file of the log and makes the removal durable.
    fn remove_file(&self, path: &std::path::Path, what: &'static str) -> Result<()> {
        let shared = self.shared();
        match shared.fs.remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(what, path, e)),
        }
        shared
            .fs
            .sync_dir(&shared.dir)
            .map_err(|e| Error::io("fsync directory", &shared.dir, e))
    }

    fn add_usage(&self, bytes: u64) {
        self.shared().lock_queue().usage_bytes += bytes;
    }

    /// Space was freed: appends waiting at the quota try again.
    fn release_usage(&self, bytes: u64) {
        let shared = self.shared();
        shared.lock_queue().usage_bytes -= bytes;
        shared.space_freed.send_modify(|freed| *freed += 1);
    }
}
