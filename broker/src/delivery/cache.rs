//! [`MessageCache`]: recently logged or read messages kept in memory, bounded in bytes, so that
//! delivery does not read the log back. A miss is not an error: the message is read from the
//! write-ahead log off the hub task (`hub::loads`) and cached. What was cached first goes first,
//! whatever its sequence number: a message read back for a queue far behind is about to be
//! sent, so it must outlive the newer messages that arrive meanwhile.

use crate::id_hash::IdMap;
use crate::message::Message;
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug)]
pub struct MessageCache {
    /// Each message with the bytes it keeps alive and when it was cached.
    messages: IdMap<u64, Cached>,
    /// Sequence numbers in the order cached, with when: an entry whose message was cached
    /// again since is stale and skipped.
    order: VecDeque<(u64, u64)>,
    /// Counts insertions: when each one happened.
    inserted: u64,
    bytes: usize,
    bytes_max: usize,
}

#[derive(Debug)]
struct Cached {
    message: Arc<Message>,
    bytes: usize,
    inserted: u64,
}

impl MessageCache {
    #[must_use]
    pub fn new(bytes_max: usize) -> MessageCache {
        MessageCache {
            messages: IdMap::default(),
            order: VecDeque::new(),
            inserted: 0,
            bytes: 0,
            bytes_max,
        }
    }

    /// Keeps a message that holds `bytes` alive (a message decoded from a record shares the
    /// record's buffer, targets included), evicting the first cached beyond the byte bound
    /// (never this one).
    pub fn insert(&mut self, seq: u64, message: Arc<Message>, bytes: usize) {
        self.inserted += 1;
        let inserted = self.inserted;
        self.bytes += bytes;
        let cached = Cached {
            message,
            bytes,
            inserted,
        };
        if let Some(old) = self.messages.insert(seq, cached) {
            self.bytes -= old.bytes;
        }
        self.order.push_back((seq, inserted));
        // The message just cached stays, even alone above the bound: it is about to be sent,
        // and evicting it would have it read again and again.
        while self.bytes > self.bytes_max && self.order.len() > 1 {
            let Some((seq, inserted)) = self.order.pop_front() else {
                break;
            };
            if self
                .messages
                .get(&seq)
                .is_some_and(|c| c.inserted == inserted)
            {
                let evicted = self.messages.remove(&seq).expect("looked up");
                self.bytes -= evicted.bytes;
            }
        }
        // Stale entries (messages cached again) are bounded by the live ones: compact when
        // they outnumber them.
        if self.order.len() > 2 * self.messages.len() + 64 {
            let messages = &self.messages;
            self.order.retain(|(seq, inserted)| {
                messages.get(seq).is_some_and(|c| c.inserted == *inserted)
            });
        }
    }

    #[must_use]
    pub fn get(&self, seq: u64) -> Option<Arc<Message>> {
        self.messages.get(&seq).map(|c| Arc::clone(&c.message))
    }

    #[must_use]
    pub fn contains(&self, seq: u64) -> bool {
        self.messages.contains_key(&seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageProperties, QoS};
    use bytes::Bytes;

    fn message() -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::new(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: MessageProperties::default(),
        })
    }

    /// Goal: the cache stays within its bytes, and an old message read back outlives newer
    /// ones cached before it.
    #[test]
    fn the_first_cached_goes_first_whatever_its_sequence() {
        let mut cache = MessageCache::new(300);
        for seq in 10..13 {
            cache.insert(seq, message(), 100);
        }
        cache.insert(1, message(), 100); // read back for a queue far behind
        assert!(cache.contains(1), "just cached");
        assert!(!cache.contains(10), "the first cached went");
        assert!(cache.contains(11) && cache.contains(12));
        for _ in 0..1000 {
            cache.insert(12, message(), 100); // cached again and again
        }
        assert!(cache.contains(1) && cache.contains(11) && cache.contains(12));
        assert!(
            cache.order.len() <= 2 * cache.messages.len() + 64,
            "stale entries bounded"
        );
        assert_eq!(cache.bytes, 300);
        cache.insert(2, message(), 1000); // larger than the whole cache
        assert!(cache.contains(2), "the message just cached stays");
        assert_eq!(cache.bytes, 1000);
    }
}
