//! `spool twin get|patch-desired <device>[/<module>]`: a running server's twins, through its
//! admin API (a twin change must reach the module it belongs to, which only the server can do).

use crate::config::{Config, ServeArgs};
use anyhow::Context;
use clap::{Args, Subcommand};
use spool_proto::admin as pb;
use std::path::PathBuf;

/// Where the server's admin API is: the same settings as `spool serve`'s.
#[derive(Debug, Args)]
pub struct TwinArgs {
    #[command(subcommand)]
    pub command: TwinCommand,
    /// The `spool serve` configuration file whose settings apply (`admin_bind`).
    #[arg(long, env = "SPOOL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// The admin API of the running server [default: 127.0.0.1:50051].
    #[arg(long, env = "SPOOL_ADMIN_BIND", global = true)]
    pub admin_bind: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Prints an identity's twin: desired and reported properties, with their versions.
    Get { id: String },
    /// Patches an identity's desired properties with a JSON object (`null` deletes a key), and
    /// sends the change to the module if it is subscribed. Keys the deployment manifest names
    /// are set again at its next reading.
    PatchDesired { id: String, patch: String },
}

/// Runs a `spool twin` command; returns what to print (the twin, as JSON).
///
/// # Errors
/// The admin API is off or cannot be reached, or refuses the request (saying why).
pub fn run(args: &TwinArgs) -> anyhow::Result<String> {
    let config = Config::resolve(ServeArgs {
        config: args.config.clone(),
        admin_bind: args.admin_bind.clone(),
        ..ServeArgs::default()
    })?;
    let addr = config
        .admin_bind
        .as_deref()
        .context("the admin API is off (--admin-bind is empty): twins go through it")?;
    let (runtime, mut client) = crate::admin::client(addr)?;
    let answer = runtime.block_on(async {
        match &args.command {
            TwinCommand::Get { id } => {
                let request = pb::IdentityRequest { id: id.clone() };
                client.get_twin(request).await
            }
            TwinCommand::PatchDesired { id, patch } => {
                let request = pb::PatchDesiredRequest {
                    id: id.clone(),
                    patch: patch.clone(),
                };
                client.patch_desired(request).await
            }
        }
    });
    let twin = answer.map_err(|status| anyhow::anyhow!("{}", status.message()))?;
    let json: serde_json::Value = serde_json::from_str(&twin.into_inner().json)?;
    Ok(format!("{}\n", serde_json::to_string_pretty(&json)?))
}
