//! The `byok-proxy` binary, the sidecar the webhook injects: parse the flags, set up logging,
//! hand over to the library.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::too_many_lines))]

use clap::Parser;

/// The byok-operator sidecar: serves the pod's ProviderKeys on loopback ports, adding each
/// key's credential to the application's provider calls (see docs/proxy.md).
#[derive(Debug, Parser)]
#[command(name = "byok-proxy", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: byok_proxy::telemetry::LogArgs,

    #[command(flatten)]
    proxy: byok_proxy::cli::ProxyArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Flushes the log writer when main returns.
    let _log_guard = byok_proxy::telemetry::init(&cli.log)?;
    byok_proxy::cli::run(cli.proxy)
}
