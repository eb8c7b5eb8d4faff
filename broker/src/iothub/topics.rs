//! IoT Hub topics (edgehub-contract.md §1.3): which topics a device or module publishes and
//! subscribes to, and the telemetry topic's parts.
//!
//! Telemetry, from a device or a module (the property bag is optional, and a trailing `/` is
//! allowed after either):
//!
//! ```text
//! devices/{device}/messages/events[/{bag}]
//! devices/{device}/modules/{module}/messages/events[/{bag}]
//! ```
//!
//! Ids in topics may be percent-encoded (the Python SDK encodes them): a segment names an id
//! as written or as that SDK encodes it, never by decoding it.

use crate::auth::identity::IdentityId;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// A telemetry topic's parts, as written in the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry<'a> {
    pub device: &'a str,
    pub module: Option<&'a str>,
    /// The property bag, still encoded; empty when there is none.
    pub bag: &'a str,
}

impl Telemetry<'_> {
    /// Whether `identity` sent it: the topic names it, as written or as the Python SDK
    /// percent-encodes it.
    #[must_use]
    pub fn is_from(&self, identity: &IdentityId) -> bool {
        names(self.device, &identity.device)
            && match (self.module, &identity.module) {
                (Some(theirs), Some(ours)) => names(theirs, ours),
                (None, None) => true,
                _ => false,
            }
    }
}

/// Reads a telemetry topic; `None` if `topic` is not one.
#[must_use]
pub fn telemetry(topic: &str) -> Option<Telemetry<'_>> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    let (module, rest) = match rest.strip_prefix("modules/") {
        Some(rest) => {
            let (module, rest) = rest.split_once('/')?;
            (Some(module), rest)
        }
        None => (None, rest),
    };
    let bag = match rest.strip_prefix("messages/events")? {
        "" => "",
        after => after.strip_prefix('/')?,
    };
    if device.is_empty() || module.is_some_and(str::is_empty) {
        return None;
    }
    Some(Telemetry {
        device,
        module,
        bag,
    })
}

/// The value of `key` in a topic's query (`?$rid=7&$version=2`, with or without its `?`), as
/// written.
#[must_use]
pub fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .strip_prefix('?')
        .unwrap_or(query)
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// Whether `identity` may publish on `topic`: its own telemetry, and the twin and direct
/// method topics (which address the hub, not another identity).
#[must_use]
pub fn may_publish(identity: &IdentityId, topic: &str) -> bool {
    if let Some(telemetry) = telemetry(topic) {
        return telemetry.is_from(identity);
    }
    topic.starts_with("$iothub/methods/res/")
        || topic.starts_with("$iothub/twin/GET/")
        || topic.starts_with("$iothub/twin/PATCH/properties/reported/")
}

/// Whether `identity` may subscribe to `filter`: its direct methods, twin responses and desired
/// properties, and its own messages: a module's inputs, a device's cloud-to-device messages.
#[must_use]
pub fn may_subscribe(identity: &IdentityId, filter: &str) -> bool {
    if filter.starts_with("$iothub/methods/POST/")
        || filter.starts_with("$iothub/twin/PATCH/properties/desired/")
        || filter.starts_with("$iothub/twin/res/")
    {
        return true;
    }
    let Some(rest) = filter.strip_prefix("devices/") else {
        return false;
    };
    match (
        &identity.module,
        rest.split('/').collect::<Vec<_>>().as_slice(),
    ) {
        (Some(module), [device, "modules", m, "inputs", ..]) => {
            names(device, &identity.device) && names(m, module)
        }
        (None, [device, "messages", "devicebound", ..]) => names(device, &identity.device),
        _ => false,
    }
}

/// Whether a topic segment names `id`: as written, or percent-encoded as the Python SDK
/// writes ids (`quote(id, safe="")`). Never by decoding the segment: an id may itself contain
/// `%`, and a decoded segment could name another identity than the one it spells.
fn names(segment: &str, id: &str) -> bool {
    segment == id || utf8_percent_encode(id, PYTHON_QUOTE).to_string() == segment
}

/// What Python's `urllib.parse.quote(…, safe="")` leaves alone.
const PYTHON_QUOTE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~');

#[cfg(test)]
mod tests {
    use super::*;

    fn id(id: &str) -> IdentityId {
        IdentityId::parse(id).expect("an id")
    }

    /// Goal: every telemetry template of §1.3 is read, with its sender and bag.
    #[test]
    fn telemetry_topics_are_read_on_every_template() {
        for (topic, sender, bag) in [
            ("devices/d/messages/events", "d", ""),
            ("devices/d/messages/events/", "d", ""),
            ("devices/d/messages/events/a=1&b=2", "d", "a=1&b=2"),
            ("devices/d/messages/events/a=1/", "d", "a=1/"),
            ("devices/edge/modules/m/messages/events", "edge/m", ""),
            (
                "devices/edge/modules/m/messages/events/%24.on=out1/",
                "edge/m",
                "%24.on=out1/",
            ),
            (
                "devices/my%28edge%29/modules/m/messages/events/",
                "my(edge)/m",
                "",
            ),
        ] {
            let read = telemetry(topic).unwrap_or_else(|| panic!("{topic} is telemetry"));
            assert!(read.is_from(&id(sender)), "{topic}");
            assert_eq!(read.bag, bag, "{topic}");
        }
        let encoded = telemetry("devices/e%64ge/modules/m/messages/events").expect("telemetry");
        assert!(
            !encoded.is_from(&id("edge/m")),
            "not the Python SDK's encoding of edge"
        );
        for other in [
            "devices/d/messages/eventsx",
            "devices/d/messages",
            "devices//messages/events",
            "devices/d/modules//messages/events",
            "devices/d/modules/m/inputs/in1",
            "plain/topic",
        ] {
            assert_eq!(telemetry(other), None, "{other}");
        }
    }

    /// Goal: an identity publishes and subscribes only on its own IoT Hub topics.
    #[test]
    fn identities_keep_to_their_own_topics() {
        let module = id("edge/filter");
        assert!(may_publish(
            &module,
            "devices/edge/modules/filter/messages/events/a=1"
        ));
        assert!(!may_publish(
            &module,
            "devices/edge/modules/other/messages/events"
        ));
        assert!(
            !may_publish(&module, "devices/edge/messages/events"),
            "its device's"
        );
        assert!(may_publish(&module, "$iothub/twin/GET/?$rid=1"));
        assert!(!may_publish(&module, "any/topic"));
        assert!(may_subscribe(
            &module,
            "devices/edge/modules/filter/inputs/#"
        ));
        assert!(!may_subscribe(
            &module,
            "devices/edge/modules/other/inputs/#"
        ));
        assert!(may_subscribe(&module, "$iothub/methods/POST/#"));
        assert!(!may_subscribe(
            &module,
            "devices/edge/messages/devicebound/#"
        ));
        assert!(!may_subscribe(&module, "#"));
        assert!(!may_subscribe(&module, "devices/+/modules/+/inputs/#"));
        assert!(!may_subscribe(
            &module,
            "devices/edge/modules/filte%72/inputs/#"
        ));
        let percent = id("a%41/m");
        assert!(
            may_subscribe(&percent, "devices/a%2541/modules/m/inputs/#"),
            "as Python encodes"
        );
        assert!(
            may_subscribe(&percent, "devices/a%41/modules/m/inputs/#"),
            "as written"
        );
        assert!(!may_subscribe(
            &id("aA/m"),
            "devices/a%41/modules/m/inputs/#"
        ));
        let device = id("leaf");
        assert!(may_publish(&device, "devices/leaf/messages/events/"));
        assert!(may_subscribe(
            &device,
            "devices/leaf/messages/devicebound/#"
        ));
        assert!(!may_subscribe(
            &device,
            "devices/other/messages/devicebound/#"
        ));
    }
}
