//! Leaf devices that authenticate with an X.509 certificate (edgehub-contract.md §2.3): by its
//! thumbprint, or by a chain to the trust bundle with the device id as its common name.
//!
//! The TLS listener asks every client for a certificate and lets it go without one
//! ([`OfferClientCertificates`]): TLS proves only that the client holds the certificate's key.
//! Whether the certificate stands for an identity is decided at CONNECT, by the identity the
//! username names ([`CertificateCheck`]), so a module with a SAS token and a leaf device with a
//! certificate share the listener.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// Why a client's certificate does not stand for the identity it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("the client presented no certificate")]
    Missing,
    #[error("the certificate's thumbprint is neither of the identity's")]
    Thumbprint,
    #[error("the certificate expired")]
    Expired,
    #[error("the certificate does not chain to the trust bundle: {0}")]
    Chain(String),
    #[error("no trust bundle for certificate authentication is configured")]
    NoTrustBundle,
    #[error("the certificate's common name {found:?} is not the device id {expected:?}")]
    CommonName { expected: String, found: String },
}

/// A TLS client-certificate verifier that asks for a certificate, accepts the handshake with or
/// without one, and checks only that a client holds its certificate's key (the handshake
/// signature); see the module documentation.
#[derive(Debug)]
pub struct OfferClientCertificates {
    algorithms: WebPkiSupportedAlgorithms,
}

impl OfferClientCertificates {
    #[must_use]
    pub fn new(provider: &CryptoProvider) -> OfferClientCertificates {
        OfferClientCertificates {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for OfferClientCertificates {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Checked at CONNECT against the identity the client names.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks a client's certificate chain (leaf first) against an identity's X.509 credentials.
#[derive(Debug, Clone, Default)]
pub struct CertificateCheck {
    /// Verifies chains to the trust bundle, for CA mode; `None` when there is none.
    trust_bundle: Option<Arc<dyn ClientCertVerifier>>,
}

impl CertificateCheck {
    /// Checks chains against the CA certificates `roots`.
    ///
    /// # Errors
    /// `roots` holds no usable certificate.
    pub fn with_trust_bundle(roots: RootCertStore) -> Result<CertificateCheck, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(CertificateCheck {
            trust_bundle: Some(verifier),
        })
    }

    /// Whether the leaf's SHA-256 or SHA-1 thumbprint (hex, any case) is one of `thumbprints`.
    ///
    /// # Errors
    /// `Missing` or `Thumbprint`.
    pub fn thumbprint(
        chain: Option<&[CertificateDer<'_>]>,
        thumbprints: &[&str],
    ) -> Result<(), CertificateError> {
        let leaf = chain
            .and_then(<[_]>::first)
            .ok_or(CertificateError::Missing)?;
        let digests = [
            &ring::digest::SHA256,
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        ]
        .map(|algorithm| hex(ring::digest::digest(algorithm, leaf).as_ref()));
        let matches = thumbprints
            .iter()
            .any(|t| digests.iter().any(|d| d.eq_ignore_ascii_case(t)));
        matches.then_some(()).ok_or(CertificateError::Thumbprint)
    }

    /// Whether the chain leads to the trust bundle, now, and the leaf's common name is
    /// `device`.
    ///
    /// # Errors
    /// `Missing`, `NoTrustBundle`, `Chain` or `CommonName`.
    pub fn chain_for_device(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
        device: &str,
    ) -> Result<(), CertificateError> {
        let chain = chain
            .filter(|c| !c.is_empty())
            .ok_or(CertificateError::Missing)?;
        let verifier = self
            .trust_bundle
            .as_ref()
            .ok_or(CertificateError::NoTrustBundle)?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| CertificateError::Chain(e.to_string()))?;
        let found = common_name(&chain[0]).unwrap_or_default();
        if found != device {
            return Err(CertificateError::CommonName {
                expected: device.to_owned(),
                found,
            });
        }
        Ok(())
    }
}

/// When a chain's leaf certificate stops being valid (seconds since 1970), if it parses.
#[must_use]
pub fn not_after(chain: Option<&[CertificateDer<'_>]>) -> Option<u64> {
    let leaf = chain?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
    u64::try_from(parsed.validity().not_after.timestamp()).ok()
}

/// The subject's common name of a certificate, if it has one and it parses.
fn common_name(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let name = parsed.subject().iter_common_name().next()?;
    name.as_str().ok().map(str::to_owned)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn certificate(
        cn: &str,
        issuer: Option<(&CertificateParams, &KeyPair)>,
    ) -> (CertificateDer<'static>, CertificateParams, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if issuer.is_none() {
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let cert = match issuer {
            Some((issuer_params, issuer_key)) => {
                let issuer = Issuer::new(issuer_params.clone(), issuer_key);
                params.signed_by(&key, &issuer).expect("signed")
            }
            None => params.self_signed(&key).expect("self-signed"),
        };
        (cert.der().clone(), params, key)
    }

    /// Goal: a certificate stands for a device by its thumbprint (SHA-256 or SHA-1, any case),
    /// or by a chain to the trust bundle with the device id as common name; nothing else does.
    #[test]
    fn certificates_stand_for_the_devices_they_should() {
        let (ca, ca_params, ca_key) = certificate("Test CA", None);
        let (leaf, _, _) = certificate("leaf-1", Some((&ca_params, &ca_key)));
        let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &leaf).as_ref());
        let chain = [leaf.clone()];
        assert_eq!(
            CertificateCheck::thumbprint(Some(&chain), &[&sha256.to_uppercase()]),
            Ok(())
        );
        assert_eq!(
            CertificateCheck::thumbprint(Some(&chain), &["00"]),
            Err(CertificateError::Thumbprint)
        );
        assert_eq!(
            CertificateCheck::thumbprint(None, &[&sha256]),
            Err(CertificateError::Missing)
        );

        let mut roots = RootCertStore::empty();
        roots.add(ca).expect("root");
        let check = CertificateCheck::with_trust_bundle(roots).expect("check");
        assert_eq!(check.chain_for_device(Some(&chain), "leaf-1"), Ok(()));
        assert!(matches!(
            check.chain_for_device(Some(&chain), "leaf-2"),
            Err(CertificateError::CommonName { .. })
        ));
        let (stranger, _, _) = certificate("leaf-1", None);
        assert!(matches!(
            check.chain_for_device(Some(&[stranger]), "leaf-1"),
            Err(CertificateError::Chain(_))
        ));
        assert_eq!(
            CertificateCheck::default().chain_for_device(Some(&chain), "leaf-1"),
            Err(CertificateError::NoTrustBundle)
        );
    }
}
