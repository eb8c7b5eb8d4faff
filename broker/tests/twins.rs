//! Module twins over MQTT, black-box (edgehub-contract.md §1.5): a module reads its twin with
//! `$iothub/twin/GET` and reports properties with `$iothub/twin/PATCH/properties/reported`, as
//! the Azure IoT SDKs do; a reported patch is answered 204 only once it is on disk, so it
//! survives a SIGKILL.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Client, Seen, Spool, connect, identities_file, module_options};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const KEY: [u8; 32] = [3; 32];

/// A deployment that gives module `filter` the desired property `rate`.
fn deployment(rate: u32) -> String {
    format!(
        r#"{{"modulesContent": {{
            "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.1", "routes": {{}},
                "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}},
            "filter": {{"properties.desired": {{"rate": {rate}}}}}
        }}}}"#
    )
}

fn start(dir: &Path) -> Spool {
    start_with(dir, &[])
}

fn start_with(dir: &Path, args: &[&str]) -> Spool {
    let identities = identities_file(dir, &["edge/filter", "edge/sink"], &KEY);
    let mut all = vec!["--identities", identities.to_str().unwrap()];
    all.extend(args);
    Spool::start(&dir.join("data"), &all)
}

/// Writes `manifest` as `deployment.json` in `dir`; returns its path.
fn write_manifest(dir: &Path, manifest: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("deployment.json");
    std::fs::write(&path, manifest).unwrap();
    path
}

/// [`start_with`] the deployment manifest at `manifest`.
fn start_deployed(dir: &Path, manifest: &Path) -> Spool {
    start_with(dir, &["--deployment", manifest.to_str().unwrap()])
}

/// Module `edge/filter`, connected and subscribed to its twin's answers.
async fn module(addr: SocketAddr) -> Client {
    module_named(addr, "filter").await
}

async fn module_named(addr: SocketAddr, name: &str) -> Client {
    module_session(addr, name, true).await
}

/// Module `edge/{name}`, with a clean or a persistent session.
async fn module_session(addr: SocketAddr, name: &str, clean: bool) -> Client {
    let mut client = connect(module_options(addr, &format!("edge/{name}"), &KEY, clean));
    client.connected().await;
    client
        .subscribe("$iothub/twin/res/#", QoS::AtMostOnce)
        .await;
    client
}

/// Publishes `body` on `topic` and returns the answer's topic and body (JSON, or null when
/// empty), having seen the request's PUBACK too.
async fn ask(client: &mut Client, topic: &str, body: &str) -> (String, serde_json::Value) {
    client
        .publish(topic, QoS::AtLeastOnce, body.as_bytes().to_vec())
        .await;
    let (mut acknowledged, mut answer) = (false, None);
    while !acknowledged || answer.is_none() {
        match client.next(10).await {
            Seen::PubAck(_) => acknowledged = true,
            Seen::Publish(p) => {
                let body = match p.payload.is_empty() {
                    true => serde_json::Value::Null,
                    false => serde_json::from_slice(&p.payload).unwrap(),
                };
                answer = Some((p.topic, body));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    answer.unwrap()
}

#[tokio::test]
async fn a_module_reads_its_twin_and_reports_properties_that_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let spool = start(dir.path());
    let mut filter = module(spool.addr).await;
    let (topic, twin) = ask(&mut filter, "$iothub/twin/GET/?$rid=1", "").await;
    assert_eq!(topic, "$iothub/twin/res/200/?$rid=1");
    assert_eq!(
        twin,
        serde_json::json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );
    let reported = "$iothub/twin/PATCH/properties/reported/?$rid=2";
    let (topic, body) = ask(&mut filter, reported, r#"{"temp": 21, "unit": "C"}"#).await;
    assert_eq!(topic, "$iothub/twin/res/204/?$rid=2&$version=2");
    assert_eq!(body, serde_json::Value::Null);
    let reported = "$iothub/twin/PATCH/properties/reported/?$rid=3";
    let (topic, _) = ask(&mut filter, reported, r#"{"unit": null}"#).await;
    assert_eq!(topic, "$iothub/twin/res/204/?$rid=3&$version=3");
    let bad = "$iothub/twin/PATCH/properties/reported/?$rid=4";
    let (topic, body) = ask(&mut filter, bad, r#"{"a.b": 1}"#).await;
    assert_eq!(topic, "$iothub/twin/res/400/?$rid=4");
    assert!(body["message"].as_str().unwrap().contains("a.b"), "{body}");

    // Acknowledged means on disk: the patches survive a SIGKILL.
    spool.kill();
    let spool = start(dir.path());
    let mut filter = module(spool.addr).await;
    let (_, twin) = ask(&mut filter, "$iothub/twin/GET/?$rid=5", "").await;
    assert_eq!(
        twin["reported"],
        serde_json::json!({"temp": 21, "$version": 3})
    );
}

#[tokio::test]
async fn desired_properties_come_from_the_deployment_and_changes_reach_the_module() {
    // Goal: the manifest's desired properties are in the twin a module reads, and a reload
    // that changes them sends the module one patch with the new `$version`.
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &deployment(5));
    let spool = start_deployed(dir.path(), &manifest);
    let mut filter = module(spool.addr).await;
    let (_, twin) = ask(&mut filter, "$iothub/twin/GET/?$rid=1", "").await;
    assert_eq!(
        twin["desired"],
        serde_json::json!({"rate": 5, "$version": 2})
    );
    filter
        .subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)
        .await;
    std::fs::write(&manifest, deployment(7)).unwrap();
    let patch = loop {
        if let Seen::Publish(p) = filter.next(10).await {
            break p;
        }
    };
    assert_eq!(
        patch.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=3"
    );
    let body: serde_json::Value = serde_json::from_slice(&patch.payload).unwrap();
    assert_eq!(body, serde_json::json!({"rate": 7, "$version": 3}));

    // An operator's patch reaches the module too. The manifest owns `rate`, so its next
    // reading sets `rate` again; `mode`, which it does not name, stays.
    let admin = spool.admin.unwrap().to_string();
    let patch = r#"{"rate": 1, "mode": "x"}"#;
    let patched = spool_twin(&admin, &["patch-desired", "edge/filter", patch]);
    let expected = serde_json::json!({"rate": 1, "mode": "x", "$version": 4});
    assert_eq!(patched["desired"], expected);
    assert_eq!(next_patch(&mut filter).await, expected);
    std::fs::write(&manifest, deployment(9)).unwrap();
    assert_eq!(
        next_patch(&mut filter).await,
        serde_json::json!({"rate": 9, "$version": 5})
    );
    let twin = spool_twin(&admin, &["get", "edge/filter"]);
    let expected = serde_json::json!({"rate": 9, "mode": "x", "$version": 5});
    assert_eq!(twin["desired"], expected);
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["twin", "patch-desired", "edge/filter", "[1]"])
        .args(["--admin-bind", &admin])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("not a JSON object"), "{said}");
}

/// Runs `spool ARGS`, which must succeed; returns what it prints.
fn spool_cli(args: &[&str]) -> Vec<u8> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "spool {args:?}: {said}");
    output.stdout
}

/// Runs `spool twin ARGS` against the admin API at `admin`; returns the twin it prints.
fn spool_twin(admin: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["twin"];
    all.extend(args);
    all.extend(["--admin-bind", admin]);
    serde_json::from_slice(&spool_cli(&all)).unwrap()
}

/// The next desired-property patch the module receives.
async fn next_patch(client: &mut Client) -> serde_json::Value {
    loop {
        if let Seen::Publish(p) = client.next(10).await {
            let desired = p
                .topic
                .starts_with("$iothub/twin/PATCH/properties/desired/");
            assert!(desired, "{}", p.topic);
            return serde_json::from_slice(&p.payload).unwrap();
        }
    }
}

#[tokio::test]
async fn reported_changes_reach_routes_as_twin_change_notifications() {
    // Goal: a reported patch becomes a twin change notification routed from
    // `/twinChangeNotifications`, and `twin_change_includes` picks the ones that matter.
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        r#"{"schemaVersion": "1.1", "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
            "routes": {"twins": "FROM /twinChangeNotifications WHERE twin_change_includes('properties.reported.temp') INTO BrokeredEndpoint(\"/modules/sink/inputs/twins\")"}}"#,
    );
    let spool = start_deployed(dir.path(), &manifest);
    let mut sink = module_named(spool.addr, "sink").await;
    sink.subscribe("devices/edge/modules/sink/inputs/#", QoS::AtLeastOnce)
        .await;
    let mut filter = module(spool.addr).await;
    let reported = "$iothub/twin/PATCH/properties/reported/?$rid=";
    for (rid, patch) in [
        (1, r#"{"temp": 30}"#),
        (2, r#"{"other": 1}"#),
        (3, r#"{"temp": 31}"#),
    ] {
        ask(&mut filter, &format!("{reported}{rid}"), patch).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let Seen::Publish(p) = sink.next(10).await {
            assert!(
                p.topic
                    .starts_with("devices/edge/modules/sink/inputs/twins/"),
                "{}",
                p.topic
            );
            assert!(p.topic.contains("%24.cmid=filter"), "{}", p.topic);
            seen.push(serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap());
        }
    }
    assert_eq!(
        seen,
        vec![
            serde_json::json!({"version": 2, "properties": {"reported": {"temp": 30, "$version": 2}}}),
            serde_json::json!({"version": 4, "properties": {"reported": {"temp": 31, "$version": 4}}}),
        ],
        "the change without temp went nowhere"
    );
}

#[tokio::test]
async fn a_change_made_while_spool_was_down_reaches_a_persistent_subscriber() {
    // Goal: a manifest changed while spool was stopped changes the desired properties at the
    // next start, and a module whose persistent session is subscribed to them gets the patch
    // when it comes back, as it would have had it been connected.
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &deployment(5));
    let spool = start_deployed(dir.path(), &manifest);
    let mut filter = module_session(spool.addr, "filter", false).await;
    filter
        .subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)
        .await;
    drop(filter);
    assert!(spool.terminate().success());
    std::fs::write(&manifest, deployment(6)).unwrap();
    let spool = start_deployed(dir.path(), &manifest);
    // Connected only: a subscribe would skip a patch that comes before its SUBACK.
    let mut filter = connect(module_options(spool.addr, "edge/filter", &KEY, false));
    assert!(filter.connected().await, "the session is still there");
    assert_eq!(
        next_patch(&mut filter).await,
        serde_json::json!({"rate": 6, "$version": 3})
    );
}

#[tokio::test]
async fn an_identity_removed_and_added_again_starts_with_a_new_twin() {
    // Goal: a twin goes with its identity, as in IoT Hub: removing `edge/filter` through the
    // running server and adding it again gives it an empty twin, also after a restart.
    let dir = tempfile::tempdir().unwrap();
    let spool = start(dir.path());
    let mut filter = module(spool.addr).await;
    let reported = "$iothub/twin/PATCH/properties/reported/?$rid=1";
    let (topic, _) = ask(&mut filter, reported, r#"{"temp": 21}"#).await;
    assert_eq!(topic, "$iothub/twin/res/204/?$rid=1&$version=2");
    let admin = spool.admin.unwrap().to_string();
    let data = dir.path().join("data");
    let identity = |command: &str| {
        let data = data.to_str().unwrap();
        spool_cli(&[
            "identity",
            command,
            "edge/filter",
            "--data-dir",
            data,
            "--admin-bind",
            &admin,
        ]);
    };
    identity("remove");
    identity("add");
    let twin = spool_twin(&admin, &["get", "edge/filter"]);
    let new = serde_json::json!({"desired": {"$version": 1}, "reported": {"$version": 1}});
    assert_eq!(twin, new);
    spool.kill();
    let spool = Spool::start(&data, &[]);
    let twin = spool_twin(&spool.admin.unwrap().to_string(), &["get", "edge/filter"]);
    assert_eq!(twin, new, "not back from the store");
}
