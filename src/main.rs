//! The `byok-operator` binary: parse the command line, set up telemetry, hand over to the library.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::too_many_lines))]

use clap::Parser;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = byok_operator::cli::Cli::parse();
    // Flushes the log writer when main returns.
    let _log_guard = byok_proxy::telemetry::init(&cli.log)?;
    byok_operator::cli::run(cli).map(std::process::ExitCode::from)
}
