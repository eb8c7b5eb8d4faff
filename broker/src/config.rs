//! spool's configuration: command-line flags, `SPOOL_*` environment variables and a `spool.toml`
//! file, in that order of precedence, over safe defaults.

use crate::tls::CertificateSource;
use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `spool serve` options. Every one is also a `SPOOL_*` variable and a key of `spool.toml`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// A TOML file with any of these settings (keys as the flags, with `_` for `-`).
    #[arg(long, env = "SPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the write-ahead log and metadata live [default: ./spool-data].
    #[arg(long, env = "SPOOL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the plain MQTT listener; empty disables it [default: 127.0.0.1:1883].
    #[arg(long, env = "SPOOL_MQTT_BIND")]
    pub mqtt_bind: Option<String>,
    /// Address of the MQTT-over-TLS listener; empty disables it [default: 127.0.0.1:8883].
    #[arg(long, env = "SPOOL_MQTTS_BIND")]
    pub mqtts_bind: Option<String>,
    /// PEM certificate chain (leaf first) for MQTTS; without it spool generates a CA and a
    /// server certificate in <data-dir>/tls on first start.
    #[arg(long, env = "SPOOL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SPOOL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The most concurrent client connections [default: 10000].
    #[arg(long, env = "SPOOL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// The largest MQTT packet accepted, in bytes [default: 1048576].
    #[arg(long, env = "SPOOL_MAX_PACKET_SIZE")]
    pub max_packet_size: Option<u32>,
    /// Sessions kept, connected or persistent and offline; a CONNECT that would create one
    /// more is refused [default: 100000].
    #[arg(long, env = "SPOOL_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Messages in flight towards one client (its receive maximum caps it) [default: 64].
    #[arg(long, env = "SPOOL_MAX_INFLIGHT")]
    pub max_inflight: Option<u16>,
    /// Messages a session's queue keeps; beyond it the oldest are dropped and counted
    /// (`queue_full`) [default: 100000].
    #[arg(long, env = "SPOOL_SESSION_QUEUE_MAX")]
    pub session_queue_max: Option<usize>,
    /// The most bytes the write-ahead log may use; at the quota publishers are held back,
    /// nothing is dropped [default: 10737418240].
    #[arg(long, env = "SPOOL_WAL_QUOTA_BYTES")]
    pub wal_quota_bytes: Option<u64>,
    /// Size at which a write-ahead log segment is closed and a new one begun; retention frees
    /// whole segments, and the quota must hold at least two [default: 67108864].
    #[arg(long, env = "SPOOL_WAL_SEGMENT_BYTES")]
    pub wal_segment_bytes: Option<u64>,
    /// Seconds a persistent MQTT 3.1.1 session outlives its connection [default: 604800].
    #[arg(long, env = "SPOOL_SESSION_EXPIRY_SECS")]
    pub session_expiry_secs: Option<u64>,
    /// The longest keep-alive, in seconds, an MQTT 5 client gets: a longer one, or none (0),
    /// is replaced by this one in CONNACK (server keep-alive) [default: 65535].
    #[arg(long, env = "SPOOL_MAX_KEEP_ALIVE")]
    pub max_keep_alive: Option<u16>,
}

/// The same settings as they appear in `spool.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    mqtt_bind: Option<String>,
    mqtts_bind: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_connections: Option<usize>,
    max_packet_size: Option<u32>,
    max_inflight: Option<u16>,
    max_sessions: Option<usize>,
    session_queue_max: Option<usize>,
    wal_quota_bytes: Option<u64>,
    wal_segment_bytes: Option<u64>,
    session_expiry_secs: Option<u64>,
    max_keep_alive: Option<u16>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `None` when disabled.
    pub mqtt_bind: Option<String>,
    /// `None` when disabled.
    pub mqtts_bind: Option<String>,
    pub tls_certificate: CertificateSource,
    pub max_connections: usize,
    pub max_packet_size: u32,
    pub max_inflight: u16,
    pub max_sessions: usize,
    pub session_queue_max: usize,
    pub wal_quota_bytes: u64,
    pub wal_segment_bytes: u64,
    pub session_expiry_v311: Duration,
    pub max_keep_alive_secs: u16,
}

impl Config {
    /// Resolves flags and environment (already merged by clap) over the file over defaults.
    ///
    /// # Errors
    /// An unreadable or invalid file, or values out of range.
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("spool-data"));
        let tls_certificate = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => CertificateSource::Files { cert, key },
            (None, None) => CertificateSource::Generated {
                dir: data_dir.join("tls"),
            },
            _ => anyhow::bail!("tls_cert and tls_key must be given together"),
        };
        let config = Config {
            mqtts_bind: Some(
                args.mqtts_bind
                    .or(file.mqtts_bind)
                    .unwrap_or_else(|| "127.0.0.1:8883".into()),
            )
            .filter(|bind| !bind.is_empty()),
            tls_certificate,
            data_dir,
            mqtt_bind: Some(
                args.mqtt_bind
                    .or(file.mqtt_bind)
                    .unwrap_or_else(|| "127.0.0.1:1883".into()),
            )
            .filter(|bind| !bind.is_empty()),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(10_000),
            max_packet_size: args
                .max_packet_size
                .or(file.max_packet_size)
                .unwrap_or(1 << 20),
            max_inflight: args.max_inflight.or(file.max_inflight).unwrap_or(64),
            max_sessions: args.max_sessions.or(file.max_sessions).unwrap_or(100_000),
            session_queue_max: args
                .session_queue_max
                .or(file.session_queue_max)
                .unwrap_or(100_000),
            wal_quota_bytes: args
                .wal_quota_bytes
                .or(file.wal_quota_bytes)
                .unwrap_or(10 << 30),
            wal_segment_bytes: args
                .wal_segment_bytes
                .or(file.wal_segment_bytes)
                .unwrap_or(64 << 20),
            session_expiry_v311: Duration::from_secs(
                args.session_expiry_secs
                    .or(file.session_expiry_secs)
                    .unwrap_or(7 * 24 * 3600),
            ),
            max_keep_alive_secs: args
                .max_keep_alive
                .or(file.max_keep_alive)
                .unwrap_or(u16::MAX),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_connections > 0, "max_connections must be positive");
        anyhow::ensure!(self.max_inflight > 0, "max_inflight must be positive");
        anyhow::ensure!(self.max_sessions > 0, "max_sessions must be positive");
        anyhow::ensure!(
            self.max_keep_alive_secs > 0,
            "max_keep_alive must be positive"
        );
        anyhow::ensure!(
            self.session_queue_max > 0,
            "session_queue_max must be positive"
        );
        anyhow::ensure!(
            (64..=16 << 20).contains(&self.max_packet_size),
            "max_packet_size must be between 64 bytes and 16 MiB"
        );
        Ok(())
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}
