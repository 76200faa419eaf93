//! The proxy's Prometheus metrics, served on its admin port. Labels carry key names,
//! status codes and model names (checked and capped, see [`MAX_MODELS`]), never key
//! material, paths, prompts or completions.
//!
//! Token usage follows OpenTelemetry's GenAI semantic conventions, v1.37.0
//! (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`, with
//! `gen_ai.provider.name`), exported under their Prometheus names; `docs/metrics.md`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::sync::{Arc, Mutex, OnceLock};

use crate::providers::ProviderKind;
use crate::usage::{Endpoint, Tokens};

/// The most request models, and the most answer models, one key's series carry in one
/// sidecar; later ones are `other`. The model comes from the application's request (and
/// the answer, which an OpenAI-compatible server or a routing gateway chooses): without a
/// cap, one pod could grow every scraper's series without bound.
pub const MAX_MODELS: usize = 32;

/// The most (operation, request model, answer model) combinations one key's usage series
/// carry in one sidecar; later ones are counted under `other` for both models.
pub const MAX_SERIES: usize = 64;

/// The longest model label value; longer names are `other`.
pub const MAX_MODEL_LABEL: usize = 128;

/// The label value of a model past the cap or outside the label alphabet.
pub const OTHER_MODEL: &str = "other";

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_request_model: Arc<str>,
    pub gen_ai_response_model: Arc<str>,
    pub key: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiTokenLabels {
    /// `input` or `output`.
    pub gen_ai_token_type: &'static str,
    #[prometheus(flatten)]
    pub operation: GenAiLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub key: Arc<str>,
    /// The answer's model, else the request's.
    pub model: Arc<str>,
    /// `input`, `output`, `cached` (part of input), `reasoning` (part of output).
    pub r#type: &'static str,
}

/// `gen_ai.provider.name` for a provider (the convention's well-known values; a custom one
/// for OpenAI-compatible endpoints, whose provider the sidecar cannot know).
pub fn gen_ai_provider(provider: ProviderKind) -> &'static str {
    match provider {
        ProviderKind::Anthropic => "anthropic",
        ProviderKind::OpenAI => "openai",
        ProviderKind::Google => "gcp.gemini",
        ProviderKind::Vertex => "gcp.vertex_ai",
        ProviderKind::Azure => "azure.ai.openai",
        ProviderKind::OpenAICompatible => "openai_compatible",
    }
}

/// Whether `model` may be a label value as it is: `[A-Za-z0-9._:/@-]{1,128}`.
pub fn is_model_label(model: &str) -> bool {
    (1..=MAX_MODEL_LABEL).contains(&model.len())
        && model.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'@' | b'-')
        })
}

/// One answered request's usage, for [`KeyMetrics::usage`].
#[derive(Debug, Clone, Copy)]
pub struct UsageRecord<'a> {
    pub provider: ProviderKind,
    pub endpoint: Endpoint,
    pub request_model: Option<&'a str>,
    pub response_model: Option<&'a str>,
    /// `None`: the answer reported no usage.
    pub tokens: Option<Tokens>,
    pub seconds: f64,
}

/// The series of one (provider, operation, request model, response model), looked up once.
struct UsageSeries {
    provider: ProviderKind,
    endpoint: Endpoint,
    request_model: Arc<str>,
    response_model: Arc<str>,
    input: Histogram,
    output: Histogram,
    duration: Histogram,
    /// input, output, cached, reasoning.
    tokens: [Counter; 4],
}

/// The model label values a key has used, and its usage series.
struct Models {
    requested: Vec<Arc<str>>,
    answered: Vec<Arc<str>>,
    series: Vec<Arc<UsageSeries>>,
    /// The values for no model and for `other`, made once.
    none: Arc<str>,
    other: Arc<str>,
}

impl Default for Models {
    fn default() -> Self {
        Self {
            requested: Vec::new(),
            answered: Vec::new(),
            series: Vec::new(),
            none: Arc::from(""),
            other: Arc::from(OTHER_MODEL),
        }
    }
}

impl Models {
    /// The label value for `model` among `names`: itself, `other` past the cap or the
    /// alphabet, empty when unknown.
    fn label(
        names: &mut Vec<Arc<str>>,
        (none, other): (&Arc<str>, &Arc<str>),
        model: Option<&str>,
    ) -> Arc<str> {
        let Some(model) = model else {
            return none.clone();
        };
        if let Some(known) = names.iter().find(|n| ***n == *model) {
            return known.clone();
        }
        if !is_model_label(model) || names.len() >= MAX_MODELS {
            return other.clone();
        }
        let name: Arc<str> = Arc::from(model);
        names.push(name.clone());
        name
    }

    fn cached(
        &self,
        r: &UsageRecord<'_>,
        request_model: &Arc<str>,
        response_model: &Arc<str>,
    ) -> Option<Arc<UsageSeries>> {
        self.series
            .iter()
            .find(|s| {
                s.provider == r.provider
                    && s.endpoint == r.endpoint
                    && s.request_model == *request_model
                    && s.response_model == *response_model
            })
            .cloned()
    }
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
    without_usage: OnceLock<Counter>,
    models: Mutex<Models>,
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
            without_usage: OnceLock::new(),
            models: Mutex::new(Models::default()),
        }
    }

    /// Records a metered answer: its tokens (when it reported them) and duration.
    pub fn usage(&self, m: &ProxyMetrics, record: &UsageRecord<'_>) {
        let series = self.series(m, record);
        series.duration.observe(record.seconds);
        let Some(t) = record.tokens else {
            self.without_usage
                .get_or_init(|| m.without_usage.get_or_create(&self.label).clone())
                .inc();
            return;
        };
        #[allow(clippy::cast_precision_loss)] // token counts far below 2^53
        {
            series.input.observe(t.input as f64);
            series.output.observe(t.output as f64);
        }
        for (counter, n) in series
            .tokens
            .iter()
            .zip([t.input, t.output, t.cached, t.reasoning])
        {
            counter.inc_by(n);
        }
    }

    fn series(&self, m: &ProxyMetrics, r: &UsageRecord<'_>) -> Arc<UsageSeries> {
        let mut models = self
            .models
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Models {
            requested,
            answered,
            none,
            other,
            ..
        } = &mut *models;
        let mut request_model = Models::label(requested, (none, other), r.request_model);
        let mut response_model = Models::label(answered, (none, other), r.response_model);
        if let Some(found) = models.cached(r, &request_model, &response_model) {
            return found;
        }
        if models.series.len() >= MAX_SERIES {
            request_model = models.other.clone();
            response_model = models.other.clone();
            if let Some(found) = models.cached(r, &request_model, &response_model) {
                return found;
            }
        }
        let key: Arc<str> = Arc::from(self.label.key.as_str());
        let operation = GenAiLabels {
            gen_ai_operation_name: r.endpoint.operation(),
            gen_ai_provider_name: gen_ai_provider(r.provider),
            gen_ai_request_model: request_model.clone(),
            gen_ai_response_model: response_model.clone(),
            key: key.clone(),
        };
        let gen_ai = |token_type: &'static str| GenAiTokenLabels {
            gen_ai_token_type: token_type,
            operation: operation.clone(),
        };
        let model = if response_model.is_empty() {
            request_model.clone()
        } else {
            response_model.clone()
        };
        let tokens = ["input", "output", "cached", "reasoning"].map(|kind| {
            m.tokens
                .get_or_create(&TokenLabels {
                    key: key.clone(),
                    model: model.clone(),
                    r#type: kind,
                })
                .clone()
        });
        // One statement each: `get_or_create` returns a read guard of the family, and a
        // second call while it lives (one struct expression) would wait on itself.
        let input = m.gen_ai_tokens.get_or_create(&gen_ai("input")).clone();
        let output = m.gen_ai_tokens.get_or_create(&gen_ai("output")).clone();
        let duration = m.gen_ai_duration.get_or_create(&operation).clone();
        let series = Arc::new(UsageSeries {
            provider: r.provider,
            endpoint: r.endpoint,
            request_model: request_model.clone(),
            response_model: response_model.clone(),
            input,
            output,
            duration,
            tokens,
        });
        // Past MAX_SERIES only `other` combinations (a few operations) are added.
        models.series.push(series.clone());
        series
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
    pub gen_ai_tokens: Family<GenAiTokenLabels, Histogram, fn() -> Histogram>,
    pub gen_ai_duration: Family<GenAiLabels, Histogram, fn() -> Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub without_usage: Family<KeyLabel, Counter>,
}

/// The convention's buckets for `gen_ai.client.token.usage`: 1, 4, 16 ... 4^13.
fn token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 14))
}

/// The convention's buckets for `gen_ai.client.operation.duration`: 0.01 s ... 81.92 s.
fn operation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            upstream_latency: Family::new_with_constructor(duration_histogram),
            response_bytes: Family::default(),
            upstream_errors: Family::default(),
            refreshes: Family::default(),
            key_version: Family::default(),
            key_ready: Family::default(),
            in_flight: Gauge::default(),
            gen_ai_tokens: Family::new_with_constructor(token_histogram),
            gen_ai_duration: Family::new_with_constructor(operation_histogram),
            tokens: Family::default(),
            without_usage: Family::default(),
        };
        m.registry = m.register();
        m
    }
}

impl ProxyMetrics {
    /// The registry of every family: the GenAI conventions' names as they are, ours under
    /// `byok_proxy_`.
    fn register(&self) -> Registry {
        let mut root = Registry::default();
        root.register(
            "gen_ai_client_token_usage",
            "Tokens per answer, input and output (OpenTelemetry GenAI semantic conventions v1.37.0, gen_ai.client.token.usage)",
            self.gen_ai_tokens.clone(),
        );
        root.register(
            "gen_ai_client_operation_duration_seconds",
            "Time from request to the answer's end, for endpoints that report tokens (gen_ai.client.operation.duration)",
            self.gen_ai_duration.clone(),
        );
        let r = root.sub_registry_with_prefix("byok_proxy");
        r.register(
            "tokens",
            "Tokens the provider reported, by key, model and type (cached is part of input, reasoning part of output)",
            self.tokens.clone(),
        );
        r.register(
            "requests_without_usage",
            "Answers of token-reporting endpoints that reported no usage (a stream without usage), by key",
            self.without_usage.clone(),
        );
        r.register(
            "requests",
            "Requests answered, by key and HTTP status (the provider's or the proxy's own)",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request to the last response byte, by key",
            self.duration.clone(),
        );
        r.register(
            "upstream_latency_seconds",
            "Time from request to the provider's response headers, by key",
            self.upstream_latency.clone(),
        );
        r.register(
            "response_bytes",
            "Response body bytes sent to the application, by key",
            self.response_bytes.clone(),
        );
        r.register(
            "upstream_errors",
            "Requests that got no answer from the provider, by key and kind",
            self.upstream_errors.clone(),
        );
        r.register(
            "key_refreshes",
            "Answers from the key broker, by key and result",
            self.refreshes.clone(),
        );
        r.register(
            "key_version",
            "The key version in service, by key (0: none)",
            self.key_version.clone(),
        );
        r.register(
            "key_ready",
            "1 while the key is loaded and its lease current, by key",
            self.key_ready.clone(),
        );
        r.register(
            "in_flight_requests",
            "Requests being served, streams included",
            self.in_flight.clone(),
        );
        root
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model: &str) -> UsageRecord<'_> {
        UsageRecord {
            provider: ProviderKind::OpenAI,
            endpoint: Endpoint::Chat,
            request_model: Some(model),
            response_model: None,
            tokens: Some(Tokens {
                input: 10,
                output: 3,
                cached: 4,
                reasoning: 1,
            }),
            seconds: 0.5,
        }
    }

    /// The application names the model: past 32 names a key's series say `other`, and so
    /// do names outside the label alphabet or past 128 bytes.
    #[test]
    fn model_labels_are_checked_and_capped_per_key() {
        let m = ProxyMetrics::default();
        let key = KeyMetrics::new("k");
        for i in 0..40 {
            key.usage(&m, &record(&format!("model-{i}")));
        }
        let long = "m".repeat(MAX_MODEL_LABEL + 1);
        for bad in ["", "a b", "a\"b", "é", "a\nb", long.as_str()] {
            key.usage(&m, &record(bad));
        }
        let page = m.encode();
        let models: std::collections::BTreeSet<&str> = page
            .lines()
            .filter(|l| l.starts_with("byok_proxy_tokens_total{"))
            .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(models.len(), MAX_MODELS + 1, "{models:?}");
        assert!(models.contains(OTHER_MODEL));
        assert!(models.contains("model-31") && !models.contains("model-32"));
        // Another key has its own 32.
        let other = KeyMetrics::new("k2");
        other.usage(&m, &record("model-39"));
        assert!(
            m.encode()
                .contains(r#"byok_proxy_tokens_total{key="k2",model="model-39",type="input"} 10"#)
        );
    }

    #[test]
    fn usage_follows_the_conventions_names() {
        let m = ProxyMetrics::default();
        let key = KeyMetrics::new("team-gpt");
        let mut r = record("gpt-4o");
        r.response_model = Some("gpt-4o-2024-08-06");
        key.usage(&m, &r);
        key.usage(&m, &UsageRecord { tokens: None, ..r });
        let page = m.encode();
        for line in [
            r#"gen_ai_client_token_usage_sum{gen_ai_token_type="input",gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o",gen_ai_response_model="gpt-4o-2024-08-06",key="team-gpt"} 10.0"#,
            r#"gen_ai_client_token_usage_bucket{le="16.0",gen_ai_token_type="input","#,
            r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o",gen_ai_response_model="gpt-4o-2024-08-06",key="team-gpt"} 2"#,
            r#"byok_proxy_tokens_total{key="team-gpt",model="gpt-4o-2024-08-06",type="cached"} 4"#,
            r#"byok_proxy_tokens_total{key="team-gpt",model="gpt-4o-2024-08-06",type="reasoning"} 1"#,
            r#"byok_proxy_requests_without_usage_total{key="team-gpt"} 1"#,
        ] {
            assert!(page.contains(line), "{line}\n{page}");
        }
    }
}
