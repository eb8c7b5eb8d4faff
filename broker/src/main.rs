//! `spool`: the command-line entry point. The `serve` command arrives with the MQTT server; for
//! now the binary only identifies itself, so that the workspace builds end to end.

use clap::Parser;

/// spool: a durable, in-order MQTT hub for IoT Edge modules.
#[derive(Debug, Parser)]
#[command(name = "spool", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "spool {}: the MQTT server (`spool serve`) is not built yet",
        env!("CARGO_PKG_VERSION")
    );
}
