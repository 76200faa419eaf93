//! The `ProviderKey` API (`byok.dev/v1alpha1`). The `///` docs here become the CRD's field
//! descriptions, so they are written for the people who apply the YAML.
//!
//! Validation lives in the schema (enums, lengths, CEL rules), so the API server refuses bad
//! YAML itself with a message that names the problem; the controller re-checks only what the
//! schema cannot know.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::providers::ProviderKind;

/// The default Secret entry holding the raw key.
pub const DEFAULT_SECRET_KEY: &str = "api-key";
/// The Azure OpenAI `api-version` used when `spec.azure.apiVersion` is not set; defined with
/// the Azure wire contract, so the CRD default and the verifier cannot drift apart.
pub use crate::providers::DEFAULT_AZURE_API_VERSION;

/// A provider API key brought into the cluster: the operator verifies it with a live call,
/// keeps it encrypted in a managed Secret, and serves it to opted-in pods through a local proxy.
// Each printcolumn(...) repeats `type_`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "byok.dev",
    version = "v1alpha1",
    kind = "ProviderKey",
    namespaced,
    shortname = "pk",
    category = "byok",
    status = "ProviderKeyStatus",
    derive = "PartialEq",
    doc = "A provider API key brought into the cluster: verified with a live call, kept encrypted in a managed Secret, served to opted-in pods through a local proxy.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Fingerprint",
        type_ = "string",
        json_path = ".status.fingerprint"
    , priority = "1"),
    printcolumn(name = "Masked", type_ = "string", json_path = ".status.maskedKey", priority = "1"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.keyVersion", priority = "1"),
    printcolumn(
        name = "Verified",
        type_ = "date",
        json_path = ".status.lastVerifiedTime"
    , priority = "1"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    // The name is also a label value on the managed Secret, and label values stop at 63.
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name must be at most 63 characters: it is also a label value on the managed Secret")
)]
#[x_kube(
    validation = Rule::new("self.provider != 'azure' || has(self.baseURL)")
        .message("provider azure requires spec.baseURL (https://<resource>.openai.azure.com)")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.provider != 'openai-compatible' || has(self.baseURL)")
        .message("provider openai-compatible requires spec.baseURL (e.g. https://llm.example.com/v1)")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.provider != 'vertex' || has(self.vertex)")
        .message("provider vertex requires spec.vertex.location")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.azure) || self.provider == 'azure'")
        .message("spec.azure is only valid with provider azure"),
    validation = Rule::new("!has(self.vertex) || self.provider == 'vertex'")
        .message("spec.vertex is only valid with provider vertex"),
    validation = Rule::new(
        "!has(self.defaultModel) || !has(self.allowedModels) || size(self.allowedModels) == 0 || self.defaultModel in self.allowedModels"
    )
    .message("spec.defaultModel must be one of spec.allowedModels"),
    // A key goes only where it was verified: everything that picks the destination is fixed
    // for the life of the object. has() is false for a field set to null as well as for an
    // absent one, so null cannot be used to slip past the per-field `self == oldSelf` rules.
    validation = Rule::new("self.provider == oldSelf.provider")
        .message("spec.provider is immutable; create a new ProviderKey to use another provider"),
    validation = Rule::new("has(self.baseURL) == has(oldSelf.baseURL)")
        .message("baseURL cannot be added or removed; create a new ProviderKey to change where the key is sent"),
    validation = Rule::new("has(self.vertex) == has(oldSelf.vertex)")
        .message("spec.vertex cannot be added or removed; create a new ProviderKey to change where the key is sent")
)]
#[serde(rename_all = "camelCase")]
pub struct ProviderKeySpec {
    /// The LLM provider this key belongs to: anthropic, openai, google (Gemini API), vertex
    /// (Vertex AI; the Secret holds a service-account JSON key), azure (Azure OpenAI) or
    /// openai-compatible (any endpoint that speaks the OpenAI API). Immutable.
    pub provider: ProviderKind,

    /// The Secret, in this namespace, that holds the raw key. The operator only reads it;
    /// after verification the key is kept encrypted in the managed Secret `<name>-byok`.
    pub secret_ref: SecretKeyRef,

    /// The provider's API base URL, as its official SDK takes it (for example
    /// https://api.anthropic.com or https://llm.example.com/v1). Optional for anthropic,
    /// openai, google and vertex (their public endpoints are the default); required for azure
    /// and openai-compatible. Must be https, without user info, query or fragment; the
    /// operator also refuses hosts that resolve to private, loopback, link-local or metadata
    /// addresses. Immutable: to send the key somewhere else, create a new ProviderKey.
    #[serde(rename = "baseURL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 2048))]
    #[x_kube(
        validation = Rule::new("self == oldSelf")
            .message("baseURL is immutable; create a new ProviderKey to change where the key is sent"),
        validation = Rule::new("self.startsWith('https://')").message("baseURL must use https://"),
        validation = Rule::new("!self.startsWith('https://') || self.matches('^https://[^/@?#]+([/?#].*)?$')")
            .message("baseURL must not contain user info (user:password@)"),
        validation = Rule::new("!self.contains('?') && !self.contains('#')")
            .message("baseURL must not have a query string or a fragment"),
        validation = Rule::new("!self.startsWith('https://') || isURL(self)").message("baseURL must be a valid URL")
    )]
    pub base_url: Option<String>,

    /// The model the proxy fills in when a request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub default_model: Option<String>,

    /// If set, the proxy refuses requests for any other model with HTTP 403 and a JSON error.
    /// Empty means every model is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), inner(length(min = 1, max = 256)))]
    pub allowed_models: Vec<String>,

    /// Allow endpoints that mint ephemeral credentials (OpenAI and Azure realtime client
    /// secrets and sessions, ChatKit sessions, Gemini ephemeral auth tokens) through the
    /// sidecar. Off by default: such a credential works outside the pod and outlives the
    /// key's revocation, so with this on, a pod using the key can hand a short-lived
    /// credential to anything. Key and organisation management endpoints stay refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_credential_minting: bool,

    /// How the key is re-verified over time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationSpec>,

    /// How the sidecar reads token usage (docs/usage.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSpec>,

    /// Caps on what this cluster's pods use of the key (docs/limits.md). They are the
    /// ProviderKey author's; a key that leaked out of the cluster is capped only by the
    /// provider's own limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,

    /// Azure OpenAI settings; only with provider azure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSpec>,

    /// Vertex AI settings; required with provider vertex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<VertexSpec>,

    /// Which pods may use this key through the injected sidecar. Without it, every pod in
    /// this namespace that asks for the key (label `byok.dev/inject: "true"`, annotation
    /// `byok.dev/provider-keys`) gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<ConsumersSpec>,
}

/// Who may use a key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumersSpec {
    /// ServiceAccounts (in this namespace) whose pods may use the key. Empty or absent: any.
    /// A pod running as another ServiceAccount is refused at admission and by the broker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub service_accounts: Vec<String>,
}

impl ProviderKeySpec {
    /// Whether pods running as `service_account` may use this key.
    pub fn admits_service_account(&self, service_account: &str) -> bool {
        match &self.consumers {
            Some(c) if !c.service_accounts.is_empty() => {
                c.service_accounts.iter().any(|sa| sa == service_account)
            }
            _ => true,
        }
    }
}

/// A key in a Secret in the ProviderKey's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(
        "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')"
    )
    .message("secretRef.name must be a Secret name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub name: String,

    /// The entry in the Secret's data that holds the key. Defaults to `api-key`.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    // The rules Kubernetes applies to Secret data keys (IsConfigMapKey), so a key the schema
    // accepts can exist in a Secret.
    #[x_kube(validation = Rule::new(
        "self.matches('^[-._a-zA-Z0-9]+$') && self != '.' && !self.startsWith('..')"
    )
    .message("secretRef.key must be a Secret data key: letters, digits, '-', '_' and '.', not '.' and not starting with '..'"))]
    pub key: String,
}

fn default_secret_key() -> String {
    DEFAULT_SECRET_KEY.to_string()
}

/// Limits on a key's use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Caps each pod's sidecar keeps for its own pod, over a sliding 60 s window. A request
    /// past one is answered 429 in the provider's rate-limit error shape, with
    /// `retry-after`. Sidecars older than this field do not enforce it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_pod: Option<PerPodLimits>,
}

/// `spec.limits.perPod`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PerPodLimits {
    /// Requests a pod may send in any 60 s (exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_minute: Option<u32>,

    /// Input plus output tokens a pod may use in any 60 s, counted as answers end: requests
    /// are admitted while the last minute's tokens are under it, so the minute can exceed it
    /// by the tokens of requests in flight. Streams whose usage cannot be read are refused
    /// on such a key (docs/limits.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000_u64))]
    pub tokens_per_minute: Option<u64>,
}

/// Token usage settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsageSpec {
    /// OpenAI-shaped streams (chat completions, completions) report usage only when the
    /// request asks with `stream_options.include_usage`. Inject: the sidecar adds it to
    /// streamed requests that lack `stream_options`, and removes the usage-only last chunk
    /// from the stream the application gets. Off: requests go as sent, and streams without
    /// usage are counted as such. Default: Inject for openai and azure (for api-versions
    /// from 2024-09-01 and the v1 API), Off for the others (an OpenAI-compatible server may
    /// refuse the option). Has no effect on other providers, whose streams always report
    /// usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_usage: Option<StreamUsage>,
}

/// `spec.usage.streamUsage`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamUsage {
    Inject,
    Off,
}

impl ProviderKeySpec {
    /// Whether the sidecar adds `stream_options.include_usage` to streamed OpenAI-shaped
    /// requests: `spec.usage.streamUsage`, else the provider's default.
    pub fn injects_stream_usage(&self) -> bool {
        match self.usage.as_ref().and_then(|u| u.stream_usage) {
            Some(StreamUsage::Inject) => true,
            Some(StreamUsage::Off) => false,
            None => matches!(self.provider, ProviderKind::OpenAI | ProviderKind::Azure),
        }
    }
}

/// Periodic re-verification.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationSpec {
    /// How often the key is verified again with a live call, as a duration such as `24h` or
    /// `90m`. `0` disables periodic re-verification (a changed key is still verified).
    /// Intervals under one minute are raised to one minute; the longest is `8760h` (one year).
    /// Units: `h`, `m`, `s`, `ms`, `us`, `ns`, combinable as in `1h30m`; no sign, no days (write
    /// `168h` for a week). Defaults to `24h`.
    // A String, not kube::core::Duration: a value that fails to parse must not fail the
    // deserialisation of the whole watch list, and that parser panics on some inputs. The
    // controller parses it with crate::interval and reports a bad value as InvalidSpec on this
    // object. The rule below mirrors that parser's grammar (it cannot check the one-year cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new(
        r"self.matches('^(0|(([0-9]+([.][0-9]*)?|[.][0-9]+)(h|m|s|ms|us|\u00b5s|\u03bcs|ns))+)$')"
    )
    .message("verification.interval must be a duration such as 24h, 90m or 1h30m (units h, m, s, ms, us, ns), or 0 to disable"))]
    pub interval: Option<String>,
}

/// Azure OpenAI settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AzureSpec {
    /// The Azure OpenAI data-plane `api-version`, e.g. `2024-10-21` or `2025-04-01-preview`.
    #[serde(default = "default_azure_api_version")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?$')")
        .message("azure.apiVersion must look like 2024-10-21 or 2025-04-01-preview"))]
    #[schemars(length(max = 32))]
    pub api_version: String,
}

fn default_azure_api_version() -> String {
    DEFAULT_AZURE_API_VERSION.to_string()
}

/// Vertex AI settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
// The project picks the URL the key is sent to, so it counts as destination like baseURL.
#[x_kube(validation = Rule::new("has(self.project) == has(oldSelf.project)")
    .message("vertex.project cannot be added or removed; create a new ProviderKey to change where the key is sent"))]
#[serde(rename_all = "camelCase")]
pub struct VertexSpec {
    /// The Google Cloud project. Defaults to the `project_id` in the service-account key.
    /// Immutable, and cannot be added or removed later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z][a-z0-9-]{4,28}[a-z0-9]$')")
            .message("vertex.project must be a Google Cloud project id"),
        validation = Rule::new("self == oldSelf")
            .message("vertex.project is immutable; create a new ProviderKey to change where the key is sent")
    )]
    #[schemars(length(max = 30))]
    pub project: Option<String>,

    /// The Vertex AI location (region), e.g. `us-central1`, or `global`. Immutable.
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9-]+$')")
            .message("vertex.location must be a region name such as us-central1"),
        validation = Rule::new("self == oldSelf")
            .message("vertex.location is immutable; create a new ProviderKey to change where the key is sent")
    )]
    #[schemars(length(min = 1, max = 63))]
    pub location: String,
}

/// What the operator observed. Holds no key material: only a fingerprint and a masked form.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderKeyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: a verified key is in service. `Verified`: the result of the last verification
    /// of the key currently in the source Secret. Reasons are listed in the operator's docs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// `sha256:` and the first 16 hex digits of the SHA-256 of the key in service;
    /// `printf %s "$KEY" | sha256sum` shows the same digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,

    /// The key in service, masked: a recognised prefix and `...`, followed by the last 4
    /// characters only when at least 16 characters follow the prefix. A Vertex
    /// service-account key shows its client_email and the last 4 characters of its key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_key: Option<String>,

    /// Counts the verified keys put in service: 1 for the first, +1 for each rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<i64>,

    /// When the key in service last passed a live verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_time: Option<Time>,

    /// When the key in service replaced the previous one (or was first put in service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,

    /// Fingerprint of the key that last failed verification. It is not tried again until the
    /// source Secret or the spec changes; if it is a newer key than the one in service, the
    /// key in service stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_fingerprint: Option<String>,

    /// The Secret holding the encrypted key, `<name>-byok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_secret_name: Option<String>,

    /// The id of the operator key that encrypted the managed Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
}

impl ProviderKeySpec {
    /// Where and how to reach the provider, as the spec says (the verifier's and the broker's
    /// view of it).
    pub fn provider_params(&self) -> Result<crate::providers::ProviderParams, String> {
        let spec = self;
        let base_url = match &spec.base_url {
            Some(u) => Some(
                url::Url::parse(u).map_err(|_| "spec.baseURL is not a valid URL".to_string())?,
            ),
            None => None,
        };
        Ok(crate::providers::ProviderParams {
            base_url,
            azure_api_version: Some(spec.azure.as_ref().map_or(
                crate::providers::DEFAULT_AZURE_API_VERSION.to_string(),
                |a| a.api_version.clone(),
            )),
            vertex_project: spec.vertex.as_ref().and_then(|v| v.project.clone()),
            vertex_location: spec.vertex.as_ref().map(|v| v.location.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    /// `crds/` is generated; this fails when it drifts from the Rust types.
    /// Regenerate with `make crds`.
    #[test]
    fn crds_directory_matches_the_rust_types() {
        let generated = crate::crdgen::crd_yaml().expect("CRD renders as YAML");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crds/byok.dev_providerkeys.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            generated == committed,
            "crds/ is stale: run `make crds` and commit the result"
        );
    }

    fn schema() -> serde_json::Value {
        let crd = ProviderKey::crd();
        serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema"),
        )
        .expect("schema serializes")
    }

    fn object(name: &str, spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "byok.dev/v1alpha1", "kind": "ProviderKey",
            "metadata": {"name": name, "namespace": "n"}, "spec": spec,
        })
    }

    /// What the API server checks on a create (`old` None) or an update: the CEL rules, and
    /// the length and count limits, which the client-side CEL validator does not check.
    fn admit(object: &serde_json::Value, old: Option<&serde_json::Value>) -> Result<(), String> {
        let schema = schema();
        limits(&schema, object, "")?;
        kube::core::cel::Validator::new()
            .validate(&schema, object, old)
            .map_err(|e| e.to_string())
    }

    fn limits(
        schema: &serde_json::Value,
        value: &serde_json::Value,
        path: &str,
    ) -> Result<(), String> {
        let max = |key: &str| schema.get(key).and_then(serde_json::Value::as_u64);
        match value {
            serde_json::Value::String(s) => match max("maxLength") {
                Some(max) if s.chars().count() as u64 > max => {
                    Err(format!("{path}: longer than {max} characters"))
                }
                _ => Ok(()),
            },
            serde_json::Value::Array(items) => {
                if let Some(max) = max("maxItems").filter(|max| items.len() as u64 > *max) {
                    return Err(format!("{path}: more than {max} items"));
                }
                items.iter().enumerate().try_for_each(|(i, item)| {
                    limits(&schema["items"], item, &format!("{path}[{i}]"))
                })
            }
            serde_json::Value::Object(fields) => fields.iter().try_for_each(|(key, field)| {
                match schema.get("properties").and_then(|p| p.get(key)) {
                    Some(field_schema) => limits(field_schema, field, &format!("{path}.{key}")),
                    None => Ok(()),
                }
            }),
            _ => Ok(()),
        }
    }

    fn validate(spec: serde_json::Value) -> Result<(), String> {
        admit(&object("k", spec), None)
    }

    /// An edit of an existing object from `old` to `new`.
    fn update(old: serde_json::Value, new: serde_json::Value) -> Result<(), String> {
        admit(&object("k", new), Some(&object("k", old)))
    }

    fn spec(provider: &str, base_url: Option<&str>) -> serde_json::Value {
        let mut spec = serde_json::json!({"provider": provider, "secretRef": {"name": "raw"}});
        if let Some(url) = base_url {
            spec["baseURL"] = url.into();
        }
        spec
    }

    #[test]
    fn good_specs_pass_the_cel_rules() {
        validate(spec("anthropic", None)).expect("anthropic without baseURL");
        validate(spec(
            "openai-compatible",
            Some("https://llm.example.com/v1"),
        ))
        .expect("compatible with baseURL");
        validate(spec("azure", Some("https://res.openai.azure.com"))).expect("azure with baseURL");
        let mut vertex = spec("vertex", None);
        vertex["vertex"] = serde_json::json!({"location": "us-central1"});
        validate(vertex).expect("vertex with location");
    }

    #[test]
    fn bad_base_urls_are_refused_with_a_message_that_says_why() {
        for (url, expected) in [
            ("http://llm.example.com", "must use https://"),
            (
                "https://user:pw@llm.example.com",
                "must not contain user info",
            ),
            (
                "https://llm.example.com/v1?x=1",
                "query string or a fragment",
            ),
            (
                "https://llm.example.com/v1#frag",
                "query string or a fragment",
            ),
        ] {
            let err = validate(spec("openai-compatible", Some(url))).expect_err(url);
            assert!(err.contains(expected), "{url}: {err}");
        }
    }

    #[test]
    fn providers_that_need_a_base_url_require_one() {
        for provider in ["azure", "openai-compatible"] {
            let err = validate(spec(provider, None)).expect_err(provider);
            assert!(err.contains("requires spec.baseURL"), "{provider}: {err}");
        }
        let err = validate(spec("vertex", None)).expect_err("vertex without location");
        assert!(err.contains("requires spec.vertex.location"), "{err}");
    }

    #[test]
    fn default_model_must_be_allowed() {
        let mut s = spec("openai", None);
        s["allowedModels"] = serde_json::json!(["gpt-4o"]);
        s["defaultModel"] = "gpt-4o-mini".into();
        let err = validate(s).expect_err("default outside allowed");
        assert!(err.contains("defaultModel must be one of"), "{err}");
    }

    #[test]
    fn secret_key_defaults_to_api_key() {
        let spec: ProviderKeySpec =
            serde_json::from_value(spec("openai", None)).expect("minimal spec deserializes");
        assert_eq!(spec.secret_ref.key, "api-key");
    }

    fn vertex(location: &str, project: Option<&str>) -> serde_json::Value {
        let mut s = spec("vertex", None);
        s["vertex"] = serde_json::json!({"location": location});
        if let Some(project) = project {
            s["vertex"]["project"] = project.into();
        }
        s
    }

    #[test]
    fn where_the_key_goes_cannot_be_edited() {
        let compatible = |url: &str| spec("openai-compatible", Some(url));
        for (old, new, expected) in [
            (
                spec("openai", None),
                spec("anthropic", None),
                "spec.provider is immutable",
            ),
            (
                compatible("https://a.example.com/v1"),
                compatible("https://b.example.com/v1"),
                "baseURL is immutable",
            ),
            (
                spec("openai", None),
                spec("openai", Some("https://evil.example.com/v1")),
                "baseURL cannot be added or removed",
            ),
            (
                spec("anthropic", Some("https://api.anthropic.com")),
                spec("anthropic", None),
                "baseURL cannot be added or removed",
            ),
            (
                vertex("us-central1", None),
                vertex("europe-west4", None),
                "vertex.location is immutable",
            ),
            (
                vertex("us-central1", Some("proj-a1")),
                vertex("us-central1", Some("proj-b2")),
                "vertex.project is immutable",
            ),
            (
                vertex("us-central1", None),
                vertex("us-central1", Some("proj-b2")),
                "vertex.project cannot be added or removed",
            ),
            (
                vertex("us-central1", Some("proj-a1")),
                vertex("us-central1", None),
                "vertex.project cannot be added or removed",
            ),
            (
                vertex("us-central1", None),
                spec("vertex", None),
                "spec.vertex cannot be added or removed",
            ),
        ] {
            let err = update(old.clone(), new.clone()).expect_err(expected);
            assert!(err.contains(expected), "{old} -> {new}: {err}");
            // The same spec is fine as a new object: only the edit is refused.
            if expected != "spec.vertex cannot be added or removed" {
                admit(&object("k2", new.clone()), None).expect("valid on create");
            }
        }
    }

    #[test]
    fn edits_that_keep_the_destination_pass() {
        let mut old = spec("openai-compatible", Some("https://llm.example.com/v1"));
        old["allowedModels"] = serde_json::json!(["m1"]);
        let mut new = old.clone();
        new["allowedModels"] = serde_json::json!(["m1", "m2"]);
        new["defaultModel"] = "m2".into();
        new["secretRef"] = serde_json::json!({"name": "rotated", "key": "token"});
        new["verification"] = serde_json::json!({"interval": "1h"});
        update(old, new).expect("models, secret and interval stay editable");

        let mut old = spec("azure", Some("https://res.openai.azure.com"));
        old["azure"] = serde_json::json!({"apiVersion": "2024-10-21"});
        let mut new = old.clone();
        new["azure"]["apiVersion"] = "2025-04-01-preview".into();
        update(old, new).expect("azure apiVersion does not pick the host");

        update(
            vertex("us-central1", Some("proj-a1")),
            vertex("us-central1", Some("proj-a1")),
        )
        .expect("unchanged vertex");
    }

    #[test]
    fn names_are_at_most_63_characters() {
        let name = |n: usize| "a".repeat(n);
        admit(&object(&name(63), spec("openai", None)), None).expect("63");
        let err = admit(&object(&name(64), spec("openai", None)), None).expect_err("64");
        assert!(err.contains("at most 63 characters"), "{err}");
    }

    fn with_secret_ref(name: &str, key: &str) -> serde_json::Value {
        let mut s = spec("openai", None);
        s["secretRef"] = serde_json::json!({"name": name, "key": key});
        s
    }

    #[test]
    fn secret_names_are_dns_subdomains() {
        for good in ["raw", "raw-key.v2", "a", "0", &"a".repeat(253)] {
            validate(with_secret_ref(good, "api-key")).expect(good);
        }
        for bad in [
            "Raw",
            "raw_key",
            "-raw",
            "raw-",
            "raw..key",
            ".raw",
            "raw/key",
            &"a".repeat(254),
        ] {
            let err = validate(with_secret_ref(bad, "api-key")).expect_err(bad);
            assert!(
                err.contains("secretRef.name") || err.contains("longer than 253"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn secret_keys_are_valid_data_keys() {
        for good in ["api-key", "API_KEY.v2", ".hidden", "a..b", &"k".repeat(253)] {
            validate(with_secret_ref("raw", good)).expect(good);
        }
        for bad in ["a/b", ".", "..", "..a", "a b", "ключ", &"k".repeat(254)] {
            let err = validate(with_secret_ref("raw", bad)).expect_err(bad);
            assert!(
                err.contains("secretRef.key") || err.contains("longer than 253"),
                "{bad}: {err}"
            );
        }
    }

    fn with_interval(interval: &str) -> serde_json::Value {
        let mut s = spec("openai", None);
        s["verification"] = serde_json::json!({"interval": interval});
        s
    }

    #[test]
    fn the_interval_rule_admits_what_the_parser_accepts() {
        for good in [
            "0",
            "0s",
            "24h",
            "90m",
            "1h30m",
            "1.5h",
            ".5h",
            "1.h",
            "500ms",
            "1us",
            "1\u{b5}s",
            "1\u{3bc}s",
            "7ns",
            "8760h",
        ] {
            validate(with_interval(good)).expect(good);
            crate::interval::parse(good).expect(good);
        }
        for bad in [
            "1h-1h", "-1h", "+1h", "banana", "h", "1e3s", "1d", "1h 30m", "\u{663}h", "1", "00", "",
        ] {
            let err = validate(with_interval(bad)).expect_err(bad);
            assert!(err.contains("verification.interval"), "{bad}: {err}");
            assert!(crate::interval::parse(bad).is_err(), "{bad}");
        }
        // The schema bounds the length; the one-year cap is the parser's to enforce.
        let err = validate(with_interval(&"9".repeat(33))).expect_err("33 characters");
        assert!(err.contains("longer than 32"), "{err}");
        validate(with_interval("99999999999999999h")).expect("short enough for the schema");
        assert!(crate::interval::parse("99999999999999999h").is_err());
    }

    /// Every string in the spec has a length bound and every list an item bound, so no field
    /// can make an object (or a CEL rule's cost) unbounded.
    #[test]
    fn every_spec_string_and_list_is_bounded() {
        fn walk(schema: &serde_json::Value, path: &str, unbounded: &mut Vec<String>) {
            match schema.get("type").and_then(serde_json::Value::as_str) {
                Some("string")
                    if schema.get("maxLength").is_none() && schema.get("enum").is_none() =>
                {
                    unbounded.push(path.to_string())
                }
                Some("array") => {
                    if schema.get("maxItems").is_none() {
                        unbounded.push(path.to_string());
                    }
                    walk(&schema["items"], &format!("{path}[]"), unbounded);
                }
                _ => {}
            }
            if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, field) in properties {
                    walk(field, &format!("{path}.{name}"), unbounded);
                }
            }
        }
        let mut unbounded = Vec::new();
        walk(&schema()["properties"]["spec"], "spec", &mut unbounded);
        assert!(unbounded.is_empty(), "unbounded: {unbounded:?}");
    }

    #[test]
    fn a_bad_interval_does_not_fail_deserialisation() {
        let spec: ProviderKeySpec = serde_json::from_value(with_interval("1h-1h"))
            .expect("any string deserializes; the controller reports it");
        assert_eq!(
            spec.verification.and_then(|v| v.interval).as_deref(),
            Some("1h-1h")
        );
    }
}
