//! IoT Hub conventions on MQTT (edgehub-contract.md §1.3–§1.4): the topics devices and modules
//! use, the property bags their topics carry, and the size IoT Hub counts for a message.
//!
//! - `topics`: the telemetry topic's parts, and which topics an identity may use
//!   ([`check_publish`] and [`check_subscribe`] apply them, with the deployment's policy on
//!   other topics, and the bag's and the size's rules).
//! - `property_bag`: decoding and encoding property bags.
//! - `message`: telemetry as routes see it (system and application properties, its source),
//!   and as a module input gets it.

pub mod message;
pub mod property_bag;
pub mod topics;

pub use message::ModuleInput;

use crate::auth::policy::{Client, Policy};
use property_bag::Properties;

/// The largest message IoT Hub and edgeHub accept, as [`message_size`] counts it.
pub const MESSAGE_BYTES_MAX: usize = 256 * 1024;

/// A message's size as edgeHub counts it: its body, and the keys and values of its properties
/// (system and application alike).
#[must_use]
pub fn message_size(properties: &Properties<'_>, body_bytes: usize) -> usize {
    properties
        .iter()
        .map(|(key, value)| key.len() + value.as_ref().map_or(0, |value| value.len()))
        .sum::<usize>()
        + body_bytes
}

/// Why IoT Hub's rules refuse a publish (or a will).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefusal {
    /// A topic the client may not publish on.
    #[error("{0}")]
    NotAuthorized(String),
    /// Telemetry whose property bag does not decode: a protocol error.
    #[error("dropped a message: its property bag: {0}")]
    MalformedBag(String),
    /// Telemetry above IoT Hub's size.
    #[error("dropped a message of {size} bytes, above IoT Hub's {MESSAGE_BYTES_MAX}")]
    TooLarge { size: usize },
}

/// Whether `topic` (or a filter) is one of IoT Hub's, which only IoT Hub's rules govern.
#[must_use]
pub fn is_iothub_topic(topic: &str) -> bool {
    topic.starts_with("devices/") || topic.starts_with("$iothub/")
}

/// The rules for a publish on `topic` by `client`:
/// - an identity publishes on IoT Hub topics only on its own (`topics::may_publish`);
/// - a plain MQTT client publishes on no IoT Hub topic (`devices/…`, `$iothub/…`): it could
///   otherwise forge a module's telemetry or call its direct methods;
/// - on any other topic, the deployment's `policy` decides (`Policy::may_publish`);
/// - an identity's telemetry has a well-formed property bag and stays within IoT Hub's size.
///
/// Returns the decoded bag of an identity's telemetry (what routes evaluate), `None` for any
/// other publish allowed.
///
/// # Errors
/// Why the publish is refused.
pub fn check_publish<'t>(
    client: &Client<'_>,
    topic: &'t str,
    body_bytes: usize,
    policy: &Policy,
) -> Result<Option<Properties<'t>>, PublishRefusal> {
    let refused = |whose: &str| {
        let who = client
            .identity
            .map_or(client.client_id.to_owned(), ToString::to_string);
        PublishRefusal::NotAuthorized(format!("{who} may not publish on {topic:?}{whose}"))
    };
    if !is_iothub_topic(topic) {
        return match policy.may_publish(client, topic) {
            true => Ok(None),
            false => Err(refused(": the authorization policy does not allow it")),
        };
    }
    let Some(identity) = client.identity else {
        return Err(refused(": an IoT Hub topic, for identities only"));
    };
    // Telemetry is read once: whose it is, then its bag.
    let Some(telemetry) = topics::telemetry(topic) else {
        return match topics::may_publish(identity, topic) {
            true => Ok(None),
            false => Err(refused("")),
        };
    };
    if !telemetry.is_from(identity) {
        return Err(refused(""));
    }
    let properties = property_bag::decode(telemetry.bag)
        .map_err(|e| PublishRefusal::MalformedBag(e.to_string()))?;
    let size = message_size(&properties, body_bytes);
    if size > MESSAGE_BYTES_MAX {
        return Err(PublishRefusal::TooLarge { size });
    }
    Ok(Some(properties))
}

/// Whether `client` may subscribe to `filter`: an identity to IoT Hub topics only to its own
/// (`topics::may_subscribe`); anything else as the deployment's `policy` decides.
#[must_use]
pub fn check_subscribe(client: &Client<'_>, filter: &str, policy: &Policy) -> bool {
    match client.identity {
        Some(identity) if is_iothub_topic(filter) => topics::may_subscribe(identity, filter),
        _ => policy.may_subscribe(client, filter),
    }
}
