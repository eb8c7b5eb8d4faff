//! Shared access signature (SAS) tokens, as IoT Hub and edgeHub define them
//! (edgehub-contract.md §2.1):
//!
//! ```text
//! SharedAccessSignature sr={URL-encoded resource URI}&sig={URL-encoded base64}&se={expiry}[&skn=…]
//! resource URI = {host}/devices/{device}[/modules/{module}]
//! signature    = base64(HMAC-SHA256(base64decode(key), sr as sent + "\n" + se as sent))
//! ```
//!
//! The signature covers `sr` exactly as sent (its percent-escapes keep their case), so the token
//! keeps it raw and decodes it only to read the audience. A signature is compared in constant
//! time, with the primary key and then the secondary. Expiry allows five minutes of clock skew,
//! as edgeHub does.

use super::identity::id_string;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

/// How far a token's expiry may lie in the past and still be accepted (edgeHub's
/// `MaxClockSkew`).
pub const CLOCK_SKEW_SECS: u64 = 300;
/// The longest token accepted, in bytes: far above what any SDK sends (about 200), so a
/// client cannot make the hub decode megabytes.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// What `encodeURIComponent` leaves alone (the SDKs encode resource URIs with it or its
/// equivalents): letters, digits and `-_.!~*'()`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Why a token was refused. The messages say what was wrong without echoing secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("the token is longer than {TOKEN_BYTES_MAX} bytes")]
    TooLong,
    #[error("not a shared access signature: expected \"SharedAccessSignature sr=…&sig=…&se=…\"")]
    NotSas,
    #[error("the token has no {0} field")]
    Missing(&'static str),
    #[error("the token's {field} field is malformed: {why}")]
    Malformed { field: &'static str, why: String },
    #[error(
        "the token expired at {expiry} (now {now}; {CLOCK_SKEW_SECS} s of clock skew are allowed)"
    )]
    Expired { expiry: u64, now: u64 },
    #[error("the token's signature matches neither key")]
    BadSignature,
    #[error("the token is for {audience}, not for {identity}")]
    WrongIdentity { audience: String, identity: String },
    #[error("the token is for host {host:?}, which is not one this hub answers to")]
    WrongHost { host: String },
}

/// A parsed token; verify it with [`SasToken::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// The resource URI exactly as sent, still percent-encoded: the signature covers it so.
    pub resource: String,
    /// The signature, decoded.
    pub signature: Vec<u8>,
    /// The expiry exactly as sent (the signature covers it so), and as seconds since 1970.
    pub expiry_raw: String,
    pub expiry: u64,
    /// The policy name; device and module tokens have none.
    pub key_name: Option<String>,
}

/// Whom a token is for: its host, and the device and module it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    pub host: String,
    pub device: String,
    pub module: Option<String>,
}

impl std::fmt::Display for Audience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&id_string(&self.device, self.module.as_deref()))
    }
}

impl SasToken {
    /// Parses a token as edgeHub does: `SharedAccessSignature` and one field list, fields split
    /// on `&` and `=`, names case-insensitive, `sr` kept raw, `sig`, `se` and `skn`
    /// percent-decoded. A field given twice is refused.
    ///
    /// # Errors
    /// What is wrong with the token.
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(SasError::TooLong);
        }
        let mut parts = token.split_whitespace();
        let (Some("SharedAccessSignature"), Some(fields), None) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(SasError::NotSas);
        };
        let (mut resource, mut signature, mut expiry, mut key_name) = (None, None, None, None);
        for field in fields.split('&') {
            let Some((name, value)) = field.split_once('=') else {
                return Err(SasError::NotSas);
            };
            let (name, slot) = match name.to_ascii_lowercase().as_str() {
                "sr" => ("sr", &mut resource),
                "sig" => ("sig", &mut signature),
                "se" => ("se", &mut expiry),
                "skn" => ("skn", &mut key_name),
                _ => continue, // unknown fields are ignored, as edgeHub does
            };
            if slot.replace(value).is_some() {
                return Err(malformed(name, "given twice"));
            }
        }
        let resource = resource.ok_or(SasError::Missing("sr"))?;
        let signature = decode("sig", signature.ok_or(SasError::Missing("sig"))?)?;
        let signature = BASE64
            .decode(signature)
            .map_err(|e| malformed("sig", &format!("not base64: {e}")))?;
        let expiry_raw = expiry.ok_or(SasError::Missing("se"))?;
        let expiry = decode("se", expiry_raw)?
            .parse::<u64>()
            .map_err(|_| malformed("se", "not a number of seconds"))?;
        let key_name = key_name.map(|name| decode("skn", name)).transpose()?;
        Ok(SasToken {
            resource: resource.to_owned(),
            signature,
            expiry_raw: expiry_raw.to_owned(),
            expiry,
            key_name,
        })
    }

    /// Whom the token is for: `sr` percent-decoded and split on `/` into
    /// `{host}/devices/{device}` or `{host}/devices/{device}/modules/{module}`. The ids are
    /// as decoded once; some SDK helpers encode them twice (see `same_id`).
    ///
    /// # Errors
    /// `Malformed` if `sr` has neither shape.
    pub fn audience(&self) -> Result<Audience, SasError> {
        let uri = decode("sr", &self.resource)?;
        let parts: Vec<&str> = uri.split('/').collect();
        let id = |part: &str| -> Result<String, SasError> {
            if part.is_empty() {
                return Err(malformed("sr", "an empty id"));
            }
            Ok(part.to_owned())
        };
        match parts.as_slice() {
            [host, "devices", device] => Ok(Audience {
                host: (*host).to_owned(),
                device: id(device)?,
                module: None,
            }),
            [host, "devices", device, "modules", module] => Ok(Audience {
                host: (*host).to_owned(),
                device: id(device)?,
                module: Some(id(module)?),
            }),
            _ => Err(malformed(
                "sr",
                "not {host}/devices/{device} or {host}/devices/{device}/modules/{module}",
            )),
        }
    }

    /// Checks the token for a client that connects as `device` (and `module`) at `now` (seconds
    /// since 1970): not expired beyond the clock skew, for that identity (ids compared without
    /// case, as edgeHub does) on one of `hosts` (also without case), and signed with one of
    /// `keys` (base64-decoded symmetric keys, primary first).
    ///
    /// # Errors
    /// The first check that failed, in that order.
    pub fn verify(
        &self,
        device: &str,
        module: Option<&str>,
        hosts: &[&str],
        keys: &[&[u8]],
        now: u64,
    ) -> Result<(), SasError> {
        if self.expiry.saturating_add(CLOCK_SKEW_SECS) < now {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now,
            });
        }
        let audience = self.audience()?;
        let same_identity = same_id(&audience.device, device)
            && match (&audience.module, module) {
                (Some(theirs), Some(ours)) => same_id(theirs, ours),
                (None, None) => true,
                _ => false,
            };
        if !same_identity {
            return Err(SasError::WrongIdentity {
                audience: audience.to_string(),
                identity: id_string(device, module),
            });
        }
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(&audience.host)) {
            return Err(SasError::WrongHost {
                host: audience.host,
            });
        }
        let signed = keys.iter().any(|key| {
            mac(key, &self.resource, &self.expiry_raw)
                .verify_slice(&self.signature)
                .is_ok()
        });
        if signed {
            Ok(())
        } else {
            Err(SasError::BadSignature)
        }
    }
}

/// The resource URI of an identity, encoded as the SDKs encode it: the whole
/// `{host}/devices/{device}[/modules/{module}]` as one URI component.
#[must_use]
pub fn resource_uri(host: &str, device: &str, module: Option<&str>) -> String {
    let uri = match module {
        Some(module) => format!("{host}/devices/{device}/modules/{module}"),
        None => format!("{host}/devices/{device}"),
    };
    utf8_percent_encode(&uri, URI_COMPONENT).to_string()
}

/// A token for `resource` (already encoded, see [`resource_uri`]) that expires at `expiry`
/// (seconds since 1970), signed with `key` (a base64-decoded symmetric key).
#[must_use]
pub fn sign(key: &[u8], resource: &str, expiry: u64) -> String {
    let expiry = expiry.to_string();
    let signature = BASE64.encode(mac(key, resource, &expiry).finalize().into_bytes());
    let signature = utf8_percent_encode(&signature, URI_COMPONENT);
    format!("SharedAccessSignature sr={resource}&sig={signature}&se={expiry}")
}

/// Whether an id from a token's audience (decoded once) is `id`, without case: as it stands
/// (the SDKs that encode the resource URI once, like the Python one) or decoded once more (the
/// C# helper encodes each id, then the whole URI), as edgeHub decodes it.
fn same_id(audience_id: &str, id: &str) -> bool {
    audience_id.eq_ignore_ascii_case(id)
        || percent_decode_str(audience_id)
            .decode_utf8()
            .is_ok_and(|twice| twice.eq_ignore_ascii_case(id))
}

/// The HMAC over what a token signs.
fn mac(key: &[u8], resource: &str, expiry: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(resource.as_bytes());
    mac.update(b"\n");
    mac.update(expiry.as_bytes());
    mac
}

fn decode(field: &'static str, value: &str) -> Result<String, SasError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| malformed(field, "its percent-escapes are not UTF-8"))
}

fn malformed(field: &'static str, why: &str) -> SasError {
    SasError::Malformed {
        field,
        why: why.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOST: &str = "myhub.azure-devices.net";
    const NOW: u64 = 1_800_000_000;

    fn key() -> Vec<u8> {
        (0u8..32).collect()
    }

    /// Goal: the token the contract gives as an example parses into its parts, with `sr` kept
    /// raw and the rest decoded.
    #[test]
    fn the_contract_example_parses() {
        let token = "SharedAccessSignature sr=test-srv.azure-devices.net%2Fdevices%2FTestDevice\
                     &sig=Mzv6sxyYH6WWfCpnYtkQBaF0IwfTPJFOULfWB80BEvQ%3D&se=1637291060";
        let parsed = SasToken::parse(token).expect("parses");
        assert_eq!(
            parsed.resource,
            "test-srv.azure-devices.net%2Fdevices%2FTestDevice"
        );
        assert_eq!(parsed.expiry, 1_637_291_060);
        assert_eq!(parsed.signature.len(), 32);
        assert_eq!(
            parsed.audience().expect("an audience"),
            Audience {
                host: "test-srv.azure-devices.net".into(),
                device: "TestDevice".into(),
                module: None,
            }
        );
    }

    /// Goal: a signature computed independently of `sign` (the formula of the contract, over
    /// `sr` as the SDKs send it) verifies, with the primary or the secondary key.
    #[test]
    fn a_module_token_verifies_with_either_key() {
        let resource = resource_uri(HOST, "myEdge", Some("filter"));
        assert_eq!(
            resource,
            "myhub.azure-devices.net%2Fdevices%2FmyEdge%2Fmodules%2Ffilter"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&key()).expect("key");
        mac.update(format!("{resource}\n{NOW}").as_bytes());
        let signature = BASE64.encode(mac.finalize().into_bytes());
        let token = format!(
            "SharedAccessSignature sr={resource}&sig={}&se={NOW}",
            utf8_percent_encode(&signature, URI_COMPONENT)
        );
        assert_eq!(token, sign(&key(), &resource, NOW));
        let parsed = SasToken::parse(&token).expect("parses");
        let other = [7u8; 32];
        let verify = |keys: &[&[u8]]| parsed.verify("myEdge", Some("filter"), &[HOST], keys, NOW);
        assert_eq!(verify(&[&key(), &other]), Ok(()));
        assert_eq!(verify(&[&other, &key()]), Ok(()), "the secondary key");
        assert_eq!(verify(&[&other]), Err(SasError::BadSignature));
    }

    /// Goal: each check refuses what it must, and says why.
    #[test]
    fn expired_misaddressed_and_malformed_tokens_are_refused() {
        let resource = resource_uri(HOST, "myEdge", Some("filter"));
        let token = SasToken::parse(&sign(&key(), &resource, NOW)).expect("parses");
        let keys: &[&[u8]] = &[&key()];
        let at = |now| token.verify("myEdge", Some("filter"), &[HOST], keys, now);
        assert_eq!(at(NOW + CLOCK_SKEW_SECS), Ok(()), "within the skew");
        assert!(matches!(
            at(NOW + CLOCK_SKEW_SECS + 1),
            Err(SasError::Expired { .. })
        ));
        let other_module = token.verify("myEdge", Some("other"), &[HOST], keys, NOW);
        assert!(matches!(other_module, Err(SasError::WrongIdentity { .. })));
        let as_device = token.verify("myEdge", None, &[HOST], keys, NOW);
        assert!(matches!(as_device, Err(SasError::WrongIdentity { .. })));
        let any_case = token.verify(
            "MYEDGE",
            Some("Filter"),
            &["MyHub.Azure-Devices.NET"],
            keys,
            NOW,
        );
        assert_eq!(any_case, Ok(()), "ids and hosts compare without case");
        let elsewhere = token.verify("myEdge", Some("filter"), &["edgehub"], keys, NOW);
        assert!(matches!(elsewhere, Err(SasError::WrongHost { .. })));
        for bad in [
            "",
            "SharedAccessSignature",
            "Bearer sr=a&sig=b&se=1",
            "SharedAccessSignature sr=a&sig=b&se=1 extra",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sig=AA%3D%3D&se=1",
            "SharedAccessSignature sr=a&sig=AA%3D%3D",
            "SharedAccessSignature sr=a&sig=AA%3D%3D&se=soon",
            "SharedAccessSignature sr=a&sig=not*base64&se=1",
            "SharedAccessSignature sr=a&sr=b&sig=AA%3D%3D&se=1",
        ] {
            assert!(SasToken::parse(bad).is_err(), "{bad:?} must be refused");
        }
        let long = format!("SharedAccessSignature sr={}&sig=AA&se=1", "a".repeat(5000));
        assert_eq!(SasToken::parse(&long), Err(SasError::TooLong));
    }

    /// Goal: field names are case-insensitive and unknown fields are ignored, as edgeHub reads
    /// them; ids encoded twice are decoded twice.
    #[test]
    fn field_names_ignore_case_and_ids_may_be_encoded_twice() {
        let token = "SharedAccessSignature SR=hub%2Fdevices%2Fd%25201%2Fmodules%2Fm\
                     &Sig=AA%3D%3D&SE=5&x=y";
        let parsed = SasToken::parse(token).expect("parses");
        let audience = parsed.audience().expect("an audience");
        assert_eq!(
            (audience.device.as_str(), audience.module.as_deref()),
            ("d%201", Some("m"))
        );
        assert!(same_id(&audience.device, "d 1"), "decoded twice");
        assert!(same_id(&audience.device, "D%201"), "decoded once");
    }

    proptest! {
        /// Goal: any identity IoT Hub allows (`IdentityId`'s characters, `%` included) and any
        /// expiry round-trip through `sign`, `parse` and `verify`.
        #[test]
        fn signed_tokens_verify(
            device in "[A-Za-z0-9.%_*?!(),:=@$'-]{1,20}",
            module in proptest::option::of("[A-Za-z0-9.%_*?!(),:=@$'-]{1,20}"),
            expiry in 0u64..4_000_000_000,
            key in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let resource = resource_uri(HOST, &device, module.as_deref());
            let token = SasToken::parse(&sign(&key, &resource, expiry)).expect("parses");
            prop_assert_eq!(
                token.verify(&device, module.as_deref(), &[HOST], &[&key], expiry),
                Ok(())
            );
            let mut flipped = key.clone();
            flipped[0] ^= 1;
            prop_assert_eq!(
                token.verify(&device, module.as_deref(), &[HOST], &[&flipped], expiry),
                Err(SasError::BadSignature)
            );
        }

        /// Goal: arbitrary input never panics the parser; it parses or is refused.
        #[test]
        fn arbitrary_input_is_parsed_or_refused(input in ".{0,300}") {
            if let Ok(token) = SasToken::parse(&input) {
                let _ = token.audience();
                let _ = token.verify("d", None, &[HOST], &[b"k"], NOW);
            }
            let input = format!("SharedAccessSignature {input}");
            if let Ok(token) = SasToken::parse(&input) {
                let _ = token.audience();
            }
        }
    }
}
