//! Logging setup shared by every subcommand.

use clap::Args;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log options, common to all subcommands.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter in `RUST_LOG` syntax (e.g. `info,byok_operator=debug`).
    #[arg(long, env = "BYOK_LOG", default_value = "info", global = true)]
    pub log_filter: String,

    /// Emit logs as JSON lines instead of human-readable text.
    #[arg(long, env = "BYOK_LOG_JSON", global = true)]
    pub log_json: bool,
}

/// Installs the global tracing subscriber. Logs go to stderr so stdout stays machine-readable
/// (`crd` prints YAML, `verify` prints its result).
pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    if args.log_json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()?;
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()?;
    }
    Ok(())
}
