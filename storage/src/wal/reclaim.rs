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
use crate::segment::{Segment, SegmentSet};
use crate::{Error, Result};
use std::io;
use std::sync::{PoisonError, RwLock, RwLockWriteGuard};

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

fn write_listed(segments: &RwLock<SegmentSet>) -> RwLockWriteGuard<'_, SegmentSet> {
    segments.write().unwrap_or_else(PoisonError::into_inner)
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

/// What one reclaim will do, decided before anything is changed.
#[derive(Default)]
struct Plan {
    /// The oldest segments, holding nothing live: removed first, needing no room.
    dead: Vec<Segment>,
    /// The live records to move out of `emptied`, ascending.
    moving: Vec<Record>,
    /// The segments after `dead` that go once `moving` is durable.
    emptied: Vec<Segment>,
}

/// The segment last found too dense to move, with what was live in it then: while that does
/// not change, it is not read again (the hub asks several times a second).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DenseVerdict {
    first_seq: u64,
    live_count: usize,
    pressed: bool,
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
        let mut verdict = self
            .owner
            .retention
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shared = self.shared();
        let needed_from = liveness.needed_from.min(self.durable_seq() + 1);
        let live = Liveness {
            needed_from,
            live: liveness
                .live_within(0, needed_from.saturating_sub(1))
                .to_vec(),
        };
        let plan = self.plan_reclaim(&live, &mut verdict)?;
        let mut report = ReclaimReport::default();
        let mut freed = self.remove_segments(plan.dead, &mut report)?;
        let mut written = 0;
        if let Some(first) = plan.moving.first() {
            fence::check_epoch(shared.fs.as_ref(), &shared.dir, shared.epoch)?;
            let fs = shared.fs.as_ref();
            let moved = write_moved_file(fs, &shared.dir, shared.epoch, first.seq, &plan.moving)?;
            written = moved.bytes;
            report.records_moved = plan.moving.len() as u64;
            self.add_usage(moved.bytes);
            shared
                .moved
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(moved);
        }
        freed += self.remove_segments(plan.emptied, &mut report)?;
        let (compacted, compacted_freed) = self.compact_moved_files(&live)?;
        shared.disk_measured(shared.measure_available());
        report.moved_files_compacted = compacted;
        report.bytes_freed = (freed + compacted_freed).saturating_sub(written);
        Ok(report)
    }

    /// Removes [`Wal::reclaim`]'s way every segment all of whose records are below
    /// `lowest_needed_seq`, moving none: for a caller that needs everything from there on.
    ///
    /// # Errors
    /// As [`Wal::reclaim`].
    pub fn remove_segments_below(&self, lowest_needed_seq: u64) -> Result<ReclaimReport> {
        self.reclaim(&Liveness {
            needed_from: lowest_needed_seq,
            live: Vec::new(),
        })
    }

    /// Removes segments from the front, oldest first; returns the bytes freed.
    fn remove_segments(&self, segments: Vec<Segment>, report: &mut ReclaimReport) -> Result<u64> {
        let shared = self.shared();
        let mut freed = 0;
        for segment in segments {
            // Checked before each removal: a newer writer may have taken the directory over.
            fence::check_epoch(shared.fs.as_ref(), &shared.dir, shared.epoch)?;
            // Out of the list before the file goes, so that a reader looking for one of its
            // moved records finds them among the moved ones, never a file about to vanish.
            let removed = write_listed(&shared.segments).remove(segment.first_seq);
            if let Err(e) = self.remove_file(&segment.path, "remove segment") {
                // Still there: listed again, so that no later segment goes before it (that
                // would leave a hole for recovery to refuse).
                write_listed(&shared.segments).restore_front(removed.expect("it was the first"));
                return Err(e);
            }
            self.release_usage(segment.bytes);
            freed += segment.bytes;
            report.segments_removed += 1;
        }
        Ok(freed)
    }

    /// Decides what to remove and what to move, reading only the records it will move.
    fn plan_reclaim(&self, live: &Liveness, verdict: &mut Option<DenseVerdict>) -> Result<Plan> {
        let shared = self.shared();
        let candidates = shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .wholly_below(live.needed_from);
        let (disk_low, usage_bytes) = {
            let queue = shared.lock_queue();
            (queue.disk_low, queue.usage_bytes)
        };
        let pressed = disk_low
            || shared
                .options
                .quota_bytes
                .is_some_and(|quota| 2 * usage_bytes > quota);
        // Moved records need room of their own before their segments go.
        let mut move_budget = RECLAIM_MOVE_BYTES_MAX.min(shared.measure_available() / 2);
        let mut plan = Plan::default();
        for segment in candidates {
            // A live record already moved (by a reclaim cut short) needs no second copy.
            let to_move: Vec<u64> = {
                let moved = shared.moved.read().unwrap_or_else(PoisonError::into_inner);
                live.live_within(segment.first_seq, segment.last_seq)
                    .iter()
                    .copied()
                    .filter(|&seq| !moved.contains(seq))
                    .collect()
            };
            if to_move.is_empty() {
                match plan.emptied.is_empty() && plan.moving.is_empty() {
                    true => plan.dead.push(segment),
                    false => plan.emptied.push(segment),
                }
                continue;
            }
            let this = DenseVerdict {
                first_seq: segment.first_seq,
                live_count: to_move.len(),
                pressed,
            };
            if *verdict == Some(this) {
                break;
            }
            let ratio = if pressed { 2 } else { SPARSE_SEGMENT_RATIO };
            let worth_moving = segment.bytes / ratio;
            let budget = worth_moving.min(move_budget);
            let Some((records, bytes)) = self.read_live_records(&segment, &to_move, budget)? else {
                // Remembered only when density, not this run's room, was the limit.
                if budget == worth_moving {
                    *verdict = Some(this);
                }
                break;
            };
            move_budget -= bytes;
            plan.moving.extend(records);
            plan.emptied.push(segment);
        }
        Ok(plan)
    }

    /// The records `seqs` (ascending, all in `segment`), read in one pass; `None` as soon as
    /// they take more than `budget` bytes.
    fn read_live_records(
        &self,
        segment: &Segment,
        seqs: &[u64],
        budget: u64,
    ) -> Result<Option<(Vec<Record>, u64)>> {
        // Each takes at least a frame header: too many is known without reading any.
        if seqs.len() as u64 * FRAME_HEADER_BYTES > budget {
            return Ok(None);
        }
        let missing = |seq: u64| Error::Corrupt {
            path: segment.path.clone(),
            offset: 0,
            detail: format!("live record {seq} is not in its segment"),
        };
        let mut reader = self.reader(seqs[0])?;
        let (mut records, mut bytes) = (Vec::with_capacity(seqs.len()), 0);
        for &seq in seqs {
            let record = loop {
                let record = reader.try_next()?.ok_or_else(|| missing(seq))?;
                match record.seq.cmp(&seq) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => break record,
                    std::cmp::Ordering::Greater => return Err(missing(seq)),
                }
            };
            bytes += FRAME_HEADER_BYTES + record.payload.len() as u64;
            if bytes > budget {
                return Ok(None);
            }
            records.push(record);
        }
        Ok(Some((records, bytes)))
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
            // A newer writer reads the same moved files (their names carry no epoch).
            fence::check_epoch(shared.fs.as_ref(), &shared.dir, shared.epoch)?;
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
