//! `spool identity …`: manages the identity registry of a data directory. With no server
//! running, it opens the directory's metadata store itself, under the store's lock (one
//! writer, law 3); while a server holds the directory, it goes through the server's admin API
//! (`--admin-bind`), so the change counts at once and revoked credentials disconnect.

use super::identity::{Credentials, IdentitiesFile, Identity, IdentityId, Status};
use super::registry::{IdentityRegistry, RegistryError};
use crate::admin::convert::{identity_from_proto, identity_to_proto, status_to_proto};
use crate::config::{Config, ServeArgs};
use crate::server::meta_path;
use crate::tls::CertificateSource;
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use spool_proto::admin as pb;
use spool_proto::admin::admin_client::AdminClient;
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
    /// The admin API of the server running on the data directory [default: 127.0.0.1:50051].
    #[arg(long, env = "SPOOL_ADMIN_BIND", global = true)]
    pub admin_bind: Option<String>,
}

impl IdentityArgs {
    /// The settings these name, resolved as `spool serve` resolves them.
    fn config(&self) -> anyhow::Result<Config> {
        Config::resolve(ServeArgs {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            iothub_hostname: self.iothub_hostname.clone(),
            gateway_hostname: self.gateway_hostname.clone(),
            admin_bind: self.admin_bind.clone(),
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
        /// Derive a module's SAS keys from its device's primary key, as IoT Edge 1.1 does
        /// (needs --generation-id).
        #[arg(long, requires = "generation_id", conflicts_with_all = ["thumbprint", "x509_ca"])]
        derived: bool,
        /// The module's generation id: the workload API's, and what derived keys use.
        #[arg(long)]
        generation_id: Option<String>,
    },
    /// Lists the identities.
    List,
    /// Shows one identity, with its keys and connection string.
    Show { id: String },
    /// Removes an identity, and its twin.
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
    /// Writes identities, keys included, as an identities file (all of them, or those named):
    /// what `import` and `spool serve --identities` read, for a parent hub to know the
    /// devices and modules its child sends for.
    Export {
        ids: Vec<String>,
        /// The file to write (JSON if it ends in .json, else TOML), readable by its owner
        /// only; without it, TOML on standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Adds the identities of an identities file (TOML or JSON), replacing those with the
    /// same ids.
    Import { file: PathBuf },
}

impl IdentityCommand {
    /// The identity `add` adds: fresh SAS keys, unless it asks for certificates or derived
    /// keys.
    fn new_identity(&self) -> anyhow::Result<Identity> {
        let IdentityCommand::Add {
            id,
            thumbprint,
            secondary_thumbprint,
            x509_ca,
            derived,
            generation_id,
        } = self
        else {
            anyhow::bail!("not an add");
        };
        let mut identity = Identity::with_new_keys(IdentityId::parse(id)?)?;
        identity.generation_id.clone_from(generation_id);
        if let Some(primary) = thumbprint {
            identity.credentials = Credentials::X509Thumbprint {
                primary: primary.clone(),
                secondary: secondary_thumbprint.clone(),
            };
        } else if *x509_ca {
            identity.credentials = Credentials::X509Ca;
        } else if *derived {
            identity.credentials = Credentials::Derived {
                primary: String::new(),
                secondary: String::new(),
            };
        }
        Ok(identity)
    }

    /// Whether the command changes the registry (the others only read it).
    fn changes_registry(&self) -> bool {
        !matches!(
            self,
            IdentityCommand::List
                | IdentityCommand::Show { .. }
                | IdentityCommand::Env { .. }
                | IdentityCommand::Export { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WhichKey {
    Primary,
    Secondary,
    Both,
}

impl WhichKey {
    /// Whether it selects the primary key, and the secondary.
    fn selects(self) -> (bool, bool) {
        match self {
            WhichKey::Primary => (true, false),
            WhichKey::Secondary => (false, true),
            WhichKey::Both => (true, true),
        }
    }
}

/// Runs a `spool identity` command; returns what to print.
///
/// # Errors
/// An unknown or invalid identity, a store that fails, or a running server that cannot be
/// reached.
pub fn run(args: &IdentityArgs) -> anyhow::Result<String> {
    let config = args.config()?;
    let mut registry = open_registry(&config, args.command.changes_registry())?;
    let mut out = String::new();
    match &args.command {
        IdentityCommand::Add { .. } => {
            let identity = registry.add(args.command.new_identity()?)?;
            writeln!(out, "added {}", identity.id)?;
            describe_access(&mut out, &identity, &config)?;
        }
        IdentityCommand::List => {
            writeln!(out, "{:<40} {:<9} AUTH", "ID", "STATUS")?;
            for identity in registry.list()? {
                let status = status_name(identity.status);
                let auth = auth_name(&identity.credentials);
                writeln!(out, "{:<40} {status:<9} {auth}", identity.id)?;
            }
        }
        IdentityCommand::Show { id } => {
            show(&mut out, &registry.get(&IdentityId::parse(id)?)?, &config)?
        }
        IdentityCommand::Remove { id } => {
            let removed = registry.remove(&IdentityId::parse(id)?)?;
            writeln!(out, "removed {}", removed.id)?;
        }
        IdentityCommand::Enable { id } | IdentityCommand::Disable { id } => {
            let status = match args.command {
                IdentityCommand::Enable { .. } => Status::Enabled,
                _ => Status::Disabled,
            };
            let identity = registry.set_status(&IdentityId::parse(id)?, status)?;
            writeln!(out, "{} is {}", identity.id, status_name(status))?;
        }
        IdentityCommand::Rotate { id, key } => {
            let identity = registry.rotate(&IdentityId::parse(id)?, *key)?;
            writeln!(out, "rotated the keys of {}", identity.id)?;
            describe_access(&mut out, &identity, &config)?;
        }
        IdentityCommand::Export { ids, output } => {
            out.push_str(&export(registry.as_mut(), ids, output.as_deref())?);
        }
        IdentityCommand::Import { file } => {
            let identities = IdentitiesFile::read(file)?.identities;
            let count = registry.import(identities)?;
            writeln!(out, "imported {count} identities from {}", file.display())?;
        }
        IdentityCommand::Env { id } => {
            let identity = registry.get(&IdentityId::parse(id)?)?;
            let settings = &config.settings;
            let connection_string = identity
                .connection_string(&settings.iothub_hostname, &settings.gateway_hostname)
                .ok_or_else(|| anyhow::anyhow!("{id} authenticates with a certificate"))?;
            writeln!(out, "EdgeHubConnectionString={connection_string}")?;
            writeln!(
                out,
                "EdgeModuleCACertificateFile={}",
                config.tls_certificate.trust_file().display()
            )?;
        }
    }
    Ok(out)
}

/// Writes the identities `ids` names (all when empty) as an identities file at `output`,
/// readable by its owner only (it holds keys), or returns it as TOML to print. A module whose
/// keys are derived comes with its device, whose key they are derived from.
fn export(
    registry: &mut dyn Registry,
    ids: &[String],
    output: Option<&Path>,
) -> anyhow::Result<String> {
    let mut identities: Vec<Identity> = match ids {
        [] => registry.list()?,
        ids => ids
            .iter()
            .map(|id| registry.get(&IdentityId::parse(id)?))
            .collect::<anyhow::Result<_>>()?,
    };
    let devices: Vec<IdentityId> = identities
        .iter()
        .filter(|identity| matches!(identity.credentials, Credentials::Derived { .. }))
        .map(|module| IdentityId::parse(&module.id.device))
        .collect::<Result<_, _>>()?;
    for device in devices {
        if !identities.iter().any(|identity| identity.id == device) {
            let device = registry.get(&device)?;
            identities.insert(0, device); // before its modules
        }
    }
    let count = identities.len();
    let text = IdentitiesFile { identities }.to_text(output)?;
    let Some(path) = output else {
        return Ok(text);
    };
    crate::files::write_durably(path, text.as_bytes(), true)?;
    Ok(format!(
        "exported {count} identities to {}\n",
        path.display()
    ))
}

fn show(out: &mut String, identity: &Identity, config: &Config) -> anyhow::Result<()> {
    writeln!(out, "id:        {}", identity.id)?;
    writeln!(out, "status:    {}", status_name(identity.status))?;
    writeln!(out, "auth:      {}", auth_name(&identity.credentials))?;
    match &identity.credentials {
        Credentials::Sas { primary, secondary } | Credentials::Derived { primary, secondary } => {
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

/// The registry a command works on: a data directory's, opened here, or a running server's,
/// through its admin API. The same command prints the same either way.
trait Registry {
    fn list(&mut self) -> anyhow::Result<Vec<Identity>>;
    fn get(&mut self, id: &IdentityId) -> anyhow::Result<Identity>;
    fn add(&mut self, identity: Identity) -> anyhow::Result<Identity>;
    fn remove(&mut self, id: &IdentityId) -> anyhow::Result<Identity>;
    fn set_status(&mut self, id: &IdentityId, status: Status) -> anyhow::Result<Identity>;
    fn rotate(&mut self, id: &IdentityId, key: WhichKey) -> anyhow::Result<Identity>;
    /// Adds `identities`, replacing those with the same ids; returns how many.
    fn import(&mut self, identities: Vec<Identity>) -> anyhow::Result<usize>;
}

/// The registry of a data directory no server holds, opened under the store's lock (one
/// writer, law 3).
struct Offline {
    meta: Meta,
    registry: IdentityRegistry,
}

impl Registry for Offline {
    fn list(&mut self) -> anyhow::Result<Vec<Identity>> {
        Ok(self.registry.iter().cloned().collect())
    }

    fn get(&mut self, id: &IdentityId) -> anyhow::Result<Identity> {
        let identity = self.registry.get(id);
        Ok(identity
            .ok_or_else(|| RegistryError::NotFound(id.clone()))?
            .clone())
    }

    fn add(&mut self, identity: Identity) -> anyhow::Result<Identity> {
        Ok(self.registry.add(&self.meta, identity)?.clone())
    }

    fn remove(&mut self, id: &IdentityId) -> anyhow::Result<Identity> {
        Ok(self.registry.remove(&self.meta, id)?)
    }

    fn set_status(&mut self, id: &IdentityId, status: Status) -> anyhow::Result<Identity> {
        let changed = self
            .registry
            .update(&self.meta, id, |i| i.status = status)?;
        Ok(changed.clone())
    }

    fn rotate(&mut self, id: &IdentityId, key: WhichKey) -> anyhow::Result<Identity> {
        let (primary, secondary) = key.selects();
        Ok(self
            .registry
            .rotate(&self.meta, id, primary, secondary)?
            .clone())
    }

    fn import(&mut self, identities: Vec<Identity>) -> anyhow::Result<usize> {
        let file = IdentitiesFile { identities };
        Ok(self.registry.seed(&self.meta, file)?)
    }
}

/// The registry of a running server, through its admin API (`--admin-bind`).
struct Online {
    runtime: tokio::runtime::Runtime,
    client: AdminClient<tonic::transport::Channel>,
}

impl Online {
    fn connect(addr: &str) -> anyhow::Result<Online> {
        let (runtime, client) = crate::admin::client(addr)?;
        Ok(Online { runtime, client })
    }

    /// Runs one call; its answer, or the server's reason for refusing it.
    fn ask<F, T>(
        &mut self,
        call: impl FnOnce(AdminClient<tonic::transport::Channel>) -> F,
    ) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let answer = self.runtime.block_on(call(self.client.clone()));
        let answer = answer.map_err(|status| anyhow::anyhow!("{}", status.message()))?;
        Ok(answer.into_inner())
    }

    /// Runs one call and reads the identity it answers with.
    fn call<F>(
        &mut self,
        call: impl FnOnce(AdminClient<tonic::transport::Channel>) -> F,
    ) -> anyhow::Result<Identity>
    where
        F: std::future::Future<Output = Result<tonic::Response<pb::Identity>, tonic::Status>>,
    {
        answered(self.ask(call)?)
    }
}

/// An identity the admin API answered with (it always gives credentials).
fn answered(identity: pb::Identity) -> anyhow::Result<Identity> {
    identity_from_proto(identity, || {
        anyhow::bail!("an identity without credentials")
    })
}

impl Registry for Online {
    fn list(&mut self) -> anyhow::Result<Vec<Identity>> {
        let request = pb::ListIdentitiesRequest {};
        let listed = self.ask(|mut client| async move { client.list_identities(request).await })?;
        listed.identities.into_iter().map(answered).collect()
    }

    fn get(&mut self, id: &IdentityId) -> anyhow::Result<Identity> {
        let request = pb::IdentityRequest { id: id.to_string() };
        self.call(|mut client| async move { client.get_identity(request).await })
    }

    fn add(&mut self, identity: Identity) -> anyhow::Result<Identity> {
        let request = pb::AddIdentityRequest {
            identity: Some(identity_to_proto(&identity)),
        };
        self.call(|mut client| async move { client.add_identity(request).await })
    }

    fn remove(&mut self, id: &IdentityId) -> anyhow::Result<Identity> {
        let request = pb::IdentityRequest { id: id.to_string() };
        self.call(|mut client| async move { client.remove_identity(request).await })
    }

    fn set_status(&mut self, id: &IdentityId, status: Status) -> anyhow::Result<Identity> {
        let request = pb::SetIdentityStatusRequest {
            id: id.to_string(),
            status: status_to_proto(status).into(),
        };
        self.call(|mut client| async move { client.set_identity_status(request).await })
    }

    fn rotate(&mut self, id: &IdentityId, key: WhichKey) -> anyhow::Result<Identity> {
        let keys = match key {
            WhichKey::Primary => pb::KeySelection::Primary,
            WhichKey::Secondary => pb::KeySelection::Secondary,
            WhichKey::Both => pb::KeySelection::Both,
        };
        let request = pb::RotateIdentityKeysRequest {
            id: id.to_string(),
            keys: keys.into(),
        };
        self.call(|mut client| async move { client.rotate_identity_keys(request).await })
    }

    fn import(&mut self, identities: Vec<Identity>) -> anyhow::Result<usize> {
        let request = pb::ImportIdentitiesRequest {
            identities: identities.iter().map(identity_to_proto).collect(),
        };
        let imported =
            self.ask(|mut client| async move { client.import_identities(request).await })?;
        Ok(imported.identities.len())
    }
}

/// The data directory's registry: opened here when no server holds the directory (only a
/// command that changes it creates the directory), else the running server's, through its
/// admin API.
fn open_registry(config: &Config, create: bool) -> anyhow::Result<Box<dyn Registry>> {
    let data_dir = &config.settings.data_dir;
    if create {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("create data directory {}", data_dir.display()))?;
    } else if !data_dir.is_dir() {
        anyhow::bail!("no data directory {}", data_dir.display());
    }
    let path = meta_path(data_dir);
    match Meta::open(&path) {
        Ok(meta) => {
            let registry = IdentityRegistry::load(&meta)?;
            Ok(Box::new(Offline { meta, registry }))
        }
        Err(spool_storage::Error::Locked { .. }) => match &config.admin_bind {
            Some(addr) => Ok(Box::new(Online::connect(addr)?)),
            None => anyhow::bail!(
                "{} is held by a running spool server whose admin API is off (--admin-bind \
                 is empty): stop it to change identities offline, or enable its admin API",
                data_dir.display()
            ),
        },
        Err(e) => Err(e).with_context(|| format!("open {}", path.display())),
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
                config.tls_certificate.trust_file().display()
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
        Credentials::Derived { .. } => "sas-derived",
        Credentials::X509Thumbprint { .. } => "x509-thumbprint",
        Credentials::X509Ca => "x509-ca",
    }
}
