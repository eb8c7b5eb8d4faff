//! Every bound of the storage core, named in one place, with the relationships between them
//! checked at compile time.

/// The largest payload a single WAL record may carry. The broker's maximum packet size must stay
/// below it; a larger append is refused with `Error::RecordTooLarge`, never split.
pub const RECORD_PAYLOAD_BYTES_MAX: u32 = 64 << 20;

/// The default segment size: a segment is rolled once the next record would not fit.
pub const SEGMENT_SIZE_BYTES_DEFAULT: u64 = 64 << 20;

/// The smallest segment size accepted; tests use small segments to exercise rolling.
pub const SEGMENT_SIZE_BYTES_MIN: u64 = 4 << 10;

/// The default bound on one group-commit batch (bytes written between two fdatasyncs).
pub const BATCH_BYTES_MAX_DEFAULT: u64 = 4 << 20;

/// The default bound on the number of records in one group-commit batch.
pub const BATCH_RECORDS_MAX_DEFAULT: u32 = 8192;

/// The default bound on bytes queued for the writer but not yet written. Appends beyond it wait
/// (`Wal::append`) or fail with `Error::QueueFull` (`Wal::try_append`): law 5, bounded everything.
pub const QUEUE_BYTES_MAX_DEFAULT: u64 = 64 << 20;

/// Bytes between two entries of a segment's sparse in-memory index: a reader that starts at an
/// arbitrary sequence number scans at most this many bytes to find it.
pub const INDEX_INTERVAL_BYTES: u64 = 64 << 10;

/// How often the writer re-reads the epoch file to notice that a newer instance took over the
/// directory (it also checks on every segment roll).
pub const EPOCH_CHECK_INTERVAL_MS: u64 = 1000;

/// The writer gathers a batch (waits for the queue to refill to the previous batch's size) only
/// when that batch had at least this many records: below it there is no evident concurrency to
/// wait for, and waiting would only add latency.
pub const GATHER_RECORDS_MIN: usize = 4;

/// The longest the writer waits to gather a batch, however slow fsync is.
pub const GATHER_WAIT_US_MAX: u64 = 500;

/// How far ahead of the write position the writer zero-fills a segment by default. Writes
/// inside already allocated, already durable zeros change no file metadata, so their fdatasync
/// is a pure data flush instead of a journal commit: about twice as fast on ext4. One larger
/// fill every this many bytes pays for it.
pub const PREALLOCATE_BYTES_DEFAULT: u64 = 1 << 20;

/// The most `preallocate_bytes` accepted (the writer also never fills past a segment's size).
pub const PREALLOCATE_BYTES_MAX: u64 = 64 << 20;

/// Writes at least this large extend the file without zero-filling ahead. Zero-filling writes
/// every byte twice; that pays when fdatasyncs are many and small (their journal commit
/// dominates), not when a write is large enough that the disk's bandwidth does (measured: 4 KiB
/// records 16 at a time, 66 KiB per write, were slower with it).
pub const PREALLOCATE_WRITE_BYTES_MAX: u64 = 32 << 10;

/// The free space the log keeps on its file system by default (see
/// `WalOptions::disk_free_min_bytes`): room for segment rolls, one reclaim's moved records
/// (`RECLAIM_MOVE_BYTES_MAX` is the most; it stops early when there is less), the epoch file
/// and the caller's metadata commits.
pub const DISK_FREE_MIN_BYTES_DEFAULT: u64 = 16 << 20;

/// Free space above the reserve at which a low-space episode ends: waiting appends are woken,
/// and the writer may seal its segment again the next time space runs low. (A little above the
/// reserve, so that one freed record does not wake everyone for nothing.)
pub const DISK_ROOM_AGAIN_BYTES: u64 = 1 << 20;

/// While the file system is below the reserve, the writer measures its free space this often,
/// so that space freed by anyone (not only the log) lets waiting appends go on.
pub const DISK_RECHECK_INTERVAL_MS: u64 = 500;

/// Bytes a reader fetches from a segment file at once, at most.
pub const READ_CHUNK_BYTES: usize = 256 << 10;
/// Bytes a reader fetches first from a segment; each further read doubles, up to
/// `READ_CHUNK_BYTES`. A reader made for one record (a cache miss) then reads about that
/// record, and one that goes on through the segment soon reads in large chunks.
pub const READ_FIRST_CHUNK_BYTES: usize = 16 << 10;

const _: () = assert!(SEGMENT_SIZE_BYTES_MIN <= SEGMENT_SIZE_BYTES_DEFAULT);
const _: () = assert!(READ_FIRST_CHUNK_BYTES <= READ_CHUNK_BYTES);
// A default segment always holds at least one maximal record, so rolling always makes progress.
const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX as u64 <= SEGMENT_SIZE_BYTES_DEFAULT);
const _: () = assert!(BATCH_BYTES_MAX_DEFAULT <= QUEUE_BYTES_MAX_DEFAULT);
const _: () = assert!(INDEX_INTERVAL_BYTES <= SEGMENT_SIZE_BYTES_DEFAULT);
