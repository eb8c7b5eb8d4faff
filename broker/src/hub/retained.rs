//! [`RetainedMessages`]: the last retained message of each topic.
//!
//! A retained PUBLISH is acknowledged once its record is durable in the log, like any other; the
//! log is what makes it durable. This map is a view of the log, mirrored in the metadata store
//! together with a checkpoint (`RETAINED_CHECKPOINT`): every retained change in records up to
//! the checkpoint is in the store. The hub commits both once a second; after a restart it loads
//! the store and replays the log from the checkpoint, and retention keeps the records after it.

use crate::delivery::record::PublishRecord;
use crate::hub::StartError;
use crate::limits::{RETAINED_BYTES_MAX, RETAINED_MESSAGES_MAX};
use crate::message::Message;
use crate::routing::topic;
use spool_storage::Meta;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The checkpoint of the retained messages in the metadata store.
pub const RETAINED_CHECKPOINT: &str = "retained";

/// The retained messages; see the module documentation.
#[derive(Debug, Default)]
pub struct RetainedMessages {
    by_topic: BTreeMap<String, Arc<Message>>,
    bytes: usize,
    /// How many of them have an expiry: with none, nothing needs scanning for expiry.
    expiring: usize,
    /// Changes not yet in the metadata store: a message to store, or `None` to remove.
    uncommitted: BTreeMap<String, Option<Arc<Message>>>,
    /// Every retained change in records up to here is in the metadata store.
    checkpoint: u64,
    /// Retained messages refused because the limits were reached.
    pub refused: u64,
}

impl RetainedMessages {
    /// The retained messages of the metadata store.
    ///
    /// # Errors
    /// An unreadable store, or a stored message that does not decode.
    pub fn load(meta: &Meta) -> Result<RetainedMessages, StartError> {
        let checkpoint = meta.checkpoint(RETAINED_CHECKPOINT)?.unwrap_or(0);
        let mut retained = RetainedMessages {
            checkpoint,
            ..RetainedMessages::default()
        };
        for (topic, bytes) in meta.state(spool_storage::StateTable::Retained)? {
            let record = PublishRecord::decode(bytes.into()).map_err(|source| {
                StartError::CorruptRetained {
                    topic: topic.clone(),
                    source,
                }
            })?;
            retained.insert(topic, Arc::new(record.message));
        }
        Ok(retained)
    }

    /// Where the log must be replayed from to rebuild what the store lacks.
    #[must_use]
    pub fn replay_from(&self) -> u64 {
        self.checkpoint + 1
    }

    /// The checkpoint as committed: retention must keep every record after it.
    #[must_use]
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Applies the retained publish logged at `seq`: an empty payload removes the topic's
    /// retained message, anything else replaces it. Records the store already reflects are
    /// skipped (replay after a restart).
    pub fn apply(&mut self, seq: u64, message: &Arc<Message>) {
        debug_assert!(message.retain);
        if seq <= self.checkpoint {
            return;
        }
        let topic = &message.topic;
        // The topic's older message is not current any more, whatever happens to this one.
        let had_previous = self.remove(topic);
        if message.payload.is_empty() {
            if had_previous {
                self.uncommitted.insert(topic.clone(), None);
            }
            return;
        }
        let full = self.by_topic.len() >= RETAINED_MESSAGES_MAX
            || self.bytes + message.size_bytes() > RETAINED_BYTES_MAX;
        if full {
            if had_previous {
                self.uncommitted.insert(topic.clone(), None);
            }
            self.refused += 1;
            tracing::warn!(topic = %topic, "retained message refused: the retained-message limits are reached");
            return;
        }
        self.insert(topic.clone(), Arc::clone(message));
        self.uncommitted
            .insert(topic.clone(), Some(Arc::clone(message)));
    }

    fn insert(&mut self, topic: String, message: Arc<Message>) {
        self.bytes += message.size_bytes();
        self.expiring += usize::from(message.properties.expires_at_ms.is_some());
        if let Some(replaced) = self.by_topic.insert(topic, message) {
            self.forget(&replaced);
        }
    }

    /// Removes a topic's message; false if it had none.
    fn remove(&mut self, topic: &str) -> bool {
        match self.by_topic.remove(topic) {
            Some(message) => {
                self.forget(&message);
                true
            }
            None => false,
        }
    }

    fn forget(&mut self, message: &Message) {
        self.bytes -= message.size_bytes();
        self.expiring -= usize::from(message.properties.expires_at_ms.is_some());
    }

    /// The unexpired retained messages whose topics match `filter`. Only topics that start
    /// with the filter's levels before its first wildcard are looked at (all of them for a
    /// filter such as `#` or `+/x`).
    #[must_use]
    pub fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        let prefix = literal_prefix(filter);
        self.by_topic
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, message)| topic::matches(filter, topic) && !message.is_expired(now_ms))
            .map(|(_, message)| Arc::clone(message))
            .collect()
    }

    /// Takes the uncommitted changes, to commit; give them back with `restore` if that fails.
    pub fn take_changes(&mut self) -> BTreeMap<String, Option<Arc<Message>>> {
        std::mem::take(&mut self.uncommitted)
    }

    /// Gives back changes whose commit failed, under any made since.
    pub fn restore(&mut self, changes: BTreeMap<String, Option<Arc<Message>>>) {
        for (topic, change) in changes {
            self.uncommitted.entry(topic).or_insert(change);
        }
    }

    #[must_use]
    pub fn has_uncommitted(&self) -> bool {
        !self.uncommitted.is_empty()
    }

    /// Changes taken before were committed with the checkpoint `read_through`.
    pub fn committed(&mut self, read_through: u64) {
        self.checkpoint = self.checkpoint.max(read_through);
    }

    /// Drops expired messages (a removal the store learns with the next commit).
    pub fn expire(&mut self, now_ms: u64) {
        if self.expiring == 0 {
            return;
        }
        let expired: Vec<String> = self
            .by_topic
            .iter()
            .filter(|(_, message)| message.is_expired(now_ms))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in expired {
            if self.remove(&topic) {
                self.uncommitted.insert(topic, None);
            }
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}

/// What every topic matching `filter` starts with: the part before its first wildcard level
/// (`a/b/` for `a/b/+/c`; `a` for `a/#`, which also matches `a` itself), or the whole filter.
fn literal_prefix(filter: &str) -> &str {
    let mut end = 0;
    for level in filter.split('/') {
        match level {
            "+" => return &filter[..end],
            "#" => return &filter[..end.saturating_sub(1)],
            _ => end = (end + level.len() + 1).min(filter.len()),
        }
    }
    filter
}

/// A retained message as stored: a publish record without targets.
pub(super) fn encode(message: &Message) -> Vec<u8> {
    PublishRecord::of_spool(message.clone(), Vec::new())
        .encode()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Goal: looking only at topics with the filter's literal prefix finds exactly what a
        /// scan of every topic finds.
        #[test]
        fn prefix_lookup_finds_what_a_full_scan_finds(
            topics in proptest::collection::btree_set("[ab$]{0,2}(/[ab]{0,2}){0,3}", 0..30),
            filter in "([ab]{0,2}|\\+)(/([ab]{0,2}|\\+)){0,3}(/#)?|#",
        ) {
            let mut retained = RetainedMessages::default();
            for (seq, topic) in topics.iter().enumerate() {
                let message = Arc::new(Message {
                    topic: topic.clone(),
                    payload: bytes::Bytes::from_static(b"x"),
                    qos: crate::message::QoS::AtMostOnce,
                    retain: true,
                    properties: crate::message::MessageProperties::default(),
                });
                retained.apply(seq as u64 + 1, &message);
            }
            let found: Vec<String> =
                retained.matching(&filter, 0).iter().map(|m| m.topic.clone()).collect();
            let scanned: Vec<String> =
                topics.iter().filter(|t| topic::matches(&filter, t)).cloned().collect();
            prop_assert_eq!(found, scanned);
        }
    }
}
