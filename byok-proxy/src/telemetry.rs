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
/// (the operator's `crd` prints YAML, `verify` prints its result). Lines are written by a background thread
/// (the proxy logs every request; a write per line on the request path cost it ~8 % of its
/// CPU), with backpressure rather than loss; keep the guard until exit, its drop flushes.
/// Colours only on a terminal: container logs are files.
pub fn init(args: &LogArgs) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    let filter = EnvFilter::try_new(&args.log_filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The default (128,000 lines) is preallocated: ~5 MiB of a sidecar's memory.
        .buffered_lines_limit(4096)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    if args.log_json {
        registry
            .with(fmt::layer().json().with_writer(writer))
            .try_init()?;
    } else {
        registry
            .with(fmt::layer().with_ansi(ansi).with_writer(writer))
            .try_init()?;
    }
    Ok(guard)
}
