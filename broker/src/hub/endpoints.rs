//! Route endpoints in the hub: their queues, rebuilt at start from the metadata store's
//! catalog, and the sessions that consume them. A module's session takes the messages of each
//! of its inputs it subscribed to (`devices/{d}/modules/{m}/inputs/#`, as the SDKs do) while
//! it is connected; the queues fill whether or not it is.

use super::{Hub, StartError};
use crate::auth::identity::IdentityId;
use crate::delivery::endpoint::{Queue, checkpoint_key};
use crate::delivery::record::QueueId;
use crate::id_hash::IdMap;
use crate::message::QoS;
use crate::routing::SubscriptionOptions;
use crate::routing::endpoints::{EndpointCatalog, EndpointName, EndpointTarget};
use crate::routing::topic;
use crate::session::Consumed;
use spool_storage::Meta;
use std::collections::BTreeMap;

impl Hub {
    /// Creates the queue of every endpoint in the metadata store's catalog, including those
    /// no route reaches any more (they may still hold messages); returns where the log replay
    /// must start for them.
    pub(super) fn load_endpoints(&mut self, meta: &Meta) -> Result<u64, StartError> {
        let catalog = EndpointCatalog::load(meta, self.wal.epoch())?;
        let checkpoints = meta.checkpoints()?;
        let mut replay_from = self.wal.durable_seq() + 1;
        for (name, number) in catalog.iter() {
            let id = QueueId::Endpoint(number);
            // Numbered with its checkpoint in one commit, so it has one.
            let checkpoint = checkpoints.get(&checkpoint_key(id)).copied().unwrap_or(0);
            self.add_endpoint_queue(name.clone(), number, checkpoint);
            replay_from = replay_from.min(checkpoint + 1);
        }
        if !self.endpoints.is_empty() {
            tracing::info!(
                endpoints = self.endpoints.len(),
                replay_from,
                "restored route endpoints"
            );
        }
        Ok(replay_from)
    }

    /// Makes endpoint `number`'s queue, taking records after `checkpoint`, unless it has one.
    fn add_endpoint_queue(&mut self, name: EndpointName, number: u64, checkpoint: u64) {
        let id = QueueId::Endpoint(number);
        let limits = self.limits.endpoint_queue;
        let queue = Queue::new(id, name.to_string(), limits, checkpoint);
        self.queues.entry(id).or_insert(queue);
        self.endpoints.insert(number, name);
    }

    /// Makes the queues of endpoints a reloaded deployment reaches, from `checkpoint` on (no
    /// record up to it names them), and lets connected modules take those they subscribed to.
    pub(super) fn add_endpoints(&mut self, added: Vec<(EndpointName, u64)>, checkpoint: u64) {
        for (name, number) in added {
            self.add_endpoint_queue(name, number, checkpoint);
        }
        let modules: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.attachment().is_some() && s.identity.is_some())
            .map(|s| s.id)
            .collect();
        for id in modules {
            self.attach_endpoints(id);
            self.pump(id);
        }
    }

    /// Makes session `id` consume the inputs it subscribed to, if it is a connected module.
    /// An input it unsubscribed from is held (`Session::held`) until the connection ends; then
    /// what it had in flight from its inputs goes back to the front of their queues.
    pub(super) fn attach_endpoints(&mut self, id: u64) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let mut wanted = Vec::new();
        if session.attachment().is_some()
            && let Some(IdentityId {
                device,
                module: Some(module),
            }) = &session.identity
        {
            for (number, name) in &self.endpoints {
                let EndpointTarget::ModuleInput(to) = &name.target else {
                    continue;
                };
                if to.device == *device
                    && to.module == *module
                    && let Some(qos) = input_subscribed(&session.subscriptions, &to.input)
                {
                    wanted.push(Consumed {
                        queue: QueueId::Endpoint(*number),
                        priority: name.priority,
                        qos,
                    });
                }
            }
        }
        wanted.sort_by_key(|c| (c.priority, c.queue));
        let connected = session.attachment().is_some();
        for old in &session.consumes {
            if wanted.iter().any(|c| c.queue == old.queue) {
                continue;
            }
            if connected {
                // Unsubscribed: what the client was sent stays in flight, for its
                // acknowledgements; nothing more goes to it.
                if let Some(queue) = self.queues.get_mut(&old.queue) {
                    queue.consumer = None;
                }
                if !session.held.contains(&old.queue) {
                    session.held.push(old.queue);
                }
            } else {
                let_go(&mut self.queues, old.queue);
            }
        }
        session
            .held
            .retain(|held| !wanted.iter().any(|c| c.queue == *held));
        if !connected {
            // What the connection held but did not acknowledge goes back to the front.
            for held in std::mem::take(&mut session.held) {
                let_go(&mut self.queues, held);
            }
        }
        for consumed in &wanted {
            if let Some(queue) = self.queues.get_mut(&consumed.queue) {
                debug_assert!(
                    queue.consumer.is_none_or(|c| c == id),
                    "one identity, one session"
                );
                queue.consumer = Some(id);
            }
        }
        // Entries stay in flight across a change of subscription QoS: they keep their ids.
        session.consumes = wanted;
    }
}

/// Lets go of an endpoint a session consumed: its messages in flight go back to the front of
/// the queue, to be sent again (with DUP) to whoever consumes it next.
pub(super) fn let_go(queues: &mut IdMap<QueueId, Queue>, queue: QueueId) {
    if let Some(queue) = queues.get_mut(&queue) {
        queue.entries.requeue_in_flight();
        queue.consumer = None;
    }
}

/// The QoS at which a module's subscriptions take its input `input`: the highest of its input
/// filters (`devices/{d}/modules/{m}/inputs/…`, which name the module: it may hold no others)
/// that match the input's topics.
fn input_subscribed(
    subscriptions: &BTreeMap<String, SubscriptionOptions>,
    input: &str,
) -> Option<QoS> {
    let topic = format!("{input}/properties");
    subscriptions
        .iter()
        .filter_map(|(filter, options)| {
            let mut levels = filter.splitn(6, '/');
            let prefix: Vec<&str> = levels.by_ref().take(5).collect();
            let is_input = matches!(prefix.as_slice(), ["devices", _, "modules", _, "inputs"]);
            let rest = levels.next()?;
            (is_input && topic::matches(rest, &topic)).then_some(options.qos)
        })
        .max()
}
