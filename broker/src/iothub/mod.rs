//! IoT Hub conventions on MQTT (edgehub-contract.md §1.3–§1.4): the topics devices and modules
//! use, the property bags their topics carry, and the size IoT Hub counts for a message.
//!
//! - `topics`: the telemetry topic's parts, and which topics an identity may use.
//! - `property_bag`: decoding and encoding property bags.
//! - `message`: telemetry as routes see it (system and application properties, its source),
//!   and as a module input gets it.

pub mod message;
pub mod property_bag;
pub mod topics;

pub use message::ModuleInput;

use property_bag::Properties;

/// The largest message IoT Hub and edgeHub accept, as [`message_size`] counts it.
pub const MESSAGE_BYTES_MAX: usize = 256 * 1024;

/// A message's size as edgeHub counts it: its body, and the keys and values of its properties
/// (system and application alike).
#[must_use]
pub fn message_size(properties: &Properties, body_bytes: usize) -> usize {
    properties
        .iter()
        .map(|(key, value)| key.len() + value.as_ref().map_or(0, String::len))
        .sum::<usize>()
        + body_bytes
}
