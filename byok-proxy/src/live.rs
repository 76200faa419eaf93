//! The checks that turn the broker's answer ([`crate::grant::Grant`]) into a key in service
//! ([`Live`]). Pure: a grant that fails a check is refused whole.

use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::endpoints::{EndpointPolicy, VertexScope};
use super::models::ModelPolicy;
pub use crate::grant::{Credential, Egress, Grant, GrantVertex, ProxyUrl};
use crate::providers::ProviderKind;
use crate::providers::auth::AuthForm;

/// A key in service: everything the hot path needs, decided once per grant.
pub struct Live {
    pub provider: ProviderKind,
    pub key_version: i64,
    pub fingerprint: String,
    /// `https://host[:port]`, the verified origin: the only place requests go.
    pub origin: String,
    /// The base URL's path without a trailing slash (`""` for none).
    pub base_path: String,
    pub auth_name: HeaderName,
    /// Marked sensitive: `Debug` and HTTP/2 HPACK indexing leave it out.
    pub auth_value: HeaderValue,
    pub azure_api_version: Option<String>,
    /// Add `stream_options.include_usage` to streamed OpenAI-shaped requests.
    pub inject_stream_usage: bool,
    /// `spec.limits.perPod`.
    pub limits: crate::limits::Limits,
    pub models: ModelPolicy,
    pub endpoints: EndpointPolicy,
    /// When the credential itself stops working (Vertex access tokens).
    pub expires: Option<Instant>,
    pub egress: Egress,
    pub lease: Duration,
    pub poll: Duration,
    /// The connection pool for `egress`, set by the refresher.
    pub upstream: Option<super::upstream::Upstream>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("provider", &self.provider)
            .field("key_version", &self.key_version)
            .field("fingerprint", &self.fingerprint)
            .field("origin", &self.origin)
            .field("base_path", &self.base_path)
            .finish_non_exhaustive()
    }
}

/// The shortest and longest lease and poll period accepted from a broker.
const MIN_PERIOD: Duration = Duration::from_secs(1);
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
const MAX_POLL: Duration = Duration::from_secs(300);

impl Live {
    /// Checks a grant for key `name` in `namespace`. Messages never hold key material.
    pub fn from_grant(
        grant: Grant,
        namespace: &str,
        name: &str,
        now: Instant,
    ) -> Result<Live, String> {
        if grant.namespace != namespace || grant.provider_key != name {
            return Err("the broker answered for another key".into());
        }
        let origin = Url::parse(&grant.origin).map_err(|e| format!("bad origin: {e}"))?;
        let base = Url::parse(&grant.base_url).map_err(|e| format!("bad baseURL: {e}"))?;
        crate::egress::check_shape(&base).map_err(|e| format!("baseURL refused: {e}"))?;
        if origin.origin() != base.origin() || origin.path() != "/" {
            return Err("the baseURL is not below the verified origin".into());
        }
        if !grant.egress.allow_private_addresses {
            crate::egress::check_host(&base).map_err(|e| format!("baseURL refused: {e}"))?;
        }
        let origin = origin.origin().ascii_serialization();
        let base_path = base.path().trim_end_matches('/').to_owned();
        let (value, expires) = match (&grant.credential, grant.provider) {
            (Credential::AccessToken { value, expires_at }, ProviderKind::Vertex) => {
                let at: jiff::Timestamp = expires_at
                    .parse()
                    .map_err(|_| "the access token's expiresAt is not a timestamp")?;
                let left = at.duration_since(jiff::Timestamp::now());
                let left = Duration::try_from(left).unwrap_or_default();
                (value, Some(now + left))
            }
            (Credential::AccessToken { .. }, _)
            | (Credential::ApiKey { .. }, ProviderKind::Vertex) => {
                return Err("the credential type does not fit the provider".into());
            }
            (Credential::ApiKey { value }, _) => (value, None),
        };
        let auth = grant.provider.auth_header();
        let auth_name = HeaderName::from_static(auth.name);
        let secret = match auth.form {
            AuthForm::Bearer => bearer(value),
            AuthForm::Plain => plain(value),
        };
        let mut auth_value = HeaderValue::from_bytes(secret.expose_secret().as_bytes())
            .map_err(|_| "the credential cannot be sent in an HTTP header")?;
        auth_value.set_sensitive(true);
        let clamp = |s: u64, max: Duration| Duration::from_secs(s).clamp(MIN_PERIOD, max);
        Ok(Live {
            provider: grant.provider,
            key_version: grant.key_version,
            fingerprint: grant.fingerprint,
            origin,
            base_path,
            auth_name,
            auth_value,
            azure_api_version: grant.azure_api_version,
            inject_stream_usage: grant.inject_stream_usage,
            limits: grant
                .per_pod_limits
                .map(|l| crate::limits::Limits {
                    // 0 (the CRD allows no less than 1) refuses everything: fail closed.
                    requests_per_minute: l.requests_per_minute,
                    tokens_per_minute: l.tokens_per_minute,
                })
                .unwrap_or_default(),
            models: ModelPolicy::new(grant.provider, grant.default_model, grant.allowed_models),
            endpoints: EndpointPolicy {
                allow_credential_minting: grant.allow_credential_minting,
                vertex_scope: grant.vertex.map(|v| VertexScope {
                    project: v.project,
                    location: v.location,
                }),
            },
            expires,
            egress: grant.egress,
            lease: clamp(grant.lease_seconds, MAX_LEASE),
            poll: clamp(grant.poll_seconds, MAX_POLL),
            upstream: None,
        })
    }
}

fn plain(value: &SecretString) -> SecretString {
    SecretString::from(value.expose_secret().trim().to_owned())
}

fn bearer(value: &SecretString) -> SecretString {
    SecretString::from(format!("Bearer {}", value.expose_secret().trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CANARY: &str = "sk-ant-canary-0123456789";

    fn grant(extra: serde_json::Value) -> Grant {
        let mut g = json!({
            "namespace": "team", "providerKey": "claude", "provider": "anthropic",
            "keyVersion": 3, "fingerprint": "sha256:abcd",
            "credential": {"type": "apiKey", "value": CANARY},
            "origin": "https://api.anthropic.com",
            "baseURL": "https://api.anthropic.com/",
            "allowedModels": [], "egress": {"allowPrivateAddresses": false},
            "leaseSeconds": 300, "pollSeconds": 5
        });
        for (k, v) in extra.as_object().expect("object") {
            g[k] = v.clone();
        }
        serde_json::from_value(g).expect("grant")
    }

    #[test]
    fn a_grant_becomes_the_providers_auth_header() {
        let live =
            Live::from_grant(grant(json!({})), "team", "claude", Instant::now()).expect("live");
        assert_eq!(live.auth_name, "x-api-key");
        assert_eq!(live.auth_value.to_str().expect("ascii"), CANARY);
        assert!(live.auth_value.is_sensitive());
        assert_eq!(live.origin, "https://api.anthropic.com");
        assert_eq!(live.base_path, "");
        assert_eq!(live.poll, Duration::from_secs(5));
        let debug = format!("{live:?} {:?}", grant(json!({})));
        assert!(!debug.contains(CANARY), "{debug}");

        let openai = grant(
            json!({"provider": "openai", "origin": "https://api.openai.com",
            "baseURL": "https://api.openai.com/v1"}),
        );
        let live = Live::from_grant(openai, "team", "claude", Instant::now()).expect("live");
        assert_eq!(live.auth_name, "authorization");
        assert_eq!(
            live.auth_value.to_str().expect("ascii"),
            format!("Bearer {CANARY}")
        );
        assert_eq!(live.base_path, "/v1");
    }

    #[test]
    fn a_grant_that_points_elsewhere_is_refused() {
        let now = Instant::now();
        for (extra, why) in [
            (
                json!({"baseURL": "https://evil.test/"}),
                "below the verified origin",
            ),
            (
                json!({"origin": "https://api.anthropic.com/x"}),
                "below the verified origin",
            ),
            (json!({"baseURL": "http://api.anthropic.com/"}), "https"),
            (
                json!({"origin": "https://127.0.0.1", "baseURL": "https://127.0.0.1/"}),
                "IP address",
            ),
            (
                json!({"origin": "https://api.anthropic.com:8443", "baseURL": "https://api.anthropic.com:8443"}),
                "port",
            ),
            (json!({"namespace": "other"}), "another key"),
            (
                json!({"credential": {"type": "apiKey", "value": "bad\nvalue"}}),
                "HTTP header",
            ),
        ] {
            let err = Live::from_grant(grant(extra.clone()), "team", "claude", now)
                .expect_err(&format!("{extra} accepted"));
            assert!(err.contains(why), "{extra}: {err}");
            assert!(!err.contains(CANARY));
        }
        // The development flag lifts the host checks, never the origin binding.
        let dev = json!({"origin": "https://127.0.0.1:8443", "baseURL": "https://127.0.0.1:8443/anthropic",
            "egress": {"allowPrivateAddresses": true}});
        let live = Live::from_grant(grant(dev), "team", "claude", now).expect("live");
        assert_eq!(live.base_path, "/anthropic");
    }

    #[test]
    fn vertex_tokens_carry_their_expiry() {
        let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(600);
        let g = grant(json!({"provider": "vertex",
            "origin": "https://us-central1-aiplatform.googleapis.com",
            "baseURL": "https://us-central1-aiplatform.googleapis.com",
            "credential": {"type": "accessToken", "value": "ya29.token", "expiresAt": at.to_string()}}));
        let now = Instant::now();
        let live = Live::from_grant(g, "team", "claude", now).expect("live");
        let left = live.expires.expect("expiry").duration_since(now);
        assert!(left > Duration::from_secs(590) && left <= Duration::from_secs(600));
        assert_eq!(
            live.auth_value.to_str().expect("ascii"),
            "Bearer ya29.token"
        );
    }
}
