//! Direct methods (edgehub-contract.md §1.6): a caller invokes a method of a connected module
//! (or device) and waits for its answer.
//!
//! - [`Methods::invoke`] sends the request on `$iothub/methods/POST/{name}/?$rid={rid}` to the
//!   target's connection (the hub checks it is connected and subscribed: `Event::MethodRequest`)
//!   and waits, within the call's response timeout, for the target to publish
//!   `$iothub/methods/res/{status}/?$rid={rid}`, which its connection hands to
//!   [`Methods::respond`].
//! - The calls waiting for an answer are in one bounded table (law 5): a call beyond
//!   [`PENDING_MAX`] is refused. An answer to no waiting call (unknown, late, or from another
//!   identity than the target) is dropped with a log line.
//! - A method call is not a message: nothing of it is logged, and a call the hub could not
//!   finish (a restart, a lost connection) gets its timeout, as from IoT Hub.
//! - Callers: `https`, edgeHub's module-to-module endpoint that the SDKs' `invoke_method`
//!   use; the admin API and `spool method invoke` (`cli`).

pub mod cli;
pub mod https;

use crate::auth::identity::IdentityId;
use crate::hub::events::Event;
use bytes::Bytes;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Calls waiting for their answer, at most.
pub const PENDING_MAX: usize = 1024;
/// The largest request payload and answer body, in bytes of JSON (IoT Hub's limit).
pub const PAYLOAD_BYTES_MAX: usize = 128 * 1024;
/// The longest method name, in bytes.
const NAME_BYTES_MAX: usize = 128;
/// A call's response timeout when it gives none (IoT Hub's default).
pub const RESPONSE_TIMEOUT_DEFAULT_SECS: u64 = 30;
/// The longest response or connect timeout a call may ask for (IoT Hub's limit).
pub const TIMEOUT_SECS_MAX: u64 = 300;
/// How soon a call with a connect timeout looks again for its target, at first and at most.
const CONNECT_RETRY: Duration = Duration::from_millis(100);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(1);

/// One method call, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCall {
    pub target: IdentityId,
    pub name: String,
    /// What the target gets as the request's body.
    pub payload: Value,
    /// How long the target has to answer once it has the request.
    pub response_timeout: Duration,
    /// How long to wait for the target to be connected and subscribed; zero: not at all.
    pub connect_timeout: Duration,
}

/// The body of IoT Hub's method invocation (`POST /twins/{d}/modules/{m}/methods`).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvocationBody {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

impl MethodCall {
    /// A call of `name` on `target`, held to IoT Hub's rules: a name that fits a topic level,
    /// a payload within `PAYLOAD_BYTES_MAX`, timeouts within `TIMEOUT_SECS_MAX` (a response
    /// timeout of at least a second).
    ///
    /// # Errors
    /// `BadRequest`, saying what is wrong.
    pub fn new(
        target: IdentityId,
        name: String,
        payload: Value,
        response_timeout_secs: Option<u64>,
        connect_timeout_secs: Option<u64>,
    ) -> Result<MethodCall, MethodError> {
        let bad = |why: String| Err(MethodError::BadRequest(why));
        if name.is_empty() || name.len() > NAME_BYTES_MAX {
            return bad(format!(
                "a method name has 1 to {NAME_BYTES_MAX} bytes, not {}",
                name.len()
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| matches!(c, '/' | '+' | '#' | '?') || c.is_control())
        {
            return bad(format!("method name {name:?} holds {c:?}"));
        }
        let size = payload.to_string().len();
        if size > PAYLOAD_BYTES_MAX {
            return bad(format!(
                "a payload of {size} bytes, above the {PAYLOAD_BYTES_MAX} a method takes"
            ));
        }
        let response_secs = response_timeout_secs.unwrap_or(RESPONSE_TIMEOUT_DEFAULT_SECS);
        if !(1..=TIMEOUT_SECS_MAX).contains(&response_secs) {
            return bad(format!(
                "responseTimeoutInSeconds is {response_secs}, not between 1 and {TIMEOUT_SECS_MAX}"
            ));
        }
        let connect_secs = connect_timeout_secs.unwrap_or(0);
        if connect_secs > TIMEOUT_SECS_MAX {
            return bad(format!(
                "connectTimeoutInSeconds is {connect_secs}, above {TIMEOUT_SECS_MAX}"
            ));
        }
        Ok(MethodCall {
            target,
            name,
            payload,
            response_timeout: Duration::from_secs(response_secs),
            connect_timeout: Duration::from_secs(connect_secs),
        })
    }

    /// The call an invocation body asks of `target`:
    /// `{"methodName": …, "payload": …, "responseTimeoutInSeconds": …,
    /// "connectTimeoutInSeconds": …}`.
    ///
    /// # Errors
    /// `BadRequest`: a body that is not such an object, or breaks [`MethodCall::new`]'s rules.
    pub fn from_invocation(target: IdentityId, body: &[u8]) -> Result<MethodCall, MethodError> {
        let body: InvocationBody = serde_json::from_slice(body)
            .map_err(|e| MethodError::BadRequest(format!("the invocation: {e}")))?;
        MethodCall::new(
            target,
            body.method_name,
            body.payload,
            body.response_timeout_in_seconds,
            body.connect_timeout_in_seconds,
        )
    }

    /// The topic the target gets the request on.
    fn topic(&self, rid: &str) -> String {
        format!("$iothub/methods/POST/{}/?$rid={rid}", self.name)
    }
}

/// The target's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResult {
    /// The status the target answered with.
    pub status: i32,
    /// Its body, as JSON; `null` for an empty one.
    pub payload: Value,
}

impl MethodResult {
    /// The answer as IoT Hub gives it to the caller: `{"status": …, "payload": …}`.
    #[must_use]
    pub fn document(&self) -> Value {
        serde_json::json!({ "status": self.status, "payload": self.payload })
    }
}

/// Why a call got no answer from its target, with the status IoT Hub gives the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    /// The call is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such identity (404).
    #[error("no identity {0}")]
    UnknownTarget(IdentityId),
    /// The target is not connected, or not subscribed to its methods (404).
    #[error("{0} is not connected, or not subscribed to direct methods")]
    NotConnected(IdentityId),
    /// The target did not answer within the response timeout (504).
    #[error("{target} did not answer method {name:?} within {secs} s")]
    Timeout {
        target: IdentityId,
        name: String,
        secs: u64,
    },
    /// The target answered with something IoT Hub would not pass on (502).
    #[error("{0}")]
    BadAnswer(String),
    /// `PENDING_MAX` calls are waiting already (429).
    #[error("{PENDING_MAX} method calls are waiting for their answers already: try again later")]
    TooMany,
    /// The hub is stopping (503).
    #[error("the hub is shutting down")]
    ShuttingDown,
}

impl MethodError {
    /// The HTTP status IoT Hub answers a caller with.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            MethodError::BadRequest(_) => 400,
            MethodError::UnknownTarget(_) | MethodError::NotConnected(_) => 404,
            MethodError::TooMany => 429,
            MethodError::BadAnswer(_) => 502,
            MethodError::ShuttingDown => 503,
            MethodError::Timeout { .. } => 504,
        }
    }

    /// IoT Hub's error code for it: its number (the status and three more digits) and name.
    #[must_use]
    pub fn error_code(&self) -> (u32, &'static str) {
        match self {
            MethodError::BadRequest(_) => (400_004, "ArgumentInvalid"),
            MethodError::UnknownTarget(_) => (404_001, "DeviceNotFound"),
            MethodError::NotConnected(_) => (404_103, "DeviceNotOnline"),
            MethodError::TooMany => (429_001, "ThrottlingException"),
            MethodError::BadAnswer(_) => (502_000, "BadDeviceResponse"),
            MethodError::ShuttingDown => (503_000, "ServiceUnavailable"),
            MethodError::Timeout { .. } => (504_101, "GatewayTimeout"),
        }
    }
}

/// A call's request, for the hub to send to its target (`Event::MethodRequest`).
#[derive(Debug)]
pub struct MethodRequest {
    pub target: IdentityId,
    pub topic: String,
    pub payload: Bytes,
    /// Cancelled when the caller stops waiting: a request still waiting for room in the
    /// target's channel then goes no further.
    pub abandoned: CancellationToken,
}

/// What the hub did with a method request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodDelivery {
    /// It goes out on the target's connection.
    Sent,
    /// The target is not connected, or not subscribed to a filter the request's topic matches.
    NotConnected,
}

/// A method answer a client published: `$iothub/methods/res/{status}/?$rid={rid}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodAnswer {
    /// The status as written; a number, unless the client wrote something else.
    pub status: String,
    pub rid: String,
}

impl MethodAnswer {
    /// The answer a publish on `topic` carries; `None` if it is no method answer.
    #[must_use]
    pub fn parse(topic: &str) -> Option<MethodAnswer> {
        let rest = topic.strip_prefix("$iothub/methods/res/")?;
        let (status, query) = rest.split_once('/').unwrap_or((rest, ""));
        Some(MethodAnswer {
            status: status.to_owned(),
            rid: crate::iothub::topics::query_value(query, "$rid")
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// A call waiting for its answer.
#[derive(Debug)]
struct Pending {
    target: IdentityId,
    answer: oneshot::Sender<Result<MethodResult, MethodError>>,
}

/// The direct-method calls under way; see the module documentation.
#[derive(Debug)]
pub struct Methods {
    hub: mpsc::Sender<Event>,
    /// By request id (lower case).
    pending: Mutex<HashMap<String, Pending>>,
    /// Request ids are this process's start time and a counter: an answer a module sends late
    /// to the previous process's request cannot match a new one.
    rid_prefix: u128,
    next_rid: AtomicU64,
    /// Cancelled when the server stops: every call ends at once (`ShuttingDown`), so none
    /// holds the shutdown up for its timeout.
    shutdown: CancellationToken,
}

/// Takes a call out of the table, and abandons its request, when its caller stops waiting,
/// however it stops.
struct Forget<'a> {
    methods: &'a Methods,
    rid: String,
    abandoned: CancellationToken,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.methods.lock().remove(&self.rid);
        self.abandoned.cancel();
    }
}

impl Methods {
    /// The calls to targets the `hub` sends requests to, until `shutdown`.
    #[must_use]
    pub fn new(hub: mpsc::Sender<Event>, shutdown: CancellationToken) -> Methods {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Methods {
            hub,
            pending: Mutex::new(HashMap::new()),
            rid_prefix: started,
            next_rid: AtomicU64::new(1),
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls the method and waits for the target's answer (see the module documentation).
    ///
    /// # Errors
    /// Why there is no answer: the target is not there (within the connect timeout), did
    /// not answer (within the response timeout) or answered badly; too many calls wait; the
    /// server stops.
    pub async fn invoke(&self, call: MethodCall) -> Result<MethodResult, MethodError> {
        tokio::select! {
            () = self.shutdown.cancelled() => Err(MethodError::ShuttingDown),
            result = self.call(call) => result,
        }
    }

    async fn call(&self, call: MethodCall) -> Result<MethodResult, MethodError> {
        let rid = format!(
            "{:x}-{:x}",
            self.rid_prefix,
            self.next_rid.fetch_add(1, Ordering::Relaxed)
        );
        let (answer, answered) = oneshot::channel();
        {
            let mut pending = self.lock();
            if pending.len() >= PENDING_MAX {
                return Err(MethodError::TooMany);
            }
            let target = call.target.clone();
            pending.insert(rid.clone(), Pending { target, answer });
        }
        let forget = Forget {
            methods: self,
            rid,
            abandoned: CancellationToken::new(),
        };
        self.send_request(&call, &forget).await?;
        match tokio::time::timeout(call.response_timeout, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(MethodError::ShuttingDown),
            Err(_) => Err(MethodError::Timeout {
                target: call.target,
                name: call.name,
                secs: call.response_timeout.as_secs(),
            }),
        }
    }

    /// Hands the call's request to the hub for the target's connection; while the target is
    /// not there, asks again within the call's connect timeout, at growing intervals (from
    /// `CONNECT_RETRY` to `CONNECT_RETRY_MAX`), so waiting calls cost the hub little.
    async fn send_request(
        &self,
        call: &MethodCall,
        forget: &Forget<'_>,
    ) -> Result<(), MethodError> {
        let topic = call.topic(&forget.rid);
        let payload = Bytes::from(call.payload.to_string());
        let give_up = tokio::time::Instant::now() + call.connect_timeout;
        let mut retry = CONNECT_RETRY;
        loop {
            let (reply, replied) = oneshot::channel();
            let request = MethodRequest {
                target: call.target.clone(),
                topic: topic.clone(),
                payload: payload.clone(),
                abandoned: forget.abandoned.clone(),
            };
            if self
                .hub
                .send(Event::MethodRequest { request, reply })
                .await
                .is_err()
            {
                return Err(MethodError::ShuttingDown);
            }
            let now = tokio::time::Instant::now();
            match replied.await {
                Ok(MethodDelivery::Sent) => return Ok(()),
                Ok(MethodDelivery::NotConnected) if now < give_up => {
                    tokio::time::sleep(retry.min(give_up - now)).await;
                    retry = (retry * 2).min(CONNECT_RETRY_MAX);
                }
                Ok(MethodDelivery::NotConnected) => {
                    return Err(MethodError::NotConnected(call.target.clone()));
                }
                Err(_) => return Err(MethodError::ShuttingDown),
            }
        }
    }

    /// Takes an answer that `from` published, for the call it answers; drops it with a log
    /// line if no call of `from` waits for it.
    pub fn respond(&self, from: &IdentityId, answer: &MethodAnswer, body: &Bytes) {
        let rid = answer.rid.to_ascii_lowercase();
        let pending = {
            let mut pending = self.lock();
            match pending.get(&rid) {
                Some(call) if call.target == *from => pending.remove(&rid),
                _ => None,
            }
        };
        // A caller may time out between the two: its answer is late too.
        let delivered = pending.is_some_and(|call| call.answer.send(result(answer, body)).is_ok());
        if !delivered {
            tracing::info!(
                %from,
                rid = answer.rid,
                "dropped a method answer: no call of this identity waits for this request id \
                 (unknown, or answered after its timeout)"
            );
        }
    }

    /// How many calls wait for their answer.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.lock().len()
    }
}

/// The status a caller gets for an answer whose status is missing or no number (edgeHub's).
const UNREADABLE_STATUS: i32 = 400_000;

/// What the caller gets for an answer: its status and its body as JSON, or why they cannot be
/// passed on.
fn result(answer: &MethodAnswer, body: &Bytes) -> Result<MethodResult, MethodError> {
    // As edgeHub: a status that is missing or no number is 400000.
    let status = answer.status.parse::<i32>().unwrap_or(UNREADABLE_STATUS);
    if body.len() > PAYLOAD_BYTES_MAX {
        return Err(MethodError::BadAnswer(format!(
            "the module answered with {} bytes, above the {PAYLOAD_BYTES_MAX} a method returns",
            body.len()
        )));
    }
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| {
            MethodError::BadAnswer(format!(
                "the module answered with a body that is not JSON: {e}"
            ))
        })?
    };
    Ok(MethodResult { status, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn target() -> IdentityId {
        IdentityId::parse("edge/filter").expect("id")
    }

    /// Methods whose hub answers every request with `delivery`, handing the requests' topics
    /// to the test.
    fn methods(delivery: MethodDelivery) -> (Methods, mpsc::UnboundedReceiver<String>) {
        let (hub, mut events) = mpsc::channel(16);
        let (topics, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::MethodRequest { request, reply } = event {
                    let _ = topics.send(request.topic);
                    let _ = reply.send(delivery);
                }
            }
        });
        (Methods::new(hub, CancellationToken::new()), requests)
    }

    fn call(response_secs: u64) -> MethodCall {
        MethodCall::new(
            target(),
            "reset".into(),
            Value::Null,
            Some(response_secs),
            None,
        )
        .expect("valid")
    }

    /// Goal: a call is held to IoT Hub's rules before anything is sent, and an invocation
    /// body reads as IoT Hub's API writes it.
    #[test]
    fn calls_are_checked_before_they_are_sent() {
        let new = |name: &str, payload, response, connect| {
            MethodCall::new(target(), name.into(), payload, response, connect)
        };
        assert!(new("reset", Value::Null, None, None).is_ok());
        for bad in ["", "a/b", "a+", "#", "a?b", "a\nb", &"n".repeat(129)] {
            let refused = new(bad, Value::Null, None, None);
            assert!(
                matches!(refused, Err(MethodError::BadRequest(_))),
                "{bad:?}"
            );
        }
        let big = Value::String("x".repeat(PAYLOAD_BYTES_MAX));
        assert!(new("m", big, None, None).is_err());
        assert!(new("m", Value::Null, Some(0), None).is_err());
        assert!(new("m", Value::Null, Some(301), None).is_err());
        assert!(new("m", Value::Null, None, Some(301)).is_err());
        let body = br#"{"methodName": "reboot", "payload": {"delay": 5},
            "responseTimeoutInSeconds": 10, "connectTimeoutInSeconds": 5}"#;
        let call = MethodCall::from_invocation(target(), body).expect("valid");
        assert_eq!(call.name, "reboot");
        assert_eq!(call.payload, serde_json::json!({"delay": 5}));
        assert_eq!(call.response_timeout, Duration::from_secs(10));
        assert_eq!(call.connect_timeout, Duration::from_secs(5));
        let defaults = MethodCall::from_invocation(target(), br#"{"methodName": "m"}"#);
        let defaults = defaults.expect("valid");
        assert_eq!(defaults.response_timeout, Duration::from_secs(30));
        assert_eq!(defaults.connect_timeout, Duration::ZERO);
        assert_eq!(defaults.payload, Value::Null);
        for bad in [&b"[]"[..], b"{}", b"{\"methodName\": 3}", b"not json"] {
            assert!(MethodCall::from_invocation(target(), bad).is_err());
        }
    }

    proptest::proptest! {
        /// Goal: whatever a client publishes or a caller posts, reading it gives an answer, a
        /// call or a clear refusal, never a panic; and a call that passes the rules reads back
        /// from the body IoT Hub's API writes for it.
        #[test]
        fn method_parsers_take_anything(
            topic in "\\$iothub/methods/res/[0-9a-zA-Z%/?=&$.]{0,40}",
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            name in "[a-zA-Z0-9_.-]{1,20}",
            number in proptest::num::i64::ANY,
            response in 1u64..=300,
            connect in 0u64..=300,
        ) {
            let answer = MethodAnswer::parse(&topic).expect("a method answer topic");
            let _ = super::result(&answer, &Bytes::from(body.clone()));
            let _ = MethodCall::from_invocation(target(), &body);
            let posted = serde_json::json!({
                "methodName": name, "payload": {"n": number},
                "responseTimeoutInSeconds": response, "connectTimeoutInSeconds": connect,
            });
            let call = MethodCall::from_invocation(target(), posted.to_string().as_bytes());
            let expected = MethodCall::new(
                target(), name, serde_json::json!({"n": number}), Some(response), Some(connect),
            );
            proptest::prop_assert_eq!(call, expected);
        }
    }

    /// Goal: an answer's topic gives its status and request id as written; an answer whose
    /// status is no number, or whose body is no JSON, reaches the caller as a bad answer
    /// (never as a made-up status).
    #[test]
    fn answers_are_read_from_their_topic_and_body() {
        let answer = MethodAnswer::parse("$iothub/methods/res/200/?$rid=AbC").expect("answer");
        assert_eq!(
            (answer.status.as_str(), answer.rid.as_str()),
            ("200", "AbC")
        );
        assert_eq!(MethodAnswer::parse("$iothub/twin/res/200/?$rid=1"), None);
        let body = |text: &'static str| Bytes::from_static(text.as_bytes());
        let result = super::result(&answer, &body(r#"{"a": 1}"#)).expect("good");
        assert_eq!(
            result.document(),
            serde_json::json!({"status": 200, "payload": {"a": 1}})
        );
        assert_eq!(
            super::result(&answer, &body(" ")).expect("good").payload,
            Value::Null
        );
        assert!(matches!(
            super::result(&answer, &body("{")),
            Err(MethodError::BadAnswer(_))
        ));
        let unnumbered = MethodAnswer::parse("$iothub/methods/res/ok/?$rid=1").expect("answer");
        let result = super::result(&unnumbered, &body("1")).expect("good");
        assert_eq!(result.status, 400_000, "as edgeHub");
    }

    /// Goal (law 5): the calls waiting for an answer are bounded; beyond `PENDING_MAX` a call
    /// is refused at once, and a call that times out leaves the table.
    #[tokio::test(start_paused = true)]
    async fn the_table_of_waiting_calls_is_bounded() {
        let (methods, mut requests) = methods(MethodDelivery::Sent);
        let methods = Arc::new(methods);
        let mut waiting = Vec::new();
        for _ in 0..PENDING_MAX {
            let methods = Arc::clone(&methods);
            waiting.push(tokio::spawn(async move { methods.invoke(call(60)).await }));
        }
        for _ in 0..PENDING_MAX {
            requests.recv().await.expect("a request");
        }
        assert_eq!(methods.pending(), PENDING_MAX);
        assert_eq!(methods.invoke(call(60)).await, Err(MethodError::TooMany));
        tokio::time::advance(Duration::from_secs(61)).await;
        for call in waiting {
            let timed_out = call.await.expect("joined");
            assert!(matches!(timed_out, Err(MethodError::Timeout { .. })));
        }
        assert_eq!(methods.pending(), 0);
    }

    /// Goal: a stopping server ends the calls under way at once, instead of holding its
    /// shutdown up for their timeouts; their requests are abandoned.
    #[tokio::test(start_paused = true)]
    async fn calls_end_when_the_server_stops() {
        let (hub, mut events) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let methods = Arc::new(Methods::new(hub, shutdown.clone()));
        let calling = {
            let methods = Arc::clone(&methods);
            tokio::spawn(async move { methods.invoke(call(300)).await })
        };
        let Some(Event::MethodRequest { request, reply }) = events.recv().await else {
            panic!("no request");
        };
        reply.send(MethodDelivery::Sent).expect("the call waits");
        tokio::task::yield_now().await;
        assert!(!request.abandoned.is_cancelled());
        shutdown.cancel();
        let ended = calling.await.expect("joined");
        assert_eq!(ended, Err(MethodError::ShuttingDown));
        assert!(request.abandoned.is_cancelled());
        assert_eq!(methods.pending(), 0);
    }

    /// Goal: a target that is not there fails at once without a connect timeout, and is
    /// looked for again within one, less and less often; each call has its own request id,
    /// and no call stays in the table.
    #[tokio::test(start_paused = true)]
    async fn a_target_that_is_not_there_is_looked_for_within_the_connect_timeout() {
        let (methods, mut requests) = methods(MethodDelivery::NotConnected);
        let refused = methods.invoke(call(1)).await;
        assert_eq!(refused, Err(MethodError::NotConnected(target())));
        assert_eq!(requests.try_recv().ok().map(|_| ()), Some(()));
        assert!(requests.try_recv().is_err(), "asked once");
        let patient = MethodCall {
            connect_timeout: Duration::from_secs(1),
            ..call(1)
        };
        assert!(methods.invoke(patient).await.is_err());
        let mut asked = Vec::new();
        while let Ok(topic) = requests.try_recv() {
            asked.push(topic);
        }
        // At 0, 0.1, 0.3 and 0.7 s, the interval doubling, and at the timeout.
        assert_eq!(asked.len(), 5, "{asked:?}");
        assert!(
            asked.iter().all(|topic| *topic == asked[0]),
            "one request, asked again"
        );
        assert!(methods.invoke(call(1)).await.is_err());
        let next = requests.try_recv().expect("asked");
        assert_ne!(next, asked[0], "a new call has a new request id");
        assert_eq!(methods.pending(), 0);
    }
}
