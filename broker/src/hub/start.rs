//! Start-up: the hub's state rebuilt from the metadata store and the log (stored sessions
//! and their subscriptions, QoS 2 receipts), before any client connects.

use super::{Hub, RECEIPTS_CHECKPOINT, StartError};
use crate::delivery::endpoint::{Queue, checkpoint_key};
use crate::delivery::record::{KIND_PUBLISH, KIND_QOS2_RELEASE, PublishRecord, ReleaseRecord};
use crate::session::Session;
use crate::session::persist::PersistedSession;
use crate::session::receipts::{self, Qos2Receipts};
use spool_storage::{Commit, Meta, Record, StateTable};
use std::time::Duration;

impl Hub {
    /// Restores stored sessions; returns where the log replay must start for them.
    pub(super) fn load_sessions(&mut self, meta: &Meta) -> Result<u64, StartError> {
        let checkpoints = meta.checkpoints()?;
        let mut replay_from = self.wal.durable_seq() + 1;
        for (client_id, stored) in meta.sessions()? {
            let stored =
                PersistedSession::decode(&stored).map_err(|source| StartError::CorruptSession {
                    client_id: client_id.clone(),
                    source,
                })?;
            let expiry = Duration::from_secs(stored.expiry_secs);
            let mut session = Session::new(stored.id, client_id.clone(), expiry, self.clock.now());
            let checkpoint = checkpoints
                .get(&checkpoint_key(session.queue()))
                .copied()
                .unwrap_or(0);
            let replay_floor = checkpoint.max(stored.replay_floor);
            let queue = Queue::new(
                session.queue(),
                client_id.clone(),
                self.limits.session_queue,
                replay_floor,
            );
            self.queues.insert(queue.id, queue);
            session.stored = true;
            // The expiry clock restarts with the process (a new session is offline from
            // now): the time spent down is not counted.
            for (filter, options) in &stored.subscriptions {
                self.subscriptions.subscribe(stored.id, filter, *options);
            }
            session.subscriptions = stored.subscriptions;
            replay_from = replay_from.min(replay_floor + 1);
            self.session_by_client.insert(client_id, stored.id);
            self.sessions.insert(stored.id, session);
        }
        tracing::info!(
            sessions = self.sessions.len(),
            replay_from,
            "restored persistent sessions"
        );
        Ok(replay_from)
    }

    /// Rebuilds the stored sessions' QoS 2 receipts: as stored at their checkpoint, then every
    /// publish and release record after it. This happens before any client connects, and
    /// stored receipts of sessions that no longer exist are removed.
    pub(super) fn restore_receipts(&mut self, meta: &Meta) -> Result<(), StartError> {
        self.receipts_checkpoint = meta.checkpoint(RECEIPTS_CHECKPOINT)?.unwrap_or(0);
        let mut orphans = Vec::new();
        for (key, bytes) in meta.state(StateTable::Qos2Receipts)? {
            let Some(session) = key.parse().ok().and_then(|id| self.sessions.get_mut(&id)) else {
                orphans.push(key);
                continue;
            };
            let stored =
                Qos2Receipts::decode(&bytes).map_err(|source| StartError::CorruptReceipts {
                    client_id: session.client_id.clone(),
                    source,
                })?;
            *receipts::lock(&session.receipts) = stored;
            session.receipts_stored = Some(bytes);
        }
        let removals: Vec<_> = orphans
            .iter()
            .map(|key| (StateTable::Qos2Receipts, key.as_str(), None))
            .collect();
        meta.set_checkpoints_and_state(&[], &removals, Commit::Durable)?;
        let first = self.wal.first_seq();
        if self.receipts_checkpoint + 1 < first {
            tracing::warn!(
                checkpoint = self.receipts_checkpoint,
                first,
                "records the QoS 2 receipts needed were already removed from the log"
            );
        }
        let mut reader = self.wal.reader((self.receipts_checkpoint + 1).max(first))?;
        while let Some(record) = reader.try_next()? {
            self.apply_to_receipts(&record);
        }
        Ok(())
    }

    /// Replays one record into the receipts of its session (undecodable records are reported
    /// when the hub delivers them).
    pub(super) fn apply_to_receipts(&mut self, record: &Record) {
        let change = match record.kind {
            KIND_PUBLISH => PublishRecord::decode(record.payload.clone())
                .ok()
                .and_then(|p| Some((p.publisher, p.qos2_packet_id?, true))),
            KIND_QOS2_RELEASE => ReleaseRecord::decode(record.payload.clone())
                .ok()
                .map(|r| (r.session, r.packet_id, false)),
            _ => None,
        };
        let Some((id, packet_id, logged)) = change else {
            return;
        };
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let mut receipts = receipts::lock(&session.receipts);
        if logged {
            receipts.insert(packet_id, record.seq);
        } else {
            receipts.release(packet_id);
        }
    }
}
