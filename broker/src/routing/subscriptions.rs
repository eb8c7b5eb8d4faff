//! [`SubscriptionTable`]: every session's subscriptions, and the routing of a published topic to
//! the sessions whose filters match it.
//!
//! The hub is the only writer; connection tasks read it to route each publish before it is
//! logged, so that the routing decision is part of the durable record.

use crate::delivery::record::PublishRecord;
use crate::message::{Message, QoS};
use std::collections::BTreeMap;

pub use crate::delivery::record::Target;

/// MQTT 5 subscription options (3.1.1 subscriptions use the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// The highest QoS the subscriber wants.
    pub qos: QoS,
    /// Do not deliver the session's own publishes back to it.
    pub no_local: bool,
    /// Keep the publisher's retain flag on delivery.
    pub retain_as_published: bool,
    /// The subscription identifier to send with each matching message.
    pub subscription_id: Option<u32>,
    /// When the retained messages matching the filter are sent.
    pub retain_handling: RetainHandling,
}

/// MQTT 5 retain handling: when a subscription receives the retained messages that match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// Whenever the subscription is made (3.1.1 behaviour).
    #[default]
    AtSubscribe,
    /// Only when the subscription did not exist before.
    AtNewSubscribe,
    /// Never.
    Never,
}

impl RetainHandling {
    /// The wire value (0, 1 or 2).
    #[must_use]
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The retain handling for a wire value, if valid.
    #[must_use]
    pub fn from_u8(value: u8) -> Option<RetainHandling> {
        match value {
            0 => Some(RetainHandling::AtSubscribe),
            1 => Some(RetainHandling::AtNewSubscribe),
            2 => Some(RetainHandling::Never),
            _ => None,
        }
    }
}

/// Subscriptions by filter, then by session.
#[derive(Debug, Default)]
pub struct SubscriptionTable {
    by_filter: BTreeMap<String, BTreeMap<u64, SubscriptionOptions>>,
}

impl SubscriptionTable {
    /// Adds or replaces a subscription; true if it replaced one.
    pub fn subscribe(&mut self, session: u64, filter: &str, options: SubscriptionOptions) -> bool {
        self.by_filter
            .entry(filter.to_string())
            .or_default()
            .insert(session, options)
            .is_some()
    }

    /// Removes a subscription; true if it existed.
    pub fn unsubscribe(&mut self, session: u64, filter: &str) -> bool {
        let Some(sessions) = self.by_filter.get_mut(filter) else {
            return false;
        };
        let existed = sessions.remove(&session).is_some();
        if sessions.is_empty() {
            self.by_filter.remove(filter);
        }
        existed
    }

    /// The log record of a publish: the message with its routing decision.
    #[must_use]
    pub fn record(&self, message: Message, publisher: u64) -> PublishRecord {
        let targets = self.route(&message.topic, publisher, message.qos);
        PublishRecord {
            message,
            publisher,
            qos2_packet_id: None,
            retained_copy: false,
            targets,
        }
    }

    /// Removes every subscription of a session.
    pub fn remove_session(&mut self, session: u64) {
        self.by_filter.retain(|_, sessions| {
            sessions.remove(&session);
            !sessions.is_empty()
        });
    }

    /// The sessions a message published on `topic` by `publisher` goes to. A session with
    /// several matching subscriptions gets the message once, at the highest of their QoS, with
    /// every subscription identifier (MQTT 5 §3.3.4).
    #[must_use]
    pub fn route(&self, topic: &str, publisher: u64, qos: QoS) -> Vec<Target> {
        let mut targets: BTreeMap<u64, Target> = BTreeMap::new();
        for (filter, sessions) in &self.by_filter {
            if !super::topic::matches(filter, topic) {
                continue;
            }
            for (&session, options) in sessions {
                if options.no_local && session == publisher {
                    continue;
                }
                let target = targets.entry(session).or_insert(Target {
                    session,
                    qos: QoS::AtMostOnce,
                    retain_as_published: false,
                    subscription_ids: Vec::new(),
                });
                target.qos = target.qos.max(options.qos.min(qos));
                target.retain_as_published |= options.retain_as_published;
                target.subscription_ids.extend(options.subscription_id);
            }
        }
        targets.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
            retain_handling: RetainHandling::AtSubscribe,
        }
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
        let mut table = SubscriptionTable::default();
        table.subscribe(1, "a/#", options(QoS::AtMostOnce));
        table.subscribe(
            1,
            "a/b",
            SubscriptionOptions {
                subscription_id: Some(7),
                ..options(QoS::AtLeastOnce)
            },
        );
        table.subscribe(2, "a/+", options(QoS::AtLeastOnce));
        let targets = table.route("a/b", 9, QoS::AtLeastOnce);
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].qos, QoS::AtLeastOnce);
        assert_eq!(targets[0].subscription_ids, vec![7]);
        let downgraded = table.route("a/b", 9, QoS::AtMostOnce);
        assert!(downgraded.iter().all(|t| t.qos == QoS::AtMostOnce));
    }

    #[test]
    fn no_local_skips_the_publisher_and_unsubscribe_removes() {
        let mut table = SubscriptionTable::default();
        table.subscribe(
            1,
            "t",
            SubscriptionOptions {
                no_local: true,
                ..options(QoS::AtLeastOnce)
            },
        );
        assert!(table.route("t", 1, QoS::AtLeastOnce).is_empty());
        assert_eq!(table.route("t", 2, QoS::AtLeastOnce).len(), 1);
        assert!(table.unsubscribe(1, "t"));
        assert!(!table.unsubscribe(1, "t"));
        assert!(table.route("t", 2, QoS::AtLeastOnce).is_empty());
    }
}
