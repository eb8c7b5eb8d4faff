//! [`IdentityRegistry`]: every device and module spool knows, kept in the metadata store (one
//! entry per identity, JSON) and in memory. Each change is committed durably before it counts:
//! an identity added, disabled or rotated stays so after a crash.

use super::identity::{
    Credentials, IdentitiesFile, Identity, IdentityError, IdentityId, derive_module_key, new_key,
};
use spool_storage::{Commit, Meta, MetaChange, StateTable};
use std::collections::BTreeMap;

/// Why the registry could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Storage(#[from] spool_storage::Error),
    #[error("the stored identity {key:?} is corrupt: {why}")]
    Corrupt { key: String, why: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("no identity {0}")]
    NotFound(IdentityId),
    #[error("identity {0} exists already")]
    Exists(IdentityId),
    #[error("{0} has no SAS keys to rotate")]
    NotSas(IdentityId),
    #[error("the keys of {0} are derived from its device's: rotate the device's keys")]
    RotateDerived(IdentityId),
    #[error("the keys of {module} are derived from device {device}'s, which {why}")]
    NoDeviceKey {
        module: IdentityId,
        device: String,
        why: &'static str,
    },
    #[error("the keys of {modules:?} are derived from {device}'s: remove them first")]
    DevicesModulesDerive {
        device: IdentityId,
        modules: Vec<String>,
    },
    #[error("the system's random source failed: {0}")]
    Random(#[from] getrandom::Error),
}

/// The identities, as stored.
#[derive(Debug, Default, Clone)]
pub struct IdentityRegistry {
    identities: BTreeMap<IdentityId, Identity>,
}

impl IdentityRegistry {
    /// The identities stored in `meta`.
    ///
    /// # Errors
    /// `Storage`, or `Corrupt` for an entry that does not decode.
    pub fn load(meta: &Meta) -> Result<IdentityRegistry, RegistryError> {
        let mut identities = BTreeMap::new();
        for (key, bytes) in meta.state(StateTable::Identities)? {
            let corrupt = |why: String| RegistryError::Corrupt {
                key: key.clone(),
                why,
            };
            let identity: Identity =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
            if identity.id.key() != key {
                return Err(corrupt(format!("it names {}", identity.id)));
            }
            identities.insert(identity.id.clone(), identity);
        }
        Ok(IdentityRegistry { identities })
    }

    #[must_use]
    pub fn get(&self, id: &IdentityId) -> Option<&Identity> {
        self.identities.get(id)
    }

    /// Every identity, devices before their modules.
    pub fn iter(&self) -> impl Iterator<Item = &Identity> {
        self.identities.values()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.identities.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// Adds a new identity; returns it as stored (derived keys filled in).
    ///
    /// # Errors
    /// `Exists`, an invalid identity, or the store's failure (then nothing changed).
    pub fn add(&mut self, meta: &Meta, identity: Identity) -> Result<&Identity, RegistryError> {
        if self.identities.contains_key(&identity.id) {
            return Err(RegistryError::Exists(identity.id));
        }
        let id = identity.id.clone();
        self.put(meta, vec![identity])?;
        Ok(&self.identities[&id])
    }

    /// Changes an existing identity with `change`, then stores it.
    ///
    /// # Errors
    /// `NotFound`, an invalid result, or the store's failure (then nothing changed).
    pub fn update(
        &mut self,
        meta: &Meta,
        id: &IdentityId,
        change: impl FnOnce(&mut Identity),
    ) -> Result<&Identity, RegistryError> {
        let mut identity = self
            .identities
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.clone()))?
            .clone();
        change(&mut identity);
        self.put(meta, vec![identity])?;
        Ok(&self.identities[id])
    }

    /// Removes an identity, and its twin.
    ///
    /// # Errors
    /// `NotFound`, or the store's failure (then nothing changed).
    pub fn remove(&mut self, meta: &Meta, id: &IdentityId) -> Result<Identity, RegistryError> {
        if !self.identities.contains_key(id) {
            return Err(RegistryError::NotFound(id.clone()));
        }
        let deriving: Vec<String> = self
            .derived_from(id)
            .map(|module| module.id.to_string())
            .collect();
        if !deriving.is_empty() {
            return Err(RegistryError::DevicesModulesDerive {
                device: id.clone(),
                modules: deriving,
            });
        }
        // Its twin goes with it, in the same commit, as in IoT Hub: an identity added again
        // under the same id starts with a new twin.
        let changes = [StateTable::Identities, StateTable::Twins].map(|table| MetaChange::State {
            table,
            key: id.key(),
            value: None,
        });
        meta.apply(&changes, Commit::Durable)?;
        Ok(self.identities.remove(id).expect("looked up above"))
    }

    /// Replaces an identity's primary or secondary SAS key, or both, with new random ones.
    ///
    /// # Errors
    /// `NotFound`, `NotSas` for an identity with certificates, or the store's failure (then
    /// nothing changed).
    pub fn rotate(
        &mut self,
        meta: &Meta,
        id: &IdentityId,
        rotate_primary: bool,
        rotate_secondary: bool,
    ) -> Result<&Identity, RegistryError> {
        match self.identities.get(id).map(|i| &i.credentials) {
            None => return Err(RegistryError::NotFound(id.clone())),
            Some(Credentials::Sas { .. }) => {}
            Some(Credentials::Derived { .. }) => {
                return Err(RegistryError::RotateDerived(id.clone()));
            }
            Some(_) => return Err(RegistryError::NotSas(id.clone())),
        }
        let (new_primary, new_secondary) = (new_key()?, new_key()?);
        self.update(meta, id, |identity| {
            if let Credentials::Sas { primary, secondary } = &mut identity.credentials {
                if rotate_primary {
                    *primary = new_primary;
                }
                if rotate_secondary {
                    *secondary = new_secondary;
                }
            }
        })
    }

    /// Stores every identity of an identities file, in one commit: those it names are added or
    /// replaced, the others stay. Returns how many it stored.
    ///
    /// # Errors
    /// The store's failure (then nothing changed).
    pub fn seed(&mut self, meta: &Meta, file: IdentitiesFile) -> Result<usize, RegistryError> {
        let count = file.identities.len();
        self.put(meta, file.identities)?;
        Ok(count)
    }

    /// The modules whose keys are derived from device `device`'s.
    fn derived_from<'a>(&'a self, device: &'a IdentityId) -> impl Iterator<Item = &'a Identity> {
        self.identities.values().filter(move |identity| {
            device.module.is_none()
                && identity.id.device == device.device
                && matches!(identity.credentials, Credentials::Derived { .. })
        })
    }

    /// Fills in the derived keys of the modules among `identities`, and of the stored modules
    /// whose device is among them (a device's keys changed, so do theirs): those are added.
    fn derive_keys(&self, identities: &mut Vec<Identity>) -> Result<(), RegistryError> {
        let changed_devices: Vec<IdentityId> = identities
            .iter()
            .filter(|identity| identity.id.module.is_none())
            .map(|identity| identity.id.clone())
            .collect();
        for device in &changed_devices {
            for module in self.derived_from(device) {
                if !identities.iter().any(|identity| identity.id == module.id) {
                    identities.push(module.clone());
                }
            }
        }
        let batch = identities.clone();
        for identity in identities.iter_mut() {
            let Credentials::Derived { primary, secondary } = &mut identity.credentials else {
                continue;
            };
            let (Some(module), Some(generation)) = (&identity.id.module, &identity.generation_id)
            else {
                continue; // refused by `validate`
            };
            let device = IdentityId {
                device: identity.id.device.clone(),
                module: None,
            };
            let no_key = |why| RegistryError::NoDeviceKey {
                module: identity.id.clone(),
                device: device.device.clone(),
                why,
            };
            let device_identity = batch
                .iter()
                .find(|other| other.id == device)
                .or_else(|| self.identities.get(&device))
                .ok_or_else(|| no_key("is not registered"))?;
            let Credentials::Sas { .. } = device_identity.credentials else {
                return Err(no_key("has no SAS keys"));
            };
            let device_key = device_identity.sas_keys().into_iter().next();
            let device_key = device_key.ok_or_else(|| no_key("has no valid primary key"))?;
            *primary = derive_module_key(&device_key, module, "primary", generation);
            *secondary = derive_module_key(&device_key, module, "secondary", generation);
        }
        Ok(())
    }

    /// Validates and stores `identities` in one durable commit, then takes them in; derived
    /// keys are filled in first (`derive_keys`).
    fn put(&mut self, meta: &Meta, mut identities: Vec<Identity>) -> Result<(), RegistryError> {
        self.derive_keys(&mut identities)?;
        let mut changes = Vec::with_capacity(identities.len());
        for identity in &identities {
            identity.validate()?;
            let value = serde_json::to_vec(identity).map_err(|e| RegistryError::Corrupt {
                key: identity.id.key(),
                why: e.to_string(),
            })?;
            changes.push(MetaChange::State {
                table: StateTable::Identities,
                key: identity.id.key(),
                value: Some(value),
            });
        }
        meta.apply(&changes, Commit::Durable)?;
        for identity in identities {
            self.identities.insert(identity.id.clone(), identity);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::Status;

    /// Goal: a module registered without keys of its own gets the keys IoT Edge 1.1 derives
    /// from its device's primary key and its generation id (values computed independently,
    /// with Python's hmac); they follow the device's keys, and the device cannot go while
    /// they depend on it.
    #[test]
    fn derived_module_keys_are_iot_edges_and_follow_the_devices_keys() {
        let dir = tempfile::tempdir().expect("dir");
        let meta = Meta::open(&dir.path().join("meta.redb")).expect("meta");
        let mut registry = IdentityRegistry::load(&meta).expect("empty");
        let device = IdentityId::parse("edge").expect("id");
        let module = IdentityId::parse("edge/filter").expect("id");
        let derived = Identity {
            id: module.clone(),
            status: Status::Enabled,
            credentials: Credentials::Derived {
                primary: String::new(),
                secondary: String::new(),
            },
            generation_id: Some("637661921011556752".into()),
        };
        assert!(matches!(
            registry.add(&meta, derived.clone()),
            Err(RegistryError::NoDeviceKey { .. })
        ));
        let key = |byte: u8| {
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [byte; 32])
        };
        let device_identity = Identity {
            id: device.clone(),
            status: Status::Enabled,
            credentials: Credentials::Sas {
                primary: key(7),
                secondary: key(9),
            },
            generation_id: None,
        };
        let file = IdentitiesFile {
            identities: vec![derived, device_identity],
        };
        registry
            .seed(&meta, file)
            .expect("the device comes in the same file");
        assert_eq!(
            registry.get(&module).expect("added").credentials,
            Credentials::Derived {
                primary: "LSZYwFAsd78Nh0VfdmZ59YejHPKD9NKIgYljp539CgA=".into(),
                secondary: "Hw9A7unTKsLmbS5eyC9IYLIw7QQSq4y4AfN0EzuClAs=".into(),
            }
        );
        registry
            .update(&meta, &device, |identity| {
                identity.credentials = Credentials::Sas {
                    primary: key(8),
                    secondary: key(9),
                };
            })
            .expect("the device's key changed");
        let Credentials::Derived { primary, .. } =
            &registry.get(&module).expect("kept").credentials
        else {
            panic!("still derived");
        };
        assert_eq!(primary, "Xh8txnPfYHhVBs3VoB+PhT8PE1pyjDWBjdoBb9zne8c=");
        assert_eq!(
            IdentityRegistry::load(&meta).expect("reloads").get(&module),
            registry.get(&module),
            "derived again durably, in the device's commit"
        );
        assert!(matches!(
            registry.rotate(&meta, &module, true, true),
            Err(RegistryError::RotateDerived(_))
        ));
        assert!(matches!(
            registry.remove(&meta, &device),
            Err(RegistryError::DevicesModulesDerive { .. })
        ));
    }

    /// Goal: what the registry was told survives a reopen: added, changed, removed, seeded.
    #[test]
    fn changes_are_stored_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("meta.redb");
        let meta = Meta::open(&path).expect("meta");
        let mut registry = IdentityRegistry::load(&meta).expect("empty");
        let filter = IdentityId::parse("edge/filter").expect("id");
        let leaf = IdentityId::parse("leaf").expect("id");
        registry
            .add(
                &meta,
                Identity::with_new_keys(filter.clone()).expect("keys"),
            )
            .expect("added");
        assert!(matches!(
            registry.add(
                &meta,
                Identity::with_new_keys(filter.clone()).expect("keys")
            ),
            Err(RegistryError::Exists(_))
        ));
        registry
            .update(&meta, &filter, |identity| {
                identity.status = Status::Disabled
            })
            .expect("disabled");
        let file = IdentitiesFile {
            identities: vec![Identity {
                id: leaf.clone(),
                status: Status::Enabled,
                credentials: Credentials::X509Ca,
                generation_id: None,
            }],
        };
        assert_eq!(registry.seed(&meta, file).expect("seeded"), 1);
        drop(meta);
        let meta = Meta::open(&path).expect("reopened");
        let mut registry = IdentityRegistry::load(&meta).expect("loads");
        assert_eq!(registry.len(), 2);
        assert_eq!(
            registry.get(&filter).expect("kept").status,
            Status::Disabled
        );
        registry.remove(&meta, &leaf).expect("removed");
        assert!(matches!(
            registry.remove(&meta, &leaf),
            Err(RegistryError::NotFound(_))
        ));
        drop(meta);
        let meta = Meta::open(&path).expect("reopened");
        assert_eq!(IdentityRegistry::load(&meta).expect("loads").len(), 1);
    }
}
