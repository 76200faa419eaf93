//! The key broker: a sidecar shows its projected ServiceAccount token (audience `byok.dev`);
//! the broker checks the token itself ([`jwt`]: a made-up one costs no API request), learns
//! from a TokenReview ([`tokens`]) which pod it is, checks that pod against the pod
//! cache and the ProviderKey against its cache ([`decide`]), and answers with the key and
//! what the proxy needs to use it. See [`decide`] for when it serves.
//!
//! `GET /v1/keys/{namespace}/{name}` with `Authorization: Bearer <token>`. The answer carries
//! an `ETag`; a proxy that sends it back in `If-None-Match` gets `304 Not Modified` (no key
//! on the wire) while nothing changed. Proxies ask every few seconds: a new keyVersion or a
//! revocation reaches them within [`POLL_HINT`] plus one request. Each answer (304 too)
//! renews the lease: a proxy that cannot reach the broker stops using the key when it ends.

pub mod decide;
pub mod jwt;
pub mod tokens;
pub mod trust;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::controller::watches::Watches;
use crate::controller::{Context, cache};
use crate::crd::ProviderKey;
use crate::grant::{
    CredentialOut, GrantLimitsOut, GrantOut, GrantVertexOut, LEASE_SECONDS_HEADER,
    POLL_SECONDS_HEADER,
};
use crate::names;
use crate::providers::ProviderKind;
use crate::providers::vertex::VertexAccessToken;
use decide::{Caller, Decision, Denial, KeyFacts, PodFacts};

/// How often a proxy should ask again (sent as `x-byok-poll-seconds`).
pub const POLL_HINT: Duration = Duration::from_secs(5);
/// A Vertex access token is minted again when less than this is left of it.
const VERTEX_TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// A token refused as made up ([`jwt::TokenFault::is_forgery`]) is answered after about this
/// long (half to one and a half times it, at random, so that a flood's requests do not come
/// back in step): a client sending them back to back gets a few answers per second per
/// request in flight, and the CPU goes to the sidecars' requests. No real sidecar waits: its
/// tokens are never refused so.
const FORGED_TOKEN_DELAY: Duration = Duration::from_millis(250);
/// A Warning Event about one pod waiting for one key, at most once per this period.
const WAITING_EVENT_PERIOD: Duration = Duration::from_secs(10 * 60);
/// At most one `BrokerAddressOutdated` Event per pod in this long.
const OUTDATED_EVENT_PERIOD: Duration = Duration::from_secs(6 * 3600);
const MEMO_MAX: usize = 65_536;

/// What the broker tells proxies about egress, from the operator's own flags: nothing a
/// pod spec can set relaxes it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicy {
    /// `--insecure-allow-private-base-urls` (development only).
    pub allow_private_addresses: bool,
    /// `--extra-ca-file`, PEM (development only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_ca_pem: Option<String>,
    /// `--egress-proxy`, credentials included (the grant is a secret answer anyway).
    #[serde(
        rename = "proxyURL",
        skip_serializing_if = "Option::is_none",
        serialize_with = "proxy_url"
    )]
    pub proxy: Option<crate::egress::EgressProxy>,
}

fn proxy_url<S: serde::Serializer>(
    proxy: &Option<crate::egress::EgressProxy>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match proxy {
        Some(p) => s.serialize_str(&p.to_url_with_credentials()),
        None => s.serialize_none(),
    }
}

pub struct Broker {
    ctx: Arc<Context>,
    watches: Arc<Watches>,
    tokens: tokens::TokenReviews,
    lease: Duration,
    egress: EgressPolicy,
    /// What the webhook injects: a pod's token must be held by that sidecar alone.
    sidecar: Arc<crate::sidecar::Current>,
    /// Keys opened from managed Secrets, by Secret, with the digest of the envelope they came
    /// from: a GET and a decryption once per change of the key, not per request.
    opened: Mutex<HashMap<ObjectRef<Secret>, OpenedKey>>,
    /// Vertex access tokens, by managed Secret, until shortly before they expire. One lock
    /// per key: a slow token endpoint holds up the proxies of that key only.
    vertex_tokens: Mutex<HashMap<ObjectRef<Secret>, Arc<VertexSlot>>>,
    /// Waiting pods already told so: (pod uid, key, reason) -> when.
    waiting_told: Mutex<HashMap<(String, String, &'static str), Instant>>,
    /// Pods told they call the broker at an outdated address, by UID.
    outdated_told: Mutex<HashMap<String, Instant>>,
    /// `host[:port]` of `--broker-url` (no port when 443): where sidecars should call.
    authority: Option<String>,
    /// The trust bundle each served pod reported, and when the counts were last published.
    trust_reports: trust::Reports,
    trust_recounted: Mutex<Option<Instant>>,
    /// Whether each namespace's trust bundle is the operator's current one.
    bundles: Mutex<HashMap<String, BundleCheck>>,
    /// Bundle GETs in flight, across namespaces: a tenant's many pods cannot turn polls into
    /// an unbounded number of API requests.
    bundle_gets: tokio::sync::Semaphore,
}

/// The last check of one namespace's trust bundle.
#[derive(Clone)]
struct BundleCheck {
    ok: bool,
    checked: Instant,
    /// When it was last found current (an API error keeps that answer for a lease at most).
    verified: Option<Instant>,
    /// The digest of the bundle it was checked against.
    digest: String,
    /// The bundle replaced one the operator did not write, at this time: pods created
    /// before are not served.
    replaced_before: Option<jiff::Timestamp>,
}

/// At most this many bundle GETs at once, each given this long.
const BUNDLE_GETS: usize = 8;
const BUNDLE_GET_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a namespace's bundle check is reused: found current, and found otherwise.
const BUNDLE_CHECKED_FOR: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(2));

/// How often the trust-bundle counts are recounted (each count walks every served pod).
const TRUST_RECOUNT_EVERY: Duration = Duration::from_secs(5);

/// The last token minted for one key, and the envelope digest it was minted from.
type VertexSlot = tokio::sync::Mutex<Option<(String, VertexAccessToken)>>;

#[derive(Clone)]
struct OpenedKey {
    digest: String,
    uid: String,
    key: SecretString,
    origin: Option<String>,
    fingerprint: String,
    /// The version the managed Secret records for this envelope: read with the key, so a
    /// grant never labels one key with another's version (the ProviderKey's status is
    /// written after the Secret and reaches this replica through another watch).
    key_version: i64,
}

/// Why a key that may be served cannot be, right now (the answer is 503, retried).
struct Unavailable(String);

impl Broker {
    pub fn new(
        ctx: Arc<Context>,
        watches: Arc<Watches>,
        lease: Duration,
        egress: EgressPolicy,
        sidecar: Arc<crate::sidecar::Current>,
    ) -> Self {
        let tokens = tokens::TokenReviews::new(ctx.client.clone(), ctx.metrics.clone());
        let authority = url::Url::parse(&sidecar.settings().broker_url)
            .ok()
            .and_then(|u| {
                let host = u.host_str()?;
                Some(match u.port_or_known_default() {
                    Some(443) | None => host.to_owned(),
                    Some(port) => format!("{host}:{port}"),
                })
            });
        Self {
            ctx,
            watches,
            tokens,
            lease,
            egress,
            sidecar,
            opened: Mutex::default(),
            vertex_tokens: Mutex::default(),
            waiting_told: Mutex::default(),
            outdated_told: Mutex::default(),
            trust_reports: trust::Reports::new(lease),
            bundles: Mutex::default(),
            bundle_gets: tokio::sync::Semaphore::new(BUNDLE_GETS),
            trust_recounted: Mutex::default(),
            authority,
        }
    }

    /// What the token pre-check's [`decide::check_pod`] reads of a pod (uid, label,
    /// deletion), without the costlier sidecar and annotation checks `authorize` makes later:
    /// a flood of forged tokens naming a real pod costs a lookup.
    fn pod_presence(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.pod_lookup(namespace, name, false)
    }

    fn pod_facts(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.pod_lookup(namespace, name, true)
    }

    /// The pod from the cache; `full`: with the sidecar's shape judged and its keys parsed.
    fn pod_lookup(&self, namespace: &str, name: &str, full: bool) -> Option<PodFacts> {
        let pods = self.watches.pods.as_ref()?;
        let pod = pods.get(&ObjectRef::new(name).within(namespace))?;
        let meta = &pod.metadata;
        Some(PodFacts {
            uid: meta.uid.clone().unwrap_or_default(),
            opted_in: names::opts_in(meta.labels.as_ref()),
            // A sidecar image swapped and restored is not forgiven (see `controller::swaps`).
            injected: full
                && !self
                    .watches
                    .sidecar_images
                    .swapped(meta.uid.as_deref().unwrap_or_default())
                && pod.spec.as_ref().is_some_and(|spec| {
                    crate::sidecar::token_held_only_by_sidecar(spec, &self.sidecar.settings())
                }),
            deleting: meta.deletion_timestamp.is_some(),
            trusts_namespace_bundle: pod
                .spec
                .as_ref()
                .is_some_and(crate::sidecar::trusts_namespace_bundle),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            keys: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(names::PROVIDER_KEYS_ANNOTATION))
                .filter(|_| full)
                .and_then(|v| crate::sidecar::parse_key_names(v).ok())
                .unwrap_or_default(),
        })
    }

    /// The key in service of a Ready ProviderKey, opened from its managed Secret.
    async fn key_in_service(&self, pk: &ProviderKey, ns: &str) -> Result<OpenedKey, Unavailable> {
        let name = names::managed_secret_name(&pk.metadata.name.clone().unwrap_or_default());
        let oref = ObjectRef::<Secret>::new(&name).within(ns);
        let cached = self
            .ctx
            .managed
            .get(&oref)
            .ok_or_else(|| Unavailable("the managed Secret is not there (yet)".into()))?;
        let digest = cache::managed_digest(&cached).unwrap_or_default();
        let uid = cached.metadata.uid.clone().unwrap_or_default();
        if let Some(hit) = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&oref)
            .filter(|o| o.digest == digest && o.uid == uid)
        {
            return Ok(hit.clone());
        }
        let keyring = self
            .ctx
            .keyring()
            .ok_or_else(|| Unavailable("the operator keyring is unavailable".into()))?;
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), ns);
        let secret = secrets
            .get_opt(&name)
            .await
            .map_err(|e| Unavailable(format!("reading the managed Secret failed: {e}")))?
            .ok_or_else(|| Unavailable("the managed Secret is gone".into()))?;
        let fresh_digest = cache::managed_digest(&secret).unwrap_or_default();
        let pk_name = pk.metadata.name.as_deref().unwrap_or_default();
        let (key, sealed) =
            crate::envelope::open(&keyring, ns, pk_name, &secret).ok_or_else(|| {
                Unavailable("the managed Secret does not open with the keyring".into())
            })?;
        let opened = OpenedKey {
            digest: fresh_digest,
            uid: secret.metadata.uid.clone().unwrap_or_default(),
            key,
            origin: sealed.origin,
            fingerprint: sealed.fingerprint,
            key_version: secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(names::annotations::KEY_VERSION))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        };
        let mut memo = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if memo.len() >= MEMO_MAX && !memo.contains_key(&oref) {
            memo.clear();
        }
        memo.insert(oref, opened.clone());
        Ok(opened)
    }

    /// A Vertex access token for this key, minted again shortly before it expires.
    async fn vertex_token(
        &self,
        oref: ObjectRef<Secret>,
        opened: &OpenedKey,
    ) -> Result<VertexAccessToken, Unavailable> {
        let slot = {
            let mut slots = self.vertex_tokens.lock().unwrap_or_else(|p| p.into_inner());
            if slots.len() >= MEMO_MAX && !slots.contains_key(&oref) {
                slots.clear();
            }
            slots.entry(oref).or_default().clone()
        };
        // One mint at a time per key: proxies of that key asking together share the result.
        let mut cached = slot.lock().await;
        let margin = jiff::SignedDuration::try_from(VERTEX_TOKEN_MARGIN).unwrap_or_default();
        if let Some((digest, token)) = cached.as_ref()
            && *digest == opened.digest
            && token.expires_at > jiff::Timestamp::now() + margin
        {
            return Ok(token.clone());
        }
        let minted = self
            .ctx
            .verifier
            .credential(ProviderKind::Vertex, &opened.key)
            .await
            .map_err(|v| Unavailable(format!("minting a Vertex access token failed: {v}")))?;
        let crate::providers::Credential::AccessToken(token) = minted else {
            return Err(Unavailable("Vertex gave no access token".into()));
        };
        *cached = Some((opened.digest.clone(), token.clone()));
        Ok(token)
    }

    /// Says on the pod, once per [`WAITING_EVENT_PERIOD`], which key it waits for and why.
    async fn tell_waiting(&self, caller: &Caller, key: &str, denial: &Denial) {
        let memo_key = (caller.pod_uid.clone(), key.to_string(), denial.reason());
        if !first_in(&self.waiting_told, memo_key, WAITING_EVENT_PERIOD) {
            return;
        }
        let pod = pod_reference(caller);
        let event = Event {
            type_: EventType::Warning,
            reason: "WaitingForProviderKey".into(),
            note: Some(format!("ProviderKey {key:?}: {}", denial.message())),
            action: "ServeKey".into(),
            secondary: None,
        };
        if let Err(e) = self.ctx.recorder.publish(&event, &pod).await {
            tracing::warn!(error = %e, pod = %caller.pod_name, "publishing a Warning Event on a waiting pod failed");
        }
    }

    /// A served sidecar called the broker at `address` (the request's authority): if that is
    /// not `--broker-url`'s (a previous Service name or port, kept answering by the chart),
    /// count it and say so on the pod, once per [`OUTDATED_EVENT_PERIOD`].
    fn note_address(&self, caller: &Caller, address: Option<&str>) {
        let (Some(address), Some(current)) = (address, self.authority.as_deref()) else {
            return;
        };
        let asked = address.strip_suffix(":443").unwrap_or(address);
        if asked.eq_ignore_ascii_case(current) {
            return;
        }
        self.ctx.metrics.broker_outdated_address();
        if !first_in(
            &self.outdated_told,
            caller.pod_uid.clone(),
            OUTDATED_EVENT_PERIOD,
        ) {
            return;
        }
        let pod = pod_reference(caller);
        // The address is the pod's own (its sidecar's args): nothing of another tenant's.
        let shown: String = asked.chars().take(253).collect();
        let event = Event {
            type_: EventType::Warning,
            reason: "BrokerAddressOutdated".into(),
            note: Some(format!(
                "the byok-proxy sidecar calls the key broker at {shown:?}, which the operator keeps answering for now; it answers at {current:?}: recreate the pod (e.g. kubectl rollout restart) before the old address is removed"
            )),
            action: "ServeKey".into(),
            secondary: None,
        };
        // Not on the key's path: the answer does not wait for the Event.
        let ctx = self.ctx.clone();
        let pod_name = caller.pod_name.clone();
        tokio::spawn(async move {
            if let Err(e) = ctx.recorder.publish(&event, &pod).await {
                tracing::warn!(error = %e, pod = %pod_name, "publishing a BrokerAddressOutdated Event failed");
            }
        });
    }

    /// Whether the namespace's trust bundle is exactly the operator's current one
    /// ([`crate::serving::trust_bundle::conforms`]). Checked with a GET, reused for a few
    /// seconds; when the API server does not answer, the last answer stands (none: not
    /// current).
    async fn bundle_current(&self, namespace: &str, pod_created: Option<jiff::Timestamp>) -> bool {
        let trust = self.sidecar.settings().trust_bundle_pem();
        let digest = crate::grant::trust_bundle_digest(trust.as_bytes());
        let last = self
            .bundles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(namespace)
            .cloned()
            .filter(|c| c.digest == digest);
        if let Some(c) = &last {
            let reuse = if c.ok {
                BUNDLE_CHECKED_FOR.0
            } else {
                BUNDLE_CHECKED_FOR.1
            };
            if c.checked.elapsed() < reuse {
                return c.ok && created_after(c.replaced_before, pod_created);
            }
        }
        let Some(check) = self
            .check_bundle(namespace, &trust, digest, last.as_ref())
            .await
        else {
            return false;
        };
        let ok = check.ok && created_after(check.replaced_before, pod_created);
        self.bundles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(namespace.to_owned(), check);
        ok
    }

    /// Reads the namespace's trust bundle and compares it with `trust` (whose digest is
    /// `digest`); `last` is the previous finding for this digest. `None` when no GET could be
    /// made at all (the GETs' semaphore closed): not current.
    async fn check_bundle(
        &self,
        namespace: &str,
        trust: &str,
        digest: String,
        last: Option<&BundleCheck>,
    ) -> Option<BundleCheck> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.ctx.client.clone(), namespace);
        let got = match self.bundle_gets.acquire().await {
            Ok(_permit) => {
                tokio::time::timeout(
                    BUNDLE_GET_TIMEOUT,
                    api.get_opt(names::TRUST_BUNDLE_CONFIGMAP),
                )
                .await
            }
            Err(_) => return None,
        };
        let now = Instant::now();
        let verified_before = last.and_then(|c| c.verified);
        let check = match got {
            Ok(Ok(cm)) => {
                let ok = cm
                    .as_ref()
                    .is_some_and(|cm| crate::serving::trust_bundle::conforms(cm, trust));
                if !ok {
                    // This replica may not have read a new CA yet: look again now.
                    self.sidecar.request_ca_recheck();
                }
                BundleCheck {
                    ok,
                    checked: now,
                    verified: if ok { Some(now) } else { None },
                    digest,
                    replaced_before: cm.as_ref().and_then(replaced_at),
                }
            }
            // The API server did not answer: the last finding stands for a lease at most, and
            // is not asked again before the next reuse period.
            failed => {
                if let Ok(Err(e)) = &failed {
                    tracing::warn!(namespace, error = %e, "reading the trust bundle failed");
                } else {
                    tracing::warn!(namespace, "reading the trust bundle timed out");
                }
                BundleCheck {
                    ok: verified_before.is_some_and(|at| now.duration_since(at) < self.lease),
                    checked: now,
                    verified: verified_before,
                    digest,
                    replaced_before: last.and_then(|c| c.replaced_before),
                }
            }
        };
        Some(check)
    }

    /// A served sidecar reported the trust bundle it holds (`None`: it predates bundles).
    fn note_trust(&self, caller: &Caller, reported: Option<&str>) {
        let current = crate::grant::trust_bundle_digest(
            self.sidecar.settings().trust_bundle_pem().as_bytes(),
        );
        let held = trust::Held::of(reported, &current);
        let now = Instant::now().into_std();
        let recount = {
            let mut last = self
                .trust_recounted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last
                .is_none_or(|t| now.saturating_duration_since(t.into_std()) >= TRUST_RECOUNT_EVERY);
            if due {
                *last = Some(Instant::from_std(now));
            }
            due
        };
        if let Some(counts) = self
            .trust_reports
            .record(&caller.pod_uid, held, now, recount)
        {
            self.ctx.metrics.set_trust_bundle_pods(counts.labelled());
        }
    }

    /// Answers one request: authenticate, decide, and serve or refuse. `address` is the
    /// authority the caller asked for (its `Host`); `trust_bundle` the digest of the bundle
    /// the sidecar holds, as it reported it.
    pub async fn answer(
        &self,
        token: Option<SecretString>,
        namespace: &str,
        name: &str,
        if_none_match: Option<&str>,
        address: Option<&str>,
        trust_bundle: Option<&str>,
    ) -> HttpResponse {
        let Some(token) = token else {
            return self.refuse(None, namespace, name, &Denial::Unauthenticated);
        };
        let ready = self.watches.is_ready();
        let caller = match self.authenticate(&token, namespace, name, ready).await {
            Ok(caller) => caller,
            Err(refused) => return refused,
        };
        // A replica just started has not listed its pods and keys yet: "no such pod" would make
        // a sidecar drop a key it holds. This answer is transient: it keeps the key until its
        // lease ends.
        if !ready {
            let denial = Denial::KeyUnavailable {
                reason: "the operator is starting: its caches are still filling".into(),
            };
            return self.refuse(Some(&caller), namespace, name, &denial);
        }
        let (pod, guard) = self.lookup(&caller, namespace, name);
        let key = key_facts(guard.as_deref());
        let pk = match self
            .servable(&caller, namespace, name, pod.as_ref(), key)
            .await
        {
            Ok(pk) => pk,
            Err(refused) => return refused,
        };
        match self.grant(pk, namespace, name, if_none_match).await {
            Ok(response) => {
                let result = if response.status() == 304 {
                    "not_modified"
                } else {
                    "granted"
                };
                self.ctx.metrics.broker_answer(result);
                tracing::info!(namespace, pod = %caller.pod_name, providerkey = name, result, "key broker");
                self.note_address(&caller, address);
                self.note_trust(&caller, trust_bundle);
                response
            }
            Err(Unavailable(why)) => {
                let denial = Denial::KeyUnavailable { reason: why };
                self.tell_waiting(&caller, name, &denial).await;
                self.refuse(Some(&caller), namespace, name, &denial)
            }
        }
    }

    /// Who presents `token`, or the refusal to answer with. `ready`: this replica has listed
    /// its pods and keys.
    async fn authenticate(
        &self,
        token: &SecretString,
        namespace: &str,
        name: &str,
        ready: bool,
    ) -> Result<Caller, HttpResponse> {
        // The token's pre-check refuses a caller of another namespace, or whose pod is not
        // there, as `decide::authorize` would (it needs a listed pod cache).
        let pod_check: jwt::PodCheck<'_> = &|c: &Caller| {
            let pod = (c.namespace == namespace)
                .then(|| self.pod_presence(namespace, &c.pod_name))
                .flatten();
            decide::check_pod(c, namespace, pod.as_ref()).map(drop)
        };
        let identity = self
            .tokens
            .identify(token, ready.then_some(pod_check))
            .await;
        match identity {
            tokens::Identity::Known(caller) => Ok(caller),
            tokens::Identity::Refused(denial) => {
                if let Denial::TokenRejected(fault) = &denial
                    && fault.is_forgery()
                {
                    tokio::time::sleep(FORGED_TOKEN_DELAY.mul_f64(rand::random_range(0.5..1.5)))
                        .await;
                }
                Err(self.refuse(None, namespace, name, &denial))
            }
            tokens::Identity::Unreviewed { denial, verified } => {
                // No review now (too busy, or the API server failed). A caller whose token's
                // signature checked out still gets a final refusal when one is due: a flood
                // must not keep a revoked key alive in its sidecars until their leases end.
                let Some(caller) = verified.filter(|_| ready) else {
                    return Err(self.refuse(None, namespace, name, &denial));
                };
                let (pod, guard) = self.lookup(&caller, namespace, name);
                let key = key_facts(guard.as_deref());
                let decision = decide::authorize(&caller, namespace, name, pod.as_ref(), key);
                let answer = decide::unreviewed(decision, denial);
                Err(self.refuse(Some(&caller), namespace, name, &answer))
            }
        }
    }

    /// The ProviderKey to serve an authenticated caller, or the refusal to answer with.
    async fn servable<'a>(
        &self,
        caller: &Caller,
        namespace: &str,
        name: &str,
        pod: Option<&PodFacts>,
        key: KeyFacts<'a>,
    ) -> Result<&'a ProviderKey, HttpResponse> {
        match (decide::authorize(caller, namespace, name, pod, key), key) {
            (Decision::Serve, KeyFacts::Present(pk)) => {
                // A sidecar that trusts its namespace's bundle is served only while that is
                // the operator's: one written before the policy guarded it may name another
                // CA, and whoever holds a certificate from it could be holding this token.
                let trusts_bundle = pod.is_some_and(|p| p.trusts_namespace_bundle);
                let created = pod.and_then(|p| p.created);
                if trusts_bundle && !self.bundle_current(namespace, created).await {
                    let denial = Denial::KeyUnavailable {
                        reason: format!(
                            "the namespace's trust bundle (ConfigMap {}) is not the operator's current one yet",
                            names::TRUST_BUNDLE_CONFIGMAP
                        ),
                    };
                    return Err(self.refuse(Some(caller), namespace, name, &denial));
                }
                Ok(pk)
            }
            (Decision::Deny(denial), _) => {
                if denial.is_waiting() {
                    self.tell_waiting(caller, name, &denial).await;
                }
                Err(self.refuse(Some(caller), namespace, name, &denial))
            }
            (Decision::Serve, _) => Err(error_json(500, "Internal", "internal error")),
        }
    }

    /// The pod and the ProviderKey for a caller: only a caller of this namespace gets as far
    /// as a lookup.
    fn lookup(
        &self,
        caller: &Caller,
        namespace: &str,
        name: &str,
    ) -> (Option<PodFacts>, Option<Arc<ProviderKeyEntry>>) {
        if caller.namespace != namespace {
            return (None, None);
        }
        let pk = ObjectRef::new(name).within(namespace);
        (
            self.pod_facts(namespace, &caller.pod_name),
            self.watches.providerkeys.get(&pk),
        )
    }

    async fn grant(
        &self,
        pk: &ProviderKey,
        ns: &str,
        name: &str,
        if_none_match: Option<&str>,
    ) -> Result<HttpResponse, Unavailable> {
        let opened = self.key_in_service(pk, ns).await?;
        let params = pk.spec.provider_params().map_err(Unavailable)?;
        let kind = pk.spec.provider;
        let base = self
            .ctx
            .verifier
            .resolve_base_url(kind, &params)
            .map_err(|v| Unavailable(v.message))?;
        let origin = crate::providers::origin(&base);
        // The key goes only where it was verified; the controller re-verifies on a change.
        if opened.origin.as_deref().is_some_and(|o| o != origin) {
            return Err(Unavailable(
                "the destination changed since the key was verified".into(),
            ));
        }
        let key_version = opened.key_version;
        let vertex = if kind == ProviderKind::Vertex {
            let oref = ObjectRef::<Secret>::new(&names::managed_secret_name(name)).within(ns);
            Some(self.vertex_token(oref, &opened).await?)
        } else {
            None
        };
        let etag = etag(pk, &opened, vertex.as_ref());
        let lease_seconds = self.lease.as_secs();
        if if_none_match == Some(etag.as_str()) {
            return Ok(HttpResponse::NotModified()
                .insert_header((header::ETAG, etag))
                .insert_header((LEASE_SECONDS_HEADER, lease_seconds.to_string()))
                .insert_header((POLL_SECONDS_HEADER, POLL_HINT.as_secs().to_string()))
                .finish());
        }
        let vertex_project = vertex
            .as_ref()
            .and_then(|_| vertex_project(params.vertex_project.as_ref(), &opened.key));
        let credential = match &vertex {
            Some(token) => CredentialOut::AccessToken {
                value: &token.token,
                expires_at: token.expires_at.to_string(),
            },
            None => CredentialOut::ApiKey { value: &opened.key },
        };
        let grant = GrantOut {
            namespace: ns,
            provider_key: name,
            provider: kind,
            key_version,
            fingerprint: &opened.fingerprint,
            credential,
            origin: &origin,
            base_url: base.as_str(),
            azure_api_version: (kind == ProviderKind::Azure)
                .then_some(params.azure_api_version.as_deref())
                .flatten(),
            default_model: pk.spec.default_model.as_deref(),
            allowed_models: &pk.spec.allowed_models,
            egress: &self.egress,
            allow_credential_minting: pk.spec.allow_credential_minting,
            inject_stream_usage: pk.spec.injects_stream_usage(),
            per_pod_limits: grant_limits(&pk.spec),
            vertex: vertex_project
                .as_deref()
                .zip(pk.spec.vertex.as_ref())
                .map(|(project, v)| GrantVertexOut {
                    project,
                    location: &v.location,
                }),
            lease_seconds,
            poll_seconds: POLL_HINT.as_secs(),
        };
        // Room up front: a growing Vec would leave unwiped copies of the key behind.
        let capacity = 8192
            + opened.key.expose_secret().len()
            + self.egress.extra_ca_pem.as_ref().map_or(0, String::len);
        granted(&grant, capacity, etag, lease_seconds)
    }

    fn refuse(
        &self,
        caller: Option<&Caller>,
        namespace: &str,
        name: &str,
        denial: &Denial,
    ) -> HttpResponse {
        self.ctx.metrics.broker_answer(denial.metric_label());
        tracing::info!(
            namespace,
            pod = caller.map(|c| c.pod_name.as_str()).unwrap_or(""),
            caller_namespace = caller.map(|c| c.namespace.as_str()).unwrap_or(""),
            providerkey = name,
            result = denial.metric_label(),
            "key broker"
        );
        let mut response = error_json(denial.status(), denial.reason(), &denial.message());
        if let Some(seconds) = denial.retry_after()
            && let Ok(value) = header::HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// What the broker's ProviderKey cache holds for one name.
type ProviderKeyEntry = kube::core::DeserializeGuard<ProviderKey>;

/// Whether a pod created at `pod_created` may be served by a bundle that replaced, at
/// `replaced`, one the operator did not write: only pods made after the replacement are.
/// Pods' creation times are whole seconds: one made in the second of the replacement may be
/// older than it, so it counts from the next whole second.
fn created_after(replaced: Option<jiff::Timestamp>, pod_created: Option<jiff::Timestamp>) -> bool {
    replaced.is_none_or(|at| {
        let next_second = at
            .as_second()
            .saturating_add(i64::from(at.subsec_nanosecond() > 0));
        pod_created.is_some_and(|p| p.as_second() >= next_second)
    })
}

/// When the trust bundle replaced one the operator did not write, as its annotation says.
fn replaced_at(cm: &k8s_openapi::api::core::v1::ConfigMap) -> Option<jiff::Timestamp> {
    cm.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::serving::trust_bundle::REPLACED_AT_ANNOTATION))
        // Unreadable: no pod is young enough.
        .map(|at| at.parse().unwrap_or(jiff::Timestamp::MAX))
}

/// The project a Vertex grant names, the one the verifier used: the spec's, else the
/// service account's own (`key`: its JSON).
fn vertex_project(spec_project: Option<&String>, key: &SecretString) -> Option<String> {
    match spec_project {
        Some(p) => Some(p.clone()),
        None => crate::providers::vertex::ServiceAccountKey::parse(key.expose_secret())
            .ok()
            .and_then(|sa| sa.project_id),
    }
}

/// The 200 answer carrying `grant`, encoded into a buffer of `capacity` bytes that is wiped
/// when dropped: the capacity must be room enough for the whole answer, as a growing Vec
/// would leave unwiped copies of the key behind.
fn granted(
    grant: &impl Serialize,
    capacity: usize,
    etag: String,
    lease_seconds: u64,
) -> Result<HttpResponse, Unavailable> {
    let mut body = secrecy::zeroize::Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *body, grant)
        .map_err(|_| Unavailable("encoding the answer failed".into()))?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((LEASE_SECONDS_HEADER, lease_seconds.to_string()))
        .insert_header((POLL_SECONDS_HEADER, POLL_HINT.as_secs().to_string()))
        .body(crate::providers::zeroizing_bytes(body)))
}

fn key_facts(entry: Option<&ProviderKeyEntry>) -> KeyFacts<'_> {
    match entry.map(|g| g.0.as_ref()) {
        None => KeyFacts::Missing,
        Some(Err(_)) => KeyFacts::Unreadable,
        Some(Ok(pk)) => KeyFacts::Present(pk),
    }
}

/// Changes whenever anything in the answer does: the key, its version, the spec (models),
/// a new Vertex token.
fn etag(pk: &ProviderKey, opened: &OpenedKey, vertex: Option<&VertexAccessToken>) -> String {
    let mut h = Sha256::new();
    for part in [
        pk.metadata.uid.as_deref().unwrap_or_default(),
        &pk.metadata.generation.unwrap_or_default().to_string(),
        &opened.key_version.to_string(),
        &opened.digest,
        &vertex.map(|t| t.expires_at.to_string()).unwrap_or_default(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("\"{}\"", &hex::encode(h.finalize())[..32])
}

fn error_json(status: u16, reason: &str, message: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::FORBIDDEN);
    HttpResponse::build(status)
        .content_type("application/json")
        .json(serde_json::json!({"error": {"reason": reason, "message": message}}))
}

/// Whether `key` was not noted in `memo` within `period`; notes it now if so. The memo is
/// emptied when it reaches [`MEMO_MAX`] (at worst, a pod is told twice).
fn first_in<K: std::hash::Hash + Eq>(
    memo: &Mutex<HashMap<K, Instant>>,
    key: K,
    period: Duration,
) -> bool {
    let mut told = memo.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if told
        .get(&key)
        .is_some_and(|at| now.duration_since(*at) < period)
    {
        return false;
    }
    if told.len() >= MEMO_MAX {
        told.clear();
    }
    told.insert(key, now);
    true
}

/// The caller's pod, as an Event's subject.
fn pod_reference(caller: &Caller) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(caller.pod_name.clone()),
        namespace: Some(caller.namespace.clone()),
        uid: Some(caller.pod_uid.clone()),
        ..Default::default()
    }
}

/// The bearer token of a request, if it has one.
fn bearer(req: &HttpRequest) -> Option<SecretString> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| SecretString::from(token.trim().to_string()))
}

/// `GET /v1/keys/{namespace}/{name}`.
pub async fn get_key(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    broker: web::Data<Arc<Broker>>,
) -> HttpResponse {
    let (namespace, name) = path.into_inner();
    let if_none_match = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    // The authority the caller asked for: HTTP/2's, else the Host header (not
    // `connection_info`, which would believe Forwarded and X-Forwarded-Host).
    let address = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let trust_bundle = req
        .headers()
        .get(crate::grant::TRUST_BUNDLE_HEADER)
        .and_then(|v| v.to_str().ok());
    broker
        .answer(
            bearer(&req),
            &namespace,
            &name,
            if_none_match,
            Some(address.as_str()),
            trust_bundle,
        )
        .await
}

/// The broker's routes, for its own listener.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/keys/{namespace}/{name}", web::get().to(get_key));
}

/// `spec.limits.perPod` as the grant carries it.
fn grant_limits(spec: &crate::crd::ProviderKeySpec) -> Option<GrantLimitsOut> {
    let p = spec.limits.as_ref()?.per_pod.as_ref()?;
    Some(GrantLimitsOut {
        requests_per_minute: p.requests_per_minute,
        tokens_per_minute: p.tokens_per_minute,
    })
}

#[cfg(test)]
mod tests {
    use super::EgressPolicy;
    use crate::grant::Egress;

    #[test]
    fn the_brokers_egress_policy_reads_back_as_the_sidecars() {
        let policy = EgressPolicy {
            allow_private_addresses: true,
            extra_ca_pem: Some("PEM".into()),
            proxy: Some(
                crate::egress::EgressProxy::parse("http://ops:p%40ss@proxy.corp:3128")
                    .expect("a proxy URL"),
            ),
        };
        let wire = serde_json::to_value(&policy).expect("encodes");
        let read: Egress = serde_json::from_value(wire).expect("decodes");
        assert!(read.allow_private_addresses);
        assert_eq!(read.extra_ca_pem.as_deref(), Some("PEM"));
        let url = read.proxy_url.expect("the proxy").0;
        assert!(
            url.starts_with("http://ops:p%40ss@proxy.corp:3128"),
            "{url}"
        );

        let wire = serde_json::to_value(EgressPolicy::default()).expect("encodes");
        let read: Egress = serde_json::from_value(wire).expect("decodes");
        assert_eq!(read, Egress::default());
    }
}
