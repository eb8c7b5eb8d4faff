//! Append latency at a steady 10,000 appends/s (256 B records), against raw write + fdatasync
//! latency on the same disk, measured in the same run. (Not criterion: criterion measures
//! throughput, not latency at a fixed rate.)
//!
//! Each round measures, one after the other:
//! - **raw fdatasync**: one record written and fdatasynced, back to back, on a preallocated
//!   file (every fdatasync flushes data only): the latency of one fdatasync on this disk;
//! - **raw group commit at 10,000/s**: the same arrivals as the WAL's, on a preallocated file,
//!   with one thread that writes every record due so far and fdatasyncs once: the physical
//!   limit at this rate, since a record that comes due during an fdatasync must wait for it and
//!   then for its own;
//! - **WAL at 10,000/s**: a pacing thread submits, a task awaits each append.
//!
//! Latency is counted from when each record was due, on both sides (no coordinated omission).
//! The disk's periodic activity moves single runs a lot, so the bench runs several rounds
//! (`SPOOL_BENCH_ROUNDS`, default 5) and reports the medians. Nothing is deleted until the end:
//! on a file system mounted with `discard` (like this VM's) a deleted file's blocks are trimmed
//! at the next journal commit, which would stall the next measurement's fdatasyncs.
//!
//! Run: `cargo bench -p spool-bench --bench wal_latency`.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use spool_bench::{FRAME_OVERHEAD_BYTES, RawFile, bench_dir, open_wal, quantile};
use std::path::Path;
use std::time::{Duration, Instant};

const RATE_PER_SECOND: u64 = 10_000;
const APPENDS: u64 = 50_000;
const BACK_TO_BACK_SAMPLES: u32 = 5_000;
const RECORD_BYTES: usize = 256;
const ROUNDS_DEFAULT: usize = 5;
/// Timer slack for every thread of the bench: with Linux's default (50 µs) each sleep of the
/// pacers overshoots by about that much, which would blur a 100 µs arrival interval.
const TIMER_SLACK_NS: u32 = 1_000;

/// When arrival `i` is due.
fn due(begun: Instant, i: u64) -> Instant {
    begun + Duration::from_nanos(i * 1_000_000_000 / RATE_PER_SECOND)
}

fn sleep_until(instant: Instant) {
    // Sleep, not spin: on a 2-core machine a spinning pacer would take a core from the
    // writer and measure the scheduler instead of the disk.
    if let Some(wait) = instant.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// WAL append latencies: a pacing thread submits at the steady rate (catching up if it
/// oversleeps); a tokio task awaits completions in order (appends resolve in sequence order, so
/// in-order awaiting sees each as it resolves).
fn wal_at_rate(dir: &Path) -> Vec<Duration> {
    let wal = open_wal(dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::channel(100_000);
    let pacer_wal = wal.clone();
    let pacer = std::thread::spawn(move || {
        let payload = Bytes::from(vec![0x5a; RECORD_BYTES]);
        let begun = Instant::now();
        for i in 0..APPENDS {
            let due = due(begun, i);
            sleep_until(due);
            let pending = pacer_wal.try_submit(1, payload.clone()).unwrap();
            sender.blocking_send((due, pending)).unwrap();
        }
    });
    let mut latencies = runtime.block_on(async {
        let mut latencies = Vec::with_capacity(APPENDS as usize);
        while let Some((due, pending)) = receiver.recv().await {
            pending.await.unwrap();
            latencies.push(due.elapsed());
        }
        latencies
    });
    pacer.join().unwrap();
    latencies.sort();
    latencies
}

/// Raw group commit at the WAL's rate: every record due so far is written at once and
/// fdatasynced once, as the WAL's writer takes every queued append.
fn raw_group_commit_at_rate(raw: &mut RawFile) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(APPENDS as usize);
    let begun = Instant::now();
    let mut next = 0;
    while next < APPENDS {
        sleep_until(due(begun, next));
        let now = Instant::now();
        let mut end = next + 1;
        while end < APPENDS && due(begun, end) <= now {
            end += 1;
        }
        let records = usize::try_from(end - next).unwrap();
        raw.write_one_batch(records * (RECORD_BYTES + FRAME_OVERHEAD_BYTES));
        latencies.extend((next..end).map(|i| due(begun, i).elapsed()));
        next = end;
    }
    latencies.sort();
    latencies
}

/// One record written and fdatasynced at a time, back to back, on a preallocated file.
fn raw_fdatasync_back_to_back(raw: &mut RawFile) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = (0..BACK_TO_BACK_SAMPLES)
        .map(|_| {
            let started = Instant::now();
            raw.write_one_batch(RECORD_BYTES + FRAME_OVERHEAD_BYTES);
            started.elapsed()
        })
        .collect();
    latencies.sort();
    latencies
}

/// p50 and p99 of one measurement, in microseconds.
#[derive(Clone, Copy)]
struct Percentiles {
    p50: f64,
    p99: f64,
}

impl Percentiles {
    fn of(sorted: &[Duration]) -> Percentiles {
        let micros = |d: Duration| d.as_secs_f64() * 1e6;
        Percentiles {
            p50: micros(quantile(sorted, 0.5)),
            p99: micros(quantile(sorted, 0.99)),
        }
    }
}

struct Round {
    fdatasync: Percentiles,
    group_commit: Percentiles,
    wal: Percentiles,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn print_row(name: &str, round: &Round) {
    let Round {
        fdatasync: f,
        group_commit: g,
        wal: w,
    } = round;
    println!(
        "{name:<8} {:>6.0} {:>6.0} | {:>6.0} {:>6.0} | {:>6.0} {:>6.0} | {:>6.2} {:>6.2} | {:>6.2} {:>6.2}",
        f.p50,
        f.p99,
        g.p50,
        g.p99,
        w.p50,
        w.p99,
        w.p50 / f.p50,
        w.p99 / f.p99,
        w.p50 / g.p50,
        w.p99 / g.p99,
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes bench binaries; there is nothing to test here
    }
    // Inherited by every thread spawned from here on, the WAL's writer included.
    std::fs::write("/proc/self/timerslack_ns", TIMER_SLACK_NS.to_string()).unwrap();
    let rounds: usize = std::env::var("SPOOL_BENCH_ROUNDS")
        .map_or(ROUNDS_DEFAULT, |rounds| rounds.parse().unwrap());
    println!(
        "append latency, {RECORD_BYTES} B records, {RATE_PER_SECOND}/s for {} s; µs",
        APPENDS / RATE_PER_SECOND
    );
    println!(
        "{:<8} {:>13} | {:>13} | {:>13} | {:>13} | {:>13}",
        "", "raw fdatasync", "raw at rate", "WAL at rate", "WAL / fdatasync", "WAL / raw at rate"
    );
    println!(
        "{:<8} {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6}",
        "", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99"
    );
    let dir = bench_dir(env!("CARGO_TARGET_TMPDIR"));
    let mut raw = RawFile::create_preallocated(&dir.path().join("raw"));
    let measured: Vec<Round> = (0..rounds)
        .map(|i| {
            let round = Round {
                fdatasync: Percentiles::of(&raw_fdatasync_back_to_back(&mut raw)),
                group_commit: Percentiles::of(&raw_group_commit_at_rate(&mut raw)),
                wal: Percentiles::of(&wal_at_rate(&dir.path().join(format!("wal-{i}")))),
            };
            print_row(&format!("round {}", i + 1), &round);
            round
        })
        .collect();
    let median_of = |pick: fn(&Round) -> Percentiles| Percentiles {
        p50: median(measured.iter().map(|r| pick(r).p50).collect()),
        p99: median(measured.iter().map(|r| pick(r).p99).collect()),
    };
    let medians = Round {
        fdatasync: median_of(|r| r.fdatasync),
        group_commit: median_of(|r| r.group_commit),
        wal: median_of(|r| r.wal),
    };
    print_row("median", &medians);
}
