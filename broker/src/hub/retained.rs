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
            retained.bytes += record.message.size_bytes();
            retained.by_topic.insert(topic, Arc::new(record.message));
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
        let previous = self.by_topic.get(topic).map_or(0, |m| m.size_bytes());
        if message.payload.is_empty() {
            if self.by_topic.remove(topic).is_some() {
                self.bytes -= previous;
                self.uncommitted.insert(topic.clone(), None);
            }
            return;
        }
        let grows_count = previous == 0 && self.by_topic.len() >= RETAINED_MESSAGES_MAX;
        let bytes = self.bytes - previous + message.size_bytes();
        if grows_count || bytes > RETAINED_BYTES_MAX {
            // The topic's older message is not current any more: it goes too.
            if self.by_topic.remove(topic).is_some() {
                self.bytes -= previous;
                self.uncommitted.insert(topic.clone(), None);
            }
            self.refused += 1;
            tracing::warn!(topic = %topic, "retained message refused: the retained-message limits are reached");
            return;
        }
        self.bytes = bytes;
        self.by_topic.insert(topic.clone(), Arc::clone(message));
        self.uncommitted
            .insert(topic.clone(), Some(Arc::clone(message)));
    }

    /// The unexpired retained messages whose topics match `filter`.
    #[must_use]
    pub fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        self.by_topic
            .iter()
            .filter(|(topic, message)| topic::matches(filter, topic) && !message.is_expired(now_ms))
            .map(|(_, message)| Arc::clone(message))
            .collect()
    }

    /// The uncommitted changes, encoded for the metadata store.
    #[must_use]
    pub fn changes(&self) -> Vec<(String, Option<Vec<u8>>)> {
        self.uncommitted
            .iter()
            .map(|(topic, message)| (topic.clone(), message.as_ref().map(|m| encode(m))))
            .collect()
    }

    #[must_use]
    pub fn has_uncommitted(&self) -> bool {
        !self.uncommitted.is_empty()
    }

    /// The changes were committed with the checkpoint `read_through`.
    pub fn committed(&mut self, read_through: u64) {
        self.uncommitted.clear();
        self.checkpoint = self.checkpoint.max(read_through);
    }

    /// Drops expired messages (a removal the store learns with the next commit).
    pub fn expire(&mut self, now_ms: u64) {
        let expired: Vec<String> = self
            .by_topic
            .iter()
            .filter(|(_, message)| message.is_expired(now_ms))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in expired {
            if let Some(message) = self.by_topic.remove(&topic) {
                self.bytes -= message.size_bytes();
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

/// A retained message as stored: a publish record without targets.
fn encode(message: &Message) -> Vec<u8> {
    PublishRecord {
        message: message.clone(),
        publisher: 0,
        qos2_packet_id: None,
        targets: Vec::new(),
    }
    .encode()
    .to_vec()
}
