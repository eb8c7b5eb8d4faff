//! IoT Edge's workload API (edgehub-contract.md §2.2, mode B), for modules started with the
//! `IOTEDGE_*` variables: they ask it for the trust bundle and to sign their SAS tokens, as they
//! ask IoT Edge's security daemon.
//!
//! ```text
//! GET  /trust-bundle?api-version=…                       -> {"certificate": "<PEM>"}
//! POST /modules/{module}/genid/{generation}/sign?api-version=…
//!      {"keyId": "primary"|"secondary", "algo": "HMACSHA256", "data": "<base64>"}
//!                                                        -> {"digest": "<base64 HMAC-SHA256>"}
//! ```
//!
//! A sign request carries no credential, so, as IoT Edge 1.2 and later do, spool serves one
//! unix socket per module of the edge device, `<workload_dir>/<module>/workload.sock`, whose
//! directory only that module's container mounts (a directory, not the file, so the mount
//! survives a restart of spool), and signs only for that module on it. Sockets follow the
//! registry: one appears for a module added while spool runs, and goes with its module. Each
//! socket serves a bounded number of connections, each with a time limit to send its request,
//! so a module cannot exhaust spool's file descriptors through it.

use crate::auth::authenticator::Authenticator;
use crate::auth::identity::{Credentials, IdentityId, Status};
use crate::auth::registry::IdentityRegistry;
use crate::deployment::edge_device;
use crate::http::{self, Answer};
use crate::limits::ACCEPT_BACKOFF;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use hyper::{Method, Request, StatusCode};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The largest sign request read: its data is a token's string to sign.
const SIGN_REQUEST_BYTES_MAX: usize = 64 << 10;
/// Connections one module's socket serves at once; more wait in the socket's backlog.
const CONNECTIONS_PER_SOCKET_MAX: usize = 16;
/// The socket's name in each module's directory (IoT Edge's).
const SOCKET_NAME: &str = "workload.sock";

/// The workload API of one edge device's modules.
#[derive(Debug)]
pub struct WorkloadApi {
    /// Where the sockets are.
    pub dir: PathBuf,
    /// `--device-id`: the edge device whose modules get sockets; when empty, the one device of
    /// the registry's modules, as it is at each change.
    pub configured_device: String,
    pub authenticator: Arc<Authenticator>,
    /// The trust bundle: the file of the CA modules trust.
    pub trust_bundle: PathBuf,
}

impl WorkloadApi {
    /// Serves a socket for every module of the device in the registry, following its changes,
    /// until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        let api = Arc::new(self);
        if let Err(e) = std::fs::create_dir_all(&api.dir) {
            let dir = api.dir.display();
            tracing::error!("cannot create the workload API's directory {dir}: {e}");
            return;
        }
        let mut changes = api.authenticator.changes();
        let mut sockets: BTreeMap<IdentityId, CancellationToken> = BTreeMap::new();
        loop {
            let modules = api.modules();
            sockets.retain(|module, stop| {
                let kept = modules.contains(module);
                if !kept {
                    stop.cancel();
                    remove_socket(&api.socket(module));
                }
                kept
            });
            for module in modules {
                if sockets.contains_key(&module) {
                    continue;
                }
                match api.bind(&module) {
                    Ok(listener) => {
                        let stop = shutdown.child_token();
                        let accepting =
                            accept(listener, module.clone(), Arc::clone(&api), stop.clone());
                        tokio::spawn(stop.clone().run_until_cancelled_owned(accepting));
                        sockets.insert(module, stop);
                    }
                    Err(e) => {
                        let path = api.socket(&module);
                        tracing::error!(path = %path.display(), "cannot serve the workload API: {e}");
                        // Not tried again until the registry changes.
                        sockets.insert(module, CancellationToken::new());
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
        }
        for module in sockets.keys() {
            remove_socket(&api.socket(module));
        }
    }

    /// The edge device's modules that sign with SAS keys (none while the device cannot be
    /// told).
    fn modules(&self) -> Vec<IdentityId> {
        let registry = self.authenticator.registry();
        let device = match edge_device(&self.configured_device, &registry) {
            Ok(device) => device,
            Err(e) => {
                tracing::warn!("the workload API serves no module: {e:#}");
                return Vec::new();
            }
        };
        registry
            .iter()
            .filter(|identity| identity.id.device == device && identity.id.module.is_some())
            .filter(|identity| {
                matches!(
                    identity.credentials,
                    Credentials::Sas { .. } | Credentials::Derived { .. }
                )
            })
            .map(|identity| identity.id.clone())
            .collect()
    }

    fn socket(&self, module: &IdentityId) -> PathBuf {
        let name = module.module.as_deref().unwrap_or_default();
        self.dir.join(name).join(SOCKET_NAME)
    }

    /// Binds a module's socket, which any user may connect to (module containers run as any
    /// user; the mount is what keeps other modules out); one left by an earlier run goes
    /// first, but only a socket: nothing else of the directory is removed.
    fn bind(&self, module: &IdentityId) -> std::io::Result<UnixListener> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.socket(module);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        remove_socket(&path);
        if path.exists() {
            let why = format!("{} exists and is not a socket", path.display());
            return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, why));
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        tracing::info!(%module, path = %path.display(), "workload API socket");
        Ok(listener)
    }
}

/// Removes `path` if it is a socket (one spool bound; never another kind of file).
fn remove_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves one module's socket until `stop`: at most `CONNECTIONS_PER_SOCKET_MAX` connections
/// at once, each with a time limit to send its request (`http::serve_connection`), all ended
/// by `stop`.
async fn accept(
    listener: UnixListener,
    module: IdentityId,
    api: Arc<WorkloadApi>,
    stop: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(CONNECTIONS_PER_SOCKET_MAX));
    loop {
        let Ok(permit) = Arc::clone(&connections).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(%module, "workload API: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (module, api) = (module.clone(), Arc::clone(&api));
        let serving = async move {
            let answering = move |request| {
                let (module, api) = (module.clone(), Arc::clone(&api));
                async move { answer(request, &module, &api).await }
            };
            http::serve_connection(stream, answering).await;
            drop(permit);
        };
        tokio::spawn(stop.clone().run_until_cancelled_owned(serving));
    }
}

/// The answer to one request on `module`'s socket.
async fn answer(
    request: Request<hyper::body::Incoming>,
    module: &IdentityId,
    api: &WorkloadApi,
) -> Answer {
    let name = module.module.as_deref().unwrap_or_default();
    let path = request.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method(), parts.as_slice()) {
        (&Method::GET, ["trust-bundle"]) => {
            let path = api.trust_bundle.clone();
            let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await;
            match read.map_err(std::io::Error::other).and_then(|read| read) {
                Ok(certificate) => http::json(
                    StatusCode::OK,
                    &serde_json::json!({ "certificate": certificate }),
                ),
                Err(e) => {
                    let why = format!("the trust bundle: {e}");
                    failure(StatusCode::INTERNAL_SERVER_ERROR, &why)
                }
            }
        }
        (&Method::POST, ["modules", named, "genid", generation, "sign"]) => {
            if !spells(named, name) {
                let why = format!("this socket is module {module}'s: it does not sign for {named}");
                return failure(StatusCode::FORBIDDEN, &why);
            }
            let body = match http::body(request, SIGN_REQUEST_BYTES_MAX).await {
                Ok(body) => body,
                Err(why) => return failure(StatusCode::BAD_REQUEST, &why),
            };
            let registry = api.authenticator.registry();
            let registered = registry
                .get(module)
                .and_then(|m| m.generation_id.as_deref());
            let generation = match registered {
                Some(registered) if spells(generation, registered) => registered.to_owned(),
                _ => percent_encoding::percent_decode_str(generation)
                    .decode_utf8_lossy()
                    .into_owned(),
            };
            match sign(&registry, module, &generation, &body) {
                Ok(digest) => http::json(StatusCode::OK, &serde_json::json!({ "digest": digest })),
                Err((status, why)) => failure(status, &why),
            }
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            &format!("no {} {path}", request.method()),
        ),
    }
}

/// Whether a path segment names `id`: percent-encoded, as the SDKs send it, or as written (an
/// id may itself hold `%`, which an SDK may leave unencoded).
fn spells(segment: &str, id: &str) -> bool {
    segment == id || percent_encoding::percent_decode_str(segment).decode_utf8_lossy() == id
}

/// What a sign request asks.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignRequest {
    key_id: String,
    algo: String,
    data: String,
}

/// Signs a sign request's data with identity `id`'s key it names: the digest, base64, or the
/// status and why it is refused.
fn sign(
    registry: &IdentityRegistry,
    id: &IdentityId,
    generation: &str,
    body: &[u8],
) -> Result<String, (StatusCode, String)> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    let request: SignRequest =
        serde_json::from_slice(body).map_err(|e| bad(format!("the sign request: {e}")))?;
    if request.algo != "HMACSHA256" {
        return Err(bad(format!(
            "algorithm {:?} is not HMACSHA256",
            request.algo
        )));
    }
    let identity = registry
        .get(id)
        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no module {id}")))?;
    if identity.status == Status::Disabled {
        return Err((StatusCode::FORBIDDEN, format!("module {id} is disabled")));
    }
    if let Some(expected) = identity
        .generation_id
        .as_deref()
        .filter(|g| *g != generation)
    {
        let why = format!("module {id} is generation {expected}, not {generation}");
        return Err((StatusCode::NOT_FOUND, why));
    }
    let keys = identity.sas_keys();
    let key = match request.key_id.as_str() {
        "primary" => keys.first(),
        "secondary" => keys.get(1),
        other => return Err(bad(format!("no key {other:?}: primary or secondary"))),
    }
    .ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("module {id} has no SAS keys"),
        )
    })?;
    let data = BASE64
        .decode(&request.data)
        .map_err(|e| bad(format!("the data is not base64: {e}")))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| bad(e.to_string()))?;
    mac.update(&data);
    Ok(BASE64.encode(mac.finalize().into_bytes()))
}

/// An error answer, in IoT Edge's form (`{"message": …}`), logged.
fn failure(status: StatusCode, why: &str) -> Answer {
    tracing::info!(%status, "workload API refused a request: {why}");
    http::json(status, &serde_json::json!({ "message": why }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::Identity;
    use spool_storage::Meta;

    /// Goal: a sign request is answered with the HMAC-SHA256 of its data under the key it
    /// names, as IoT Edge's security daemon answers; a wrong generation, key, algorithm or body
    /// is refused with the status IoT Edge gives, and so is a disabled module.
    #[test]
    fn sign_requests_are_signed_with_the_named_key() {
        let dir = tempfile::tempdir().expect("dir");
        let meta = Meta::open(&dir.path().join("meta.redb")).expect("meta");
        let mut registry = IdentityRegistry::default();
        let id = IdentityId::parse("edge/filter").expect("id");
        let identity = Identity {
            generation_id: Some("g1".into()),
            ..Identity::with_new_keys(id.clone()).expect("keys")
        };
        registry.add(&meta, identity.clone()).expect("added");
        let data = BASE64.encode("hub/devices/edge/modules/filter\n1800000000");
        let request = |key: &str, algo: &str| {
            format!(r#"{{"keyId":"{key}","algo":"{algo}","data":"{data}"}}"#).into_bytes()
        };
        for (key, index) in [("primary", 0), ("secondary", 1)] {
            let digest = sign(&registry, &id, "g1", &request(key, "HMACSHA256")).expect("signed");
            let mut mac = Hmac::<Sha256>::new_from_slice(&identity.sas_keys()[index]).expect("key");
            mac.update(b"hub/devices/edge/modules/filter\n1800000000");
            assert_eq!(digest, BASE64.encode(mac.finalize().into_bytes()), "{key}");
        }
        let status =
            |generation: &str, body: &[u8]| sign(&registry, &id, generation, body).map_err(|e| e.0);
        assert_eq!(
            status("g2", &request("primary", "HMACSHA256")),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            status("g1", &request("tertiary", "HMACSHA256")),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status("g1", &request("primary", "SHA1")),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(status("g1", b"{"), Err(StatusCode::BAD_REQUEST));
        let disabled = IdentityId::parse("edge/off").expect("id");
        let off = Identity {
            status: Status::Disabled,
            ..Identity::with_new_keys(disabled.clone()).expect("keys")
        };
        registry.add(&meta, off).expect("added");
        let refused = sign(
            &registry,
            &disabled,
            "g1",
            &request("primary", "HMACSHA256"),
        );
        assert_eq!(refused.map_err(|e| e.0), Err(StatusCode::FORBIDDEN));
        let other = IdentityId::parse("edge/other").expect("id");
        let unknown = sign(&registry, &other, "g1", &request("primary", "HMACSHA256"));
        assert_eq!(unknown.map_err(|e| e.0), Err(StatusCode::NOT_FOUND));
    }

    /// Goal: a module id or generation id holding `%` is recognised in a path whether the
    /// SDK percent-encoded it or not, and never one that spells another id.
    #[test]
    fn path_segments_name_ids_encoded_or_as_written() {
        assert!(spells("a%41", "a%41"), "as written");
        assert!(spells("a%2541", "a%41"), "encoded");
        assert!(spells("my%28mod%29", "my(mod)"));
        assert!(!spells("a%41", "aB"));
        assert!(!spells("other", "a%41"));
    }
}
