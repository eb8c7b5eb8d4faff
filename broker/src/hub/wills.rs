//! Wills: published when a connection ends without a normal DISCONNECT, at once or after their
//! delay.

use super::Hub;
use super::appends::{Metering, OwnAppend};
use crate::delivery::record::KIND_PUBLISH;
use crate::message::{Will, expires_at_ms};
use crate::session::Session;
use std::time::{Duration, Instant};

impl Hub {
    /// A connection ended without a normal DISCONNECT: its will is published at once, or after
    /// its delay (capped by the session's expiry) if the session stays detached that long, or
    /// never if the session was already resumed by a newer connection (MQTT 5 §3.1.2.5).
    pub(super) fn will_due(&mut self, id: u64, attached: bool, will: Box<Will>) {
        let delay = Duration::from_secs(u64::from(will.delay_secs));
        match self.sessions.get_mut(&id) {
            Some(session) if !delay.is_zero() && attached && !session.expiry.is_zero() => {
                session.await_will(will, self.clock.now() + delay.min(session.expiry));
            }
            Some(_) if !delay.is_zero() && !attached => {}
            Some(_) | None => self.publish_will(id, *will),
        }
    }

    pub(super) fn publish_due_wills(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.will_is_due(now))
            .map(|s| s.id)
            .collect();
        for id in due {
            let will = self.sessions.get_mut(&id).and_then(Session::cancel_will);
            if let Some(will) = will {
                self.publish_will(id, *will);
            }
        }
    }

    /// Routes and logs a will like any publish from its session. The hub does not wait for
    /// the log: a task does, and a will that cannot be logged (quota) is lost with a log line,
    /// as there is no client left to hold back.
    pub(super) fn publish_will(&mut self, publisher: u64, will: Will) {
        let mut message = will.message;
        message.properties.expires_at_ms =
            expires_at_ms(self.clock.unix_ms(), will.expiry_interval_secs);
        tracing::info!(topic = %message.topic, "publishing a will");
        let record = self.subscriptions.record(message, publisher).encode();
        self.append_own(OwnAppend {
            kind: KIND_PUBLISH,
            payload: record,
            metering: Metering::Quota,
            what: "a will",
        });
    }
}
