//! The broker's WAL records.
//!
//! A publish record holds the message and its routing decision (every queue it goes to, with
//! the deadline fixed for it there), written once whatever the fan-out. Recovery and live delivery both rebuild queues from
//! these records, so the format is versioned and its decoder refuses anything malformed with
//! an error, never a panic. A QoS 2 publish also names its packet id, and a release record
//! marks the PUBREL that frees it: replaying both rebuilds each session's QoS 2 receipts.
//! Towards subscribers, a received record marks a persistent session's PUBREC of a QoS 2
//! message: replaying it after a restart resends the PUBREL instead of the message.
//!
//! ```text
//! publish: version u8 (4) | flags u8 (qos:2 | retain:1 | utf8:1 | retained_copy:1) | publisher u64
//! qos2_packet_id u16 (0 = none; absent in version 1)
//! topic str16 | payload bytes32 | expires_at_ms u64 (0 = never)
//! content_type opt-str16 | response_topic opt-str16 | correlation opt-bytes16
//! user_properties u16 count of (str16, str16)
//! targets u32 count of (queue kind u8 (0 = MQTT session, 1 = endpoint) | queue u64
//!                       | options u8 (qos:2 | retain_as_published:1)
//!                       | deadline_ms u64 (0 = the message's expiry)
//!                       | subscription_ids u16 count of u32)
//!          (versions 1 and 2: session u64 | options u8 | subscription_ids, no deadline)
//! sender opt-str16 (the IoT Hub identity; absent before version 4)
//! release: version u8 (1) | session u64 | packet_id u16
//! received: version u8 (1) | session u64 | seq u64
//! ```

use crate::encoding::{
    decode_versioned, encode_versioned, put_optional_bytes16, put_optional_str16, put_str16,
    take_bytes, take_optional_bytes16, take_optional_str16, take_str16, take_u8, take_u16,
    take_u32, take_u64,
};
use crate::message::{Message, MessageProperties, QoS};
use bytes::{BufMut, Bytes, BytesMut};

/// WAL record kinds written by the broker.
pub const KIND_PUBLISH: u8 = 1;
pub const KIND_QOS2_RELEASE: u8 = 2;
pub const KIND_QOS2_RECEIVED: u8 = 3;

const VERSION: u8 = 4;
const RELEASE_VERSION: u8 = 1;
const RECEIVED_VERSION: u8 = 1;

/// A delivery queue, as records name it: a queue exists, fills and is replayed on its own, with
/// zero, one or more consumers. Queue numbers are never reused (an MQTT session's is its id).
///
/// Several consumers sharing one queue by key attach to the queue, not to a session (see
/// `reference/ordered-replicas.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueId {
    /// The queue of an MQTT session, fed by its subscriptions.
    Session(u64),
    /// An endpoint routes deliver to (a module input or `$upstream`, at a priority), fed by
    /// the deployment's routes; numbered in the metadata store (`routing::endpoints`).
    Endpoint(u64),
}

impl QueueId {
    fn encode(self, out: &mut BytesMut) {
        match self {
            QueueId::Session(id) => {
                out.put_u8(0);
                out.put_u64_le(id);
            }
            QueueId::Endpoint(id) => {
                out.put_u8(1);
                out.put_u64_le(id);
            }
        }
    }

    fn decode(bytes: &mut Bytes) -> Result<QueueId, RecordError> {
        match take_u8(bytes)? {
            0 => Ok(QueueId::Session(take_u64(bytes)?)),
            1 => Ok(QueueId::Endpoint(take_u64(bytes)?)),
            kind => Err(RecordError::QueueKind(kind)),
        }
    }
}

/// Where a message goes: one queue, with the delivery options of what routed it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub queue: QueueId,
    /// The QoS to deliver with: the lower of the publish and the subscription QoS.
    pub qos: QoS,
    pub retain_as_published: bool,
    pub subscription_ids: Vec<u32>,
    /// Wall-clock time (ms since the epoch) after which this queue drops the message, fixed
    /// when it was routed, if earlier than the message's own expiry: stored so that it means
    /// the same after a restart, on any node, and expiry never needs the message read back.
    pub deadline_ms: Option<u64>,
}

impl Target {
    /// Bytes of a target in a record besides its subscription ids (4 bytes each).
    pub const ENCODED_BYTES_FIXED: usize = 1 + 8 + 1 + 8 + 2;
}

/// A publish as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRecord {
    pub message: Message,
    /// The publishing session (0 for the hub itself).
    pub publisher: u64,
    /// The packet id of a QoS 2 publish from a client: the publisher's session holds it as
    /// received until the client releases it (PUBREL), and refuses to log it twice.
    pub qos2_packet_id: Option<u16>,
    /// A retained message sent to a new subscription of its one target: logged so that its
    /// delivery survives a crash like any other, delivered with RETAIN set, and not a change
    /// of the retained messages.
    pub retained_copy: bool,
    pub targets: Vec<Target>,
}

pub use crate::encoding::FormatError as RecordError;

impl PublishRecord {
    /// A record spool makes itself (publisher 0): `message` for the queues `targets` names.
    #[must_use]
    pub fn of_spool(message: Message, targets: Vec<Target>) -> PublishRecord {
        PublishRecord {
            message,
            publisher: 0,
            qos2_packet_id: None,
            retained_copy: false,
            targets,
        }
    }

    /// Encodes the record.
    ///
    /// # Panics
    /// If a field exceeds its length prefix (the codec's limits keep them far below).
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let message = &self.message;
        let properties = &message.properties;
        let mut out = BytesMut::with_capacity(message.size_bytes() + 16 * self.targets.len());
        out.put_u8(VERSION);
        let flags = message.qos as u8
            | u8::from(message.retain) << 2
            | u8::from(properties.payload_is_utf8) << 3
            | u8::from(self.retained_copy) << 4;
        out.put_u8(flags);
        out.put_u64_le(self.publisher);
        out.put_u16_le(self.qos2_packet_id.unwrap_or(0));
        put_str16(&mut out, &message.topic);
        out.put_u32_le(u32::try_from(message.payload.len()).expect("payload fits in u32"));
        out.put_slice(&message.payload);
        out.put_u64_le(properties.expires_at_ms.unwrap_or(0));
        put_optional_str16(&mut out, properties.content_type.as_deref());
        put_optional_str16(&mut out, properties.response_topic.as_deref());
        put_optional_bytes16(&mut out, properties.correlation_data.as_deref());
        out.put_u16_le(u16::try_from(properties.user.len()).expect("user properties fit in u16"));
        for (key, value) in &properties.user {
            put_str16(&mut out, key);
            put_str16(&mut out, value);
        }
        out.put_u32_le(u32::try_from(self.targets.len()).expect("targets fit in u32"));
        for target in &self.targets {
            target.queue.encode(&mut out);
            out.put_u8(target.qos as u8 | u8::from(target.retain_as_published) << 2);
            out.put_u64_le(target.deadline_ms.unwrap_or(0));
            // At most one id per subscription, and sessions hold at most
            // SUBSCRIPTIONS_PER_SESSION_MAX of them.
            let ids = u16::try_from(target.subscription_ids.len()).expect("subscription ids fit");
            out.put_u16_le(ids);
            for id in &target.subscription_ids {
                out.put_u32_le(*id);
            }
        }
        put_optional_str16(&mut out, properties.sender.as_deref());
        out.freeze()
    }

    /// Decodes a record; the payload shares `bytes`' buffer.
    ///
    /// # Errors
    /// `RecordError` for anything that is not a well-formed record.
    pub fn decode(mut bytes: Bytes) -> Result<PublishRecord, RecordError> {
        let version = take_u8(&mut bytes)?;
        if !(1..=VERSION).contains(&version) {
            return Err(RecordError::Version(version));
        }
        let flags = take_u8(&mut bytes)?;
        let qos = QoS::from_u8(flags & 0b11).ok_or(RecordError::QoS(flags & 0b11))?;
        let publisher = take_u64(&mut bytes)?;
        // Version 1 (before QoS 2 receipts) is version 2 without this field.
        let qos2_packet_id = match version {
            1 => None,
            _ => Some(take_u16(&mut bytes)?).filter(|&id| id != 0),
        };
        let topic = take_str16(&mut bytes)?;
        let payload_len = take_u32(&mut bytes)? as usize;
        let payload = take_bytes(&mut bytes, payload_len)?;
        let expires_at_ms = Some(take_u64(&mut bytes)?).filter(|&at| at != 0);
        let content_type = take_optional_str16(&mut bytes)?;
        let response_topic = take_optional_str16(&mut bytes)?;
        let correlation_data = take_optional_bytes16(&mut bytes)?;
        let user_count = take_u16(&mut bytes)?;
        let mut user = Vec::with_capacity(usize::from(user_count).min(bytes.len() / 4));
        for _ in 0..user_count {
            user.push((take_str16(&mut bytes)?, take_str16(&mut bytes)?));
        }
        let targets = take_targets(&mut bytes, version)?;
        let sender = match version {
            1..=3 => None,
            _ => take_optional_str16(&mut bytes)?,
        };
        if !bytes.is_empty() {
            return Err(RecordError::Trailing(bytes.len()));
        }
        let message = Message {
            topic,
            payload,
            qos,
            retain: flags & 0b100 != 0,
            properties: MessageProperties {
                payload_is_utf8: flags & 0b1000 != 0,
                expires_at_ms,
                content_type,
                response_topic,
                correlation_data,
                user,
                sender,
            },
        };
        Ok(PublishRecord {
            message,
            publisher,
            qos2_packet_id,
            retained_copy: flags & 0b1_0000 != 0,
            targets,
        })
    }
}

/// A client released (PUBREL) the packet id of a QoS 2 publish it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseRecord {
    pub session: u64,
    pub packet_id: u16,
}

impl ReleaseRecord {
    #[must_use]
    pub fn encode(&self) -> Bytes {
        encode_versioned(RELEASE_VERSION, |out| {
            out.put_u64_le(self.session);
            out.put_u16_le(self.packet_id);
        })
    }

    /// # Errors
    /// `RecordError` for anything that is not a well-formed release record.
    pub fn decode(bytes: Bytes) -> Result<ReleaseRecord, RecordError> {
        decode_versioned(bytes, RELEASE_VERSION, |bytes| {
            Ok(ReleaseRecord {
                session: take_u64(bytes)?,
                packet_id: take_u16(bytes)?,
            })
        })
    }
}

/// A subscriber's client received (PUBREC) the QoS 2 message logged at `seq`: only the
/// PUBREL remains, also after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedRecord {
    pub session: u64,
    pub seq: u64,
}

impl ReceivedRecord {
    #[must_use]
    pub fn encode(&self) -> Bytes {
        encode_versioned(RECEIVED_VERSION, |out| {
            out.put_u64_le(self.session);
            out.put_u64_le(self.seq);
        })
    }

    /// # Errors
    /// `RecordError` for anything that is not a well-formed received record.
    pub fn decode(bytes: Bytes) -> Result<ReceivedRecord, RecordError> {
        decode_versioned(bytes, RECEIVED_VERSION, |bytes| {
            Ok(ReceivedRecord {
                session: take_u64(bytes)?,
                seq: take_u64(bytes)?,
            })
        })
    }
}

fn take_targets(bytes: &mut Bytes, version: u8) -> Result<Vec<Target>, RecordError> {
    let count = take_u32(bytes)? as usize;
    // Each target takes at least 11 bytes: never allocate more than the input can hold.
    let mut targets = Vec::with_capacity(count.min(bytes.len() / 11));
    for _ in 0..count {
        // Versions 1 and 2 named sessions only, and had no deadlines.
        let queue = match version {
            1 | 2 => QueueId::Session(take_u64(bytes)?),
            _ => QueueId::decode(bytes)?,
        };
        let options = take_u8(bytes)?;
        let qos = QoS::from_u8(options & 0b11).ok_or(RecordError::QoS(options & 0b11))?;
        let deadline_ms = match version {
            1 | 2 => None,
            _ => Some(take_u64(bytes)?).filter(|&at| at != 0),
        };
        let id_count = take_u16(bytes)?;
        let mut subscription_ids = Vec::with_capacity(usize::from(id_count));
        for _ in 0..id_count {
            subscription_ids.push(take_u32(bytes)?);
        }
        targets.push(Target {
            queue,
            qos,
            retain_as_published: options & 0b100 != 0,
            subscription_ids,
            deadline_ms,
        });
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_properties() -> impl Strategy<Value = MessageProperties> {
        (
            any::<bool>(),
            proptest::option::of(1u64..),
            proptest::option::of("[a-z/]{0,10}"),
            proptest::option::of("[a-z/]{0,10}"),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10)),
            proptest::collection::vec(("\\PC{0,5}", "\\PC{0,5}"), 0..3),
            proptest::option::of("[a-z/]{1,10}"),
        )
            .prop_map(
                |(utf8, expires, content, response, correlation, user, sender)| MessageProperties {
                    payload_is_utf8: utf8,
                    expires_at_ms: expires,
                    content_type: content,
                    response_topic: response,
                    correlation_data: correlation.map(Bytes::from),
                    user,
                    sender,
                },
            )
    }

    fn arb_target() -> impl Strategy<Value = Target> {
        (
            prop_oneof![
                any::<u64>().prop_map(QueueId::Session),
                any::<u64>().prop_map(QueueId::Endpoint)
            ],
            0u8..3,
            any::<bool>(),
            proptest::collection::vec(any::<u32>(), 0..3),
            proptest::option::of(1u64..),
        )
            .prop_map(|(queue, qos, rap, ids, deadline)| Target {
                queue,
                qos: QoS::from_u8(qos).unwrap(),
                retain_as_published: rap,
                subscription_ids: ids,
                deadline_ms: deadline,
            })
    }

    fn arb_record() -> impl Strategy<Value = PublishRecord> {
        let (properties, target) = (arb_properties(), arb_target());
        (
            "[a-z/]{1,20}",
            proptest::collection::vec(any::<u8>(), 0..100),
            0u8..3,
            any::<bool>(),
            properties,
            any::<u64>(),
            proptest::option::of(1u16..),
            any::<bool>(),
            proptest::collection::vec(target, 0..5),
        )
            .prop_map(
                |(
                    topic,
                    payload,
                    qos,
                    retain,
                    properties,
                    publisher,
                    qos2_packet_id,
                    retained_copy,
                    targets,
                )| {
                    PublishRecord {
                        message: Message {
                            topic,
                            payload: Bytes::from(payload),
                            qos: QoS::from_u8(qos).unwrap(),
                            retain,
                            properties,
                        },
                        publisher,
                        qos2_packet_id,
                        retained_copy,
                        targets,
                    }
                },
            )
    }

    /// A record as versions 1 and 2 wrote it (without a sender, and targets naming sessions).
    fn encode_old(record: &PublishRecord, version: u8) -> Bytes {
        let mut without_targets = PublishRecord {
            targets: Vec::new(),
            ..record.clone()
        };
        without_targets.message.properties.sender = None;
        let mut old = without_targets.encode().to_vec();
        old.truncate(old.len() - 4 - 1); // the target count and the absent sender
        old[0] = version;
        if version == 1 {
            old.drain(10..12); // the packet id after version, flags and publisher
        }
        old.extend_from_slice(&u32::try_from(record.targets.len()).unwrap().to_le_bytes());
        for target in &record.targets {
            let QueueId::Session(session) = target.queue else {
                panic!("versions 1 and 2 name sessions only");
            };
            old.extend_from_slice(&session.to_le_bytes());
            old.push(target.qos as u8 | u8::from(target.retain_as_published) << 2);
            let ids = u16::try_from(target.subscription_ids.len()).unwrap();
            old.extend_from_slice(&ids.to_le_bytes());
            for id in &target.subscription_ids {
                old.extend_from_slice(&id.to_le_bytes());
            }
        }
        Bytes::from(old)
    }

    proptest! {
        #[test]
        fn records_round_trip(record in arb_record()) {
            prop_assert_eq!(PublishRecord::decode(record.encode()).unwrap(), record);
        }

        /// Goal: a cut or altered record is an error or a different record, never a panic.
        #[test]
        fn damaged_records_never_panic(record in arb_record(), cut: prop::sample::Index, flip: prop::sample::Index) {
            let bytes = record.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(PublishRecord::decode(bytes.slice(..cut)).is_err());
            let mut altered = bytes.to_vec();
            let at = flip.index(altered.len());
            altered[at] ^= 0xff;
            let _ = PublishRecord::decode(Bytes::from(altered));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PublishRecord::decode(Bytes::from(bytes.clone()));
            let _ = ReleaseRecord::decode(Bytes::from(bytes.clone()));
            let _ = ReceivedRecord::decode(Bytes::from(bytes));
        }

        /// Goal: records of versions 1 (before QoS 2 receipts) and 2 (before queues and
        /// deadlines) still decode, their targets as session queues without deadlines.
        #[test]
        fn version_1_and_2_records_decode(mut record in arb_record(), version in 1u8..3) {
            record.message.properties.sender = None;
            for target in &mut record.targets {
                target.deadline_ms = None;
                if let QueueId::Endpoint(id) = target.queue {
                    target.queue = QueueId::Session(id);
                }
            }
            if version == 1 {
                record.qos2_packet_id = None;
            }
            let old = encode_old(&record, version);
            prop_assert_eq!(PublishRecord::decode(old).unwrap(), record);
        }

        /// Goal: records of version 3 (before the sender) still decode, without a sender.
        #[test]
        fn version_3_records_decode(mut record in arb_record()) {
            record.message.properties.sender = None;
            let mut old = record.encode().to_vec();
            old.truncate(old.len() - 1); // the absent sender
            old[0] = 3;
            prop_assert_eq!(PublishRecord::decode(Bytes::from(old)).unwrap(), record);
        }

        #[test]
        fn release_records_round_trip(session: u64, packet_id: u16, cut in 0usize..11) {
            let record = ReleaseRecord { session, packet_id };
            let bytes = record.encode();
            prop_assert_eq!(ReleaseRecord::decode(bytes.clone()).unwrap(), record);
            prop_assert!(ReleaseRecord::decode(bytes.slice(..cut)).is_err());
        }

        #[test]
        fn received_records_round_trip(session: u64, seq: u64, cut in 0usize..17) {
            let record = ReceivedRecord { session, seq };
            let bytes = record.encode();
            prop_assert_eq!(ReceivedRecord::decode(bytes.clone()).unwrap(), record);
            prop_assert!(ReceivedRecord::decode(bytes.slice(..cut)).is_err());
        }
    }
}
