//! Helpers for the broker's black-box tests: a real `spool serve` process on a free port, and
//! rumqttc clients.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

/// A `spool serve` child process; killed (SIGKILL) when dropped.
pub struct Spool {
    child: Child,
    pub addr: SocketAddr,
    /// The MQTTS listener, unless disabled by `extra_args`.
    pub tls_addr: Option<SocketAddr>,
    /// The generated CA certificate, when spool generated one.
    pub tls_ca: Option<PathBuf>,
    /// The admin API, unless disabled by `extra_args`.
    pub admin: Option<SocketAddr>,
    /// The HTTPS listener (direct methods), when `extra_args` enable it.
    pub https: Option<SocketAddr>,
    pub data_dir: PathBuf,
}

impl Spool {
    /// Starts spool on ephemeral ports (MQTT and MQTTS) with its data in `data_dir`.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Spool {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--mqtt-bind", "127.0.0.1:0", "--mqtts-bind", "127.0.0.1:0"])
            .args(["--admin-bind", "127.0.0.1:0"])
            .args(extra_args)
            // `SPOOL_TEST_LOG=debug cargo test ...` shows what the broker did.
            .env(
                "SPOOL_LOG",
                std::env::var("SPOOL_TEST_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut tls_addr, mut tls_ca, mut admin) = (None, None, None, None);
        let mut https = None;
        // spool prints its listeners and certificate paths, then its data directory.
        loop {
            let line = lines
                .next()
                .expect("spool exited before listening")
                .unwrap();
            if let Some(found) = line.strip_prefix("spool: MQTT listening on ") {
                addr = Some(found.parse().unwrap());
            } else if let Some(found) = line.strip_prefix("spool: MQTTS listening on ") {
                tls_addr = Some(found.parse().unwrap());
            } else if let Some(found) = line.strip_prefix("spool: TLS CA certificate") {
                tls_ca = found.rsplit(' ').next().map(PathBuf::from);
            } else if let Some(found) = line.strip_prefix("spool: admin API on ") {
                admin = Some(found.parse().unwrap());
            } else if let Some(found) =
                line.strip_prefix("spool: HTTPS (direct methods) listening on ")
            {
                https = Some(found.parse().unwrap());
            } else if line.starts_with("spool: data in ") {
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Spool {
            child,
            addr: addr.expect("the MQTT listener is enabled"),
            tls_addr,
            tls_ca,
            admin,
            https,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Stops the process with SIGTERM and returns its exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `spool serve` flags for the smallest log a quota allows: two segments of 1.3 MB, with
/// packets of up to 64 KiB.
pub const SMALL_LOG: [&str; 6] = [
    "--max-packet-size",
    "65536",
    "--wal-segment-bytes",
    "1300000",
    "--wal-quota-bytes",
    "2600000",
];

/// What a v4 test client saw.
#[derive(Debug)]
pub enum Seen {
    Publish(rumqttc::Publish),
    ConnAck(rumqttc::ConnAck),
    SubAck(rumqttc::SubAck),
    PubAck(u16),
    PubComp(u16),
    Disconnected(String),
}

/// An MQTT 3.1.1 client whose event loop runs in a task; what it sees arrives on `events`.
pub struct Client {
    pub client: rumqttc::AsyncClient,
    pub events: mpsc::UnboundedReceiver<Seen>,
}

pub fn options(addr: SocketAddr, client_id: &str, clean: bool) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_clean_session(clean);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Writes `identities.toml` in `dir` for `spool serve --identities`: each of `ids`
/// (`device/module`) with `key` as both SAS keys. Returns its path.
pub fn identities_file(dir: &Path, ids: &[&str], key: &[u8]) -> PathBuf {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let identities: String = ids
        .iter()
        .map(|id| {
            format!(
                "[[identities]]\nid = \"{id}\"\nauth = {{ type = \"sas\", primary = \"{key}\", secondary = \"{key}\" }}\n"
            )
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("identities.toml");
    std::fs::write(&path, identities).unwrap();
    path
}

/// The options of module `id` (`device/module`): its IoT Hub username and a SAS token signed
/// with `key` for host `localhost`, valid for an hour.
pub fn module_options(addr: SocketAddr, id: &str, key: &[u8], clean: bool) -> rumqttc::MqttOptions {
    let token = sas_token(id, key);
    let mut options = options(addr, id, clean);
    options.set_credentials(format!("localhost/{id}/?api-version=2020-09-30"), token);
    options
}

/// A SAS token of module `id` (`device/module`) signed with `key` for host `localhost`, valid
/// for an hour.
pub fn sas_token(id: &str, key: &[u8]) -> String {
    let (device, module) = id.split_once('/').unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let expiry = now.unwrap().as_secs() + 3600;
    let audience = spool_broker::auth::sas::resource_uri("localhost", device, Some(module));
    spool_broker::auth::sas::sign(key, &audience, expiry)
}

/// A TLS client trusting only `ca` (a PEM file) and speaking only `version`.
pub fn tls_connector(
    ca: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` through `connector`, asking for server `name`.
pub async fn tls_connect(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    connector.connect(name, socket).await
}

/// Connects and runs the event loop until the connection ends (no reconnection).
pub fn connect(options: rumqttc::MqttOptions) -> Client {
    let (client, mut event_loop) = rumqttc::AsyncClient::new(options, 1000);
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let seen = match event_loop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => Seen::Publish(p),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c))) => Seen::ConnAck(c),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(s))) => Seen::SubAck(s),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a))) => Seen::PubAck(a.pkid),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubComp(c))) => Seen::PubComp(c.pkid),
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(Seen::Disconnected(e.to_string()));
                    return;
                }
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    Client { client, events }
}

impl Client {
    /// Queues a publish (not retained) in the client; its PUBACK, if any, comes as an event.
    pub async fn publish(&self, topic: &str, qos: rumqttc::QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .unwrap();
    }

    /// The next event, failing the test after `secs` seconds.
    pub async fn next(&mut self, secs: u64) -> Seen {
        tokio::time::timeout(Duration::from_secs(secs), self.events.recv())
            .await
            .expect("timed out waiting for the broker")
            .expect("event loop ended")
    }

    /// Waits for the CONNACK; returns its session-present flag.
    pub async fn connected(&mut self) -> bool {
        match self.next(10).await {
            Seen::ConnAck(ack) => {
                assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
                ack.session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        loop {
            match self.next(10).await {
                Seen::SubAck(_) => return,
                Seen::Publish(_) | Seen::PubAck(_) => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Waits for `count` PUBACKs or PUBCOMPs (skipping other events).
    pub async fn acks(&mut self, count: u64) {
        let mut acks = 0;
        while acks < count {
            if let Seen::PubAck(_) | Seen::PubComp(_) = self.next(10).await {
                acks += 1;
            }
        }
    }

    /// Collects `count` publishes (skipping other events).
    pub async fn publishes(&mut self, count: usize) -> Vec<rumqttc::Publish> {
        let mut seen = Vec::with_capacity(count);
        while seen.len() < count {
            if let Seen::Publish(p) = self.next(20).await {
                seen.push(p);
            }
        }
        seen
    }
}

/// MQTT variable byte integer.
pub fn varint(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return;
        }
    }
}

/// A whole packet: fixed header byte, remaining length, body.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// An MQTT string or binary field: u16 length, bytes.
pub fn field(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(bytes);
}

/// CONNECT, MQTT 3.1.1, keep-alive 60.
pub fn connect_v311(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    field(b"MQTT", &mut body);
    body.extend_from_slice(&[4, if clean { 2 } else { 0 }, 0, 60]);
    field(client_id.as_bytes(), &mut body);
    packet(0x10, &body)
}

/// CONNECT, MQTT 3.1.1, clean, keep-alive 60, with a username and password (an IoT Hub
/// client's, say).
pub fn connect_v311_as(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let mut body = Vec::new();
    field(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 0xC2, 0, 60]);
    field(client_id.as_bytes(), &mut body);
    field(username.as_bytes(), &mut body);
    field(password.as_bytes(), &mut body);
    packet(0x10, &body)
}

/// SUBSCRIBE (MQTT 3.1.1) to one filter.
pub fn subscribe_v311(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    field(filter.as_bytes(), &mut body);
    body.push(qos);
    packet(0x82, &body)
}

/// PUBLISH at QoS 1 (MQTT 3.1.1).
pub fn publish_qos1_v311(packet_id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    publish_v311(1, false, packet_id, topic, payload)
}

/// PUBLISH at QoS 1 or 2 (MQTT 3.1.1), with DUP set if `dup`.
pub fn publish_v311(qos: u8, dup: bool, packet_id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    field(topic.as_bytes(), &mut body);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x30 | qos << 1 | u8::from(dup) << 3, &body)
}

/// PUBLISH at QoS 1 or 2 (MQTT 5), no properties.
pub fn publish_v5(qos: u8, dup: bool, packet_id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    field(topic.as_bytes(), &mut body);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.push(0); // no properties
    body.extend_from_slice(payload);
    packet(0x30 | qos << 1 | u8::from(dup) << 3, &body)
}

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

/// PUBACK, PUBREC, PUBREL or PUBCOMP (the constants above) for `packet_id`.
pub fn ack(first_byte: u8, packet_id: u16) -> Vec<u8> {
    packet(first_byte, &packet_id.to_be_bytes())
}

/// Reads one whole packet: its fixed header byte and body.
pub async fn read_packet<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let read = async {
        let first = stream.read_u8().await.unwrap();
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let byte = stream.read_u8().await.unwrap();
            len |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        stream.read_exact(&mut body).await.unwrap();
        (first, body)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a packet within 10 s")
}

/// Opens a raw TCP connection and sends `connect`; returns the stream and the CONNACK's body
/// (acknowledge flags, reason code, then MQTT 5 properties).
pub async fn raw_connect(addr: SocketAddr, connect: &[u8]) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(connect).await.unwrap();
    let (kind, connack) = read_packet(&mut stream).await;
    assert_eq!(kind, 0x20, "CONNACK");
    (stream, connack)
}

/// CONNECT, MQTT 5, clean start, keep-alive 60, no properties.
pub fn connect_v5(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    field(b"MQTT", &mut body);
    body.extend_from_slice(&[5, 2, 0, 60, 0]);
    field(client_id.as_bytes(), &mut body);
    packet(0x10, &body)
}

/// SUBSCRIBE (MQTT 5) to one filter with a raw options byte
/// (qos | no_local << 2 | retain_as_published << 3 | retain_handling << 4).
pub fn subscribe_v5(packet_id: u16, filter: &str, options: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0); // no properties
    field(filter.as_bytes(), &mut body);
    body.push(options);
    packet(0x82, &body)
}

/// Publishes a `StreamingPublisher` sends ahead of their PUBACKs (below the 1024 spool allows a
/// 3.1.1 client).
const STREAM_WINDOW: usize = 256;

/// A raw MQTT 3.1.1 client (its id is `topic`) publishing messages 1, 2, ... to `topic` at QoS 1
/// (payload = packet id, big-endian), `STREAM_WINDOW` ahead of their PUBACKs, recording the
/// PUBACKs.
pub struct StreamingPublisher {
    pub acked: Arc<Mutex<Vec<u16>>>,
    tasks: [JoinHandle<()>; 2],
}

impl StreamingPublisher {
    pub async fn start(addr: SocketAddr, topic: &'static str) -> StreamingPublisher {
        let (stream, _) = raw_connect(addr, &connect_v311(topic, true)).await;
        let (mut reader, mut writer) = stream.into_split();
        let window = Arc::new(Semaphore::new(STREAM_WINDOW));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let publishing = tokio::spawn({
            let window = Arc::clone(&window);
            async move {
                for n in 1..=u16::MAX {
                    window.acquire().await.unwrap().forget();
                    let publish = publish_v311(1, false, n, topic, &n.to_be_bytes());
                    if writer.write_all(&publish).await.is_err() {
                        return; // the server closed the connection after the power loss
                    }
                }
            }
        });
        let reading = tokio::spawn({
            let acked = Arc::clone(&acked);
            async move {
                let mut puback = [0u8; 4];
                while reader.read_exact(&mut puback).await.is_ok() {
                    assert_eq!(puback[..2], [0x40, 2], "only PUBACKs come back");
                    let packet_id = u16::from_be_bytes([puback[2], puback[3]]);
                    acked.lock().unwrap().push(packet_id);
                    window.add_permits(1);
                }
            }
        });
        StreamingPublisher {
            acked,
            tasks: [publishing, reading],
        }
    }

    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }

    /// Stops publishing and reads until the server closes the connection (within `within`):
    /// then every PUBACK it sent has been read. Returns the packet ids acknowledged.
    pub async fn acknowledged_until_closed(self, within: Duration) -> Vec<u16> {
        let [publishing, reading] = self.tasks;
        publishing.abort();
        let closed = tokio::time::timeout(within, reading).await;
        assert!(closed.is_ok(), "the server closed the connection");
        self.acked.lock().unwrap().clone()
    }
}

/// A test schedule's choices, all from one seed, so that a failing seed replays.
pub struct SeededRng(proptest::test_runner::TestRng);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let algorithm = proptest::test_runner::RngAlgorithm::ChaCha;
        SeededRng(proptest::test_runner::TestRng::from_seed(algorithm, &bytes))
    }

    pub fn next_u64(&mut self) -> u64 {
        proptest::prelude::Rng::next_u64(&mut self.0)
    }

    /// A number below `bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// An index into something of `len` items.
    pub fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap()
    }
}
