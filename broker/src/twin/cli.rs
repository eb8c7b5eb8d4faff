//! `spool twin get|patch-desired <device>[/<module>]`: a running server's twins, through its
//! admin API (a twin change must reach the module it belongs to, which only the server can do).

use crate::admin::AdminArgs;
use clap::{Args, Subcommand};
use spool_proto::admin as pb;

/// `spool twin`'s command, and where the server's admin API is.
#[derive(Debug, Args)]
pub struct TwinArgs {
    #[command(subcommand)]
    pub command: TwinCommand,
    #[command(flatten)]
    pub admin: AdminArgs,
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
    let (runtime, mut client) = args.admin.client("twins")?;
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
