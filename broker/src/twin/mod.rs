//! Device and module twins (edgehub-contract.md §1.5): desired and reported properties, each
//! with its own `$version`, kept durably in the metadata store (`StateTable::Twins`).
//!
//! - [`TwinStore::get`] is what `$iothub/twin/GET` answers.
//! - [`TwinStore::patch_reported`] applies a reported patch as a JSON merge patch (`null`
//!   deletes), after IoT Hub's validation rules, and returns only once the change is on disk:
//!   law 1 holds for twins as for messages.
//! - [`TwinStore::apply_manifest`] puts a deployment's desired properties in force. The
//!   manifest owns the desired keys it names: a key it names is replaced at every reading, and
//!   a key it stops naming is removed; others (set by an operator) stay. It returns the patches
//!   to send to the modules subscribed to their desired properties.
//! - [`TwinRequest`] reads the twin topics a client publishes on, and writes the answers'.
//! - `cli`: `spool twin get|patch-desired`, through a running server's admin API.

pub mod cli;

use crate::auth::authenticator::Authenticator;
use crate::auth::identity::IdentityId;
use serde_json::{Map, Value};
use spool_storage::{Commit, Meta, MetaChange, StateTable};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use tokio::sync::mpsc;

/// The desired-property patches the store made, in the order it stored them: the server
/// forwards them to the hub (`Event::DesiredPatches`).
pub type DesiredPatches = mpsc::UnboundedReceiver<DesiredPatch>;

/// The deepest a reported property may nest (IoT Hub's limit).
const DEPTH_MAX: usize = 10;
/// The longest property name, in bytes.
const NAME_BYTES_MAX: usize = 1024;
/// The longest string value, in bytes.
const STRING_BYTES_MAX: usize = 4096;
/// The largest reported document, in bytes of JSON.
const DOCUMENT_BYTES_MAX: usize = 32 * 1024;
/// Integers must fit a double exactly: within ±2^52.
const INTEGER_MAX: i64 = (1 << 52) - 1;

/// The two halves of a twin, each patched and versioned on its own.
#[derive(Debug, Clone, Copy)]
enum Side {
    Reported,
    Desired,
}

/// One identity's twin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Twin {
    pub desired: Map<String, Value>,
    pub desired_version: u64,
    pub reported: Map<String, Value>,
    pub reported_version: u64,
    /// The desired keys the deployment manifest set, which its next reading replaces.
    #[serde(default)]
    pub manifest_keys: Vec<String>,
}

impl Default for Twin {
    fn default() -> Twin {
        Twin {
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
            manifest_keys: Vec::new(),
        }
    }
}

impl Twin {
    /// The twin as the SDKs read it: `{"desired": {…, "$version": n}, "reported": {…}}`.
    #[must_use]
    pub fn document(&self) -> Value {
        let with_version = |properties: &Map<String, Value>, version: u64| {
            let mut properties = properties.clone();
            properties.insert("$version".into(), version.into());
            Value::Object(properties)
        };
        serde_json::json!({
            "desired": with_version(&self.desired, self.desired_version),
            "reported": with_version(&self.reported, self.reported_version),
        })
    }
}

/// Why a twin operation failed, with the status IoT Hub answers.
#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    /// A patch IoT Hub refuses: 400.
    #[error("{0}")]
    Invalid(String),
    /// The store failed: 500.
    #[error("the twin store failed: {0}")]
    Storage(#[from] spool_storage::Error),
    /// The change could not run: 500.
    #[error("the twin change failed: {0}")]
    Failed(String),
    /// A stored twin that does not read.
    #[error("the stored twin of {key:?} is corrupt: {why}")]
    Corrupt { key: String, why: String },
    /// The identity is gone (removed while its client was connected): 404.
    #[error("no identity {0}")]
    NoIdentity(IdentityId),
}

impl TwinError {
    /// The status of the answer on `$iothub/twin/res/{status}/`.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            TwinError::Invalid(_) => 400,
            TwinError::NoIdentity(_) => 404,
            TwinError::Storage(_) | TwinError::Corrupt { .. } | TwinError::Failed(_) => 500,
        }
    }
}

/// Every twin, in memory and in the metadata store. A change is made on a copy, stored durably,
/// then put in place: readers never wait for a change's fsync.
#[derive(Debug)]
pub struct TwinStore {
    meta: Arc<Meta>,
    twins: RwLock<BTreeMap<IdentityId, Twin>>,
    /// Held by the one change under way, until its patch is in `outbox`: patches leave in the
    /// order their versions were stored, so a module never gets an older one after a newer.
    changing: Mutex<()>,
    outbox: mpsc::UnboundedSender<DesiredPatch>,
    /// The registry whose identities twins are patched for, once the server installs it
    /// ([`TwinStore::patch_only_registered`]).
    registry: OnceLock<Arc<Authenticator>>,
}

impl TwinStore {
    /// The twins stored in `meta`.
    ///
    /// # Errors
    /// The store's failure, or a stored twin that does not read.
    pub fn load(meta: Arc<Meta>) -> Result<(TwinStore, DesiredPatches), TwinError> {
        let mut twins = BTreeMap::new();
        for (key, bytes) in meta.state(StateTable::Twins)? {
            let corrupt = |why: String| TwinError::Corrupt {
                key: key.clone(),
                why,
            };
            let id = IdentityId::parse(&key).map_err(|e| corrupt(e.to_string()))?;
            let twin: Twin = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
            twins.insert(id, twin);
        }
        let (outbox, patches) = mpsc::unbounded_channel();
        let store = TwinStore {
            meta,
            twins: RwLock::new(twins),
            changing: Mutex::new(()),
            outbox,
            registry: OnceLock::new(),
        };
        Ok((store, patches))
    }

    /// From now on, patches only the twins of identities `authenticator`'s registry has: a
    /// module whose identity was just removed cannot bring its twin back.
    pub fn patch_only_registered(&self, authenticator: Arc<Authenticator>) {
        let _ = self.registry.set(authenticator);
    }

    /// Runs `remove`, the removal of identity `id` from the registry, which removes its twin
    /// from the store in the same commit (`IdentityRegistry::remove`), and forgets the twin if
    /// it succeeds; no patch of the twin runs meanwhile, so none stores it again.
    ///
    /// # Errors
    /// `remove`'s.
    pub fn forget_with<T, E>(
        &self,
        id: &IdentityId,
        remove: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let removed = remove()?;
        let mut twins = self.twins.write().unwrap_or_else(PoisonError::into_inner);
        twins.remove(id);
        Ok(removed)
    }

    /// Refuses a patch of `id`'s twin once its identity is gone (checked under `changing`).
    fn check_registered(&self, id: &IdentityId) -> Result<(), TwinError> {
        match self.registry.get() {
            Some(authenticator) if authenticator.registry().get(id).is_none() => {
                Err(TwinError::NoIdentity(id.clone()))
            }
            _ => Ok(()),
        }
    }

    /// `id`'s twin (a new one, at version 1, if it has none yet).
    #[must_use]
    pub fn get(&self, id: &IdentityId) -> Twin {
        let twins = self.twins.read().unwrap_or_else(PoisonError::into_inner);
        twins.get(id).cloned().unwrap_or_default()
    }

    /// Applies `patch` (a JSON object) to `id`'s reported properties and stores the twin
    /// durably; returns the new reported `$version`. Blocking: it commits to the metadata store.
    ///
    /// # Errors
    /// `Invalid` for a patch IoT Hub refuses (nothing changes), or the store's failure.
    pub fn patch_reported(
        &self,
        id: &IdentityId,
        patch: &[u8],
    ) -> Result<ReportedPatch, TwinError> {
        let patch = read_patch(patch)?;
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let version = self.merge_and_store(id, Side::Reported, &patch)?;
        Ok(ReportedPatch { version, patch })
    }
}

/// The system properties of a twin change notification, as its topic's bag carries them: JSON
/// in UTF-8 (so routes can query its body), of IoT Hub's twin-change schema.
pub const CHANGE_NOTIFICATION_PROPERTIES: [(&str, &str); 3] = [
    ("$.ct", "application/json"),
    ("$.ce", "utf-8"),
    ("$.schema", "twinChangeNotification"),
];

/// A reported patch applied: the new reported `$version` and the patch as the module sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedPatch {
    pub version: u64,
    pub patch: Map<String, Value>,
}

impl ReportedPatch {
    /// The twin change notification it makes (edgehub-contract.md §1.5), as routes see it:
    /// the topic of telemetry from `id` whose property bag says it is a JSON twin change
    /// notification, and the body IoT Hub writes, `{"version": n, "properties": {"reported":
    /// {…patch, "$version": n}}}`.
    #[must_use]
    pub fn change_notification(&self, id: &IdentityId) -> (String, Vec<u8>) {
        let mut reported = self.patch.clone();
        reported.insert("$version".into(), self.version.into());
        let body = serde_json::json!({
            "version": self.version,
            "properties": { "reported": reported },
        });
        let bag = crate::iothub::property_bag::encode(CHANGE_NOTIFICATION_PROPERTIES);
        let topic = match &id.module {
            Some(module) => format!(
                "devices/{}/modules/{module}/messages/events/{bag}",
                id.device
            ),
            None => format!("devices/{}/messages/events/{bag}", id.device),
        };
        (topic, body.to_string().into_bytes())
    }
}

/// A change of an identity's desired properties, as a module gets it on
/// `$iothub/twin/PATCH/properties/desired/?$version={version}`: the changed keys (`null` for a
/// removed one) and `$version`.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPatch {
    pub identity: IdentityId,
    pub version: u64,
    pub patch: Value,
}

impl TwinStore {
    /// Puts the desired properties a deployment manifest gives the modules of `device`
    /// (`desired`, by module) in force, durably and in one commit; returns the patches made.
    /// Blocking: it commits to the metadata store.
    ///
    /// # Errors
    /// `Invalid` for desired properties IoT Hub would refuse (nothing changes), or the store's
    /// failure.
    pub fn apply_manifest(
        &self,
        device: &str,
        desired: &BTreeMap<String, Map<String, Value>>,
    ) -> Result<Vec<DesiredPatch>, TwinError> {
        for properties in desired.values() {
            validate(properties, 1)?;
            check_size(properties, "desired")?;
        }
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self
            .twins
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // The modules the manifest names, and those it named before.
        let mut modules: Vec<IdentityId> = desired
            .keys()
            .map(|module| IdentityId {
                device: device.to_owned(),
                module: Some(module.clone()),
            })
            .collect();
        // Any twin the manifest set keys of and no longer names (of this device or of one it
        // named before) loses those keys.
        modules.extend(current.iter().filter_map(|(id, twin)| {
            let owned = !twin.manifest_keys.is_empty();
            let named =
                id.device == device && id.module.as_ref().is_some_and(|m| desired.contains_key(m));
            (owned && !named).then(|| id.clone())
        }));
        let empty = Map::new();
        let mut changed = Vec::new();
        let mut patches = Vec::new();
        for id in modules {
            let given = id
                .module
                .as_ref()
                .and_then(|m| desired.get(m))
                .unwrap_or(&empty);
            let mut twin = current.get(&id).cloned().unwrap_or_default();
            let Some(patch) = take_manifest(&mut twin, given) else {
                continue;
            };
            if let Some(mut patch) = patch {
                twin.desired_version += 1;
                patch.insert("$version".into(), twin.desired_version.into());
                patches.push(DesiredPatch {
                    identity: id.clone(),
                    version: twin.desired_version,
                    patch: Value::Object(patch),
                });
            }
            changed.push((id, twin));
        }
        self.store(changed)?;
        for patch in &patches {
            let _ = self.outbox.send(patch.clone()); // gone only when the server stops
        }
        Ok(patches)
    }

    /// Applies `patch` (a JSON object; `null` deletes) to `id`'s desired properties, as an
    /// operator asks (`spool twin patch-desired`), and stores the twin durably; returns the patch
    /// to send to the module. A key the deployment manifest names stays the manifest's: its next
    /// reading sets it again. Blocking: it commits to the metadata store.
    ///
    /// # Errors
    /// `Invalid` for a patch IoT Hub refuses (nothing changes), or the store's failure.
    pub fn patch_desired(&self, id: &IdentityId, patch: &[u8]) -> Result<DesiredPatch, TwinError> {
        let mut patch = read_patch(patch)?;
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let version = self.merge_and_store(id, Side::Desired, &patch)?;
        patch.insert("$version".into(), version.into());
        let patch = DesiredPatch {
            identity: id.clone(),
            version,
            patch: Value::Object(patch),
        };
        let _ = self.outbox.send(patch.clone()); // gone only when the server stops
        Ok(patch)
    }

    /// Merges `patch` into `id`'s `side` properties, holds them to IoT Hub's size, raises their
    /// `$version` and stores the twin durably; returns the new version. The caller holds
    /// `changing`, under which the identity is checked to be registered.
    fn merge_and_store(
        &self,
        id: &IdentityId,
        side: Side,
        patch: &Map<String, Value>,
    ) -> Result<u64, TwinError> {
        self.check_registered(id)?;
        let mut twin = self.get(id);
        let (properties, version, name) = match side {
            Side::Reported => (&mut twin.reported, &mut twin.reported_version, "reported"),
            Side::Desired => (&mut twin.desired, &mut twin.desired_version, "desired"),
        };
        merge(properties, patch.clone());
        check_size(properties, name)?;
        *version += 1;
        let version = *version;
        self.store(vec![(id.clone(), twin)])?;
        Ok(version)
    }

    /// Stores `twins` durably in one commit, then puts them in place.
    fn store(&self, twins: Vec<(IdentityId, Twin)>) -> Result<(), TwinError> {
        if twins.is_empty() {
            return Ok(());
        }
        let mut changes = Vec::with_capacity(twins.len());
        for (id, twin) in &twins {
            let value = serde_json::to_vec(twin).map_err(|e| TwinError::Corrupt {
                key: id.key(),
                why: e.to_string(),
            })?;
            changes.push(MetaChange::State {
                table: StateTable::Twins,
                key: id.key(),
                value: Some(value),
            });
        }
        self.meta.apply(&changes, Commit::Durable)?;
        let mut current = self.twins.write().unwrap_or_else(PoisonError::into_inner);
        current.extend(twins);
        Ok(())
    }
}

/// Gives `twin` the manifest's desired properties `given`: the keys it names replaced, the
/// keys it named before and names no more removed. `None` if nothing changes at all; else the
/// patch of changed values, `None` inside when only which keys the manifest owns changed.
#[allow(clippy::option_option)]
fn take_manifest(
    twin: &mut Twin,
    given: &Map<String, Value>,
) -> Option<Option<Map<String, Value>>> {
    let before = twin.desired.clone();
    for key in &twin.manifest_keys {
        if !given.contains_key(key) {
            twin.desired.remove(key);
        }
    }
    for (key, value) in given {
        twin.desired.insert(key.clone(), value.clone());
    }
    let keys: Vec<String> = given.keys().cloned().collect();
    let owned_changed = keys != twin.manifest_keys;
    twin.manifest_keys = keys;
    let patch = diff(&before, &twin.desired);
    match (patch.is_empty(), owned_changed) {
        (true, false) => None,
        (true, true) => Some(None),
        (false, _) => Some(Some(patch)),
    }
}

/// The merge patch that turns `before` into `after` (RFC 7386): changed values, objects
/// recursed into, `null` for what is gone.
fn diff(before: &Map<String, Value>, after: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for (key, old) in before {
        if !after.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        } else if let (Value::Object(old), Some(Value::Object(new))) = (old, after.get(key)) {
            let inner = diff(old, new);
            if !inner.is_empty() {
                patch.insert(key.clone(), Value::Object(inner));
            }
        }
    }
    for (key, new) in after {
        match before.get(key) {
            Some(Value::Object(_)) if new.is_object() => {} // recursed into above
            Some(old) if old == new => {}
            _ => {
                patch.insert(key.clone(), new.clone());
            }
        }
    }
    patch
}

/// A patch as a client or operator sends it: a JSON object within IoT Hub's rules.
fn read_patch(patch: &[u8]) -> Result<Map<String, Value>, TwinError> {
    let patch: Value = serde_json::from_slice(patch)
        .map_err(|e| TwinError::Invalid(format!("the patch is not JSON: {e}")))?;
    let Value::Object(patch) = patch else {
        return Err(TwinError::Invalid("the patch is not a JSON object".into()));
    };
    validate(&patch, 1)?;
    Ok(patch)
}

/// Refuses `properties` (`which` ones) above IoT Hub's document size.
fn check_size(properties: &Map<String, Value>, which: &str) -> Result<(), TwinError> {
    let size = Value::Object(properties.clone()).to_string().len();
    if size > DOCUMENT_BYTES_MAX {
        return Err(TwinError::Invalid(format!(
            "the {which} properties would take {size} bytes, above {DOCUMENT_BYTES_MAX}"
        )));
    }
    Ok(())
}

/// Checks a patch against IoT Hub's rules for reported properties, `depth` being the level of
/// `properties` (1 at the top).
fn validate(properties: &Map<String, Value>, depth: usize) -> Result<(), TwinError> {
    if depth > DEPTH_MAX {
        return Err(TwinError::Invalid(format!(
            "properties nest deeper than {DEPTH_MAX} levels"
        )));
    }
    for (name, value) in properties {
        if name.len() > NAME_BYTES_MAX {
            return Err(TwinError::Invalid(format!(
                "property name of {} bytes, above {NAME_BYTES_MAX}",
                name.len()
            )));
        }
        if name.is_empty() || name.starts_with('$') || name.contains(['.', ' ']) {
            return Err(TwinError::Invalid(format!(
                "property name {name:?}: empty, or with '$' first, '.' or ' '"
            )));
        }
        validate_value(name, value, depth)?;
    }
    Ok(())
}

fn validate_value(name: &str, value: &Value, depth: usize) -> Result<(), TwinError> {
    match value {
        Value::String(text) if text.len() > STRING_BYTES_MAX => Err(TwinError::Invalid(format!(
            "property {name:?}: a string of {} bytes, above {STRING_BYTES_MAX}",
            text.len()
        ))),
        Value::Number(number)
            if number
                .as_i64()
                .is_some_and(|n| !(-INTEGER_MAX - 1..=INTEGER_MAX).contains(&n))
                || number.as_u64().is_some_and(|n| n > INTEGER_MAX as u64) =>
        {
            Err(TwinError::Invalid(format!(
                "property {name:?}: an integer beyond ±2^52"
            )))
        }
        Value::Object(inner) => validate(inner, depth + 1),
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| validate_value(name, item, depth + 1)),
        _ => Ok(()),
    }
}

/// RFC 7386 JSON merge patch: `null` deletes, objects merge, anything else replaces.
fn merge(target: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (name, value) in patch {
        match value {
            Value::Null => {
                target.remove(&name);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(name)
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(existing) = slot {
                    merge(existing, inner);
                }
            }
            other => {
                target.insert(name, other);
            }
        }
    }
}

/// A twin operation a client asks for by publishing on a twin topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwinRequest {
    /// `$iothub/twin/GET/?$rid={rid}`.
    Get { rid: String },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`.
    PatchReported { rid: String },
}

impl TwinRequest {
    /// The request a publish on `topic` makes; `None` if it is no twin request.
    #[must_use]
    pub fn parse(topic: &str) -> Option<TwinRequest> {
        let (kind, query) = if let Some(query) = topic.strip_prefix("$iothub/twin/GET/") {
            (true, query)
        } else {
            (
                false,
                topic.strip_prefix("$iothub/twin/PATCH/properties/reported/")?,
            )
        };
        let rid = crate::iothub::topics::query_value(query, "$rid")
            .unwrap_or_default()
            .to_owned();
        Some(match kind {
            true => TwinRequest::Get { rid },
            false => TwinRequest::PatchReported { rid },
        })
    }

    /// The request id the answer carries.
    #[must_use]
    pub fn rid(&self) -> &str {
        match self {
            TwinRequest::Get { rid } | TwinRequest::PatchReported { rid } => rid,
        }
    }
}

/// The topic of an answer: `$iothub/twin/res/{status}/?$rid={rid}`, with `&$version={v}` after
/// a patch.
#[must_use]
pub fn answer_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(version) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={version}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store() -> (TwinStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let meta = Meta::open(&dir.path().join("meta.redb")).expect("meta");
        (TwinStore::load(Arc::new(meta)).expect("empty").0, dir)
    }

    /// Goal: once the server installs its registry, a twin is patched only while its
    /// identity is there, so a module whose identity was just removed cannot store its twin
    /// again.
    #[test]
    fn twins_are_patched_only_for_registered_identities() {
        let (twins, _dir) = store();
        let id = IdentityId::parse("edge/gone").expect("id");
        twins
            .patch_reported(&id, br#"{"a": 1}"#)
            .expect("no registry installed yet");
        let registry = crate::auth::registry::IdentityRegistry::load(&twins.meta).expect("load");
        let authenticator = Authenticator::new(registry, Vec::new());
        twins.patch_only_registered(Arc::new(authenticator));
        let refused = twins.patch_reported(&id, br#"{"a": 2}"#);
        assert!(
            matches!(refused, Err(TwinError::NoIdentity(_))),
            "{refused:?}"
        );
        let refused = twins.patch_desired(&id, br#"{"b": 1}"#);
        assert!(
            matches!(refused, Err(TwinError::NoIdentity(_))),
            "{refused:?}"
        );
        assert_eq!(twins.get(&id).reported_version, 2, "unchanged");
    }

    /// Goal: a reported patch merges (null deletes, objects merge), raises the version, and is
    /// in the store when it returns.
    #[test]
    fn reported_patches_merge_and_are_stored() {
        let (twins, dir) = store();
        let id = IdentityId::parse("edge/filter").expect("id");
        assert_eq!(
            twins.get(&id).document(),
            serde_json::json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );
        let first = br#"{"a": 1, "nested": {"x": 1, "y": 2}, "gone": true}"#;
        assert_eq!(
            twins.patch_reported(&id, first).expect("applied").version,
            2
        );
        let second = br#"{"nested": {"y": null, "z": "new"}, "gone": null}"#;
        assert_eq!(
            twins.patch_reported(&id, second).expect("applied").version,
            3
        );
        let expected = serde_json::json!({"a": 1, "nested": {"x": 1, "z": "new"}, "$version": 3});
        assert_eq!(twins.get(&id).document()["reported"], expected);
        drop(twins);
        let meta = Meta::open(&dir.path().join("meta.redb")).expect("reopens");
        let (reopened, _) = TwinStore::load(Arc::new(meta)).expect("loads");
        assert_eq!(reopened.get(&id).document()["reported"], expected);
    }

    /// Goal: IoT Hub's limits refuse a patch with 400 and change nothing.
    #[test]
    fn patches_beyond_iot_hubs_limits_are_refused() {
        let (twins, _dir) = store();
        let id = IdentityId::parse("edge/filter").expect("id");
        let deep = (0..11).fold("1".to_owned(), |inner, _| format!("{{\"k\": {inner}}}"));
        let long_name = format!("{{\"{}\": 1}}", "n".repeat(1025));
        let long_value = format!("{{\"k\": \"{}\"}}", "v".repeat(4097));
        for bad in [
            deep.as_str(),
            &long_name,
            &long_value,
            r#"{"k": 9007199254740993}"#,
            r#"{"$k": 1}"#,
            r#"{"a.b": 1}"#,
            "[1]",
            "not json",
        ] {
            let error = twins.patch_reported(&id, bad.as_bytes()).expect_err(bad);
            assert_eq!(error.status(), 400, "{bad}: {error}");
        }
        let nine_deep = (0..9).fold("1".to_owned(), |inner, _| format!("{{\"k\": {inner}}}"));
        twins
            .patch_reported(&id, nine_deep.as_bytes())
            .expect("ten levels are allowed");
        assert_eq!(
            twins.get(&id).reported_version,
            2,
            "only the good patch counted"
        );
    }

    /// Goal: the manifest owns the desired keys it names: they are set and replaced at each
    /// reading, removed when it stops naming them, and a change becomes one patch with the new
    /// `$version`; a reading that changes nothing makes no patch.
    #[test]
    fn the_manifest_owns_the_desired_keys_it_names() {
        let (twins, _dir) = store();
        let filter = IdentityId::parse("edge/filter").expect("id");
        let manifest = |json: &str| -> BTreeMap<String, Map<String, Value>> {
            serde_json::from_str(json).expect("json")
        };
        let first = twins
            .apply_manifest("edge", &manifest(r#"{"filter": {"rate": 5, "mode": "a"}}"#))
            .expect("applied");
        assert_eq!(
            first,
            vec![DesiredPatch {
                identity: filter.clone(),
                version: 2,
                patch: serde_json::json!({"rate": 5, "mode": "a", "$version": 2}),
            }]
        );
        let again = twins
            .apply_manifest("edge", &manifest(r#"{"filter": {"rate": 5, "mode": "a"}}"#))
            .expect("applied");
        assert!(again.is_empty(), "nothing changed");
        let second = twins
            .apply_manifest("edge", &manifest(r#"{"filter": {"rate": 7}}"#))
            .expect("applied");
        assert_eq!(
            second[0].patch,
            serde_json::json!({"rate": 7, "mode": null, "$version": 3})
        );
        let nested = twins
            .apply_manifest(
                "edge",
                &manifest(r#"{"filter": {"rate": 7, "cfg": {"a": 1, "b": 2}}}"#),
            )
            .expect("applied");
        assert_eq!(
            nested[0].patch,
            serde_json::json!({"cfg": {"a": 1, "b": 2}, "$version": 4})
        );
        let inner = twins
            .apply_manifest(
                "edge",
                &manifest(r#"{"filter": {"rate": 7, "cfg": {"a": 1}}}"#),
            )
            .expect("applied");
        assert_eq!(
            inner[0].patch,
            serde_json::json!({"cfg": {"b": null}, "$version": 5}),
            "a nested key that goes is a null inside its object"
        );
        let gone = twins.apply_manifest("", &manifest("{}")).expect("applied");
        assert_eq!(
            gone[0].patch,
            serde_json::json!({"rate": null, "cfg": null, "$version": 6}),
            "a manifest that names no module, even with no device known, removes its keys"
        );
        assert_eq!(
            twins.get(&filter).document()["desired"],
            serde_json::json!({"$version": 6})
        );
    }

    /// JSON values of a few levels, with nulls inside objects (as patches carry them).
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-1000i64..1000).prop_map(Value::from),
            "[a-z]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop::collection::btree_map("[a-c]", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect()))
        })
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map("[a-c]", json(), 0..4).prop_map(|m| m.into_iter().collect())
    }

    /// What a merge should leave at `key`: the patch's value with its nulls gone, merged into
    /// an object the target already has there.
    fn expected(target: Option<&Value>, patch: &Value) -> Option<Value> {
        match patch {
            Value::Null => None,
            Value::Object(inner) => {
                let mut base = match target {
                    Some(Value::Object(existing)) => existing.clone(),
                    _ => Map::new(),
                };
                for (key, value) in inner {
                    match expected(base.get(key), value) {
                        Some(value) => base.insert(key.clone(), value),
                        None => base.remove(key),
                    };
                }
                Some(Value::Object(base))
            }
            other => Some(other.clone()),
        }
    }

    fn holds_null(value: &Value) -> bool {
        match value {
            Value::Null => true,
            Value::Object(map) => map.values().any(holds_null),
            Value::Array(items) => items.iter().any(holds_null),
            _ => false,
        }
    }

    proptest! {
        /// Goal: a merge patch deletes what it nulls, merges nested objects key by key, and
        /// replaces everything else; no null is ever stored.
        #[test]
        fn merge_patches_follow_rfc_7386(given in object(), patch in object()) {
            // A stored document never holds a null: it is itself a merge into nothing.
            let mut target = Map::new();
            merge(&mut target, given);
            let mut merged = target.clone();
            merge(&mut merged, patch.clone());
            for (key, value) in &patch {
                prop_assert_eq!(merged.get(key).cloned(), expected(target.get(key), value));
            }
            for (key, value) in &target {
                if !patch.contains_key(key) {
                    prop_assert_eq!(merged.get(key), Some(value));
                }
            }
            prop_assert!(!holds_null(&Value::Object(merged)));
        }
    }

    /// Goal: versions only grow, through any mix of reported patches, refused patches and
    /// operators' desired patches.
    #[test]
    fn versions_only_grow() {
        let (twins, _dir) = store();
        let id = IdentityId::parse("edge/filter").expect("id");
        let (mut reported, mut desired) = (1, 1);
        for round in 0..20u64 {
            let patch = format!("{{\"k{}\": {round}}}", round % 3);
            match round % 3 {
                0 => {
                    let version = twins
                        .patch_reported(&id, patch.as_bytes())
                        .expect("ok")
                        .version;
                    assert!(version > reported);
                    reported = version;
                }
                1 => {
                    let version = twins
                        .patch_desired(&id, patch.as_bytes())
                        .expect("ok")
                        .version;
                    assert!(version > desired);
                    desired = version;
                }
                _ => assert!(twins.patch_reported(&id, b"{\"$bad\": 1}").is_err()),
            }
            let twin = twins.get(&id);
            assert_eq!(
                (twin.reported_version, twin.desired_version),
                (reported, desired)
            );
        }
    }

    /// Goal: the twin topics the SDKs publish on are read with their request id.
    #[test]
    fn twin_topics_are_read() {
        assert_eq!(
            TwinRequest::parse("$iothub/twin/GET/?$rid=42"),
            Some(TwinRequest::Get { rid: "42".into() })
        );
        assert_eq!(
            TwinRequest::parse("$iothub/twin/PATCH/properties/reported/?$rid=7&$version=3"),
            Some(TwinRequest::PatchReported { rid: "7".into() })
        );
        assert_eq!(TwinRequest::parse("$iothub/methods/res/200/?$rid=1"), None);
        assert_eq!(
            answer_topic(204, "7", Some(3)),
            "$iothub/twin/res/204/?$rid=7&$version=3"
        );
    }
}
