//! Process-level crash test: a child process appends and prints each acknowledged sequence
//! number; the test kills it with SIGKILL at random moments, many times, reopens the log and
//! checks that every acknowledged record is there, in order, with its payload. A SIGKILL does not
//! model a power loss (the page cache survives it; `crash_model.rs` covers power loss), but it
//! does exercise the real file system, the real lock release and recovery of a real directory.
//!
//! The child is this same test binary, re-run with `SPOOL_KILL9_CHILD_DIR` set, running only the
//! ignored `child_appender` test.
#![allow(clippy::unwrap_used)]

mod common;

use common::{payload_for, read_all};
use spool_storage::{Wal, WalOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CHILD_DIR_VAR: &str = "SPOOL_KILL9_CHILD_DIR";
const ROUNDS: u64 = 25;

fn child_options() -> WalOptions {
    WalOptions {
        segment_size_bytes: 64 << 10,
        record_payload_bytes_max: 4096,
        ..WalOptions::default()
    }
}

#[test]
#[ignore = "run as the child of kill9_loses_no_acknowledged_record"]
fn child_appender() {
    let Ok(dir) = std::env::var(CHILD_DIR_VAR) else {
        return;
    };
    let (wal, report) = Wal::open(dir.as_ref(), child_options()).unwrap();
    println!("opened {}", report.last_seq);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    runtime.block_on(async {
        // Keep 32 appends in flight, so kills land inside batches too.
        let mut in_flight = std::collections::VecDeque::new();
        let mut next = report.last_seq + 1;
        loop {
            while in_flight.len() < 32 {
                let append = wal.submit(1, payload_for(next, 0)).await.unwrap();
                assert_eq!(append.seq(), next);
                in_flight.push_back(append);
                next += 1;
            }
            let acked = in_flight.pop_front().unwrap().await.unwrap();
            println!("ack {acked}");
        }
    });
}

/// Runs the child for about `run_for`, kills it with SIGKILL, and returns what it printed.
fn run_child_until_killed(dir: &Path, run_for: Duration, round: u64) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_appender",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_VAR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut opened = false;
    let mut lines = Vec::new();
    while started.elapsed() < run_for || !opened {
        match lines_rx.recv_timeout(Duration::from_millis(5)) {
            Ok(line) => {
                // The harness prints "test child_appender ... " with no newline first.
                opened |= line.contains("opened ");
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("child exited early (round {round}): {lines:?}")
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "child never opened the log"
        );
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(lines_rx.try_iter());
    lines
}

#[test]
fn kill9_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("kill9 seed {seed}");
    let mut rng = seed | 1;
    let mut highest_acknowledged = 0;
    let mut acknowledged_count = 0;
    for round in 0..ROUNDS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_for = Duration::from_millis(20 + rng % 200);
        for line in run_child_until_killed(dir.path(), run_for, round) {
            if let Some(seq) = line.strip_prefix("ack ") {
                highest_acknowledged = highest_acknowledged.max(seq.parse().unwrap());
                acknowledged_count += 1;
            }
        }
        let (wal, _) = Wal::open(dir.path(), child_options()).unwrap();
        let records = read_all(&wal);
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.seq, i as u64 + 1, "gap or reorder (seed {seed})");
            assert_eq!(record.payload, payload_for(record.seq, 0), "seed {seed}");
        }
        let last = records.last().map_or(0, |r| r.seq);
        assert!(
            highest_acknowledged <= last,
            "acknowledged {highest_acknowledged} lost, log ends at {last} (seed {seed})"
        );
    }
    println!("{acknowledged_count} acknowledged appends over {ROUNDS} kills");
    assert!(
        acknowledged_count > 100,
        "the child acknowledged too little to mean anything"
    );
}
