//! spool's configuration: command-line flags, `SPOOL_*` environment variables and a `spool.toml`
//! file, in that order of precedence, over safe defaults.
//!
//! Each setting is defined once, in the `settings!` list below: its doc, its type, its default
//! and its environment variable. The macro makes the `spool serve` flag (the name with `-` for
//! `_`), the `spool.toml` key (the name), the resolved value and a row of [`SETTINGS`], from
//! which a test checks that the README documents every one.

use crate::auth::authenticator::ListenerAuth;
use crate::tls::CertificateSource;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a setting is, for documentation: one row of the README's table.
#[derive(Debug, Clone, Copy)]
pub struct SettingDoc {
    /// The `spool.toml` key; the flag is `--` and this with `-` for `_`.
    pub key: &'static str,
    pub env: &'static str,
    /// The default as written on the command line; empty when there is none.
    pub default: &'static str,
    pub doc: &'static str,
}

macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $name:ident: $type:ty = $default:literal, env $env:literal;
    )+) => {
        /// `spool serve` options. Every one is also a `SPOOL_*` variable and a key of
        /// `spool.toml`.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct ServeArgs {
            /// A TOML file with any of these settings (keys as the flags, with `_` for `-`).
            #[arg(long, env = "SPOOL_CONFIG")]
            pub config: Option<PathBuf>,
            $(
                #[arg(long, env = $env, help = flag_help(concat!($($doc),+), $default))]
                pub $name: Option<$type>,
            )+
        }

        /// The same settings as they appear in `spool.toml`.
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileSettings {
            $($name: Option<$type>,)+
        }

        /// The resolved settings, as given or by default.
        #[derive(Debug, Clone)]
        pub struct Settings {
            $($(#[doc = $doc])+ pub $name: $type,)+
        }

        impl Settings {
            /// Flags and environment (merged by clap) over the file over the defaults.
            fn merge(args: ServeArgs, file: FileSettings) -> anyhow::Result<Settings> {
                Ok(Settings {
                    $($name: match args.$name.or(file.$name) {
                        Some(value) => value,
                        None => $default.parse().map_err(|e| {
                            anyhow::anyhow!("default of {}: {e}", stringify!($name))
                        })?,
                    },)+
                })
            }
        }

        /// Every setting, in the order of `spool serve --help`.
        pub const SETTINGS: &[SettingDoc] = &[$(SettingDoc {
            key: stringify!($name),
            env: $env,
            default: $default,
            doc: concat!($($doc),+).trim_ascii(),
        },)+];
    };
}

/// A flag's help: its doc, and its default when it has one.
fn flag_help(doc: &str, default: &str) -> String {
    match default {
        "" => doc.trim().to_string(),
        default => format!("{} [default: {default}]", doc.trim()),
    }
}

settings! {
    /// Where the write-ahead log and metadata live.
    data_dir: PathBuf = "spool-data", env "SPOOL_DATA_DIR";
    /// Address of the plain MQTT listener; empty disables it.
    mqtt_bind: String = "127.0.0.1:1883", env "SPOOL_MQTT_BIND";
    /// Address of the MQTT-over-TLS listener; empty disables it.
    mqtts_bind: String = "127.0.0.1:8883", env "SPOOL_MQTTS_BIND";
    /// Address of the HTTPS listener for module-to-module direct methods (edgeHub's
    /// POST /twins/{device}/modules/{module}/methods), with the MQTTS certificate; the SDKs
    /// call port 443 of their gateway host; empty disables it.
    https_bind: String = "", env "SPOOL_HTTPS_BIND";
    /// PEM certificate chain (leaf first) for MQTTS, with --tls-key; without them spool
    /// generates a CA and a server certificate in <data-dir>/tls on first start.
    tls_cert: PathBuf = "", env "SPOOL_TLS_CERT";
    /// PEM private key of --tls-cert.
    tls_key: PathBuf = "", env "SPOOL_TLS_KEY";
    /// PEM CA certificates that leaf devices' certificates must chain to (X.509 CA mode);
    /// without it, CA mode refuses every certificate (thumbprints still work).
    client_ca: PathBuf = "", env "SPOOL_CLIENT_CA";
    /// Who may connect on the plain MQTT listener: anonymous (anyone; IoT Hub credentials,
    /// when given, are checked all the same) or identity (an IoT Hub username and SAS token).
    mqtt_auth: ListenerAuth = "anonymous", env "SPOOL_MQTT_AUTH";
    /// Who may connect on the MQTTS listener: identity or anonymous, as for --mqtt-auth.
    mqtts_auth: ListenerAuth = "identity", env "SPOOL_MQTTS_AUTH";
    /// The IoT Hub host name modules name in their usernames and SAS tokens.
    iothub_hostname: String = "localhost", env "SPOOL_IOTHUB_HOSTNAME";
    /// The host name modules connect to (it must be in the server certificate); SAS tokens
    /// naming it are accepted too.
    gateway_hostname: String = "localhost", env "SPOOL_GATEWAY_HOSTNAME";
    /// A TOML or JSON file of devices and modules added to (or replaced in) the identity
    /// registry at start; `spool identity` manages the registry too.
    identities: PathBuf = "", env "SPOOL_IDENTITIES";
    /// Address of the admin API (gRPC, spool.admin.v1), which `spool identity` uses while a
    /// server runs; empty disables it. Bind it to loopback or a trusted network only.
    admin_bind: String = "127.0.0.1:50051", env "SPOOL_ADMIN_BIND";
    /// Where spool serves IoT Edge's workload API, for modules started with the IOTEDGE_*
    /// variables: one unix socket per module of the edge device, <dir>/<module>/workload.sock,
    /// whose directory only that module's container mounts; empty: off.
    workload_dir: PathBuf = "", env "SPOOL_WORKLOAD_DIR";
    /// A deployment manifest (JSON: a whole deployment, the $edgeHub twin or its desired
    /// properties, schema 1.0 to 1.3) whose routes send devices' and modules' telemetry to
    /// module inputs and $upstream; none: telemetry reaches MQTT subscribers only.
    deployment: PathBuf = "", env "SPOOL_DEPLOYMENT";
    /// The edge device's id: routes deliver to the inputs of its modules. By default, the
    /// device of the registry's modules, when they all have one.
    device_id: String = "", env "SPOOL_DEVICE_ID";
    /// The most concurrent client connections.
    max_connections: u32 = "10000", env "SPOOL_MAX_CONNECTIONS";
    /// The largest MQTT packet accepted, in bytes.
    max_packet_size: u32 = "1048576", env "SPOOL_MAX_PACKET_SIZE";
    /// Messages in flight towards one client, and the receive maximum announced to clients.
    max_inflight: u16 = "64", env "SPOOL_MAX_INFLIGHT";
    /// Sessions kept, connected or persistent and offline; a CONNECT that would create one
    /// more is refused (MQTT 5 0x97).
    max_sessions: usize = "100000", env "SPOOL_MAX_SESSIONS";
    /// Messages a session keeps; beyond it the oldest are dropped and counted (queue_full).
    session_queue_max: usize = "100000", env "SPOOL_SESSION_QUEUE_MAX";
    /// Bytes of messages a session keeps; beyond it the oldest are dropped and counted
    /// (queue_full); 0: no limit but the log's quota.
    session_queue_max_bytes: u64 = "0", env "SPOOL_SESSION_QUEUE_MAX_BYTES";
    /// Messages a route endpoint (a module input or $upstream, at one priority) keeps; beyond
    /// it the oldest are dropped and counted (queue_full); 0: no limit but the messages' time
    /// to live and the log's quota, as in edgeHub.
    endpoint_queue_max: usize = "0", env "SPOOL_ENDPOINT_QUEUE_MAX";
    /// Bytes of messages a route endpoint keeps, as --endpoint-queue-max; 0: no limit.
    endpoint_queue_max_bytes: u64 = "0", env "SPOOL_ENDPOINT_QUEUE_MAX_BYTES";
    /// The most bytes the write-ahead log may use; at the quota publishers are held back,
    /// nothing is dropped.
    wal_quota_bytes: u64 = "10737418240", env "SPOOL_WAL_QUOTA_BYTES";
    /// Bytes the data directory's file system keeps free: below it publishers are held back
    /// as at the quota, so the log and the metadata store always have room to work and the
    /// hub keeps delivering (0 turns it off).
    disk_free_min_bytes: u64 = "16777216", env "SPOOL_DISK_FREE_MIN_BYTES";
    /// Size of a write-ahead log segment; old messages are freed a whole segment at a time,
    /// and the quota must hold two.
    wal_segment_bytes: u64 = "67108864", env "SPOOL_WAL_SEGMENT_BYTES";
    /// Seconds a persistent MQTT 3.1.1 session outlives its connection.
    session_expiry_secs: u64 = "604800", env "SPOOL_SESSION_EXPIRY_SECS";
    /// The longest keep-alive, in seconds, an MQTT 5 client gets: a longer one, or none (0),
    /// is replaced by this one in CONNACK (server keep-alive).
    max_keep_alive: u16 = "65535", env "SPOOL_MAX_KEEP_ALIVE";
}

/// The resolved configuration: the settings, with what follows from them.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    /// `None` when disabled.
    pub mqtt_bind: Option<String>,
    /// `None` when disabled.
    pub mqtts_bind: Option<String>,
    /// `None` when disabled.
    pub https_bind: Option<String>,
    /// `None` when disabled.
    pub admin_bind: Option<String>,
    pub tls_certificate: CertificateSource,
    pub session_expiry_v311: Duration,
}

impl Config {
    /// Resolves flags and environment (already merged by clap) over the file over defaults.
    ///
    /// # Errors
    /// An unreadable or invalid file, or values out of range.
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let settings = Settings::merge(args, file)?;
        let given = |path: &Path| !path.as_os_str().is_empty();
        let tls_certificate = match (given(&settings.tls_cert), given(&settings.tls_key)) {
            (true, true) => CertificateSource::Files {
                cert: settings.tls_cert.clone(),
                key: settings.tls_key.clone(),
            },
            (false, false) => CertificateSource::Generated {
                dir: settings.data_dir.join("tls"),
            },
            _ => anyhow::bail!("tls_cert and tls_key must be given together"),
        };
        let enabled = |bind: &String| Some(bind.clone()).filter(|bind| !bind.is_empty());
        let config = Config {
            mqtt_bind: enabled(&settings.mqtt_bind),
            mqtts_bind: enabled(&settings.mqtts_bind),
            https_bind: enabled(&settings.https_bind),
            admin_bind: enabled(&settings.admin_bind),
            tls_certificate,
            session_expiry_v311: Duration::from_secs(settings.session_expiry_secs),
            settings,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let settings = &self.settings;
        anyhow::ensure!(
            settings.max_connections > 0,
            "max_connections must be positive"
        );
        anyhow::ensure!(settings.max_inflight > 0, "max_inflight must be positive");
        anyhow::ensure!(settings.max_sessions > 0, "max_sessions must be positive");
        anyhow::ensure!(
            settings.max_keep_alive > 0,
            "max_keep_alive must be positive"
        );
        anyhow::ensure!(
            settings.session_queue_max > 0,
            "session_queue_max must be positive"
        );
        anyhow::ensure!(
            (64..=16 << 20).contains(&settings.max_packet_size),
            "max_packet_size must be between 64 bytes and 16 MiB"
        );
        Ok(())
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: every default parses as its setting's type (a bad one would only show when a
    /// user left that setting out).
    #[test]
    fn the_defaults_resolve() {
        let config = Config::resolve(ServeArgs::default()).expect("defaults resolve");
        assert_eq!(config.settings.max_inflight, 64);
        assert_eq!(config.mqtt_bind.as_deref(), Some("127.0.0.1:1883"));
        assert!(matches!(
            config.tls_certificate,
            CertificateSource::Generated { .. }
        ));
    }

    /// Goal: a flag wins over the file, the file over the default, and an unknown key in the
    /// file is an error that names it.
    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("spool.toml");
        std::fs::write(
            &path,
            "max_inflight = 8\nmqtt_bind = \"\"\nmax_sessions = 5\n",
        )
        .expect("write");
        let config = Config::resolve(ServeArgs {
            config: Some(path.clone()),
            max_sessions: Some(7),
            ..ServeArgs::default()
        })
        .expect("resolves");
        assert_eq!(config.settings.max_inflight, 8);
        assert_eq!(config.settings.max_sessions, 7);
        assert_eq!(config.mqtt_bind, None, "empty disables");
        std::fs::write(&path, "max_inflight = 8\nmax_infligth = 9\n").expect("write");
        let error = Config::resolve(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .expect_err("unknown key");
        assert!(format!("{error:#}").contains("max_infligth"), "{error:#}");
    }

    /// Goal: the README's configuration table has a row for every setting, with its flag,
    /// variable, file key and default, so the documentation cannot fall behind the code.
    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!("../../README.md");
        for setting in SETTINGS {
            let flag = format!("`--{}`", setting.key.replace('_', "-"));
            let row = readme
                .lines()
                .find(|line| line.starts_with(&format!("| {flag} ")))
                .unwrap_or_else(|| panic!("README has no row for {flag}"));
            let default = match setting.default {
                "" => "none".to_string(),
                default => format!("`{default}`"),
            };
            for cell in [
                format!("`{}`", setting.env),
                format!("`{}`", setting.key),
                default,
            ] {
                assert!(row.contains(&cell), "README row for {flag} lacks {cell}");
            }
        }
    }
}
