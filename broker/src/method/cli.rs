//! `spool method invoke <device>[/<module>] <name>`: calls a direct method of a module or
//! device connected to a running server, through its admin API, and prints the answer.

use crate::admin::AdminArgs;
use clap::{Args, Subcommand};
use spool_proto::admin as pb;

/// `spool method`'s command, and where the server's admin API is.
#[derive(Debug, Args)]
pub struct MethodArgs {
    #[command(subcommand)]
    pub command: MethodCommand,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Subcommand)]
pub enum MethodCommand {
    /// Calls a method and prints the answer, `{"status": …, "payload": …}`, whatever status
    /// the target answers with. Fails if the target is not connected and subscribed to its
    /// methods (within --connect-timeout), or does not answer within --timeout.
    Invoke {
        id: String,
        name: String,
        /// The request's payload, JSON.
        #[arg(long, default_value = "null")]
        payload: String,
        /// Seconds the target has to answer (1 to 300).
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        /// Seconds to wait for the target to be connected and subscribed (up to 300).
        #[arg(long, default_value_t = 0)]
        connect_timeout: u32,
    },
}

/// Runs a `spool method` command; returns what to print (the answer, as JSON).
///
/// # Errors
/// The admin API is off or cannot be reached, or the call failed (saying why).
pub fn run(args: &MethodArgs) -> anyhow::Result<String> {
    let (runtime, mut client) = args.admin.client("direct methods")?;
    let MethodCommand::Invoke {
        id,
        name,
        payload,
        timeout,
        connect_timeout,
    } = &args.command;
    let request = pb::InvokeMethodRequest {
        id: id.clone(),
        method_name: name.clone(),
        payload: payload.clone(),
        response_timeout_secs: *timeout,
        connect_timeout_secs: *connect_timeout,
    };
    let answer = runtime.block_on(client.invoke_method(request));
    let result = answer
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner();
    let payload: serde_json::Value = serde_json::from_str(&result.payload)?;
    let document = serde_json::json!({ "status": result.status, "payload": payload });
    Ok(format!("{}\n", serde_json::to_string_pretty(&document)?))
}
