//! Command-line interface: one binary, one subcommand per role.

use clap::{Args, Parser, Subcommand};

/// Bring-your-own-key LLM provider API keys for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "byok-operator", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub log: crate::telemetry::LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (reconcile loop, admission webhook, key broker, admin server).
    Controller(Unimplemented),
    /// Run the sidecar proxy that adds the provider's auth header on 127.0.0.1.
    Proxy(Unimplemented),
    /// Verify one key with a live call to its provider and print the result.
    Verify(Unimplemented),
    /// Print the CustomResourceDefinition YAML (the source of `crds/`).
    Crd,
}

/// Placeholder arguments for subcommands that later issues fill in.
#[derive(Debug, Args)]
pub struct Unimplemented {}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crdgen::crd_yaml()?);
            Ok(())
        }
        Command::Controller(_) | Command::Proxy(_) | Command::Verify(_) => {
            anyhow::bail!("this subcommand is not implemented yet")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
