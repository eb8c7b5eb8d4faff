//! Identities: devices and modules, their credentials and status (edgehub-contract.md §2.4,
//! §2.5), and the identities file spool is seeded from.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;
use std::path::Path;

/// The longest device or module id IoT Hub allows.
pub const ID_CHARS_MAX: usize = 128;
/// Bytes of a symmetric key spool generates (IoT Hub's are 32 too).
pub const KEY_BYTES: usize = 32;

/// A device (`device`) or a module (`device/module`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityId {
    pub device: String,
    pub module: Option<String>,
}

/// Why an id, key or identities file was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{id:?} is not a device id or device/module id: {why}")]
    BadId { id: String, why: &'static str },
    #[error("identity {id}: {why}")]
    BadKey { id: IdentityId, why: String },
    #[error("identity {0} is listed twice")]
    Duplicate(IdentityId),
    #[error("cannot read the identities file {path}: {why}")]
    File { path: String, why: String },
}

impl IdentityId {
    /// Parses `device` or `device/module`. Ids follow IoT Hub's rules: 1 to 128 characters,
    /// ASCII letters, digits and `-.%_*?!(),:=@$'`; no `/`, which separates them in client
    /// ids and topics.
    ///
    /// # Errors
    /// `BadId`, saying why.
    pub fn parse(id: &str) -> Result<IdentityId, IdentityError> {
        let bad = |why| IdentityError::BadId {
            id: id.to_owned(),
            why,
        };
        let mut parts = id.split('/');
        let device = parts.next().unwrap_or_default();
        let module = parts.next();
        if parts.next().is_some() {
            return Err(bad("more than one '/'"));
        }
        for part in std::iter::once(device).chain(module) {
            if part.is_empty() || part.len() > ID_CHARS_MAX {
                return Err(bad("each id has 1 to 128 characters"));
            }
            let allowed = |c: char| c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(c);
            if !part.chars().all(allowed) {
                return Err(bad("ids are ASCII letters, digits and -.%_*?!(),:=@$'"));
            }
        }
        Ok(IdentityId {
            device: device.to_owned(),
            module: module.map(str::to_owned),
        })
    }

    /// The key it is stored under, and the MQTT client id it connects with.
    #[must_use]
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&id_string(&self.device, self.module.as_deref()))
    }
}

/// `device`, or `device/module`: how an identity is written (its client id, its key).
#[must_use]
pub fn id_string(device: &str, module: Option<&str>) -> String {
    match module {
        Some(module) => format!("{device}/{module}"),
        None => device.to_owned(),
    }
}

impl Serialize for IdentityId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdentityId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        IdentityId::parse(&id).map_err(serde::de::Error::custom)
    }
}

/// Whether an identity may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Enabled,
    Disabled,
}

/// How an identity proves itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Credentials {
    /// SAS tokens signed with either key (base64, as IoT Hub shows them).
    Sas { primary: String, secondary: String },
    /// SAS keys derived from its device's primary key and its generation id, as IoT Edge 1.1
    /// derives a module's keys (edgehub-contract.md §2.2): modules only. The registry fills
    /// them in, and derives them again whenever the device's keys change; an identities file
    /// leaves them out (`auth = { type = "derived" }`).
    Derived {
        #[serde(default)]
        primary: String,
        #[serde(default)]
        secondary: String,
    },
    /// A client certificate whose SHA-256 or SHA-1 thumbprint (hex) is one of these: leaf
    /// devices only.
    X509Thumbprint {
        primary: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secondary: Option<String>,
    },
    /// A client certificate whose common name is the device id and that chains to the trust
    /// bundle: leaf devices only.
    X509Ca,
}

impl Credentials {
    /// Two fresh random SAS keys.
    ///
    /// # Errors
    /// If the system's random source fails.
    pub fn new_sas() -> Result<Credentials, getrandom::Error> {
        Ok(Credentials::Sas {
            primary: new_key()?,
            secondary: new_key()?,
        })
    }
}

/// A device or module spool knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: IdentityId,
    #[serde(default)]
    pub status: Status,
    #[serde(rename = "auth")]
    pub credentials: Credentials,
    /// The module's generation id, for the workload API (IoT Edge sets one per deployment of
    /// a module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
}

impl Identity {
    /// A new identity with fresh random SAS keys.
    ///
    /// # Errors
    /// If the system's random source fails.
    pub fn with_new_keys(id: IdentityId) -> Result<Identity, getrandom::Error> {
        Ok(Identity {
            id,
            status: Status::Enabled,
            credentials: Credentials::new_sas()?,
            generation_id: None,
        })
    }

    /// Checks what the identity holds: keys are base64 and not empty, and X.509 credentials
    /// belong to devices (edgeHub refuses modules presenting certificates).
    ///
    /// # Errors
    /// `BadKey`, saying why.
    pub fn validate(&self) -> Result<(), IdentityError> {
        let bad = |why: String| IdentityError::BadKey {
            id: self.id.clone(),
            why,
        };
        match &self.credentials {
            Credentials::Derived { .. } if self.id.module.is_none() => {
                return Err(bad(
                    "only a module's keys are derived from its device's".into()
                ));
            }
            Credentials::Derived { .. } if self.generation_id.is_none() => {
                return Err(bad(
                    "derived keys need the module's generation_id, which they are derived with"
                        .into(),
                ));
            }
            // Left out, as an identities file does: the registry derives them (and checks
            // them then).
            Credentials::Derived { primary, secondary }
                if primary.is_empty() && secondary.is_empty() => {}
            Credentials::Sas { primary, secondary }
            | Credentials::Derived { primary, secondary } => {
                for (name, key) in [("primary", primary), ("secondary", secondary)] {
                    match BASE64.decode(key) {
                        Ok(bytes) if !bytes.is_empty() => {}
                        Ok(_) => return Err(bad(format!("the {name} key is empty"))),
                        Err(e) => return Err(bad(format!("the {name} key is not base64: {e}"))),
                    }
                }
            }
            Credentials::X509Thumbprint { .. } | Credentials::X509Ca
                if self.id.module.is_some() =>
            {
                return Err(bad(
                    "modules authenticate with SAS tokens, not certificates".into(),
                ));
            }
            Credentials::X509Thumbprint { primary, secondary } => {
                for thumbprint in std::iter::once(primary).chain(secondary) {
                    let hex = thumbprint.len() == 40 || thumbprint.len() == 64;
                    if !hex || !thumbprint.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(bad(format!(
                            "thumbprint {thumbprint:?} is not 40 or 64 hex digits"
                        )));
                    }
                }
            }
            Credentials::X509Ca => {}
        }
        Ok(())
    }

    /// The base64-decoded SAS keys, primary first; none for certificate identities.
    #[must_use]
    pub fn sas_keys(&self) -> Vec<Vec<u8>> {
        match &self.credentials {
            Credentials::Sas { primary, secondary }
            | Credentials::Derived { primary, secondary } => [primary, secondary]
                .into_iter()
                .filter_map(|key| BASE64.decode(key).ok())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The connection string a module or device is given (edgehub-contract.md §2.2 mode A):
    /// the IoT Hub host name it names in its tokens, and the gateway it connects to.
    #[must_use]
    pub fn connection_string(&self, hub_host: &str, gateway_host: &str) -> Option<String> {
        let (Credentials::Sas { primary, .. } | Credentials::Derived { primary, .. }) =
            &self.credentials
        else {
            return None;
        };
        let mut out = format!("HostName={hub_host};DeviceId={}", self.id.device);
        if let Some(module) = &self.id.module {
            out.push_str(&format!(";ModuleId={module}"));
        }
        out.push_str(&format!(
            ";SharedAccessKey={primary};GatewayHostName={gateway_host}"
        ));
        Some(out)
    }
}

/// A module's key as IoT Edge 1.1 derives it from its device's primary key (edgehub-contract.md
/// §2.2): HMAC-SHA256 over the module id, the key's name (`primary` or `secondary`) and the
/// generation id; base64.
#[must_use]
pub fn derive_module_key(
    device_key: &[u8],
    module: &str,
    key_name: &str,
    generation: &str,
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(device_key).expect("HMAC takes any key length");
    mac.update(module.as_bytes());
    mac.update(key_name.as_bytes());
    mac.update(generation.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// A fresh random symmetric key, base64.
///
/// # Errors
/// If the system's random source fails.
pub fn new_key() -> Result<String, getrandom::Error> {
    let mut key = [0u8; KEY_BYTES];
    getrandom::getrandom(&mut key)?;
    Ok(BASE64.encode(key))
}

/// The identities file (`--identities`): TOML or JSON, by its extension.
///
/// ```toml
/// [[identities]]
/// id = "myEdge/filter"
/// auth = { type = "sas", primary = "…", secondary = "…" }
/// ```
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitiesFile {
    #[serde(default)]
    pub identities: Vec<Identity>,
}

/// The forms an identities file is written in, by its name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileFormat {
    Toml,
    Json,
}

impl FileFormat {
    /// The form of the file at `path`: `.toml` or `.json`.
    fn of(path: &Path) -> Result<FileFormat, IdentityError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Ok(FileFormat::Toml),
            Some("json") => Ok(FileFormat::Json),
            _ => Err(IdentityError::File {
                path: path.display().to_string(),
                why: "its name must end in .toml or .json".into(),
            }),
        }
    }
}

impl IdentitiesFile {
    /// The file as text, in the form `path`'s name says (TOML without a path): what
    /// [`IdentitiesFile::read`] reads back (`spool identity export`).
    ///
    /// # Errors
    /// A name that is neither `.toml` nor `.json`, or identities that cannot be written.
    pub fn to_text(&self, path: Option<&Path>) -> Result<String, IdentityError> {
        let format = path.map_or(Ok(FileFormat::Toml), FileFormat::of)?;
        let error = |why: String| IdentityError::File {
            path: path.map(|p| p.display().to_string()).unwrap_or_default(),
            why,
        };
        match format {
            FileFormat::Json => {
                serde_json::to_string_pretty(self).map_err(|e| error(e.to_string()))
            }
            FileFormat::Toml => toml::to_string(self).map_err(|e| error(e.to_string())),
        }
    }

    /// Reads and checks the file: every identity valid, none listed twice.
    ///
    /// # Errors
    /// `File` for a file that cannot be read or parsed, or the identity that is wrong.
    pub fn read(path: &Path) -> Result<IdentitiesFile, IdentityError> {
        let file_error = |why: String| IdentityError::File {
            path: path.display().to_string(),
            why,
        };
        let format = FileFormat::of(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let file: IdentitiesFile = match format {
            FileFormat::Json => {
                serde_json::from_str(&text).map_err(|e| file_error(e.to_string()))?
            }
            FileFormat::Toml => toml::from_str(&text).map_err(|e| file_error(e.to_string()))?,
        };
        file.check()?;
        Ok(file)
    }

    /// Checks the identities, however they came: every one valid, none listed twice.
    ///
    /// # Errors
    /// The first identity that is wrong.
    pub fn check(&self) -> Result<(), IdentityError> {
        let mut seen = std::collections::BTreeSet::new();
        for identity in &self.identities {
            identity.validate()?;
            if !seen.insert(&identity.id) {
                return Err(IdentityError::Duplicate(identity.id.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: ids follow IoT Hub's rules, and a module id is its device's plus its own.
    #[test]
    fn ids_parse_as_iot_hub_names_them() {
        let module = IdentityId::parse("myEdge/$edgeHub").expect("a module");
        assert_eq!(
            (module.device.as_str(), module.module.as_deref()),
            ("myEdge", Some("$edgeHub"))
        );
        assert_eq!(module.to_string(), "myEdge/$edgeHub");
        assert_eq!(IdentityId::parse("leaf-1").expect("a device").module, None);
        for bad in ["", "/m", "d/", "d/m/x", "d m", "dé", &"x".repeat(129)] {
            assert!(IdentityId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    /// Goal: a new identity has two distinct 32-byte keys, and its connection string has the
    /// fields the SDKs read.
    #[test]
    fn a_new_identity_gets_keys_and_a_connection_string() {
        let id = IdentityId::parse("myEdge/filter").expect("id");
        let identity = Identity::with_new_keys(id).expect("random keys");
        identity.validate().expect("valid");
        let keys = identity.sas_keys();
        assert_eq!(keys.len(), 2);
        assert!(keys[0].len() == KEY_BYTES && keys[0] != keys[1]);
        let Credentials::Sas { primary, .. } = &identity.credentials else {
            panic!("SAS");
        };
        assert_eq!(
            identity
                .connection_string("hub.example", "spool")
                .expect("SAS"),
            format!(
                "HostName=hub.example;DeviceId=myEdge;ModuleId=filter;SharedAccessKey={primary};GatewayHostName=spool"
            )
        );
    }

    /// Goal: the identities file reads in TOML and JSON alike, and bad entries are refused
    /// with the identity named.
    #[test]
    fn the_identities_file_reads_in_toml_and_json() {
        let dir = tempfile::tempdir().expect("dir");
        let key = BASE64.encode([1u8; 32]);
        let toml_path = dir.path().join("ids.toml");
        std::fs::write(
            &toml_path,
            format!(
                "[[identities]]\nid = \"edge/filter\"\nauth = {{ type = \"sas\", primary = \"{key}\", secondary = \"{key}\" }}\n\n\
                 [[identities]]\nid = \"leaf\"\nstatus = \"disabled\"\nauth = {{ type = \"x509_ca\" }}\n"
            ),
        )
        .expect("write");
        let file = IdentitiesFile::read(&toml_path).expect("reads");
        assert_eq!(file.identities.len(), 2);
        assert_eq!(file.identities[1].status, Status::Disabled);
        let json_path = dir.path().join("ids.json");
        let json = format!(
            r#"{{"identities":[{{"id":"edge/filter","auth":{{"type":"sas","primary":"{key}","secondary":"{key}"}}}}]}}"#
        );
        std::fs::write(&json_path, json).expect("write");
        assert_eq!(
            IdentitiesFile::read(&json_path).expect("reads").identities[0],
            file.identities[0]
        );
        std::fs::write(
            &json_path,
            r#"{"identities":[{"id":"edge/m","auth":{"type":"x509_ca"}}]}"#,
        )
        .expect("write");
        let refused = IdentitiesFile::read(&json_path).expect_err("a module with a certificate");
        assert!(refused.to_string().contains("edge/m"), "{refused}");
        // Derived keys are left out, as the registry derives them; written back, the file
        // reads as it was.
        std::fs::write(
            &toml_path,
            "[[identities]]\nid = \"edge/d\"\ngeneration_id = \"g1\"\nauth = { type = \"derived\" }\n",
        )
        .expect("write");
        let derived = IdentitiesFile::read(&toml_path).expect("the documented form reads");
        let text = derived.to_text(Some(&toml_path)).expect("writes");
        std::fs::write(&toml_path, text).expect("write");
        let again = IdentitiesFile::read(&toml_path).expect("reads back");
        assert_eq!(again.identities, derived.identities);
    }
}
