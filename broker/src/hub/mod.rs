//! The hub: the single owner of sessions, subscriptions and delivery queues.
//!
//! It processes connection events with synchronous handlers (no `.await` inside a handler) and
//! follows the write-ahead log with a reader that sees only durable records: each publish record
//! names the sessions it goes to, so the hub appends its sequence number to their queues and
//! sends what their windows allow. It never blocks on a connection: packets go out with a bounded
//! `try_send`, and what does not fit stays in the queue until the next acknowledgement. It reads
//! the time only from its [`Clock`], which tests move by hand (`tests/hub_clock.rs`).
//!
//! # Layout
//! This file holds the state and the event loop; each concern adds its handlers:
//! - `start`: rebuilding sessions and QoS 2 receipts from storage before anyone connects;
//! - `sessions`: CONNECT, takeover, disconnection, expiry, the stored copy of a session;
//! - `subscriptions`: SUBSCRIBE/UNSUBSCRIBE, the routing snapshot, retained messages sent to new
//!   subscriptions (the retained messages themselves are in `retained`);
//! - `delivery`: durable records into queues, queues to connections, client acknowledgements;
//! - `endpoints`: route endpoints' queues (module inputs, `$upstream`) and the sessions that
//!   consume them;
//! - `checkpoints`: committed progress, and the log's space reclaimed by liveness;
//! - `loads`: messages no longer cached, read back for delivery off the hub's task;
//! - `metadata`, `appends`: the metadata writer, and records the hub logs itself;
//! - `wills`; `twins`: desired-property patches for modules; `methods`: direct-method requests
//!   to modules; `events`: the messages between connections and the hub.

mod appends;
mod checkpoints;

pub use appends::{OwnAppend, append_handed_over, append_when_asked};
pub use checkpoints::reclaim_when_asked;

/// Where the hub asks for the work it does not do on its own task, made by
/// [`HubHelpers::new`]: the server runs the helpers on the other ends as tasks
/// ([`HelperRequests::spawn`]), and the metadata writer commits on its thread; a simulation
/// does all four itself, when its seed says.
#[derive(Debug)]
pub struct HubHelpers {
    reclaims: mpsc::Sender<Liveness>,
    appender: mpsc::Sender<OwnAppend>,
    metadata: MetaWriter,
    loads: mpsc::Sender<LoadRequest>,
}

/// The helpers' ends of [`HubHelpers`]: what the hub asks for.
#[derive(Debug)]
pub struct HelperRequests {
    pub reclaims: mpsc::Receiver<Liveness>,
    pub appends: mpsc::Receiver<OwnAppend>,
    pub loads: mpsc::Receiver<LoadRequest>,
}

impl HubHelpers {
    /// The hub's helper channels, each as large as the hub relies on, and `metadata`, the
    /// writer of its metadata.
    #[must_use]
    pub fn new(metadata: MetaWriter) -> (HubHelpers, HelperRequests) {
        // One reclaim asked for at a time: the hub asks again at its next tick.
        let (reclaims, reclaim_requests) = mpsc::channel(1);
        let (appender, appends) = mpsc::channel(OWN_APPENDS_MAX);
        // Room for every load the hub has under way.
        let (loads, load_requests) = mpsc::channel(LOAD_REQUESTS_MAX);
        let helpers = HubHelpers {
            reclaims,
            appender,
            metadata,
            loads,
        };
        let requests = HelperRequests {
            reclaims: reclaim_requests,
            appends,
            loads: load_requests,
        };
        (helpers, requests)
    }
}

impl HelperRequests {
    /// Runs the helpers as tasks on the current runtime; they end when the hub does.
    pub fn spawn(self, wal: &Wal) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(reclaim_when_asked(wal.clone(), self.reclaims)),
            tokio::spawn(append_when_asked(wal.clone(), self.appends)),
            tokio::spawn(load_when_asked(wal.clone(), self.loads)),
        ]
    }
}
mod delivery;
mod endpoints;
pub mod events;
mod loads;
mod metadata;
mod methods;
pub use loads::{LoadRequest, load_asked, load_when_asked};
pub use metadata::MetaWriter;
pub mod retained;
mod sessions;
mod start;
mod subscriptions;
mod twins;
mod wills;

use crate::auth::policy::Policy;
use crate::clock::Clock;
use crate::delivery::cache::MessageCache;
use crate::delivery::endpoint::Queue;
use crate::delivery::queue::QueueLimits;
use crate::delivery::record::QueueId;
use crate::encoding::FormatError;
use crate::hub::checkpoints::ProgressReport;
use crate::hub::events::Event;
use crate::hub::loads::Loaded;
use crate::hub::retained::RetainedMessages;
use crate::id_hash::{IdMap, IdSet};
use crate::limits::{LOAD_REQUESTS_MAX, OWN_APPENDS_MAX, RECLAIM_INTERVAL};
use crate::routing::endpoints::{CatalogError, EndpointName};
use crate::routing::{Router, SubscriptionTable};
use crate::session::Session;
use spool_storage::{Liveness, Meta, Wal, WalReader};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The limits the hub enforces on sessions.
#[derive(Debug, Clone)]
pub struct HubLimits {
    /// The most messages in flight towards one client.
    pub in_flight_max: u16,
    /// The most sessions, connected or not; a CONNECT that would create one more is refused.
    pub sessions_max: usize,
    /// What one session's queue keeps at most.
    pub session_queue: QueueLimits,
    /// What one route endpoint's queue (a module input, `$upstream`) keeps at most.
    pub endpoint_queue: QueueLimits,
    /// How long a persistent MQTT 3.1.1 session outlives its connection.
    pub session_expiry_v311: Duration,
    /// Bytes of recent messages kept in memory for delivery; older ones are read back.
    pub message_cache_bytes: usize,
}

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] spool_storage::Error),
    #[error("the stored session of client {client_id:?} is corrupt: {source}")]
    CorruptSession {
        client_id: String,
        source: FormatError,
    },
    #[error(transparent)]
    Endpoints(#[from] CatalogError),
    #[error("the stored retained message of topic {topic:?} is corrupt: {source}")]
    CorruptRetained { topic: String, source: FormatError },
    #[error("the stored QoS 2 receipts of client {client_id:?} are corrupt: {source}")]
    CorruptReceipts {
        client_id: String,
        source: FormatError,
    },
}

/// The checkpoint of the stored QoS 2 receipts: every publish and release record up to it is
/// reflected in them.
pub(super) const RECEIPTS_CHECKPOINT: &str = "qos2-receipts";

/// The hub's state; see the module documentation.
pub struct Hub {
    wal: Wal,
    /// Records of the hub's own waiting for the appender to take them, in order.
    own_appends: VecDeque<OwnAppend>,
    /// Where records of the hub's own are logged (see `appends::append_when_asked`).
    appender: mpsc::Sender<OwnAppend>,
    /// Session writes and progress commits, made off the hub task.
    metadata: MetaWriter,
    /// A progress commit is under way; its report comes back on `progress_reports`.
    progress_in_flight: bool,
    progress_reports: mpsc::Sender<ProgressReport>,
    progress_received: mpsc::Receiver<ProgressReport>,
    tail: WalReader,
    /// Every subscription; the hub changes it and installs a snapshot of it in `router`.
    subscriptions: SubscriptionTable,
    router: Arc<Router>,
    sessions: IdMap<u64, Session>,
    /// Every delivery queue; a session's is `QueueId::Session(its id)`.
    queues: IdMap<QueueId, Queue>,
    /// The route endpoints, by number (`QueueId::Endpoint`), as the metadata store names them.
    endpoints: IdMap<u64, EndpointName>,
    session_by_client: HashMap<String, u64>,
    /// Session ids are the log's epoch in the high 32 bits and a counter in the low ones, so an
    /// id is never reused across restarts and old records can never reach a new session.
    next_session_id: u64,
    cache: MessageCache,
    /// Loads under way: messages asked for, how many requests, and the sessions waiting for
    /// them (a `BTreeSet`, so a simulation pumps them in the same order every run).
    loads: mpsc::Sender<LoadRequest>,
    loading: IdSet<u64>,
    loads_outstanding: usize,
    waiting_for_loads: BTreeSet<u64>,
    loaded_sender: mpsc::Sender<Loaded>,
    loaded_received: mpsc::Receiver<Loaded>,
    /// Queued messages that could not be read back (logged): skipped.
    unreadable: BTreeSet<u64>,
    retained: RetainedMessages,
    /// Where the stored QoS 2 receipts are complete (see `session::receipts`).
    receipts_checkpoint: u64,
    /// Where reclaims of log space are asked for (see `checkpoints::reclaim_when_asked`).
    reclaims: mpsc::Sender<Liveness>,
    limits: HubLimits,
    /// Every time the hub reads: expiry of sessions, wills and messages.
    clock: Arc<dyn Clock>,
    /// The deployment's authorization policy, which subscriptions are held to
    /// (`Event::PolicyChanged`).
    policy: Arc<Policy>,
}

impl Hub {
    /// A hub with the persistent sessions of `meta`, whose queues it rebuilds by replaying the
    /// log from their checkpoints (through the same path as live delivery).
    ///
    /// # Errors
    /// If the log or the metadata cannot be read, or a stored session is corrupt.
    pub fn new(
        wal: Wal,
        meta: &Meta,
        router: Arc<Router>,
        limits: HubLimits,
        helpers: HubHelpers,
        clock: Arc<dyn Clock>,
    ) -> Result<Hub, StartError> {
        let HubHelpers {
            reclaims,
            appender,
            metadata,
            loads,
        } = helpers;
        let tail = wal.reader(wal.durable_seq() + 1)?;
        let next_session_id = (wal.epoch() << 32) + 1;
        let retained = RetainedMessages::load(meta)?;
        // One report in flight at a time: a send into this never waits.
        let (progress_reports, progress_received) = mpsc::channel(1);
        let (loaded_sender, loaded_received) = mpsc::channel(LOAD_REQUESTS_MAX);
        let mut hub = Hub {
            wal,
            own_appends: VecDeque::new(),
            appender,
            metadata,
            progress_in_flight: false,
            progress_reports,
            progress_received,
            tail,
            subscriptions: SubscriptionTable::default(),
            router,
            sessions: IdMap::default(),
            queues: IdMap::default(),
            endpoints: IdMap::default(),
            session_by_client: HashMap::new(),
            next_session_id,
            cache: MessageCache::new(limits.message_cache_bytes),
            loads,
            loading: IdSet::default(),
            loads_outstanding: 0,
            waiting_for_loads: BTreeSet::new(),
            loaded_sender,
            loaded_received,
            unreadable: BTreeSet::new(),
            retained,
            receipts_checkpoint: 0,
            reclaims,
            limits,
            clock,
            policy: Arc::default(),
        };
        let replay_from = hub
            .load_sessions(meta)?
            .min(hub.load_endpoints(meta)?)
            .min(hub.retained.replay_from());
        hub.router.install(hub.subscriptions.clone());
        hub.restore_receipts(meta)?;
        // Records below the log's first segment that a queue still held were moved, not
        // removed: the reader yields them first, in sequence order.
        hub.tail = hub.wal.reader(replay_from)?;
        // Replay before any client connects: a session must have its queue, with the PUBRECs
        // it logged, before it is attached, or it would send a released QoS 2 message again.
        hub.read_durable_records();
        tracing::info!(
            retained = hub.retained.len(),
            replayed_through = hub.tail.next_seq() - 1,
            "restored retained messages and session queues"
        );
        Ok(hub)
    }

    /// Runs until `shutdown` is cancelled or the log stops: takes the hub's inputs as they
    /// come. (A simulation takes them in the order its seed picks, through the same methods.)
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut expiry = tokio::time::interval(Duration::from_secs(1));
        let mut reclaim = tokio::time::interval(RECLAIM_INTERVAL);
        reclaim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(event) = events.recv() => self.handle(event),
                record = self.tail.next() => match record {
                    Ok(record) => self.on_record(&record),
                    Err(spool_storage::Error::Closed) => break,
                    Err(e) => {
                        tracing::error!("failed to read the write-ahead log: {e}");
                        break;
                    }
                },
                _ = expiry.tick() => self.tick(),
                _ = reclaim.tick() => self.reclaim_tick(),
                Some(report) = self.progress_received.recv() => self.progress_committed(report),
                Some(loaded) = self.loaded_received.recv() => self.loaded(loaded),
            }
        }
        self.hand_over_own_appends();
        if !self.own_appends.is_empty() {
            tracing::warn!(
                records = self.own_appends.len(),
                "stopping with records of the hub's own not handed to the log: wills not \
                 published, and QoS 2 messages whose PUBREC is not logged are sent again"
            );
        }
    }

    /// Once a second: sessions and wills that are due, expired messages (retained, and at the
    /// front of queues), and the progress commit.
    pub fn tick(&mut self) {
        self.expire_sessions(self.clock.now());
        self.publish_due_wills(self.clock.now());
        let now_ms = self.clock.unix_ms();
        self.retained.expire(now_ms);
        for queue in self.queues.values_mut() {
            queue.expire_waiting_front(now_ms);
        }
        self.commit_checkpoints();
    }

    /// Every `RECLAIM_INTERVAL`: records of the hub's own handed over again, and a reclaim of
    /// log space asked for.
    pub fn reclaim_tick(&mut self) {
        self.hand_over_own_appends();
        self.reclaim_log_space();
        // What is gone from the log is in no queue any more.
        self.unreadable = self.unreadable.split_off(&self.wal.first_seq());
    }

    /// Takes in the outcome of a progress commit, if one came back.
    pub fn take_progress_report(&mut self) {
        if let Ok(report) = self.progress_received.try_recv() {
            self.progress_committed(report);
        }
    }

    /// Commits the metadata writes queued by a writer the caller runs
    /// ([`MetaWriter::run_by_caller`]); returns how many.
    pub fn commit_metadata(&self) -> usize {
        self.metadata.commit_queued()
    }

    /// Takes one event from a connection.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Connect(request) => self.connect(request),
            Event::Subscribe {
                session,
                filters,
                reply,
            } => self.subscribe(session, filters, reply),
            Event::Unsubscribe {
                session,
                filters,
                reply,
            } => self.unsubscribe(session, &filters, reply),
            Event::Acknowledge {
                session,
                connection,
                packet_id,
            } if self.is_attached(session, connection) => self.acknowledge(session, packet_id),
            Event::Received {
                session,
                connection,
                packet_id,
            } if self.is_attached(session, connection) => self.received(session, packet_id),
            Event::Acknowledge { .. } | Event::Received { .. } => {} // from a taken-over connection
            Event::Drained { session } => self.pump(session),
            Event::Disconnected {
                session,
                connection,
                will,
                session_expiry_secs,
            } => self.disconnected(session, connection, will, session_expiry_secs),
            Event::AddEndpoints {
                added,
                checkpoint,
                done,
            } => {
                self.add_endpoints(added, checkpoint);
                let _ = done.send(());
            }
            Event::PolicyChanged { policy } => self.policy_changed(policy),
            Event::DesiredPatches { patches } => self.send_desired_patches(patches),
            Event::MethodRequest { request, reply } => {
                let _ = reply.send(self.send_method_request(request));
            }
        }
    }
}
