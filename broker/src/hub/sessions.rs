//! Sessions: CONNECT (new, resumed or taken over), disconnection, expiry, and what the metadata
//! store keeps of a persistent session.

use super::Hub;
use super::endpoints::let_go;
use super::metadata::{Completion, MetaWriter};
use crate::auth::identity::IdentityId;
use crate::auth::policy::{Client, Policy};
use crate::delivery::endpoint::{Queue, checkpoint_key};
use crate::hub::events::{ConnectOutcome, ConnectRefusal, ConnectRequest, Outbound, Protocol};
use crate::iothub;
use crate::message::Will;
use crate::session::receipts;
use crate::session::{Attachment, Session};
use spool_storage::{MetaChange, StateTable};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Hub {
    pub(super) fn connect(&mut self, request: ConnectRequest) {
        let expiry = match request.protocol {
            Protocol::V5 => Duration::from_secs(u64::from(request.session_expiry_secs)),
            Protocol::V311 if request.clean_start => Duration::ZERO,
            Protocol::V311 => self.limits.session_expiry_v311,
        };
        let existing = self.take_over(&request);
        let session_present = existing.is_some() && !request.clean_start;
        let id = match self.session_by_client.get(&request.client_id) {
            Some(&id) => id,
            None if self.sessions.len() >= self.limits.sessions_max => {
                let max = self.limits.sessions_max;
                tracing::warn!(client_id = %request.client_id, "refused a new session: {max} sessions exist");
                let _ = request.reply.send(Err(ConnectRefusal::SessionsFull));
                return;
            }
            None => {
                let id = self.next_session_id;
                self.next_session_id += 1;
                let session = Session::new(id, request.client_id.clone(), expiry, self.clock.now());
                let queue = Queue::new(
                    session.queue(),
                    request.client_id.clone(),
                    self.limits.session_queue,
                    self.tail.next_seq() - 1,
                );
                self.queues.insert(queue.id, queue);
                self.sessions.insert(id, session);
                self.session_by_client.insert(request.client_id.clone(), id);
                id
            }
        };
        if self.drop_subscriptions_not_allowed(id, request.identity.as_ref()) {
            // Stored by the connect that follows.
            self.router.install(self.subscriptions.clone());
        }
        let session = self.sessions.get_mut(&id).expect("just ensured");
        session.expiry = expiry;
        session.identity = request.identity;
        session.attach(Attachment {
            connection: request.connection,
            protocol: request.protocol,
            outbound: request.outbound,
            window: usize::from(request.receive_max.min(self.limits.in_flight_max).max(1)),
            method_requests: VecDeque::new(),
            _released: request.released.drop_guard(),
        });
        receipts::lock(&session.receipts).set_owner(request.connection);
        let outcome = ConnectOutcome {
            session: id,
            session_present,
            receipts: Arc::clone(&session.receipts),
        };
        let (reply, client_id) = (request.reply, request.client_id);
        // The CONNACK goes once the session is stored. If that fails, the session works; only
        // its survival across a restart is at risk. Subscribing stores it again, and refuses
        // the subscription if that fails too.
        self.store_session(
            id,
            Some(Box::new(move |stored| {
                if let Err(e) = stored {
                    tracing::error!(%client_id, "failed to store the session: {e}");
                }
                let _ = reply.send(Ok(outcome));
            })),
        );
        self.attach_endpoints(id);
        self.pump(id);
    }

    /// Removes the subscriptions of session `id` that its client, `identity` if it has one,
    /// may not hold by IoT Hub's rules and the authorization policy; true if any went (the
    /// caller stores the session and installs the routing snapshot).
    pub(super) fn drop_subscriptions_not_allowed(
        &mut self,
        id: u64,
        identity: Option<&IdentityId>,
    ) -> bool {
        let Some(session) = self.sessions.get_mut(&id) else {
            return false;
        };
        let client = Client {
            client_id: &session.client_id,
            identity,
        };
        let refused: Vec<String> = session
            .subscriptions
            .keys()
            .filter(|filter| !iothub::check_subscribe(&client, filter, &self.policy))
            .cloned()
            .collect();
        if refused.is_empty() {
            return false;
        }
        for filter in &refused {
            session.subscriptions.remove(filter);
            self.subscriptions.unsubscribe(id, filter);
        }
        let client_id = &session.client_id;
        tracing::warn!(%client_id, ?refused, "dropped subscriptions the client may not hold");
        true
    }

    /// A deployment put a new authorization `policy` in force: every session loses the
    /// subscriptions it no longer allows (stored), so no message reaches them from now on.
    /// Connected clients check their admission themselves (`Authenticator::changes`).
    pub(super) fn policy_changed(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
        let sessions: Vec<(u64, Option<IdentityId>)> = self
            .sessions
            .values()
            .map(|session| (session.id, session.identity.clone()))
            .collect();
        let mut changed = false;
        for (id, identity) in sessions {
            if self.drop_subscriptions_not_allowed(id, identity.as_ref()) {
                self.store_session(id, None);
                changed = true;
            }
        }
        if changed {
            self.router.install(self.subscriptions.clone());
        }
    }

    /// Detaches the client's existing session, if any, from its old connection (which is told
    /// it was taken over), and removes it for a clean start; returns it.
    fn take_over(&mut self, request: &ConnectRequest) -> Option<u64> {
        let id = self.session_by_client.get(&request.client_id).copied()?;
        if let Some(old) = self.detach(id) {
            tracing::info!(client_id = %request.client_id, "session taken over by a new connection");
            let _ = old.outbound.try_send(Outbound::SessionTakenOver);
        }
        let session = self
            .sessions
            .get_mut(&id)
            .expect("index and sessions agree");
        if request.clean_start {
            self.remove_session(id);
        } else if session.cancel_will().is_some() {
            tracing::debug!(client_id = %request.client_id, "session resumed within its will delay: will not published");
        }
        Some(id)
    }

    /// Detaches session `id` from its connection, if it has one, and returns it: what was in
    /// flight goes back to the front of the session's queue and of the endpoints it consumed,
    /// which it lets go.
    fn detach(&mut self, id: u64) -> Option<Attachment> {
        let session = self.sessions.get_mut(&id)?;
        let attachment = session.detach(self.clock.now())?;
        if let Some(queue) = self.queues.get_mut(&session.queue()) {
            queue.entries.requeue_in_flight();
        }
        self.attach_endpoints(id);
        Some(attachment)
    }

    /// Whether session `id` is attached to `connection` (and not to one that took it over).
    pub(super) fn is_attached(&self, id: u64, connection: u64) -> bool {
        self.sessions
            .get(&id)
            .and_then(Session::attachment)
            .is_some_and(|a| a.connection == connection)
    }

    pub(super) fn disconnected(
        &mut self,
        id: u64,
        connection: u64,
        will: Option<Box<Will>>,
        session_expiry_secs: Option<u32>,
    ) {
        if !self.is_attached(id, connection) {
            // A connection that was already taken over: only its will may still go.
            if let Some(will) = will {
                self.will_due(id, false, will);
            }
            return;
        }
        self.detach(id);
        let session = self.sessions.get_mut(&id).expect("attached above");
        if let Some(secs) = session_expiry_secs {
            session.expiry = Duration::from_secs(u64::from(secs));
        }
        if let Some(will) = will {
            self.will_due(id, true, will);
        }
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        if session.expiry.is_zero() {
            self.remove_session(id);
            return;
        }
        if session_expiry_secs.is_some() {
            self.store_session(id, None); // a failure is logged
        }
    }

    pub(super) fn remove_session(&mut self, id: u64) {
        let Some(mut session) = self.sessions.remove(&id) else {
            return;
        };
        self.session_by_client.remove(&session.client_id);
        self.queues.remove(&session.queue());
        for consumed in &session.consumes {
            let_go(&mut self.queues, consumed.queue);
        }
        for filter in session.subscriptions.keys() {
            self.subscriptions.unsubscribe(id, filter);
        }
        self.router.install(self.subscriptions.clone());
        if let Some(will) = session.cancel_will() {
            self.publish_will(id, *will);
        }
        if session.stored {
            forget_stored(&self.metadata, &mut session, None);
        }
    }

    /// Stores a persistent session (durably). A session that stopped being persistent (an
    /// MQTT 5 client reconnecting with expiry 0) loses its stored copy: after a crash it must
    /// not come back, and neither must QoS 2 receipts no longer kept up to date.
    pub(super) fn store_session(&mut self, id: u64, done: Option<Completion>) {
        match self.sessions.get_mut(&id) {
            Some(session) if session.is_persistent() => {
                let replay_floor = self
                    .queues
                    .get(&session.queue())
                    .map_or(0, |q| q.replay_floor);
                let change = MetaChange::Session {
                    client_id: session.client_id.clone(),
                    state: Some(session.to_persisted(replay_floor).encode()),
                };
                session.stored = true;
                self.metadata.write(vec![change], done);
            }
            Some(session) if session.stored => forget_stored(&self.metadata, session, done),
            Some(_) | None => {
                if let Some(done) = done {
                    done(Ok(()));
                }
            }
        }
    }

    pub(super) fn expire_sessions(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.is_expired(now))
            .map(|s| s.id)
            .collect();
        for id in expired {
            tracing::info!(session = id, "session expired");
            self.remove_session(id);
        }
    }
}

/// Removes what the metadata store holds of a session: the session, its checkpoint and its
/// QoS 2 receipts.
fn forget_stored(metadata: &MetaWriter, session: &mut Session, done: Option<Completion>) {
    let mut changes = vec![
        MetaChange::Session {
            client_id: session.client_id.clone(),
            state: None,
        },
        MetaChange::RemoveCheckpoint(checkpoint_key(session.queue())),
    ];
    if session.receipts_stored.take().is_some() {
        changes.push(MetaChange::State {
            table: StateTable::Qos2Receipts,
            key: session.id.to_string(),
            value: None,
        });
    }
    session.stored = false;
    session.forgotten += 1;
    metadata.write(changes, done);
}
