//! The broker ↔ sidecar wire format: the key broker's answer to `GET /v1/keys/{ns}/{name}`
//! (see `docs/injection.md`) as the broker writes it ([`GrantOut`]) and as the sidecar reads
//! it ([`Grant`]), and the headers both sides use. One home, so the two sides cannot drift: a
//! round-trip test writes every field and reads it back. Kubernetes-free.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::providers::ProviderKind;

/// Answer headers: the lease and the poll period the grant carries, for a sidecar that
/// reads the headers only.
pub const LEASE_SECONDS_HEADER: &str = "x-byok-lease-seconds";
pub const POLL_SECONDS_HEADER: &str = "x-byok-poll-seconds";

/// The request header in which the sidecar tells the broker which trust bundle it holds:
/// [`trust_bundle_digest`] of the PEM it verifies the broker with. Sidecars older than trust
/// bundles send none.
pub const TRUST_BUNDLE_HEADER: &str = "x-byok-trust-bundle";

/// `sha256:<hex>` of a trust bundle's bytes, as the sidecar read them and as the operator
/// published them.
pub fn trust_bundle_digest(pem: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(pem);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The answer as the sidecar reads it (`GET /v1/keys/{ns}/{name}`, 200).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub namespace: String,
    pub provider_key: String,
    pub provider: ProviderKind,
    pub key_version: i64,
    pub fingerprint: String,
    pub credential: Credential,
    pub origin: String,
    #[serde(rename = "baseURL")]
    pub base_url: String,
    #[serde(default)]
    pub azure_api_version: Option<String>,
    #[serde(default)]
    pub default_model: Option<String>,
    #[serde(default)]
    pub allowed_models: Vec<String>,
    #[serde(default)]
    pub egress: Egress,
    /// `spec.allowCredentialMinting` (absent from older brokers: not allowed).
    #[serde(default)]
    pub allow_credential_minting: bool,
    /// Vertex: the project and location the key serves (absent from older brokers: every
    /// Vertex request is refused until the broker names them).
    #[serde(default)]
    pub vertex: Option<GrantVertex>,
    /// `spec.usage.streamUsage` resolved: add `stream_options.include_usage` to streamed
    /// OpenAI-shaped requests (absent from older brokers: requests go as sent).
    #[serde(default)]
    pub inject_stream_usage: bool,
    /// `spec.limits.perPod` (absent from older brokers, and when the key sets none).
    #[serde(default)]
    pub per_pod_limits: Option<GrantLimits>,
    pub lease_seconds: u64,
    pub poll_seconds: u64,
}

/// Per-pod limits.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantLimits {
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

/// Where a Vertex key may be used.
#[derive(Debug, Clone, Deserialize)]
pub struct GrantVertex {
    pub project: String,
    pub location: String,
}

/// The credential; `Debug` shows no value ([`SecretString`] redacts itself).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Credential {
    ApiKey {
        value: SecretString,
    },
    AccessToken {
        value: SecretString,
        #[serde(rename = "expiresAt")]
        expires_at: String,
    },
}

/// The egress policy the operator's flags set; nothing in the pod can change it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Egress {
    #[serde(default)]
    pub allow_private_addresses: bool,
    #[serde(default)]
    pub extra_ca_pem: Option<String>,
    /// The operator's `--egress-proxy` (`http://[user:password@]host:port`).
    #[serde(default, rename = "proxyURL")]
    pub proxy_url: Option<ProxyUrl>,
}

/// A proxy URL that may hold credentials: `Debug` shows none of it.
#[derive(Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(transparent)]
pub struct ProxyUrl(pub String);

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyUrl(redacted)")
    }
}

/// The answer as the broker writes it; `E` is the egress policy (the broker's own type,
/// which writes the egress proxy's URL without copying it). Read back as [`Grant`].
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantOut<'a, E: Serialize> {
    pub namespace: &'a str,
    pub provider_key: &'a str,
    pub provider: ProviderKind,
    pub key_version: i64,
    pub fingerprint: &'a str,
    pub credential: CredentialOut<'a>,
    /// `scheme://host:port` the key was verified against: the only place it may go.
    pub origin: &'a str,
    #[serde(rename = "baseURL")]
    pub base_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure_api_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_model: Option<&'a str>,
    pub allowed_models: &'a [String],
    pub egress: &'a E,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_credential_minting: bool,
    /// Vertex: where the key may be used (the proxy refuses every other aiplatform path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vertex: Option<GrantVertexOut<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inject_stream_usage: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_pod_limits: Option<GrantLimitsOut>,
    pub lease_seconds: u64,
    pub poll_seconds: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantLimitsOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

#[derive(Serialize)]
pub struct GrantVertexOut<'a> {
    pub project: &'a str,
    pub location: &'a str,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum CredentialOut<'a> {
    /// An API key the proxy sends in the provider's auth header.
    ApiKey {
        #[serde(serialize_with = "expose")]
        value: &'a SecretString,
    },
    /// A short-lived bearer token (Vertex).
    AccessToken {
        #[serde(serialize_with = "expose")]
        value: &'a SecretString,
        #[serde(rename = "expiresAt")]
        expires_at: String,
    },
}

fn expose<S: serde::Serializer>(secret: &&SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(secret.expose_secret())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An egress policy of the wire's shape (the broker's own is tested in `broker`).
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct TestEgress {
        allow_private_addresses: bool,
        extra_ca_pem: Option<&'static str>,
        #[serde(rename = "proxyURL")]
        proxy_url: Option<&'static str>,
    }

    /// No private addresses, no extra CA, no proxy.
    const NO_EGRESS: TestEgress = TestEgress {
        allow_private_addresses: false,
        extra_ca_pem: None,
        proxy_url: None,
    };

    #[test]
    fn every_field_the_broker_writes_the_sidecar_reads() {
        let key = SecretString::from("sk-ant-SECRET");
        let models = vec!["claude-sonnet-4-5".to_owned()];
        let egress = TestEgress {
            allow_private_addresses: true,
            extra_ca_pem: Some("PEM"),
            proxy_url: Some("http://u:p@proxy:3128"),
        };
        let out = GrantOut {
            namespace: "team-a",
            provider_key: "claude",
            provider: ProviderKind::Vertex,
            key_version: 7,
            fingerprint: "sha256:ab",
            credential: CredentialOut::AccessToken {
                value: &key,
                expires_at: "2026-12-07T18:00:00Z".into(),
            },
            origin: "https://aiplatform.googleapis.com",
            base_url: "https://aiplatform.googleapis.com/",
            azure_api_version: Some("2024-10-21"),
            default_model: Some("claude-sonnet-4-5"),
            allowed_models: &models,
            egress: &egress,
            allow_credential_minting: true,
            vertex: Some(GrantVertexOut {
                project: "p",
                location: "europe-west4",
            }),
            inject_stream_usage: true,
            per_pod_limits: Some(GrantLimitsOut {
                requests_per_minute: Some(60),
                tokens_per_minute: Some(100_000),
            }),
            lease_seconds: 300,
            poll_seconds: 5,
        };
        let wire = serde_json::to_vec(&out).expect("encodes");
        let read: Grant = serde_json::from_slice(&wire).expect("decodes");
        assert_eq!(read.namespace, "team-a");
        assert_eq!(read.provider_key, "claude");
        assert_eq!(read.provider, ProviderKind::Vertex);
        assert_eq!(read.key_version, 7);
        assert_eq!(read.fingerprint, "sha256:ab");
        match &read.credential {
            Credential::AccessToken { value, expires_at } => {
                assert_eq!(value.expose_secret(), "sk-ant-SECRET");
                assert_eq!(expires_at, "2026-12-07T18:00:00Z");
            }
            Credential::ApiKey { .. } => panic!("an access token was sent"),
        }
        assert_eq!(read.origin, "https://aiplatform.googleapis.com");
        assert_eq!(read.base_url, "https://aiplatform.googleapis.com/");
        assert_eq!(read.azure_api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(read.default_model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(read.allowed_models, models);
        assert!(read.egress.allow_private_addresses);
        assert_eq!(read.egress.extra_ca_pem.as_deref(), Some("PEM"));
        assert_eq!(
            read.egress.proxy_url.map(|u| u.0).as_deref(),
            Some("http://u:p@proxy:3128")
        );
        assert!(read.allow_credential_minting);
        assert!(read.inject_stream_usage);
        let limits = read.per_pod_limits.expect("limits");
        assert_eq!(limits.requests_per_minute, Some(60));
        assert_eq!(limits.tokens_per_minute, Some(100_000));
        let vertex = read.vertex.expect("vertex");
        assert_eq!(
            (vertex.project.as_str(), vertex.location.as_str()),
            ("p", "europe-west4")
        );
        assert_eq!((read.lease_seconds, read.poll_seconds), (300, 5));
        assert!(!format!("{:?}", read.credential).contains("SECRET"));
    }

    /// The names on the wire, fixed: sidecars of every release in running pods read them.
    #[test]
    fn the_wire_names_do_not_change() {
        let key = SecretString::from("k");
        let out = GrantOut {
            namespace: "n",
            provider_key: "k",
            provider: ProviderKind::OpenAICompatible,
            key_version: 1,
            fingerprint: "f",
            credential: CredentialOut::AccessToken {
                value: &key,
                expires_at: "t".into(),
            },
            origin: "o",
            base_url: "b",
            azure_api_version: Some("a"),
            default_model: Some("m"),
            allowed_models: &[],
            egress: &NO_EGRESS,
            allow_credential_minting: true,
            vertex: Some(GrantVertexOut {
                project: "p",
                location: "l",
            }),
            inject_stream_usage: true,
            per_pod_limits: Some(GrantLimitsOut {
                requests_per_minute: Some(1),
                tokens_per_minute: Some(2),
            }),
            lease_seconds: 1,
            poll_seconds: 2,
        };
        let wire = serde_json::to_value(&out).expect("encodes");
        let names: Vec<&str> = wire
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = vec![
            "namespace",
            "providerKey",
            "provider",
            "keyVersion",
            "fingerprint",
            "credential",
            "origin",
            "baseURL",
            "azureApiVersion",
            "defaultModel",
            "allowedModels",
            "egress",
            "allowCredentialMinting",
            "vertex",
            "injectStreamUsage",
            "perPodLimits",
            "leaseSeconds",
            "pollSeconds",
        ];
        let mut names = names;
        names.sort_unstable();
        want.sort_unstable();
        assert_eq!(names, want);
        assert_eq!(wire["provider"], "openai-compatible");
        assert_eq!(
            wire["credential"],
            serde_json::json!({"type": "accessToken", "value": "k", "expiresAt": "t"})
        );
        assert_eq!(
            wire["vertex"],
            serde_json::json!({"project": "p", "location": "l"})
        );
        assert_eq!(
            wire["perPodLimits"],
            serde_json::json!({"requestsPerMinute": 1, "tokensPerMinute": 2})
        );
        let api_key = CredentialOut::ApiKey { value: &key };
        assert_eq!(
            serde_json::to_value(&api_key).expect("encodes"),
            serde_json::json!({"type": "apiKey", "value": "k"})
        );
    }

    #[test]
    fn left_out_fields_read_as_their_defaults() {
        let key = SecretString::from("k");
        let out = GrantOut {
            namespace: "n",
            provider_key: "k",
            provider: ProviderKind::OpenAI,
            key_version: 1,
            fingerprint: "f",
            credential: CredentialOut::ApiKey { value: &key },
            origin: "https://api.openai.com",
            base_url: "https://api.openai.com/v1",
            azure_api_version: None,
            default_model: None,
            allowed_models: &[],
            egress: &NO_EGRESS,
            allow_credential_minting: false,
            vertex: None,
            inject_stream_usage: false,
            per_pod_limits: None,
            lease_seconds: 1,
            poll_seconds: 1,
        };
        let read: Grant =
            serde_json::from_slice(&serde_json::to_vec(&out).expect("encodes")).expect("decodes");
        assert!(matches!(read.credential, Credential::ApiKey { .. }));
        assert!(read.azure_api_version.is_none() && read.default_model.is_none());
        assert!(!read.allow_credential_minting && read.vertex.is_none());
        assert!(!read.inject_stream_usage && read.per_pod_limits.is_none());
        assert_eq!(read.egress, Egress::default());
    }
}
