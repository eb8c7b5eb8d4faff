//! `spool identity …`: manages the identity registry of a data directory. It opens the
//! directory's metadata store itself, under the store's lock, so it refuses a directory a
//! running server holds (one writer, law 3) and says so.

use super::identity::{Credentials, Identity, IdentityId, Status, new_key};
use super::registry::IdentityRegistry;
use crate::config::{Config, ServeArgs};
use crate::server::meta_path;
use crate::tls::{CertificateSource, generated_ca};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use spool_storage::Meta;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where the registry is, and the host names connection strings carry: the same settings as
/// `spool serve`'s, from flags, `SPOOL_*` variables or its `spool.toml`.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    #[command(subcommand)]
    pub command: IdentityCommand,
    /// The `spool serve` configuration file whose settings apply (`data_dir`,
    /// `iothub_hostname`, `gateway_hostname`, the TLS certificate).
    #[arg(long, env = "SPOOL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Data directory, as given to `spool serve` [default: spool-data].
    #[arg(long, env = "SPOOL_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// The IoT Hub host name modules name in their usernames and SAS tokens [default:
    /// localhost].
    #[arg(long, env = "SPOOL_IOTHUB_HOSTNAME", global = true)]
    pub iothub_hostname: Option<String>,
    /// The host name modules connect to [default: localhost].
    #[arg(long, env = "SPOOL_GATEWAY_HOSTNAME", global = true)]
    pub gateway_hostname: Option<String>,
}

impl IdentityArgs {
    /// The settings these name, resolved as `spool serve` resolves them.
    fn config(&self) -> anyhow::Result<Config> {
        Config::resolve(ServeArgs {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            iothub_hostname: self.iothub_hostname.clone(),
            gateway_hostname: self.gateway_hostname.clone(),
            ..ServeArgs::default()
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Adds a device or module (`device` or `device/module`) and prints its connection string.
    Add {
        id: String,
        /// Authenticate a leaf device by its certificate's thumbprint (hex) instead of SAS.
        #[arg(long, conflicts_with = "x509_ca")]
        thumbprint: Option<String>,
        /// A second accepted thumbprint, with --thumbprint.
        #[arg(long, requires = "thumbprint")]
        secondary_thumbprint: Option<String>,
        /// Authenticate a leaf device by a certificate issued by the trust bundle's CA, whose
        /// common name is the device id.
        #[arg(long)]
        x509_ca: bool,
    },
    /// Lists the identities.
    List,
    /// Shows one identity, with its keys and connection string.
    Show { id: String },
    /// Removes an identity.
    Remove { id: String },
    /// Lets an identity connect again.
    Enable { id: String },
    /// Refuses an identity's new connections.
    Disable { id: String },
    /// Replaces an identity's SAS keys with new random ones.
    Rotate {
        id: String,
        /// Which key to replace.
        #[arg(long, value_enum, default_value_t = WhichKey::Both)]
        key: WhichKey,
    },
    /// Prints the environment a module reads with the SDKs' `create_from_edge_environment`.
    Env { id: String },
}

impl IdentityCommand {
    /// Whether the command changes the registry (the others only read it).
    fn changes_registry(&self) -> bool {
        !matches!(
            self,
            IdentityCommand::List | IdentityCommand::Show { .. } | IdentityCommand::Env { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WhichKey {
    Primary,
    Secondary,
    Both,
}

/// Runs a `spool identity` command; returns what to print.
///
/// # Errors
/// A directory a server holds, an unknown or invalid identity, or a store that fails.
pub fn run(args: &IdentityArgs) -> anyhow::Result<String> {
    let config = args.config()?;
    let meta = open_store(&config.settings.data_dir, args.command.changes_registry())?;
    let mut registry = IdentityRegistry::load(&meta)?;
    let mut out = String::new();
    match &args.command {
        IdentityCommand::Add {
            id,
            thumbprint,
            secondary_thumbprint,
            x509_ca,
        } => {
            let mut identity = Identity::with_new_keys(IdentityId::parse(id)?)?;
            if let Some(primary) = thumbprint {
                identity.credentials = Credentials::X509Thumbprint {
                    primary: primary.clone(),
                    secondary: secondary_thumbprint.clone(),
                };
            } else if *x509_ca {
                identity.credentials = Credentials::X509Ca;
            }
            registry.add(&meta, identity.clone())?;
            writeln!(out, "added {}", identity.id)?;
            describe_access(&mut out, &identity, &config)?;
        }
        IdentityCommand::List => {
            writeln!(out, "{:<40} {:<9} AUTH", "ID", "STATUS")?;
            for identity in registry.iter() {
                let status = status_name(identity.status);
                let auth = auth_name(&identity.credentials);
                writeln!(out, "{:<40} {status:<9} {auth}", identity.id)?;
            }
        }
        IdentityCommand::Show { id } => show(&mut out, find(&registry, id)?, &config)?,
        IdentityCommand::Remove { id } => {
            let removed = registry.remove(&meta, &IdentityId::parse(id)?)?;
            writeln!(out, "removed {}", removed.id)?;
        }
        IdentityCommand::Enable { id } | IdentityCommand::Disable { id } => {
            let status = match args.command {
                IdentityCommand::Enable { .. } => Status::Enabled,
                _ => Status::Disabled,
            };
            let id = IdentityId::parse(id)?;
            let identity = registry.update(&meta, &id, |i| i.status = status)?;
            writeln!(out, "{} is {}", identity.id, status_name(status))?;
        }
        IdentityCommand::Rotate { id, key } => {
            let identity = rotate(&meta, &mut registry, &IdentityId::parse(id)?, *key)?;
            writeln!(out, "rotated the keys of {}", identity.id)?;
            describe_access(&mut out, identity, &config)?;
        }
        IdentityCommand::Env { id } => {
            let identity = find(&registry, id)?;
            let settings = &config.settings;
            let connection_string = identity
                .connection_string(&settings.iothub_hostname, &settings.gateway_hostname)
                .ok_or_else(|| anyhow::anyhow!("{id} authenticates with a certificate"))?;
            writeln!(out, "EdgeHubConnectionString={connection_string}")?;
            writeln!(
                out,
                "EdgeModuleCACertificateFile={}",
                ca_file(&config).display()
            )?;
        }
    }
    Ok(out)
}

fn find<'a>(registry: &'a IdentityRegistry, id: &str) -> anyhow::Result<&'a Identity> {
    let id = IdentityId::parse(id)?;
    registry
        .get(&id)
        .ok_or_else(|| anyhow::anyhow!("no identity {id}"))
}

fn show(out: &mut String, identity: &Identity, config: &Config) -> anyhow::Result<()> {
    writeln!(out, "id:        {}", identity.id)?;
    writeln!(out, "status:    {}", status_name(identity.status))?;
    writeln!(out, "auth:      {}", auth_name(&identity.credentials))?;
    match &identity.credentials {
        Credentials::Sas { primary, secondary } => {
            writeln!(out, "primary:   {primary}")?;
            writeln!(out, "secondary: {secondary}")?;
        }
        Credentials::X509Thumbprint { primary, secondary } => {
            writeln!(out, "primary:   {primary}")?;
            if let Some(secondary) = secondary {
                writeln!(out, "secondary: {secondary}")?;
            }
        }
        Credentials::X509Ca => {}
    }
    describe_access(out, identity, config)
}

/// Replaces `key` (or both) of an identity's SAS keys with new random ones.
fn rotate<'a>(
    meta: &Meta,
    registry: &'a mut IdentityRegistry,
    id: &IdentityId,
    key: WhichKey,
) -> anyhow::Result<&'a Identity> {
    let Some(Credentials::Sas { .. }) = registry.get(id).map(|i| &i.credentials) else {
        anyhow::bail!("{id} has no SAS keys to rotate");
    };
    let (new_primary, new_secondary) = (new_key()?, new_key()?);
    Ok(registry.update(meta, id, |identity| {
        if let Credentials::Sas { primary, secondary } = &mut identity.credentials {
            if matches!(key, WhichKey::Primary | WhichKey::Both) {
                *primary = new_primary;
            }
            if matches!(key, WhichKey::Secondary | WhichKey::Both) {
                *secondary = new_secondary;
            }
        }
    })?)
}

/// Opens the data directory's metadata store; only a command that changes the registry
/// creates the directory.
fn open_store(data_dir: &Path, create: bool) -> anyhow::Result<Meta> {
    if create {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("create data directory {}", data_dir.display()))?;
    } else if !data_dir.is_dir() {
        anyhow::bail!("no data directory {}", data_dir.display());
    }
    let path = meta_path(data_dir);
    match Meta::open(&path) {
        Ok(meta) => Ok(meta),
        Err(spool_storage::Error::Locked { .. }) => anyhow::bail!(
            "{} is held by a running spool server; stop it to change identities offline \
             (managing a running server's identities comes with the admin API)",
            data_dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("open {}", path.display())),
    }
}

/// The CA file clients trust: the one `spool serve` generates, or the given certificate's.
fn ca_file(config: &Config) -> PathBuf {
    match &config.tls_certificate {
        CertificateSource::Generated { dir } => generated_ca(dir),
        CertificateSource::Files { cert, .. } => cert.clone(),
    }
}

/// The connection string and CA file of an identity that uses SAS keys.
fn describe_access(out: &mut String, identity: &Identity, config: &Config) -> anyhow::Result<()> {
    let settings = &config.settings;
    let connection_string =
        identity.connection_string(&settings.iothub_hostname, &settings.gateway_hostname);
    if let Some(connection_string) = connection_string {
        writeln!(out, "connection string: {connection_string}")?;
        match &config.tls_certificate {
            CertificateSource::Generated { .. } => writeln!(
                out,
                "CA file: {} (generated by `spool serve` at its first start)",
                ca_file(config).display()
            )?,
            CertificateSource::Files { cert, .. } => writeln!(
                out,
                "CA file: the CA that issued {} (--tls-cert)",
                cert.display()
            )?,
        }
    }
    Ok(())
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Enabled => "enabled",
        Status::Disabled => "disabled",
    }
}

fn auth_name(credentials: &Credentials) -> &'static str {
    match credentials {
        Credentials::Sas { .. } => "sas",
        Credentials::X509Thumbprint { .. } => "x509-thumbprint",
        Credentials::X509Ca => "x509-ca",
    }
}
