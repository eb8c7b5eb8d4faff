//! [`IdentityRegistry`]: every device and module spool knows, kept in the metadata store (one
//! entry per identity, JSON) and in memory. Each change is committed durably before it counts:
//! an identity added, disabled or rotated stays so after a crash.

use super::identity::{Credentials, IdentitiesFile, Identity, IdentityError, IdentityId, new_key};
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

    /// Adds a new identity.
    ///
    /// # Errors
    /// `Exists`, an invalid identity, or the store's failure (then nothing changed).
    pub fn add(&mut self, meta: &Meta, identity: Identity) -> Result<(), RegistryError> {
        if self.identities.contains_key(&identity.id) {
            return Err(RegistryError::Exists(identity.id));
        }
        self.put(meta, vec![identity])
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

    /// Removes an identity.
    ///
    /// # Errors
    /// `NotFound`, or the store's failure (then nothing changed).
    pub fn remove(&mut self, meta: &Meta, id: &IdentityId) -> Result<Identity, RegistryError> {
        if !self.identities.contains_key(id) {
            return Err(RegistryError::NotFound(id.clone()));
        }
        let change = MetaChange::State {
            table: StateTable::Identities,
            key: id.key(),
            value: None,
        };
        meta.apply(&[change], Commit::Durable)?;
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

    /// Validates and stores `identities` in one durable commit, then takes them in.
    fn put(&mut self, meta: &Meta, identities: Vec<Identity>) -> Result<(), RegistryError> {
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
