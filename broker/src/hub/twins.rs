//! Desired-property patches (edgehub-contract.md §1.5): each goes to its module's session as a
//! message on `$iothub/twin/PATCH/properties/desired/?$version={n}`, logged for that session
//! alone like any message, so it reaches the module in order with the rest and survives a
//! crash. Only a session subscribed to its desired properties gets it; a module that was not
//! reads the whole twin when it connects, as the SDKs do.

use super::Hub;
use super::appends::{Metering, OwnAppend};
use crate::delivery::record::{KIND_PUBLISH, PublishRecord, QueueId, Target};
use crate::message::{Message, MessageProperties, QoS};
use crate::twin::DesiredPatch;

impl Hub {
    /// Logs each of `patches` for the session of its identity, if it is subscribed.
    pub(super) fn send_desired_patches(&mut self, patches: Vec<DesiredPatch>) {
        for DesiredPatch {
            identity,
            version,
            patch,
        } in patches
        {
            let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
            let Some(&id) = self.session_by_client.get(&identity.to_string()) else {
                continue;
            };
            let Some(session) = self.sessions.get(&id) else {
                continue;
            };
            let Some(options) = session.subscription_for(&topic) else {
                continue;
            };
            // Modules get their desired properties at QoS 1 at most, as from IoT Hub.
            let qos = options.qos.min(QoS::AtLeastOnce);
            let message = Message {
                topic,
                payload: patch.to_string().into(),
                qos,
                retain: false,
                properties: MessageProperties::default(),
            };
            let target = Target {
                queue: QueueId::Session(id),
                qos,
                retain_as_published: false,
                subscription_ids: options.subscription_id.into_iter().collect(),
                deadline_ms: None,
            };
            let record = PublishRecord::of_spool(message, vec![target]);
            self.append_own(OwnAppend {
                kind: KIND_PUBLISH,
                payload: record.encode(),
                // At the quota it is dropped with a log line; the module reads its whole twin
                // when it next connects.
                metering: Metering::Quota,
                what: "a desired-property patch",
            });
        }
    }
}
