//! TLS for the MQTTS and HTTPS listeners: the handshake, within a time limit; the server
//! certificate given by the operator, or, when none is given, a private CA and a server
//! certificate that spool generates on first start and keeps in the data directory, so the same
//! CA stays valid across restarts and clients can trust it once.

use crate::auth::x509::OfferClientCertificates;
use crate::files::write_durably;
use crate::limits::TLS_HANDSHAKE_TIMEOUT;
use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_rustls::TlsAcceptor;

/// Names every generated server certificate carries: IoT Edge modules reach the hub as
/// `edgehub`, local tools as `localhost`. The machine's host name is added at generation.
const GENERATED_SERVER_NAMES: [&str; 4] = ["localhost", "edgehub", "127.0.0.1", "::1"];

/// How long generated certificates are valid.
const GENERATED_VALIDITY_YEARS: i32 = 10;

/// Where the server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateSource {
    /// PEM files given by the operator: the certificate chain (leaf first) and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// Generated on first start under this directory, reused afterwards.
    Generated { dir: PathBuf },
}

/// The certificate files in use, for the operator to find (printed at start-up).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed a generated certificate: what clients must trust.
    pub generated_ca: Option<PathBuf>,
}

/// Completes the TLS handshake of a connection from `peer` within `TLS_HANDSHAKE_TIMEOUT`;
/// `None`, logged, if it fails or takes longer.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    socket: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(%peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// A TLS acceptor offering TLS 1.3 and 1.2 (the Azure IoT Python SDK speaks only 1.2).
///
/// # Errors
/// Unreadable or invalid PEM files, or a certificate that cannot be generated or written.
pub fn acceptor(source: &CertificateSource) -> anyhow::Result<(TlsAcceptor, TlsFiles)> {
    let files = match source {
        CertificateSource::Files { cert, key } => TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            generated_ca: None,
        },
        CertificateSource::Generated { dir } => generated_files(dir)?,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("read TLS certificate {}", files.cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "TLS certificate file {} holds no certificate",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("read TLS private key {}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Leaf devices may present a certificate; CONNECT decides whether it stands for them.
    let client_certificates = Arc::new(OfferClientCertificates::new(&provider));
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_client_cert_verifier(client_certificates)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "TLS certificate {} does not match key {}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    Ok((TlsAcceptor::from(Arc::new(config)), files))
}

/// Where the CA that spool generates in `dir` is: the file clients trust.
#[must_use]
pub fn generated_ca(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

impl CertificateSource {
    /// The file clients trust: the CA spool generates, or the operator's certificate chain
    /// (which must then hold its root for clients to build a path to it).
    #[must_use]
    pub fn trust_file(&self) -> PathBuf {
        match self {
            CertificateSource::Generated { dir } => generated_ca(dir),
            CertificateSource::Files { cert, .. } => cert.clone(),
        }
    }
}

/// The generated CA and server certificate in `dir`, created if the server certificate is not
/// there yet.
fn generated_files(dir: &Path) -> anyhow::Result<TlsFiles> {
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        generated_ca: Some(generated_ca(dir)),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("create TLS directory {}", dir.display()))?;
    let generated = generate().context("generate the TLS CA and server certificate")?;
    let ca_path = files.generated_ca.as_deref().expect("set above");
    // The CA's private key is not kept: nothing more is ever signed with it, and whoever
    // could read it could mint certificates that clients trusting this CA accept.
    write_durably(ca_path, generated.ca_cert.as_bytes(), false)?;
    write_durably(&files.key, generated.server_key.as_bytes(), true)?;
    // Written last: its presence means the set is complete.
    write_durably(&files.cert, generated.server_cert.as_bytes(), false)?;
    tracing::info!(ca = %ca_path.display(), "generated a TLS CA and server certificate");
    Ok(files)
}

struct Generated {
    ca_cert: String,
    server_cert: String,
    server_key: String,
}

fn generate() -> Result<Generated, rcgen::Error> {
    let year = current_year();
    let (not_before, not_after) = (
        date_time_ymd(year - 1, 1, 1),
        date_time_ymd(year + GENERATED_VALIDITY_YEARS, 1, 1),
    );

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "spool generated CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_cert_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names: Vec<String> = GENERATED_SERVER_NAMES.map(String::from).to_vec();
    if let Some(host) = host_name().filter(|h| !names.contains(h)) {
        names.push(host);
    }
    let mut server_params = CertificateParams::new(names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "edgehub");
    server_params.use_authority_key_identifier_extension = true;
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.not_before = not_before;
    server_params.not_after = not_after;
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    Ok(Generated {
        ca_cert: ca_cert_pem,
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
    })
}

fn current_year() -> i32 {
    const SECONDS_PER_YEAR: u64 = 31_556_952; // the Gregorian average
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + i32::try_from(seconds / SECONDS_PER_YEAR).unwrap_or(0)
}

/// The machine's host name, if it is a valid DNS name for a certificate.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| name.to_ascii_lowercase())
}
