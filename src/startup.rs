//! Start-up: the one place that wires the parts together. From a client and a [`Config`] it
//! starts the admin server, loads the keyring, builds the controller's context and the
//! watches, starts the webhook and the key broker ([`crate::serve`]) on every replica, and
//! reconciles while this replica leads ([`crate::controller`]). Each part takes what it needs
//! from here; none of them starts another.

use std::sync::Arc;

use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector;

use crate::controller::{
    Context, crd_check, events, keyring, leader, reconcile_while_leading, watches,
};
use crate::egress::EgressConfig;
use crate::providers::{Endpoints, Verifier};

/// Everything the controller needs besides a client.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch only this namespace (all namespaces when `None`).
    pub watch_namespace: Option<String>,
    /// Where the keyring Secret and the leader Lease live.
    pub operator_namespace: String,
    pub keyring_secret: String,
    /// Create the keyring Secret on a first install. Off when it is provided (an existing
    /// Secret named at install): a missing one is then reported, never generated.
    pub create_keyring: bool,
    pub egress: EgressConfig,
    pub endpoints: Endpoints,
    /// `None` runs without leader election (a single replica, or tests).
    pub leader: Option<leader::LeaderConfig>,
    /// Where to serve `/metrics`, `/livez` and `/readyz` (`None`: no admin server).
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Verification calls in flight and started per second, per provider host.
    pub verify_limits: (usize, f64),
    /// ProviderKeys reconciled at once. Bounds memory and API connections: a reconcile holds
    /// at most one API request at a time, and never waits for a provider's rate.
    pub max_concurrent_reconciles: u16,
    /// Where the controller counts what it does (shared with the client that counts API
    /// requests, see [`crate::metrics::counted_client`]).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The webhook and the broker (`None`: reconcile only, as some tests do).
    pub serving: Option<crate::serve::ServeConfig>,
}

/// Runs until `shutdown` completes: the watches and (when configured) the webhook and the
/// broker on every replica, and reconciling while this replica leads. Losing the lease
/// stops reconciling, not the process; the replica waits to lead again.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let shutdown = shutdown.boxed().shared();
    let verifier = verifier(&config)?;
    let keyring_api: Api<Secret> = Api::namespaced(client.clone(), &config.operator_namespace);

    // The admin server comes first: liveness holds while caches fill and leadership waits.
    let metrics = config.metrics.clone();
    let _stop_admin = start_admin(&config)?;
    if config.serving.is_none() {
        metrics.set_ready(crate::metrics::Ready::Certificate, true);
    }

    let recorder = events::Publisher::new(
        client.clone(),
        std::env::var("POD_NAME").unwrap_or_else(|_| "byok-operator".into()),
    );
    let keyring_ref = keyring::reference(&config.operator_namespace, &config.keyring_secret);
    let keyring = load_keyring(&client, &config, &keyring_api, &keyring_ref, &recorder).await?;

    let (sources, sources_writer) = reflector::store::<Secret>();
    let (managed, managed_writer) = reflector::store::<Secret>();
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        verifier,
        recorder.clone(),
        (sources, managed),
        keyring,
    ));

    let watches = Arc::new(watches::Watches::start(
        client.clone(),
        config.watch_namespace.as_deref(),
        ctx.clone(),
        sources_writer,
        managed_writer,
        keyring_api,
        keyring_ref,
        config.serving.is_some(),
    ));
    let serving = match &config.serving {
        Some(serving) => {
            Some(crate::serve::start(serving.clone(), ctx.clone(), watches.clone()).await?)
        }
        None => None,
    };
    {
        let (watches, metrics) = (watches.clone(), metrics.clone());
        tokio::spawn(async move {
            watches.ready().await;
            metrics.set_ready(crate::metrics::Ready::Caches, true);
        });
    }

    let mut serving = serving;
    let work = lead(
        &client,
        &config,
        &ctx,
        &watches,
        &recorder,
        shutdown.clone(),
    );
    // The listeners stop as soon as the shutdown (after its drain) completes, beside the
    // reconciles finishing, not after them: the pod's termination grace bounds both. Should
    // this future be dropped instead, `serving` is dropped with it and stops its listeners.
    tokio::pin!(work);
    let outcome: anyhow::Result<()> = tokio::select! {
        outcome = &mut work => outcome,
        () = shutdown.clone() => {
            let stop = async {
                if let Some(serving) = serving.take() {
                    serving.stop().await;
                }
            };
            tokio::join!(&mut work, stop).0
        }
    };
    if let Some(serving) = serving
        && shutdown.clone().now_or_never().is_some()
    {
        // The work ended first, on the shutdown: requests in flight still finish.
        serving.stop().await;
    }
    outcome
}

/// The keyring, created on a first install when allowed; reported (metric, Event) when
/// missing.
async fn load_keyring(
    client: &Client,
    config: &Config,
    keyring_api: &Api<Secret>,
    keyring_ref: &k8s_openapi::api::core::v1::ObjectReference,
    recorder: &events::Publisher,
) -> anyhow::Result<Option<crate::crypto::Keyring>> {
    let secrets: Api<Secret> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let keyring = keyring::load_or_init(
        keyring_api,
        &secrets,
        &config.keyring_secret,
        config.create_keyring,
    )
    .await?;
    config
        .metrics
        .set_keyring_available(&keyring::metric_label(keyring_ref), keyring.is_some());
    if keyring.is_none() {
        keyring::report_missing(recorder, keyring_ref).await;
    }
    Ok(keyring)
}

/// The verifier: its HTTP client (the egress policy's) and the per-host limits.
fn verifier(config: &Config) -> anyhow::Result<Verifier> {
    let http = crate::egress::http_client(&config.egress)?;
    let (concurrency, rate) = config.verify_limits;
    Ok(
        Verifier::new(http, config.endpoints.clone(), config.egress.allow_private)
            .with_egress(&config.egress)
            .with_limiter(crate::providers::limiter::HostLimiter::new(
                concurrency,
                rate,
            )),
    )
}

/// The admin server (`/metrics`, `/livez`, `/readyz`), stopped when the guard drops.
fn start_admin(config: &Config) -> anyhow::Result<Option<StopOnDrop>> {
    Ok(match config.admin_addr {
        Some(addr) => {
            let server = crate::admin::admin_server(addr, config.metrics.clone())?;
            let handle = server.handle();
            tokio::spawn(server);
            Some(StopOnDrop(handle))
        }
        None => None,
    })
}

/// Once the CRD is current: reconciles while this replica leads, waits to lead again when it
/// loses the lease, until `shutdown`.
async fn lead(
    client: &Client,
    config: &Config,
    ctx: &Arc<Context>,
    watches: &watches::Watches,
    recorder: &events::Publisher,
    shutdown: futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) -> anyhow::Result<()> {
    let metrics = &config.metrics;
    // Serving has started: the keys in service stay available while a stale CRD blocks
    // reconciling.
    tokio::select! {
        () = crd_check::wait_until_current(client, recorder, metrics) => {}
        () = shutdown.clone() => return Ok(()),
    }

    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.operator_namespace);
    loop {
        if let Some(leader) = &config.leader {
            tokio::select! {
                () = leader::acquire(&leases, leader) => {}
                () = shutdown.clone() => return Ok(()),
            }
        }
        metrics.set_leader(true);
        let lost_leadership = async {
            match &config.leader {
                Some(leader) => leader::hold(&leases, leader).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = reconcile_while_leading(watches, ctx.clone(), config.max_concurrent_reconciles, shutdown.clone()) => {
                metrics.set_leader(false);
                return Ok(());
            }
            () = lost_leadership => {
                metrics.set_leader(false);
                tracing::error!("lost leadership: reconciling stops until this replica leads again; the webhook and the broker keep serving");
            }
        }
    }
}

/// Stops the admin server when `run` returns, however it returns.
struct StopOnDrop(actix_web::dev::ServerHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let handle = self.0.clone();
        tokio::spawn(async move { handle.stop(true).await });
    }
}
