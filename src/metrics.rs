//! Prometheus metrics (prefix `byok_`); [`crate::admin`] serves them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::providers::ProviderKind;
use crate::reason::Reason;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    verifications: Family<Labels, Counter>,
    verification_seconds: Family<Labels, Histogram>,
    reconciliations: Family<Labels, Counter>,
    secret_writes: Family<Labels, Counter>,
    reconcile_errors: Family<Labels, Counter>,
    keyring_available: Family<Vec<(&'static str, String)>, Gauge>,
    keyring_loads: Counter,
    api_requests: Family<Labels, Counter>,
    leader: Gauge,
    crd_schema_current: Gauge,
    admissions: Family<Labels, Counter>,
    admission_seconds: Histogram,
    broker_answers: Family<Labels, Counter>,
    broker_outdated_address: Counter,
    trust_bundle_pods: Family<Vec<(&'static str, &'static str)>, Gauge>,
    token_reviews: Family<Labels, Counter>,
    token_key_fetches: Family<Labels, Counter>,
    /// The [`Ready`] parts still missing, as bits: ready when none is.
    not_ready: AtomicU8,
}

/// What "can serve" (`/readyz`) is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// The ProviderKey, Secret (and, when serving, pod) caches have listed once.
    Caches = 1,
    /// The serving certificate is loaded (set at once when this replica serves nothing).
    Certificate = 2,
    /// The operator keyring is loaded: without it no envelope opens.
    Keyring = 4,
    /// Not shutting down (cleared by SIGTERM, for the drain before the replica stops).
    Running = 8,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    // One registration per metric, in the order `/metrics` lists them: a table, clearer whole
    // than split across helpers.
    #[allow(clippy::too_many_lines)]
    fn default() -> Self {
        let mut registry = Registry::with_prefix("byok");
        let verifications = Family::<Labels, Counter>::default();
        registry.register(
            "verifications",
            "Live key verifications, by provider and outcome reason",
            verifications.clone(),
        );
        let verification_seconds = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 12))
        });
        registry.register(
            "verification_duration_seconds",
            "Duration of live key verifications, by provider",
            verification_seconds.clone(),
        );
        let reconciliations = Family::<Labels, Counter>::default();
        registry.register(
            "reconciliations",
            "ProviderKey reconciliations, by result",
            reconciliations.clone(),
        );
        let secret_writes = Family::<Labels, Counter>::default();
        registry.register(
            "managed_secret_writes",
            "Writes of managed Secrets: a key put in service, or a re-encryption",
            secret_writes.clone(),
        );
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that ended in an error (retried with backoff), by reason",
            reconcile_errors.clone(),
        );
        let keyring_available = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "keyring_available",
            "1 while the operator keyring Secret (label secret, namespace/name) is loaded; 0 while it is missing or unusable",
            keyring_available.clone(),
        );
        let keyring_loads = Counter::default();
        registry.register(
            "keyring_loads",
            "Times the operator keyring Secret was read from its watch, changed or not",
            keyring_loads.clone(),
        );
        let api_requests = Family::<Labels, Counter>::default();
        registry.register(
            "kube_api_requests",
            "Requests the operator sent to the Kubernetes API server, by verb and resource",
            api_requests.clone(),
        );
        let crd_schema_current = Gauge::default();
        registry.register(
            "crd_schema_current",
            "1 when the installed ProviderKey CRD carries this build's schema digest; while 0 the leader does not reconcile",
            crd_schema_current.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and reconciles; every replica serves the webhook and the broker",
            leader.clone(),
        );
        let admissions = Family::<Labels, Counter>::default();
        registry.register(
            "webhook_admissions",
            "Pod admissions answered by the webhook, by result (untouched, injected, warned, refused, malformed)",
            admissions.clone(),
        );
        let admission_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "webhook_admission_duration_seconds",
            "Time the webhook handler took per admission (parse, decide, answer)",
            admission_seconds.clone(),
        );
        let broker_answers = Family::<Labels, Counter>::default();
        registry.register(
            "broker_answers",
            "Key broker answers, by result",
            broker_answers.clone(),
        );
        let trust_bundle_pods = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        registry.register(
            "broker_trust_bundle_pods",
            "Pods this replica served within the key lease, by the trust bundle their sidecar reported: current, outdated (its mount not refreshed yet since the CA changed), unreported (injected before trust bundles: its CA is fixed)",
            trust_bundle_pods.clone(),
        );
        let broker_outdated_address = Counter::default();
        registry.register(
            "broker_outdated_address_requests",
            "Key broker requests served to sidecars that call it at an address other than --broker-url (a previous Service name or port): such pods need a restart before that address goes",
            broker_outdated_address.clone(),
        );
        let token_reviews = Family::<Labels, Counter>::default();
        registry.register(
            "broker_token_reviews",
            "TokenReviews the key broker sent, by result (accepted, refused, failed) and whether the token's signature was verified locally first",
            token_reviews.clone(),
        );
        let token_key_fetches = Family::<Labels, Counter>::default();
        registry.register(
            "broker_token_key_fetches",
            "Fetches of the API server's ServiceAccount token issuer and keys (OpenID discovery, JWKS), by result",
            token_key_fetches.clone(),
        );
        Self {
            registry,
            broker_outdated_address,
            trust_bundle_pods,
            token_reviews,
            token_key_fetches,
            leader,
            crd_schema_current,
            admissions,
            admission_seconds,
            broker_answers,
            api_requests,
            reconcile_errors,
            keyring_available,
            keyring_loads,
            verifications,
            verification_seconds,
            reconciliations,
            secret_writes,
            not_ready: AtomicU8::new(
                Ready::Caches as u8 | Ready::Certificate as u8 | Ready::Keyring as u8,
            ),
        }
    }
}

impl Metrics {
    pub fn verification(&self, provider: ProviderKind, reason: Reason, took: Duration) {
        self.verifications
            .get_or_create(&vec![
                ("provider", provider.as_str()),
                ("reason", reason.as_str()),
            ])
            .inc();
        self.verification_seconds
            .get_or_create(&vec![("provider", provider.as_str())])
            .observe(took.as_secs_f64());
    }

    pub fn reconciled(&self, ok: bool) {
        self.reconciliations
            .get_or_create(&vec![("result", if ok { "ok" } else { "error" })])
            .inc();
    }

    /// Reconciliations finished so far with this result.
    pub fn reconciliations(&self, ok: bool) -> u64 {
        self.reconciliations
            .get_or_create(&vec![("result", if ok { "ok" } else { "error" })])
            .get()
    }

    pub fn reconcile_error(&self, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// `secret` is `namespace/name` of the keyring Secret.
    pub fn set_keyring_available(&self, secret: &str, available: bool) {
        self.keyring_available
            .get_or_create(&vec![("secret", secret.to_string())])
            .set(i64::from(available));
        // Without the keyring no envelope opens: the broker cannot serve.
        self.set_ready(Ready::Keyring, available);
    }

    /// The keyring Secret was read and parsed (see [`Self::keyring_loads`]).
    pub fn keyring_loaded(&self) {
        self.keyring_loads.inc();
    }

    pub fn keyring_loads(&self) -> u64 {
        self.keyring_loads.get()
    }

    pub fn secret_written(&self, kind: &'static str) {
        self.secret_writes
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }

    pub fn api_request(&self, verb: &'static str, resource: &'static str) {
        self.api_requests
            .get_or_create(&vec![("verb", verb), ("resource", resource)])
            .inc();
    }

    /// Requests sent so far with this verb to this resource.
    pub fn api_requests(&self, verb: &'static str, resource: &'static str) -> u64 {
        self.api_requests
            .get_or_create(&vec![("verb", verb), ("resource", resource)])
            .get()
    }

    /// Marks one part of readiness as there or not. `/readyz` means "can serve": caches
    /// listed, certificate loaded, keyring loaded; leadership plays no part.
    pub fn set_ready(&self, part: Ready, ready: bool) {
        if ready {
            self.not_ready.fetch_and(!(part as u8), Ordering::Relaxed);
        } else {
            self.not_ready.fetch_or(part as u8, Ordering::Relaxed);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready.load(Ordering::Relaxed) == 0
    }

    /// The parts of readiness still missing, for `/readyz`'s answer.
    pub fn missing_for_ready(&self) -> Vec<&'static str> {
        let bits = self.not_ready.load(Ordering::Relaxed);
        [
            (Ready::Caches, "caches not synced"),
            (Ready::Certificate, "serving certificate not loaded"),
            (Ready::Keyring, "keyring unavailable"),
            (Ready::Running, "shutting down"),
        ]
        .into_iter()
        .filter(|(part, _)| bits & (*part as u8) != 0)
        .map(|(_, why)| why)
        .collect()
    }

    pub fn set_crd_schema_current(&self, current: bool) {
        self.crd_schema_current.set(i64::from(current));
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Whether this replica reconciles now.
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    pub fn admission(&self, result: &'static str, took: Duration) {
        self.admissions
            .get_or_create(&vec![("result", result)])
            .inc();
        self.admission_seconds.observe(took.as_secs_f64());
    }

    /// Admissions answered so far with this result.
    pub fn admissions(&self, result: &'static str) -> u64 {
        self.admissions
            .get_or_create(&vec![("result", result)])
            .get()
    }

    pub fn broker_answer(&self, result: &'static str) {
        self.broker_answers
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    /// The latest trust-bundle counts, by what the pods hold (the broker's `trust::Counts`,
    /// labelled: `current`, `outdated`, `unreported`).
    pub fn set_trust_bundle_pods(&self, counts: [(&'static str, u64); 3]) {
        for (bundle, n) in counts {
            self.trust_bundle_pods
                .get_or_create(&vec![("bundle", bundle)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Pods counted with this trust-bundle state at the last recount.
    pub fn trust_bundle_pods(&self, bundle: &'static str) -> i64 {
        self.trust_bundle_pods
            .get_or_create(&vec![("bundle", bundle)])
            .get()
    }

    /// A served request that called the broker at an outdated address.
    pub fn broker_outdated_address(&self) {
        self.broker_outdated_address.inc();
    }

    /// Served requests so far that called the broker at an outdated address.
    pub fn broker_outdated_addresses(&self) -> u64 {
        self.broker_outdated_address.get()
    }

    /// Broker answers so far with this result.
    pub fn broker_answers(&self, result: &'static str) -> u64 {
        self.broker_answers
            .get_or_create(&vec![("result", result)])
            .get()
    }

    /// A TokenReview sent: `result` `accepted`, `refused` or `failed`; `signature` `verified`
    /// (checked locally first) or `unverified` (the API server's keys were not known).
    pub fn token_review(&self, result: &'static str, signature: &'static str) {
        self.token_reviews
            .get_or_create(&vec![("result", result), ("signature", signature)])
            .inc();
    }

    /// TokenReviews sent so far with this result, signature checked or not.
    pub fn token_reviews(&self, result: &'static str) -> u64 {
        ["verified", "unverified"]
            .into_iter()
            .map(|signature| {
                self.token_reviews
                    .get_or_create(&vec![("result", result), ("signature", signature)])
                    .get()
            })
            .sum()
    }

    pub fn jwks_fetch(&self, ok: bool) {
        self.token_key_fetches
            .get_or_create(&vec![("result", if ok { "ok" } else { "failed" })])
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A Kubernetes client whose every request is counted in `byok_kube_api_requests_total`: the
/// figure that says whether the caches do their job.
pub fn counted_client(config: kube::Config, metrics: Arc<Metrics>) -> anyhow::Result<kube::Client> {
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        let (verb, resource) = api_verb(req.method(), req.uri().path(), req.uri().query());
        metrics.api_request(verb, resource);
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// The Kubernetes verb and resource of an API request, from its method and URL. Resources the
/// operator does not use are `other`, so the label set stays small.
pub fn api_verb(
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> (&'static str, &'static str) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[][..],
    };
    let rest = match rest {
        ["namespaces", _ns, resource, tail @ ..] => [&[*resource][..], tail].concat(),
        other => other.to_vec(),
    };
    let (resource, named, sub) = match rest.as_slice() {
        [resource] => (*resource, false, None),
        [resource, _name] => (*resource, true, None),
        [resource, _name, sub, ..] => (*resource, true, Some(*sub)),
        _ => ("", false, None),
    };
    let resource = match (resource, sub) {
        ("providerkeys", Some("status")) => "providerkeys/status",
        ("providerkeys", None) => "providerkeys",
        ("secrets", None) => "secrets",
        ("events", None) => "events",
        ("leases", None) => "leases",
        ("pods", None) => "pods",
        ("customresourcedefinitions", None) => "customresourcedefinitions",
        ("mutatingwebhookconfigurations", None) => "mutatingwebhookconfigurations",
        ("namespaces", None) => "namespaces",
        _ => "other",
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifications_are_counted_by_provider_and_reason() {
        let m = Metrics::default();
        m.verification(
            ProviderKind::OpenAI,
            Reason::Valid,
            Duration::from_millis(20),
        );
        m.verification(
            ProviderKind::OpenAI,
            Reason::InvalidKey,
            Duration::from_millis(20),
        );
        m.verification(
            ProviderKind::OpenAI,
            Reason::InvalidKey,
            Duration::from_millis(20),
        );
        let text = m.encode();
        assert!(
            text.contains(r#"byok_verifications_total{provider="openai",reason="InvalidKey"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"byok_verifications_total{provider="openai",reason="Valid"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("byok_verification_duration_seconds_count{provider=\"openai\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn api_requests_are_named_by_verb_and_resource() {
        let get = http::Method::GET;
        let cases = [
            (
                &get,
                "/api/v1/namespaces/a/secrets/k",
                None,
                ("get", "secrets"),
            ),
            (
                &get,
                "/api/v1/namespaces/a/secrets",
                None,
                ("list", "secrets"),
            ),
            (
                &get,
                "/api/v1/secrets",
                Some("labelSelector=x&watch=true"),
                ("watch", "secrets"),
            ),
            (
                &http::Method::PATCH,
                "/apis/byok.dev/v1alpha1/namespaces/a/providerkeys/k/status",
                Some("fieldManager=byok-operator"),
                ("patch", "providerkeys/status"),
            ),
            (
                &http::Method::POST,
                "/apis/events.k8s.io/v1/namespaces/a/events",
                None,
                ("create", "events"),
            ),
            (
                &http::Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/a/leases/l",
                None,
                ("update", "leases"),
            ),
            (
                &http::Method::DELETE,
                "/api/v1/namespaces/a/secrets/k-byok",
                None,
                ("delete", "secrets"),
            ),
            (&get, "/api/v1/namespaces/a", None, ("get", "namespaces")),
            (&get, "/version", None, ("list", "other")),
            (
                &get,
                "/api/v1/namespaces/a/configmaps/x",
                None,
                ("get", "other"),
            ),
        ];
        for (method, path, query, want) in cases {
            assert_eq!(api_verb(method, path, query), want, "{method} {path}");
        }
    }
}
