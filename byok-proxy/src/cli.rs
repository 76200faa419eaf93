//! The sidecar's command line: the flags the webhook writes into its container (see
//! [`crate::sidecar`] for the facts both sides share) and the runtime it starts.

use std::path::PathBuf;

use clap::Args;

/// The sidecar's flags (`byok-proxy`, and `byok-operator proxy` of earlier releases' shape):
/// the webhook sets every flag and variable; see `docs/proxy.md`.
#[derive(Debug, Args, Clone)]
pub struct ProxyArgs {
    /// Admin listener: `/livez`, `/readyz`, `/metrics` (the kubelet probes it on the pod IP).
    #[arg(long, default_value = "0.0.0.0:15120")]
    pub admin_addr: std::net::SocketAddr,

    /// The operator's key broker.
    #[arg(long)]
    pub broker_url: String,

    /// A key to serve and its loopback port: `NAME=PORT` (repeatable).
    #[arg(long = "key", value_name = "NAME=PORT", required = true, value_parser = parse_proxy_key)]
    pub keys: Vec<(String, u16)>,

    /// PEM of the broker's CA, fixed for the process's life (how releases before trust
    /// bundles injected it). When set, `BYOK_BROKER_CA_FILE` is not read.
    #[arg(long, env = "BYOK_BROKER_CA", hide_env_values = true)]
    pub broker_ca: Option<String>,

    /// The broker's trust bundle, read again before every broker request (the mounted
    /// `byok-broker-ca` ConfigMap; set for runs outside a kubelet).
    #[arg(long, env = "BYOK_BROKER_CA_FILE", default_value = concat!("/var/run/secrets/byok.dev/broker-ca", "/ca.crt"))]
    pub broker_ca_file: PathBuf,

    /// The pod's namespace (the broker serves keys of this namespace only).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,

    /// The projected ServiceAccount token (audience byok.dev), read again on every refresh.
    #[arg(long, env = "BYOK_TOKEN_FILE", default_value = concat!("/var/run/secrets/byok.dev/token", "/token"))]
    pub token_file: PathBuf,

    /// The largest JSON body read to check or fill its model; larger bodies get 413. Bodies
    /// read at once hold at most twice this, which must fit the sidecar's memory limit.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_inspected_body: u64,

    /// How long SIGTERM waits for requests in flight (streams included).
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,

    /// Worker threads serving requests, each with its own event loop, listening sockets and
    /// upstream connections (key refreshes and the admin listener run on the main thread).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,

    /// Leave out the per-request access log lines.
    #[arg(long)]
    pub no_access_log: bool,
}

fn parse_proxy_key(arg: &str) -> Result<(String, u16), String> {
    crate::parse_key_arg(arg)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::interval::parse(s).map_err(|e| e.to_string())
}

/// Starts the sidecar: a few threads, not one per node core.
pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    // ring, the provider every TLS client here (broker, providers) is built on; an error only
    // means a provider is installed already (the operator's binary installs the same).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut ports: Vec<u16> = args.keys.iter().map(|(_, p)| *p).collect();
    ports.sort_unstable();
    ports.dedup();
    anyhow::ensure!(
        ports.len() == args.keys.len(),
        "two --key flags share a port"
    );
    crate::run(crate::ProxyConfig {
        admin_addr: args.admin_addr,
        broker_url: args.broker_url,
        broker_trust: match args.broker_ca {
            Some(pem) => crate::refresh::Trust::Fixed(pem),
            None => crate::refresh::Trust::File(args.broker_ca_file),
        },
        namespace: args.namespace,
        token_file: args.token_file,
        keys: args.keys,
        listen_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        max_inspected_body: args.max_inspected_body,
        drain_timeout: args.drain_timeout,
        access_log: !args.no_access_log,
        workers: args.workers.clamp(1, 64),
    })
}
