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
use kube::Resource;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
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
    /// Opted-in pods (label `byok.dev/inject: "true"`), stripped to their metadata and who can
    /// read their `byok.dev` token (`cache::strip_pod`); `None` when this replica does not
    /// serve the broker.
    pub pods: Option<Store<Pod>>,
    /// Whose sidecar image changed while watched (only when `pods` is kept).
    pub sidecar_images: Arc<super::swaps::SidecarImages>,
    pub providerkey_changes: Arc<Fanout<DeserializeGuard<ProviderKey>>>,
    pub source_changes: Arc<Fanout<Secret>>,
    pub managed_changes: Arc<Fanout<Secret>>,
    pub keyring_changes: Arc<Fanout<()>>,
    /// True once each cache has listed: sources, managed, ProviderKeys, pods (if watched).
    ready: Vec<watch::Receiver<bool>>,
    providerkeys_ready: watch::Receiver<bool>,
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
        let source_changes = Fanout::new();
        let managed_changes = Fanout::new();
        let providerkey_changes = Fanout::new();
        let keyring_changes = Fanout::new();
        let mut tasks = Vec::new();

        let secrets: Api<Secret> = scoped_api(&client, watch_namespace);
        let mut ready = Vec::new();
        let (task, sources_ready) = watch_sources(secrets.clone(), sources, &source_changes);
        tasks.push(task);
        let (task, managed_ready) = watch_managed(secrets, managed, &managed_changes);
        tasks.push(task);
        ready.extend([sources_ready.clone(), managed_ready.clone()]);

        let (providerkeys, task, providerkeys_ready) = watch_providerkeys(
            scoped_api(&client, watch_namespace),
            [sources_ready, managed_ready],
            &providerkey_changes,
        );
        tasks.push(task);
        ready.push(providerkeys_ready.clone());

        let keyring_fanout = keyring_changes.clone();
        let keyring_stream = keyring::changes(keyring_api, ctx, keyring_ref);
        tasks.push(tokio::spawn(async move {
            let mut changes = std::pin::pin!(keyring_stream);
            while changes.next().await.is_some() {
                keyring_fanout.publish(&());
            }
        }));

        let sidecar_images = Arc::new(super::swaps::SidecarImages::default());
        let pods = watch_pods.then(|| {
            let (store, task, pods_ready) =
                watch_opted_in_pods(scoped_api(&client, watch_namespace), sidecar_images.clone());
            tasks.push(task);
            ready.push(pods_ready);
            tasks.push(tokio::spawn(forget_gone_pods(
                client.clone(),
                sidecar_images.clone(),
            )));
            store
        });

        Self {
            providerkeys,
            pods,
            sidecar_images,
            providerkey_changes,
            source_changes,
            managed_changes,
            keyring_changes,
            ready,
            providerkeys_ready,
            tasks,
        }
    }

    /// Whether every cache has listed once.
    pub fn is_ready(&self) -> bool {
        self.ready.iter().all(|r| *r.borrow())
    }

    /// Waits until every cache has listed once.
    pub async fn ready(&self) {
        futures::future::join_all(self.ready.iter().cloned().map(until_ready)).await;
    }

    /// Waits until the ProviderKey cache has listed once.
    pub fn providerkeys_ready(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        until_ready(self.providerkeys_ready.clone())
    }
}

/// The API of `K` in the watched namespace, else in all of them.
fn scoped_api<K>(client: &kube::Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The watch of labelled key sources, into the context's store.
fn watch_sources(
    secrets: Api<Secret>,
    writer: reflector::store::Writer<Secret>,
    changes: &Arc<Fanout<Secret>>,
) -> (JoinHandle<()>, watch::Receiver<bool>) {
    drive(
        "source Secrets",
        reflector::reflector(
            writer,
            watcher(
                secrets,
                watcher::Config::default().labels(&names::key_source_selector()),
            )
            .default_backoff()
            .modify(cache::strip_source),
        ),
        Some(changes.clone()),
        true,
    )
}

/// The watch of managed Secrets, into the context's store.
fn watch_managed(
    secrets: Api<Secret>,
    writer: reflector::store::Writer<Secret>,
    changes: &Arc<Fanout<Secret>>,
) -> (JoinHandle<()>, watch::Receiver<bool>) {
    drive(
        "managed Secrets",
        reflector::reflector(
            writer,
            watcher(
                secrets,
                watcher::Config::default().labels(names::PROVIDERKEY_LABEL),
            )
            .default_backoff()
            .modify(cache::strip_managed),
        ),
        Some(changes.clone()),
        true,
    )
}

/// The ProviderKey watch, which starts once the Secret caches (`secrets_ready`) are filled:
/// no decision (the controller's, the webhook's, the broker's) reads a Secret cache still
/// filling.
fn watch_providerkeys(
    pks: Api<DeserializeGuard<ProviderKey>>,
    secrets_ready: [watch::Receiver<bool>; 2],
    changes: &Arc<Fanout<DeserializeGuard<ProviderKey>>>,
) -> (
    Store<DeserializeGuard<ProviderKey>>,
    JoinHandle<()>,
    watch::Receiver<bool>,
) {
    let (store, writer) = reflector::store::<DeserializeGuard<ProviderKey>>();
    let [sources_ready, managed_ready] = secrets_ready;
    let stream = futures::stream::once(async move {
        tokio::join!(until_ready(sources_ready), until_ready(managed_ready));
        reflector::reflector(
            writer,
            watcher(pks, watcher::Config::default().any_semantic())
                .default_backoff()
                .modify(|guard| cache::identity(guard.meta_mut())),
        )
    })
    .flatten();
    // Deletes need no reconcile: the finalizer turns a delete into an update first.
    let (task, ready) = drive("ProviderKeys", stream, Some(changes.clone()), false);
    (store, task, ready)
}

/// The watch of whole pods (opted-in ones only), stripped to what the broker checks: the
/// metadata and who in the pod can read a byok.dev token. `images` sees every change.
fn watch_opted_in_pods(
    pods: Api<Pod>,
    images: Arc<super::swaps::SidecarImages>,
) -> (Store<Pod>, JoinHandle<()>, watch::Receiver<bool>) {
    let (store, writer) = reflector::store::<Pod>();
    let selector = format!("{}={}", names::INJECT_LABEL, names::INJECT_VALUE);
    let (task, ready) = drive::<Pod, _>(
        "pods",
        reflector::reflector(
            writer,
            watcher(pods, watcher::Config::default().labels(&selector))
                .default_backoff()
                .modify(cache::strip_pod)
                .inspect(move |event| {
                    if let Ok(event) = event {
                        images.observe(event);
                    }
                }),
        ),
        None,
        false,
    );
    (store, task, ready)
}

/// Runs one watch for the life of the process: errors are retried (with the watcher's
/// backoff) and logged, changed objects go to `fanout` (deleted ones only with `deletes`),
/// and `ready` turns true once the first list is in the cache.
///
/// Our own flag, not `Store::wait_until_ready`: that one wakes a single waiter, and here the
/// controller, the ProviderKey watch and `/readyz` all wait.
fn drive<K, S>(
    what: &'static str,
    stream: S,
    fanout: Option<Arc<Fanout<K>>>,
    deletes: bool,
) -> (JoinHandle<()>, watch::Receiver<bool>)
where
    K: Clone + Send + Sync + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let (ready_tx, ready_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::InitDone) => {
                    ready_tx.send_replace(true);
                }
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                    if let Some(fanout) = &fanout {
                        fanout.publish(&obj);
                    }
                }
                Ok(watcher::Event::Delete(obj)) => {
                    if let (Some(fanout), true) = (&fanout, deletes) {
                        fanout.publish(&obj);
                    }
                }
                Ok(watcher::Event::Init) => {}
                Err(e) => tracing::warn!(watch = what, error = %e, "watch failed; retrying"),
            }
        }
    });
    (task, ready_rx)
}

/// Reads the pods that left the opted-in selection (`swaps`), a batch every minute, and
/// forgets those that are gone. A read that fails keeps the entry.
async fn forget_gone_pods(client: kube::Client, images: Arc<super::swaps::SidecarImages>) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(60));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for (uid, namespace, name) in images.gone_candidates() {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            match pods.get_opt(&name).await {
                Ok(pod) => images.checked(
                    &uid,
                    pod.is_some_and(|p| p.metadata.uid.as_deref() == Some(uid.as_str())),
                ),
                Err(e) => {
                    tracing::debug!(namespace, pod = name, error = %e, "reading a pod that left the opted-in selection");
                }
            }
        }
    }
}

/// Waits until `ready` turns true (or its watch is gone).
pub async fn until_ready(mut ready: watch::Receiver<bool>) {
    let _ = ready.wait_for(|r| *r).await;
}
