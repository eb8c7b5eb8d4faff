//! [`IotMessage`]: a device's or module's telemetry as routes see it (edgehub-contract.md §1.4,
//! §3.1): its properties split into system properties (by edgeHub's names) and application
//! properties, the sender stamped from the authenticated identity, and its route source.

use super::property_bag::{self, Properties};
use super::topics;
use crate::auth::identity::IdentityId;
use crate::message::Message;
use crate::routing::routes::condition::MessageView;

/// The bag's system-property keys and edgeHub's names for them. Any other key is an
/// application property.
const SYSTEM_PROPERTIES: [(&str, &str); 14] = [
    ("$.mid", "messageId"),
    ("$.cid", "cid"),
    ("$.ct", "contentType"),
    ("$.ce", "contentEncoding"),
    ("$.on", "outputName"),
    ("$.to", "to"),
    ("$.uid", "userId"),
    ("$.exp", "absolute-expiry-time"),
    ("$.schema", "messageSchema"),
    ("$.ctime", "creationTime"),
    ("$.ifid", "iothub-interface-id"),
    ("$.sub", "dt-subject"),
    ("iothub-operation", "operation"),
    ("ack", "ack"),
];

/// The route source of twin change notifications.
const TWIN_CHANGE_SOURCE: &str = "/twinChangeNotifications";

/// Telemetry, as routes evaluate it: a view of its decoded property bag, without copies, since
/// every identity's publish is evaluated.
#[derive(Debug, Clone)]
pub struct IotMessage<'a> {
    pub sender: &'a IdentityId,
    properties: &'a Properties<'a>,
    /// Set for a message spool makes itself (a twin change notification): its route source.
    source: Option<&'static str>,
    /// The body parsed as JSON, when its content type and encoding say it is JSON.
    json: Option<serde_json::Value>,
}

impl<'a> IotMessage<'a> {
    /// The message `sender` (as authenticated) sent with `properties` (its topic's bag) and
    /// `body`. `connectionDeviceId` and `connectionModuleId` come from the sender; a bag's
    /// `$.cdid` and `$.cmid` are ignored.
    #[must_use]
    pub fn new(
        sender: &'a IdentityId,
        properties: &'a Properties<'a>,
        body: &[u8],
    ) -> IotMessage<'a> {
        let mut message = IotMessage {
            sender,
            properties,
            source: None,
            json: None,
        };
        let json_type = message
            .system_property("contentType")
            .is_some_and(|t| t.eq_ignore_ascii_case("application/json"));
        let json_encoding = message.system_property("contentEncoding").is_some_and(|e| {
            ["utf-8", "utf-16", "utf-32"]
                .iter()
                .any(|known| e.eq_ignore_ascii_case(known))
        });
        if json_type && json_encoding {
            message.json = serde_json::from_slice(body).ok();
        }
        message
    }

    /// A twin change notification about `sender`'s twin (its properties and JSON `body` as
    /// `twin::change_notification` writes them), whose route source is
    /// `/twinChangeNotifications`.
    #[must_use]
    pub fn twin_change(
        sender: &'a IdentityId,
        properties: &'a Properties<'a>,
        body: &[u8],
    ) -> IotMessage<'a> {
        IotMessage {
            source: Some(TWIN_CHANGE_SOURCE),
            ..IotMessage::new(sender, properties, body)
        }
    }

    /// Its route source: `/messages/modules/{module}/outputs/{output}` for a module's message to
    /// an output, `/messages/modules/{module}` without one, `/messages` from a device, and
    /// `/twinChangeNotifications` for a twin change notification.
    #[must_use]
    pub fn source(&self) -> String {
        if let Some(source) = self.source {
            return source.to_owned();
        }
        // Made for every message a route takes: one allocation, no formatting.
        let output = self.system_property("outputName");
        let Some(module) = &self.sender.module else {
            return "/messages".to_owned();
        };
        let mut source = String::with_capacity(
            "/messages/modules//outputs/".len() + module.len() + output.map_or(0, str::len),
        );
        source.push_str("/messages/modules/");
        source.push_str(module);
        if let Some(output) = output {
            source.push_str("/outputs/");
            source.push_str(output);
        }
        source
    }

    /// The value of the bag's last `key` (a bare key's is empty), as a later one wins.
    fn bag_value(&self, key: &str) -> Option<&'a str> {
        let properties: &'a Properties<'a> = self.properties;
        properties
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.as_deref().unwrap_or_default())
    }
}

impl MessageView for IotMessage<'_> {
    fn app_property(&self, name: &str) -> Option<&str> {
        let system = SYSTEM_PROPERTIES.iter().any(|(wire, _)| *wire == name);
        let sender = name == "$.cdid" || name == "$.cmid";
        (!system && !sender).then(|| self.bag_value(name)).flatten()
    }

    fn system_property(&self, name: &str) -> Option<&str> {
        match name {
            // The sender is who authenticated, whatever the bag says.
            "connectionDeviceId" => Some(&self.sender.device),
            "connectionModuleId" => self.sender.module.as_deref(),
            _ => {
                let (wire, _) = SYSTEM_PROPERTIES.iter().find(|(_, n)| *n == name)?;
                self.bag_value(wire)
            }
        }
    }

    fn json_body(&self) -> Option<&serde_json::Value> {
        self.json.as_ref()
    }
}

/// System properties edgeHub does not pass on to a module input: the output it was sent to,
/// the interface id, and the sender the bag claimed (the authenticated one is added).
const NOT_FORWARDED: [&str; 4] = ["$.on", "$.ifid", "$.cdid", "$.cmid"];

/// A module input: where routes deliver (`BrokeredEndpoint("/modules/{module}/inputs/{input}")`
/// on edge device `device`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleInput {
    pub device: String,
    pub module: String,
    pub input: String,
}

impl ModuleInput {
    /// The topic the module gets `telemetry` on (edgehub-contract.md §1.3, §1.4):
    /// `devices/{device}/modules/{module}/inputs/{input}/{bag}`, the bag with the application
    /// properties first, then the system properties that are passed on, then `$.cdid` and
    /// `$.cmid` of the sender as it authenticated. The bag is never empty (the C# SDK misreads
    /// a topic without one) and has no bare keys (the Python SDK fails on them).
    #[must_use]
    pub fn topic(&self, telemetry: &Message) -> String {
        // The bag was checked when the message was published; one that no longer reads is
        // empty.
        let properties = topics::telemetry(&telemetry.topic)
            .and_then(|t| property_bag::decode(t.bag).ok())
            .unwrap_or_default();
        let is_system = |key: &str| {
            SYSTEM_PROPERTIES.iter().any(|(wire, _)| *wire == key) || key.starts_with("$.")
        };
        // Application properties first, then system ones: two passes, no copies.
        let kept = |system: bool| {
            properties
                .iter()
                .filter(move |(key, _)| !NOT_FORWARDED.contains(&key.as_ref()))
                .filter(move |(key, _)| is_system(key) == system)
                .map(|(key, value)| (key.as_ref(), value.as_deref().unwrap_or_default()))
        };
        // The sender as the publish path wrote it: `device` or `device/module`.
        let sender =
            telemetry
                .properties
                .sender
                .as_deref()
                .map(|sender| match sender.split_once('/') {
                    Some((device, module)) => [("$.cdid", device), ("$.cmid", module)],
                    None => [("$.cdid", sender), ("", "")],
                });
        let sender = sender
            .into_iter()
            .flatten()
            .filter(|(key, _)| !key.is_empty());
        let ModuleInput {
            device,
            module,
            input,
        } = self;
        let mut topic = String::with_capacity(telemetry.topic.len() + 64);
        topic.push_str("devices/");
        topic.push_str(device);
        topic.push_str("/modules/");
        topic.push_str(module);
        topic.push_str("/inputs/");
        topic.push_str(input);
        topic.push('/');
        property_bag::encode_into(&mut topic, kept(false).chain(kept(true)).chain(sender));
        topic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iothub::property_bag::decode;

    fn id(id: &str) -> IdentityId {
        IdentityId::parse(id).expect("id")
    }

    /// Goal: a module input gets the contract's worked example (§1.4): application properties
    /// first, no `$.on`, and the authenticated sender, whatever the bag claimed.
    #[test]
    fn input_topics_carry_the_bag_as_edgehub_sends_it() {
        let telemetry = Message {
            topic: "devices/myEdge/modules/filter/messages/events/%24.on=alerts&%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&temp=31.5&%24.cdid=forged/".into(),
            payload: bytes::Bytes::new(),
            qos: crate::message::QoS::AtLeastOnce,
            retain: false,
            properties: crate::message::MessageProperties {
                sender: Some("myEdge/filter".into()),
                ..Default::default()
            },
        };
        let input = ModuleInput {
            device: "myEdge".into(),
            module: "sink".into(),
            input: "in1".into(),
        };
        assert_eq!(
            input.topic(&telemetry),
            "devices/myEdge/modules/sink/inputs/in1/temp=31.5&%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&%24.cdid=myEdge&%24.cmid=filter"
        );
        let bare = Message {
            topic: "devices/leaf/messages/events/flag".into(),
            properties: crate::message::MessageProperties {
                sender: Some("leaf".into()),
                ..Default::default()
            },
            ..telemetry
        };
        assert_eq!(
            input.topic(&bare),
            "devices/myEdge/modules/sink/inputs/in1/flag=&%24.cdid=leaf"
        );
    }

    /// Goal: the bag's properties are split as edgeHub splits them, the sender is stamped from
    /// the identity (a bag cannot claim another), and the source follows the output.
    #[test]
    fn telemetry_is_seen_as_edgehub_sees_it() {
        let bag = decode(
            "%24.on=alerts&%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&temp=31.5&%24.cdid=forged",
        )
        .expect("bag");
        let filter = id("edge/filter");
        let message = IotMessage::new(&filter, &bag, br#"{"severity":"high"}"#);
        assert_eq!(message.source(), "/messages/modules/filter/outputs/alerts");
        assert_eq!(message.system_property("messageId"), Some("m-1"));
        assert_eq!(message.system_property("connectionDeviceId"), Some("edge"));
        assert_eq!(
            message.system_property("connectionModuleId"),
            Some("filter")
        );
        assert_eq!(message.app_property("temp"), Some("31.5"));
        assert_eq!(
            message.app_property("$.cdid"),
            None,
            "dropped: the identity says"
        );
        assert_eq!(
            message.json_body().and_then(|j| j.get("severity")),
            Some(&serde_json::json!("high"))
        );
        let bag = decode("k=v").expect("bag");
        let plain = IotMessage::new(&filter, &bag, b"{}");
        assert_eq!(plain.source(), "/messages/modules/filter");
        assert_eq!(plain.json_body(), None, "no content type: not JSON");
        let (leaf, empty) = (id("leaf"), Vec::new());
        let leaf = IotMessage::new(&leaf, &empty, b"");
        assert_eq!(leaf.source(), "/messages");
        assert_eq!(leaf.system_property("connectionModuleId"), None);
    }
}
