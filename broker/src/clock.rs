//! [`Clock`]: the hub's only source of time, so tests (and a simulation) can move it.
//!
//! The hub reads two clocks: a monotonic one for session expiry and will delays, and the wall
//! clock for message expiry, which travels in records as milliseconds since the Unix epoch.
//! [`SystemClock`] reads the real ones; [`ManualClock`] moves only when told, so an hour of
//! will delay passes in a test without waiting for it.

use crate::message::now_ms;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the hub reads the time.
pub trait Clock: Debug + Send + Sync {
    /// Monotonic time: session expiry and will delays.
    fn now(&self) -> Instant;
    /// Milliseconds since the Unix epoch: message expiry.
    fn unix_ms(&self) -> u64;
}

/// The machine's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> u64 {
        now_ms()
    }
}

/// A clock that stands still until [`ManualClock::advance`] moves both of its readings.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_unix_ms: u64,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock that reads the machine's time now, and keeps reading it until advanced.
    #[must_use]
    pub fn new() -> ManualClock {
        ManualClock {
            start: Instant::now(),
            start_unix_ms: now_ms(),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut elapsed = self
            .elapsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *elapsed += by;
    }

    fn elapsed(&self) -> Duration {
        *self
            .elapsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn unix_ms(&self) -> u64 {
        let elapsed_ms = u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.start_unix_ms.saturating_add(elapsed_ms)
    }
}
