//! [`RouteTable`]: the routes of a deployment manifest's `$edgeHub` desired properties
//! (edgehub-contract.md §3.3), and where a message goes by them (§3.4).
//!
//! The manifest may be a whole deployment (`modulesContent`, or `content.modulesContent`),
//! the `$edgeHub` module's twin (`properties.desired`), or its desired properties alone.
//! Schema versions 1.0 to 1.3 are read; 1.0 takes routes as strings only, 1.1 and later as
//! strings or `{route, priority, timeToLiveSecs}` and require `storeAndForwardConfiguration`.

use super::condition::MessageView;
use super::syntax::Sink;
use super::{CompiledRoute, RouteError, lowered_source};
use serde_json::Value;

/// A message's place in one endpoint: which, at what priority, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch<'a> {
    pub sink: &'a Sink,
    /// 0 (highest) to 9, or `PRIORITY_DEFAULT`.
    pub priority: u32,
    /// Seconds it may wait in the queue; `None`: until it is delivered.
    pub time_to_live_secs: Option<u64>,
    /// The route that sent it there: its place in the table, as [`RouteTable::endpoints`]
    /// lists them.
    pub route: usize,
}

/// Why a manifest was refused; the running routes stay as they were.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the manifest has no $edgeHub desired properties (no schemaVersion and routes)")]
    NoEdgeHub,
    #[error("schemaVersion {0:?} is not one of 1.0, 1.1, 1.2, 1.3")]
    SchemaVersion(String),
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// The routes in force, and the global time to live.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
    /// `storeAndForwardConfiguration.timeToLiveSecs`; `None`: forever (negative in JSON).
    time_to_live_secs: Option<u64>,
}

impl RouteTable {
    /// Reads a manifest (see the module documentation).
    ///
    /// # Errors
    /// What is wrong, naming the route when a route is.
    pub fn from_manifest(json: &str) -> Result<RouteTable, ManifestError> {
        RouteTable::from_value(&serde_json::from_str(json)?)
    }

    /// Reads a manifest already parsed as JSON (see [`RouteTable::from_manifest`]).
    ///
    /// # Errors
    /// What is wrong, naming the route when a route is.
    pub fn from_value(manifest: &Value) -> Result<RouteTable, ManifestError> {
        let desired = edge_hub_desired(manifest).ok_or(ManifestError::NoEdgeHub)?;
        let version = desired
            .get("schemaVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let minor = match version.split('.').collect::<Vec<_>>().as_slice() {
            ["1", minor] | ["1", minor, ..] => minor.parse::<u32>().ok().filter(|m| *m <= 3),
            _ => None,
        }
        .ok_or_else(|| ManifestError::SchemaVersion(version.to_owned()))?;
        let shape = |why: String| ManifestError::Shape(why);
        let time_to_live_secs = match desired.get("storeAndForwardConfiguration") {
            Some(store) => match store.get("timeToLiveSecs").map(Value::as_i64) {
                Some(Some(ttl)) if ttl < 0 => None,
                Some(Some(ttl)) => Some(u64::try_from(ttl).unwrap_or(0)),
                Some(None) => {
                    return Err(shape(
                        "storeAndForwardConfiguration.timeToLiveSecs is not an integer".into(),
                    ));
                }
                None => None,
            },
            None if minor >= 1 => {
                return Err(shape(format!(
                    "schema {version} requires storeAndForwardConfiguration"
                )));
            }
            None => None,
        };
        let mut routes = Vec::new();
        let listed = match desired.get("routes") {
            None => None,
            Some(Value::Object(listed)) => Some(listed),
            Some(_) => return Err(shape("routes is not an object of named routes".into())),
        };
        for (name, spec) in listed.into_iter().flatten() {
            routes.push(route(name, spec, minor)?);
        }
        Ok(RouteTable {
            routes,
            time_to_live_secs,
        })
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Every endpoint a route reaches, at the route's priority: where messages may go.
    pub fn endpoints(&self) -> impl Iterator<Item = (&Sink, u32)> {
        self.routes
            .iter()
            .map(|route| (&route.sink, route.priority))
    }

    /// Where a message from `source` goes: once per endpoint, at the highest priority of the
    /// routes that take it there (the lowest number), with that route's time to live or the
    /// global one. Empty: no route takes it (a `no_route` drop).
    #[must_use]
    pub fn evaluate(&self, source: &str, message: &dyn MessageView) -> Vec<Dispatch<'_>> {
        let mut dispatches: Vec<Dispatch<'_>> = Vec::new();
        let source = lowered_source(source);
        for (index, route) in self
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches_lowered(&source, message))
        {
            let dispatch = Dispatch {
                sink: &route.sink,
                priority: route.priority,
                time_to_live_secs: route
                    .time_to_live_secs
                    .map(u64::from)
                    .or(self.time_to_live_secs),
                route: index,
            };
            match dispatches.iter_mut().find(|d| d.sink == dispatch.sink) {
                Some(existing) if existing.priority > dispatch.priority => *existing = dispatch,
                Some(_) => {}
                None => dispatches.push(dispatch),
            }
        }
        dispatches
    }
}

/// The `$edgeHub` desired properties in any of the shapes a manifest comes in.
#[must_use]
pub fn edge_hub_desired(manifest: &Value) -> Option<&Value> {
    if manifest.get("schemaVersion").is_some() {
        return Some(manifest);
    }
    if let Some(desired) = manifest.get("properties.desired") {
        return Some(desired);
    }
    let modules = manifest
        .get("modulesContent")
        .or_else(|| manifest.pointer("/content/modulesContent"))?;
    modules.get("$edgeHub")?.get("properties.desired")
}

/// One route of the manifest: a string, or (schema 1.1 and later) an object.
fn route(name: &str, spec: &Value, minor: u32) -> Result<CompiledRoute, ManifestError> {
    let shape = |why: &str| ManifestError::Shape(format!("route {name:?}: {why}"));
    let number = |key: &str| -> Result<Option<u32>, ManifestError> {
        match spec.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| shape(&format!("{key} is not a whole number"))),
        }
    };
    match spec {
        Value::String(text) => Ok(CompiledRoute::compile(name, text, None, None)?),
        Value::Object(_) if minor >= 1 => {
            let text = spec
                .get("route")
                .and_then(Value::as_str)
                .ok_or_else(|| shape("no \"route\" string"))?;
            let (priority, ttl) = (number("priority")?, number("timeToLiveSecs")?);
            Ok(CompiledRoute::compile(name, text, priority, ttl)?)
        }
        _ => Err(shape(if minor >= 1 {
            "a route is a string or {\"route\", \"priority\", \"timeToLiveSecs\"}"
        } else {
            "schema 1.0 routes are strings"
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::routes::PRIORITY_DEFAULT;

    struct Props(Vec<(&'static str, &'static str)>);

    impl MessageView for Props {
        fn app_property(&self, name: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
        fn system_property(&self, _: &str) -> Option<&str> {
            None
        }
        fn json_body(&self) -> Option<&serde_json::Value> {
            None
        }
    }

    const CONTRACT_EXAMPLE: &str = r#"{ "modulesContent": { "$edgeHub": { "properties.desired": {
      "schemaVersion": "1.1",
      "routes": {
        "alerts":  { "route": "FROM /messages/modules/cam/outputs/alerts INTO $upstream", "priority": 0, "timeToLiveSecs": 86400 },
        "toSink":  "FROM /messages/modules/filter/outputs/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")",
        "upstream":"FROM /messages/* INTO $upstream"
      },
      "storeAndForwardConfiguration": { "timeToLiveSecs": 7200, "storeLimits": { "maxSizeBytes": 1000000 } }
    }}}}"#;

    /// Goal: the contract's example manifest reads, and a message goes to each endpoint once,
    /// at its highest priority, with that route's time to live or the global one.
    #[test]
    fn the_contract_example_dispatches_once_per_endpoint() {
        let table = RouteTable::from_manifest(CONTRACT_EXAMPLE).expect("reads");
        assert_eq!(table.len(), 3);
        let none = Props(Vec::new());
        let alert = table.evaluate("/messages/modules/cam/outputs/alerts", &none);
        assert_eq!(
            alert,
            vec![Dispatch {
                sink: &Sink::Upstream,
                priority: 0,
                time_to_live_secs: Some(86_400),
                route: 0,
            }]
        );
        let mut filtered = table.evaluate("/messages/modules/filter/outputs/out1", &none);
        filtered.sort_by_key(|d| d.priority);
        assert_eq!(filtered.len(), 2);
        assert_eq!(
            *filtered[0].sink,
            Sink::ModuleInput {
                module: "sink".into(),
                input: "in1".into()
            }
        );
        assert_eq!(
            (filtered[1].priority, filtered[1].time_to_live_secs),
            (PRIORITY_DEFAULT, Some(7200))
        );
        assert_eq!(
            table.evaluate("/twinChangeNotifications", &none),
            Vec::new(),
            "no route"
        );
    }

    /// Goal: the other shapes and versions read, and bad manifests are refused saying why.
    #[test]
    fn manifests_read_in_every_shape_and_bad_ones_are_refused() {
        let desired = r#"{"schemaVersion":"1.0","routes":{"r":"FROM /* INTO $upstream"}}"#;
        let table = RouteTable::from_manifest(desired).expect("1.0, desired properties alone");
        assert_eq!(table.time_to_live_secs, None, "forever by default");
        let twin = format!(r#"{{"properties.desired":{desired}}}"#);
        assert_eq!(RouteTable::from_manifest(&twin).expect("a twin").len(), 1);
        let wrapped = format!(
            r#"{{"content":{{"modulesContent":{{"$edgeHub":{{"properties.desired":{desired}}}}}}}}}"#
        );
        assert_eq!(
            RouteTable::from_manifest(&wrapped)
                .expect("content.modulesContent")
                .len(),
            1
        );
        let forever = r#"{"schemaVersion":"1.2","routes":{},"storeAndForwardConfiguration":{"timeToLiveSecs":-1}}"#;
        assert_eq!(
            RouteTable::from_manifest(forever)
                .expect("1.2")
                .time_to_live_secs,
            None
        );
        for (bad, says) in [
            ("not json", "not JSON"),
            (r#"{"modulesContent":{}}"#, "no $edgeHub"),
            (r#"{"schemaVersion":"2.0","routes":{}}"#, "2.0"),
            (
                r#"{"schemaVersion":"1.1","routes":{}}"#,
                "requires storeAndForwardConfiguration",
            ),
            (
                r#"{"schemaVersion":"1.0","routes":{"r":{"route":"FROM /* INTO $upstream"}}}"#,
                "strings",
            ),
            (
                r#"{"schemaVersion":"1.1","storeAndForwardConfiguration":{},"routes":{"r":{"route":"FROM /* INTO $upstream","priority":11}}}"#,
                "priority 11",
            ),
            (
                r#"{"schemaVersion":"1.0","routes":{"bad":"FROM /messages/* WHERE temp > 30 INTO $upstream"}}"#,
                "route \"bad\" at 30",
            ),
        ] {
            let error = RouteTable::from_manifest(bad).expect_err(bad).to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    /// Goal: a condition decides per message.
    #[test]
    fn conditions_filter_per_message() {
        let manifest = r#"{"schemaVersion":"1.0","routes":{"hot":"FROM /messages/* WHERE as_number(temp) > 30 INTO $upstream"}}"#;
        let table = RouteTable::from_manifest(manifest).expect("reads");
        assert_eq!(
            table
                .evaluate("/messages", &Props(vec![("temp", "31")]))
                .len(),
            1
        );
        assert!(
            table
                .evaluate("/messages", &Props(vec![("temp", "29")]))
                .is_empty()
        );
        assert!(table.evaluate("/messages", &Props(Vec::new())).is_empty());
    }
}
