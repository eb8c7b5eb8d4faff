//! [`MessageCache`]: recently logged messages kept in memory, bounded in bytes, so that delivery
//! to connected subscribers does not read the log back. A miss is not an error: the message is
//! read from the write-ahead log.

use crate::message::Message;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug)]
pub struct MessageCache {
    /// Each message with the bytes it keeps alive.
    messages: BTreeMap<u64, (Arc<Message>, usize)>,
    bytes: usize,
    bytes_max: usize,
}

impl MessageCache {
    #[must_use]
    pub fn new(bytes_max: usize) -> MessageCache {
        MessageCache {
            messages: BTreeMap::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// Keeps a message that holds `bytes` alive (a message decoded from a record shares the
    /// record's buffer, targets included), evicting the oldest ones beyond the byte bound.
    pub fn insert(&mut self, seq: u64, message: Arc<Message>, bytes: usize) {
        self.bytes += bytes;
        if let Some((_, old)) = self.messages.insert(seq, (message, bytes)) {
            self.bytes -= old;
        }
        while self.bytes > self.bytes_max {
            let Some((_, (_, evicted))) = self.messages.pop_first() else {
                break;
            };
            self.bytes -= evicted;
        }
    }

    #[must_use]
    pub fn get(&self, seq: u64) -> Option<Arc<Message>> {
        self.messages
            .get(&seq)
            .map(|(message, _)| Arc::clone(message))
    }
}
