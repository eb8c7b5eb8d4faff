//! Direct-method requests (`method::Methods`): each goes to its target's connection, at QoS 0
//! as IoT Hub sends them, if the target's session is connected and subscribed to the request's
//! topic. A request is a call under way, not a message: nothing of it is logged or put in the
//! session's queue, and one whose connection ends before it is sent ends with it (its caller
//! gets its timeout).

use super::Hub;
use crate::hub::events::{Delivery, Outbound};
use crate::method::{MethodDelivery, MethodRequest};
use crate::session::{Attachment, WaitingRequest};

impl Hub {
    /// Sends `request` to its target's connection, ahead of its queues, as soon as the
    /// connection's channel has room. The requests waiting for room are bounded by
    /// `method::PENDING_MAX`: a call hands the hub one request, and those whose callers
    /// stopped waiting go as others come.
    pub(super) fn send_method_request(&mut self, request: MethodRequest) -> MethodDelivery {
        let MethodRequest {
            target,
            topic,
            payload,
            abandoned,
        } = request;
        let Some(&id) = self.session_by_client.get(&target.to_string()) else {
            return MethodDelivery::NotConnected;
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            return MethodDelivery::NotConnected;
        };
        let subscription_ids = match session.subscription_for(&topic) {
            Some(options) if session.identity.as_ref() == Some(&target) => {
                options.subscription_id.into_iter().collect()
            }
            _ => return MethodDelivery::NotConnected,
        };
        let Some(attachment) = session
            .attachment_mut()
            .filter(|attachment| !attachment.outbound.is_closed())
        else {
            return MethodDelivery::NotConnected;
        };
        let delivery = Delivery::unlogged(topic, payload, subscription_ids);
        let requests = &mut attachment.method_requests;
        requests.retain(|waiting| !waiting.abandoned.is_cancelled());
        requests.push_back(WaitingRequest {
            delivery,
            abandoned,
        });
        self.pump(id);
        MethodDelivery::Sent
    }
}

/// The next method request to send on `attachment`'s connection: the first one whose caller
/// still waits (the others are dropped).
pub(super) fn next_method_request(attachment: &mut Attachment) -> Option<Outbound> {
    while let Some(waiting) = attachment.method_requests.pop_front() {
        if !waiting.abandoned.is_cancelled() {
            return Some(Outbound::Publish(waiting.delivery));
        }
    }
    None
}
