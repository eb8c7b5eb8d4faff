//! Deployments: a deployment manifest's routes put in force (`--deployment`). The endpoints they
//! reach are numbered in the metadata store first, durably (`routing::endpoints`), then the
//! routes are installed for the publish path: no record can name an endpoint a restart would
//! not know.

use crate::auth::registry::IdentityRegistry;
use crate::routing::Router;
use crate::routing::endpoints::{EndpointCatalog, EndpointRoutes};
use crate::routing::routes::syntax::Sink;
use crate::routing::routes::table::RouteTable;
use anyhow::Context;
use spool_storage::Meta;
use std::collections::BTreeSet;
use std::path::Path;

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

/// Reads the manifest at `path`, numbers the endpoints its routes reach (with checkpoints at
/// `through`: no record up to it is for them) and installs its routes in `router`.
///
/// # Errors
/// The manifest cannot be read or is refused (saying why, with the route and the position),
/// or the endpoints cannot be stored; the routes in force stay as they were.
pub fn apply(
    path: &Path,
    configured_device: &str,
    registry: &IdentityRegistry,
    meta: &Meta,
    epoch: u64,
    through: u64,
    router: &Router,
) -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(path)
        .with_context(|| format!("read the deployment manifest {}", path.display()))?;
    let table = RouteTable::from_manifest(&manifest)
        .with_context(|| format!("the deployment manifest {}", path.display()))?;
    let needs_device = table.endpoints().any(|(sink, _)| *sink != Sink::Upstream);
    let upstream = table.endpoints().any(|(sink, _)| *sink == Sink::Upstream);
    let device = match needs_device {
        true => edge_device(configured_device, registry)?,
        false => configured_device.to_owned(),
    };
    let mut catalog = EndpointCatalog::load(meta, epoch)?;
    let added = catalog
        .number(meta, EndpointRoutes::endpoints(&table, &device), through)
        .context("store the deployment's endpoints")?;
    for (name, number) in &added {
        tracing::info!(endpoint = %name, number, "new route endpoint");
    }
    if upstream {
        tracing::warn!(
            "spool has no upstream link yet: messages routed to $upstream wait in their queue \
             until their time to live, and count against the log's quota"
        );
    }
    let routes = table.len();
    let installed = EndpointRoutes::new(table, &device, &catalog)
        .map_err(|name| anyhow::anyhow!("endpoint {name} was not numbered"))?;
    router.install_routes(installed);
    tracing::info!(routes, device, manifest = %path.display(), "deployment applied");
    Ok(())
}
