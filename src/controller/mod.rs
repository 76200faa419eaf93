//! The ProviderKey controller: wiring (watches, keyring, leader election, backoff). The
//! reconcile pipeline is in [`reconcile`], its pure decisions in [`plan`].

pub mod keyring;
pub mod leader;
pub mod plan;
pub mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::crd::ProviderKey;
use crate::crypto::{CryptoError, Keyring};
use crate::egress::EgressConfig;
use crate::providers::{Endpoints, Verifier};

pub const FIELD_MANAGER: &str = "byok-operator";
pub const FINALIZER: &str = "byok.dev/managed-secret";

/// Errors that end a reconcile early. Provider outcomes are not errors: they are statuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the operator keyring is not loaded yet")]
    KeyringUnavailable,
    #[error("managed Secret cannot be decrypted: {0}")]
    Crypto(#[from] CryptoError),
    #[error("managed Secret holds a key that is not UTF-8 text")]
    CorruptManagedSecret,
    #[error("ProviderKey has no namespace")]
    MissingNamespace,
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Per-object exponential backoff (kube-runtime has none built in): 1s, 2s, 4s ... 5 min,
/// with jitter so that many keys failing together do not retry in lockstep.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<ObjectRef<ProviderKey>, u32>>,
}

pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Backoff {
    pub fn next_delay(&self, obj: &ObjectRef<ProviderKey>) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(obj.clone()).or_insert(0);
        let delay = backoff_delay(*n, rand::random::<f64>());
        *n = n.saturating_add(1);
        delay
    }

    pub fn reset(&self, obj: &ObjectRef<ProviderKey>) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(obj);
    }
}

/// The delay before retry number `failures` (0-based), with `jitter` in [0, 1) adding up to 20%.
pub fn backoff_delay(failures: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX));
    let capped = exp.min(BACKOFF_MAX);
    capped.mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0))
}

pub struct Context {
    pub client: Client,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub verifier: Verifier,
    pub recorder: Recorder,
    pub backoff: Backoff,
    keyring: RwLock<Option<Keyring>>,
}

impl Context {
    pub fn keyring(&self) -> Option<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_keyring(&self, keyring: Keyring) {
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = Some(keyring);
    }
}

/// Everything the controller needs besides a client.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch only this namespace (all namespaces when `None`).
    pub watch_namespace: Option<String>,
    /// Where the keyring Secret and the leader Lease live.
    pub operator_namespace: String,
    pub keyring_secret: String,
    pub egress: EgressConfig,
    pub endpoints: Endpoints,
    /// `None` runs without leader election (a single replica, or tests).
    pub leader: Option<leader::LeaderConfig>,
    /// Where to serve `/metrics`, `/livez` and `/readyz` (`None`: no admin server).
    pub admin_addr: Option<std::net::SocketAddr>,
}

fn error_policy(pk: Arc<ProviderKey>, error: &Error, ctx: Arc<Context>) -> Action {
    let obj = ObjectRef::from_obj(&*pk);
    let delay = ctx.backoff.next_delay(&obj);
    tracing::warn!(providerkey = %obj, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Runs the controller until `shutdown` completes (or leadership is lost).
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let http = crate::egress::http_client(&config.egress)?;
    let verifier = Verifier::new(http, config.endpoints.clone(), config.egress.allow_private);
    let keyring_api: Api<Secret> = Api::namespaced(client.clone(), &config.operator_namespace);

    // The admin server comes first: liveness holds while this replica waits for leadership.
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let _stop_admin = match config.admin_addr {
        Some(addr) => {
            let server = crate::metrics::admin_server(addr, metrics.clone())?;
            let handle = server.handle();
            tokio::spawn(server);
            Some(StopOnDrop(handle))
        }
        None => None,
    };

    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.operator_namespace);
    if let Some(leader) = &config.leader {
        leader::acquire(&leases, leader).await;
    }

    let keyring = keyring::load_or_create(&keyring_api, &config.keyring_secret).await?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics: metrics.clone(),
        verifier,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "byok-operator".into(),
                instance: None,
            },
        ),
        backoff: Backoff::default(),
        keyring: RwLock::new(Some(keyring)),
    });

    let (pks, secrets): (Api<ProviderKey>, Api<Secret>) = match &config.watch_namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };

    // Keyring changes (an operator key rotation) reconcile every ProviderKey.
    let keyring_ctx = ctx.clone();
    let keyring_changes = watcher(
        keyring_api,
        watcher::Config::default().fields(&format!("metadata.name={}", config.keyring_secret)),
    )
    .applied_objects()
    .filter_map(move |secret| {
        let ctx = keyring_ctx.clone();
        async move {
            let secret = secret.ok()?;
            match keyring::from_secret(&secret) {
                Ok(keyring) => {
                    let changed = ctx.keyring().is_none_or(|k| k.active_id() != keyring.active_id());
                    ctx.set_keyring(keyring);
                    changed.then_some(())
                }
                Err(e) => {
                    tracing::error!(error = %e, "the keyring Secret is unusable; keeping the last good keyring");
                    None
                }
            }
        }
    });

    let controller = Controller::new(pks, watcher::Config::default().any_semantic());
    let store = controller.store();
    let managed_selector = format!(
        "{}={}",
        reconcile::MANAGED_BY_LABEL.0,
        reconcile::MANAGED_BY_LABEL.1
    );
    let controller = controller
        .owns(
            secrets.clone(),
            watcher::Config::default().labels(&managed_selector),
        )
        // A change to a source Secret reconciles the ProviderKeys that reference it.
        .watches(
            secrets,
            watcher::Config::default(),
            move |secret: Secret| {
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|pk| pk.namespace() == ns && pk.spec.secret_ref.name == name)
                    .map(|pk| ObjectRef::from_obj(&*pk))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(keyring_changes)
        .graceful_shutdown_on(shutdown);

    let lost_leadership = async {
        match &config.leader {
            Some(leader) => leader::hold(&leases, leader).await,
            None => std::future::pending().await,
        }
    };
    metrics.set_ready(true);
    let reconciling = controller
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| {
            metrics.reconciled(result.is_ok());
            async move {
                match result {
                    Ok((obj, _)) => tracing::trace!(providerkey = %obj, "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                }
            }
        });
    tokio::select! {
        _ = reconciling => Ok(()),
        _ = lost_leadership => anyhow::bail!("lost leadership; exiting so another replica can take over"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_five_minutes() {
        let delays: Vec<u64> = (0..12).map(|n| backoff_delay(n, 0.0).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff_delay(40, 0.0), BACKOFF_MAX);
        assert!(backoff_delay(3, 0.999) < Duration::from_secs(10));
    }

    #[test]
    fn backoff_is_per_object_and_resets() {
        let b = Backoff::default();
        let a = ObjectRef::<ProviderKey>::new("a").within("ns");
        let other = ObjectRef::<ProviderKey>::new("b").within("ns");
        let first = b.next_delay(&a);
        let second = b.next_delay(&a);
        assert!(second > first);
        assert!(
            b.next_delay(&other) < second,
            "another object starts from the base delay"
        );
        b.reset(&a);
        assert!(b.next_delay(&a) < second);
    }
}
