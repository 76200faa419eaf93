//! Who a bearer token belongs to. A token is first checked locally ([`super::jwt`]: shape,
//! audience, time, issuer, the pod it names, the signature with the API server's published
//! keys): a made-up token is refused there and costs the API server nothing. One that passes
//! goes to a TokenReview (it alone knows about revocation and deleted bound objects), whose
//! result is cached by the token's hash until the token expires or for [`REVIEW_TTL`],
//! whichever comes first. Pod existence is checked against the pod cache on every request,
//! so a deleted or recreated pod is refused at once.
//!
//! Reviews in flight are bounded, overall ([`MAX_REVIEWS_IN_FLIGHT`]) and per namespace of
//! the token ([`MAX_REVIEWS_PER_NAMESPACE`]), so one namespace's tokens cannot take every
//! slot. A token that finds no slot is answered 503 `TooBusy`; cached answers never wait.
//! Accepted and refused reviews are cached apart, each bounded, and a full cache takes no new
//! entry rather than evicting a live one: refusals cannot push out the sidecars' reviews.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::decide::{Caller, Denial, caller_from_user};
use super::jwt::{self, Discovery, PodCheck, Precheck, TokenFault};
use crate::metrics::Metrics;
use crate::names;

/// The longest a review is trusted.
pub const REVIEW_TTL: Duration = Duration::from_secs(60);
/// A refused token is remembered this long, so a caller retrying a bad token costs the API
/// server one review per this period.
const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// Accepted reviews remembered at most (a sidecar's token is renewed about hourly).
const MAX_ACCEPTED: usize = 65_536;
/// Refused reviews remembered at most.
const MAX_REFUSED: usize = 16_384;
/// TokenReviews in flight at once, all namespaces together.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 16;
/// TokenReviews in flight at once for the tokens of one namespace.
pub const MAX_REVIEWS_PER_NAMESPACE: usize = 4;
/// How long a token waits for a review slot before the answer is 503 `TooBusy`.
const SLOT_WAIT: Duration = Duration::from_secs(2);
/// How long one TokenReview may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server's issuer and keys are fetched again at most this often (when a token
/// names a key or an issuer not known).
pub const DISCOVERY_REFETCH: Duration = Duration::from_secs(30);
/// How long fetching them may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Namespaces with a review slot table; idle tables are dropped past this many.
const MAX_NAMESPACE_SLOTS: usize = 1_024;

/// Who is calling, as far as the broker can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Reviewed by the API server (now or in the cache).
    Known(Caller),
    /// Refused, by the local checks or a (cached) review.
    Refused(Denial),
    /// No review could be made now (`denial`: too busy, or the API server did not answer).
    /// `verified`: the caller, when the token's signature checked out locally; the broker
    /// may still give it a final refusal (a key deleted, a pod gone), never the key.
    Unreviewed {
        denial: Denial,
        verified: Option<Caller>,
    },
}

pub struct TokenReviews {
    api: Api<TokenReview>,
    accepted: Cache<Caller>,
    refused: Cache<Denial>,
    discovery: Discoverer,
    slots: Slots,
    stale: StaleBudget,
    metrics: Arc<Metrics>,
}

impl TokenReviews {
    pub fn new(client: kube::Client, metrics: Arc<Metrics>) -> Self {
        Self {
            api: Api::all(client.clone()),
            accepted: Cache::new(MAX_ACCEPTED),
            refused: Cache::new(MAX_REFUSED),
            discovery: Discoverer::new(client, metrics.clone()),
            slots: Slots::new(MAX_REVIEWS_IN_FLIGHT, MAX_REVIEWS_PER_NAMESPACE),
            stale: StaleBudget::default(),
            metrics,
        }
    }

    /// The caller behind `token`. `pod_check`: the broker's checks of the caller's namespace
    /// and pod, `None` while the pod cache has not listed (then skipped).
    pub async fn identify(
        &self,
        token: &SecretString,
        pod_check: Option<PodCheck<'_>>,
    ) -> Identity {
        let token = token.expose_secret();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(cached) = self.cached(&hash) {
            return cached;
        }
        let (checked, stale) = self.precheck(token, pod_check).await;
        let (caller, verified) = match checked {
            Ok(Precheck::Verified(caller)) => (caller, true),
            Ok(Precheck::Unverified(caller)) => (caller, false),
            Err(denial) => return Identity::Refused(denial),
        };
        let signature = if verified { "verified" } else { "unverified" };
        let unreviewed = |denial| Identity::Unreviewed {
            denial,
            verified: verified.then(|| caller.clone()),
        };
        let Some(_slot) = self.slots.acquire(&caller.namespace, SLOT_WAIT).await else {
            return unreviewed(Denial::TooBusy);
        };
        // The same token may have been reviewed for another request meanwhile.
        if let Some(cached) = self.cached(&hash) {
            return cached;
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![names::TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &review),
        )
        .await;
        let reviewed = match reviewed {
            Ok(Ok(reviewed)) => reviewed,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "TokenReview failed");
                self.metrics.token_review("failed", signature);
                return unreviewed(Denial::ReviewFailed);
            }
            Err(_) => {
                tracing::warn!(timeout = ?REVIEW_TIMEOUT, "TokenReview timed out");
                self.metrics.token_review("failed", signature);
                return unreviewed(Denial::ReviewFailed);
            }
        };
        let now = Instant::now();
        match judge(&reviewed) {
            Ok(caller) => {
                self.metrics.token_review("accepted", signature);
                if stale {
                    // A good token with a key or issuer the broker did not know: the API
                    // server's changed; the next such token fetches them again at once.
                    self.discovery.forget_attempt();
                }
                let left = jwt::seconds_left(token, jiff::Timestamp::now().as_second())
                    .map_or(REVIEW_TTL, Duration::from_secs);
                self.accepted
                    .insert(hash, now + left.min(REVIEW_TTL), caller.clone(), now);
                Identity::Known(caller)
            }
            Err(denial) => {
                self.metrics.token_review("refused", signature);
                self.refused
                    .insert(hash, now + REFUSAL_TTL, denial.clone(), now);
                Identity::Refused(denial)
            }
        }
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<Identity> {
        let now = Instant::now();
        if let Some(caller) = self.accepted.get(hash, now) {
            return Some(Identity::Known(caller));
        }
        self.refused.get(hash, now).map(Identity::Refused)
    }

    /// The local checks, with the API server's issuer and keys fetched when first needed and
    /// again (at most every [`DISCOVERY_REFETCH`]) when a token names ones not known. Fetching
    /// them failing never refuses a token: the TokenReview decides then.
    ///
    /// A token whose key or issuer is still not known after that (the API server has just
    /// begun signing with a new key, or accepts an older issuer it no longer advertises) is
    /// not refused for it either: it goes to a review unverified, a few a second
    /// ([`STALE_REVIEWS_PER_SECOND`], so made-up `kid`s cost the API server a trickle), and
    /// one such token accepted makes the next fetch come at once. The second value: whether
    /// that happened.
    async fn precheck(
        &self,
        token: &str,
        pod_check: Option<PodCheck<'_>>,
    ) -> (Result<Precheck, Denial>, bool) {
        let now = jiff::Timestamp::now().as_second();
        let run = |doc: Option<&Discovery>| jwt::precheck(token, now, doc, pod_check);
        let mut found = self.discovery.current();
        if found.doc.is_none() {
            found = self.discovery.refresh().await;
        }
        let mut checked = run(found.doc.as_deref());
        let mut stale = false;
        if needs_fresh_keys(&checked) {
            found = self.discovery.refresh().await;
            checked = run(found.doc.as_deref());
            if needs_fresh_keys(&checked) && (!found.ok || self.stale.allow(Instant::now())) {
                stale = found.ok;
                checked = run(None);
            }
        }
        (checked, stale)
    }
}

/// Unverified reviews of tokens whose key or issuer is not known after a fetch, per second.
pub const STALE_REVIEWS_PER_SECOND: u32 = 2;

/// A budget of [`STALE_REVIEWS_PER_SECOND`], over all namespaces.
#[derive(Default)]
struct StaleBudget(Mutex<Option<(Instant, u32)>>);

impl StaleBudget {
    fn allow(&self, now: Instant) -> bool {
        let mut window = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match window.as_mut() {
            Some((start, used)) if now.duration_since(*start) < Duration::from_secs(1) => {
                *used += 1;
                *used <= STALE_REVIEWS_PER_SECOND
            }
            _ => {
                *window = Some((now, 1));
                true
            }
        }
    }
}

/// Refusals that may come from knowing an older issuer or key set than the API server's.
fn needs_fresh_keys(checked: &Result<Precheck, Denial>) -> bool {
    matches!(
        checked,
        Err(Denial::TokenRejected(
            TokenFault::UnknownKey | TokenFault::WrongIssuer
        ))
    )
}

/// The review's verdict: authenticated, for our audience, and a pod-bound ServiceAccount.
fn judge(review: &TokenReview) -> Result<Caller, Denial> {
    let status = review.status.as_ref().ok_or(Denial::Unauthenticated)?;
    if status.authenticated != Some(true) {
        return Err(Denial::Unauthenticated);
    }
    // The API server echoes the audiences the token is valid for among those we asked
    // about; an empty list would mean it ignored ours.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == names::TOKEN_AUDIENCE))
    {
        return Err(Denial::WrongAudience);
    }
    let user = status.user.as_ref().ok_or(Denial::Unauthenticated)?;
    caller_from_user(
        user.username.as_deref().unwrap_or_default(),
        &user.extra.clone().unwrap_or_default(),
    )
    .ok_or(Denial::NotPodBound)
}

/// Answers by token hash until they expire. Never evicts a live entry: when full of them,
/// a new answer is not cached (it costs a review next time instead).
struct Cache<T> {
    max: usize,
    entries: Mutex<HashMap<[u8; 32], (Instant, T)>>,
    /// When the map was last swept of expired entries.
    swept: Mutex<Option<Instant>>,
}

impl<T: Clone> Cache<T> {
    fn new(max: usize) -> Self {
        Self {
            max,
            entries: Mutex::default(),
            swept: Mutex::default(),
        }
    }

    fn get(&self, hash: &[u8; 32], now: Instant) -> Option<T> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(hash)
            .filter(|(until, _)| *until > now)
            .map(|(_, v)| v.clone())
    }

    /// Whether it was cached.
    fn insert(&self, hash: [u8; 32], until: Instant, value: T, now: Instant) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.max && !entries.contains_key(&hash) {
            // A sweep of the whole map at most once a second: a cache full of live entries
            // must not cost a scan under the lock for every answer.
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
                *swept = Some(now);
                entries.retain(|_, (until, _)| *until > now);
            }
            if entries.len() >= self.max {
                return false;
            }
        }
        entries.insert(hash, (until, value));
        true
    }
}

/// Review slots: a global bound and one per namespace.
struct Slots {
    global: Arc<Semaphore>,
    per_namespace: usize,
    namespaces: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A review may run while this is held.
struct Slot {
    _namespace: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl Slots {
    fn new(global: usize, per_namespace: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(global)),
            per_namespace,
            namespaces: Mutex::default(),
        }
    }

    /// A slot for a token of `namespace`, or `None` after `wait`. The namespace's own slot
    /// first: a namespace waits for the shared ones with at most `per_namespace` requests,
    /// and the shared ones go first come, first served.
    async fn acquire(&self, namespace: &str, wait: Duration) -> Option<Slot> {
        let own = {
            let mut namespaces = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
            if namespaces.len() >= MAX_NAMESPACE_SLOTS && !namespaces.contains_key(namespace) {
                // Idle: nobody holds or waits for one of its permits.
                namespaces.retain(|_, s| Arc::strong_count(s) > 1);
            }
            namespaces
                .entry(namespace.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_namespace)))
                .clone()
        };
        let global = self.global.clone();
        tokio::time::timeout(wait, async move {
            let own = own.acquire_owned().await.ok()?;
            let global = global.acquire_owned().await.ok()?;
            Some(Slot {
                _namespace: own,
                _global: global,
            })
        })
        .await
        .ok()
        .flatten()
    }
}

/// The API server's issuer and keys, as last fetched.
#[derive(Clone, Default)]
struct Found {
    doc: Option<Arc<Discovery>>,
    /// When they were last asked for (successfully or not).
    attempted: Option<Instant>,
    /// Whether that last attempt succeeded.
    ok: bool,
}

struct Discoverer {
    client: kube::Client,
    found: Mutex<Found>,
    /// One fetch at a time; the others wait for its result.
    fetching: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl Discoverer {
    fn new(client: kube::Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            found: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    fn current(&self) -> Found {
        self.found.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lets the next [`Self::refresh`] fetch at once.
    fn forget_attempt(&self) {
        self.found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attempted = None;
    }

    /// Fetches again unless that was tried less than [`DISCOVERY_REFETCH`] ago.
    async fn refresh(&self) -> Found {
        let _one = self.fetching.lock().await;
        let current = self.current();
        if current
            .attempted
            .is_some_and(|at| at.elapsed() < DISCOVERY_REFETCH)
        {
            return current;
        }
        let fetched = tokio::time::timeout(DISCOVERY_TIMEOUT, fetch_discovery(&self.client))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        found.attempted = Some(Instant::now());
        found.ok = fetched.is_ok();
        self.metrics.jwks_fetch(found.ok);
        match fetched {
            Ok(doc) => {
                tracing::debug!(issuer = %doc.issuer, keys = ?doc.keys, "fetched the API server's ServiceAccount token issuer and keys");
                found.doc = Some(Arc::new(doc));
            }
            Err(e) => tracing::warn!(
                error = %e,
                "fetching the API server's ServiceAccount token issuer and keys failed; tokens signed with keys not known go to a TokenReview unchecked"
            ),
        }
        found.clone()
    }
}

/// `GET /.well-known/openid-configuration` and `GET /openid/v1/jwks` on the API server.
async fn fetch_discovery(client: &kube::Client) -> Result<Discovery, String> {
    let get = |path: &'static str| async move {
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        client
            .request_text(request)
            .await
            .map_err(|e| format!("GET {path}: {e}"))
    };
    let issuer = jwt::parse_issuer(&get("/.well-known/openid-configuration").await?)
        .ok_or("the OpenID configuration names no issuer")?;
    let keys = jwt::parse_jwks(&get("/openid/v1/jwks").await?).ok_or("not a JWKS document")?;
    Ok(Discovery { issuer, keys })
}

#[cfg(test)]
mod tests {

    #[test]
    fn stale_key_reviews_are_a_trickle() {
        let budget = StaleBudget::default();
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| budget.allow(t0)).count();
        assert_eq!(allowed, STALE_REVIEWS_PER_SECOND as usize);
        assert!(budget.allow(t0 + Duration::from_secs(1)), "a new second");
    }

    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn review(authenticated: bool, audiences: &[&str], username: &str, bound: bool) -> TokenReview {
        let extra = bound.then(|| {
            std::collections::BTreeMap::from([
                (
                    "authentication.kubernetes.io/pod-name".to_string(),
                    vec!["p".to_string()],
                ),
                (
                    "authentication.kubernetes.io/pod-uid".to_string(),
                    vec!["u".to_string()],
                ),
            ])
        });
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(username.into()),
                    extra,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_review_is_trusted_only_when_everything_holds() {
        let sa = "system:serviceaccount:team:app";
        assert!(judge(&review(true, &["byok.dev"], sa, true)).is_ok());
        assert_eq!(
            judge(&review(false, &["byok.dev"], sa, true)),
            Err(Denial::Unauthenticated)
        );
        assert_eq!(
            judge(&review(true, &[], sa, true)),
            Err(Denial::WrongAudience)
        );
        assert_eq!(
            judge(&review(true, &["https://kubernetes.default.svc"], sa, true)),
            Err(Denial::WrongAudience)
        );
        assert_eq!(
            judge(&review(true, &["byok.dev"], sa, false)),
            Err(Denial::NotPodBound)
        );
        assert_eq!(
            judge(&review(true, &["byok.dev"], "alice", true)),
            Err(Denial::NotPodBound)
        );
        assert_eq!(judge(&TokenReview::default()), Err(Denial::Unauthenticated));
    }

    #[test]
    fn a_full_cache_keeps_its_live_entries() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let cache = Cache::new(2);
        assert!(cache.insert([1; 32], later, "good", now));
        assert!(cache.insert([2; 32], now + Duration::from_secs(1), "short", now));
        // Full of live entries: the newcomer is not cached, nobody is evicted.
        assert!(!cache.insert([3; 32], later, "flood", now));
        assert_eq!(cache.get(&[1; 32], now), Some("good"));
        assert_eq!(cache.get(&[3; 32], now), None);
        // Once one has expired, its room is taken.
        let after = now + Duration::from_secs(2);
        assert_eq!(cache.get(&[2; 32], after), None);
        assert!(cache.insert([3; 32], later, "flood", after));
        assert_eq!(cache.get(&[1; 32], after), Some("good"));
        assert_eq!(cache.get(&[3; 32], after), Some("flood"));
    }

    #[tokio::test(start_paused = true)]
    async fn one_namespace_cannot_take_every_review_slot() {
        let slots = Slots::new(3, 2);
        let wait = Duration::from_millis(100);
        let a1 = slots.acquire("a", wait).await.expect("a's first");
        let a2 = slots.acquire("a", wait).await.expect("a's second");
        assert!(
            slots.acquire("a", wait).await.is_none(),
            "a holds its share"
        );
        let b1 = slots
            .acquire("b", wait)
            .await
            .expect("b gets the last shared slot");
        assert!(slots.acquire("c", wait).await.is_none(), "all taken");
        drop(a1);
        let c1 = slots.acquire("c", wait).await.expect("a slot freed");
        drop((a2, b1, c1));
        assert!(slots.acquire("a", wait).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_token_gets_the_next_free_slot() {
        let slots = Arc::new(Slots::new(1, 1));
        let held = slots.acquire("a", Duration::ZERO).await.expect("free");
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("b", Duration::from_secs(1)).await.is_some() })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(waiter.await.expect("joined"), "b got the freed slot");
    }
}
