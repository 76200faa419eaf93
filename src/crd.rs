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
/// The Azure OpenAI data-plane API version used when `spec.azure.apiVersion` is not set.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

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
    ),
    printcolumn(name = "Masked", type_ = "string", json_path = ".status.maskedKey"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.keyVersion"),
    printcolumn(
        name = "Verified",
        type_ = "date",
        json_path = ".status.lastVerifiedTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
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
    .message("spec.defaultModel must be one of spec.allowedModels")
)]
#[serde(rename_all = "camelCase")]
pub struct ProviderKeySpec {
    /// The LLM provider this key belongs to: anthropic, openai, google (Gemini API), vertex
    /// (Vertex AI; the Secret holds a service-account JSON key), azure (Azure OpenAI) or
    /// openai-compatible (any endpoint that speaks the OpenAI API).
    pub provider: ProviderKind,

    /// The Secret, in this namespace, that holds the raw key. The operator only reads it;
    /// after verification the key is kept encrypted in the managed Secret `<name>-byok`.
    pub secret_ref: SecretKeyRef,

    /// The provider's API base URL, as its official SDK takes it (for example
    /// https://api.anthropic.com or https://llm.example.com/v1). Optional for anthropic,
    /// openai, google and vertex (their public endpoints are the default); required for azure
    /// and openai-compatible. Must be https, without user info, query or fragment; the
    /// operator also refuses hosts that resolve to private, loopback, link-local or metadata
    /// addresses.
    #[serde(rename = "baseURL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 2048))]
    #[x_kube(
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

    /// How the key is re-verified over time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationSpec>,

    /// Azure OpenAI settings; only with provider azure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSpec>,

    /// Vertex AI settings; required with provider vertex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<VertexSpec>,
}

/// A key in a Secret in the ProviderKey's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// The entry in the Secret's data that holds the key. Defaults to `api-key`.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    DEFAULT_SECRET_KEY.to_string()
}

/// Periodic re-verification.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationSpec {
    /// How often the key is verified again with a live call, as a duration such as `24h` or
    /// `90m`. `0` disables periodic re-verification (a changed key is still verified).
    /// Intervals under one minute are raised to one minute. Defaults to `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
#[serde(rename_all = "camelCase")]
pub struct VertexSpec {
    /// The Google Cloud project. Defaults to the `project_id` in the service-account key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z][a-z0-9-]{4,28}[a-z0-9]$')")
        .message("vertex.project must be a Google Cloud project id"))]
    #[schemars(length(max = 30))]
    pub project: Option<String>,

    /// The Vertex AI location (region), e.g. `us-central1`, or `global`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9-]+$')")
        .message("vertex.location must be a region name such as us-central1"))]
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

    /// The key in service, masked: a recognisable prefix and the last 4 characters.
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

    /// Fingerprint of a newer key in the source Secret that failed verification; the key in
    /// service stays until the source Secret holds a key that passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_fingerprint: Option<String>,

    /// The Secret holding the encrypted key, `<name>-byok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_secret_name: Option<String>,

    /// The id of the operator key that encrypted the managed Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
}

impl ProviderKey {
    /// The name of the managed Secret for this ProviderKey.
    pub fn managed_secret_name(&self) -> String {
        managed_secret_name(&kube::ResourceExt::name_any(self))
    }
}

pub fn managed_secret_name(providerkey: &str) -> String {
    format!("{providerkey}-byok")
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

    fn validate(spec: serde_json::Value) -> Result<(), String> {
        let crd = ProviderKey::crd();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema"),
        )
        .expect("schema serializes");
        let object = serde_json::json!({
            "apiVersion": "byok.dev/v1alpha1", "kind": "ProviderKey",
            "metadata": {"name": "k", "namespace": "n"}, "spec": spec,
        });
        kube::core::cel::Validator::new()
            .validate(&schema, &object, None)
            .map_err(|e| e.to_string())
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
}
