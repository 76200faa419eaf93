//! Command-line interface: one binary, one subcommand per role.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use secrecy::zeroize::Zeroizing;

use crate::egress::EgressConfig;
use crate::providers::{Endpoints, ProviderKind, ProviderParams, Verifier};
use crate::reason::Reason;

/// Bring-your-own-key LLM provider API keys for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "byok-operator", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub log: byok_proxy::telemetry::LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (reconcile loop with leader election).
    Controller(Box<ControllerArgs>),
    /// The sidecar proxy as releases before the `byok-proxy` image injected it (`byok-operator
    /// proxy`): kept so that their pods' shape still names a command this binary runs. New
    /// pods run the `byok-proxy` binary of the sidecar image.
    #[command(hide = true)]
    Proxy(Box<byok_proxy::cli::ProxyArgs>),
    /// Verify one key with a live call to its provider and print the result.
    Verify(Box<VerifyArgs>),
    /// Print the CustomResourceDefinition YAML (the source of `crds/`).
    Crd,
    /// Print the API reference Markdown (the source of `docs/api.md`).
    #[command(hide = true)]
    ApiDocs,
    /// Manage the operator keyring.
    #[command(subcommand)]
    Keyring(KeyringCommand),
    /// Manage the operator's own CA (not with cert-manager).
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Replace the CA now (as the operator does when it nears its end): the new CA is issued
    /// by the old one too, and the old one stays trusted for the transition (24 hours), so
    /// running pods keep their keys. Refused while a rotation's transition is in progress.
    Rotate(CaTarget),
}

/// Where the operator's TLS Secret is.
#[derive(Debug, Args)]
pub struct CaTarget {
    /// The operator's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "byok-system")]
    pub operator_namespace: String,
    /// The TLS Secret holding the CA (the chart's `<fullname>-tls`).
    #[arg(long, default_value = crate::serving::certs::DEFAULT_SECRET_NAME)]
    pub cert_secret: String,
}

/// Outbound (provider) connection settings, shared by `controller` and `verify`.
#[derive(Debug, Args, Clone)]
pub struct EgressArgs {
    /// DEVELOPMENT ONLY: allow base URLs on any port and hosts that are IPs or resolve to
    /// private, loopback or link-local addresses. The https/no-userinfo shape checks stay.
    #[arg(long)]
    pub insecure_allow_private_base_urls: bool,

    /// Trust one more CA (PEM) for provider connections, e.g. a local fake provider's.
    #[arg(long, value_name = "PATH")]
    pub extra_ca_file: Option<PathBuf>,

    /// Reach providers through this HTTP proxy (`http://[user:password@]host:port`, CONNECT):
    /// the operator's verification calls and every sidecar's requests.
    #[arg(
        long,
        env = "BYOK_EGRESS_PROXY",
        value_name = "URL",
        hide_env_values = true
    )]
    pub egress_proxy: Option<String>,

    /// Replace a provider's default endpoint: `PROVIDER=URL` (repeatable). Providers:
    /// anthropic, openai, google, vertex, and vertex-token (the OAuth token URL).
    #[arg(long, value_name = "PROVIDER=URL")]
    pub provider_endpoint: Vec<String>,
}

impl EgressArgs {
    fn build(&self) -> anyhow::Result<(EgressConfig, Endpoints)> {
        if self.insecure_allow_private_base_urls {
            tracing::warn!(
                "--insecure-allow-private-base-urls is ON: base URLs may point at private, loopback and \
                 link-local addresses. Never use this in production."
            );
        }
        let extra_ca_pem = match &self.extra_ca_file {
            Some(path) => {
                tracing::warn!(path = %path.display(), "--extra-ca-file: trusting an extra CA for provider calls");
                Some(
                    std::fs::read(path)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?,
                )
            }
            None => None,
        };
        let endpoints =
            Endpoints::parse(&self.provider_endpoint).map_err(|e| anyhow::anyhow!(e))?;
        if !self.provider_endpoint.is_empty() {
            tracing::warn!(overrides = ?self.provider_endpoint, "--provider-endpoint: provider endpoints replaced");
        }
        let proxy = self.egress_proxy()?;
        if let Some(p) = &proxy {
            tracing::info!(proxy = %p.authority(), "provider calls go through the egress proxy");
        }
        let egress = EgressConfig {
            allow_private: self.insecure_allow_private_base_urls,
            extra_ca_pem,
            proxy,
            ..Default::default()
        };
        Ok((egress, endpoints))
    }

    /// `--egress-proxy`, parsed (an empty value is none).
    fn egress_proxy(&self) -> anyhow::Result<Option<crate::egress::EgressProxy>> {
        self.egress_proxy
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(crate::egress::EgressProxy::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))
    }
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Watch ProviderKeys in this namespace only (default: all namespaces).
    #[arg(long, env = "BYOK_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    #[command(flatten)]
    pub keyring: KeyringTarget,

    /// Never create the keyring Secret: it is provided (e.g. restored from backup, or
    /// managed by a secret store). Missing, it is reported and ProviderKeys wait for it.
    #[arg(long)]
    pub no_create_keyring: bool,

    /// Run without leader election (only for a single replica).
    #[arg(long)]
    pub no_leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, default_value = "byok-operator")]
    pub lease_name: String,

    /// Address of the admin server (`/metrics`, `/livez`, `/readyz`).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_addr: std::net::SocketAddr,

    /// After SIGTERM, keep serving the webhook and the key broker this long before stopping:
    /// Service endpoints and kube-proxy drop a terminating replica a moment after it is told
    /// to stop, and a webhook call routed to it meanwhile would fail pod admission
    /// (failurePolicy Fail). The stop then takes up to 10 s more (requests in flight, HTTP/2
    /// connections); keep both below terminationGracePeriodSeconds.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: std::time::Duration,

    /// Verification calls in flight at once to one provider host, across all ProviderKeys.
    #[arg(long, default_value_t = crate::providers::limiter::DEFAULT_CONCURRENCY)]
    pub verify_concurrency_per_host: usize,

    /// Verification calls started per second to one provider host, across all ProviderKeys;
    /// a 429 from the host halves it for a while.
    #[arg(long, default_value_t = crate::providers::limiter::DEFAULT_RATE_PER_SECOND)]
    pub verify_rate_per_host: f64,

    /// ProviderKeys reconciled at once (bounds memory and API connections; a reconcile never
    /// waits for a provider's rate limit while holding one of these).
    #[arg(long, default_value_t = 32)]
    pub max_concurrent_reconciles: u16,

    #[command(flatten)]
    pub egress: EgressArgs,

    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The admission webhook and the key broker, served by every replica.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Reconcile only: serve neither the webhook nor the broker.
    #[arg(long)]
    pub no_serve: bool,

    /// Address of the admission webhook (`POST` to a random path the operator keeps in a
    /// Secret and writes into the webhook configuration; TLS).
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub webhook_addr: std::net::SocketAddr,

    /// Address of the key broker (`GET /v1/keys/...`, TLS, ServiceAccount token).
    #[arg(long, default_value = "0.0.0.0:9444")]
    pub broker_addr: std::net::SocketAddr,

    /// How sidecars reach the broker. Default: `https://<service>.<namespace>.svc:<broker port>`.
    #[arg(long, value_name = "URL")]
    pub broker_url: Option<url::Url>,

    /// The Service in front of the webhook and the broker: its DNS names go into the
    /// serving certificate.
    #[arg(long, default_value = "byok-operator")]
    pub service_name: String,

    /// More DNS names or IP addresses for the serving certificate (repeatable).
    #[arg(long = "extra-san", value_name = "NAME_OR_IP")]
    pub extra_sans: Vec<String>,

    /// Use the certificate in this directory (`tls.crt`, `tls.key`, `ca.crt`, e.g. mounted
    /// from cert-manager), reloaded when the files change. The operator then keeps no CA of
    /// its own and leaves the webhook configuration's caBundle alone.
    #[arg(long, value_name = "DIR")]
    pub webhook_cert_dir: Option<PathBuf>,

    /// The Secret (in the operator's namespace) holding the operator's CA and serving
    /// certificate.
    #[arg(long, default_value = "byok-operator-tls")]
    pub cert_secret: String,

    /// Lifetime of the serving certificate (Go duration).
    #[arg(long, default_value = "2160h", value_parser = parse_duration)]
    pub serving_cert_validity: std::time::Duration,

    /// Renew the serving certificate when less than this is left (Go duration).
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    pub serving_cert_renew_before: std::time::Duration,

    /// The MutatingWebhookConfiguration whose webhooks the operator points at its path
    /// (field manager `byok-operator-webhook-path`) and, with its own CA, whose caBundle it
    /// keeps current (field manager `byok-operator-cabundle`). Empty: leave it alone.
    #[arg(long, default_value = "byok-operator")]
    pub webhook_configuration: String,

    /// The Secret (in the operator's namespace) that holds the webhook's random path. Default:
    /// the --cert-secret when the operator keeps its own certificate, else
    /// `byok-operator-webhook-path` (created if missing).
    #[arg(long, value_name = "NAME")]
    pub webhook_path_secret: Option<String>,

    /// The operator's Deployment: a new webhook path is written into the configuration only
    /// once it has rolled out (replicas of an older version serve only their own path).
    #[arg(long, value_name = "NAME")]
    pub webhook_deployment: Option<String>,

    /// Replace the webhook's path by a new random one this often (Go duration; `0s`: never).
    /// The API server names the webhook's URL in the errors it returns to whoever created a
    /// pod when a call fails, so the path is kept short-lived.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub webhook_path_rotation: std::time::Duration,

    /// Require the webhook's callers to present a client certificate issued by a CA in this
    /// PEM file (the API server does, when its admission configuration names one; see
    /// `docs/security.md`). Read at start-up.
    #[arg(long, value_name = "PATH")]
    pub webhook_client_ca: Option<PathBuf>,

    /// The sidecar image: `byok-proxy`, whose entrypoint is the proxy.
    #[arg(long, default_value = concat!("ghcr.io/byok-dev/byok-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,

    /// The operator's own image. Releases before the `byok-proxy` image injected it as the
    /// sidecar (`byok-operator proxy`); pods of theirs are served only when its repository is
    /// given here (the chart does). Empty: none are.
    #[arg(long, default_value = concat!("ghcr.io/byok-dev/byok-operator:", env!("CARGO_PKG_VERSION")))]
    pub operator_image: String,

    /// imagePullPolicy of the sidecar: Always, IfNotPresent or Never.
    #[arg(long, default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub proxy_image_pull_policy: String,

    /// The sidecar's resources: comma-separated `requests.cpu=`, `requests.memory=`,
    /// `limits.cpu=`, `limits.memory=` quantities.
    #[arg(long, default_value = "requests.cpu=10m,requests.memory=16Mi,limits.memory=64Mi", value_parser = parse_resources)]
    pub proxy_resources: k8s_openapi::api::core::v1::ResourceRequirements,

    /// The sidecar's admin port (`/livez`, `/readyz`, `/metrics`); a pod may move it with
    /// annotation `byok.dev/sidecar-ports`. Not a port a service mesh uses.
    #[arg(long, default_value_t = crate::webhook::patch::ADMIN_PORT)]
    pub proxy_admin_port: u16,

    /// The first of the sidecar's key ports (key i on this + i, 16 at most).
    #[arg(long, default_value_t = crate::webhook::patch::FIRST_KEY_PORT)]
    pub proxy_first_key_port: u16,

    /// How long a sidecar cut off from the broker keeps using a key (Go duration).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub key_lease: std::time::Duration,

    /// HTTP workers per listener.
    #[arg(long, default_value_t = 2)]
    pub serve_workers: usize,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::interval::parse(s).map_err(|e| e.to_string())
}

/// `requests.cpu=10m,limits.memory=64Mi` into ResourceRequirements.
pub fn parse_resources(
    s: &str,
) -> Result<k8s_openapi::api::core::v1::ResourceRequirements, String> {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut out = k8s_openapi::api::core::v1::ResourceRequirements::default();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected requests.cpu=10m style"))?;
        let value = value.trim();
        let quantity_ok = !value.is_empty()
            && value.len() <= 32
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.');
        if !quantity_ok || !value.as_bytes()[0].is_ascii_digit() {
            return Err(format!(
                "{item:?}: {value:?} is not a quantity such as 10m or 64Mi"
            ));
        }
        let (target, resource) = match name.trim() {
            "requests.cpu" => (&mut out.requests, "cpu"),
            "requests.memory" => (&mut out.requests, "memory"),
            "limits.cpu" => (&mut out.limits, "cpu"),
            "limits.memory" => (&mut out.limits, "memory"),
            other => {
                return Err(format!(
                    "{other:?}: expected requests.cpu, requests.memory, limits.cpu or limits.memory"
                ));
            }
        };
        target
            .get_or_insert_with(Default::default)
            .insert(resource.to_string(), Quantity(value.to_string()));
    }
    Ok(out)
}

/// `--proxy-image` must name a repository, and one other than `--operator-image`'s: the
/// broker tells the two programs apart by repository (pods of earlier releases run the
/// operator's image with `proxy`).
fn check_images(proxy_image: &str, operator_image: &str) -> anyhow::Result<()> {
    let proxy = crate::sidecar::shape::image_repository(proxy_image);
    anyhow::ensure!(
        !proxy.is_empty() && !proxy.contains(char::is_whitespace) && !proxy.contains('%'),
        "--proxy-image {proxy_image:?} names no image repository (chart: sidecar.image.repository)"
    );
    anyhow::ensure!(
        proxy != crate::sidecar::shape::image_repository(operator_image),
        "--proxy-image and --operator-image are both of repository {proxy:?}: the sidecar's \
         image (byok-proxy) needs a repository of its own"
    );
    Ok(())
}

impl ServeArgs {
    /// `--broker-url`, or the Service's name in the operator's namespace; https only.
    fn broker_url(&self, operator_namespace: &str) -> anyhow::Result<url::Url> {
        let broker_url = match &self.broker_url {
            Some(url) => url.clone(),
            None => url::Url::parse(&format!(
                "https://{}.{operator_namespace}.svc:{}",
                self.service_name,
                self.broker_addr.port()
            ))?,
        };
        anyhow::ensure!(
            broker_url.scheme() == "https",
            "--broker-url must be https (sidecars check the broker's certificate)"
        );
        Ok(broker_url)
    }

    /// Mounted files (`--webhook-cert-dir`), or the operator's own CA with a certificate for
    /// the Service's names, the broker URL's host and `--extra-san`s.
    fn tls_source(
        &self,
        operator_namespace: &str,
        broker_url: &url::Url,
    ) -> crate::serve::TlsSource {
        if let Some(dir) = &self.webhook_cert_dir {
            return crate::serve::TlsSource::Dir(dir.clone());
        }
        let service = &self.service_name;
        let mut sans = vec![
            service.clone(),
            format!("{service}.{operator_namespace}"),
            format!("{service}.{operator_namespace}.svc"),
            format!("{service}.{operator_namespace}.svc.cluster.local"),
        ];
        if let Some(host) = broker_url.host_str() {
            // An IPv6 host comes bracketed in a URL, not in a SAN.
            sans.push(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            );
        }
        sans.extend(self.extra_sans.iter().cloned());
        sans.sort();
        sans.dedup();
        crate::serve::TlsSource::Own(crate::serving::CertSettings {
            secret_name: self.cert_secret.clone(),
            serving_validity: self.serving_cert_validity,
            renew_before: self.serving_cert_renew_before,
            ..crate::serving::CertSettings::new(operator_namespace, sans)
        })
    }

    /// Where the webhook's path is kept and how it rotates.
    fn path_settings(&self, operator_namespace: &str) -> crate::serving::path_store::PathSettings {
        let path_secret = match (&self.webhook_path_secret, &self.webhook_cert_dir) {
            (Some(name), _) => name.clone(),
            (None, None) => self.cert_secret.clone(),
            (None, Some(_)) => "byok-operator-webhook-path".to_owned(),
        };
        crate::serving::path_store::PathSettings {
            // The TLS Secret is the certificate code's to create.
            create_secret: self.webhook_cert_dir.is_some() || path_secret != self.cert_secret,
            configuration: (!self.webhook_configuration.is_empty())
                .then(|| self.webhook_configuration.clone()),
            deployment: self.webhook_deployment.clone(),
            rotate_every: (!self.webhook_path_rotation.is_zero())
                .then_some(self.webhook_path_rotation),
            // The downward API's (the chart sets it).
            pod_name: std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()),
            ..crate::serving::path_store::PathSettings::new(operator_namespace, &path_secret)
        }
    }

    /// The serving configuration, or `None` with `--no-serve`.
    pub fn build(
        &self,
        operator_namespace: &str,
        egress: &EgressArgs,
    ) -> anyhow::Result<Option<crate::serve::ServeConfig>> {
        if self.no_serve {
            return Ok(None);
        }
        let broker_url = self.broker_url(operator_namespace)?;
        let tls = self.tls_source(operator_namespace, &broker_url);
        let extra_ca_pem = match &egress.extra_ca_file {
            Some(path) => Some(std::fs::read_to_string(path)?),
            None => None,
        };
        let webhook_path = self.path_settings(operator_namespace);
        let webhook_client_ca_pem = match &self.webhook_client_ca {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("reading --webhook-client-ca {}: {e}", path.display())
            })?),
            None => None,
        };
        check_images(&self.proxy_image, &self.operator_image)?;
        let ports = crate::webhook::patch::SidecarPorts {
            admin: self.proxy_admin_port,
            first_key: self.proxy_first_key_port,
        };
        ports
            .check()
            .map_err(|e| anyhow::anyhow!("--proxy-admin-port, --proxy-first-key-port: {e}"))?;
        Ok(Some(crate::serve::ServeConfig {
            webhook_path,
            webhook_client_ca_pem,
            webhook_addr: self.webhook_addr,
            broker_addr: self.broker_addr,
            broker_url: broker_url.to_string(),
            webhook_configuration: (self.webhook_cert_dir.is_none()
                && !self.webhook_configuration.is_empty())
            .then(|| self.webhook_configuration.clone()),
            tls,
            proxy: crate::serve::ProxyOptions {
                image: self.proxy_image.clone(),
                operator_image: self.operator_image.clone(),
                pull_policy: self.proxy_image_pull_policy.clone(),
                resources: self.proxy_resources.clone(),
                ports,
            },
            key_lease: self.key_lease,
            egress: crate::broker::EgressPolicy {
                allow_private_addresses: egress.insecure_allow_private_base_urls,
                extra_ca_pem,
                proxy: egress.egress_proxy()?,
            },
            operator_namespace: operator_namespace.to_string(),
            workers: self.serve_workers.max(1),
        }))
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The provider: anthropic, openai, google, vertex, azure, openai-compatible.
    #[arg(long)]
    pub provider: ProviderKind,

    /// File holding the key (for vertex: the service-account JSON). `-` reads standard input.
    #[arg(long, value_name = "PATH")]
    pub key_file: PathBuf,

    /// The provider's base URL (required for azure and openai-compatible).
    #[arg(long)]
    pub base_url: Option<url::Url>,

    /// Azure OpenAI api-version.
    #[arg(long, default_value = crate::crd::DEFAULT_AZURE_API_VERSION)]
    pub azure_api_version: String,

    /// Vertex AI project (default: the service-account key's project_id).
    #[arg(long)]
    pub vertex_project: Option<String>,

    /// Vertex AI location, e.g. us-central1.
    #[arg(long)]
    pub vertex_location: Option<String>,

    #[command(flatten)]
    pub egress: EgressArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeyringCommand {
    /// Add a new operator key and make it active; the controller re-encrypts every managed
    /// Secret with it.
    Rotate(KeyringTarget),
    /// Create the keyring Secret with a fresh key if it does not exist. The controller does
    /// this by itself only on a first install; use this to start over deliberately when the
    /// keyring is lost and its encrypted keys are to be re-imported from their sources.
    Init(KeyringTarget),
}

/// Where the keyring Secret is.
#[derive(Debug, Args)]
pub struct KeyringTarget {
    /// The operator's own namespace: holds the keyring Secret and the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "byok-system")]
    pub operator_namespace: String,
    /// Name of the keyring Secret (the controller creates it only on a first install).
    #[arg(long, default_value = crate::controller::keyring::DEFAULT_KEYRING_SECRET)]
    pub keyring_secret: String,
}

/// Runs a subcommand and returns the process exit code (`main` owns the exit): 0 on
/// success; `verify` also says 1 for a rejected key and 2 for a transient failure.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    // One process-wide rustls provider (ring, already used by kube) for every TLS client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = || tokio::runtime::Runtime::new();
    let done = match cli.command {
        Command::Crd => {
            print!("{}", crate::crdgen::crd_yaml()?);
            Ok(())
        }
        Command::ApiDocs => {
            print!("{}", crate::apidoc::markdown()?);
            Ok(())
        }
        Command::Controller(args) => runtime()?.block_on(controller(*args)),
        Command::Verify(args) => return runtime()?.block_on(verify(*args)),
        Command::Keyring(command) => runtime()?.block_on(async {
            let (KeyringCommand::Rotate(target) | KeyringCommand::Init(target)) = &command;
            let client = kube::Client::try_default().await?;
            let api = kube::Api::namespaced(client, &target.operator_namespace);
            let name = &target.keyring_secret;
            match command {
                KeyringCommand::Rotate(_) => {
                    let id = crate::controller::keyring::rotate(&api, name).await?;
                    println!(
                        "operator key {id} is now active; managed Secrets are being re-encrypted"
                    );
                }
                KeyringCommand::Init(_) => {
                    let keyring = crate::controller::keyring::init(&api, name).await?;
                    println!(
                        "keyring Secret {name} holds operator key {} (active)",
                        keyring.active_id()
                    );
                }
            }
            anyhow::Ok(())
        }),
        Command::Ca(CaCommand::Rotate(target)) => runtime()?.block_on(async {
            let client = kube::Client::try_default().await?;
            let api = kube::Api::namespaced(client, &target.operator_namespace);
            let bundle = crate::serving::certs::rotate_now(&api, &target.cert_secret).await?;
            println!(
                "the CA in {} is new (serving certificate until {}); the old CA stays trusted for the transition, and replicas serve the new certificate within a minute",
                target.cert_secret, bundle.not_after
            );
            anyhow::Ok(())
        }),
        Command::Proxy(args) => byok_proxy::cli::run(*args),
    };
    done.map(|()| 0)
}

async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let (egress, endpoints) = args.egress.build()?;
    let serving = args
        .serve
        .build(&args.keyring.operator_namespace, &args.egress)?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    let client = crate::metrics::counted_client(kube::Config::infer().await?, metrics.clone())?;
    let leader = (!args.no_leader_election).then(|| crate::controller::leader::LeaderConfig {
        lease_name: args.lease_name.clone(),
        identity: std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("byok-operator-{}", std::process::id())),
    });
    let config = crate::startup::Config {
        watch_namespace: args.namespace,
        operator_namespace: args.keyring.operator_namespace,
        keyring_secret: args.keyring.keyring_secret,
        create_keyring: !args.no_create_keyring,
        egress,
        endpoints,
        leader,
        admin_addr: Some(args.admin_addr),
        verify_limits: (args.verify_concurrency_per_host, args.verify_rate_per_host),
        max_concurrent_reconciles: args.max_concurrent_reconciles,
        metrics: metrics.clone(),
        serving,
    };
    let shutdown = shutdown_signal(metrics, args.shutdown_delay);
    crate::startup::run(client, config, shutdown).await
}

/// Completes `delay` after SIGTERM (serving on meanwhile, `/readyz` failing), or at once on
/// Ctrl-C (also during the delay). Listens from the moment `run` first waits for it, once
/// serving has started: a SIGTERM before that ends the process at once, with nothing served.
async fn shutdown_signal(
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    delay: std::time::Duration,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let terminated = match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => false,
            _ = term.recv() => true,
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            false
        }
    };
    if terminated && !delay.is_zero() {
        metrics.set_ready(crate::metrics::Ready::Running, false);
        tracing::info!(delay = ?delay, "SIGTERM: serving on while endpoints drop this replica, then shutting down");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!("shutting down");
}

/// Exit codes of `verify`: 0 valid, 1 rejected, 2 could not tell (transient), 3 usage.
async fn verify(args: VerifyArgs) -> anyhow::Result<u8> {
    let (egress, endpoints) = args.egress.build()?;
    let key = read_key(&args.key_file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.key_file.display()))?;
    let http = crate::egress::http_client(&egress)?;
    let verifier = Verifier::new(http, endpoints, egress.allow_private).with_egress(&egress);
    let params = ProviderParams {
        base_url: args.base_url,
        azure_api_version: Some(args.azure_api_version),
        vertex_project: args.vertex_project,
        vertex_location: args.vertex_location,
    };
    let outcome = verifier.verify(args.provider, &key, &params).await;
    let exposed = secrecy::ExposeSecret::expose_secret(&key);
    println!("reason:      {}", outcome.reason);
    println!("message:     {}", outcome.message);
    println!(
        "fingerprint: {}",
        crate::crypto::fingerprint(exposed.as_bytes())
    );
    println!("masked:      {}", crate::crypto::mask(exposed));
    Ok(match outcome.reason {
        Reason::Valid => 0,
        r if r.is_transient() => 2,
        _ => 1,
    })
}

/// Largest key file `verify` reads: a Kubernetes Secret holds at most 1 MiB.
const MAX_KEY_FILE_BYTES: usize = 1024 * 1024;

/// The key in `path` (`-`: standard input), surrounding whitespace trimmed.
fn read_key(path: &Path) -> anyhow::Result<SecretString> {
    let raw = if path.as_os_str() == "-" {
        read_secret(std::io::stdin().lock())?
    } else {
        read_secret(std::fs::File::open(path)?)?
    };
    let text = std::str::from_utf8(&raw).map_err(|_| anyhow::anyhow!("the key is not UTF-8"))?;
    // The one copy that outlives this function is the SecretString's own.
    Ok(SecretString::from(text.trim()))
}

/// Everything `reader` holds, in a buffer wiped on drop.
fn read_secret(mut reader: impl Read) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    // All the room up front: growing a Vec copies it and frees the old buffer unwiped.
    let mut buf = Zeroizing::new(vec![0u8; MAX_KEY_FILE_BYTES + 1]);
    let mut len = 0;
    while len < buf.len() {
        match reader.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::ensure!(
        len <= MAX_KEY_FILE_BYTES,
        "the key is larger than {MAX_KEY_FILE_BYTES} bytes"
    );
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_image_needs_a_repository_of_its_own() {
        let operator = "ghcr.io/byok-dev/byok-operator:1.0";
        assert!(check_images("ghcr.io/byok-dev/byok-proxy:1.0", operator).is_ok());
        assert!(check_images("mirror:5000/byok/proxy@sha256:ab", operator).is_ok());
        for bad in [
            "",
            ":1.0",
            "%!s(<nil>):0.1.0",
            "ghcr.io/byok-dev/byok-operator:2.0",
        ] {
            assert!(check_images(bad, operator).is_err(), "{bad:?}");
        }
    }
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn key_is_read_whole_and_bounded() {
        let read = |bytes: &[u8]| read_secret(bytes).map(|b| b.to_vec());
        assert_eq!(read(b"").expect("empty"), b"");
        assert_eq!(read(b"sk-ant-x\n").expect("small"), b"sk-ant-x\n");
        let max = vec![b'a'; MAX_KEY_FILE_BYTES];
        assert_eq!(read(&max).expect("at the limit").len(), MAX_KEY_FILE_BYTES);
        let over = vec![b'a'; MAX_KEY_FILE_BYTES + 1];
        let err = read(&over).expect_err("over the limit");
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn key_file_is_trimmed() {
        let path = std::env::temp_dir().join(format!("byok-verify-key-{}", std::process::id()));
        std::fs::write(&path, "  sk-ant-api03-key\n").expect("write");
        let key = read_key(&path);
        let _ = std::fs::remove_file(&path);
        let key = key.expect("read");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&key),
            "sk-ant-api03-key"
        );
        let missing = read_key(Path::new("/nonexistent/byok-key")).expect_err("missing file");
        assert!(!missing.to_string().is_empty());
    }
}
