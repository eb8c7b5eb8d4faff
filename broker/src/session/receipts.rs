//! [`Qos2Receipts`]: the packet ids of QoS 2 publishes a session's client sent that are in the
//! log and not yet released (PUBREL). A PUBLISH resent with one of them is answered with
//! PUBREC and not logged again, so a message is delivered once however often the client resends
//! it (MQTT §4.3.3).
//!
//! The session (in the hub) and its connection share the receipts behind a mutex. A connection
//! decides "new or resent" and takes the record's sequence number in one step under the lock
//! (`Wal::reserve`, then `Reservation::submit`), so the log holds the publish and release
//! records in the order the receipts changed. Only the connection the session is attached to
//! may change them (`owner`, set by the hub on CONNECT): a taken-over connection still
//! finishing a publish cannot log a packet id its successor already released, which would
//! leave a receipt the client does not know of and make it drop its next message with that id.
//!
//! They survive a restart: once a second the hub stores each persistent session's receipts with
//! a checkpoint, and a restart replays the publish and release records after it.
//!
//! ```text
//! version u8 (1) | count u16 of (packet_id u16 | seq u64)
//! ```

use crate::encoding::{FormatError, decode_versioned, take_u16, take_u64};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const VERSION: u8 = 1;

/// One session's unreleased QoS 2 packet ids, each with the sequence number of its publish
/// record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qos2Receipts {
    logged: BTreeMap<u16, u64>,
    /// The connection allowed to change them; not stored.
    owner: u64,
}

/// The receipts as a session and its connection share them.
pub type SharedReceipts = Arc<Mutex<Qos2Receipts>>;

/// Locks shared receipts; a panic elsewhere cannot leave them half-changed (every change is
/// one map operation), so a poisoned lock is still usable.
pub fn lock(receipts: &SharedReceipts) -> MutexGuard<'_, Qos2Receipts> {
    receipts.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Qos2Receipts {
    /// Hands the receipts to a newly attached connection.
    pub fn set_owner(&mut self, connection: u64) {
        self.owner = connection;
    }

    #[must_use]
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// The sequence number of the record that logged `packet_id`, if it is unreleased.
    #[must_use]
    pub fn get(&self, packet_id: u16) -> Option<u64> {
        self.logged.get(&packet_id).copied()
    }

    /// Records that the publish with `packet_id` was logged at `seq`.
    pub fn insert(&mut self, packet_id: u16, seq: u64) {
        self.logged.insert(packet_id, seq);
    }

    /// The client released `packet_id`; false if it was not held.
    pub fn release(&mut self, packet_id: u16) -> bool {
        self.logged.remove(&packet_id).is_some()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.logged.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.logged.is_empty()
    }

    /// The receipts whose publish record is at or before `seq`: what a checkpoint at `seq`
    /// stores. Later ones come back by replaying the log after the checkpoint.
    #[must_use]
    pub fn through(&self, seq: u64) -> Qos2Receipts {
        Qos2Receipts {
            logged: self
                .logged
                .iter()
                .filter(|&(_, &logged_at)| logged_at <= seq)
                .map(|(&id, &at)| (id, at))
                .collect(),
            owner: self.owner,
        }
    }

    /// # Panics
    /// Never: there are at most 65535 packet ids.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(3 + 10 * self.logged.len());
        out.put_u8(VERSION);
        out.put_u16_le(u16::try_from(self.logged.len()).expect("packet ids are u16"));
        for (&packet_id, &seq) in &self.logged {
            out.put_u16_le(packet_id);
            out.put_u64_le(seq);
        }
        out.to_vec()
    }

    /// # Errors
    /// `FormatError` for anything that is not well-formed stored receipts.
    pub fn decode(bytes: &[u8]) -> Result<Qos2Receipts, FormatError> {
        decode_versioned(Bytes::copy_from_slice(bytes), VERSION, |bytes| {
            let count = take_u16(bytes)?;
            let mut logged = BTreeMap::new();
            for _ in 0..count {
                let packet_id = take_u16(bytes)?;
                logged.insert(packet_id, take_u64(bytes)?);
            }
            Ok(Qos2Receipts { logged, owner: 0 })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn receipts_round_trip_and_damage_never_panics(
            logged in proptest::collection::btree_map(1u16.., any::<u64>(), 0..20),
            cut: prop::sample::Index,
            flip: prop::sample::Index,
        ) {
            let receipts = Qos2Receipts { logged, owner: 0 };
            let bytes = receipts.encode();
            prop_assert_eq!(Qos2Receipts::decode(&bytes).unwrap(), receipts);
            prop_assert!(Qos2Receipts::decode(&bytes[..cut.index(bytes.len())]).is_err());
            let mut altered = bytes.clone();
            let at = flip.index(altered.len());
            altered[at] ^= 0xff;
            let _ = Qos2Receipts::decode(&altered);
        }
    }

    #[test]
    fn a_checkpoint_keeps_only_receipts_logged_up_to_it() {
        let mut receipts = Qos2Receipts::default();
        receipts.insert(7, 10);
        receipts.insert(8, 12);
        assert!(receipts.release(7) && !receipts.release(7));
        receipts.insert(9, 11);
        let stored = receipts.through(11);
        assert_eq!((stored.get(9), stored.get(8)), (Some(11), None));
    }
}
