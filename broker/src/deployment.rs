//! Deployments: a deployment manifest's routes, authorization policy and modules' desired
//! properties put in force (`--deployment`), at start and on every reload. The endpoints they reach are numbered in the metadata store first, durably
//! (`routing::endpoints`), and given their queues in the hub, before the routes are installed
//! for the publish path: no record can name an endpoint a restart, or the hub, would not know.

use crate::auth::authenticator::Authenticator;
use crate::auth::policy::Policy;
use crate::auth::registry::IdentityRegistry;
use crate::hub::events::Event;
use crate::limits::MANIFEST_POLL_INTERVAL;
use crate::routing::Router;
use crate::routing::endpoints::{EndpointCatalog, EndpointName, EndpointRoutes};
use crate::routing::routes::syntax::Sink;
use crate::routing::routes::table::{ManifestError, RouteTable, edge_hub_desired};
use crate::twin::{DesiredPatch, TwinStore};
use anyhow::Context;
use serde_json::{Map, Value};
use spool_storage::{Meta, Wal};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The edge device whose modules' inputs routes deliver to: `configured` (`--device-id`), or
/// else the one device the registry's modules belong to.
///
/// # Errors
/// None configured, and the registry's modules belong to no device or to several.
pub fn edge_device(configured: &str, registry: &IdentityRegistry) -> anyhow::Result<String> {
    if !configured.is_empty() {
        return Ok(configured.to_owned());
    }
    let devices: BTreeSet<&str> = registry
        .iter()
        .filter(|identity| identity.id.module.is_some())
        .map(|identity| identity.id.device.as_str())
        .collect();
    match devices.iter().collect::<Vec<_>>().as_slice() {
        [device] => Ok((**device).to_owned()),
        [] => anyhow::bail!(
            "routes deliver to module inputs, but no module is registered to tell the edge \
             device's id: set --device-id"
        ),
        several => anyhow::bail!(
            "the registry's modules belong to several devices ({several:?}): set --device-id \
             to the edge device whose modules' inputs routes deliver to"
        ),
    }
}

/// A deployment manifest put in force: read at start, and read again on SIGHUP and whenever
/// its content changes ([`Deployment::watch`]). New routes apply to new messages; messages
/// already queued for an endpoint no route reaches any more are still delivered, or expire by
/// their time to live. A manifest that is refused leaves the routes in force as they were.
#[derive(Debug)]
pub struct Deployment {
    path: PathBuf,
    /// `--device-id`: the edge device whose modules' inputs routes reach; when empty, the one
    /// device of the registry's modules, as it is at each reading (`edge_device`).
    configured_device: String,
    authenticator: Arc<Authenticator>,
    twins: Arc<TwinStore>,
    meta: Arc<Meta>,
    epoch: u64,
    /// The content last read, applied or refused: the watch reloads when it changes.
    last_read: Option<String>,
}

/// A manifest's routes, ready to install once the hub has the queues of `added`, and its
/// authorization policy.
#[derive(Debug)]
pub struct Prepared {
    pub routes: EndpointRoutes,
    pub policy: Arc<Policy>,
    /// The changes of modules' desired properties it made (stored already), to send.
    pub desired: Vec<DesiredPatch>,
    /// The endpoints numbered for it, with the checkpoint they were numbered at.
    pub added: Vec<(EndpointName, u64)>,
    pub checkpoint: u64,
}

impl Deployment {
    /// The manifest at `path`, for edge device `configured_device` (`--device-id`) or else
    /// the one of `authenticator`'s registry's modules.
    #[must_use]
    pub fn new(
        path: PathBuf,
        configured_device: &str,
        authenticator: Arc<Authenticator>,
        twins: Arc<TwinStore>,
        meta: Arc<Meta>,
        epoch: u64,
    ) -> Deployment {
        Deployment {
            path,
            configured_device: configured_device.to_owned(),
            authenticator,
            twins,
            meta,
            epoch,
            last_read: None,
        }
    }

    /// Reads the manifest and numbers the endpoints its routes reach, durably, with their
    /// checkpoints at `checkpoint` (no record up to it can be for them). Blocking: it reads a
    /// file and commits to the metadata store.
    ///
    /// # Errors
    /// The manifest cannot be read or is refused (saying why, with the route and the
    /// position), or the endpoints cannot be stored.
    pub fn prepare(&mut self, checkpoint: u64) -> anyhow::Result<Prepared> {
        let path = &self.path;
        let manifest = std::fs::read_to_string(path)
            .with_context(|| format!("read the deployment manifest {}", path.display()))?;
        self.last_read = Some(manifest.clone());
        let in_manifest = || format!("the deployment manifest {}", path.display());
        // Parsed once: routes, policy and modules' desired properties all read it.
        let manifest: Value = serde_json::from_str(&manifest)
            .map_err(ManifestError::from)
            .with_context(in_manifest)?;
        let table = RouteTable::from_value(&manifest).with_context(in_manifest)?;
        let module_desired = modules_desired(&manifest).with_context(in_manifest)?;
        let needs_device = table.endpoints().any(|(sink, _)| *sink != Sink::Upstream)
            || !module_desired.is_empty();
        let device = match needs_device {
            true => edge_device(&self.configured_device, &self.authenticator.registry())
                .with_context(in_manifest)?,
            false => self.configured_device.clone(),
        };
        let policy = manifest_policy(&manifest, &device).with_context(in_manifest)?;
        let mut catalog = EndpointCatalog::load(&self.meta, self.epoch)?;
        let names = EndpointRoutes::endpoints(&table, &device);
        let added = catalog
            .number(&self.meta, names, checkpoint)
            .context("store the deployment's endpoints")?;
        for (name, number) in &added {
            tracing::info!(endpoint = %name, number, "new route endpoint");
        }
        if table.endpoints().any(|(sink, _)| *sink == Sink::Upstream) {
            tracing::warn!(
                "spool has no upstream link yet: messages routed to $upstream wait in their \
                 queue until their time to live, and count against the log's quota"
            );
        }
        let routes = table.len();
        let routes_table = EndpointRoutes::new(table, &device, &catalog)
            .map_err(|name| anyhow::anyhow!("endpoint {name} was not numbered"))?;
        let desired = self
            .twins
            .apply_manifest(&device, &module_desired)
            .with_context(in_manifest)?;
        tracing::info!(routes, device, manifest = %path.display(), "deployment read");
        Ok(Prepared {
            routes: routes_table,
            policy: Arc::new(policy),
            desired,
            added,
            checkpoint,
        })
    }

    /// Reloads the manifest on SIGHUP and when its content changes (looked at once a second,
    /// which also follows a Kubernetes ConfigMap's symbolic-link swap), until `shutdown`: the
    /// hub gets the new endpoints' queues (`Event::AddEndpoints`) before the routes that reach
    /// them are installed in `router`.
    pub async fn watch(
        mut self,
        wal: Wal,
        router: Arc<Router>,
        hub: mpsc::Sender<Event>,
        shutdown: CancellationToken,
    ) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(e) => {
                tracing::error!("cannot reload the deployment on SIGHUP: {e}");
                None
            }
        };
        let mut poll = tokio::time::interval(MANIFEST_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                () = shutdown.cancelled() => return,
                Some(()) = async { hangup.as_mut()?.recv().await } => true,
                _ = poll.tick() => false,
            };
            let mut deployment = self;
            let checkpoint = wal.durable_seq();
            // Reading the file and committing the endpoints block: off the runtime's threads.
            let prepared = tokio::task::spawn_blocking(move || {
                let changed = forced || deployment.changed();
                let prepared = changed.then(|| deployment.prepare(checkpoint));
                (deployment, prepared)
            })
            .await;
            let Ok((deployment, prepared)) = prepared else {
                tracing::error!("the deployment reload failed; the routes in force are kept");
                return;
            };
            self = deployment;
            match prepared {
                None => {}
                Some(Ok(prepared)) => {
                    install(prepared, &router, &self.authenticator, &hub).await;
                }
                Some(Err(e)) => tracing::error!("{e:#}; the routes in force are kept"),
            }
        }
    }

    /// Whether the manifest's content differs from what was last read (an unreadable file
    /// counts as unchanged: the routes in force stay, and the next readable content reloads).
    fn changed(&self) -> bool {
        match std::fs::read_to_string(&self.path) {
            Ok(content) => self.last_read.as_ref() != Some(&content),
            Err(_) => false,
        }
    }
}

/// The authorization policy of `manifest`, for edge device `device`.
fn manifest_policy(manifest: &Value, device: &str) -> anyhow::Result<Policy> {
    let desired = edge_hub_desired(manifest).context("no $edgeHub desired properties")?;
    Ok(Policy::from_desired(desired, device)?)
}

/// The desired properties a manifest's `modulesContent` gives each module
/// (`{module}.properties.desired`), by module; none for a manifest of `$edgeHub` alone.
fn modules_desired(manifest: &Value) -> anyhow::Result<BTreeMap<String, Map<String, Value>>> {
    let Some(modules) = manifest
        .get("modulesContent")
        .or_else(|| manifest.pointer("/content/modulesContent"))
        .and_then(Value::as_object)
    else {
        return Ok(BTreeMap::new());
    };
    let mut desired = BTreeMap::new();
    for (module, content) in modules {
        if module.starts_with('$') {
            continue; // $edgeAgent, $edgeHub: the runtime's own
        }
        match content.get("properties.desired") {
            None => {}
            Some(Value::Object(properties)) => {
                desired.insert(module.clone(), properties.clone());
            }
            Some(_) => anyhow::bail!("{module}'s properties.desired is not an object"),
        }
    }
    Ok(desired)
}

/// Puts a prepared manifest in force: the hub's queues for its new endpoints first, then its
/// routes and its authorization policy.
async fn install(
    prepared: Prepared,
    router: &Router,
    authenticator: &Authenticator,
    hub: &mpsc::Sender<Event>,
) {
    if !prepared.added.is_empty() {
        let (done, added) = oneshot::channel();
        let event = Event::AddEndpoints {
            added: prepared.added,
            checkpoint: prepared.checkpoint,
            done,
        };
        if hub.send(event).await.is_err() || added.await.is_err() {
            return; // the hub stopped
        }
    }
    router.install_routes(prepared.routes);
    // The connections' view first, then the hub's: a subscription the hub grants in between
    // by the old policy is dropped when the hub takes the new one.
    let policy = prepared.policy;
    authenticator.install_policy(Arc::clone(&policy));
    if hub.send(Event::PolicyChanged { policy }).await.is_err() {
        return; // the hub stopped
    }
    if !prepared.desired.is_empty() {
        // Sent by the twin store itself, in the order they were stored.
        tracing::info!(
            modules = prepared.desired.len(),
            "desired properties changed"
        );
    }
    tracing::info!("deployment reloaded");
}
