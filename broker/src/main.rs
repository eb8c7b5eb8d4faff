//! `spool`: the command-line entry point.

use anyhow::Context;
use clap::{Parser, Subcommand};
use spool_broker::auth::cli::IdentityArgs;
use spool_broker::config::{Config, ServeArgs};
use spool_broker::method::cli::MethodArgs;
use spool_broker::server::Server;
use spool_broker::twin::cli::TwinArgs;
use tracing_subscriber::EnvFilter;

/// spool: a durable, in-order MQTT hub for IoT Edge modules.
#[derive(Debug, Parser)]
#[command(name = "spool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub.
    Serve(Box<ServeArgs>),
    /// Manage the devices and modules that may connect.
    Identity(Box<IdentityArgs>),
    /// Read twins and patch their desired properties, on a running server.
    Twin(Box<TwinArgs>),
    /// Call modules' direct methods, on a running server.
    Method(Box<MethodArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SPOOL_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Identity(args) => {
            print!("{}", spool_broker::auth::cli::run(&args)?);
            Ok(())
        }
        Command::Twin(args) => {
            print!("{}", spool_broker::twin::cli::run(&args)?);
            Ok(())
        }
        Command::Method(args) => {
            print!("{}", spool_broker::method::cli::run(&args)?);
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::resolve(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let server = Server::start(&config).await?;
        if let Some(addr) = server.mqtt_addr {
            // Tests and scripts read this line to find the port when binding to port 0.
            println!("spool: MQTT listening on {addr}");
        }
        if let Some(addr) = server.mqtts_addr {
            println!("spool: MQTTS listening on {addr}");
        }
        if let Some(addr) = server.https_addr {
            println!("spool: HTTPS (direct methods) listening on {addr}");
        }
        if let Some(files) = &server.tls_files {
            println!("spool: TLS certificate {}", files.cert.display());
            if let Some(ca) = &files.generated_ca {
                println!(
                    "spool: TLS CA certificate (for clients to trust) {}",
                    ca.display()
                );
            }
        }
        if let Some(addr) = server.admin_addr {
            println!("spool: admin API on {addr}");
        }
        println!("spool: data in {}", config.settings.data_dir.display());
        wait_for_stop_signal().await?;
        tracing::info!("stopping");
        server.stop().await
    })
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("wait for Ctrl-C"),
        _ = terminate.recv() => Ok(()),
    }
}
