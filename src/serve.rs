//! What every replica serves over TLS, leader or not: the admission webhook (at a random
//! path, [`crate::serving::webhook_path`]) and the key broker (`/v1/keys/...`), each on its
//! own listener. The webhook is called by the API server (with a client certificate when
//! `--webhook-client-ca` is set); the broker authenticates every request with a token.
//! Separate listeners keep a pod from reaching the webhook through the broker's port (and
//! its network policy) and vice versa.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements, Secret};
use kube::api::{Api, PostParams};

use crate::broker::{Broker, EgressPolicy};
use crate::controller::Context;
use crate::controller::watches::Watches;
use crate::metrics::Ready;
use crate::serving::path_store::{self, PathSettings};
use crate::serving::webhook_path::WebhookPaths;
use crate::serving::{self as certs, Bundle, ReloadableCert};
use crate::webhook::handler::Injector;
use crate::webhook::patch::InjectSettings;

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// The operator's own CA and serving certificate, in a Secret it keeps (default).
    Own(certs::CertSettings),
    /// Mounted files (`tls.crt`, `tls.key`, `ca.crt`), e.g. from cert-manager.
    Dir(PathBuf),
}

/// The sidecar the webhook injects.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub image: String,
    /// See [`InjectSettings::operator_image`].
    pub operator_image: String,
    pub pull_policy: String,
    pub resources: ResourceRequirements,
    pub ports: crate::webhook::patch::SidecarPorts,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub webhook_addr: SocketAddr,
    pub broker_addr: SocketAddr,
    /// How sidecars reach the broker (the serving certificate covers its host).
    pub broker_url: String,
    pub tls: TlsSource,
    /// The MutatingWebhookConfiguration whose `caBundle` the operator keeps current (own
    /// certificates only; `None` leaves it alone).
    pub webhook_configuration: Option<String>,
    /// Where the webhook's path is kept and published.
    pub webhook_path: PathSettings,
    /// Callers of the webhook must present a certificate issued by one of these CAs (PEM).
    pub webhook_client_ca_pem: Option<String>,
    pub proxy: ProxyOptions,
    pub key_lease: Duration,
    pub egress: EgressPolicy,
    /// The operator's namespace: the certificate Secret and the start-up check live there.
    pub operator_namespace: String,
    /// HTTP workers per listener.
    pub workers: usize,
}

/// Stops both servers when dropped.
pub struct Serving {
    handles: Vec<actix_web::dev::ServerHandle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    paths: Arc<WebhookPaths>,
}

impl Serving {
    /// The path the webhook is served at now.
    pub fn webhook_path(&self) -> String {
        self.paths.current()
    }

    /// Stops both listeners: no new connections; requests in flight finish and HTTP/1.1
    /// keep-alive connections (the API server's) close at once; HTTP/2 connections (the
    /// sidecars') are served until [`STOP_GRACE`] ends and then dropped, so a sidecar's poll
    /// cut there is retried on another replica while it keeps its key. The background tasks
    /// (trust bundles asked for by the webhook) stop after the listeners.
    pub async fn stop(mut self) {
        // Cancelled half-way, `Drop` still finds the handles and stops the listeners.
        futures::future::join_all(self.handles.iter().map(|h| h.stop(true))).await;
        self.handles.clear();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How long a stopping listener waits for requests in flight.
const STOP_GRACE: u64 = 10;

impl Drop for Serving {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for handle in self.handles.drain(..) {
            tokio::spawn(async move { handle.stop(true).await });
        }
    }
}

/// Loads the certificate (creating the CA on a first install), checks that native sidecars
/// survive admission, and starts both listeners. Returns once they are bound.
pub async fn start(
    config: ServeConfig,
    ctx: Arc<Context>,
    watches: Arc<Watches>,
) -> anyhow::Result<Serving> {
    let client = ctx.client.clone();
    let mut tasks = Vec::new();
    let (bundle, resolver) = load_certificate(&config, &client).await?;
    let reloadable = Arc::new(ReloadableCert::new(&bundle)?);
    let tls = certs::server_config(reloadable.clone());
    let webhook_tls = match &config.webhook_client_ca_pem {
        Some(pem) => certs::server_config_with_client_ca(reloadable.clone(), pem)?,
        None => tls.clone(),
    };
    let paths = webhook_paths(&config, &client, &mut tasks).await?;

    let native_sidecars = native_sidecars_survive(&client, &config.operator_namespace).await;
    let current = Arc::new(crate::sidecar::Current::new(InjectSettings {
        proxy_image: config.proxy.image.clone(),
        operator_image: config.proxy.operator_image.clone(),
        pull_policy: config.proxy.pull_policy.clone(),
        resources: config.proxy.resources.clone(),
        broker_url: config.broker_url.clone(),
        broker_ca_pem: bundle.ca_pem.clone(),
        previous_ca_pem: bundle.previous_ca_pem.clone(),
        broker_hosts: broker_hosts(&config.broker_url, &bundle.cert_chain_pem),
        native_sidecars,
        ports: config.proxy.ports,
    }));
    let injector = Arc::new(Injector::new(
        watches.providerkeys.clone(),
        watches.pods.clone(),
        current.clone(),
        ctx.metrics.clone(),
    ));
    let (ca_tx, ca_rx) =
        keep_trust_bundles(&client, &ctx, &watches, &injector, &bundle, &mut tasks);
    keep_certificate(
        &config,
        &client,
        &current,
        &reloadable,
        resolver,
        (ca_tx, ca_rx),
        &mut tasks,
    );

    let broker = Arc::new(Broker::new(
        ctx.clone(),
        watches,
        config.key_lease,
        config.egress.clone(),
        current.clone(),
    ));
    let (handles, webhook_addr, broker_addr) =
        listen(&config, injector, broker, paths.clone(), webhook_tls, tls)?;
    ctx.metrics.set_ready(Ready::Certificate, true);
    tracing::info!(webhook = %webhook_addr, broker = %broker_addr, native_sidecars, client_certificates = config.webhook_client_ca_pem.is_some(), "serving the webhook and the key broker");
    Ok(Serving {
        handles,
        tasks,
        paths,
    })
}

/// The serving certificate: the operator's own (its CA created on a first install), or the
/// mounted files (and the directory to follow).
async fn load_certificate(
    config: &ServeConfig,
    client: &kube::Client,
) -> anyhow::Result<(Bundle, Option<PathBuf>)> {
    Ok(match &config.tls {
        TlsSource::Own(settings) => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
            (ensure_with_retries(&api, settings).await?, None)
        }
        TlsSource::Dir(dir) => (certs::load_dir(dir)?, Some(dir.clone())),
    })
}

/// The webhook's path: every replica follows the Secret, and points the configuration at it.
async fn webhook_paths(
    config: &ServeConfig,
    client: &kube::Client,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Arc<WebhookPaths>> {
    let path_api: Api<Secret> = Api::namespaced(client.clone(), &config.webhook_path.namespace);
    let path = path_store::ensure_with_retries(&path_api, &config.webhook_path).await?;
    let paths = Arc::new(WebhookPaths::new(&path, config.webhook_path.grace));
    // Serve where the configuration sends now from the first request on (an upgrade from a
    // release that served `/mutate` keeps working while this replica starts).
    if let Some(name) = &config.webhook_path.configuration {
        let mwcs: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
            Api::all(client.clone());
        if let Ok(Some(mwc)) = mwcs.get_opt(name).await {
            paths.observe_configuration(
                &certs::webhook_path::carried(&mwc),
                std::time::Instant::now(),
            );
        }
    }
    tasks.push(tokio::spawn(path_store::follow(
        path_api,
        config.webhook_path.clone(),
        paths.clone(),
    )));
    tasks.push(tokio::spawn(path_store::publish(
        client.clone(),
        config.webhook_path.clone(),
        paths.clone(),
    )));

    Ok(paths)
}

/// The namespaces' trust bundles follow the CA: the leader writes every one that is due,
/// every replica creates a missing one for a pod it injects. Returns the channel of what
/// clients trust (the CA, and during a CA rotation the one before too).
fn keep_trust_bundles(
    client: &kube::Client,
    ctx: &Context,
    watches: &Watches,
    injector: &Injector,
    bundle: &Bundle,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> (
    tokio::sync::watch::Sender<String>,
    tokio::sync::watch::Receiver<String>,
) {
    let (ca_tx, ca_rx) = tokio::sync::watch::channel(bundle.trust_pem());
    {
        let pods = watches.pods.clone();
        let metrics = ctx.metrics.clone();
        tasks.push(tokio::spawn(certs::trust_bundle::keep(
            client.clone(),
            ca_rx.clone(),
            move || {
                pods.as_ref()
                    .map(|p| {
                        p.state()
                            .iter()
                            .filter_map(|pod| pod.metadata.namespace.clone())
                            .collect()
                    })
                    .unwrap_or_default()
            },
            move || metrics.is_leader(),
        )));
        // Bounded: a flood of admissions drops requests (the leader's pass is the backstop).
        let (wanted_tx, wanted_rx) = tokio::sync::mpsc::channel(256);
        injector.request_trust_bundles(wanted_tx);
        tasks.push(tokio::spawn(certs::trust_bundle::create_missing(
            client.clone(),
            ca_rx.clone(),
            wanted_rx,
        )));
    }
    (ca_tx, ca_rx)
}

/// Keeps the certificate (and the caBundle) current, and publishes each new CA to the
/// sidecar settings and the trust bundles.
fn keep_certificate(
    config: &ServeConfig,
    client: &kube::Client,
    current: &Arc<crate::sidecar::Current>,
    reloadable: &Arc<ReloadableCert>,
    resolver: Option<PathBuf>,
    (ca_tx, ca_rx): (
        tokio::sync::watch::Sender<String>,
        tokio::sync::watch::Receiver<String>,
    ),
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let publish_ca = {
        let current = current.clone();
        move |bundle: &Bundle| {
            current.set_broker_ca(&bundle.ca_pem, bundle.previous_ca_pem.as_deref());
            let trust = bundle.trust_pem();
            ca_tx.send_if_modified(|ca| {
                let changed = *ca != trust;
                if changed {
                    ca.clone_from(&trust);
                }
                changed
            });
        }
    };

    match (&config.tls, resolver) {
        (TlsSource::Own(settings), _) => {
            if let Some(name) = &config.webhook_configuration {
                tasks.push(tokio::spawn(keep_ca_bundle(
                    client.clone(),
                    name.clone(),
                    ca_rx,
                )));
            }
            let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
            let current = current.clone();
            let broker_url = config.broker_url.clone();
            tasks.push(tokio::spawn(certs::keep_current(
                api,
                settings.clone(),
                reloadable.clone(),
                current.ca_recheck(),
                move |bundle: &Bundle| {
                    current.set_broker_hosts(broker_hosts(&broker_url, &bundle.cert_chain_pem));
                    publish_ca(bundle);
                },
            )));
        }
        (TlsSource::Dir(_), Some(dir)) => {
            // cert-manager renews the serving certificate, and its issuer may change the CA
            // (`ca.crt`): the trust bundles follow (the caBundle is cainjector's).
            let current = current.clone();
            let broker_url = config.broker_url.clone();
            tasks.push(tokio::spawn(certs::keep_dir_current(
                dir,
                reloadable.clone(),
                certs::certs::DEFAULT_CHECK_EVERY,
                move |bundle: &Bundle| {
                    current.set_broker_hosts(broker_hosts(&broker_url, &bundle.cert_chain_pem));
                    publish_ca(bundle);
                },
            )));
        }
        (TlsSource::Dir(_), None) => {}
    }
}

/// Binds both listeners (webhook and broker), each with its TLS configuration, and starts
/// them; returns their handles and the addresses bound.
fn listen(
    config: &ServeConfig,
    injector: Arc<Injector>,
    broker: Arc<Broker>,
    paths: Arc<WebhookPaths>,
    webhook_tls: rustls::ServerConfig,
    tls: rustls::ServerConfig,
) -> anyhow::Result<(Vec<actix_web::dev::ServerHandle>, SocketAddr, SocketAddr)> {
    let injector_data = web::Data::new(injector);
    let paths_data = web::Data::new(paths);
    let webhook = HttpServer::new(move || {
        App::new()
            .app_data(injector_data.clone())
            .app_data(paths_data.clone())
            .configure(crate::webhook::handler::routes)
    })
    .workers(config.workers)
    .disable_signals()
    .shutdown_timeout(STOP_GRACE)
    .bind_rustls_0_23(config.webhook_addr, webhook_tls)?;
    let webhook_addr = webhook
        .addrs()
        .first()
        .copied()
        .unwrap_or(config.webhook_addr);
    let webhook = webhook.run();

    let broker_data = web::Data::new(broker);
    let broker = HttpServer::new(move || {
        App::new()
            .app_data(broker_data.clone())
            .configure(crate::broker::routes)
    })
    .workers(config.workers)
    .disable_signals()
    .shutdown_timeout(STOP_GRACE)
    .bind_rustls_0_23(config.broker_addr, tls)?;
    let broker_addr = broker
        .addrs()
        .first()
        .copied()
        .unwrap_or(config.broker_addr);
    let broker = broker.run();

    let handles = vec![webhook.handle(), broker.handle()];
    tokio::spawn(webhook);
    tokio::spawn(broker);
    Ok((handles, webhook_addr, broker_addr))
}

/// The names a sidecar may ask the broker at: the host of `--broker-url`, and the full
/// Service names (`<name>.<namespace>.svc[.<domain>]`) the serving certificate is for (old
/// Service names kept as aliases). Not short names, `localhost` or other IPs: a tenant can
/// make a short name resolve in their own namespace, and a loopback address is the pod's own.
fn broker_hosts(broker_url: &str, cert_chain_pem: &str) -> Vec<String> {
    let mut hosts: Vec<String> = certs::certs::leaf_sans(cert_chain_pem)
        .into_iter()
        .filter(|san| {
            let labels: Vec<&str> = san.split('.').collect();
            labels.len() >= 3
                && labels.iter().all(|l| !l.is_empty() && *l != "*")
                && (labels[2] == "svc")
        })
        .collect();
    if let Some(host) = url::Url::parse(broker_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
    {
        hosts.push(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase(),
        );
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Keeps the caBundle of the named configuration equal to the current CA: watches that one
/// object (so one applied after the operator starts, or re-created by an upgrade, gets it at
/// once) and follows CA changes. Writes only when it differs.
async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    mut ca: tokio::sync::watch::Receiver<String>,
) {
    use futures::StreamExt;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut changes = std::pin::pin!(
        watcher(
            api,
            watcher::Config::default().fields(&format!("metadata.name={name}"))
        )
        .default_backoff()
        .applied_objects()
    );
    let mut current: Option<MutatingWebhookConfiguration> = None;
    loop {
        tokio::select! {
            next = changes.next() => match next {
                Some(Ok(mwc)) => current = Some(mwc),
                Some(Err(e)) => {
                    tracing::warn!(webhook_configuration = %name, error = %e, "watching the webhook configuration");
                    continue;
                }
                None => return,
            },
            changed = ca.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let ca_pem = ca.borrow().clone();
        let Some(mwc) = &current else { continue };
        if certs::ca_bundle::ca_bundle_patch(mwc, &ca_pem).is_none() {
            continue;
        }
        if let Err(e) = certs::apply_ca_bundle(&client, &name, &ca_pem).await {
            tracing::warn!(webhook_configuration = %name, error = %e, "setting the webhook caBundle failed; retrying on the next change");
        }
    }
}

/// Whether an init container's `restartPolicy: Always` survives admission (native sidecars
/// on): a server-side dry run of a pod in the operator's namespace, once at start-up. An
/// API server that cannot be asked counts as a yes, with a warning: refusing every pod
/// for a failed check would be worse than a sidecar that a too-old cluster drops.
/// [`certs::ensure`], riding out API errors for a while: a freshly started API server (or
/// one that is briefly unreachable) should delay serving, not end the process.
async fn ensure_with_retries(
    api: &Api<Secret>,
    settings: &crate::serving::CertSettings,
) -> Result<certs::Bundle, certs::CertError> {
    let mut delay = std::time::Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match certs::ensure(api, settings).await {
            Err(e @ certs::CertError::Api { .. }) if attempt < ENSURE_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "loading the serving certificate; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// About 30 s of retries (0.25 s doubling to 5 s).
const ENSURE_ATTEMPTS: u32 = 10;

async fn native_sidecars_survive(client: &kube::Client, namespace: &str) -> bool {
    let pod: Pod = match serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "byok-native-sidecar-check-"},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [check_container("sidecar", Some("Always"))],
            "containers": [check_container("main", None)],
        }
    })) {
        Ok(pod) => pod,
        Err(_) => return true,
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod,
        )
        .await
    {
        Ok(created) => {
            let survived = created
                .spec
                .and_then(|s| s.init_containers)
                .and_then(|c| c.into_iter().next())
                .and_then(|c| c.restart_policy)
                .is_some_and(|p| p == "Always");
            if !survived {
                tracing::error!(
                    "this cluster drops restartPolicy on init containers (native sidecars are off, Kubernetes < 1.29?): opted-in pods will be refused"
                );
            }
            survived
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not check for native sidecars (dry-run pod); assuming they work");
            true
        }
    }
}

fn check_container(name: &str, restart_policy: Option<&str>) -> serde_json::Value {
    let mut c = serde_json::json!({
        "name": name, "image": "byok.dev/native-sidecar-check:none",
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
    });
    if let Some(policy) = restart_policy {
        c["restartPolicy"] = policy.into();
    }
    c
}
