//! Direct-method requests (`method::Methods`): each goes to its target's connection, at QoS 0
//! as IoT Hub sends them, if the target's session is connected and subscribed to the request's
//! topic. A request is a call under way, not a message: nothing of it is logged or put in the
//! session's queue, and one whose connection ends before it is sent ends with it (its caller
//! gets its timeout).

use super::Hub;
use crate::auth::identity::IdentityId;
use crate::hub::events::Delivery;
use crate::message::{Message, MessageProperties, QoS};
use crate::method::MethodDelivery;
use bytes::Bytes;
use std::sync::Arc;

impl Hub {
    /// Sends a request on `topic` to `target`'s connection, ahead of its queues, as soon as the
    /// connection's channel has room. The requests waiting for room are bounded by
    /// `method::PENDING_MAX`: a call hands the hub one request, and waits for its answer.
    pub(super) fn send_method_request(
        &mut self,
        target: &IdentityId,
        topic: String,
        payload: Bytes,
    ) -> MethodDelivery {
        let Some(&id) = self.session_by_client.get(&target.to_string()) else {
            return MethodDelivery::NotConnected;
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            return MethodDelivery::NotConnected;
        };
        let subscription_ids = match session.subscription_for(&topic) {
            Some(options) if session.identity.as_ref() == Some(target) => {
                options.subscription_id.into_iter().collect()
            }
            _ => return MethodDelivery::NotConnected,
        };
        let Some(attachment) = session.attachment_mut() else {
            return MethodDelivery::NotConnected;
        };
        let message = Message {
            topic,
            payload,
            qos: QoS::AtMostOnce,
            retain: false,
            properties: MessageProperties::default(),
        };
        attachment.method_requests.push_back(Delivery {
            packet_id: None,
            qos: QoS::AtMostOnce,
            dup: false,
            retain: false,
            subscription_ids,
            message: Arc::new(message),
            input: None,
        });
        self.pump(id);
        MethodDelivery::Sent
    }
}
