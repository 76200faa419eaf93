//! Prometheus metrics (prefix `byok_`); [`crate::admin`] serves them.

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
    ready: AtomicBool,
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
        Self {
            registry,
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
}
