//! Durable append throughput of the WAL against the physical limit, side by side in one run:
//! 64 B, 256 B and 4 KiB records with 1, 16 and 1024 appends outstanding, and a raw file written
//! in the same batch sizes with one fdatasync per batch, appended to (`raw`) and overwritten in
//! zero-filled space (`rawpre`).
//!
//! Run: `cargo bench -p spool-bench --bench wal_append` (set SPOOL_BENCH_DIR to choose the disk).
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use spool_bench::{FRAME_OVERHEAD_BYTES, RawFile, append_with_window, bench_dir, open_wal};
use std::time::Duration;

const RECORD_SIZES: [usize; 3] = [64, 256, 4096];
const OUTSTANDING: [usize; 3] = [1, 16, 1024];

fn durable_appends(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = bench_dir(env!("CARGO_TARGET_TMPDIR"));
    let wal = open_wal(dir.path());
    let mut raw = RawFile::create(&dir.path().join("raw"));
    let mut raw_preallocated = RawFile::create_preallocated(&dir.path().join("rawpre"));
    let mut group = c.benchmark_group("durable_append");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for size in RECORD_SIZES {
        let payload = Bytes::from(vec![0x5a; size]);
        for outstanding in OUTSTANDING {
            group.bench_function(BenchmarkId::new(format!("wal/{size}B"), outstanding), |b| {
                b.iter_custom(|count| {
                    runtime.block_on(append_with_window(&wal, count, outstanding, &payload))
                });
            });
            group.bench_function(BenchmarkId::new(format!("raw/{size}B"), outstanding), |b| {
                b.iter_custom(|count| {
                    raw.write_batches(count, outstanding, size + FRAME_OVERHEAD_BYTES)
                });
            });
            group.bench_function(
                BenchmarkId::new(format!("rawpre/{size}B"), outstanding),
                |b| {
                    b.iter_custom(|count| {
                        raw_preallocated.write_batches(
                            count,
                            outstanding,
                            size + FRAME_OVERHEAD_BYTES,
                        )
                    });
                },
            );
            // Keep the disk footprint bounded across the whole run.
            wal.remove_segments_below(wal.durable_seq() + 1).unwrap();
        }
    }
    group.finish();
}

criterion_group!(benches, durable_appends);
criterion_main!(benches);
