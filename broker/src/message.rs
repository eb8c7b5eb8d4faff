//! [`Message`]: a published application message as the hub stores and delivers it, whichever
//! MQTT version it came in with.

use bytes::Bytes;

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value, if valid.
    #[must_use]
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The MQTT 5 properties that travel with a message to its subscribers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    pub payload_is_utf8: bool,
    /// Absolute expiry, in milliseconds since the Unix epoch; `None` never expires.
    pub expires_at_ms: Option<u64>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user: Vec<(String, String)>,
    /// The IoT Hub identity (`device[/module]`) whose telemetry this is, as it authenticated:
    /// set by the publish path, never taken from the client. Routes deliver it to module
    /// inputs as `$.cdid`/`$.cmid`, and the upstream link sends it as that identity.
    pub sender: Option<String>,
}

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: MessageProperties,
}

impl Message {
    /// Bytes the message occupies in memory, roughly: what a queue's byte limit counts.
    #[must_use]
    pub fn size_bytes(&self) -> usize {
        let properties = &self.properties;
        self.topic.len()
            + self.payload.len()
            + properties.content_type.as_ref().map_or(0, String::len)
            + properties.response_topic.as_ref().map_or(0, String::len)
            + properties.correlation_data.as_ref().map_or(0, Bytes::len)
            + properties.sender.as_ref().map_or(0, String::len)
            + properties
                .user
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 64
    }

    /// Whether the message expired at `now_ms`.
    #[must_use]
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.properties.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

/// A will message, from CONNECT: published when the connection ends without a normal
/// DISCONNECT, after `delay_secs` (MQTT 5) unless the session resumes first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// The message; its expiry is set from `expiry_interval_secs` when it is published.
    pub message: Message,
    pub expiry_interval_secs: Option<u32>,
    pub delay_secs: u32,
}

/// The absolute expiry (`expires_at_ms`) of a message expiry interval that starts at
/// `now_ms`.
#[must_use]
pub fn expires_at_ms(now_ms: u64, interval_secs: Option<u32>) -> Option<u64> {
    interval_secs.map(|secs| now_ms.saturating_add(u64::from(secs) * 1000))
}

/// Milliseconds since the Unix epoch, from the machine's clock (`clock::SystemClock` reads it;
/// message expiry is measured on the hub's clock).
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
