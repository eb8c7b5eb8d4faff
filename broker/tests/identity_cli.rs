//! `spool identity …` as an operator runs it: the registry of a data directory, managed offline
//! or through a running server's admin API, with the connection strings and environment the
//! Azure IoT SDKs read.
#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::Spool;
use spool_broker::auth::sas::{SasToken, resource_uri, sign};
use std::path::Path;
use std::process::Command;

/// The host names the tests' identities are checked against (as `identity` passes them).
const HOSTS: [&str; 4] = [
    "--iothub-hostname",
    "hub.example",
    "--gateway-hostname",
    "spool",
];

/// `spool serve` on `dir`, with the tests' host names.
fn serve(dir: &Path) -> Spool {
    Spool::start(dir, &HOSTS)
}

/// Runs `spool identity ARGS --data-dir DIR`; returns whether it succeeded and what it printed
/// (stdout, then stderr).
fn identity(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_spool"))
        .arg("identity")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(HOSTS)
        .env("SPOOL_LOG", "warn")
        .output()
        .unwrap();
    let mut text = String::from_utf8(output.stdout).unwrap();
    text.push_str(&String::from_utf8(output.stderr).unwrap());
    (output.status.success(), text)
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, text) = identity(dir, args);
    assert!(success, "spool identity {args:?} failed: {text}");
    text
}

/// The primary and secondary keys `spool identity show` prints, decoded.
fn sas_keys(dir: &Path, id: &str) -> Vec<Vec<u8>> {
    let shown = ok(dir, &["show", id]);
    ["primary:", "secondary:"]
        .iter()
        .map(|name| {
            let key = shown.lines().find_map(|l| l.strip_prefix(name)).unwrap();
            BASE64.decode(key.trim()).unwrap()
        })
        .collect()
}

/// The field `name` of a connection string.
fn field<'a>(connection_string: &'a str, name: &str) -> &'a str {
    connection_string
        .split(';')
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in {connection_string}"))
}

#[test]
fn identities_are_added_listed_rotated_disabled_and_removed() {
    // Goal: an operator adds a module and gets a connection string whose key signs tokens the
    // registry's key verifies; list, show, env, disable, rotate and remove do what they say
    // (each run is a new process: the registry is in the data directory).
    let dir = tempfile::tempdir().unwrap();
    let added = ok(dir.path(), &["add", "myEdge/filter"]);
    let line = added
        .lines()
        .find_map(|l| l.strip_prefix("connection string: "))
        .expect("a connection string");
    assert_eq!(field(line, "HostName"), "hub.example");
    assert_eq!(field(line, "DeviceId"), "myEdge");
    assert_eq!(field(line, "ModuleId"), "filter");
    assert_eq!(field(line, "GatewayHostName"), "spool");
    let key = BASE64.decode(field(line, "SharedAccessKey")).unwrap();
    assert_eq!(key.len(), 32);
    assert!(added.contains("ca.pem"), "the CA file is named: {added}");

    // The SDKs sign with the connection string's key; the registry's primary key verifies it.
    let token = sign(
        &key,
        &resource_uri("hub.example", "myEdge", Some("filter")),
        4_000_000_000,
    );
    let primary = sas_keys(dir.path(), "myEdge/filter").swap_remove(0);
    let parsed = SasToken::parse(&token).unwrap();
    parsed
        .verify("myEdge", Some("filter"), &["hub.example"], &[&primary], 1)
        .unwrap();

    let env = ok(dir.path(), &["env", "myEdge/filter"]);
    assert!(
        env.contains(&format!("EdgeHubConnectionString={line}")),
        "{env}"
    );
    assert!(env.contains("EdgeModuleCACertificateFile="), "{env}");

    let (refused, text) = identity(dir.path(), &["add", "myEdge/filter"]);
    assert!(!refused && text.contains("exists already"), "{text}");
    let (refused, text) = identity(dir.path(), &["add", "bad/id/here"]);
    assert!(!refused && text.contains("not a device id"), "{text}");

    ok(dir.path(), &["add", "leaf", "--x509-ca"]);
    ok(dir.path(), &["disable", "myEdge/filter"]);
    let listed = ok(dir.path(), &["list"]);
    let row = |id: &str| {
        listed
            .lines()
            .find(|line| line.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("{id} listed: {listed}"))
            .to_owned()
    };
    assert!(row("myEdge/filter").contains("disabled"), "{listed}");
    assert!(
        row("leaf").contains("enabled") && row("leaf").contains("x509-ca"),
        "{listed}"
    );

    let rotated = ok(dir.path(), &["rotate", "myEdge/filter"]);
    let new_line = rotated
        .lines()
        .find_map(|l| l.strip_prefix("connection string: "))
        .unwrap();
    assert_ne!(
        field(new_line, "SharedAccessKey"),
        field(line, "SharedAccessKey")
    );
    let keys = sas_keys(dir.path(), "myEdge/filter");
    let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let verified = parsed.verify("myEdge", Some("filter"), &["hub.example"], &keys, 1);
    assert!(verified.is_err(), "the old key signs no more");
    let (refused, text) = identity(dir.path(), &["rotate", "leaf"]);
    assert!(!refused && text.contains("no SAS keys"), "{text}");

    ok(dir.path(), &["remove", "leaf"]);
    let listed = ok(dir.path(), &["list"]);
    assert!(!listed.contains("leaf"), "{listed}");
    let (refused, text) = identity(dir.path(), &["show", "leaf"]);
    assert!(!refused && text.contains("no identity leaf"), "{text}");
}

/// A module's MQTT connection to `spool` with a token signed with `key`.
fn module_client(spool: &Spool, id: &str, key: &[u8]) -> common::Client {
    let (device, module) = id.split_once('/').unwrap();
    let token = sign(
        key,
        &resource_uri("hub.example", device, Some(module)),
        4_000_000_000,
    );
    let mut options = common::options(spool.addr, id, true);
    options.set_credentials(format!("hub.example/{id}/?api-version=2020-09-30"), token);
    common::connect(options)
}

/// Whether the next thing a client sees is an accepted CONNACK (else a refusal or a
/// disconnect).
async fn accepted(client: &mut common::Client) -> bool {
    matches!(client.next(10).await, common::Seen::ConnAck(ack) if ack.code == rumqttc::ConnectReturnCode::Success)
}

/// Waits until the client's connection ends.
async fn disconnected(client: &mut common::Client) {
    loop {
        if let common::Seen::Disconnected(_) = client.next(10).await {
            return;
        }
    }
}

#[tokio::test]
async fn a_running_servers_identities_change_through_its_admin_api() {
    // Goal: while a server holds the data directory, the command goes through its admin API:
    // what it adds may connect at once; disabling, rotating or removing an identity
    // disconnects its clients whose credentials no longer hold, and refuses them after. With
    // the admin API off, the command says the directory is held, and by whom.
    let dir = tempfile::tempdir().unwrap();
    let spool = serve(dir.path());
    let admin = spool.admin.unwrap().to_string();
    let remote = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--admin-bind", admin.as_str()]);
        ok(dir.path(), &args)
    };
    let added = remote(&["add", "edge/live"]);
    let line = added
        .lines()
        .find_map(|l| l.strip_prefix("connection string: "))
        .expect("a connection string");
    let key = BASE64.decode(field(line, "SharedAccessKey")).unwrap();
    let mut client = module_client(&spool, "edge/live", &key);
    assert!(
        accepted(&mut client).await,
        "added while running: connects at once"
    );
    assert!(remote(&["list"]).contains("edge/live"));

    assert!(remote(&["disable", "edge/live"]).contains("edge/live is disabled"));
    disconnected(&mut client).await;
    assert!(
        !accepted(&mut module_client(&spool, "edge/live", &key)).await,
        "refused"
    );
    remote(&["enable", "edge/live"]);
    let mut client = module_client(&spool, "edge/live", &key);
    assert!(accepted(&mut client).await, "enabled again");

    let rotated = remote(&["rotate", "edge/live", "--key", "primary"]);
    disconnected(&mut client).await;
    let new_line = rotated
        .lines()
        .find_map(|l| l.strip_prefix("connection string: "))
        .unwrap();
    let new_key = BASE64.decode(field(new_line, "SharedAccessKey")).unwrap();
    let mut client = module_client(&spool, "edge/live", &new_key);
    assert!(accepted(&mut client).await, "the new primary key");

    remote(&["remove", "edge/live"]);
    disconnected(&mut client).await;
    let (refused, text) = identity(dir.path(), &["show", "edge/live", "--admin-bind", &admin]);
    assert!(!refused && text.contains("no identity edge/live"), "{text}");

    let (refused, text) = identity(dir.path(), &["list", "--admin-bind", ""]);
    assert!(
        !refused && text.contains("held by a running spool server"),
        "{text}"
    );
    spool.kill();
    ok(dir.path(), &["list"]);
}

/// The key IoT Edge 1.1 derives for `module` from its device's primary key (contract §2.2).
fn derived_key(device_key: &[u8], module: &str, generation: &str) -> Vec<u8> {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(device_key).unwrap();
    mac.update(format!("{module}primary{generation}").as_bytes());
    mac.finalize().into_bytes().to_vec()
}

#[tokio::test]
async fn a_module_without_keys_of_its_own_uses_keys_derived_from_its_devices() {
    // Goal: a module added with --derived authenticates with the key IoT Edge 1.1 derives
    // from its device's primary key and its generation id, prints it in its connection
    // string, and follows the device's key: rotating that disconnects the module, and the
    // key derived from the new one lets it in.
    let dir = tempfile::tempdir().unwrap();
    let spool = serve(dir.path());
    let admin = spool.admin.unwrap().to_string();
    let remote = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--admin-bind", admin.as_str()]);
        ok(dir.path(), &args)
    };
    remote(&["add", "edge"]);
    let added = remote(&["add", "edge/filter", "--derived", "--generation-id", "6376"]);
    let device_key = |shown: &str| {
        let key = shown
            .lines()
            .find_map(|l| l.strip_prefix("primary:"))
            .unwrap();
        BASE64.decode(key.trim()).unwrap()
    };
    let expected = derived_key(&device_key(&remote(&["show", "edge"])), "filter", "6376");
    let line = added
        .lines()
        .find_map(|l| l.strip_prefix("connection string: "))
        .expect("a connection string");
    assert_eq!(
        BASE64.decode(field(line, "SharedAccessKey")).unwrap(),
        expected
    );
    assert!(remote(&["list"]).contains("sas-derived"));
    let mut client = module_client(&spool, "edge/filter", &expected);
    assert!(accepted(&mut client).await, "the derived key lets it in");

    remote(&["rotate", "edge", "--key", "primary"]);
    disconnected(&mut client).await;
    let rederived = derived_key(&device_key(&remote(&["show", "edge"])), "filter", "6376");
    assert_ne!(rederived, expected);
    assert!(
        !accepted(&mut module_client(&spool, "edge/filter", &expected)).await,
        "the old derived key is refused"
    );
    assert!(accepted(&mut module_client(&spool, "edge/filter", &rederived)).await);
    let (refused, text) = identity(dir.path(), &["remove", "edge", "--admin-bind", &admin]);
    assert!(!refused && text.contains("remove them first"), "{text}");
}

#[test]
fn the_serve_configuration_applies_and_reading_creates_nothing() {
    // Goal: the command reads `spool serve`'s configuration file (data directory, host names),
    // and a command that only reads refuses a data directory that does not exist instead of
    // creating an empty one.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("spool.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\niothub_hostname = \"hub.from-file\"\ngateway_hostname = \"gw\"\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_spool"))
            .arg("identity")
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("SPOOL_LOG", "warn")
            .output()
            .unwrap()
    };
    let listed = run(&["list"]);
    assert!(!listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stderr).contains("no data directory"));
    assert!(!data.exists(), "reading created nothing");
    let added = run(&["add", "edge/m"]);
    assert!(added.status.success());
    let added = String::from_utf8(added.stdout).unwrap();
    assert!(added.contains("HostName=hub.from-file;"), "{added}");
    assert!(added.contains("GatewayHostName=gw"), "{added}");
    assert!(data.join("meta.redb").exists(), "the file's data directory");
}

/// Exports `child`'s identities to `exported.json` in `dir`; returns its path.
fn export_to(child: &Path, dir: &Path) -> std::path::PathBuf {
    let file = dir.join("exported.json");
    let said = ok(child, &["export", "--output", file.to_str().unwrap()]);
    assert!(said.contains("exported"), "{said}");
    file
}

#[test]
fn exports_are_owner_only_files_that_import_reads_back() {
    // Goal: an export holds keys, so it is readable by its owner only, even over a file that
    // was not; it is TOML or JSON, as `import` reads; a module with derived keys comes with
    // its device, and imported elsewhere (here, a data directory no server holds) it gets
    // the same keys.
    let child = tempfile::tempdir().unwrap();
    ok(child.path(), &["add", "edge"]);
    ok(child.path(), &["add", "edge/filter"]);
    let file = child.path().join("exported.json");
    std::fs::write(&file, "old").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(export_to(child.path(), child.path()), file);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "keys are for its owner only");
    let toml = ok(child.path(), &["export", "edge/filter"]);
    assert!(
        toml.contains("[[identities]]") && toml.contains("edge/filter"),
        "{toml}"
    );
    assert!(
        !toml.contains("\"edge\""),
        "only the named identity: {toml}"
    );
    let (refused, text) = identity(child.path(), &["export", "--output", "ids.txt"]);
    assert!(!refused && text.contains(".toml or .json"), "{text}");

    let derived = ["add", "edge/derived", "--derived", "--generation-id", "g1"];
    ok(child.path(), &derived);
    let toml_file = child.path().join("derived.toml");
    let output = toml_file.to_str().unwrap();
    let said = ok(
        child.path(),
        &["export", "edge/derived", "--output", output],
    );
    assert!(
        said.contains("exported 2 identities"),
        "with its device: {said}"
    );
    let offline = tempfile::tempdir().unwrap();
    ok(offline.path(), &["import", output]);
    ok(offline.path(), &["import", file.to_str().unwrap()]);
    for id in ["edge/filter", "edge/derived"] {
        assert_eq!(
            sas_keys(offline.path(), id),
            sas_keys(child.path(), id),
            "{id}"
        );
    }
}

#[tokio::test]
async fn identities_exported_from_one_hub_are_imported_by_another() {
    // Goal (nested edge): the identities a child hub knows, exported with their keys from its
    // data directory, become a parent's through `import` (here through the parent's admin
    // API while it runs): the child's module connects to the parent with its own key, and an
    // identity imported again is replaced, not refused.
    let child = tempfile::tempdir().unwrap();
    ok(child.path(), &["add", "edge/filter"]);
    let thumbprint = "ab".repeat(32);
    ok(child.path(), &["add", "leaf", "--thumbprint", &thumbprint]);
    let file = export_to(child.path(), child.path());

    let parent = tempfile::tempdir().unwrap();
    let spool = serve(parent.path());
    let admin = spool.admin.unwrap().to_string();
    let import = ["import", file.to_str().unwrap(), "--admin-bind", &admin];
    let said = ok(parent.path(), &import);
    assert!(said.contains("imported 2 identities"), "{said}");
    let said = ok(parent.path(), &import);
    assert!(said.contains("imported 2 identities"), "again: {said}");
    let key = &sas_keys(child.path(), "edge/filter")[0];
    let mut client = module_client(&spool, "edge/filter", key);
    assert!(
        accepted(&mut client).await,
        "the child's key is the parent's"
    );
    let shown = ok(parent.path(), &["show", "leaf", "--admin-bind", &admin]);
    assert!(shown.contains(&thumbprint), "{shown}");

    let bad = child.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[identities]]\nid = \"a/b/c\"\nauth = { type = \"x509_ca\" }\n",
    )
    .unwrap();
    let (imported, text) = identity(
        parent.path(),
        &["import", bad.to_str().unwrap(), "--admin-bind", &admin],
    );
    assert!(!imported && text.contains("a/b/c"), "{text}");
}
