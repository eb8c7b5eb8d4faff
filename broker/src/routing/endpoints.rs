//! Endpoints: the durable queues routes deliver to (edgehub-contract.md §3.3). An endpoint is a
//! module input of the edge device, or `$upstream`, at a priority: edgeHub keeps one queue per
//! endpoint and priority, and so does spool.
//!
//! - [`EndpointCatalog`]: every endpoint's number, kept in the metadata store, which publish
//!   records name (`QueueId::Endpoint`). An endpoint is numbered, with a checkpoint, in the
//!   same durable commit, before any route can send to it: after a crash every record that
//!   names a number finds its endpoint. Numbers are never reused (the log's epoch is in their
//!   high 32 bits, as in session ids), so an old record never reaches a newer endpoint.
//! - [`EndpointRoutes`]: what the publish path evaluates, the deployment's routes with the
//!   number of each endpoint they reach, installed whole like the subscription snapshot.

use crate::delivery::endpoint::checkpoint_key;
use crate::delivery::record::{QueueId, Target};
use crate::iothub::ModuleInput;
use crate::iothub::message::IotMessage;
use crate::message::QoS;
use crate::routing::routes::syntax::Sink;
use crate::routing::routes::table::RouteTable;
use spool_storage::{Commit, Meta, MetaChange, StateTable};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Where an endpoint delivers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointTarget {
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")`: an input of a module of the
    /// edge device (shared with each delivery, which is addressed to it).
    ModuleInput(Arc<ModuleInput>),
    /// `$upstream`: IoT Hub, or the parent hub.
    Upstream,
}

/// An endpoint: a target at a priority (0 highest, `PRIORITY_DEFAULT` for routes naming none).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointName {
    pub target: EndpointTarget,
    pub priority: u32,
}

impl EndpointName {
    /// The endpoint a route's sink names on edge device `device`.
    #[must_use]
    pub fn of_sink(sink: &Sink, priority: u32, device: &str) -> EndpointName {
        let target = match sink {
            Sink::Upstream => EndpointTarget::Upstream,
            Sink::ModuleInput { module, input } => {
                EndpointTarget::ModuleInput(Arc::new(ModuleInput {
                    device: device.to_owned(),
                    module: module.clone(),
                    input: input.clone(),
                }))
            }
        };
        EndpointName { target, priority }
    }

    /// Its key in the metadata store: `input/{priority}/{device}/{module}/{input}` or
    /// `upstream/{priority}` (ids hold no `/`, and the input name is last).
    #[must_use]
    pub fn key(&self) -> String {
        match &self.target {
            EndpointTarget::ModuleInput(to) => format!(
                "input/{}/{}/{}/{}",
                self.priority, to.device, to.module, to.input
            ),
            EndpointTarget::Upstream => format!("upstream/{}", self.priority),
        }
    }

    /// Reads a key written by [`EndpointName::key`].
    #[must_use]
    pub fn from_key(key: &str) -> Option<EndpointName> {
        let mut parts = key.splitn(5, '/');
        let kind = parts.next()?;
        let priority = parts.next()?.parse().ok()?;
        let target = match kind {
            "upstream" if parts.next().is_none() => EndpointTarget::Upstream,
            "input" => {
                let mut part = || parts.next().filter(|p| !p.is_empty()).map(str::to_owned);
                EndpointTarget::ModuleInput(Arc::new(ModuleInput {
                    device: part()?,
                    module: part()?,
                    input: part()?,
                }))
            }
            _ => return None,
        };
        Some(EndpointName { target, priority })
    }
}

impl fmt::Display for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            EndpointTarget::ModuleInput(to) => {
                write!(f, "{}/{}/inputs/{}", to.device, to.module, to.input)?;
            }
            EndpointTarget::Upstream => f.write_str("$upstream")?,
        }
        write!(f, " (priority {})", self.priority)
    }
}

/// Why the catalog could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Storage(#[from] spool_storage::Error),
    #[error("the metadata store's endpoint {0:?} is corrupt")]
    Corrupt(String),
}

/// Every endpoint's number; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct EndpointCatalog {
    numbers: BTreeMap<EndpointName, u64>,
    /// The next number to give; above every number given, in this epoch or before.
    next: u64,
}

impl EndpointCatalog {
    /// The endpoints stored in `meta`; new ones are numbered from `epoch`'s range on.
    ///
    /// # Errors
    /// The store cannot be read, or holds an entry this release cannot read.
    pub fn load(meta: &Meta, epoch: u64) -> Result<EndpointCatalog, CatalogError> {
        let mut numbers = BTreeMap::new();
        for (key, value) in meta.state(StateTable::Endpoints)? {
            let name = EndpointName::from_key(&key);
            let number = <[u8; 8]>::try_from(value.as_slice()).map(u64::from_le_bytes);
            let (Some(name), Ok(number)) = (name, number) else {
                return Err(CatalogError::Corrupt(key));
            };
            numbers.insert(name, number);
        }
        let next = numbers
            .values()
            .map(|n| n + 1)
            .fold((epoch << 32) + 1, u64::max);
        Ok(EndpointCatalog { numbers, next })
    }

    /// Numbers the endpoints in `names` that have no number yet, durably, each with its
    /// checkpoint at `through`: no record up to it can be for an endpoint that did not exist.
    /// Returns the endpoints numbered.
    ///
    /// # Errors
    /// The metadata store could not commit them; nothing is numbered then.
    pub fn number(
        &mut self,
        meta: &Meta,
        names: impl IntoIterator<Item = EndpointName>,
        through: u64,
    ) -> spool_storage::Result<Vec<(EndpointName, u64)>> {
        let mut added: Vec<(EndpointName, u64)> = Vec::new();
        let mut next = self.next;
        for name in names {
            if self.numbers.contains_key(&name) || added.iter().any(|(n, _)| *n == name) {
                continue;
            }
            added.push((name, next));
            next += 1;
        }
        if added.is_empty() {
            return Ok(added);
        }
        let changes: Vec<MetaChange> = added
            .iter()
            .flat_map(|(name, number)| {
                [
                    MetaChange::State {
                        table: StateTable::Endpoints,
                        key: name.key(),
                        value: Some(number.to_le_bytes().to_vec()),
                    },
                    MetaChange::Checkpoint {
                        queue: checkpoint_key(QueueId::Endpoint(*number)),
                        seq: through,
                    },
                ]
            })
            .collect();
        meta.apply(&changes, Commit::Durable)?;
        self.next = next;
        self.numbers.extend(added.iter().cloned());
        Ok(added)
    }

    /// Every endpoint with its number.
    pub fn iter(&self) -> impl Iterator<Item = (&EndpointName, u64)> {
        self.numbers.iter().map(|(name, number)| (name, *number))
    }

    #[must_use]
    pub fn get(&self, name: &EndpointName) -> Option<u64> {
        self.numbers.get(name).copied()
    }
}

/// The deployment's routes, with the number of each endpoint they reach: what the publish path
/// evaluates for a device's or module's telemetry.
#[derive(Debug, Clone, Default)]
pub struct EndpointRoutes {
    table: RouteTable,
    /// The number of each route's endpoint (its sink at its priority), in the table's order.
    numbers: Vec<u64>,
}

impl EndpointRoutes {
    /// The endpoints `table` reaches on edge device `device`.
    pub fn endpoints<'a>(
        table: &'a RouteTable,
        device: &'a str,
    ) -> impl Iterator<Item = EndpointName> + 'a {
        table
            .endpoints()
            .map(move |(sink, priority)| EndpointName::of_sink(sink, priority, device))
    }

    /// `table`'s routes on edge device `device`, with their endpoints' numbers.
    ///
    /// # Errors
    /// An endpoint `table` reaches that `catalog` has not numbered: number them first.
    pub fn new(
        table: RouteTable,
        device: &str,
        catalog: &EndpointCatalog,
    ) -> Result<EndpointRoutes, EndpointName> {
        let mut numbers = Vec::with_capacity(table.len());
        for (sink, priority) in table.endpoints() {
            let name = EndpointName::of_sink(sink, priority, device);
            numbers.push(catalog.get(&name).ok_or(name)?);
        }
        Ok(EndpointRoutes { table, numbers })
    }

    /// Whether there are routes at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The queues `message` goes to by the routes, at QoS 1 (edgeHub delivers module inputs at
    /// QoS 1), each with the deadline its route's time to live sets from `now_ms`.
    #[must_use]
    pub fn targets(&self, message: &IotMessage, now_ms: u64) -> Vec<Target> {
        self.table
            .evaluate(&message.source(), message)
            .into_iter()
            .filter_map(|dispatch| {
                let number = self.numbers.get(dispatch.route)?;
                Some(Target {
                    queue: QueueId::Endpoint(*number),
                    qos: QoS::AtLeastOnce,
                    retain_as_published: false,
                    subscription_ids: Vec::new(),
                    deadline_ms: dispatch
                        .time_to_live_secs
                        .map(|secs| now_ms.saturating_add(secs.saturating_mul(1000))),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Goal: every endpoint's key reads back as the same endpoint.
        #[test]
        fn endpoint_keys_round_trip(
            device in "[a-z0-9-]{1,10}",
            module in "[a-z0-9-]{1,10}",
            input in "[a-z0-9/-]{1,10}",
            priority in 0u32..,
        ) {
            let input = EndpointName {
                target: EndpointTarget::ModuleInput(Arc::new(ModuleInput { device, module, input })),
                priority,
            };
            prop_assert_eq!(EndpointName::from_key(&input.key()), Some(input));
            let upstream = EndpointName { target: EndpointTarget::Upstream, priority };
            prop_assert_eq!(EndpointName::from_key(&upstream.key()), Some(upstream));
        }
    }

    /// Goal: an endpoint is numbered once, durably, with a checkpoint, and its number is not
    /// given again after a restart.
    #[test]
    fn endpoints_are_numbered_once_and_numbers_are_never_reused() {
        let fs: std::sync::Arc<dyn spool_storage::FileSystem> =
            std::sync::Arc::new(spool_storage::FaultyFs::new());
        fs.create_dir_all(std::path::Path::new("/data"))
            .expect("directory");
        let path = std::path::Path::new("/data/meta.redb");
        let meta = Meta::open_with_fs(std::sync::Arc::clone(&fs), path).expect("open");
        let table = RouteTable::from_manifest(
            r#"{"schemaVersion": "1.0", "routes": {
                "a": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")",
                "b": "FROM /messages/* INTO $upstream"}}"#,
        )
        .expect("routes");
        let mut catalog = EndpointCatalog::load(&meta, 1).expect("load");
        let names: Vec<_> = EndpointRoutes::endpoints(&table, "edge").collect();
        let added = catalog.number(&meta, names.clone(), 7).expect("numbered");
        assert_eq!(added.len(), 2);
        assert!(catalog.number(&meta, names, 9).expect("none").is_empty());
        let input = &added[0];
        assert_eq!(
            input.0.to_string(),
            "edge/sink/inputs/in1 (priority 2000000000)"
        );
        assert_eq!(
            meta.checkpoint(&checkpoint_key(QueueId::Endpoint(input.1)))
                .expect("read"),
            Some(7)
        );
        drop(meta);
        let meta = Meta::open_with_fs(fs, path).expect("reopen");
        let mut reloaded = EndpointCatalog::load(&meta, 2).expect("load");
        assert_eq!(reloaded.get(&input.0), Some(input.1));
        let other = EndpointName {
            target: EndpointTarget::Upstream,
            priority: 0,
        };
        let newer = reloaded.number(&meta, [other], 9).expect("numbered");
        assert!(newer[0].1 > added[1].1, "a later epoch numbers above");
        let routes = EndpointRoutes::new(table, "edge", &reloaded).expect("all numbered");
        assert!(!routes.is_empty());
    }
}
