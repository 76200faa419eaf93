//! Google Vertex AI. The Secret holds a service-account JSON key: we sign an RS256 JWT with
//! it, exchange the JWT for an OAuth access token at the token URL, then
//! `GET {base}/v1/projects/{project}/locations/{location}/models?pageSize=1` with
//! `authorization: Bearer ACCESS_TOKEN`.
//!
//! The token URL is never taken from the JSON's `token_uri` (user content: an SSRF vector); it
//! is [`DEFAULT_VERTEX_TOKEN_URL`] or the operator's `--provider-endpoint vertex-token=URL`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::{
    ErrorBody, Provider, ProviderKind, ProviderParams, Verification, Verifier, bearer,
    classify_status, join_url, safe_token,
};
use crate::reason::Reason;

/// Google's OAuth token endpoint.
pub const DEFAULT_VERTEX_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// The scope asked for in the JWT.
pub const VERTEX_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Lifetime of the signed JWT assertion (Google's maximum).
const JWT_LIFETIME_SECS: i64 = 3600;

/// Google Vertex AI.
#[derive(Debug, Clone, Copy, Default)]
pub struct Vertex;

impl Vertex {
    /// `spec.vertex.location`, required, checked to be a plain region name (it becomes part
    /// of a host name).
    pub fn location(params: &ProviderParams) -> Result<&str, Verification> {
        let loc = params.vertex_location.as_deref().ok_or_else(|| {
            Verification::invalid_spec("vertex needs spec.vertex.location (e.g. us-central1)")
        })?;
        let ok = !loc.is_empty()
            && loc.len() <= 63
            && loc
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !loc.starts_with('-')
            && !loc.ends_with('-');
        ok.then_some(loc).ok_or_else(|| {
            Verification::invalid_spec(
                "spec.vertex.location must be a region name such as us-central1 or global",
            )
        })
    }

    /// `spec.vertex.project`, checked to be a plain project id.
    fn project(params: &ProviderParams) -> Result<&str, Verification> {
        let p = params.vertex_project.as_deref().ok_or_else(|| {
            Verification::invalid_spec(
                "vertex needs spec.vertex.project or a project_id in the service-account JSON",
            )
        })?;
        let ok = p.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && p.len() <= 128
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'_'));
        ok.then_some(p).ok_or_else(|| {
            Verification::invalid_spec("the Vertex project id holds characters a project id cannot")
        })
    }

    /// Judges the token endpoint's non-2xx answer. Pure.
    pub fn classify_token(status: u16, body: &[u8]) -> Verification {
        let e = ErrorBody::parse(body);
        let token = ErrorBody::token(&[&e.oauth, &e.status]);
        let detail = match token {
            Some(t) => format!("HTTP {status} {t}"),
            None => format!("HTTP {status}"),
        };
        match (status, e.oauth.as_deref()) {
            (400, Some("invalid_grant")) | (401, _) | (403, _) => Verification::new(
                Reason::InvalidKey,
                format!("Google refused the service-account key at the token endpoint ({detail})"),
            ),
            (429, _) => Verification::new(
                Reason::RateLimited,
                format!("the Google token endpoint asked us to slow down ({detail}); will retry"),
            ),
            (500..=599, _) => Verification::new(
                Reason::ProviderUnavailable,
                format!("the Google token endpoint is unavailable ({detail}); will retry"),
            ),
            _ => Verification::invalid_spec(format!(
                "the token endpoint answered {detail} to the JWT exchange: check the \
                 vertex-token endpoint and the service-account key"
            )),
        }
    }
}

impl Provider for Vertex {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Vertex
    }

    fn default_base_url(&self, params: &ProviderParams) -> Result<Url, Verification> {
        let loc = Vertex::location(params)?;
        let raw = if loc == "global" {
            "https://aiplatform.googleapis.com".to_owned()
        } else {
            format!("https://{loc}-aiplatform.googleapis.com")
        };
        Url::parse(&raw).map_err(|_| {
            Verification::invalid_spec("spec.vertex.location does not make a valid host name")
        })
    }

    /// `credential` is the OAuth access token.
    fn auth_headers(&self, credential: &str) -> Result<HeaderMap, Verification> {
        bearer(self.kind(), credential)
    }

    fn verification_url(&self, base: &Url, params: &ProviderParams) -> Result<Url, Verification> {
        let project = Vertex::project(params)?;
        let location = Vertex::location(params)?;
        Ok(join_url(
            base,
            &["v1", "projects", project, "locations", location, "models"],
            Some(("pageSize", "1")),
        ))
    }

    /// The models list. 403 means the service account lacks permission.
    fn classify(&self, status: u16, body: &[u8]) -> Verification {
        if status == 403 {
            return Verification::new(
                Reason::InvalidKey,
                "the service account lacks permission to list Vertex models \
                 (HTTP 403 PERMISSION_DENIED)",
            );
        }
        let e = ErrorBody::parse(body);
        let token = ErrorBody::token(&[&e.status]);
        classify_status(self.kind(), status, token, e.insufficient_quota())
    }
}

/// A Google service-account JSON key. `Debug` never shows the private key.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: String,
    pub project_id: Option<String>,
    private_key: SecretString,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("project_id", &self.project_id)
            .field("private_key", &"[REDACTED]")
            .finish()
    }
}

impl ServiceAccountKey {
    /// Parses the JSON. Errors are InvalidSpec and name the missing field only, never
    /// content.
    pub fn parse(json: &str) -> Result<ServiceAccountKey, Verification> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|_| {
            Verification::invalid_spec("the Secret does not hold a service-account JSON key")
        })?;
        if !v.is_object() {
            return Err(Verification::invalid_spec(
                "the Secret does not hold a service-account JSON key (not a JSON object)",
            ));
        }
        let field = |name: &str| -> Result<&str, Verification> {
            v.get(name)
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    Verification::invalid_spec(format!(
                        "the service-account JSON has no {name} field"
                    ))
                })
        };
        let kind = field("type")?;
        if kind != "service_account" {
            return Err(Verification::invalid_spec(match safe_token(kind) {
                Some(k) => format!("the JSON key is of type {k}, expected service_account"),
                None => "the JSON key is not of type service_account".to_owned(),
            }));
        }
        let key = ServiceAccountKey {
            client_email: field("client_email")?.to_owned(),
            private_key_id: field("private_key_id")?.to_owned(),
            private_key: SecretString::from(field("private_key")?),
            project_id: v
                .get("project_id")
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        };
        // Fail early on an unusable key rather than at the first exchange.
        key.key_pair()?;
        Ok(key)
    }

    fn key_pair(&self) -> Result<RsaKeyPair, Verification> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(self.private_key.expose_secret().as_bytes())
            .map_err(|_| {
            Verification::invalid_spec(
                "the service-account private_key is not a PEM PKCS#8 private key",
            )
        })?;
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| {
            Verification::invalid_spec(format!(
                "the service-account private_key is not a usable RSA key ({})",
                e
            ))
        })
    }

    /// The signed RS256 JWT assertion for `token_url`, issued at `now` (Unix seconds). The
    /// assertion is a credential for an hour: it stays secret.
    pub fn sign_jwt(&self, token_url: &Url, now: i64) -> Result<SecretString, Verification> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": VERTEX_SCOPE,
            "aud": token_url.as_str(),
            "iat": now,
            "exp": now + JWT_LIFETIME_SECS,
        });
        let mut jwt = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key_pair = self.key_pair()?;
        let mut sig = vec![0u8; key_pair.public().modulus_len()];
        key_pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                jwt.as_bytes(),
                &mut sig,
            )
            .map_err(|_| {
                Verification::invalid_spec("signing the JWT with the service-account key failed")
            })?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(SecretString::from(jwt))
    }
}

/// A short-lived OAuth access token for Vertex. `Debug` never shows the token.
#[derive(Debug, Clone)]
pub struct VertexAccessToken {
    pub token: SecretString,
    pub expires_at: jiff::Timestamp,
}

impl VertexAccessToken {
    /// Parses the token endpoint's 2xx body. Pure.
    pub fn parse(body: &[u8], now: jiff::Timestamp) -> Result<VertexAccessToken, Verification> {
        let unusable = || {
            Verification::new(
                Reason::ProviderUnavailable,
                "the Google token endpoint answered without a usable access_token; will retry",
            )
        };
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| unusable())?;
        let token = v
            .get("access_token")
            .and_then(serde_json::Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(unusable)?;
        let expires_in = v
            .get("expires_in")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(JWT_LIFETIME_SECS)
            .clamp(0, 24 * 3600);
        let expires_at = now
            .checked_add(jiff::SignedDuration::from_secs(expires_in))
            .unwrap_or(now);
        Ok(VertexAccessToken {
            token: SecretString::from(token),
            expires_at,
        })
    }
}

/// Result of one step: the outcome with the host and status, or an early failure with the
/// host if one was known.
type Step = Result<(Verification, Option<String>, Option<u16>), (Verification, Option<String>)>;

impl Verifier {
    /// The Vertex OAuth token URL (override or default), checked against the egress policy.
    pub fn vertex_token_url(&self) -> Result<Url, Verification> {
        let url = match self.endpoints.vertex_token_url() {
            Some(url) => url.clone(),
            None => super::const_url(DEFAULT_VERTEX_TOKEN_URL),
        };
        self.check_url(&url, "the Vertex token URL")?;
        Ok(url)
    }

    /// Mints an access token from a service-account JSON key (the broker reuses this).
    pub async fn vertex_access_token(
        &self,
        service_account_json: &SecretString,
    ) -> Result<VertexAccessToken, Verification> {
        let sa = ServiceAccountKey::parse(service_account_json.expose_secret())?;
        let token_url = self.vertex_token_url()?;
        self.exchange(&sa, token_url).await
    }

    async fn exchange(
        &self,
        sa: &ServiceAccountKey,
        token_url: Url,
    ) -> Result<VertexAccessToken, Verification> {
        let now = jiff::Timestamp::now();
        let jwt = sa.sign_jwt(&token_url, now.as_second())?;
        // base64url and '.' need no form encoding.
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
            jwt.expose_secret()
        );
        let request = self
            .http
            .post(token_url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        let (status, body) = self.send(ProviderKind::Vertex, request).await?;
        if (200..300).contains(&status) {
            VertexAccessToken::parse(&body, now)
        } else {
            Err(Vertex::classify_token(status, &body))
        }
    }

    pub(super) async fn verify_vertex(
        &self,
        credential: &SecretString,
        params: &ProviderParams,
    ) -> Step {
        let sa = ServiceAccountKey::parse(credential.expose_secret()).map_err(|v| (v, None))?;
        let mut params = params.clone();
        if params.vertex_project.is_none() {
            params.vertex_project = sa.project_id.clone();
        }
        // Every URL is checked before the first request.
        let base = self
            .resolve_base_url(ProviderKind::Vertex, &params)
            .map_err(|v| (v, None))?;
        let host = base.host_str().map(str::to_owned);
        let url = Vertex
            .verification_url(&base, &params)
            .map_err(|v| (v, host.clone()))?;
        let token_url = self.vertex_token_url().map_err(|v| (v, None))?;
        let token_host = token_url.host_str().map(str::to_owned);
        let token = self
            .exchange(&sa, token_url)
            .await
            .map_err(|v| (v, token_host))?;
        let headers = Vertex
            .auth_headers(token.token.expose_secret())
            .map_err(|v| (v, host.clone()))?;
        let (status, body) = self
            .send(ProviderKind::Vertex, self.http.get(url).headers(headers))
            .await
            .map_err(|v| (v, host.clone()))?;
        Ok((Vertex.classify(status, &body), host, Some(status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::const_url;

    const TEST_KEY: &str = include_str!("testdata/vertex-test-key.pem");

    fn sa_json(extra: &[(&str, &str)], drop: &[&str]) -> String {
        let mut v = serde_json::json!({
            "type": "service_account",
            "project_id": "my-proj",
            "private_key_id": "0123456789abcdef",
            "private_key": TEST_KEY,
            "client_email": "byok@my-proj.iam.gserviceaccount.com",
            "client_id": "1234567890",
            "token_uri": "https://evil.test/token",
        });
        for (k, val) in extra {
            v[*k] = serde_json::Value::String((*val).to_owned());
        }
        if let Some(o) = v.as_object_mut() {
            for k in drop {
                o.remove(*k);
            }
        }
        v.to_string()
    }

    #[test]
    fn parse_service_account() {
        let sa = ServiceAccountKey::parse(&sa_json(&[], &[])).expect("valid");
        assert_eq!(sa.project_id.as_deref(), Some("my-proj"));
        let dbg = format!("{sa:?}");
        assert!(
            !dbg.contains("PRIVATE KEY") && dbg.contains("REDACTED"),
            "{dbg}"
        );

        for missing in ["type", "client_email", "private_key", "private_key_id"] {
            let err = ServiceAccountKey::parse(&sa_json(&[], &[missing])).unwrap_err();
            assert_eq!(err.reason, Reason::InvalidSpec);
            assert_eq!(
                err.message,
                format!("the service-account JSON has no {missing} field")
            );
        }
        let no_project = ServiceAccountKey::parse(&sa_json(&[], &["project_id"])).expect("ok");
        assert!(no_project.project_id.is_none());

        let err =
            ServiceAccountKey::parse(&sa_json(&[("type", "authorized_user")], &[])).unwrap_err();
        assert!(err.message.contains("authorized_user"));
        let err = ServiceAccountKey::parse(&sa_json(
            &[(
                "private_key",
                "-----BEGIN PRIVATE KEY-----\nQUJD\n-----END PRIVATE KEY-----\n",
            )],
            &[],
        ))
        .unwrap_err();
        assert_eq!(err.reason, Reason::InvalidSpec);
        assert!(!err.message.contains("QUJD"));
        for junk in ["", "sk-ant-notjson", "[1,2]", "\"str\""] {
            let err = ServiceAccountKey::parse(junk).unwrap_err();
            assert_eq!(err.reason, Reason::InvalidSpec, "{junk}");
            assert!(!err.message.contains("sk-ant"));
        }
    }

    #[test]
    fn jwt_is_rs256_and_verifies() {
        let sa = ServiceAccountKey::parse(&sa_json(&[], &[])).expect("valid");
        let token_url = const_url(DEFAULT_VERTEX_TOKEN_URL);
        let jwt = sa.sign_jwt(&token_url, 1_700_000_000).expect("signed");
        let parts: Vec<&str> = jwt.expose_secret().split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| !p.contains('=')));
        let dec = |s: &str| -> serde_json::Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).expect("b64")).expect("json")
        };
        assert_eq!(
            dec(parts[0]),
            serde_json::json!({"alg":"RS256","typ":"JWT","kid":"0123456789abcdef"})
        );
        assert_eq!(
            dec(parts[1]),
            serde_json::json!({
                "iss": "byok@my-proj.iam.gserviceaccount.com",
                "scope": VERTEX_SCOPE,
                "aud": "https://oauth2.googleapis.com/token",
                "iat": 1_700_000_000,
                "exp": 1_700_003_600,
            })
        );
        let public = sa.key_pair().expect("key").public().as_ref().to_vec();
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            public,
        )
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("signature verifies");
    }

    #[test]
    fn token_endpoint_rows() {
        let t = VertexAccessToken::parse(
            br#"{"access_token":"ya29.c.SECRET","expires_in":3599,"token_type":"Bearer"}"#,
            jiff::Timestamp::UNIX_EPOCH,
        )
        .expect("token");
        assert_eq!(t.token.expose_secret(), "ya29.c.SECRET");
        assert_eq!(t.expires_at.as_second(), 3599);
        assert!(!format!("{t:?}").contains("SECRET"));
        let bad = VertexAccessToken::parse(b"{}", jiff::Timestamp::UNIX_EPOCH).unwrap_err();
        assert_eq!(bad.reason, Reason::ProviderUnavailable);

        let grant = br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
        let v = Vertex::classify_token(400, grant);
        assert_eq!(v.reason, Reason::InvalidKey);
        assert!(v.message.contains("invalid_grant") && !v.message.contains("Signature"));
        let client =
            br#"{"error":"invalid_client","error_description":"The OAuth client was not found."}"#;
        assert_eq!(
            Vertex::classify_token(401, client).reason,
            Reason::InvalidKey
        );
        let scope = br#"{"error":"invalid_scope","error_description":"bad"}"#;
        assert_eq!(
            Vertex::classify_token(400, scope).reason,
            Reason::InvalidSpec
        );
        assert_eq!(Vertex::classify_token(429, b"").reason, Reason::RateLimited);
        assert_eq!(
            Vertex::classify_token(503, b"").reason,
            Reason::ProviderUnavailable
        );
        assert_eq!(Vertex::classify_token(404, b"").reason, Reason::InvalidSpec);
    }

    #[test]
    fn models_rows() {
        assert_eq!(
            Vertex.classify(200, br#"{"models":[]}"#).reason,
            Reason::Valid
        );
        let denied = br#"{"error":{"code":403,"message":"Permission 'aiplatform.models.list' denied on resource","status":"PERMISSION_DENIED"}}"#;
        let v = Vertex.classify(403, denied);
        assert_eq!(v.reason, Reason::InvalidKey);
        assert!(v.message.contains("lacks permission"));
        let nf = br#"{"error":{"code":404,"message":"Project not found","status":"NOT_FOUND"}}"#;
        let v = Vertex.classify(404, nf);
        assert_eq!(v.reason, Reason::InvalidSpec);
        assert!(v.message.contains("NOT_FOUND") && !v.message.contains("Project not"));
        assert_eq!(Vertex.classify(401, b"").reason, Reason::InvalidKey);
        assert_eq!(Vertex.classify(429, b"").reason, Reason::RateLimited);
        assert_eq!(
            Vertex.classify(500, b"").reason,
            Reason::ProviderUnavailable
        );
    }

    #[test]
    fn urls() {
        let mut params = ProviderParams {
            vertex_location: Some("us-central1".into()),
            vertex_project: Some("my-proj".into()),
            ..Default::default()
        };
        let base = Vertex.default_base_url(&params).expect("base");
        assert_eq!(
            base.as_str(),
            "https://us-central1-aiplatform.googleapis.com/"
        );
        let url = Vertex.verification_url(&base, &params).expect("url");
        assert_eq!(
            url.as_str(),
            "https://us-central1-aiplatform.googleapis.com/v1/projects/my-proj/locations/us-central1/models?pageSize=1"
        );
        params.vertex_location = Some("global".into());
        let base = Vertex.default_base_url(&params).expect("base");
        assert_eq!(base.as_str(), "https://aiplatform.googleapis.com/");
        for bad in ["", "evil.test/", "US-CENTRAL1", "a b", "-x", "x.evil.test#"] {
            params.vertex_location = Some(bad.into());
            assert_eq!(
                Vertex.default_base_url(&params).unwrap_err().reason,
                Reason::InvalidSpec,
                "{bad:?}"
            );
        }
        params.vertex_location = None;
        assert!(Vertex.default_base_url(&params).is_err());
        params.vertex_location = Some("europe-west4".into());
        for bad in ["proj/../x", "..", ".", "-x", ""] {
            params.vertex_project = Some(bad.into());
            assert!(Vertex.verification_url(&base, &params).is_err(), "{bad}");
        }
        params.vertex_project = None;
        assert!(Vertex.verification_url(&base, &params).is_err());

        let h = Vertex.auth_headers("ya29.SECRETSECRET").expect("headers");
        assert!(h["authorization"].is_sensitive());
        assert!(!format!("{h:?}").contains("SECRETSECRET"));
    }

    #[tokio::test]
    async fn token_url_never_comes_from_the_json() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http =
            crate::egress::http_client(&crate::egress::EgressConfig::default()).expect("client");
        let v = Verifier::new(http, super::super::Endpoints::default(), false);
        assert_eq!(
            v.vertex_token_url().expect("default").as_str(),
            DEFAULT_VERTEX_TOKEN_URL
        );
        let endpoints =
            super::super::Endpoints::parse(&["vertex-token=https://127.0.0.1:8443/token".into()])
                .expect("ok");
        let http =
            crate::egress::http_client(&crate::egress::EgressConfig::default()).expect("client");
        let v = Verifier::new(http, endpoints, false);
        // A private override is refused without allow_private, before any request.
        let params = ProviderParams {
            vertex_location: Some("us-central1".into()),
            ..Default::default()
        };
        let out = v
            .verify(
                ProviderKind::Vertex,
                &SecretString::from(sa_json(&[], &[])),
                &params,
            )
            .await;
        assert_eq!(out.reason, Reason::BaseURLRejected, "{out}");
    }
}
