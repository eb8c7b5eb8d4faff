//! MQTTS: the listener on its own port, the CA and server certificate generated on first start
//! (kept across restarts), operator-supplied PEM files, TLS 1.2 and 1.3, and the server names
//! IoT Edge modules use. The client is tokio-rustls speaking raw MQTT 3.1.1.
#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{
    Spool, connect_v311, connect_v311_as, publish_qos1_v311, raw_connect, read_packet,
    subscribe_v311, tls_connect, tls_connector,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use spool_broker::auth::sas::{CLOCK_SKEW_SECS, resource_uri, sign};
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The module the TLS tests connect as, and its key.
const MODULE: &str = "edge/tls";
const KEY: [u8; 32] = [7; 32];

/// Starts spool with `MODULE` in its registry, and `edge/off` disabled, with the same key (an
/// identities file in the data directory).
fn start_with_module(dir: &Path, extra_args: &[&str]) -> Spool {
    let key = BASE64.encode(KEY);
    let file = dir.join("identities.toml");
    let identity = format!(
        "[[identities]]\nid = \"{MODULE}\"\nauth = {{ type = \"sas\", primary = \"{key}\", secondary = \"{key}\" }}\n\
         [[identities]]\nid = \"edge/off\"\nstatus = \"disabled\"\nauth = {{ type = \"sas\", primary = \"{key}\", secondary = \"{key}\" }}\n"
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&file, identity).unwrap();
    let mut args = vec!["--identities", file.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    Spool::start(dir, &args)
}

/// `MODULE`'s CONNECT, with a token that expires at `expiry` (seconds since 1970).
fn module_connect(expiry: u64) -> Vec<u8> {
    let (device, module) = MODULE.split_once('/').unwrap();
    let token = sign(
        &KEY,
        &resource_uri("localhost", device, Some(module)),
        expiry,
    );
    let username = format!("localhost/{MODULE}/?api-version=2020-09-30");
    connect_v311_as(MODULE, &username, &token)
}

fn in_an_hour() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.unwrap().as_secs() + 3600
}

/// CONNECT as `MODULE`, SUBSCRIBE to its inputs and a QoS 1 PUBLISH of telemetry over
/// `stream`: CONNACK, SUBACK and PUBACK come back.
async fn mqtt_round_trip(stream: &mut TlsStream<TcpStream>) {
    stream
        .write_all(&module_connect(in_an_hour()))
        .await
        .unwrap();
    assert_eq!(read_packet(stream).await, (0x20, vec![0, 0]), "CONNACK");
    stream
        .write_all(&subscribe_v311(1, "devices/edge/modules/tls/inputs/#", 1))
        .await
        .unwrap();
    assert_eq!(read_packet(stream).await, (0x90, vec![0, 1, 1]), "SUBACK");
    let telemetry = "devices/edge/modules/tls/messages/events/k=over%20tls";
    stream
        .write_all(&publish_qos1_v311(2, telemetry, b"over tls"))
        .await
        .unwrap();
    assert_eq!(read_packet(stream).await, (0x40, vec![0, 2]), "PUBACK");
}

#[tokio::test]
async fn generated_ca_serves_tls_12_and_13_for_localhost_and_edgehub() {
    // Goal: with no certificate configured, spool generates a CA and a server certificate whose
    // names include localhost and edgehub, and serves MQTT over both TLS 1.2 (the Azure IoT
    // Python SDK) and TLS 1.3.
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &[]);
    let (addr, ca) = (spool.tls_addr.unwrap(), spool.tls_ca.clone().unwrap());
    assert!(
        ca.starts_with(dir.path()),
        "the CA lives in the data directory"
    );
    for (version, name) in [
        (&rustls::version::TLS12, "localhost"),
        (&rustls::version::TLS13, "edgehub"),
        (&rustls::version::TLS12, "edgehub"),
        (&rustls::version::TLS13, "localhost"),
    ] {
        let mut stream = tls_connect(addr, &tls_connector(&ca, version), name)
            .await
            .unwrap();
        let negotiated = stream.get_ref().1.protocol_version().unwrap();
        assert_eq!(negotiated, version.version);
        mqtt_round_trip(&mut stream).await;
    }
    let strict = tls_connector(&ca, &rustls::version::TLS13);
    assert!(
        tls_connect(addr, &strict, "example.com").await.is_err(),
        "a name not in the certificate is refused"
    );
}

#[tokio::test]
async fn generated_ca_survives_a_restart() {
    // Goal: clients trust the CA once; a restart must not replace it.
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &[]);
    let ca = spool.tls_ca.clone().unwrap();
    let ca_pem = std::fs::read(&ca).unwrap();
    spool.kill();
    let spool = start_with_module(dir.path(), &[]);
    assert_eq!(std::fs::read(&ca).unwrap(), ca_pem);
    let connector = tls_connector(&ca, &rustls::version::TLS13);
    let mut stream = tls_connect(spool.tls_addr.unwrap(), &connector, "localhost")
        .await
        .unwrap();
    mqtt_round_trip(&mut stream).await;
}

#[tokio::test]
async fn operator_certificate_is_used() {
    // Goal: --tls-cert/--tls-key serve the operator's certificate, and no CA is generated.
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["hub.example".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let data = dir.path().join("data");
    let spool = start_with_module(
        &data,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    assert!(spool.tls_ca.is_none());
    assert!(!data.join("tls").exists());
    let connector = tls_connector(&cert_path, &rustls::version::TLS12);
    let mut stream = tls_connect(spool.tls_addr.unwrap(), &connector, "hub.example")
        .await
        .unwrap();
    mqtt_round_trip(&mut stream).await;
}

#[tokio::test]
async fn plain_mqtt_on_the_tls_port_is_refused_and_others_are_served() {
    // Goal: a client that skips TLS gets its connection closed, not a crash or a hang.
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &[]);
    let mut plain = TcpStream::connect(spool.tls_addr.unwrap()).await.unwrap();
    plain.write_all(&connect_v311("plain", true)).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut rest),
    )
    .await;
    assert!(read.is_ok(), "the connection is closed");
    let connector = tls_connector(spool.tls_ca.as_ref().unwrap(), &rustls::version::TLS13);
    let mut stream = tls_connect(spool.tls_addr.unwrap(), &connector, "localhost")
        .await
        .unwrap();
    mqtt_round_trip(&mut stream).await;
}

/// The connection ends, with nothing more sent (no PUBACK for what `what` published).
async fn assert_closed_unacknowledged(stream: &mut TlsStream<TcpStream>, what: &str) {
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(stream, &mut rest),
    )
    .await;
    assert!(closed.is_ok(), "{what}: the connection ends");
    assert!(rest.is_empty(), "{what}: no PUBACK");
}

/// Sends `connect` on a new TLS connection to `spool`; returns the connection and the
/// CONNACK's return code.
async fn connect_tls(spool: &Spool, connect: &[u8]) -> (TlsStream<TcpStream>, u8) {
    let connector = tls_connector(spool.tls_ca.as_ref().unwrap(), &rustls::version::TLS12);
    connect_with(&connector, spool, connect).await
}

/// Sends `connect` on a new TLS connection made by `connector`; returns the connection and the
/// CONNACK's return code.
async fn connect_with(
    connector: &TlsConnector,
    spool: &Spool,
    connect: &[u8],
) -> (TlsStream<TcpStream>, u8) {
    let mut stream = tls_connect(spool.tls_addr.unwrap(), connector, "localhost")
        .await
        .unwrap();
    stream.write_all(connect).await.unwrap();
    let (kind, body) = read_packet(&mut stream).await;
    assert_eq!(kind, 0x20, "CONNACK");
    (stream, body[1])
}

/// What spool answers a CONNECT on the TLS port: the CONNACK's return code.
async fn connack_code(spool: &Spool, connect: &[u8]) -> u8 {
    connect_tls(spool, connect).await.1
}

#[tokio::test]
async fn the_tls_port_requires_an_identity_and_checks_its_token() {
    // Goal: by default the TLS listener lets in only a registered identity with a good SAS
    // token for it; anything else gets CONNACK 5 (not authorized), as from edgeHub.
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &[]);
    assert_eq!(connack_code(&spool, &module_connect(in_an_hour())).await, 0);
    assert_eq!(
        connack_code(&spool, &connect_v311("anonymous", true)).await,
        5
    );
    let (device, module) = MODULE.split_once('/').unwrap();
    let username = format!("localhost/{MODULE}/?api-version=2020-09-30");
    let resource = resource_uri("localhost", device, Some(module));
    let wrong_key = sign(&[1; 32], &resource, in_an_hour());
    let off_username = "localhost/edge/off/?api-version=2020-09-30";
    let off_token = sign(
        &KEY,
        &resource_uri("localhost", "edge", Some("off")),
        in_an_hour(),
    );
    let refused = [
        connect_v311_as("edge/off", off_username, &off_token), // disabled
        connect_v311_as(MODULE, &username, &wrong_key),
        module_connect(in_an_hour() - 2 * 3600), // expired an hour ago
        connect_v311_as(
            "edge/other",
            &username,
            &sign(&KEY, &resource, in_an_hour()),
        ),
        connect_v311_as(MODULE, &username, "not a token"),
    ];
    for connect in refused {
        assert_eq!(connack_code(&spool, &connect).await, 5);
    }
}

#[tokio::test]
async fn a_connection_ends_when_its_token_expires() {
    // Goal: a client is not served past its token's validity (its expiry plus the clock skew
    // allowed at CONNECT): the SDKs connect again with a new token before it comes.
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &[]);
    let connector = tls_connector(spool.tls_ca.as_ref().unwrap(), &rustls::version::TLS12);
    let mut stream = tls_connect(spool.tls_addr.unwrap(), &connector, "localhost")
        .await
        .unwrap();
    // Expired 297 s ago: still accepted (5 minutes of clock skew), valid for 3 s more.
    let now = in_an_hour() - 3600;
    stream
        .write_all(&module_connect(now + 3 - CLOCK_SKEW_SECS))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut stream).await,
        (0x20, vec![0, 0]),
        "CONNACK"
    );
    let connected = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the connection ends with the token");
    // The token had more than two seconds left (three past the whole second): a second of
    // margin for a loaded machine.
    assert!(
        connected.elapsed() >= std::time::Duration::from_millis(900),
        "not before the token expires"
    );
}

#[tokio::test]
async fn anonymous_clients_are_let_in_where_configured_but_credentials_are_still_checked() {
    // Goal: --mqtts-auth anonymous lets plain MQTT clients use the TLS port; a client that
    // presents IoT Hub credentials there is checked all the same, and no anonymous client
    // may use an identity's client id (it would take the identity's session over).
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &["--mqtts-auth", "anonymous"]);
    assert_eq!(
        connack_code(&spool, &connect_v311("anonymous", true)).await,
        0
    );
    assert_eq!(connack_code(&spool, &module_connect(in_an_hour())).await, 0);
    let username = format!("localhost/{MODULE}/?api-version=2020-09-30");
    let (device, module) = MODULE.split_once('/').unwrap();
    let wrong_key = sign(
        &[1; 32],
        &resource_uri("localhost", device, Some(module)),
        in_an_hour(),
    );
    let refused = connect_v311_as(MODULE, &username, &wrong_key);
    assert_eq!(connack_code(&spool, &refused).await, 5, "a wrong key");
    let impostor = connect_v311(MODULE, true);
    assert_eq!(
        connack_code(&spool, &impostor).await,
        5,
        "an identity's id, no credentials"
    );
}

#[tokio::test]
async fn an_identity_keeps_to_its_own_iot_hub_topics() {
    // Goal: a module publishes and subscribes only on its own IoT Hub topics; another
    // module's topic, or a plain one, is refused (SUBACK 0x80; a 3.1.1 PUBLISH ends the
    // connection), and so are a malformed property bag and a message above IoT Hub's 256 KiB
    // (a protocol error: never acknowledged, then forgotten).
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &[]);
    let (mut stream, accepted) = connect_tls(&spool, &module_connect(in_an_hour())).await;
    assert_eq!(accepted, 0);
    for (packet_id, filter, granted) in [
        (1, "devices/edge/modules/tls/inputs/#", 1),
        (2, "devices/edge/modules/other/inputs/#", 0x80),
        (3, "$iothub/methods/POST/#", 1),
        (4, "plain/#", 0x80),
        (7, "devices/+/modules/+/inputs/#", 0x80),
        (8, "devices/edge/modules/+/inputs/#", 0x80),
        (9, "devices/edge/modules/tl%73/inputs/#", 0x80),
        (10, "#", 0x80),
    ] {
        stream
            .write_all(&subscribe_v311(packet_id, filter, 1))
            .await
            .unwrap();
        let (kind, body) = read_packet(&mut stream).await;
        assert_eq!((kind, body[2]), (0x90, granted), "SUBACK for {filter}");
    }
    let own = "devices/edge/modules/tls/messages/events/%24.on=out1&k=v%201";
    stream
        .write_all(&publish_qos1_v311(5, own, b"mine"))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut stream).await, (0x40, vec![0, 5]), "PUBACK");
    let large = vec![b'x'; 256 * 1024];
    for (topic, payload) in [
        (
            "devices/edge/modules/other/messages/events/",
            &b"theirs"[..],
        ),
        ("plain/topic", &b"plain"[..]),
        (
            "devices/edge/modules/tls/messages/events/a=1&&b=2",
            &b"bag"[..],
        ),
        ("devices/edge/modules/tls/messages/events/k=v", &large[..]),
    ] {
        let (mut stream, _) = connect_tls(&spool, &module_connect(in_an_hour())).await;
        stream
            .write_all(&publish_qos1_v311(6, topic, payload))
            .await
            .unwrap();
        assert_closed_unacknowledged(&mut stream, topic).await;
    }
}

#[tokio::test]
async fn a_will_keeps_to_the_same_topics_and_plain_clients_keep_off_iot_hub_ones() {
    // Goal: a module cannot reach another's topics through its will (published when it
    // drops); and an anonymous client may not publish on IoT Hub topics at all, or it could
    // forge a module's telemetry or call its direct methods.
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &["--mqtts-auth", "anonymous"]);
    let (device, module) = MODULE.split_once('/').unwrap();
    let token = sign(
        &KEY,
        &resource_uri("localhost", device, Some(module)),
        in_an_hour(),
    );
    let username = format!("localhost/{MODULE}/?api-version=2020-09-30");
    let with_will = |will_topic: &str| {
        let mut body = Vec::new();
        common::field(b"MQTT", &mut body);
        body.extend_from_slice(&[4, 0xCE, 0, 60]);
        for field in [MODULE, will_topic, "bye", &username, &token] {
            common::field(field.as_bytes(), &mut body);
        }
        common::packet(0x10, &body)
    };
    let own = "devices/edge/modules/tls/messages/events/";
    assert_eq!(connack_code(&spool, &with_will(own)).await, 0);
    let theirs = "devices/edge/modules/other/messages/events/";
    assert_eq!(connack_code(&spool, &with_will(theirs)).await, 5);
    assert_eq!(
        connack_code(&spool, &with_will("$iothub/twin/res/200/?$rid=1")).await,
        5
    );

    for topic in [own, "$iothub/methods/POST/reboot/?$rid=1"] {
        let (mut stream, accepted) = connect_tls(&spool, &connect_v311("plain", true)).await;
        assert_eq!(accepted, 0);
        stream
            .write_all(&publish_qos1_v311(1, topic, b"forged"))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
        )
        .await;
        assert!(
            closed.is_ok() && rest.is_empty(),
            "{topic}: refused, no PUBACK"
        );
    }
}

#[test]
fn a_connect_in_the_same_segment_as_the_handshakes_last_flight_is_answered() {
    // Goal: a client that sends its last handshake flight and its CONNECT in one write (one
    // TCP segment) gets its CONNACK: edgeHub 1.6.0 and 1.6.1 lost such connections. The
    // client is rustls driven by hand: the CONNECT is queued before the handshake ends, so
    // rustls writes it right behind the client's Finished, in the same buffer (TLS 1.3, where
    // the client's flight is the last; in TLS 1.2 the server's is, and the CONNECT follows).
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let spool = start_with_module(dir.path(), &[]);
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(spool.tls_ca.as_ref().unwrap()).unwrap();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        tls.writer()
            .write_all(&module_connect(in_an_hour()))
            .unwrap();
        let mut socket = std::net::TcpStream::connect(spool.tls_addr.unwrap()).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut writes = Vec::new();
        let mut plain = Vec::new();
        while plain.len() < 4 {
            // Everything rustls has to send goes out in one write: after the server's last
            // flight, that is the client's Finished with the CONNECT behind it.
            let mut out = Vec::new();
            while tls.wants_write() {
                tls.write_tls(&mut out).unwrap();
            }
            if !out.is_empty() {
                socket.write_all(&out).unwrap();
                writes.push((tls.is_handshaking(), out.len()));
            }
            if tls.read_tls(&mut socket).unwrap() == 0 {
                panic!("{version:?}: spool closed the connection; writes {writes:?}");
            }
            tls.process_new_packets().unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = tls.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(
            &plain[..4],
            &[0x20, 2, 0, 0],
            "{version:?}: CONNACK, accepted"
        );
        if version == &rustls::version::TLS13 {
            // The ClientHello, then one write: the client's Finished and the CONNECT.
            assert_eq!(writes.len(), 2, "{writes:?}");
        }
    }
}

#[tokio::test]
async fn a_session_made_before_its_client_was_an_identity_loses_what_it_may_not_hold() {
    // Goal: a client id that held a persistent session (subscribed to `plain/#`) before it was
    // registered as an identity resumes it as the identity without that subscription: the
    // identity keeps to its own topics, whatever its stored session says.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let (mut before, connack) = raw_connect(spool.addr, &connect_v311("edge/late", false)).await;
    assert_eq!(connack, vec![0, 0]);
    before
        .write_all(&subscribe_v311(1, "plain/#", 1))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut before).await,
        (0x90, vec![0, 1, 1]),
        "SUBACK"
    );
    drop(before);
    spool.kill();

    let added = std::process::Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["identity", "add", "edge/late", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let added = String::from_utf8(added.stdout).unwrap();
    let key = added
        .split(';')
        .find_map(|field| field.strip_prefix("SharedAccessKey="))
        .expect("a key");
    let key = BASE64.decode(key).unwrap();
    let spool = Spool::start(dir.path(), &[]);
    let token = sign(
        &key,
        &resource_uri("localhost", "edge", Some("late")),
        in_an_hour(),
    );
    let mut body = Vec::new();
    common::field(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 0xC0, 0, 60]); // username, password, persistent session
    let username = "localhost/edge/late/?api-version=2020-09-30";
    for field in ["edge/late", username, &token] {
        common::field(field.as_bytes(), &mut body);
    }
    let (mut stream, accepted) = connect_tls(&spool, &common::packet(0x10, &body)).await;
    assert_eq!(accepted, 0);

    let (mut publisher, _) = raw_connect(spool.addr, &connect_v311("plain-publisher", true)).await;
    publisher
        .write_all(&publish_qos1_v311(1, "plain/x", b"not for identities"))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut publisher).await,
        (0x40, vec![0, 1]),
        "PUBACK"
    );
    let delivered = tokio::time::timeout(
        std::time::Duration::from_millis(1500),
        read_packet(&mut stream),
    )
    .await;
    assert!(
        delivered.is_err(),
        "the old subscription is gone: {delivered:?}"
    );
}

/// A certificate with common name `cn` and its key, issued by `issuer` or self-signed (then a
/// CA, to issue others).
fn leaf_certificate(
    cn: &str,
    issuer: Option<&(rcgen::CertificateParams, rcgen::KeyPair)>,
) -> (
    CertificateDer<'static>,
    rcgen::CertificateParams,
    rcgen::KeyPair,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = match issuer {
        Some((issuer_params, issuer_key)) => {
            let issuer = rcgen::Issuer::new(issuer_params.clone(), issuer_key);
            params.signed_by(&key, &issuer).unwrap()
        }
        None => {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap()
        }
    };
    (cert.der().clone(), params, key)
}

/// A self-signed certificate that expired in 2020, and its key.
fn expired_certificate() -> (
    CertificateDer<'static>,
    rcgen::CertificateParams,
    rcgen::KeyPair,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    (cert.der().clone(), params, key)
}

/// A certificate's SHA-256 thumbprint, lower-case hex.
fn sha256_hex(certificate: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, certificate);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A CONNECT as device `device` with no password: a leaf device that proves itself with its
/// TLS certificate.
fn device_connect(device: &str) -> Vec<u8> {
    let mut body = Vec::new();
    common::field(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 0x82, 0, 60]); // username, clean session
    common::field(device.as_bytes(), &mut body);
    common::field(
        format!("localhost/{device}/?api-version=2020-09-30").as_bytes(),
        &mut body,
    );
    common::packet(0x10, &body)
}

/// The CONNACK code a TLS client presenting `certificate` (if any) gets for `connect`.
async fn connack_with_certificate(
    spool: &Spool,
    certificate: Option<(&CertificateDer<'static>, &rcgen::KeyPair)>,
    connect: &[u8],
) -> u8 {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(spool.tls_ca.as_ref().unwrap()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match certificate {
        Some((cert, key)) => {
            let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            builder
                .with_client_auth_cert(vec![cert.clone()], key)
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = TlsConnector::from(Arc::new(config));
    connect_with(&connector, spool, connect).await.1
}

#[tokio::test]
async fn leaf_devices_connect_with_their_certificates() {
    // Goal: a leaf device proves itself with a TLS client certificate instead of a SAS token
    // (contract §2.3): by the certificate's thumbprint, or by a chain to the client CA with
    // the device id as common name; a certificate that does not stand for the device it
    // names, or none, is refused (CONNACK 5).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    let ca = leaf_certificate("Leaf CA", None);
    let ca_file = dir.path().join("leaf-ca.pem");
    std::fs::write(&ca_file, ca.1.self_signed(&ca.2).unwrap().pem()).unwrap();
    let by_thumbprint = leaf_certificate("leaf-tp", None);
    let thumbprint = sha256_hex(&by_thumbprint.0).to_uppercase();
    let by_chain = leaf_certificate("leaf-ca", Some(&(ca.1.clone(), ca.2)));
    let expired = expired_certificate();
    let expired_thumbprint = sha256_hex(&expired.0);
    let ca = leaf_certificate("Leaf CA", None); // a stranger's CA, with the same name
    let stranger = leaf_certificate("leaf-ca", Some(&(ca.1, ca.2)));
    let identities = dir.path().join("identities.toml");
    std::fs::write(
        &identities,
        format!(
            "[[identities]]\nid = \"leaf-tp\"\nauth = {{ type = \"x509_thumbprint\", primary = \"{thumbprint}\" }}\n\
             [[identities]]\nid = \"leaf-ca\"\nauth = {{ type = \"x509_ca\" }}\n\
             [[identities]]\nid = \"leaf-old\"\nauth = {{ type = \"x509_thumbprint\", primary = \"{expired_thumbprint}\" }}\n"
        ),
    )
    .unwrap();
    let spool = Spool::start(
        &dir.path().join("data"),
        &[
            "--identities",
            identities.to_str().unwrap(),
            "--client-ca",
            ca_file.to_str().unwrap(),
        ],
    );
    let present = |(cert, _, key): &(
        CertificateDer<'static>,
        rcgen::CertificateParams,
        rcgen::KeyPair,
    )| { Some((cert.clone(), key.serialize_der())) };
    for (what, certificate, device, expected) in [
        ("its thumbprint", present(&by_thumbprint), "leaf-tp", 0),
        ("a chain to the client CA", present(&by_chain), "leaf-ca", 0),
        (
            "another device's certificate",
            present(&by_chain),
            "leaf-tp",
            5,
        ),
        ("no certificate", None, "leaf-tp", 5),
        ("a chain to another CA", present(&stranger), "leaf-ca", 5),
        (
            "a thumbprint device's certificate for a CA device",
            present(&by_thumbprint),
            "leaf-ca",
            5,
        ),
        ("its thumbprint, expired", present(&expired), "leaf-old", 5),
    ] {
        let key = certificate
            .as_ref()
            .map(|(_, der)| rcgen::KeyPair::try_from(der.as_slice()).unwrap());
        let presented = certificate.as_ref().map(|(cert, _)| cert).zip(key.as_ref());
        let code = connack_with_certificate(&spool, presented, &device_connect(device)).await;
        assert_eq!(code, expected, "{device} with {what}");
    }
}
