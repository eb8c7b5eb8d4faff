//! Sessions: CONNECT (new, resumed or taken over), disconnection, expiry, and what the metadata
//! store keeps of a persistent session.

use super::Hub;
use crate::hub::events::{ConnectOutcome, ConnectRefusal, ConnectRequest, Outbound};
use crate::message::Will;
use crate::session::receipts;
use crate::session::{Attachment, Session};
use spool_storage::{Commit, Meta, StateTable};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Hub {
    pub(super) fn connect(&mut self, request: ConnectRequest) {
        let expiry = match request.protocol {
            crate::hub::events::Protocol::V5 => {
                Duration::from_secs(u64::from(request.session_expiry_secs))
            }
            crate::hub::events::Protocol::V311 if request.clean_start => Duration::ZERO,
            crate::hub::events::Protocol::V311 => self.limits.session_expiry_v311,
        };
        let existing = self.session_by_client.get(&request.client_id).copied();
        if let Some(id) = existing {
            let session = self
                .sessions
                .get_mut(&id)
                .expect("index and sessions agree");
            if let Some(old) = session.attachment.take() {
                tracing::info!(client_id = %request.client_id, "session taken over by a new connection");
                let _ = old.outbound.try_send(Outbound::SessionTakenOver);
                session.queue.requeue_in_flight();
            }
            if request.clean_start {
                self.remove_session(id);
            } else if session.pending_will.take().is_some() {
                tracing::debug!(client_id = %request.client_id, "session resumed within its will delay: will not published");
            }
        }
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
                let mut session = Session::new(
                    id,
                    request.client_id.clone(),
                    expiry,
                    self.limits.session_queue_max,
                );
                session.replay_floor = self.tail.next_seq() - 1;
                session.checkpoint = session.replay_floor;
                self.sessions.insert(id, session);
                self.session_by_client.insert(request.client_id.clone(), id);
                id
            }
        };
        let session = self.sessions.get_mut(&id).expect("just ensured");
        session.expiry = expiry;
        session.detached_at = None;
        session.attachment = Some(Attachment {
            connection: request.connection,
            protocol: request.protocol,
            outbound: request.outbound,
            window: usize::from(request.receive_max.min(self.limits.in_flight_max).max(1)),
            _released: request.released.drop_guard(),
        });
        receipts::lock(&session.receipts).set_owner(request.connection);
        let receipts = Arc::clone(&session.receipts);
        if let Err(e) = self.store_session(id) {
            // The session works; only its survival across a restart is at risk. Subscribing
            // stores it again, and refuses the subscription if that fails too.
            tracing::error!(client_id = %request.client_id, "failed to store the session: {e}");
        }
        let _ = request.reply.send(Ok(ConnectOutcome {
            session: id,
            session_present,
            receipts,
        }));
        self.pump(id);
    }

    /// Whether session `id` is attached to `connection` (and not to one that took it over).
    pub(super) fn is_attached(&self, id: u64, connection: u64) -> bool {
        self.sessions
            .get(&id)
            .and_then(|s| s.attachment.as_ref())
            .is_some_and(|a| a.connection == connection)
    }

    pub(super) fn disconnected(
        &mut self,
        id: u64,
        connection: u64,
        will: Option<Box<Will>>,
        session_expiry_secs: Option<u32>,
    ) {
        let attached = self.is_attached(id, connection);
        if let Some(will) = will {
            self.will_due(id, attached, will);
        }
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if !attached {
            return; // a connection that was already taken over
        }
        session.attachment = None;
        session.queue.requeue_in_flight();
        if let Some(secs) = session_expiry_secs {
            session.expiry = Duration::from_secs(u64::from(secs));
        }
        if session.expiry.is_zero() {
            self.remove_session(id);
            return;
        }
        session.detached_at = Some(Instant::now());
        if session_expiry_secs.is_some()
            && let Err(e) = self.store_session(id)
        {
            tracing::error!(
                session = id,
                "failed to store the session's new expiry: {e}"
            );
        }
    }

    pub(super) fn remove_session(&mut self, id: u64) {
        let Some(mut session) = self.sessions.remove(&id) else {
            return;
        };
        self.session_by_client.remove(&session.client_id);
        for filter in session.subscriptions.keys() {
            self.subscriptions.unsubscribe(id, filter);
        }
        self.router.install(self.subscriptions.clone());
        if let Some((will, _)) = session.pending_will.take() {
            self.publish_will(id, *will);
        }
        if session.stored {
            forget_stored(&self.meta, &mut session);
        }
    }

    /// Stores a persistent session (durably). A session that stopped being persistent (an
    /// MQTT 5 client reconnecting with expiry 0) loses its stored copy: after a crash it must
    /// not come back, and neither must QoS 2 receipts no longer kept up to date.
    pub(super) fn store_session(&mut self, id: u64) -> spool_storage::Result<()> {
        match self.sessions.get_mut(&id) {
            Some(session) if session.is_persistent() => {
                let stored = session.to_persisted().encode();
                self.meta.put_session(&session.client_id, Some(&stored))?;
                session.stored = true;
                Ok(())
            }
            Some(session) if session.stored => {
                forget_stored(&self.meta, session);
                Ok(())
            }
            Some(_) | None => Ok(()),
        }
    }

    pub(super) fn expire_sessions(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.attachment.is_none() && s.is_expired(now))
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
fn forget_stored(meta: &Meta, session: &mut Session) {
    let receipts_key = session.id.to_string();
    let forget = meta
        .put_session(&session.client_id, None)
        .and_then(|()| meta.remove_checkpoint(&session.checkpoint_key(), Commit::Durable))
        .and_then(|()| match session.receipts_stored {
            // A leftover is harmless: it is removed at the next start.
            Some(_) => meta.set_checkpoints_and_state(
                &[],
                &[(StateTable::Qos2Receipts, &receipts_key, None)],
                Commit::Deferred,
            ),
            None => Ok(()),
        });
    if let Err(e) = forget {
        tracing::error!(client_id = %session.client_id, "failed to remove a stored session: {e}");
    }
    session.stored = false;
    session.receipts_stored = None;
}
