//! [`Wal`]: the handle through which the hub appends, reads and trims the log.
//!
//! Appends are queued in sequence order under one mutex, written by one writer thread (see
//! `writer.rs`) in batches with one fdatasync each, and resolved only once durable (law 1). The
//! queue is bounded in bytes (law 5): `submit` waits for room, `try_submit` fails with
//! `QueueFull`. Readers (`reader.rs`) see only durable records.

mod reclaim;

pub use reclaim::{Liveness, ReclaimReport};

use crate::fence::{self, DirLock};
use crate::fs::{FileSystem, RealFs};
use crate::layout::{FRAME_HEADER_BYTES, KIND_USER_MASK};
use crate::limits::DISK_ROOM_AGAIN_BYTES;
use crate::moved::MovedSet;
use crate::options::{WalOptions, WriterMode};
use crate::reader::{Record, WalReader};
use crate::recovery::{RecoveryReport, recover};
use crate::segment::{SegmentSet, create_segment};
use crate::writer::{ActiveSegment, Writer};
use crate::{Error, Result};
use bytes::Bytes;
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

/// State shared by the handle, the writer thread and the readers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub fs: Arc<dyn FileSystem>,
    pub dir: PathBuf,
    pub options: WalOptions,
    /// The epoch this writer holds.
    pub epoch: u64,
    pub queue: Mutex<Queue>,
    /// Signalled when the queue gains an append or changes state.
    pub queue_changed: Condvar,
    /// Room in the queue, in bytes; an append holds its frame's worth until it is written.
    pub queue_room: Arc<Semaphore>,
    pub segments: RwLock<SegmentSet>,
    /// Records moved out of removed segments, all older than the first segment's.
    pub moved: RwLock<MovedSet>,
    /// The last durable sequence number; readers never go past it.
    pub durable: watch::Sender<u64>,
    /// Counts the times retention freed space, so appends refused at the quota can wait for
    /// room without polling.
    pub space_freed: watch::Sender<u64>,
}

/// The appends waiting for the writer, and what the log has promised so far.
#[derive(Debug)]
pub(crate) struct Queue {
    pub pending: VecDeque<Submission>,
    /// The sequence number the next submission gets. Invariant: pending sequence numbers are
    /// consecutive and end at `next_seq - 1`.
    pub next_seq: u64,
    /// Bytes of all segment and moved-record files plus queued frames; what the quota is
    /// checked against.
    pub usage_bytes: u64,
    pub state: QueueState,
    /// Bytes free on the file system as last measured, less what was queued since.
    pub disk_available: u64,
    /// Set when an append was refused for want of disk space (or a write met ENOSPC): the
    /// writer then measures the free space every `DISK_RECHECK_INTERVAL_MS` and says when it
    /// is back.
    pub disk_low: bool,
    /// `Some(n)` while the writer sleeps until `n` appends are pending; `None` while it is busy,
    /// so that appends do not pay for a wake-up syscall nobody waits for.
    pub writer_wakes_at: Option<usize>,
}

#[derive(Debug, Clone)]
pub(crate) enum QueueState {
    Open,
    /// `close` was called: the writer drains what is queued, then exits.
    Closing,
    /// A write, fsync or fencing check failed; this error is returned from now on.
    Failed(Error),
}

/// One queued append.
#[derive(Debug)]
pub(crate) struct Submission {
    pub seq: u64,
    pub kind: u8,
    pub payload: Bytes,
    pub done: oneshot::Sender<Result<u64>>,
    /// Released once the record is written, making room for the next append.
    pub _room: OwnedSemaphorePermit,
}

impl Shared {
    pub fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the log for good after `error`: every queued append fails with it, and so does
    /// every later one.
    pub fn fail(&self, error: &Error) {
        let pending = {
            let mut queue = self.lock_queue();
            queue.state = QueueState::Failed(error.clone());
            std::mem::take(&mut queue.pending)
        };
        for submission in pending {
            let _ = submission.done.send(Err(error.clone()));
        }
        self.queue_room.close();
        self.queue_changed.notify_all();
        self.durable.send_modify(|_| {});
    }

    /// The free space on the log's file system; unknown (a failed statvfs) counts as plenty,
    /// so a file system that cannot say never stops the log.
    pub fn measure_available(&self) -> u64 {
        match self.fs.available_bytes(&self.dir) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), "cannot measure free space: {e}");
                u64::MAX
            }
        }
    }

    /// Called by the writer with the free space it measured: ends a low-space episode (and
    /// wakes the appends waiting for room) once the reserve is there again.
    pub fn disk_measured(&self, available: u64) {
        let mut queue = self.lock_queue();
        queue.disk_available = available;
        let reserve = self.options.disk_free_min_bytes;
        if queue.disk_low && available >= reserve.saturating_add(DISK_ROOM_AGAIN_BYTES) {
            queue.disk_low = false;
            drop(queue);
            tracing::info!(available, "file system has room again: appends resume");
            self.space_freed.send_modify(|freed| *freed += 1);
        }
    }

    /// Whether no more records will become durable (closed or failed).
    pub fn is_stopped(&self) -> bool {
        !matches!(self.lock_queue().state, QueueState::Open)
    }
}

/// An append that is queued with its sequence number; await it for durability.
#[derive(Debug)]
pub struct PendingAppend {
    seq: u64,
    done: oneshot::Receiver<Result<u64>>,
}

impl PendingAppend {
    /// The sequence number the record will have. It is not durable until this resolves.
    #[must_use]
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Future for PendingAppend {
    type Output = Result<u64>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<u64>> {
        Pin::new(&mut self.done)
            .poll(cx)
            .map(|result| result.unwrap_or(Err(Error::Closed)))
    }
}

/// Room in the append queue taken for one record by [`Wal::reserve`]; dropping it frees the room.
#[derive(Debug)]
pub struct Reservation<'a> {
    wal: &'a Wal,
    kind: u8,
    payload: Bytes,
    room: OwnedSemaphorePermit,
}

impl<'a> Reservation<'a> {
    /// Queues the record; it gets its sequence number now. Never waits.
    ///
    /// # Errors
    /// `QuotaExceeded`, `Closed`, or the sticky failure.
    pub fn submit(self) -> Result<PendingAppend> {
        self.wal.enqueue(self.kind, self.payload, self.room, false)
    }

    /// Queues the record even when the log is at its quota: for small records that let
    /// consumers free space (a client's release of a packet id), which refusing could
    /// deadlock. The caller bounds how many it writes.
    ///
    /// # Errors
    /// `Closed`, or the sticky failure.
    pub fn submit_beyond_quota(self) -> Result<PendingAppend> {
        self.wal.enqueue(self.kind, self.payload, self.room, true)
    }
}

/// The write-ahead log. Cheap to clone; the writer stops when the last clone is dropped or
/// `close` is called.
#[derive(Debug, Clone)]
pub struct Wal {
    owner: Arc<Owner>,
}

#[derive(Debug)]
struct Owner {
    shared: Arc<Shared>,
    writer: Mutex<WriterSlot>,
    /// Serialises reclaim runs, and keeps what the last one learnt.
    retention: Mutex<Option<reclaim::DenseVerdict>>,
    /// Held until the writer has stopped.
    _lock: DirLock,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop_writer();
    }
}

/// Where the writer runs (`WalOptions::writer`).
enum WriterSlot {
    Thread(JoinHandle<()>),
    Caller(Box<Writer>),
    Stopped,
}

impl std::fmt::Debug for WriterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriterSlot::Thread(_) => "Thread",
            WriterSlot::Caller(_) => "Caller",
            WriterSlot::Stopped => "Stopped",
        })
    }
}

impl Owner {
    fn stop_writer(&self) {
        {
            let mut queue = self.shared.lock_queue();
            if matches!(queue.state, QueueState::Open) {
                queue.state = QueueState::Closing;
            }
        }
        self.shared.queue_changed.notify_all();
        let slot = std::mem::replace(&mut *self.lock_writer(), WriterSlot::Stopped);
        match slot {
            // A panic in the writer is a bug; it already failed every append (see writer.rs).
            WriterSlot::Thread(handle) => drop(handle.join()),
            WriterSlot::Caller(writer) => writer.drain(),
            WriterSlot::Stopped => {}
        }
    }

    fn lock_writer(&self) -> MutexGuard<'_, WriterSlot> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Opens the last segment for appending, or creates the first one.
fn open_active_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    epoch: u64,
    next_seq: u64,
    segments: &mut SegmentSet,
) -> Result<ActiveSegment> {
    let (file, last) = match segments.last_mut() {
        Some(last) => {
            let file = fs
                .open(&last.path, crate::fs::OpenMode::ReadWrite)
                .map_err(|e| Error::io("open segment", &last.path, e))?;
            (file, last.clone())
        }
        None => {
            let (file, segment) = create_segment(fs, dir, epoch, next_seq)?;
            segments.push(segment.clone());
            (file, segment)
        }
    };
    // A killed process may have left written, never synced records in the page cache;
    // recovery counts them as durable, so make them so before anyone relies on it. (Older
    // segments were synced before they rolled.)
    file.sync_data()
        .map_err(|e| Error::io("sync segment", &last.path, e))?;
    let allocated = file
        .size()
        .map_err(|e| Error::io("stat segment", &last.path, e))?;
    Ok(ActiveSegment::new(file, &last, allocated))
}

impl Wal {
    /// Opens (creating if needed) the log in `dir` on the real file system, recovering it.
    ///
    /// # Errors
    /// See [`Wal::open_with_fs`].
    pub fn open(dir: &Path, options: WalOptions) -> Result<(Wal, RecoveryReport)> {
        Wal::open_with_fs(Arc::new(RealFs), dir, options)
    }

    /// Opens the log in `dir` on `fs`: takes the lock, recovers (see `recovery::recover` for
    /// the rules), bumps the epoch, and starts the writer.
    ///
    /// # Errors
    /// `InvalidOptions`, `Locked`, the refusals of recovery (`Corrupt`, `MissingSegment`,
    /// `MetadataAhead`), or `Io`.
    pub fn open_with_fs(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        options: WalOptions,
    ) -> Result<(Wal, RecoveryReport)> {
        options.validate()?;
        fs.create_dir_all(dir)
            .map_err(|e| Error::io("create directory", dir, e))?;
        let lock = fence::lock_dir(fs.as_ref(), dir, options.lock)?;
        let recovered = recover(fs.as_ref(), dir, options.required_last_seq)?;
        let epoch = fence::bump_epoch(fs.as_ref(), dir, recovered.epoch_floor)?;
        let mut segments = recovered.segments;
        let next_seq = recovered.next_seq;
        let active = open_active_segment(fs.as_ref(), dir, epoch, next_seq, &mut segments)?;
        let usage_bytes = segments.total_bytes() + recovered.moved.total_bytes();
        let disk_available = fs.available_bytes(dir).unwrap_or(u64::MAX);
        let shared = Arc::new(Shared {
            fs,
            dir: dir.to_path_buf(),
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                next_seq,
                usage_bytes,
                disk_available,
                disk_low: false,
                state: QueueState::Open,
                writer_wakes_at: None,
            }),
            queue_changed: Condvar::new(),
            queue_room: Arc::new(Semaphore::new(
                usize::try_from(options.queue_bytes_max).expect("validated"),
            )),
            segments: RwLock::new(segments),
            moved: RwLock::new(recovered.moved),
            durable: watch::Sender::new(next_seq - 1),
            space_freed: watch::Sender::new(0),
            options,
            epoch,
        });
        let writer = Writer::new(Arc::clone(&shared), active);
        let writer = match shared.options.writer {
            WriterMode::Thread => WriterSlot::Thread(
                std::thread::Builder::new()
                    .name("spool-wal-writer".into())
                    .spawn(move || writer.run())
                    .map_err(|e| Error::io("start writer thread for", dir, e))?,
            ),
            WriterMode::Caller => WriterSlot::Caller(Box::new(writer)),
        };
        let owner = Owner {
            shared,
            writer: Mutex::new(writer),
            retention: Mutex::new(None),
            _lock: lock,
        };
        Ok((
            Wal {
                owner: Arc::new(owner),
            },
            recovered.report,
        ))
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    /// Appends a record and waits until it is durable; returns its sequence number.
    ///
    /// # Errors
    /// As [`Wal::submit`], or the writer's failure (`Poisoned`, `Fenced`).
    pub async fn append(&self, kind: u8, payload: Bytes) -> Result<u64> {
        self.submit(kind, payload).await?.await
    }

    /// Queues a record, waiting for room in the queue, and returns as soon as it has its
    /// sequence number. Records get sequence numbers in the order `submit` returns.
    ///
    /// # Errors
    /// `InvalidKind`, `RecordTooLarge`, `QuotaExceeded`, `Closed`, or the sticky failure.
    pub async fn submit(&self, kind: u8, payload: Bytes) -> Result<PendingAppend> {
        self.reserve(kind, payload).await?.submit()
    }

    /// Waits for room in the queue for a record, without queueing it yet. The caller can then
    /// decide, under its own lock and without waiting, whether to queue it
    /// ([`Reservation::submit`]) or not (drop the reservation): the record's sequence number is
    /// assigned in the same step as that decision.
    ///
    /// # Errors
    /// `InvalidKind`, `RecordTooLarge`, `Closed`, or the sticky failure.
    pub async fn reserve(&self, kind: u8, payload: Bytes) -> Result<Reservation<'_>> {
        let frame_bytes = self.check_record(kind, &payload)?;
        let room = Arc::clone(&self.shared().queue_room)
            .acquire_many_owned(frame_bytes)
            .await
            .map_err(|_closed| self.stopped_error())?;
        Ok(Reservation {
            wal: self,
            kind,
            payload,
            room,
        })
    }

    /// Queues a record without waiting.
    ///
    /// # Errors
    /// `QueueFull` when the queue has no room, otherwise as [`Wal::submit`].
    pub fn try_submit(&self, kind: u8, payload: Bytes) -> Result<PendingAppend> {
        self.try_reserve(kind, payload)?.submit()
    }

    /// Takes room in the queue for a record without waiting, as [`Wal::reserve`] does by
    /// waiting.
    ///
    /// # Errors
    /// `QueueFull` when the queue has no room, otherwise as [`Wal::reserve`].
    pub fn try_reserve(&self, kind: u8, payload: Bytes) -> Result<Reservation<'_>> {
        let frame_bytes = self.check_record(kind, &payload)?;
        match Arc::clone(&self.shared().queue_room).try_acquire_many_owned(frame_bytes) {
            Ok(room) => Ok(Reservation {
                wal: self,
                kind,
                payload,
                room,
            }),
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(Error::QueueFull),
            Err(tokio::sync::TryAcquireError::Closed) => Err(self.stopped_error()),
        }
    }

    fn check_record(&self, kind: u8, payload: &Bytes) -> Result<u32> {
        if kind & !KIND_USER_MASK != 0 {
            return Err(Error::InvalidOptions(format!(
                "record kind {kind:#x} uses the reserved top bit"
            )));
        }
        let max = self.shared().options.record_payload_bytes_max;
        if payload.len() as u64 > u64::from(max) {
            return Err(Error::RecordTooLarge {
                size: payload.len() as u64,
                max: u64::from(max),
            });
        }
        Ok(u32::try_from(FRAME_HEADER_BYTES + payload.len() as u64).expect("checked above"))
    }

    fn enqueue(
        &self,
        kind: u8,
        payload: Bytes,
        room: OwnedSemaphorePermit,
        beyond_quota: bool,
    ) -> Result<PendingAppend> {
        let shared = self.shared();
        let frame_bytes = FRAME_HEADER_BYTES + payload.len() as u64;
        let mut queue = shared.lock_queue();
        match &queue.state {
            QueueState::Open => {}
            QueueState::Closing => return Err(Error::Closed),
            QueueState::Failed(error) => return Err(error.clone()),
        }
        if let Some(quota_bytes) = shared.options.quota_bytes
            && !beyond_quota
            && queue.usage_bytes + frame_bytes > quota_bytes
        {
            return Err(Error::QuotaExceeded { quota_bytes });
        }
        let reserve_bytes = shared.options.disk_free_min_bytes;
        let needed_bytes = frame_bytes.saturating_add(reserve_bytes);
        if !beyond_quota && reserve_bytes > 0 && queue.disk_available < needed_bytes {
            // Look again: space may have been freed outside the log since it was measured.
            queue.disk_available = shared.measure_available();
            if queue.disk_available < needed_bytes {
                if !queue.disk_low {
                    queue.disk_low = true;
                    shared.queue_changed.notify_one(); // the writer watches for room from now
                }
                return Err(Error::DiskFull {
                    available_bytes: queue.disk_available,
                    reserve_bytes,
                });
            }
        }
        queue.disk_available = queue.disk_available.saturating_sub(frame_bytes);
        let seq = queue.next_seq;
        let (done, receiver) = oneshot::channel();
        queue.pending.push_back(Submission {
            seq,
            kind,
            payload,
            done,
            _room: room,
        });
        queue.next_seq += 1;
        queue.usage_bytes += frame_bytes;
        let wake_writer = queue
            .writer_wakes_at
            .is_some_and(|wanted| queue.pending.len() >= wanted);
        drop(queue);
        if wake_writer {
            shared.queue_changed.notify_one();
        }
        Ok(PendingAppend {
            seq,
            done: receiver,
        })
    }

    fn stopped_error(&self) -> Error {
        match &self.shared().lock_queue().state {
            QueueState::Failed(error) => error.clone(),
            QueueState::Open | QueueState::Closing => Error::Closed,
        }
    }

    /// A reader positioned at `from_seq`: it reads the first record at or after it, moved
    /// records first (see `Wal::reclaim`), then the segments.
    ///
    /// # Errors
    /// None today; kept for readers that must open files.
    pub fn reader(&self, from_seq: u64) -> Result<WalReader> {
        WalReader::new(Arc::clone(self.shared()), from_seq)
    }

    /// The durable record `seq`, wherever it is (a segment or moved records); `None` if it is
    /// not durable yet, or was removed because no one needed it any more.
    ///
    /// # Errors
    /// `Corrupt` if it does not check out, `Io`.
    pub fn read(&self, seq: u64) -> Result<Option<Record>> {
        // A reclaim may move the record between the look-up and the read: then look again.
        for _ in 0..2 {
            let mut reader = self.reader(seq)?;
            match reader.try_next() {
                Ok(Some(record)) => return Ok((record.seq == seq).then_some(record)),
                Ok(None) => return Ok(None),
                Err(Error::SequenceRemoved { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Writes, syncs and resolves every append queued now, on this thread; returns how many.
    /// Only a log opened with `WriterMode::Caller` has its writer here: with a writer thread
    /// this does nothing and returns 0.
    pub fn write_queued(&self) -> usize {
        match &mut *self.owner.lock_writer() {
            WriterSlot::Caller(writer) => writer.write_queued(),
            WriterSlot::Thread(_) | WriterSlot::Stopped => 0,
        }
    }

    /// The last durable sequence number (0 if none).
    #[must_use]
    pub fn durable_seq(&self) -> u64 {
        *self.shared().durable.borrow()
    }

    /// The sequence number of the last record queued, durable or not (0 if none).
    #[must_use]
    pub fn last_submitted_seq(&self) -> u64 {
        self.shared().lock_queue().next_seq - 1
    }

    /// Waits until every record through `seq` is durable (for a caller that did not append
    /// it, so has no `PendingAppend` to await).
    ///
    /// # Errors
    /// The log's failure, if it fails first.
    pub async fn wait_durable(&self, seq: u64) -> Result<()> {
        let failed = || matches!(self.shared().lock_queue().state, QueueState::Failed(_));
        let mut durable = self.watch_durable();
        let reached = durable
            .wait_for(|&through| through >= seq || failed())
            .await
            .is_ok_and(|through| *through >= seq);
        match reached {
            true => Ok(()),
            false => Err(self.stopped_error()),
        }
    }

    /// A receiver that changes whenever more records become durable.
    #[must_use]
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.shared().durable.subscribe()
    }

    /// A receiver that changes whenever retention frees space. An append refused with
    /// `QuotaExceeded` waits for a change, then tries again; taking the receiver before the
    /// append means no freeing in between is missed.
    #[must_use]
    pub fn watch_space_freed(&self) -> watch::Receiver<u64> {
        self.shared().space_freed.subscribe()
    }

    /// The first sequence number still in the log.
    #[must_use]
    pub fn first_seq(&self) -> u64 {
        let segments = self
            .shared()
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        segments
            .first_seq()
            .expect("the log always has an active segment")
    }

    /// The first sequence number of the segment after the oldest `segments` sealed ones (of
    /// the active segment, if there are fewer): what one reclaim of that many can free lies
    /// below it.
    #[must_use]
    pub fn reclaim_horizon(&self, segments: usize) -> u64 {
        self.shared()
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .first_seq_after(segments)
    }

    /// Bytes used by segments, moved records and queued appends (what the quota counts).
    #[must_use]
    pub fn usage_bytes(&self) -> u64 {
        self.shared().lock_queue().usage_bytes
    }

    /// The number of segment files.
    #[must_use]
    pub fn segment_count(&self) -> usize {
        let segments = self
            .shared()
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        segments.len()
    }

    /// The epoch this writer holds.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.shared().epoch
    }

    /// Stops accepting appends, waits until everything queued is durable, and stops the writer.
    ///
    /// # Errors
    /// The writer's failure, if it failed.
    pub fn close(&self) -> Result<()> {
        self.owner.stop_writer();
        match &self.shared().lock_queue().state {
            QueueState::Failed(error) => Err(error.clone()),
            QueueState::Open | QueueState::Closing => Ok(()),
        }
    }
}
