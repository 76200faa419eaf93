//! Running the real controller against the local control plane: install the CRD once per
//! test binary, start a controller scoped to the test's namespace (so tests running in
//! parallel do not share one), and wait for ProviderKeys to reach a state.

use std::time::Duration;

use anyhow::Context as _;
use byok_operator::controller::{self, leader::LeaderConfig};
use byok_operator::crd::ProviderKey;
use byok_operator::egress::EgressConfig;
use byok_operator::names;
use byok_operator::providers::{Endpoints, ProviderKind};
use byok_operator::startup;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use tokio::sync::OnceCell;

use crate::envtest::TestEnv;
use crate::fake_provider::FakeProvider;

/// How long a test waits for the controller to reach a state.
pub const WAIT: Duration = Duration::from_secs(60);

/// Installs (server-side applies) the ProviderKey CRD and waits until it is Established.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_try_init(|| async { apply_crd(client, &byok_operator::crdgen::crd()).await })
        .await?;
    Ok(())
}

/// Server-side applies `crd` (taking over its fields) and waits until it is Established.
pub async fn apply_crd(client: &Client, crd: &CustomResourceDefinition) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("byok-e2e").force(),
        &Patch::Apply(crd),
    )
    .await?;
    tokio::time::timeout(
        WAIT,
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .context("CRD not established in time")??;
    Ok(())
}

/// The operator flags a test wants; defaults match `make run` (dev flags on, fake endpoints).
pub fn dev_config(env: &TestEnv, fake: &FakeProvider) -> anyhow::Result<startup::Config> {
    let overrides = [
        ProviderKind::Anthropic,
        ProviderKind::OpenAI,
        ProviderKind::Google,
        ProviderKind::Vertex,
    ]
    .iter()
    .map(|p| format!("{p}={}", fake.base_url(*p)))
    .chain([format!("vertex-token={}", fake.vertex_token_url())])
    .collect::<Vec<_>>();
    Ok(startup::Config {
        watch_namespace: Some(env.namespace.clone()),
        operator_namespace: env.namespace.clone(),
        keyring_secret: controller::keyring::DEFAULT_KEYRING_SECRET.into(),
        create_keyring: true,
        egress: EgressConfig {
            allow_private: true,
            extra_ca_pem: Some(fake.ca_pem().into_bytes()),
            ..Default::default()
        },
        endpoints: Endpoints::parse(&overrides).map_err(|e| anyhow::anyhow!(e))?,
        leader: Some(LeaderConfig {
            lease_name: "byok-operator".into(),
            identity: format!("test-{}", env.namespace),
        }),
        admin_addr: None,
        verify_limits: (
            byok_operator::providers::limiter::DEFAULT_CONCURRENCY,
            byok_operator::providers::limiter::DEFAULT_RATE_PER_SECOND,
        ),
        max_concurrent_reconciles: 32,
        metrics: Default::default(),
        serving: None,
    })
}

/// A controller running in this process; stopped when dropped.
pub struct RunningController {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningController {
    pub async fn start(env: &TestEnv, config: startup::Config) -> anyhow::Result<Self> {
        install_crds(&env.client).await?;
        // Counted in `config.metrics`, so a test can see what the controller asked for.
        let client = byok_operator::metrics::counted_client(
            crate::envtest::shared().kube_config().await?,
            config.metrics.clone(),
        )?;
        Ok(Self::start_with_client(client, config))
    }

    /// Starts the controller with a client of the test's choosing (one that counts
    /// requests, say); the CRD must be installed already.
    pub fn start_with_client(client: Client, config: startup::Config) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Logs for `RUST_LOG=... cargo test -- --nocapture` (off unless RUST_LOG is set).
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let task = tokio::spawn(startup::run(client, config, std::future::pending()));
        Self { task }
    }

    /// How the controller ended, once it has (`None` while it runs).
    pub fn ended(&mut self) -> Option<String> {
        use futures::FutureExt as _;
        match (&mut self.task).now_or_never()? {
            Ok(Ok(())) => Some("returned".into()),
            Ok(Err(e)) => Some(format!("failed: {e:#}")),
            Err(e) => Some(format!("panicked or was cancelled: {e}")),
        }
    }

    /// False once the controller returned or panicked.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Puts a key-source Secret (labelled `byok.dev/key-source: "true"`).
pub async fn put_secret(env: &TestEnv, name: &str, entries: &[(&str, &str)]) -> anyhow::Result<()> {
    let labels = [(names::KEY_SOURCE_LABEL, names::KEY_SOURCE_VALUE)];
    put_secret_labelled(env, name, entries, &labels).await
}

/// Puts a Secret with exactly `labels` (none: a Secret that is not a key source).
pub async fn put_secret_labelled(
    env: &TestEnv,
    name: &str,
    entries: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> anyhow::Result<()> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        data: Some(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    env.api::<Secret>()
        .patch(
            name,
            &PatchParams::apply("byok-e2e").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    Ok(())
}

/// Creates a ProviderKey from raw JSON (so tests can send what the Rust types cannot express).
pub async fn create_pk(
    env: &TestEnv,
    name: &str,
    spec: serde_json::Value,
) -> Result<(), kube::Error> {
    let resource = kube::core::ApiResource::erase::<ProviderKey>(&());
    let api: Api<kube::core::DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.namespace, &resource);
    let mut obj = kube::core::DynamicObject::new(name, &resource);
    obj.data = serde_json::json!({ "spec": spec });
    api.create(&PostParams::default(), &obj).await?;
    Ok(())
}

/// Puts a key-source Secret `<name>-raw` holding `key` and a ProviderKey `name` with `spec`
/// (its `secretRef` set to that Secret), and waits for Ready.
pub async fn put_ready_pk(
    env: &TestEnv,
    name: &str,
    key: &str,
    mut spec: serde_json::Value,
) -> anyhow::Result<()> {
    let source = format!("{name}-raw");
    put_secret(env, &source, &[("api-key", key)]).await?;
    spec["secretRef"] = serde_json::json!({"name": source});
    create_pk(env, name, spec).await?;
    wait_pk(env, name, "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    Ok(())
}

/// Waits (on a watch, with a deadline) until the ProviderKey satisfies `cond`.
pub async fn wait_pk(
    env: &TestEnv,
    name: &str,
    what: &str,
    cond: impl Fn(&ProviderKey) -> bool,
) -> anyhow::Result<ProviderKey> {
    let api = env.api::<ProviderKey>();
    let found = tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, move |pk: Option<&ProviderKey>| {
            pk.is_some_and(&cond)
        }),
    )
    .await;
    match found {
        Ok(Ok(Some(pk))) => Ok(pk),
        _ => {
            let now = api.get_opt(name).await?;
            anyhow::bail!(
                "timed out waiting for {name}: {what}; it is now: {:#?}",
                now.and_then(|p| p.status)
            )
        }
    }
}

/// The status of condition `type_` (e.g. "True"), reason and message.
pub fn condition(pk: &ProviderKey, type_: &str) -> Option<(String, String, String)> {
    let c = pk
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn is_condition(pk: &ProviderKey, type_: &str, status: &str, reason: &str) -> bool {
    condition(pk, type_).is_some_and(|(s, r, _)| s == status && r == reason)
}

/// Decrypts a managed Secret with the keyring the controller stored in the cluster.
pub async fn decrypt_managed(
    env: &TestEnv,
    pk_name: &str,
    as_name: &str,
) -> anyhow::Result<String> {
    let secrets = env.api::<Secret>();
    let keyring_secret = secrets
        .get(controller::keyring::DEFAULT_KEYRING_SECRET)
        .await?;
    let keyring = controller::keyring::from_secret(&keyring_secret)?;
    let managed = secrets.get(&names::managed_secret_name(pk_name)).await?;
    let envelope = managed
        .data
        .and_then(|d| d.get(names::ENVELOPE_KEY).cloned())
        .context("managed Secret has no envelope")?;
    let plain = keyring.decrypt(&env.namespace, as_name, &envelope.0)?;
    let (_origin, key) =
        byok_operator::crypto::open_payload(secrecy::ExposeSecret::expose_secret(&plain));
    Ok(String::from_utf8(key.to_vec())?)
}

/// A random key with a provider's real prefix, long enough to be searched for in logs.
pub fn random_key(prefix: &str) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 48)
    )
}

/// The operator binary, built (if stale) next to this test binary: target/debug/byok-operator.
pub fn operator_binary() -> anyhow::Result<std::path::PathBuf> {
    Ok(workspace_binaries()?.join("byok-operator"))
}

/// The sidecar's binary, built (if stale) next to this test binary: target/debug/byok-proxy.
pub fn proxy_binary() -> anyhow::Result<std::path::PathBuf> {
    Ok(workspace_binaries()?.join("byok-proxy"))
}

/// Builds the workspace's binaries (if stale) and returns their directory.
fn workspace_binaries() -> anyhow::Result<std::path::PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    // Variables cargo sets for this test process would make the nested build look different
    // from the outer one and rebuild everything; keep only the user's own settings.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().to_string();
        let cargo_set = (name.starts_with("CARGO_")
            && !matches!(name.as_str(), "CARGO_HOME" | "CARGO_TARGET_DIR"))
            || name.starts_with("__CARGO")
            || name == "RUSTC_BOOTSTRAP";
        if cargo_set {
            build.env_remove(&name);
        }
    }
    let status = build
        // --all-targets: the same feature set as `cargo test --workspace --all-targets`, so
        // under `make test` this is a no-op instead of a second build of the dependencies.
        .args(["build", "--quiet", "--workspace", "--all-targets"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()?;
    anyhow::ensure!(status.success(), "building the workspace's binaries failed");
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    Ok(dir.to_path_buf())
}

/// A ServiceAccount in `operator`'s namespace with exactly the chart's RBAC for an operator
/// that lives there and watches `watched` (`watchNamespaces`), named `byok-operator` as in the
/// default install (the webhook configuration rule names it); returns its token. Cluster-wide
/// names are the default install's: one such operator per test binary.
pub async fn operator_service_account_token(
    operator: &TestEnv,
    watched: &str,
) -> anyhow::Result<String> {
    let sets = [
        "fullnameOverride=byok-operator".to_string(),
        format!("watchNamespaces={{{watched}}}"),
    ];
    crate::manifests::chart_service_account_token(operator, "byok-operator", &sets)
        .await
        .map(|(token, _)| token)
}

/// A `byok-operator` process a test started: killed (and reaped) when dropped.
pub struct OperatorProcess(pub std::process::Child);

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free right now (the OS picks it; another process could take it before
/// it is bound again, which on a test machine does not happen in practice).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
