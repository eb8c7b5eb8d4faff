//! [`SubscriptionTable`]: every session's subscriptions, and the routing of a published topic to
//! the sessions whose filters match it; [`Router`], the snapshot of it that publishers read.
//!
//! The hub is the only writer; connection tasks read the snapshot to route each publish before
//! it is logged, so that the routing decision is part of the durable record.

use crate::delivery::record::{PublishRecord, QueueId};
use crate::limits::{TARGETS_BYTES_MAX, TARGETS_PER_MESSAGE_MAX};
use crate::message::{Message, QoS};
use crate::routing::endpoints::EndpointRoutes;
use crate::routing::trie::FilterTrie;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

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

/// Every subscription, by filter level (see [`FilterTrie`]). Cloning it is O(1): the hub
/// changes its own copy and installs a clone in the [`Router`] for publishers to read.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionTable {
    filters: FilterTrie<SubscriptionOptions>,
    /// Sessions that did not get a message because its fan-out was over the limits
    /// (`fanout_limit`); shared by every clone, so it counts for the table's whole life.
    fanout_drops: Arc<AtomicU64>,
}

impl SubscriptionTable {
    /// Adds or replaces a subscription; true if it replaced one.
    pub fn subscribe(&mut self, session: u64, filter: &str, options: SubscriptionOptions) -> bool {
        self.filters.insert(filter, session, options).is_some()
    }

    /// Removes a subscription; true if it existed.
    pub fn unsubscribe(&mut self, session: u64, filter: &str) -> bool {
        self.filters.remove(filter, session).is_some()
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

    /// The sessions a message published on `topic` by `publisher` goes to. A session with
    /// several matching subscriptions gets the message once, at the highest of their QoS, with
    /// every subscription identifier (MQTT 5 §3.3.4).
    #[must_use]
    pub fn route(&self, topic: &str, publisher: u64, qos: QoS) -> Vec<Target> {
        let mut targets: BTreeMap<u64, Target> = BTreeMap::new();
        self.filters.for_each_match(topic, |session, options| {
            if options.no_local && session == publisher {
                return;
            }
            let target = targets.entry(session).or_insert(Target {
                queue: QueueId::Session(session),
                qos: QoS::AtMostOnce,
                retain_as_published: false,
                subscription_ids: Vec::new(),
                // MQTT subscriptions set no time to live of their own: the message's applies.
                deadline_ms: None,
            });
            target.qos = target.qos.max(options.qos.min(qos));
            target.retain_as_published |= options.retain_as_published;
            target.subscription_ids.extend(options.subscription_id);
        });
        let matched = targets.len();
        let kept = within_fanout_limits(targets.into_values());
        if kept.len() < matched {
            self.count_fanout_drops(topic, kept.len(), matched - kept.len());
        }
        kept
    }

    /// Sessions that missed a message because of the fan-out limits, since the table was made.
    #[must_use]
    pub fn fanout_drops(&self) -> u64 {
        self.fanout_drops.load(Ordering::Relaxed)
    }

    fn count_fanout_drops(&self, topic: &str, kept: usize, dropped: usize) {
        let before = self
            .fanout_drops
            .fetch_add(dropped as u64, Ordering::Relaxed);
        let total = before + dropped as u64;
        // Logged at the first drop and about every thousandth after it.
        if before == 0 || before / 1000 != total / 1000 {
            tracing::warn!(
                topic,
                kept,
                dropped,
                total,
                "message routed to more sessions than one record may name (fanout_limit): the \
                 newest sessions do not get it (`total` counts every such session since start)"
            );
        }
    }
}

/// The first targets, in session order (oldest sessions first), that fit the fan-out limits.
fn within_fanout_limits(targets: impl Iterator<Item = Target>) -> Vec<Target> {
    let mut bytes = 0;
    let mut kept = Vec::new();
    for target in targets {
        bytes += Target::ENCODED_BYTES_FIXED + 4 * target.subscription_ids.len();
        if kept.len() == TARGETS_PER_MESSAGE_MAX || bytes > TARGETS_BYTES_MAX {
            break;
        }
        kept.push(target);
    }
    kept
}

/// The routing tables publishers read: immutable snapshots, each replaced whole after a
/// change (subscriptions by the hub, routes when a deployment is applied), so routing a
/// publish never waits for a lock held while a table changes (only for the instant a pointer
/// is swapped).
#[derive(Debug, Default)]
pub struct Router {
    current: RwLock<Arc<SubscriptionTable>>,
    routes: RwLock<Arc<EndpointRoutes>>,
}

impl Router {
    /// The subscription table as last installed.
    #[must_use]
    pub fn snapshot(&self) -> Arc<SubscriptionTable> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `table` the one publishers route with from now on.
    pub fn install(&self, table: SubscriptionTable) {
        let table = Arc::new(table);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = table;
    }

    /// The deployment's routes as last installed.
    #[must_use]
    pub fn routes(&self) -> Arc<EndpointRoutes> {
        Arc::clone(&self.routes.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `routes` the ones telemetry is routed by from now on.
    pub fn install_routes(&self, routes: EndpointRoutes) {
        let routes = Arc::new(routes);
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = routes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{SUBSCRIPTIONS_PER_SESSION_MAX, record_payload_bytes_max};

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

    /// Goal: a fan-out past the target count limit reaches the oldest sessions, and the
    /// others are counted, not silently skipped.
    #[test]
    fn a_fanout_beyond_the_target_limit_drops_the_newest_sessions_and_counts_them() {
        let mut table = SubscriptionTable::default();
        let sessions = TARGETS_PER_MESSAGE_MAX as u64 + 3;
        for session in 1..=sessions {
            table.subscribe(session, "t", options(QoS::AtLeastOnce));
        }
        let snapshot = table.clone();
        let targets = snapshot.route("t", 0, QoS::AtLeastOnce);
        assert_eq!(targets.len(), TARGETS_PER_MESSAGE_MAX);
        assert_eq!(
            targets.last().map(|t| t.queue),
            Some(QueueId::Session(sessions - 3))
        );
        assert_eq!(table.fanout_drops(), 3, "clones share the count");
    }

    /// Goal: the largest packet routed to the widest fan-out (sessions with every one of their
    /// subscriptions matching, each with an identifier) still fits in one log record, so it
    /// is never refused as too large. Method: 300 sessions hold the 1,024 filters that match a
    /// ten-level topic (each level literal or `+`), then the record is encoded and measured.
    #[test]
    fn the_widest_fanout_of_the_largest_packet_fits_in_one_record() {
        let levels = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let topic = levels.join("/");
        let mut table = SubscriptionTable::default();
        for session in 1..=300 {
            for combination in 0..SUBSCRIPTIONS_PER_SESSION_MAX {
                let filter: Vec<&str> = (0..levels.len())
                    .map(|level| match combination >> level & 1 {
                        1 => "+",
                        _ => levels[level],
                    })
                    .collect();
                let options = SubscriptionOptions {
                    subscription_id: Some(u32::try_from(combination + 1).unwrap()),
                    ..options(QoS::AtLeastOnce)
                };
                table.subscribe(session, &filter.join("/"), options);
            }
        }
        let packet_size_max = 1 << 20;
        let message = Message {
            topic: topic.clone(),
            payload: bytes::Bytes::from(vec![0; packet_size_max as usize - 64]),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: crate::message::MessageProperties::default(),
        };
        let record = table.record(message, 0);
        assert!(table.fanout_drops() > 0, "the byte limit was reached");
        assert!(
            record
                .targets
                .iter()
                .all(|t| t.subscription_ids.len() == 1024)
        );
        let encoded = record.encode().len();
        assert!(encoded <= record_payload_bytes_max(packet_size_max) as usize);
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
