//! Identities between the registry's form (`auth::identity`) and the admin API's
//! (`spool.admin.v1`), both ways: the server answers with them, `spool identity` reads them.

use crate::auth::identity::{Credentials, Identity, IdentityId, Status};
use spool_proto::admin as pb;

/// An identity as the admin API sends it.
#[must_use]
pub fn identity_to_proto(identity: &Identity) -> pb::Identity {
    let credentials = match &identity.credentials {
        Credentials::Sas { primary, secondary } => pb::identity::Credentials::Sas(pb::SasKeys {
            primary: primary.clone(),
            secondary: secondary.clone(),
        }),
        Credentials::X509Thumbprint { primary, secondary } => {
            pb::identity::Credentials::X509Thumbprint(pb::X509Thumbprints {
                primary: primary.clone(),
                secondary: secondary.clone().unwrap_or_default(),
            })
        }
        Credentials::X509Ca => pb::identity::Credentials::X509Ca(pb::X509Ca {}),
        Credentials::Derived { primary, secondary } => {
            pb::identity::Credentials::Derived(pb::SasKeys {
                primary: primary.clone(),
                secondary: secondary.clone(),
            })
        }
    };
    pb::Identity {
        id: identity.id.to_string(),
        status: status_to_proto(identity.status).into(),
        credentials: Some(credentials),
        generation_id: identity.generation_id.clone().unwrap_or_default(),
    }
}

/// An identity the admin API received; `new_keys` gives SAS keys to one without credentials.
///
/// # Errors
/// A malformed id, or a status that is neither enabled nor disabled.
pub fn identity_from_proto(
    identity: pb::Identity,
    new_keys: impl FnOnce() -> anyhow::Result<Credentials>,
) -> anyhow::Result<Identity> {
    let id = IdentityId::parse(&identity.id)?;
    let status = match identity.status() {
        pb::Status::Unspecified | pb::Status::Enabled => Status::Enabled,
        pb::Status::Disabled => Status::Disabled,
    };
    let credentials = match identity.credentials {
        None => new_keys()?,
        Some(pb::identity::Credentials::Sas(keys)) => Credentials::Sas {
            primary: keys.primary,
            secondary: keys.secondary,
        },
        Some(pb::identity::Credentials::X509Thumbprint(thumbprints)) => {
            Credentials::X509Thumbprint {
                primary: thumbprints.primary,
                secondary: Some(thumbprints.secondary).filter(|s| !s.is_empty()),
            }
        }
        Some(pb::identity::Credentials::X509Ca(_)) => Credentials::X509Ca,
        Some(pb::identity::Credentials::Derived(keys)) => Credentials::Derived {
            primary: keys.primary,
            secondary: keys.secondary,
        },
    };
    Ok(Identity {
        id,
        status,
        credentials,
        generation_id: Some(identity.generation_id).filter(|g| !g.is_empty()),
    })
}

#[must_use]
pub fn status_to_proto(status: Status) -> pb::Status {
    match status {
        Status::Enabled => pb::Status::Enabled,
        Status::Disabled => pb::Status::Disabled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: every kind of identity reads back as itself through the admin API's form.
    #[test]
    fn identities_round_trip() {
        let id = |id: &str| IdentityId::parse(id).expect("id");
        let identities = [
            Identity::with_new_keys(id("edge/filter")).expect("keys"),
            Identity {
                id: id("leaf"),
                status: Status::Disabled,
                credentials: Credentials::X509Thumbprint {
                    primary: "ab".repeat(20),
                    secondary: None,
                },
                generation_id: Some("g1".into()),
            },
            Identity {
                id: id("ca-leaf"),
                status: Status::Enabled,
                credentials: Credentials::X509Ca,
                generation_id: None,
            },
        ];
        for identity in identities {
            let back = identity_from_proto(identity_to_proto(&identity), || {
                anyhow::bail!("has credentials")
            })
            .expect("reads");
            assert_eq!(back, identity);
        }
    }
}
