//! Direct methods, black-box (edgehub-contract.md §1.6): a call reaches a module subscribed to
//! `$iothub/methods/POST/#` and its answer on `$iothub/methods/res/{status}/?$rid=` comes back
//! to the caller, `spool method invoke` (through the admin API) or another module on the HTTPS
//! endpoint the SDKs' `invoke_method` use. A target that is not there gets 404, one that does
//! not answer 504, and an answer to no waiting call is dropped.
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    Client, Seen, Spool, connect, identities_file, module_options, sas_token, tls_connect,
    tls_connector,
};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: [u8; 32] = [5; 32];

fn start(dir: &Path) -> Spool {
    let identities = identities_file(dir, &["edge/filter", "edge/sink"], &KEY);
    let args = ["--identities", identities.to_str().unwrap()];
    Spool::start(
        &dir.join("data"),
        &[&args[..], &["--https-bind", "127.0.0.1:0"]].concat(),
    )
}

/// Module `edge/{name}`, connected, and subscribed to its methods if `methods`.
async fn module(addr: SocketAddr, name: &str, methods: bool) -> Client {
    let mut client = connect(module_options(addr, &format!("edge/{name}"), &KEY, true));
    client.connected().await;
    if methods {
        client
            .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
            .await;
    }
    client
}

/// The next method request the module receives: its method name, request id and payload.
async fn request(client: &mut Client) -> (String, String, serde_json::Value) {
    loop {
        if let Seen::Publish(p) = client.next(10).await {
            let rest = p.topic.strip_prefix("$iothub/methods/POST/").unwrap();
            let (name, query) = rest.split_once("/?$rid=").unwrap();
            assert_eq!(p.qos, QoS::AtMostOnce, "as IoT Hub sends them");
            let payload = serde_json::from_slice(&p.payload).unwrap();
            return (name.to_owned(), query.to_owned(), payload);
        }
    }
}

/// Answers request `rid` with `status` and `body`.
async fn answer(client: &Client, status: &str, rid: &str, body: &str) {
    let topic = format!("$iothub/methods/res/{status}/?$rid={rid}");
    client.publish(&topic, QoS::AtLeastOnce, body).await;
}

/// Runs `spool method invoke ARGS` against the admin API at `admin`, off the test's task:
/// whether it succeeded, and what it printed (stdout, or stderr when it failed).
async fn invoke(admin: SocketAddr, args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    let run = move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["method", "invoke"])
            .args(&args)
            .args(["--admin-bind", &admin.to_string()])
            .output()
            .unwrap()
    };
    let output = tokio::task::spawn_blocking(run).await.unwrap();
    let said = match output.status.success() {
        true => &output.stdout,
        false => &output.stderr,
    };
    (
        output.status.success(),
        String::from_utf8_lossy(said).into_owned(),
    )
}

#[tokio::test]
async fn a_call_reaches_the_module_and_its_answer_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let spool = start(dir.path());
    let admin = spool.admin.unwrap();
    let mut filter = module(spool.addr, "filter", true).await;
    let args = ["edge/filter", "reset", "--payload", r#"{"delay": 5}"#];
    let call = tokio::spawn(async move { invoke(admin, &args).await });
    let (name, rid, payload) = request(&mut filter).await;
    assert_eq!(name, "reset");
    assert_eq!(payload, serde_json::json!({"delay": 5}));
    // The request id is matched without case, as edgeHub does.
    answer(&filter, "201", &rid.to_uppercase(), r#"{"done": true}"#).await;
    let (succeeded, said) = call.await.unwrap();
    assert!(succeeded, "{said}");
    let result: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(
        result,
        serde_json::json!({"status": 201, "payload": {"done": true}})
    );
}

#[tokio::test]
async fn a_target_that_is_not_there_gets_404_and_one_that_does_not_answer_504() {
    let dir = tempfile::tempdir().unwrap();
    let spool = start(dir.path());
    let admin = spool.admin.unwrap();

    // Not connected; connected but not subscribed to its methods; not an identity at all.
    let (succeeded, said) = invoke(admin, &["edge/filter", "reset"]).await;
    assert!(!succeeded && said.contains("not connected"), "{said}");
    let _sink = module(spool.addr, "sink", false).await;
    let (succeeded, said) = invoke(admin, &["edge/sink", "reset"]).await;
    assert!(!succeeded && said.contains("not subscribed"), "{said}");
    let (succeeded, said) = invoke(admin, &["edge/nobody", "reset"]).await;
    assert!(
        !succeeded && said.contains("no identity edge/nobody"),
        "{said}"
    );
    let (succeeded, said) = invoke(admin, &["edge/filter", "a/b"]).await;
    assert!(!succeeded && said.contains("holds '/'"), "{said}");

    // Subscribed, and silent: the call fails at its timeout, not before, not much after.
    let mut filter = module(spool.addr, "filter", true).await;
    let started = Instant::now();
    let args = ["edge/filter", "slow", "--timeout", "1"];
    let call = tokio::spawn(async move { invoke(admin, &args).await });
    let (_, late_rid, _) = request(&mut filter).await;
    let (succeeded, said) = call.await.unwrap();
    let took = started.elapsed();
    assert!(!succeeded && said.contains("did not answer"), "{said}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Its late answer goes nowhere. An answer from another identity than the target is
    // dropped (the forger's PUBACK comes after spool dealt with it): the call gets its
    // target's answer.
    answer(&filter, "200", &late_rid, r#""late""#).await;
    let call = tokio::spawn(async move { invoke(admin, &["edge/filter", "next"]).await });
    let (name, rid, _) = request(&mut filter).await;
    assert_eq!(name, "next");
    let mut sink = module(spool.addr, "sink", false).await;
    answer(&sink, "200", &rid, r#""forged""#).await;
    sink.acks(1).await;
    answer(&filter, "200", &rid, r#""mine""#).await;
    let (succeeded, said) = call.await.unwrap();
    assert!(succeeded, "{said}");
    let result: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(result["payload"], "mine");
}

#[tokio::test]
async fn a_call_with_a_connect_timeout_waits_for_its_target_to_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let spool = start(dir.path());
    let admin = spool.admin.unwrap();
    let args = ["edge/filter", "hello", "--connect-timeout", "10"];
    let call = tokio::spawn(async move { invoke(admin, &args).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut filter = module(spool.addr, "filter", true).await;
    let (_, rid, _) = request(&mut filter).await;
    // A module may answer with any status, and no body.
    answer(&filter, "500", &rid, "").await;
    let (succeeded, said) = call.await.unwrap();
    assert!(succeeded, "{said}");
    let result: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(result, serde_json::json!({"status": 500, "payload": null}));
}

/// Sends one HTTP/1.1 request over TLS to `spool`'s HTTPS listener; returns the status and
/// the body as JSON.
async fn https(
    spool: &Spool,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let connector = tls_connector(spool.tls_ca.as_ref().unwrap(), &rustls::version::TLS12);
    let mut stream = tls_connect(spool.https.unwrap(), &connector, "localhost")
        .await
        .unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    // A TLS peer that closes without close_notify is an error to rustls; what came is enough.
    let _ = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn a_module_calls_another_over_https_with_its_own_token() {
    let dir = tempfile::tempdir().unwrap();
    let spool = start(dir.path());
    let mut filter = module(spool.addr, "filter", true).await;
    let token = sas_token("edge/sink", &KEY);
    let caller = [
        ("Authorization", token.as_str()),
        ("x-ms-edge-moduleId", "edge/sink"),
    ];
    let path = "/twins/edge/modules/filter/methods?api-version=2018-06-30";
    let body = r#"{"methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": 10, "connectTimeoutInSeconds": 5}"#;

    let answering = async {
        let (name, rid, payload) = request(&mut filter).await;
        assert_eq!(
            (name.as_str(), payload),
            ("reboot", serde_json::json!({"delay": 5}))
        );
        answer(&filter, "200", &rid, r#"{"rebooted": "soon"}"#).await;
    };
    let ((status, result), ()) = tokio::join!(https(&spool, path, &caller, body), answering);
    assert_eq!(status, 200, "{result}");
    assert_eq!(
        result,
        serde_json::json!({"status": 200, "payload": {"rebooted": "soon"}})
    );

    // No token, a token signed with another key, or one for another identity than claimed:
    // 401, saying nothing of why.
    let (status, result) = https(&spool, path, &[], body).await;
    assert_eq!(status, 401, "{result}");
    let unauthorized = "ErrorCode:IotHubUnauthorizedAccess;Unauthorized";
    assert_eq!(result["Message"], unauthorized);
    let forged = sas_token("edge/sink", &[9; 32]);
    let (status, _) = https(&spool, path, &[("Authorization", &forged)], body).await;
    assert_eq!(status, 401);
    let claimed = [
        ("Authorization", token.as_str()),
        ("x-ms-edge-moduleId", "edge/filter"),
    ];
    let (status, _) = https(&spool, path, &claimed, body).await;
    assert_eq!(status, 401);

    // A malformed call, an unknown target, a target not subscribed, a path segment that
    // decodes to two ids, another path.
    let (status, result) = https(&spool, path, &caller, r#"{"payload": 1}"#).await;
    assert_eq!(status, 400, "{result}");
    let message = result["Message"].as_str().unwrap();
    assert!(
        message.starts_with("ErrorCode:ArgumentInvalid;"),
        "{result}"
    );
    assert!(message.contains("methodName"), "{result}");
    let nobody = "/twins/edge/modules/nobody/methods";
    let (status, result) = https(&spool, nobody, &caller, body).await;
    assert_eq!((status, result["errorCode"].as_u64()), (404, Some(404_001)));
    let _sink = module(spool.addr, "sink", false).await;
    let sink = "/twins/edge/modules/sink/methods";
    let quick = r#"{"methodName": "x"}"#;
    let (status, result) = https(&spool, sink, &caller, quick).await;
    assert_eq!((status, result["errorCode"].as_u64()), (404, Some(404_103)));
    let (status, _) = https(&spool, "/twins/edge%2Fsink/methods", &caller, quick).await;
    assert_eq!(status, 400);
    let (status, _) = https(&spool, "/devices/edge/messages/events", &caller, quick).await;
    assert_eq!(status, 404);

    // One the target never answers: 504 at its timeout.
    let slow = r#"{"methodName": "slow", "responseTimeoutInSeconds": 1}"#;
    let (status, result) = https(&spool, path, &caller, slow).await;
    assert_eq!((status, result["errorCode"].as_u64()), (504, Some(504_101)));
}

#[tokio::test]
async fn a_will_cannot_answer_a_method_call() {
    // Goal: a method answer (or twin request) is addressed to the hub; as a will it would be
    // logged as a message when the connection dies, so a CONNECT with one is refused.
    let dir = tempfile::tempdir().unwrap();
    let spool = start(dir.path());
    let mut options = module_options(spool.addr, "edge/filter", &KEY, true);
    let topic = "$iothub/methods/res/200/?$rid=1";
    options.set_last_will(rumqttc::LastWill::new(topic, "{}", QoS::AtLeastOnce, false));
    let mut filter = connect(options);
    match filter.next(10).await {
        Seen::ConnAck(ack) => {
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::NotAuthorized);
        }
        Seen::Disconnected(why) => assert!(why.contains("NotAuthorized"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
