//! Append latency at a steady 10,000 appends/s (256 B records), against the latency of one raw
//! write + fdatasync of the same size, measured in the same run. Prints p50/p99 of both and
//! their ratio. (Not criterion: criterion measures throughput, not latency at a fixed rate.)
//!
//! Run: `cargo bench -p spool-bench --bench wal_latency`.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use spool_bench::{FRAME_OVERHEAD_BYTES, RawFile, bench_dir, open_wal, quantile};
use std::time::{Duration, Instant};

const RATE_PER_SECOND: u64 = 10_000;
const APPENDS: u64 = 50_000;
const RAW_SAMPLES: u32 = 5_000;
/// Back to back, raw samples fit in half a second and miss most periodic disk activity
/// (journal commits, writeback); paced, they span the WAL run's five seconds but each fsync
/// starts from an idle disk and CPU. Both are printed: the truth is between them.
const RAW_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);
const RECORD_BYTES: usize = 256;

/// Submits at a steady rate from a pacing thread (catching up if it oversleeps); a tokio task awaits completions in order
/// (appends resolve in sequence order, so in-order awaiting sees each as it resolves).
fn wal_latencies() -> Vec<Duration> {
    let dir = bench_dir(env!("CARGO_TARGET_TMPDIR"));
    let wal = open_wal(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::channel(100_000);
    let pacer_wal = wal.clone();
    let pacer = std::thread::spawn(move || {
        let payload = Bytes::from(vec![0x5a; RECORD_BYTES]);
        let interval = Duration::from_nanos(1_000_000_000 / RATE_PER_SECOND);
        let started = Instant::now();
        for i in 0..APPENDS {
            let due = started + interval * u32::try_from(i).unwrap();
            // Sleep, not spin: on a 2-core machine a spinning pacer would take a core from
            // the writer and measure the scheduler instead of the log.
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let submitted = Instant::now();
            let pending = pacer_wal.try_submit(1, payload.clone()).unwrap();
            sender.blocking_send((submitted, pending)).unwrap();
        }
    });
    let mut latencies = runtime.block_on(async {
        let mut latencies = Vec::with_capacity(APPENDS as usize);
        while let Some((submitted, pending)) = receiver.recv().await {
            pending.await.unwrap();
            latencies.push(submitted.elapsed());
        }
        latencies
    });
    pacer.join().unwrap();
    latencies.sort();
    latencies
}

/// Raw write + fdatasync latencies, one sample every `interval` (zero: back to back), on a
/// file that grows (each fdatasync also commits its size) or one preallocated like the WAL's.
fn raw_latencies(interval: Duration, preallocated: bool) -> Vec<Duration> {
    let dir = bench_dir(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.path().join("raw");
    let mut raw = if preallocated {
        RawFile::create_preallocated(&path)
    } else {
        RawFile::create(&path)
    };
    let begun = Instant::now();
    let mut previous_end = begun;
    let mut latencies: Vec<Duration> = (0..RAW_SAMPLES)
        .map(|i| {
            let due = begun + interval * i;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // Paced, a sample due while the previous fdatasync still ran waited for it, as an
            // append would: count from when it was due (no coordinated omission), so a long
            // stall weighs as many samples as it delays, as it does in the WAL's figures.
            let started = if interval.is_zero() || previous_end <= due {
                Instant::now()
            } else {
                due
            };
            raw.write_one_batch(RECORD_BYTES + FRAME_OVERHEAD_BYTES);
            previous_end = Instant::now();
            previous_end - started
        })
        .collect();
    latencies.sort();
    latencies
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes bench binaries; there is nothing to test here
    }
    let baselines = [
        ("raw appended, back to back", false, Duration::ZERO),
        (
            "raw appended, one per ms for 5 s",
            false,
            RAW_SAMPLE_INTERVAL,
        ),
        ("raw preallocated, back to back", true, Duration::ZERO),
        (
            "raw preallocated, one per ms for 5 s",
            true,
            RAW_SAMPLE_INTERVAL,
        ),
    ]
    .map(|(name, preallocated, interval)| (name, raw_latencies(interval, preallocated)));
    let wal = wal_latencies();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let p50_p99 = |l: &[Duration]| (micros(quantile(l, 0.5)), micros(quantile(l, 0.99)));
    let (wal_p50, wal_p99) = p50_p99(&wal);
    println!("append latency, {RECORD_BYTES} B records");
    println!(
        "{:<48} {:>9} {:>9} {:>11} {:>11}",
        "", "p50 (us)", "p99 (us)", "WAL p50 /", "WAL p99 /"
    );
    for (name, raw) in &baselines {
        let (p50, p99) = p50_p99(raw);
        println!(
            "{name:<48} {p50:>9.0} {p99:>9.0} {:>11.2} {:>11.2}",
            wal_p50 / p50,
            wal_p99 / p99
        );
    }
    println!(
        "{:<48} {wal_p50:>9.0} {wal_p99:>9.0}",
        format!("WAL append at {RATE_PER_SECOND}/s ({APPENDS} appends)")
    );
}
