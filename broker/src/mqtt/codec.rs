//! The codec adapter: the only module that knows `rmqtt-codec`. It turns the wire's v3.1.1 and
//! v5 packets into version-neutral [`ClientPacket`]s and [`ServerPacket`]s back into the wire
//! format of the connection's version, so the rest of the broker deals with one model.
//!
//! The maximum packet size is enforced by the codec on the fixed header, before the body is
//! buffered.

use crate::hub::events::{Delivery, Protocol};
use crate::message::{Message, MessageProperties, QoS, Will};
use crate::routing::{RetainHandling, SubscriptionOptions};
use bytes::Bytes;
use bytestring::ByteString;
use rmqtt_codec::types::Publish as WirePublish;
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
use rmqtt_codec::{MqttCodec, MqttPacket, v3, v5};
use std::borrow::Cow;
use std::num::{NonZeroU16, NonZeroU32};

pub use rmqtt_codec::error::{DecodeError, EncodeError};

/// The codec that detects the protocol version from the first packet.
#[must_use]
pub fn version_codec() -> MqttCodec {
    MqttCodec::Version(VersionCodec)
}

/// The codec for a connection once its version is known.
#[must_use]
pub fn codec_for(version: ProtocolVersion, packet_size_max: u32) -> (MqttCodec, Protocol) {
    match version {
        ProtocolVersion::MQTT3 => (
            MqttCodec::V3(v3::Codec::new(packet_size_max)),
            Protocol::V311,
        ),
        ProtocolVersion::MQTT5 => (
            MqttCodec::V5(v5::Codec::new(packet_size_max, 0)),
            Protocol::V5,
        ),
    }
}

/// Caps what we send to the client's own maximum packet size (MQTT 5).
pub fn limit_outbound(codec: &mut MqttCodec, packet_size_max: u32) {
    if let MqttCodec::V5(codec) = codec {
        codec.set_max_outbound_size(packet_size_max);
    }
}

/// A CONNECT, version-neutral.
#[derive(Debug, Clone)]
pub struct Connect {
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive_secs: u16,
    pub session_expiry_secs: u32,
    pub receive_max: Option<u16>,
    pub packet_size_max: Option<u32>,
    pub topic_alias_max: u16,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
}

/// A PUBLISH from a client.
#[derive(Debug, Clone)]
pub struct InboundPublish {
    pub packet_id: Option<u16>,
    pub qos: QoS,
    pub dup: bool,
    pub retain: bool,
    /// Empty when an MQTT 5 client uses an established topic alias.
    pub topic: String,
    pub topic_alias: Option<u16>,
    pub payload: Bytes,
    /// Message expiry interval in seconds, as sent (MQTT 5).
    pub expiry_interval_secs: Option<u32>,
    pub properties: MessageProperties,
    /// A client may not send subscription identifiers in PUBLISH (MQTT 5 §3.3.4).
    pub has_subscription_ids: bool,
}

/// Every packet a client may send after CONNECT, and the ones it may not (kept to refuse them).
#[derive(Debug, Clone)]
pub enum ClientPacket {
    Connect(Box<Connect>),
    Publish(Box<InboundPublish>),
    PubAck(u16),
    /// `refused`: an MQTT 5 reason code of 0x80 or above, which ends the exchange (§4.3.3).
    PubRec {
        packet_id: u16,
        refused: bool,
    },
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        packet_id: u16,
        filters: Vec<(String, SubscriptionOptions)>,
    },
    Unsubscribe {
        packet_id: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        session_expiry_secs: Option<u32>,
        /// MQTT 5 reason 0x04: disconnect, but publish the will.
        publish_will: bool,
    },
    /// A packet only a server sends (CONNACK, SUBACK, ...) or AUTH, which spool does not offer.
    Unexpected(&'static str),
}

/// Reasons the broker gives (MQTT 5 reason codes; 3.1.1 has fewer ways to say them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Success,
    UnspecifiedError,
    MalformedPacket,
    ProtocolError,
    ClientIdentifierNotValid,
    ServerUnavailable,
    ServerBusy,
    ServerShuttingDown,
    KeepAliveTimeout,
    SessionTakenOver,
    TopicFilterInvalid,
    TopicNameInvalid,
    PacketTooLarge,
    QuotaExceeded,
    TopicAliasInvalid,
    ReceiveMaximumExceeded,
    NoSubscriptionExisted,
    PacketIdentifierNotFound,
    SharedSubscriptionsNotSupported,
    ImplementationSpecificError,
    /// The client's credentials do not check out (MQTT 3.1.1: CONNACK 5, as edgeHub answers).
    NotAuthorized,
}

impl Reason {
    /// The MQTT 5 reason code.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            Reason::Success => 0x00,
            Reason::NoSubscriptionExisted => 0x11,
            Reason::PacketIdentifierNotFound => 0x92,
            Reason::SharedSubscriptionsNotSupported => 0x9E,
            Reason::UnspecifiedError => 0x80,
            Reason::ImplementationSpecificError => 0x83,
            Reason::MalformedPacket => 0x81,
            Reason::ProtocolError => 0x82,
            Reason::ClientIdentifierNotValid => 0x85,
            Reason::NotAuthorized => 0x87,
            Reason::ServerUnavailable => 0x88,
            Reason::ServerBusy => 0x89,
            Reason::ServerShuttingDown => 0x8B,
            Reason::KeepAliveTimeout => 0x8D,
            Reason::SessionTakenOver => 0x8E,
            Reason::TopicFilterInvalid => 0x8F,
            Reason::TopicNameInvalid => 0x90,
            Reason::ReceiveMaximumExceeded => 0x93,
            Reason::TopicAliasInvalid => 0x94,
            Reason::PacketTooLarge => 0x95,
            Reason::QuotaExceeded => 0x97,
        }
    }
}

/// The broker's answer to CONNECT.
#[derive(Debug, Clone)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason: Reason,
    /// Set when the broker assigned the client id (MQTT 5).
    pub assigned_client_id: Option<String>,
    pub receive_max: u16,
    pub packet_size_max: u32,
    pub topic_alias_max: u16,
    pub server_keep_alive_secs: Option<u16>,
}

/// A packet the broker sends.
#[derive(Debug)]
pub enum ServerPacket {
    ConnAck(ConnAck),
    PubAck {
        packet_id: u16,
        reason: Reason,
    },
    PubRec {
        packet_id: u16,
        reason: Reason,
    },
    PubRel {
        packet_id: u16,
        reason: Reason,
    },
    PubComp {
        packet_id: u16,
        reason: Reason,
    },
    SubAck {
        packet_id: u16,
        granted: Vec<Result<QoS, Reason>>,
    },
    UnsubAck {
        packet_id: u16,
        results: Vec<Reason>,
    },
    PingResp,
    Publish(Box<Delivery>, Option<u32>),
    Disconnect(Reason),
}

fn packet_id(id: NonZeroU16) -> u16 {
    id.get()
}

fn nonzero(id: u16) -> NonZeroU16 {
    NonZeroU16::new(id).unwrap_or(NonZeroU16::MIN)
}

fn qos_from_wire(qos: rmqtt_codec::types::QoS) -> QoS {
    match qos {
        rmqtt_codec::types::QoS::AtMostOnce => QoS::AtMostOnce,
        rmqtt_codec::types::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rmqtt_codec::types::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_wire(qos: QoS) -> rmqtt_codec::types::QoS {
    match qos {
        QoS::AtMostOnce => rmqtt_codec::types::QoS::AtMostOnce,
        QoS::AtLeastOnce => rmqtt_codec::types::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rmqtt_codec::types::QoS::ExactlyOnce,
    }
}

/// Converts a decoded wire packet.
#[must_use]
pub fn from_wire(packet: MqttPacket) -> ClientPacket {
    match packet {
        MqttPacket::V3(packet) => from_v3(packet),
        MqttPacket::V5(packet) => from_v5(packet),
        MqttPacket::Version(_) => ClientPacket::Unexpected("a second protocol header"),
    }
}

fn from_v3(packet: v3::Packet) -> ClientPacket {
    match packet {
        v3::Packet::Connect(connect) => ClientPacket::Connect(Box::new(Connect {
            client_id: connect.client_id.to_string(),
            clean_start: connect.clean_session,
            keep_alive_secs: connect.keep_alive,
            session_expiry_secs: 0,
            receive_max: None,
            packet_size_max: None,
            topic_alias_max: 0,
            username: connect.username.map(|u| u.to_string()),
            password: connect.password,
            will: connect.last_will.map(|will| Will {
                message: Message {
                    topic: will.topic.to_string(),
                    payload: will.message,
                    qos: qos_from_wire(will.qos),
                    retain: will.retain,
                    properties: MessageProperties::default(),
                },
                expiry_interval_secs: None,
                delay_secs: 0,
            }),
        })),
        v3::Packet::Publish(publish) => ClientPacket::Publish(Box::new(inbound_publish(*publish))),
        v3::Packet::PublishAck { packet_id: id } => ClientPacket::PubAck(packet_id(id)),
        v3::Packet::PublishReceived { packet_id: id } => ClientPacket::PubRec {
            packet_id: packet_id(id),
            refused: false,
        },
        v3::Packet::PublishRelease { packet_id: id } => ClientPacket::PubRel(packet_id(id)),
        v3::Packet::PublishComplete { packet_id: id } => ClientPacket::PubComp(packet_id(id)),
        v3::Packet::Subscribe {
            packet_id: id,
            topic_filters,
        } => ClientPacket::Subscribe {
            packet_id: packet_id(id),
            filters: topic_filters
                .into_iter()
                .map(|(filter, qos)| {
                    let options = SubscriptionOptions {
                        qos: qos_from_wire(qos),
                        no_local: false,
                        retain_as_published: false,
                        subscription_id: None,
                        retain_handling: RetainHandling::AtSubscribe,
                    };
                    (filter.to_string(), options)
                })
                .collect(),
        },
        v3::Packet::Unsubscribe {
            packet_id: id,
            topic_filters,
        } => ClientPacket::Unsubscribe {
            packet_id: packet_id(id),
            filters: topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        v3::Packet::PingRequest => ClientPacket::PingReq,
        v3::Packet::Disconnect => ClientPacket::Disconnect {
            session_expiry_secs: None,
            publish_will: false,
        },
        v3::Packet::ConnectAck(_) => ClientPacket::Unexpected("CONNACK"),
        v3::Packet::SubscribeAck { .. } => ClientPacket::Unexpected("SUBACK"),
        v3::Packet::UnsubscribeAck { .. } => ClientPacket::Unexpected("UNSUBACK"),
        v3::Packet::PingResponse => ClientPacket::Unexpected("PINGRESP"),
    }
}

fn from_v5(packet: v5::Packet) -> ClientPacket {
    match packet {
        v5::Packet::Connect(connect) => ClientPacket::Connect(Box::new(Connect {
            client_id: connect.client_id.to_string(),
            clean_start: connect.clean_start,
            keep_alive_secs: connect.keep_alive,
            session_expiry_secs: connect.session_expiry_interval_secs,
            receive_max: connect.receive_max.map(NonZeroU16::get),
            packet_size_max: connect.max_packet_size.map(NonZeroU32::get),
            topic_alias_max: connect.topic_alias_max,
            username: connect.username.map(|u| u.to_string()),
            password: connect.password,
            will: connect.last_will.map(will_from_v5),
        })),
        v5::Packet::Publish(publish) => ClientPacket::Publish(Box::new(inbound_publish(*publish))),
        v5::Packet::PublishAck(ack) => ClientPacket::PubAck(packet_id(ack.packet_id)),
        v5::Packet::PublishReceived(ack) => ClientPacket::PubRec {
            packet_id: packet_id(ack.packet_id),
            refused: ack.reason_code as u8 >= 0x80,
        },
        v5::Packet::PublishRelease(ack) => ClientPacket::PubRel(packet_id(ack.packet_id)),
        v5::Packet::PublishComplete(ack) => ClientPacket::PubComp(packet_id(ack.packet_id)),
        v5::Packet::Subscribe(subscribe) => {
            let id = subscribe.id.map(NonZeroU32::get);
            ClientPacket::Subscribe {
                packet_id: packet_id(subscribe.packet_id),
                filters: subscribe
                    .topic_filters
                    .into_iter()
                    .map(|(filter, options)| {
                        let options = SubscriptionOptions {
                            qos: qos_from_wire(options.qos),
                            no_local: options.no_local,
                            retain_as_published: options.retain_as_published,
                            subscription_id: id,
                            retain_handling: match options.retain_handling {
                                v5::RetainHandling::AtSubscribe => RetainHandling::AtSubscribe,
                                v5::RetainHandling::AtSubscribeNew => {
                                    RetainHandling::AtNewSubscribe
                                }
                                v5::RetainHandling::NoAtSubscribe => RetainHandling::Never,
                            },
                        };
                        (filter.to_string(), options)
                    })
                    .collect(),
            }
        }
        v5::Packet::Unsubscribe(unsubscribe) => ClientPacket::Unsubscribe {
            packet_id: packet_id(unsubscribe.packet_id),
            filters: unsubscribe
                .topic_filters
                .into_iter()
                .map(|f| f.to_string())
                .collect(),
        },
        v5::Packet::PingRequest => ClientPacket::PingReq,
        v5::Packet::Disconnect(disconnect) => ClientPacket::Disconnect {
            session_expiry_secs: disconnect.session_expiry_interval_secs,
            publish_will: disconnect.reason_code
                == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Auth(_) => ClientPacket::Unexpected("AUTH"),
        v5::Packet::ConnectAck(_) => ClientPacket::Unexpected("CONNACK"),
        v5::Packet::SubscribeAck(_) => ClientPacket::Unexpected("SUBACK"),
        v5::Packet::UnsubscribeAck(_) => ClientPacket::Unexpected("UNSUBACK"),
        v5::Packet::PingResponse => ClientPacket::Unexpected("PINGRESP"),
    }
}

fn will_from_v5(will: v5::LastWill) -> Will {
    Will {
        message: Message {
            topic: will.topic.to_string(),
            payload: will.message,
            qos: qos_from_wire(will.qos),
            retain: will.retain,
            properties: message_properties(
                will.is_utf8_payload.unwrap_or(false),
                will.content_type,
                will.response_topic,
                will.correlation_data,
                will.user_properties,
            ),
        },
        expiry_interval_secs: will.message_expiry_interval.map(NonZeroU32::get),
        delay_secs: will.will_delay_interval_sec.unwrap_or(0),
    }
}

fn inbound_publish(publish: WirePublish) -> InboundPublish {
    let properties = publish.properties.unwrap_or_default();
    InboundPublish {
        packet_id: publish.packet_id.map(NonZeroU16::get),
        qos: qos_from_wire(publish.qos),
        dup: publish.dup,
        retain: publish.retain,
        topic: publish.topic.to_string(),
        topic_alias: properties.topic_alias.map(NonZeroU16::get),
        payload: publish.payload,
        expiry_interval_secs: properties.message_expiry_interval.map(NonZeroU32::get),
        has_subscription_ids: !properties.subscription_ids.is_empty(),
        properties: message_properties(
            properties.is_utf8_payload,
            properties.content_type,
            properties.response_topic,
            properties.correlation_data,
            properties.user_properties,
        ),
    }
}

/// The MQTT 5 properties a message carries to its subscribers, from a PUBLISH or a will (their
/// expiry is set when the message is logged).
fn message_properties(
    payload_is_utf8: bool,
    content_type: Option<ByteString>,
    response_topic: Option<ByteString>,
    correlation_data: Option<Bytes>,
    user: v5::UserProperties,
) -> MessageProperties {
    MessageProperties {
        payload_is_utf8,
        expires_at_ms: None,
        content_type: content_type.map(|s| s.to_string()),
        response_topic: response_topic.map(|s| s.to_string()),
        correlation_data,
        user: user
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        sender: None,
    }
}

/// Converts a packet to the wire format of `protocol`.
#[must_use]
pub fn to_wire(packet: ServerPacket, protocol: Protocol) -> Option<MqttPacket> {
    match protocol {
        Protocol::V311 => to_v3(packet).map(MqttPacket::V3),
        Protocol::V5 => Some(MqttPacket::V5(to_v5(packet))),
    }
}

/// MQTT 3.1.1 has no reason codes on most packets, and no server DISCONNECT: `None` means
/// "close the connection without a packet".
fn to_v3(packet: ServerPacket) -> Option<v3::Packet> {
    Some(match packet {
        ServerPacket::ConnAck(connack) => v3::Packet::ConnectAck(v3::ConnectAck {
            session_present: connack.session_present,
            return_code: match connack.reason {
                Reason::Success => v3::ConnectAckReason::ConnectionAccepted,
                Reason::ClientIdentifierNotValid => v3::ConnectAckReason::IdentifierRejected,
                Reason::NotAuthorized => v3::ConnectAckReason::NotAuthorized,
                _ => v3::ConnectAckReason::ServiceUnavailable,
            },
        }),
        ServerPacket::PubAck { packet_id, .. } => v3::Packet::PublishAck {
            packet_id: nonzero(packet_id),
        },
        ServerPacket::PubRec { packet_id, .. } => v3::Packet::PublishReceived {
            packet_id: nonzero(packet_id),
        },
        ServerPacket::PubRel { packet_id, .. } => v3::Packet::PublishRelease {
            packet_id: nonzero(packet_id),
        },
        ServerPacket::PubComp { packet_id, .. } => v3::Packet::PublishComplete {
            packet_id: nonzero(packet_id),
        },
        ServerPacket::SubAck { packet_id, granted } => v3::Packet::SubscribeAck {
            packet_id: nonzero(packet_id),
            status: granted
                .into_iter()
                .map(|g| match g {
                    Ok(qos) => v3::SubscribeReturnCode::Success(qos_to_wire(qos)),
                    Err(_) => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        },
        ServerPacket::UnsubAck { packet_id, .. } => v3::Packet::UnsubscribeAck {
            packet_id: nonzero(packet_id),
        },
        ServerPacket::PingResp => v3::Packet::PingResponse,
        ServerPacket::Publish(delivery, _) => {
            v3::Packet::Publish(Box::new(wire_publish(&delivery, None)))
        }
        ServerPacket::Disconnect(_) => return None,
    })
}

fn to_v5(packet: ServerPacket) -> v5::Packet {
    match packet {
        ServerPacket::ConnAck(connack) => v5::Packet::ConnectAck(Box::new(connack_v5(connack))),
        ServerPacket::PubAck { packet_id, reason } => {
            v5::Packet::PublishAck(publish_ack(packet_id, reason))
        }
        ServerPacket::PubRec { packet_id, reason } => {
            v5::Packet::PublishReceived(publish_ack(packet_id, reason))
        }
        ServerPacket::PubRel { packet_id, reason } => {
            v5::Packet::PublishRelease(publish_ack2(packet_id, reason))
        }
        ServerPacket::PubComp { packet_id, reason } => {
            v5::Packet::PublishComplete(publish_ack2(packet_id, reason))
        }
        ServerPacket::SubAck { packet_id, granted } => v5::Packet::SubscribeAck(v5::SubscribeAck {
            packet_id: nonzero(packet_id),
            properties: Vec::new(),
            reason_string: None,
            status: granted
                .into_iter()
                .map(|g| match g {
                    Ok(QoS::AtMostOnce) => v5::SubscribeAckReason::GrantedQos0,
                    Ok(QoS::AtLeastOnce) => v5::SubscribeAckReason::GrantedQos1,
                    Ok(QoS::ExactlyOnce) => v5::SubscribeAckReason::GrantedQos2,
                    Err(reason) => v5::SubscribeAckReason::try_from(reason.code())
                        .unwrap_or(v5::SubscribeAckReason::UnspecifiedError),
                })
                .collect(),
        }),
        ServerPacket::UnsubAck { packet_id, results } => {
            v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                packet_id: nonzero(packet_id),
                properties: Vec::new(),
                reason_string: None,
                status: results
                    .into_iter()
                    .map(|r| {
                        v5::UnsubscribeAckReason::try_from(r.code())
                            .unwrap_or(v5::UnsubscribeAckReason::UnspecifiedError)
                    })
                    .collect(),
            })
        }
        ServerPacket::PingResp => v5::Packet::PingResponse,
        ServerPacket::Publish(delivery, expiry) => {
            v5::Packet::Publish(Box::new(wire_publish(&delivery, Some(expiry))))
        }
        ServerPacket::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::try_from(reason.code())
                .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError),
        )),
    }
}

fn connack_v5(connack: ConnAck) -> v5::ConnectAck {
    v5::ConnectAck {
        session_present: connack.session_present,
        reason_code: v5::ConnectAckReason::try_from(connack.reason.code())
            .unwrap_or(v5::ConnectAckReason::UnspecifiedError),
        assigned_client_id: connack.assigned_client_id.map(ByteString::from),
        receive_max: nonzero(connack.receive_max),
        max_packet_size: Some(connack.packet_size_max),
        max_qos: rmqtt_codec::types::QoS::ExactlyOnce,
        topic_alias_max: connack.topic_alias_max,
        retain_available: true,
        wildcard_subscription_available: true,
        subscription_identifiers_available: true,
        shared_subscription_available: false,
        server_keepalive_sec: connack.server_keep_alive_secs,
        ..v5::ConnectAck::default()
    }
}

fn publish_ack(packet_id: u16, reason: Reason) -> v5::PublishAck {
    v5::PublishAck {
        packet_id: nonzero(packet_id),
        reason_code: v5::PublishAckReason::try_from(reason.code())
            .unwrap_or(v5::PublishAckReason::UnspecifiedError),
        properties: Vec::new(),
        reason_string: None,
    }
}

fn publish_ack2(packet_id: u16, reason: Reason) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id: nonzero(packet_id),
        reason_code: match reason {
            Reason::Success => v5::PublishAck2Reason::Success,
            _ => v5::PublishAck2Reason::PacketIdNotFound,
        },
        properties: Vec::new(),
        reason_string: None,
    }
}

/// A PUBLISH to a subscriber; `v5_expiry` carries the remaining expiry seconds for MQTT 5
/// (`Some(None)`: no expiry) and is `None` for 3.1.1, which has no properties.
fn wire_publish(delivery: &Delivery, v5_expiry: Option<Option<u32>>) -> WirePublish {
    let message = &delivery.message;
    let properties = v5_expiry.map(|expiry| v5::PublishProperties {
        topic_alias: None,
        correlation_data: message.properties.correlation_data.clone(),
        message_expiry_interval: expiry.and_then(NonZeroU32::new),
        content_type: message
            .properties
            .content_type
            .as_deref()
            .map(ByteString::from),
        user_properties: message
            .properties
            .user
            .iter()
            .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
            .collect(),
        is_utf8_payload: message.properties.payload_is_utf8,
        response_topic: message
            .properties
            .response_topic
            .as_deref()
            .map(ByteString::from),
        subscription_ids: delivery
            .subscription_ids
            .iter()
            .filter_map(|&id| NonZeroU32::new(id))
            .collect(),
    });
    WirePublish {
        dup: delivery.dup,
        retain: delivery.retain,
        qos: qos_to_wire(delivery.qos),
        topic: match delivery.topic() {
            Cow::Owned(topic) => ByteString::from(topic),
            Cow::Borrowed(topic) => ByteString::from(topic),
        },
        packet_id: delivery.packet_id.map(nonzero),
        payload: message.payload.clone(),
        properties,
    }
}
