//! edgeHub's module-to-module method endpoint (edgehub-contract.md §1.6), on the HTTPS
//! listener (`--https-bind`; the SDKs call port 443 of their gateway host, with the
//! certificate of the MQTTS listener):
//!
//! ```text
//! POST /twins/{device}/modules/{module}/methods?api-version=…   (a module)
//! POST /twins/{device}/methods?api-version=…                    (a device)
//! Authorization: SharedAccessSignature sr=…&sig=…&se=…          (the caller's own token)
//! x-ms-edge-moduleId: {device}/{module}                          (the caller, optional)
//! {"methodName": "reboot", "payload": {…}, "responseTimeoutInSeconds": 30,
//!  "connectTimeoutInSeconds": 0}
//! → 200 {"status": <the target's>, "payload": <its answer>}
//! → 400 a malformed call, 401 a caller not proven, 404 no such target or not connected,
//!   429 too many calls waiting, 504 no answer in time, in IoT Hub's form (which the Node SDK
//!   reads the error's kind from):
//!   {"Message": "ErrorCode:DeviceNotOnline;…", "ExceptionMessage": "", "errorCode": 404103}
//! ```
//!
//! Any enabled identity of the registry may call any other's methods, as in edgeHub, whose
//! device scope is the edge device; the deployment's authorization policy governs the MQTT
//! broker, not this endpoint (as edgeHub 1.2's `mqttBroker.authorizations`). A caller that is
//! not proven learns nothing of why (the log says). The listener serves a bounded number of
//! connections, each with a time limit for its TLS handshake, its request head and its body.

use super::{MethodCall, MethodError, Methods, PAYLOAD_BYTES_MAX};
use crate::auth::authenticator::Authenticator;
use crate::auth::identity::IdentityId;
use crate::clock::Clock;
use crate::http::{self, Answer};
use crate::limits::ACCEPT_BACKOFF;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Connections served at once; more wait in the listener's backlog.
const CONNECTIONS_MAX: usize = 256;
/// IoT Hub's error codes for what this endpoint refuses itself.
const ARGUMENT_INVALID: (u32, &str) = (400_004, "ArgumentInvalid");
const UNAUTHORIZED: (u32, &str) = (401_002, "IotHubUnauthorizedAccess");
/// Room for the invocation's fields around its payload.
const INVOCATION_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 4096;

/// What the endpoint answers with.
#[derive(Debug)]
pub struct MethodEndpoint {
    /// Who a caller's token proves it is, and which targets exist.
    pub authenticator: Arc<Authenticator>,
    pub methods: Arc<Methods>,
    /// The hub's clock, which tokens' expiry is read on.
    pub clock: Arc<dyn Clock>,
}

/// Serves the endpoint on `listener` over TLS until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    endpoint: MethodEndpoint,
    shutdown: CancellationToken,
) {
    let endpoint = Arc::new(endpoint);
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("HTTPS listener: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (tls, endpoint) = (tls.clone(), Arc::clone(&endpoint));
        let serving = async move {
            let Some(stream) = crate::tls::handshake(&tls, socket, peer).await else {
                return;
            };
            let answering = move |request| {
                let endpoint = Arc::clone(&endpoint);
                async move { answer(request, &endpoint).await }
            };
            http::serve_connection(stream, answering).await;
            drop(permit);
        };
        tokio::spawn(shutdown.clone().run_until_cancelled_owned(serving));
    }
}

/// The answer to one request.
async fn answer(request: Request<Incoming>, endpoint: &MethodEndpoint) -> Answer {
    let path = request.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let target = match (request.method(), parts.as_slice()) {
        (&Method::POST, ["twins", device, "modules", module, "methods"]) => {
            target(device, Some(module))
        }
        (&Method::POST, ["twins", device, "methods"]) => target(device, None),
        _ => {
            let why = format!("no {} {path}", request.method());
            return refusal(StatusCode::NOT_FOUND, (404_000, "NotFound"), &why);
        }
    };
    let target = match target {
        Ok(target) => target,
        Err(why) => return refusal(StatusCode::BAD_REQUEST, ARGUMENT_INVALID, &why),
    };
    let caller = match caller(&request, endpoint) {
        Ok(caller) => caller,
        Err(why) => {
            tracing::info!("direct method caller refused: {why}");
            return refusal(StatusCode::UNAUTHORIZED, UNAUTHORIZED, "Unauthorized");
        }
    };
    let body = match http::body(request, INVOCATION_BYTES_MAX).await {
        Ok(body) => body,
        Err(why) => return refusal(StatusCode::BAD_REQUEST, ARGUMENT_INVALID, &why),
    };
    let invoked = async {
        if endpoint.authenticator.registry().get(&target).is_none() {
            return Err(MethodError::UnknownTarget(target));
        }
        let call = MethodCall::from_invocation(target, &body)?;
        tracing::debug!(%caller, target = %call.target, method = call.name, "method call");
        endpoint.methods.invoke(call).await
    };
    match invoked.await {
        Ok(result) => http::json(StatusCode::OK, &result.document()),
        Err(error) => {
            let status =
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            refusal(status, error.error_code(), &error.to_string())
        }
    }
}

/// The identity a request's path names: its segments percent-decoded, `+` read as a space
/// (the Python SDK writes them with `quote_plus`). A segment is one id: one that decodes to a
/// `/` would name a module where the path names a device.
fn target(device: &str, module: Option<&str>) -> Result<IdentityId, String> {
    let decode = |segment: &str| {
        let spaced = segment.replace('+', " ");
        match percent_encoding::percent_decode_str(&spaced).decode_utf8() {
            Ok(id) if !id.contains('/') => Ok(id.into_owned()),
            _ => Err(format!("{segment:?} is not an id once decoded")),
        }
    };
    let id = match module {
        Some(module) => format!("{}/{}", decode(device)?, decode(module)?),
        None => decode(device)?,
    };
    IdentityId::parse(&id).map_err(|e| e.to_string())
}

/// Who the caller is, by the SAS token in its `Authorization` header (and the identity its
/// `x-ms-edge-moduleId` header claims, which the token must be for).
fn caller(request: &Request<Incoming>, endpoint: &MethodEndpoint) -> Result<IdentityId, String> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|value| {
                value
                    .to_str()
                    .map_err(|_| format!("the {name} header is not text"))
            })
            .transpose()
    };
    let token = header("authorization")?.ok_or("no Authorization header: a SAS token is needed")?;
    let claimed = header("x-ms-edge-moduleid")?;
    let now_secs = endpoint.clock.unix_ms() / 1000;
    endpoint
        .authenticator
        .authenticate_token(claimed, token, now_secs)
        .map_err(|e| format!("the caller is not authenticated: {e}"))
}

/// An error answer, as IoT Hub gives one, logged.
fn refusal(status: StatusCode, (number, name): (u32, &str), why: &str) -> Answer {
    tracing::info!(%status, "direct method refused: {why}");
    let body = serde_json::json!({
        "Message": format!("ErrorCode:{name};{why}"),
        "ExceptionMessage": "",
        "errorCode": number,
    });
    http::json(status, &body)
}
