//! SUBSCRIBE and UNSUBSCRIBE: the hub's subscription table, the snapshot publishers route
//! with, and the retained messages a new subscription gets.

use super::Hub;
use crate::auth::policy::Client;
use crate::delivery::queue::QueueEntry;
use crate::delivery::record::{KIND_PUBLISH, PublishRecord, QueueId, Target};
use crate::hub::events::SubscribeRefusal;
use crate::iothub;
use crate::limits::SUBSCRIPTIONS_PER_SESSION_MAX;
use crate::message::{Message, QoS};
use crate::routing::{RetainHandling, SubscriptionOptions};
use spool_storage::Wal;
use tokio::sync::oneshot;

impl Hub {
    /// Subscribes; `reply` gets the outcome of each filter once a persistent session's
    /// subscriptions are durable (a SUBACK never grants what a restart would forget).
    pub(super) fn subscribe(
        &mut self,
        id: u64,
        filters: Vec<(String, SubscriptionOptions)>,
        reply: oneshot::Sender<Vec<Result<QoS, SubscribeRefusal>>>,
    ) {
        // A retained publish acknowledged before this SUBSCRIBE must be seen by it: take in
        // every record that is already durable (its PUBACK may have gone out) first.
        self.read_durable_records();
        let Some(session) = self.sessions.get_mut(&id) else {
            // The session ended (taken over with a clean start) while this request waited.
            let _ = reply.send(vec![Err(SubscribeRefusal::Unavailable); filters.len()]);
            return;
        };
        let mut outcomes = Vec::with_capacity(filters.len());
        let mut retained_for = Vec::new();
        let mut routing_changed = false;
        let client = Client {
            client_id: &session.client_id,
            identity: session.identity.as_ref(),
        };
        for (filter, options) in filters {
            if !iothub::check_subscribe(&client, &filter, &self.policy) {
                let client_id = &session.client_id;
                tracing::info!(%client_id, "refused a subscription to {filter:?}: not authorized");
                outcomes.push(Err(SubscribeRefusal::NotAuthorized));
                continue;
            }
            let full = session.subscriptions.len() >= SUBSCRIPTIONS_PER_SESSION_MAX
                && !session.subscriptions.contains_key(&filter);
            if full {
                outcomes.push(Err(SubscribeRefusal::QuotaExceeded));
                continue;
            }
            self.subscriptions.subscribe(id, &filter, options);
            let held_before = session.subscriptions.insert(filter.clone(), options);
            let is_new = held_before.is_none();
            routing_changed |= held_before != Some(options);
            let send_retained = match options.retain_handling {
                RetainHandling::AtSubscribe => true,
                RetainHandling::AtNewSubscribe => is_new,
                RetainHandling::Never => false,
            };
            if send_retained {
                retained_for.push((filter, options));
            }
            outcomes.push(Ok(options.qos));
        }
        // Publishers see the new subscriptions only after the retained copies are queued in
        // the log, so a publish routed to them cannot overtake the copies.
        self.queue_retained(id, &retained_for);
        if routing_changed {
            self.router.install(self.subscriptions.clone());
        }
        self.attach_endpoints(id);
        self.pump(id);
        let stored = move |result: spool_storage::Result<()>| {
            let outcomes = match result {
                Ok(()) => outcomes,
                Err(e) => {
                    tracing::error!(session = id, "failed to store subscriptions: {e}");
                    vec![Err(SubscribeRefusal::Unavailable); outcomes.len()]
                }
            };
            let _ = reply.send(outcomes);
        };
        self.store_session(id, Some(Box::new(stored)));
    }

    /// Queues the retained messages matching new subscriptions (the caller pumps); they go out
    /// after the SUBACK (the connection sends it before it takes more from its channel), with
    /// RETAIN set. A persistent session gets them at QoS 1 and 2 as logged copies (see
    /// `log_retained_copy`).
    pub(super) fn queue_retained(
        &mut self,
        id: u64,
        subscriptions: &[(String, SubscriptionOptions)],
    ) {
        let now = self.clock.unix_ms();
        let position = self.tail.next_seq() - 1;
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let persistent = session.is_persistent();
        let Some(queue) = self.queues.get_mut(&session.queue()) else {
            return;
        };
        for (filter, options) in subscriptions {
            for message in self.retained.matching(filter, now) {
                // MQTT requires the lower of the two QoS even here.
                let qos = message.qos.min(options.qos);
                let ids: Vec<u32> = options.subscription_id.into_iter().collect();
                if persistent
                    && qos != QoS::AtMostOnce
                    && log_retained_copy(&self.wal, id, &message, qos, ids.clone())
                {
                    continue;
                }
                let entry = QueueEntry {
                    bytes: message.size_bytes() as u64,
                    deadline_ms: message.properties.expires_at_ms,
                    retained: Some(message),
                    ..QueueEntry::new(position, qos, true, ids)
                };
                queue.enqueue(entry);
            }
        }
    }

    /// Unsubscribes; `reply` says which subscriptions existed, once the change is stored.
    pub(super) fn unsubscribe(
        &mut self,
        id: u64,
        filters: &[String],
        reply: oneshot::Sender<Vec<bool>>,
    ) {
        if !self.sessions.contains_key(&id) {
            let _ = reply.send(vec![false; filters.len()]);
            return;
        }
        let existed: Vec<bool> = filters
            .iter()
            .map(|filter| {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.subscriptions.remove(filter);
                }
                self.subscriptions.unsubscribe(id, filter)
            })
            .collect();
        self.router.install(self.subscriptions.clone());
        self.attach_endpoints(id);
        let stored = move |result: spool_storage::Result<()>| {
            if let Err(e) = result {
                tracing::error!(session = id, "failed to store subscriptions: {e}");
            }
            let _ = reply.send(existed);
        };
        self.store_session(id, Some(Box::new(stored)));
    }
}

/// Logs a retained message for a new subscription of a persistent session: its own record may
/// be long gone from the log, and without one a crash would lose the delivery (and, at QoS 2,
/// the client's packet id state). The hub's tail queues it once durable. False when the log
/// cannot take it at once (its queue or quota is full): the copy then waits in memory only.
fn log_retained_copy(
    wal: &Wal,
    session: u64,
    message: &Message,
    qos: QoS,
    subscription_ids: Vec<u32>,
) -> bool {
    let target = Target {
        queue: QueueId::Session(session),
        qos,
        retain_as_published: true,
        subscription_ids,
        deadline_ms: None,
    };
    let record = PublishRecord {
        retained_copy: true,
        ..PublishRecord::of_spool(message.clone(), vec![target])
    };
    match wal.try_submit(KIND_PUBLISH, record.encode()) {
        Ok(_durable) => true,
        Err(e) => {
            tracing::warn!(topic = %message.topic, "retained message queued without a log record: {e}");
            false
        }
    }
}
