//! The proxy's Prometheus metrics, served on its admin port. Labels carry key names and
//! status codes, never key material or paths.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub key: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub key: String,
    /// `connect`, `egress`, `tls`, `request`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub key: String,
    /// `updated`, `unchanged`, `closed`, `waiting`, `failed`, `refused`.
    pub result: &'static str,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~4.4 min: time to first byte and whole streams alike.
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

/// One key's per-request series, each looked up in its family once (on first use, so the
/// series appear exactly as they would per request) instead of on every request: the
/// lookup hashes and clones the labels.
pub struct KeyMetrics {
    pub name: Arc<str>,
    label: KeyLabel,
    ok: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    upstream_latency: OnceLock<Histogram>,
    response_bytes: OnceLock<Counter>,
}

impl KeyMetrics {
    pub fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            label: KeyLabel {
                key: name.to_owned(),
            },
            ok: OnceLock::new(),
            duration: OnceLock::new(),
            upstream_latency: OnceLock::new(),
            response_bytes: OnceLock::new(),
        }
    }

    /// Counts one answered request with `code`.
    pub fn answered(&self, m: &ProxyMetrics, code: u16) {
        let labels = || RequestLabels {
            key: self.label.key.clone(),
            code,
        };
        if code == 200 {
            self.ok
                .get_or_init(|| m.requests.get_or_create(&labels()).clone())
                .inc();
        } else {
            m.requests.get_or_create(&labels()).inc();
        }
    }

    pub fn duration(&self, m: &ProxyMetrics) -> &Histogram {
        self.duration
            .get_or_init(|| m.duration.get_or_create(&self.label).clone())
    }

    pub fn upstream_latency(&self, m: &ProxyMetrics) -> &Histogram {
        self.upstream_latency
            .get_or_init(|| m.upstream_latency.get_or_create(&self.label).clone())
    }

    pub fn response_bytes(&self, m: &ProxyMetrics) -> &Counter {
        self.response_bytes
            .get_or_init(|| m.response_bytes.get_or_create(&self.label).clone())
    }
}

pub struct ProxyMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<KeyLabel, Histogram, fn() -> Histogram>,
    pub upstream_latency: Family<KeyLabel, Histogram, fn() -> Histogram>,
    pub response_bytes: Family<KeyLabel, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub key_version: Family<KeyLabel, Gauge>,
    pub key_ready: Family<KeyLabel, Gauge>,
    pub in_flight: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<KeyLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let upstream_latency =
            Family::<KeyLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        let response_bytes = Family::<KeyLabel, Counter>::default();
        let upstream_errors = Family::<ErrorLabels, Counter>::default();
        let refreshes = Family::<RefreshLabels, Counter>::default();
        let key_version = Family::<KeyLabel, Gauge>::default();
        let key_ready = Family::<KeyLabel, Gauge>::default();
        let in_flight = Gauge::default();
        let mut registry = Registry::with_prefix("byok_proxy");
        registry.register(
            "requests",
            "Requests answered, by key and HTTP status (the provider's or the proxy's own)",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the last response byte, by key",
            duration.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from request to the provider's response headers, by key",
            upstream_latency.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body bytes sent to the application, by key",
            response_bytes.clone(),
        );
        registry.register(
            "upstream_errors",
            "Requests that got no answer from the provider, by key and kind",
            upstream_errors.clone(),
        );
        registry.register(
            "key_refreshes",
            "Answers from the key broker, by key and result",
            refreshes.clone(),
        );
        registry.register(
            "key_version",
            "The key version in service, by key (0: none)",
            key_version.clone(),
        );
        registry.register(
            "key_ready",
            "1 while the key is loaded and its lease current, by key",
            key_ready.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being served, streams included",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            upstream_latency,
            response_bytes,
            upstream_errors,
            refreshes,
            key_version,
            key_ready,
            in_flight,
        }
    }
}

impl ProxyMetrics {
    pub fn refresh(&self, key: &str, result: &'static str) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                key: key.to_owned(),
                result,
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
