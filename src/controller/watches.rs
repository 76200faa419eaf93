//! The watches every replica keeps, leading or not: the caches the webhook and the broker
//! answer from, and the changes the controller reconciles while this replica leads.
//!
//! Leadership governs reconciling only. The reflectors run for the life of the process, so
//! a replica that loses the lease keeps serving from warm caches, and one that gains it
//! starts reconciling without listing anything again.

use std::sync::{Arc, Mutex};

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, PartialObjectMeta};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::Resource;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;

use super::{Context, cache, keyring};
use crate::crd::ProviderKey;
use crate::names;

/// Passes a watch's changes on to the controller of the current leadership term, if any.
/// Nothing is kept while no one subscribes: a new term reconciles everything once instead.
pub struct Fanout<K> {
    subscriber: Mutex<Option<mpsc::UnboundedSender<K>>>,
}

impl<K: Clone> Fanout<K> {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            subscriber: Mutex::new(None),
        })
    }

    fn publish(&self, item: &K) {
        let mut subscriber = self.subscriber.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = subscriber.as_ref()
            && tx.unbounded_send(item.clone()).is_err()
        {
            *subscriber = None;
        }
    }

    /// Every change from now on. Replaces the previous subscriber, whose stream ends.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<K> {
        let (tx, rx) = mpsc::unbounded();
        *self.subscriber.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }
}

/// The caches, and their changes for the controller.
pub struct Watches {
    pub providerkeys: Store<DeserializeGuard<ProviderKey>>,
    /// Opted-in pods (label `byok.dev/inject: "true"`), metadata only; `None` when this
    /// replica does not serve the broker.
    pub pods: Option<Store<PartialObjectMeta<Pod>>>,
    pub providerkey_changes: Arc<Fanout<DeserializeGuard<ProviderKey>>>,
    pub source_changes: Arc<Fanout<Secret>>,
    pub managed_changes: Arc<Fanout<Secret>>,
    pub keyring_changes: Arc<Fanout<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Watches {
    /// Starts every watch. The Secret writers are the context's stores' (see
    /// [`Context::sources`]); `watch_pods` adds the pod cache the broker checks.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        client: kube::Client,
        watch_namespace: Option<&str>,
        ctx: Arc<Context>,
        sources: reflector::store::Writer<Secret>,
        managed: reflector::store::Writer<Secret>,
        keyring_api: Api<Secret>,
        keyring_ref: k8s_openapi::api::core::v1::ObjectReference,
        watch_pods: bool,
    ) -> Self {
        fn api<K>(client: &kube::Client, ns: Option<&str>) -> Api<K>
        where
            K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
            K::DynamicType: Default,
        {
            match ns {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            }
        }
        let source_changes = Fanout::new();
        let managed_changes = Fanout::new();
        let providerkey_changes = Fanout::new();
        let keyring_changes = Fanout::new();
        let mut tasks = Vec::new();

        let secrets: Api<Secret> = api(&client, watch_namespace);
        tasks.push(drive(
            "source Secrets",
            reflector::reflector(
                sources,
                watcher(
                    secrets.clone(),
                    watcher::Config::default().labels(&names::key_source_selector()),
                )
                .default_backoff()
                .modify(cache::strip_source),
            )
            .touched_objects(),
            Some(source_changes.clone()),
        ));
        tasks.push(drive(
            "managed Secrets",
            reflector::reflector(
                managed,
                watcher(
                    secrets,
                    watcher::Config::default().labels(names::PROVIDERKEY_LABEL),
                )
                .default_backoff()
                .modify(cache::strip_managed),
            )
            .touched_objects(),
            Some(managed_changes.clone()),
        ));

        // The ProviderKey watch starts once the Secret caches are filled: no decision (the
        // controller's, the webhook's, the broker's) reads a Secret cache still filling.
        let (providerkeys, pk_writer) = reflector::store::<DeserializeGuard<ProviderKey>>();
        let pks: Api<DeserializeGuard<ProviderKey>> = api(&client, watch_namespace);
        let (sources_ready, managed_ready) = (ctx.sources.clone(), ctx.managed.clone());
        let pk_stream = futures::stream::once(async move {
            // Only a dropped writer ends these early, and then the process is stopping.
            let _ = tokio::join!(
                sources_ready.wait_until_ready(),
                managed_ready.wait_until_ready()
            );
            reflector::reflector(
                pk_writer,
                watcher(pks, watcher::Config::default().any_semantic())
                    .default_backoff()
                    .modify(|guard| cache::identity(guard.meta_mut())),
            )
        })
        .flatten()
        .applied_objects();
        tasks.push(drive(
            "ProviderKeys",
            pk_stream,
            Some(providerkey_changes.clone()),
        ));

        let keyring_fanout = keyring_changes.clone();
        let keyring_stream = keyring::changes(keyring_api, ctx, keyring_ref);
        tasks.push(tokio::spawn(async move {
            let mut changes = std::pin::pin!(keyring_stream);
            while changes.next().await.is_some() {
                keyring_fanout.publish(&());
            }
        }));

        let pods = watch_pods.then(|| {
            let (store, writer) = reflector::store::<PartialObjectMeta<Pod>>();
            let pods: Api<PartialObjectMeta<Pod>> = match watch_namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let selector = format!("{}={}", names::INJECT_LABEL, names::INJECT_VALUE);
            tasks.push(drive(
                "pods",
                reflector::reflector(
                    writer,
                    watcher(pods, watcher::Config::default().labels(&selector))
                        .default_backoff()
                        .modify(cache::strip_pod),
                )
                .touched_objects(),
                None,
            ));
            store
        });

        Self {
            providerkeys,
            pods,
            providerkey_changes,
            source_changes,
            managed_changes,
            keyring_changes,
            tasks,
        }
    }

    /// Waits until every cache has listed once.
    pub async fn ready(&self, ctx: &Context) {
        let _ = tokio::join!(
            ctx.sources.wait_until_ready(),
            ctx.managed.wait_until_ready(),
            self.providerkeys.wait_until_ready(),
        );
        if let Some(pods) = &self.pods {
            let _ = pods.wait_until_ready().await;
        }
    }
}

/// Runs one watch for the life of the process: errors are retried (with the watcher's
/// backoff) and logged, changes go to `fanout`.
fn drive<K, S>(what: &'static str, stream: S, fanout: Option<Arc<Fanout<K>>>) -> JoinHandle<()>
where
    K: Clone + Send + 'static,
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => {
                    if let Some(fanout) = &fanout {
                        fanout.publish(&obj);
                    }
                }
                Err(e) => tracing::warn!(watch = what, error = %e, "watch failed; retrying"),
            }
        }
    })
}
