//! [`Authenticator`]: who a CONNECT is (edgehub-contract.md §1.2, §2.1), decided without
//! sockets. An IoT Hub username (`{host}/{device}[/{module}]/?api-version=…`) is checked
//! wherever it arrives: the client id must be the identity it names, exactly; the identity
//! must exist, be enabled and use SAS keys; and the password must be a SAS token for it, signed
//! with one of its keys, on one of the hub's host names, not expired. Any other client is
//! anonymous, which a listener allows or not (`ListenerAuth`).

use super::identity::{Credentials, Identity, IdentityId, Status};
use super::policy::{Client, Policy};
use super::registry::IdentityRegistry;
use super::sas::{SasError, SasToken};
use super::username::IotUsername;
use super::x509::{self, CertificateCheck, CertificateError};
use rustls_pki_types::CertificateDer;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::sync::watch;

/// What a listener asks of its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerAuth {
    /// Clients without IoT Hub credentials are let in as anonymous MQTT clients (those with
    /// them are checked all the same).
    Anonymous,
    /// Every client proves an identity.
    Identity,
}

impl FromStr for ListenerAuth {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenerAuth, String> {
        match s {
            "anonymous" => Ok(ListenerAuth::Anonymous),
            "identity" => Ok(ListenerAuth::Identity),
            other => Err(format!("{other:?} is neither anonymous nor identity")),
        }
    }
}

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticated {
    Anonymous,
    Identity {
        id: IdentityId,
        /// When its credentials expire (seconds since 1970): its SAS token, or its
        /// certificate's validity. The connection ends then.
        token_expiry: Option<u64>,
    },
}

/// Why a CONNECT was refused (the client gets CONNACK 5, MQTT 5: 0x87).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this listener requires an identity: an IoT Hub username and a SAS token")]
    Required,
    #[error("the client id is identity {0}'s, and the client did not give its credentials")]
    IdentityClientId(IdentityId),
    #[error("the client id {client_id:?} is not {identity}, which its username names")]
    ClientIdMismatch { client_id: String, identity: String },
    #[error("{0}")]
    BadIdentity(String),
    #[error("no identity {0}")]
    Unknown(IdentityId),
    #[error("identity {0} is disabled")]
    Disabled(IdentityId),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error("no SAS token in the password")]
    NoToken,
    #[error(transparent)]
    Token(#[from] SasError),
    #[error("the authorization policy denies {0} mqtt:connect")]
    Denied(String),
}

/// Decides who a CONNECT is, and whether the deployment's policy lets it in; see the module
/// documentation. The registry (the admin API) and the policy (a deployment's reload) change
/// while the server runs: each change is announced, and connected clients check their
/// admission again (`changes`).
#[derive(Debug)]
pub struct Authenticator {
    /// The registry as it is now; a change replaces it whole, so no reader waits for a change
    /// to be stored.
    registry: RwLock<Arc<IdentityRegistry>>,
    /// The deployment's authorization policy as it is now, replaced whole.
    policy: RwLock<Arc<Policy>>,
    /// Held by the one change under way.
    changing: Mutex<()>,
    /// The host names a token's audience may name: the IoT Hub's and the gateway's.
    hosts: Vec<String>,
    /// Checks leaf devices' certificates.
    certificates: CertificateCheck,
    /// Counts the changes of the registry and the policy.
    changes: watch::Sender<u64>,
}

impl Authenticator {
    #[must_use]
    pub fn new(registry: IdentityRegistry, hosts: Vec<String>) -> Authenticator {
        Authenticator {
            registry: RwLock::new(Arc::new(registry)),
            policy: RwLock::default(),
            changing: Mutex::new(()),
            hosts,
            certificates: CertificateCheck::default(),
            changes: watch::Sender::new(0),
        }
    }

    /// Checks leaf devices' certificate chains with `certificates` (X.509 CA mode).
    #[must_use]
    pub fn with_certificates(mut self, certificates: CertificateCheck) -> Authenticator {
        self.certificates = certificates;
        self
    }

    /// The registry as it is now.
    #[must_use]
    pub fn registry(&self) -> Arc<IdentityRegistry> {
        Arc::clone(&self.registry.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Changes a copy of the registry with `change`, which stores what it changes (blocking:
    /// it commits to the metadata store), then puts the copy in place and announces the
    /// change if it succeeded. CONNECTs meanwhile read the registry as it was.
    ///
    /// # Errors
    /// `change`'s.
    pub fn change_registry<T, E>(
        &self,
        change: impl FnOnce(&mut IdentityRegistry) -> Result<T, E>,
    ) -> Result<T, E> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut registry = IdentityRegistry::clone(&self.registry());
        let changed = change(&mut registry)?;
        *self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(registry);
        self.changes.send_modify(|count| *count += 1);
        Ok(changed)
    }

    /// The deployment's authorization policy as it is now.
    #[must_use]
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts a deployment's authorization `policy` in force, and announces the change.
    pub fn install_policy(&self, policy: Arc<Policy>) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = policy;
        self.changes.send_modify(|count| *count += 1);
    }

    /// Announces each change of the registry or the policy, for connections to check their
    /// admission again.
    #[must_use]
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Who the client of a CONNECT is, by what it `presented`, at `now` (seconds since 1970),
    /// on a listener that asks `listener`; and whether the policy lets it connect.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn authenticate(
        &self,
        listener: ListenerAuth,
        presented: &Presented<'_>,
        now: u64,
    ) -> Result<Authenticated, AuthError> {
        let authenticated = self.identify(listener, presented, now)?;
        let identity = match &authenticated {
            Authenticated::Anonymous => None,
            Authenticated::Identity { id, .. } => Some(id),
        };
        let client = Client {
            client_id: presented.client_id,
            identity,
        };
        if !self.policy().may_connect(&client) {
            let who = identity.map_or(presented.client_id.to_owned(), ToString::to_string);
            return Err(AuthError::Denied(who));
        }
        Ok(authenticated)
    }

    /// Who the client of a CONNECT is (see [`Authenticator::authenticate`]).
    fn identify(
        &self,
        listener: ListenerAuth,
        presented: &Presented<'_>,
        now: u64,
    ) -> Result<Authenticated, AuthError> {
        let client_id = presented.client_id;
        let Some(username) = presented.username.and_then(IotUsername::parse) else {
            // An identity's client id is its own: an anonymous client using it would take
            // the identity's session over, and its queue with it.
            let taken = IdentityId::parse(client_id)
                .ok()
                .filter(|id| self.registry().get(id).is_some());
            return match (listener, taken) {
                (_, Some(id)) => Err(AuthError::IdentityClientId(id)),
                (ListenerAuth::Anonymous, None) => Ok(Authenticated::Anonymous),
                (ListenerAuth::Identity, None) => Err(AuthError::Required),
            };
        };
        let named = username.client_id();
        if client_id != named {
            return Err(AuthError::ClientIdMismatch {
                client_id: client_id.to_owned(),
                identity: named,
            });
        }
        let id = IdentityId::parse(&named).map_err(|e| AuthError::BadIdentity(e.to_string()))?;
        let registry = self.registry();
        let identity = enabled(&registry, &id)?;
        let chain = presented.certificates;
        let token_expiry = match &identity.credentials {
            Credentials::Sas { .. } | Credentials::Derived { .. } => {
                Some(self.verify_token(identity, presented.password, now)?)
            }
            Credentials::X509Thumbprint { primary, secondary } => {
                let thumbprints: Vec<&str> = std::iter::once(primary)
                    .chain(secondary)
                    .map(String::as_str)
                    .collect();
                CertificateCheck::thumbprint(chain, &thumbprints)?;
                // A thumbprint names the certificate, not its validity: checked here.
                let expiry = x509::not_after(chain);
                if expiry.is_none_or(|at| at < now) {
                    return Err(CertificateError::Expired.into());
                }
                expiry
            }
            Credentials::X509Ca => {
                self.certificates.chain_for_device(chain, &id.device)?;
                x509::not_after(chain)
            }
        };
        Ok(Authenticated::Identity { id, token_expiry })
    }

    /// Who an HTTP request's SAS `token` (its `Authorization` header) proves the caller is, at
    /// `now`: the identity `claimed` (edgeHub's `x-ms-edge-moduleId` header), or else the one
    /// the token's audience names, checked as a CONNECT's (it exists, is enabled, has SAS keys,
    /// and signed the token for one of the hub's host names).
    ///
    /// # Errors
    /// Why the token proves nothing.
    pub fn authenticate_token(
        &self,
        claimed: Option<&str>,
        token: &str,
        now: u64,
    ) -> Result<IdentityId, AuthError> {
        let id = match claimed {
            Some(claimed) => IdentityId::parse(claimed),
            None => {
                let audience = SasToken::parse(token)?.audience()?;
                IdentityId::parse(&audience.to_string())
            }
        };
        let id = id.map_err(|e| AuthError::BadIdentity(e.to_string()))?;
        let registry = self.registry();
        let identity = enabled(&registry, &id)?;
        if !matches!(
            identity.credentials,
            Credentials::Sas { .. } | Credentials::Derived { .. }
        ) {
            let why = format!("identity {id} authenticates with a certificate, not a SAS token");
            return Err(AuthError::BadIdentity(why));
        }
        self.verify_token(identity, Some(token.as_bytes()), now)?;
        Ok(id)
    }

    /// Verifies the SAS token in `password` for `identity`; returns when it expires.
    fn verify_token(
        &self,
        identity: &Identity,
        password: Option<&[u8]>,
        now: u64,
    ) -> Result<u64, AuthError> {
        let password = password.ok_or(AuthError::NoToken)?;
        let token = std::str::from_utf8(password).map_err(|_| AuthError::NoToken)?;
        let token = SasToken::parse(token)?;
        let keys = identity.sas_keys();
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        let id = &identity.id;
        token.verify(&id.device, id.module.as_deref(), &hosts, &keys, now)?;
        Ok(token.expiry)
    }
}

/// Identity `id` of `registry`, if it exists and is enabled.
fn enabled<'r>(registry: &'r IdentityRegistry, id: &IdentityId) -> Result<&'r Identity, AuthError> {
    let identity = registry
        .get(id)
        .ok_or_else(|| AuthError::Unknown(id.clone()))?;
    if identity.status == Status::Disabled {
        return Err(AuthError::Disabled(id.clone()));
    }
    Ok(identity)
}

/// What a client presented to prove who it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    /// A SAS token, for an identity that has keys.
    pub password: Option<&'a [u8]>,
    /// The TLS client certificate chain (leaf first), for a leaf device that has a
    /// certificate.
    pub certificates: Option<&'a [CertificateDer<'static>]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::Identity;
    use crate::auth::sas::{resource_uri, sign};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use spool_storage::Meta;

    const NOW: u64 = 1_800_000_000;
    const USERNAME: &str = "hub.example/edge/filter/?api-version=2020-09-30";

    /// An authenticator that knows `edge/filter` (enabled, SAS), `edge/off` (disabled) and
    /// `leaf` (a certificate); with `edge/filter`'s primary key.
    fn authenticator() -> (Authenticator, Vec<u8>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let meta = Meta::open(&dir.path().join("meta.redb")).expect("meta");
        let mut registry = IdentityRegistry::load(&meta).expect("empty");
        let mut identities = Vec::new();
        for id in ["edge/filter", "edge/off", "leaf"] {
            let mut identity =
                Identity::with_new_keys(IdentityId::parse(id).expect("id")).expect("keys");
            match id {
                "edge/off" => identity.status = Status::Disabled,
                "leaf" => identity.credentials = Credentials::X509Ca,
                _ => {}
            }
            identities.push(identity);
        }
        let Credentials::Sas { primary, .. } = &identities[0].credentials else {
            unreachable!("SAS")
        };
        let key = BASE64.decode(primary).expect("base64");
        for identity in identities {
            registry.add(&meta, identity).expect("added");
        }
        let hosts = vec!["hub.example".to_owned(), "spool".to_owned()];
        (Authenticator::new(registry, hosts), key, dir)
    }

    fn token(key: &[u8], id: &str, host: &str, expiry: u64) -> Vec<u8> {
        let (device, module) = id.split_once('/').map_or((id, None), |(d, m)| (d, Some(m)));
        sign(key, &resource_uri(host, device, module), expiry).into_bytes()
    }

    /// Goal: a module with a good token is who its username says; the gateway's host name is
    /// accepted as the audience too.
    #[test]
    fn a_good_token_authenticates_its_module() {
        let (auth, key, _dir) = authenticator();
        for host in ["hub.example", "spool"] {
            let password = token(&key, "edge/filter", host, NOW + 60);
            let presented = Presented {
                client_id: "edge/filter",
                username: Some(USERNAME),
                password: Some(&password),
                certificates: None,
            };
            let who = auth.authenticate(ListenerAuth::Identity, &presented, NOW);
            assert_eq!(
                who,
                Ok(Authenticated::Identity {
                    id: IdentityId::parse("edge/filter").expect("id"),
                    token_expiry: Some(NOW + 60),
                })
            );
        }
    }

    /// Goal: every way a CONNECT can be wrong is refused, and says which.
    #[test]
    fn wrong_connects_are_refused_with_the_reason() {
        let (auth, key, _dir) = authenticator();
        let good = token(&key, "edge/filter", "hub.example", NOW + 60);
        let check = |client_id: &str, username: &str, password: Option<&[u8]>| {
            let presented = Presented {
                client_id,
                username: Some(username),
                password,
                certificates: None,
            };
            auth.authenticate(ListenerAuth::Anonymous, &presented, NOW)
        };
        assert!(matches!(
            check("edge/other", USERNAME, Some(&good)),
            Err(AuthError::ClientIdMismatch { .. })
        ));
        assert!(
            matches!(
                check("edge/Filter", USERNAME, Some(&good)),
                Err(AuthError::ClientIdMismatch { .. })
            ),
            "the client id is compared exactly"
        );
        let off = "hub.example/edge/off/?api-version=1";
        assert_eq!(
            check("edge/off", off, Some(&good)),
            Err(AuthError::Disabled(
                IdentityId::parse("edge/off").expect("id")
            ))
        );
        let leaf = "hub.example/leaf/?api-version=1";
        assert!(matches!(
            check("leaf", leaf, Some(&good)),
            Err(AuthError::Certificate(CertificateError::Missing))
        ));
        let ghost = "hub.example/ghost/?api-version=1";
        assert!(matches!(
            check("ghost", ghost, Some(&good)),
            Err(AuthError::Unknown(_))
        ));
        assert_eq!(
            check("edge/filter", USERNAME, None),
            Err(AuthError::NoToken)
        );
        let wrong_key = token(&[9; 32], "edge/filter", "hub.example", NOW + 60);
        assert_eq!(
            check("edge/filter", USERNAME, Some(&wrong_key)),
            Err(AuthError::Token(SasError::BadSignature))
        );
        let expired = token(&key, "edge/filter", "hub.example", NOW - 301);
        assert!(matches!(
            check("edge/filter", USERNAME, Some(&expired)),
            Err(AuthError::Token(SasError::Expired { .. }))
        ));
        let elsewhere = token(&key, "edge/filter", "other.example", NOW + 60);
        assert!(matches!(
            check("edge/filter", USERNAME, Some(&elsewhere)),
            Err(AuthError::Token(SasError::WrongHost { .. }))
        ));
    }

    /// Goal: plain MQTT clients are anonymous where the listener allows it, and refused where
    /// it requires an identity or use an identity's client id.
    #[test]
    fn plain_clients_are_anonymous_only_where_allowed() {
        let (auth, _, _dir) = authenticator();
        let presented = |username, password| Presented {
            client_id: "c",
            username,
            password,
            certificates: None,
        };
        for (username, password) in [(None, None), (Some("alice"), Some(&b"secret"[..]))] {
            let anonymous =
                auth.authenticate(ListenerAuth::Anonymous, &presented(username, password), NOW);
            assert_eq!(anonymous, Ok(Authenticated::Anonymous));
            let required =
                auth.authenticate(ListenerAuth::Identity, &presented(username, password), NOW);
            assert_eq!(required, Err(AuthError::Required));
        }
        // Not with an identity's client id: it would take the identity's session over.
        let impostor = Presented {
            client_id: "edge/filter",
            ..Presented::default()
        };
        let impostor = auth.authenticate(ListenerAuth::Anonymous, &impostor, NOW);
        assert!(matches!(impostor, Err(AuthError::IdentityClientId(_))));
    }
}
