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
//! Ids in topics may be percent-encoded (the Python SDK encodes them); they are compared
//! decoded.

use crate::auth::identity::IdentityId;
use percent_encoding::percent_decode_str;

/// A telemetry topic's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry<'a> {
    pub sender: IdentityId,
    /// The property bag, still encoded; empty when there is none.
    pub bag: &'a str,
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
    let module = match module {
        Some(module) => Some(decode_id(module)?),
        None => None,
    };
    let sender = IdentityId {
        device: decode_id(device)?,
        module,
    };
    Some(Telemetry { sender, bag })
}

/// Whether `identity` may publish on `topic`: its own telemetry, and the twin and direct
/// method topics (which address the hub, not another identity).
#[must_use]
pub fn may_publish(identity: &IdentityId, topic: &str) -> bool {
    if let Some(telemetry) = telemetry(topic) {
        return telemetry.sender == *identity;
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
    let own = |id: &str, expected: &str| decode_id(id).is_some_and(|id| id == expected);
    match (
        &identity.module,
        rest.split('/').collect::<Vec<_>>().as_slice(),
    ) {
        (Some(module), [device, "modules", m, "inputs", ..]) => {
            own(device, &identity.device) && own(m, module)
        }
        (None, [device, "messages", "devicebound", ..]) => own(device, &identity.device),
        _ => false,
    }
}

fn decode_id(id: &str) -> Option<String> {
    let decoded = percent_decode_str(id).decode_utf8().ok()?.into_owned();
    (!decoded.is_empty()).then_some(decoded)
}

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
                "devices/my%20edge/modules/m/messages/events/",
                "my edge/m",
                "",
            ),
        ] {
            let read = telemetry(topic).unwrap_or_else(|| panic!("{topic} is telemetry"));
            assert_eq!(read.sender.to_string(), sender, "{topic}");
            assert_eq!(read.bag, bag, "{topic}");
        }
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
