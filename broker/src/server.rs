//! Wiring: opens the storage, starts the hub and the listeners, and stops them in order.

use crate::admin::{self, AdminContext};
use crate::auth::authenticator::Authenticator;
use crate::auth::identity::IdentitiesFile;
use crate::auth::policy::Policy;
use crate::auth::registry::IdentityRegistry;
use crate::auth::x509::CertificateCheck;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::delivery::queue::QueueLimits;
use crate::deployment::Deployment;
use crate::hub::events::Event;
use crate::hub::{Hub, HubHelpers, HubLimits, MetaWriter};
use crate::ingest::Ingest;
use crate::limits::{
    HUB_EVENTS_MAX, LISTEN_BACKLOG, MESSAGE_CACHE_BYTES_MAX, record_payload_bytes_max,
};
use crate::method::Methods;
use crate::method::https::{self, MethodEndpoint};
use crate::mqtt::{ConnectionLimits, ServerContext, listener};
use crate::routing::Router;
use crate::tls::{self, TlsFiles};
use crate::twin::{DesiredPatches, TwinStore};
use crate::workload::WorkloadApi;
use anyhow::Context;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use spool_storage::{FileSystem, Meta, RealFs, Wal, WalOptions, WriterMode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long shutdown waits for the hub and connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A started server.
pub struct Server {
    /// The address the plain MQTT listener is bound to, if enabled.
    pub mqtt_addr: Option<SocketAddr>,
    /// The address the MQTTS listener is bound to, if enabled.
    pub mqtts_addr: Option<SocketAddr>,
    /// The certificate files MQTTS and HTTPS use, if either is enabled.
    pub tls_files: Option<TlsFiles>,
    /// The address the admin API is bound to, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The address the HTTPS listener (direct methods) is bound to, if enabled.
    pub https_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Each connection holds one permit until it has finished.
    connections: Arc<Semaphore>,
    connections_max: u32,
    wal: Wal,
}

/// The write-ahead log options for a configuration: a record holds one packet plus its routing.
fn wal_options(config: &Config) -> WalOptions {
    WalOptions {
        record_payload_bytes_max: record_payload_bytes_max(config.settings.max_packet_size),
        quota_bytes: Some(config.settings.wal_quota_bytes),
        disk_free_min_bytes: config.settings.disk_free_min_bytes,
        segment_size_bytes: config.settings.wal_segment_bytes,
        ..WalOptions::default()
    }
}

/// Binds a listener with room for a whole fleet's reconnections at once: after a failover
/// every module connects in the same instant, and connections beyond the listen backlog are
/// dropped by the kernel and retried by the client a second later.
async fn bind_listener(bind: &str) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(bind).await? {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other(format!("{bind} names no address"))))
}

/// What the hub enforces on sessions, from the configuration.
#[must_use]
pub fn hub_limits(config: &Config) -> HubLimits {
    HubLimits {
        in_flight_max: config.settings.max_inflight,
        sessions_max: config.settings.max_sessions,
        session_queue: QueueLimits {
            entries_max: config.settings.session_queue_max,
            bytes_max: config.settings.session_queue_max_bytes,
        },
        endpoint_queue: QueueLimits {
            entries_max: match config.settings.endpoint_queue_max {
                0 => usize::MAX,
                max => max,
            },
            bytes_max: config.settings.endpoint_queue_max_bytes,
        },
        session_expiry_v311: config.session_expiry_v311,
        message_cache_bytes: MESSAGE_CACHE_BYTES_MAX,
    }
}

/// Where a data directory's metadata store is.
#[must_use]
pub fn meta_path(data_dir: &Path) -> PathBuf {
    data_dir.join("meta.redb")
}

/// Opens the metadata store, then the log, which must reach every checkpoint the metadata
/// holds, or it lost acknowledged messages (recovery refuses it). The server runs the log's
/// writer on a thread (`WriterMode::Thread`); a simulation runs it itself.
///
/// # Errors
/// Storage that cannot be opened or recovered.
pub fn open_storage(
    config: &Config,
    fs: Arc<dyn FileSystem>,
    writer: WriterMode,
) -> anyhow::Result<(Arc<Meta>, Wal)> {
    let data_dir = &config.settings.data_dir;
    fs.create_dir_all(data_dir)
        .with_context(|| format!("create data directory {}", data_dir.display()))?;
    let meta_path = meta_path(data_dir);
    let meta = Meta::open_with_fs(Arc::clone(&fs), &meta_path)
        .with_context(|| format!("open {}", meta_path.display()))?;
    let meta = Arc::new(meta);
    let wal_dir = config.settings.data_dir.join("wal");
    let options = WalOptions {
        // The log must reach every checkpoint, or it lost acknowledged messages.
        required_last_seq: meta.highest_checkpoint()?,
        writer,
        ..wal_options(config)
    };
    let (wal, report) = Wal::open_with_fs(fs, &wal_dir, options)
        .with_context(|| format!("open the write-ahead log in {}", wal_dir.display()))?;
    tracing::info!(
        segments = report.segments,
        records = report.records,
        bytes_truncated = report.bytes_truncated,
        duration_ms = report.duration.as_millis() as u64,
        "recovered the write-ahead log"
    );
    if report.bytes_truncated > 0 {
        tracing::warn!(
            bytes = report.bytes_truncated,
            records = report.unacknowledged_records_discarded,
            "cut a torn tail from the write-ahead log (writes that were never acknowledged)"
        );
    }
    Ok((meta, wal))
}

/// The identity registry, with the identities file's added (`--identities`).
fn registry(config: &Config, meta: &Meta) -> anyhow::Result<IdentityRegistry> {
    let mut registry = IdentityRegistry::load(meta).context("load the identity registry")?;
    let file = &config.settings.identities;
    if !file.as_os_str().is_empty() {
        let identities = IdentitiesFile::read(file)?;
        let count = registry
            .seed(meta, identities)
            .context("store the identities file's identities")?;
        tracing::info!(count, file = %file.display(), "stored the identities of the file");
    }
    tracing::info!(identities = registry.len(), "identity registry loaded");
    Ok(registry)
}

/// Who may connect, by the identity registry, and the deployment whose routes say where their
/// telemetry goes (installed in `router`), if one is configured. The modules' desired
/// properties it sets are stored in `twins`; they read them when they connect.
fn admit_and_route(
    config: &Config,
    meta: &Arc<Meta>,
    wal: &Wal,
    router: &Router,
    twins: &Arc<TwinStore>,
) -> anyhow::Result<(Arc<Authenticator>, Option<Deployment>)> {
    let settings = &config.settings;
    let hosts = vec![
        settings.iothub_hostname.clone(),
        settings.gateway_hostname.clone(),
    ];
    let authenticator = Authenticator::new(registry(config, meta)?, hosts);
    let authenticator = Arc::new(authenticator.with_certificates(leaf_trust(config)?));
    let mut deployment = None;
    if !settings.deployment.as_os_str().is_empty() {
        let path = settings.deployment.clone();
        let (device, epoch) = (&settings.device_id, wal.epoch());
        let admitted = Arc::clone(&authenticator);
        let (twins, meta) = (Arc::clone(twins), Arc::clone(meta));
        let mut manifest = Deployment::new(path, device, admitted, twins, meta, epoch);
        let prepared = manifest.prepare(wal.durable_seq())?;
        router.install_routes(prepared.routes);
        authenticator.install_policy(prepared.policy);
        deployment = Some(manifest);
    }
    Ok((authenticator, deployment))
}

/// What the hub needs from the deployment before any client connects: the authorization
/// policy, which its subscriptions are held to; then, on a task it returns, the twin store's
/// desired-property patches (from the start's deployment too, for persistent sessions
/// subscribed to them), in the order they were stored.
async fn feed_hub(
    hub: &mpsc::Sender<Event>,
    policy: Arc<Policy>,
    desired_patches: DesiredPatches,
) -> anyhow::Result<JoinHandle<()>> {
    if hub.send(Event::PolicyChanged { policy }).await.is_err() {
        anyhow::bail!("the hub stopped at start");
    }
    let forward = forward_desired_patches(desired_patches, hub.clone());
    Ok(tokio::spawn(forward))
}

/// Hands the twin store's desired-property patches to the hub, in order, until either ends.
async fn forward_desired_patches(mut patches: DesiredPatches, hub: mpsc::Sender<Event>) {
    while let Some(patch) = patches.recv().await {
        let patches = vec![patch];
        if hub.send(Event::DesiredPatches { patches }).await.is_err() {
            return;
        }
    }
}

/// Binds the admin API, if enabled (`--admin-bind`), and serves it; returns where.
async fn start_admin(
    config: &Config,
    admin: AdminContext,
    shutdown: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(bind) = config.admin_bind.as_deref() else {
        return Ok(None);
    };
    let listener = TcpListener::bind(bind)
        .await
        .with_context(|| format!("bind the admin API to {bind}"))?;
    let addr = listener.local_addr()?;
    let serving = admin::serve(listener, admin, shutdown.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!("the admin API stopped: {e}");
        }
    }));
    Ok(Some(addr))
}

/// Starts what serves beside the MQTT listeners, on their `context`: the HTTPS listener of
/// direct methods, the admin API and the workload API, each if enabled; returns where the
/// first two listen.
async fn start_services(
    config: &Config,
    context: &ServerContext,
    tls: Option<TlsAcceptor>,
    meta: Arc<Meta>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let shutdown = &context.shutdown;
    let endpoint = MethodEndpoint {
        authenticator: Arc::clone(&context.authenticator),
        methods: Arc::clone(&context.methods),
        clock: context.ingest.clock(),
    };
    let https_addr = start_https(config, tls, endpoint, shutdown, tasks).await?;
    let admin = AdminContext {
        authenticator: Arc::clone(&context.authenticator),
        meta,
        twins: Arc::clone(&context.twins),
        methods: Arc::clone(&context.methods),
    };
    let admin_addr = start_admin(config, admin, shutdown, tasks).await?;
    if !config.settings.workload_dir.as_os_str().is_empty() {
        let workload = WorkloadApi {
            dir: config.settings.workload_dir.clone(),
            configured_device: config.settings.device_id.clone(),
            authenticator: Arc::clone(&context.authenticator),
            trust_bundle: config.tls_certificate.trust_file(),
        };
        tasks.push(tokio::spawn(workload.serve(shutdown.clone())));
    }
    Ok((https_addr, admin_addr))
}

/// Binds the HTTPS listener of direct methods, if enabled (`--https-bind`), and serves it;
/// returns where.
async fn start_https(
    config: &Config,
    tls: Option<TlsAcceptor>,
    endpoint: MethodEndpoint,
    shutdown: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Option<SocketAddr>> {
    let (Some(bind), Some(tls)) = (config.https_bind.as_deref(), tls) else {
        return Ok(None);
    };
    let listener = bind_listener(bind)
        .await
        .with_context(|| format!("bind the HTTPS listener to {bind}"))?;
    let addr = listener.local_addr()?;
    let serving = https::serve(listener, tls, endpoint, shutdown.clone());
    tasks.push(tokio::spawn(serving));
    Ok(Some(addr))
}

/// How leaf devices' certificates are checked in X.509 CA mode: against the CA certificates of
/// `--client-ca`; without it, CA mode refuses every certificate (never the serving chain: its
/// issuers may sign certificates for anyone).
fn leaf_trust(config: &Config) -> anyhow::Result<CertificateCheck> {
    let path = &config.settings.client_ca;
    if path.as_os_str().is_empty() {
        return Ok(CertificateCheck::default());
    }
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("read the client CA {}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates);
    anyhow::ensure!(
        added > 0,
        "the client CA {} holds no certificate",
        path.display()
    );
    CertificateCheck::with_trust_bundle(roots).context("the client CA")
}

/// Starts the hub with the server's clock, and the tasks it asks for work (reclaims, records
/// of its own, messages read back); returns where connections send it events.
fn spawn_hub(
    config: &Config,
    wal: &Wal,
    meta: Arc<Meta>,
    router: &Arc<Router>,
    shutdown: &CancellationToken,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<(mpsc::Sender<Event>, Vec<JoinHandle<()>>)> {
    let metadata = MetaWriter::start(Arc::clone(&meta)).context("start the metadata writer")?;
    let (helpers, requests) = HubHelpers::new(metadata);
    let hub = Hub::new(
        wal.clone(),
        &meta,
        Arc::clone(router),
        hub_limits(config),
        helpers,
        clock,
    )
    .context("start the hub")?;
    let (events, events_rx) = mpsc::channel(HUB_EVENTS_MAX);
    let mut tasks = vec![tokio::spawn(hub.run(events_rx, shutdown.clone()))];
    tasks.extend(requests.spawn(wal));
    Ok((events, tasks))
}

/// Where the MQTT listeners listen.
struct Listeners {
    mqtt_addr: Option<SocketAddr>,
    mqtts_addr: Option<SocketAddr>,
}

/// Binds the MQTT and MQTTS listeners that are enabled and starts accepting on them.
async fn start_listeners(
    config: &Config,
    tls: Option<TlsAcceptor>,
    context: &Arc<ServerContext>,
    connections: &Arc<Semaphore>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Listeners> {
    let mut listeners = Listeners {
        mqtt_addr: None,
        mqtts_addr: None,
    };
    if let Some(bind) = &config.mqtt_bind {
        let listener = bind_listener(bind)
            .await
            .with_context(|| format!("bind MQTT listener to {bind}"))?;
        listeners.mqtt_addr = Some(listener.local_addr()?);
        tasks.push(tokio::spawn(listener::accept_loop(
            listener,
            None,
            config.settings.mqtt_auth,
            Arc::clone(context),
            Arc::clone(connections),
        )));
    }
    if let (Some(bind), Some(acceptor)) = (&config.mqtts_bind, tls) {
        let listener = bind_listener(bind)
            .await
            .with_context(|| format!("bind MQTTS listener to {bind}"))?;
        listeners.mqtts_addr = Some(listener.local_addr()?);
        tasks.push(tokio::spawn(listener::accept_loop(
            listener,
            Some(acceptor),
            config.settings.mqtts_auth,
            Arc::clone(context),
            Arc::clone(connections),
        )));
    }
    Ok(listeners)
}

impl Server {
    /// Opens the data directory (recovering the log) and starts serving.
    ///
    /// # Errors
    /// Storage that cannot be opened or recovered, or a listener that cannot bind.
    pub async fn start(config: &Config) -> anyhow::Result<Server> {
        Server::start_on(config, Arc::new(RealFs)).await
    }

    /// [`Server::start`] with the write-ahead log and the metadata store on `fs`: tests run the
    /// whole server over a fault-injecting file system.
    ///
    /// # Errors
    /// As [`Server::start`].
    pub async fn start_on(config: &Config, fs: Arc<dyn FileSystem>) -> anyhow::Result<Server> {
        let (meta, wal) = open_storage(config, fs, WriterMode::Thread)?;
        // The TLS files first: a generated CA is the default trust bundle for leaf devices.
        let tls = match (&config.mqtts_bind, &config.https_bind) {
            (None, None) => None,
            _ => Some(tls::acceptor(&config.tls_certificate)?),
        };
        let router = Arc::new(Router::default());
        let (twins, desired_patches) = TwinStore::load(Arc::clone(&meta))?;
        let twins = Arc::new(twins);
        let (authenticator, deployment) = admit_and_route(config, &meta, &wal, &router, &twins)?;
        twins.patch_only_registered(Arc::clone(&authenticator));
        let shutdown = CancellationToken::new();
        // One clock for the hub and the publish path: message expiry is stamped and read on it.
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let admin_meta = Arc::clone(&meta);
        let (events, mut tasks) =
            spawn_hub(config, &wal, meta, &router, &shutdown, Arc::clone(&clock))?;
        let policy = authenticator.policy();
        tasks.push(feed_hub(&events, policy, desired_patches).await?);
        if let Some(deployment) = deployment {
            let (router, events) = (Arc::clone(&router), events.clone());
            let watch = deployment.watch(wal.clone(), router, events, shutdown.clone());
            tasks.push(tokio::spawn(watch));
        }
        let connection_limits = ConnectionLimits {
            packet_size_max: config.settings.max_packet_size,
            receive_max: config.settings.max_inflight,
            topic_alias_max: 64,
            keep_alive_max_secs: config.settings.max_keep_alive,
        };
        let ingest = Ingest::new(wal.clone(), router, shutdown.clone(), clock);
        let methods = Arc::new(Methods::new(events.clone(), shutdown.clone()));
        let context = Arc::new(ServerContext::new(
            events,
            ingest,
            authenticator,
            twins,
            methods,
            connection_limits,
            shutdown.clone(),
        ));
        let connections_max = config.settings.max_connections;
        let connections = Arc::new(Semaphore::new(connections_max as usize));
        let (tls, tls_files) = tls.unzip();
        let listeners =
            start_listeners(config, tls.clone(), &context, &connections, &mut tasks).await?;
        let (https_addr, admin_addr) =
            start_services(config, &context, tls, admin_meta, &mut tasks).await?;
        Ok(Server {
            mqtt_addr: listeners.mqtt_addr,
            mqtts_addr: listeners.mqtts_addr,
            tls_files,
            admin_addr,
            https_addr,
            shutdown,
            tasks,
            connections,
            connections_max,
            wal,
        })
    }

    /// Stops accepting; lets connections acknowledge what they logged and say goodbye (within
    /// `SHUTDOWN_GRACE`); then closes the log, which makes every queued append durable.
    ///
    /// # Errors
    /// If the log had failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for task in self.tasks {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        let all_finished = self.connections.acquire_many(self.connections_max);
        if tokio::time::timeout_at(deadline, all_finished)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the shutdown grace period");
        }
        let wal = self.wal;
        tokio::task::spawn_blocking(move || wal.close())
            .await
            .context("close the write-ahead log")?
            .context("close the write-ahead log")
    }
}
