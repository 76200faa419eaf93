//! The ProviderKey controller: its context, backoff and one leadership term of reconciling
//! ([`reconcile_while_leading`]); watches, keyring and leader election beside it. The
//! reconcile pipeline is in [`reconcile`], its pure decisions in [`plan`]. What starts it
//! (and the webhook, the broker and the admin server) is [`crate::startup`].

pub mod cache;
pub mod crd_check;
pub mod events;
pub mod keyring;
pub mod leader;
pub mod plan;
pub mod reconcile;
pub mod swaps;
pub mod watches;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use crate::crd::ProviderKey;
use crate::crypto::{CryptoError, Keyring};
use crate::names;
use crate::providers::Verifier;

pub use crate::names::{FIELD_MANAGER, FINALIZER};

/// Errors that end a reconcile early. Provider outcomes and every problem a user can act on
/// are not errors: they are statuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("encryption failed: {0}")]
    Crypto(#[from] CryptoError),
    #[error("ProviderKey has no namespace")]
    MissingNamespace,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    /// The label errors are counted by in `byok_reconcile_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Error::Kube(_) => "KubernetesAPIError",
            Error::Crypto(_) => "EncryptionFailed",
            Error::MissingNamespace => "MissingNamespace",
            Error::Internal(_) => "Internal",
        }
    }

    /// Transient errors are retried with backoff; permanent ones wait for the object to
    /// change. Only an object without a namespace (which the API server cannot store for a
    /// namespaced kind) is permanent.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::MissingNamespace)
    }
}

/// Per-object exponential backoff (kube-runtime has none built in): 1s, 2s, 4s ... 5 min,
/// with jitter so that many keys failing together do not retry in lockstep.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<ObjectRef<ProviderKey>, (u32, tokio::time::Instant)>>,
}

pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Objects remembered; past this the table starts over (at worst one retry comes early).
const BACKOFF_MAX_OBJECTS: usize = 65_536;

impl Backoff {
    pub fn next_delay(&self, obj: &ObjectRef<ProviderKey>) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= BACKOFF_MAX_OBJECTS && !failures.contains_key(obj) {
            failures.clear();
        }
        let entry = failures
            .entry(obj.clone())
            .or_insert((0, tokio::time::Instant::now()));
        let delay = backoff_delay(entry.0, rand::random::<f64>());
        entry.0 = entry.0.saturating_add(1);
        entry.1 = tokio::time::Instant::now() + delay;
        delay
    }

    /// How long until this object may call its provider again, if it is backing off. A
    /// reconcile woken early (by a watch event) must not cut the backoff short.
    pub fn remaining(&self, obj: &ObjectRef<ProviderKey>) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (_, until) = failures.get(obj)?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        (!left.is_zero()).then_some(left)
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
    pub recorder: events::Publisher,
    pub backoff: Backoff,
    /// Source Secrets: only those labelled `byok.dev/key-source: "true"`, rewritten by
    /// [`cache::strip_source`].
    pub sources: Store<Secret>,
    /// Managed Secrets (labelled `byok.dev/providerkey`), rewritten by [`cache::strip_managed`].
    pub managed: Store<Secret>,
    /// Verification turns reserved at a provider host and not yet reached, by ProviderKey.
    turns: Mutex<HashMap<ObjectRef<ProviderKey>, tokio::time::Instant>>,
    /// Envelopes opened, by managed Secret; forgotten when the keyring changes.
    opened: Mutex<HashMap<ObjectRef<Secret>, cache::Opened>>,
    keyring: RwLock<Option<Keyring>>,
    /// Our own writes, until the ProviderKey cache has caught up with them (see [`Self::fresher`]).
    written: Mutex<HashMap<ObjectRef<ProviderKey>, Written>>,
    /// Objects that do not deserialise, already reported (uid, generation).
    invalid_reported: Mutex<HashSet<(String, Option<i64>)>>,
}

impl Context {
    /// The controller's context over the shared parts: the client, where it counts, how it
    /// verifies and reports, the Secret caches and the keyring (if loaded).
    pub fn new(
        client: Client,
        metrics: Arc<crate::metrics::Metrics>,
        verifier: Verifier,
        recorder: events::Publisher,
        (sources, managed): (Store<Secret>, Store<Secret>),
        keyring: Option<Keyring>,
    ) -> Self {
        Context {
            client,
            metrics,
            verifier,
            recorder,
            backoff: Backoff::default(),
            sources,
            managed,
            opened: Mutex::default(),
            turns: Mutex::default(),
            keyring: RwLock::new(keyring),
            written: Mutex::default(),
            invalid_reported: Mutex::default(),
        }
    }
}

/// Whether resourceVersion `a` is older than `b`, when both are integers.
fn older(a: &str, b: Option<&str>) -> bool {
    match (a.parse::<u64>(), b.map(str::parse::<u64>)) {
        (Ok(a), Some(Ok(b))) => a < b,
        _ => false,
    }
}

/// A verification turn this close is waited for inside the reconcile.
pub const TURN_GRACE: Duration = Duration::from_millis(20);

/// How many objects the in-memory memos hold before they start over.
const MEMO_MAX_OBJECTS: usize = 4096;
/// The opened-envelope memo holds one entry per managed Secret in steady state; past this it
/// starts over (each key then costs one GET and one decryption).
const OPENED_MAX_OBJECTS: usize = 1 << 20;

/// The newest copy of a ProviderKey we wrote, and the resourceVersions it supersedes.
struct Written {
    superseded: Vec<String>,
    latest: ProviderKey,
}

impl Context {
    pub fn keyring(&self) -> Option<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_keyring(&self, keyring: Option<Keyring>) {
        let mut current = self.keyring.write().unwrap_or_else(|p| p.into_inner());
        let unchanged = matches!((&*current, &keyring), (Some(a), Some(b)) if a.same_as(b));
        *current = keyring;
        // What opens depends on the keyring's keys. The watch delivers the unchanged Secret
        // too (its first event may come after reconciles began): that keeps what was opened.
        if !unchanged {
            self.opened
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
    }

    /// The envelope of this managed Secret opened before, if its digest is still `digest`.
    pub fn opened(
        &self,
        secret: &ObjectRef<Secret>,
        digest: Option<&str>,
    ) -> Option<cache::Opened> {
        let opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        opened
            .get(secret)
            .filter(|o| Some(o.digest.as_str()) == digest)
            .cloned()
    }

    pub fn remember_opened(&self, secret: ObjectRef<Secret>, opened: cache::Opened) {
        let mut memo = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if memo.len() >= OPENED_MAX_OBJECTS && !memo.contains_key(&secret) {
            memo.clear();
        }
        memo.insert(secret, opened);
    }

    pub fn forget_opened(&self, secret: &ObjectRef<Secret>) {
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(secret);
    }

    /// The cache can lag behind our own writes: a reconcile triggered by our status write may
    /// still see the object from before it, and would verify the same key again. When the
    /// cached copy is one we have since superseded, use the copy the API server returned.
    pub fn fresher(&self, cached: &ProviderKey) -> ProviderKey {
        let key = ObjectRef::from_obj(cached);
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match (written.get(&key), cached.resource_version()) {
            (Some(w), Some(rv)) if w.superseded.contains(&rv) => w.latest.clone(),
            // Someone else wrote in between (a label, say) and the cache shows that write but
            // not yet ours: keep their change, with the status we wrote. resourceVersions are
            // opaque to clients, but etcd's are increasing integers; if they ever are not,
            // this memo only costs one repeated verification.
            (Some(w), Some(rv)) if older(&rv, w.latest.resource_version().as_deref()) => {
                let mut merged = cached.clone();
                merged.status = w.latest.status.clone();
                merged
            }
            (Some(_), _) => {
                // The cache caught up (or someone else wrote): it is the truth again.
                written.remove(&key);
                cached.clone()
            }
            (None, _) => cached.clone(),
        }
    }

    /// Records that `before` was superseded by our write, which returned `after`.
    pub fn remember(&self, before: &ProviderKey, after: &ProviderKey) {
        let key = ObjectRef::from_obj(before);
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        // Entries leave when the cache catches up; one for an object deleted before that
        // would stay. A memo, not a record: starting over costs one repeated verification.
        if written.len() >= MEMO_MAX_OBJECTS && !written.contains_key(&key) {
            written.clear();
        }
        let entry = written.entry(key).or_insert_with(|| Written {
            superseded: Vec::new(),
            latest: after.clone(),
        });
        entry.superseded.extend(before.resource_version());
        entry.latest = after.clone();
    }

    /// Drops every memo about a ProviderKey that is gone (and its managed Secret).
    pub fn forget(&self, key: &ObjectRef<ProviderKey>) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        let managed = ObjectRef::<Secret>::new(&names::managed_secret_name(&key.name))
            .within(key.namespace.as_deref().unwrap_or_default());
        self.forget_opened(&managed);
    }

    /// This object's turn to call `host`: `Ok(at)`, at most [`TURN_GRACE`] away, or
    /// `Err(wait)` until it comes. A reconcile never queues for a provider: it comes back at
    /// its reserved turn, so 10,000 keys due at one host never hold the workers a key of
    /// another host needs. When every in-flight slot of the host is taken (a slow host), it
    /// comes back in a second or two without reserving.
    pub fn verification_turn(
        &self,
        obj: &ObjectRef<ProviderKey>,
        host: &str,
    ) -> Result<tokio::time::Instant, Duration> {
        let limiter = self.verifier.limiter();
        let now = tokio::time::Instant::now();
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        let at = match turns.remove(obj) {
            Some(at) => at,
            None if limiter.busy(host) => {
                return Err(Duration::from_secs(1).mul_f64(1.0 + rand::random::<f64>()));
            }
            None => limiter.reserve(host),
        };
        if at <= now + TURN_GRACE {
            return Ok(at);
        }
        if turns.len() >= OPENED_MAX_OBJECTS {
            // A memo, not a record: a forgotten turn is reserved again (one slot wasted).
            turns.clear();
        }
        turns.insert(obj.clone(), at);
        Err(at - now)
    }

    /// Whether an undeserialisable object (uid, generation) was reported already.
    pub fn invalid_reported(&self, key: &(String, Option<i64>)) -> bool {
        self.invalid_reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    pub fn mark_invalid_reported(&self, key: (String, Option<i64>)) {
        let mut reported = self
            .invalid_reported
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if reported.len() >= MEMO_MAX_OBJECTS {
            reported.clear();
        }
        reported.insert(key);
    }
}

fn error_policy(
    obj: Arc<DeserializeGuard<ProviderKey>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_error(error.reason());
    let meta = obj.meta();
    let key = ObjectRef::<ProviderKey>::new(meta.name.as_deref().unwrap_or_default())
        .within(meta.namespace.as_deref().unwrap_or_default());
    if !error.is_transient() {
        tracing::error!(providerkey = %key, error = %error, "reconcile failed; waiting for a change");
        return Action::await_change();
    }
    let delay = ctx.backoff.next_delay(&key);
    tracing::warn!(providerkey = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// One leadership term of reconciling, until `shutdown`. Every ProviderKey is reconciled
/// once the caches are ready (changes from before the term were not passed on), then on
/// every change.
pub async fn reconcile_while_leading(
    watches: &watches::Watches,
    ctx: Arc<Context>,
    max_concurrent_reconciles: u16,
    shutdown: futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) {
    let metrics = ctx.metrics.clone();
    let store = watches.providerkeys.clone();
    let all_at_start = futures::stream::once(watches.providerkeys_ready());
    let changed =
        |rx: futures::channel::mpsc::UnboundedReceiver<Secret>| rx.map(Ok::<_, watcher::Error>);
    let controller = Controller::for_stream(
        watches
            .providerkey_changes
            .subscribe()
            .map(Ok::<_, watcher::Error>),
        store.clone(),
    )
    .with_config(
        kube::runtime::controller::Config::default().concurrency(max_concurrent_reconciles),
    )
    .owns_stream(changed(watches.managed_changes.subscribe()))
    // A change to a source Secret (its label removed included) reconciles the
    // ProviderKeys that reference it.
    .watches_stream(
        changed(watches.source_changes.subscribe()),
        move |secret: Secret| {
            let ns = secret.namespace();
            let name = secret.name_any();
            store
                .state()
                .into_iter()
                .filter(|guard| {
                    guard
                        .0
                        .as_ref()
                        .is_ok_and(|pk| pk.namespace() == ns && pk.spec.secret_ref.name == name)
                })
                .map(|guard| ObjectRef::from_obj(&*guard))
                .collect::<Vec<_>>()
        },
    )
    .reconcile_all_on(futures::stream::select(
        all_at_start,
        watches.keyring_changes.subscribe(),
    ))
    .graceful_shutdown_on(shutdown);
    controller
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| {
            metrics.reconciled(result.is_ok());
            async move {
                match result {
                    Ok((obj, _)) => tracing::trace!(providerkey = %obj, "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                }
            }
        })
        .await;
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
