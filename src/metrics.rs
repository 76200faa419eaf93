//! Prometheus metrics (prefix `byok_`); [`crate::admin`] serves them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    api_requests: Family<Labels, Counter>,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
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
        let api_requests = Family::<Labels, Counter>::default();
        registry.register(
            "kube_api_requests",
            "Requests the operator sent to the Kubernetes API server, by verb and resource",
            api_requests.clone(),
        );
        Self {
            registry,
            api_requests,
            reconcile_errors,
            keyring_available,
            verifications,
            verification_seconds,
            reconciliations,
            secret_writes,
            ready: AtomicBool::new(false),
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

    /// Ready once the keyring is loaded and the controller runs (this replica leads).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
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
