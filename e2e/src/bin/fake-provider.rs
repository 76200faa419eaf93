//! `make run`: the fake LLM provider as a separate process.
//!
//! ```text
//! fake-provider [--listen 127.0.0.1:8443] [--ca-out PATH]
//!               [--valid-key PROVIDER=KEY]... [--valid-key-file PROVIDER=PATH]...
//!               [--service-account-json PATH]...
//! ```
//!
//! Prints one line with the base URLs on stdout once it accepts connections; stops on SIGINT
//! or SIGTERM. Admin API (loopback clients only): `POST /__fake/mode`
//! `{"mode":"unauthorized","provider":"openai"}` (`provider` optional, `delay_ms` for
//! `slow`), `GET /__fake/stats`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_operator::providers::ProviderKind;

const USAGE: &str = "usage: fake-provider [--listen ADDR:PORT] [--ca-out PATH] \
[--valid-key PROVIDER=KEY]... [--valid-key-file PROVIDER=PATH]... [--service-account-json PATH]...";

struct Args {
    listen: SocketAddr,
    ca_out: Option<PathBuf>,
    valid_keys: Vec<(ProviderKind, String)>,
    service_accounts: Vec<PathBuf>,
}

fn provider_and_value(arg: &str) -> anyhow::Result<(ProviderKind, &str)> {
    let (provider, value) = arg.split_once('=').context("expected PROVIDER=VALUE")?;
    let kind = provider
        .parse::<ProviderKind>()
        .map_err(anyhow::Error::msg)?;
    Ok((kind, value))
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: "127.0.0.1:8443".parse()?,
        ca_out: None,
        valid_keys: Vec::new(),
        service_accounts: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (flag, None),
        };
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().with_context(|| format!("{flag} needs a value"))?,
        };
        match flag.as_str() {
            "--listen" => args.listen = value.parse().context("--listen")?,
            "--ca-out" => args.ca_out = Some(value.into()),
            "--valid-key" => {
                let (kind, key) = provider_and_value(&value).context("--valid-key")?;
                args.valid_keys.push((kind, key.to_owned()));
            }
            "--valid-key-file" => {
                let (kind, path) = provider_and_value(&value).context("--valid-key-file")?;
                let key =
                    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
                let key = if kind == ProviderKind::Vertex {
                    key
                } else {
                    key.trim().to_owned()
                };
                args.valid_keys.push((kind, key));
            }
            "--service-account-json" => args.service_accounts.push(value.into()),
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let fake = FakeProvider::start(FakeProviderConfig {
            listen: args.listen,
            valid_keys: args.valid_keys,
            ..Default::default()
        })
        .await?;
        for path in &args.service_accounts {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            fake.add_service_account_json(&json)
                .with_context(|| format!("registering {}", path.display()))?;
        }
        if let Some(path) = &args.ca_out {
            std::fs::write(path, fake.ca_pem())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let mut line = String::from("fake-provider ready:");
        for kind in ProviderKind::ALL {
            line.push_str(&format!(" {kind}={}", fake.base_url(kind)));
        }
        line.push_str(&format!(
            " vertex-token={} admin={}/__fake",
            fake.vertex_token_url(),
            fake.origin()
        ));
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
        drop(stdout);

        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("fake-provider: stopping");
        fake.stop().await;
        anyhow::Ok(())
    })
}
