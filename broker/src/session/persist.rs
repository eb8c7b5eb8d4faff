//! What of a persistent session is kept in the metadata store: its id, expiry, the point in the
//! log its queue starts after, and its subscriptions. Queue contents are not stored: recovery
//! rebuilds them from the log (each publish record names its target sessions), from the
//! session's checkpoint onwards.
//!
//! ```text
//! version u8 (1) | id u64 | expiry_secs u64 | replay_floor u64
//! subscriptions u32 count of (filter str16
//!                             | options u8 (qos:2 | no_local:1 | rap:1 | retain_handling:2)
//!                             | subscription_id u32, 0 = none)
//! ```

use crate::encoding::{
    FormatError, decode_versioned, put_str16, take_str16, take_u8, take_u32, take_u64,
};
use crate::message::QoS;
use crate::routing::{RetainHandling, SubscriptionOptions};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::BTreeMap;

const VERSION: u8 = 1;

/// A persistent session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedSession {
    pub id: u64,
    pub expiry_secs: u64,
    /// Records up to this sequence number were never meant for this session's queue.
    pub replay_floor: u64,
    pub subscriptions: BTreeMap<String, SubscriptionOptions>,
}

impl PersistedSession {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(VERSION);
        out.put_u64_le(self.id);
        out.put_u64_le(self.expiry_secs);
        out.put_u64_le(self.replay_floor);
        out.put_u32_le(u32::try_from(self.subscriptions.len()).expect("subscriptions fit in u32"));
        for (filter, options) in &self.subscriptions {
            put_str16(&mut out, filter);
            out.put_u8(
                options.qos as u8
                    | u8::from(options.no_local) << 2
                    | u8::from(options.retain_as_published) << 3
                    | options.retain_handling.to_u8() << 4,
            );
            out.put_u32_le(options.subscription_id.unwrap_or(0));
        }
        out.to_vec()
    }

    /// # Errors
    /// `FormatError` for anything that is not a well-formed stored session.
    pub fn decode(bytes: &[u8]) -> Result<PersistedSession, FormatError> {
        decode_versioned(Bytes::copy_from_slice(bytes), VERSION, |bytes| {
            let id = take_u64(bytes)?;
            let expiry_secs = take_u64(bytes)?;
            let replay_floor = take_u64(bytes)?;
            let count = take_u32(bytes)?;
            let mut subscriptions = BTreeMap::new();
            for _ in 0..count {
                let filter = take_str16(bytes)?;
                let flags = take_u8(bytes)?;
                let qos = QoS::from_u8(flags & 0b11).ok_or(FormatError::QoS(flags & 0b11))?;
                let retain_handling = RetainHandling::from_u8((flags >> 4) & 0b11)
                    .ok_or(FormatError::Flags(flags))?;
                let subscription_id = Some(take_u32(bytes)?).filter(|&id| id != 0);
                let options = SubscriptionOptions {
                    qos,
                    no_local: flags & 0b100 != 0,
                    retain_as_published: flags & 0b1000 != 0,
                    subscription_id,
                    retain_handling,
                };
                subscriptions.insert(filter, options);
            }
            Ok(PersistedSession {
                id,
                expiry_secs,
                replay_floor,
                subscriptions,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sessions_round_trip_and_damage_never_panics(
            id: u64,
            expiry_secs: u64,
            replay_floor: u64,
            filters in proptest::collection::btree_map("[a-z/+#]{1,12}", (0u8..2, any::<bool>(), any::<bool>(), proptest::option::of(1u32..), 0u8..3), 0..5),
            cut: prop::sample::Index,
        ) {
            let subscriptions = filters
                .into_iter()
                .map(|(filter, (qos, no_local, rap, id, handling))| {
                    let options = SubscriptionOptions {
                        qos: QoS::from_u8(qos).unwrap(),
                        no_local,
                        retain_as_published: rap,
                        subscription_id: id,
                        retain_handling: RetainHandling::from_u8(handling).unwrap(),
                    };
                    (filter, options)
                })
                .collect();
            let session = PersistedSession { id, expiry_secs, replay_floor, subscriptions };
            let bytes = session.encode();
            prop_assert_eq!(PersistedSession::decode(&bytes).unwrap(), session);
            prop_assert!(PersistedSession::decode(&bytes[..cut.index(bytes.len())]).is_err());
        }
    }
}
