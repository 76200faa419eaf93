//! Google Vertex AI. The Secret holds a service-account JSON key: we sign an RS256 JWT with
//! it, exchange the JWT for an OAuth access token at the token URL, then
//! `GET {base}/v1/projects/{project}/locations/{location}/models?pageSize=1` with
//! `authorization: Bearer ACCESS_TOKEN`.
//!
//! The token URL is never taken from the JSON's `token_uri` (user content: an SSRF vector); it
//! is [`DEFAULT_VERTEX_TOKEN_URL`] or the operator's `--provider-endpoint vertex-token=URL`.
//!
//! Contract: `docs/providers.md`, section "Vertex AI".

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::HeaderMap;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;

use super::{
    ErrorBody, Provider, ProviderKind, ProviderParams, Verification, Verifier, classify_status,
    credential_header, join_url, safe_token, zeroizing_bytes,
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
        credential_header(self.kind(), credential)
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

/// The fields of a service-account JSON key that we read; serde skips the others without
/// copying them. A field of the wrong type reads as absent, so the error can name it.
#[derive(Deserialize)]
struct ServiceAccountJson {
    #[serde(rename = "type", default, deserialize_with = "lenient")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    client_email: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    private_key_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    project_id: Option<String>,
    #[serde(default, deserialize_with = "secret_string")]
    private_key: Option<SecretString>,
}

/// `T` if the value parses as one, `None` otherwise (never an error).
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let raw = <&'de RawValue>::deserialize(deserializer)?;
    Ok(serde_json::from_str(raw.get()).ok())
}

/// A JSON string as a secret, `None` for any other JSON value. The value is taken raw and
/// unescaped here because serde_json would decode an escaped string (a PEM always has
/// `\n`) through an internal scratch buffer that is freed without being wiped.
fn secret_string<'de, D>(deserializer: D) -> Result<Option<SecretString>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw = <&'de RawValue>::deserialize(deserializer)?;
    Ok(unescape_json_string(raw.get()).map(|s| SecretString::from(s.as_str())))
}

/// Decodes a JSON string literal (quotes included, already validated by serde_json) into a
/// buffer that is wiped on drop. `None` if `raw` is not a string literal. An unpaired
/// surrogate becomes U+FFFD.
fn unescape_json_string(raw: &str) -> Option<Zeroizing<String>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    // No escape decodes to more bytes than it takes, so this buffer never reallocates
    // (a reallocation would leave an unwiped copy behind).
    let mut out = Zeroizing::new(String::with_capacity(inner.len()));
    let mut rest = inner;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at + 1..];
        let (c, used) = match escape.bytes().next()? {
            b'"' => ('"', 1),
            b'\\' => ('\\', 1),
            b'/' => ('/', 1),
            b'b' => ('\u{8}', 1),
            b'f' => ('\u{c}', 1),
            b'n' => ('\n', 1),
            b'r' => ('\r', 1),
            b't' => ('\t', 1),
            b'u' => {
                let high = hex4(escape.get(1..5)?)?;
                let low = escape
                    .get(5..7)
                    .filter(|s| *s == "\\u")
                    .and_then(|_| hex4(escape.get(7..11)?))
                    .filter(|low| (0xDC00..0xE000).contains(low));
                match (high, low) {
                    (0xD800..0xDC00, Some(low)) => (
                        char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
                            .unwrap_or(char::REPLACEMENT_CHARACTER),
                        11,
                    ),
                    _ => (
                        char::from_u32(high).unwrap_or(char::REPLACEMENT_CHARACTER),
                        5,
                    ),
                }
            }
            _ => return None,
        };
        out.push(c);
        rest = escape.get(used..)?;
    }
    out.push_str(rest);
    Some(out)
}

fn hex4(s: &str) -> Option<u32> {
    if s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

/// The DER of the first `PRIVATE KEY` (PKCS#8) block of a PEM, in buffers wiped on drop.
/// Decoded here rather than with a PEM library so that no intermediate base64 or DER buffer
/// outlives the call unwiped.
fn pkcs8_der(pem: &str) -> Option<Zeroizing<Vec<u8>>> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let start = pem.find(BEGIN)? + BEGIN.len();
    let body = &pem[start..];
    let body = &body[..body.find(END)?];
    let mut encoded = Zeroizing::new(Vec::with_capacity(body.len()));
    encoded.extend(body.bytes().filter(|b| !b.is_ascii_whitespace()));
    let mut der = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(encoded.len())]);
    let len = STANDARD
        .decode_slice(encoded.as_slice(), der.as_mut_slice())
        .ok()?;
    der.truncate(len);
    Some(der)
}

impl ServiceAccountKey {
    /// Parses the JSON. Errors are InvalidSpec and name the missing field only, never
    /// content.
    pub fn parse(json: &str) -> Result<ServiceAccountKey, Verification> {
        let not_a_key =
            || Verification::invalid_spec("the Secret does not hold a service-account JSON key");
        if !json.trim_start().starts_with('{') {
            // IgnoredAny tells "JSON, but not an object" from "not JSON" without building a
            // value.
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(json) {
                Ok(_) => Verification::invalid_spec(
                    "the Secret does not hold a service-account JSON key (not a JSON object)",
                ),
                Err(_) => not_a_key(),
            });
        }
        let json: ServiceAccountJson = serde_json::from_str(json).map_err(|_| not_a_key())?;
        let missing = |name: &str| {
            Verification::invalid_spec(format!("the service-account JSON has no {name} field"))
        };
        let non_empty = |s: &String| !s.is_empty();
        let kind = json.kind.filter(non_empty).ok_or_else(|| missing("type"))?;
        if kind != "service_account" {
            return Err(Verification::invalid_spec(match safe_token(&kind) {
                Some(k) => format!("the JSON key is of type {k}, expected service_account"),
                None => "the JSON key is not of type service_account".to_owned(),
            }));
        }
        let key = ServiceAccountKey {
            client_email: json
                .client_email
                .filter(non_empty)
                .ok_or_else(|| missing("client_email"))?,
            private_key_id: json
                .private_key_id
                .filter(non_empty)
                .ok_or_else(|| missing("private_key_id"))?,
            private_key: json
                .private_key
                .filter(|k| !k.expose_secret().is_empty())
                .ok_or_else(|| missing("private_key"))?,
            project_id: json.project_id.filter(non_empty),
        };
        // Fail early on an unusable key rather than at the first exchange.
        key.key_pair()?;
        Ok(key)
    }

    fn key_pair(&self) -> Result<RsaKeyPair, Verification> {
        let der = pkcs8_der(self.private_key.expose_secret()).ok_or_else(|| {
            Verification::invalid_spec(
                "the service-account private_key is not a PEM PKCS#8 private key",
            )
        })?;
        RsaKeyPair::from_pkcs8(&der).map_err(|e| {
            Verification::invalid_spec(format!(
                "the service-account private_key is not a usable RSA key ({e})"
            ))
        })
    }

    /// The signed RS256 JWT assertion for `token_url`, issued at `now` (Unix seconds). The
    /// assertion is a credential for an hour: it stays secret.
    pub fn sign_jwt(&self, token_url: &Url, now: i64) -> Result<SecretString, Verification> {
        let failed =
            || Verification::invalid_spec("signing the JWT with the service-account key failed");
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": VERTEX_SCOPE,
            "aud": token_url.as_str(),
            "iat": now,
            "exp": now + JWT_LIFETIME_SECS,
        });
        // Header and claims are not secret; the signature is (with them it is the assertion).
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key_pair = self.key_pair()?;
        let mut sig = Zeroizing::new(vec![0u8; key_pair.public().modulus_len()]);
        key_pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| failed())?;
        let sig_len = base64::encoded_len(sig.len(), false).ok_or_else(failed)?;
        let mut jwt = Zeroizing::new(vec![0u8; signing_input.len() + 1 + sig_len]);
        let (head, tail) = jwt.split_at_mut(signing_input.len());
        head.copy_from_slice(signing_input.as_bytes());
        let (dot, encoded) = tail.split_at_mut(1);
        dot[0] = b'.';
        URL_SAFE_NO_PAD
            .encode_slice(sig.as_slice(), encoded)
            .map_err(|_| failed())?;
        let jwt = std::str::from_utf8(&jwt).map_err(|_| failed())?;
        Ok(SecretString::from(jwt))
    }
}

/// The token endpoint's 2xx body, reduced to what we use.
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default, deserialize_with = "secret_string")]
    access_token: Option<SecretString>,
    #[serde(default, deserialize_with = "lenient")]
    expires_in: Option<i64>,
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
        let response: TokenResponse = serde_json::from_slice(body).map_err(|_| unusable())?;
        let token = response
            .access_token
            .filter(|t| !t.expose_secret().is_empty())
            .ok_or_else(unusable)?;
        let expires_in = response
            .expires_in
            .unwrap_or(JWT_LIFETIME_SECS)
            .clamp(0, 24 * 3600);
        let expires_at = now
            .checked_add(jiff::SignedDuration::from_secs(expires_in))
            .unwrap_or(now);
        Ok(VertexAccessToken { token, expires_at })
    }
}

/// Result of one step: the outcome with the host and status, or an early failure with the
/// host if one was known.
type Step = Result<(Verification, Option<String>, Option<u16>), (Verification, Option<String>)>;

const TOKEN_REQUEST_PREFIX: &str =
    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=";

/// The form body of the JWT exchange, in a buffer wiped when the HTTP stack drops it.
fn token_request_body(jwt: &SecretString) -> bytes::Bytes {
    let jwt = jwt.expose_secret();
    // base64url and '.' need no form encoding.
    let mut body = Zeroizing::new(Vec::with_capacity(TOKEN_REQUEST_PREFIX.len() + jwt.len()));
    body.extend_from_slice(TOKEN_REQUEST_PREFIX.as_bytes());
    body.extend_from_slice(jwt.as_bytes());
    zeroizing_bytes(body)
}

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
        // The assertion itself is dropped (wiped) here; only the body's copy stays in flight.
        let body = token_request_body(&sa.sign_jwt(&token_url, now.as_second())?);
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
    fn parse_keeps_no_plain_copy_and_redacts_debug() {
        let json = sa_json(&[], &[]);
        let sa = ServiceAccountKey::parse(&json).expect("valid");
        assert_eq!(sa.private_key.expose_secret(), TEST_KEY, "escapes decoded");
        let dbg = format!("{sa:?} {sa:#?}");
        let body = TEST_KEY
            .lines()
            .find(|l| !l.starts_with("-----") && !l.is_empty())
            .expect("a base64 line");
        assert!(!dbg.contains(body), "{dbg}");
        assert!(
            dbg.contains("byok@my-proj.iam.gserviceaccount.com"),
            "{dbg}"
        );

        // A field of the wrong type reads as absent and the error names it.
        let json = json.replace(
            "\"byok@my-proj.iam.gserviceaccount.com\"",
            "{\"nested\":true}",
        );
        let err = ServiceAccountKey::parse(&json).unwrap_err();
        assert_eq!(
            err.message,
            "the service-account JSON has no client_email field"
        );
        let err = ServiceAccountKey::parse(r#"{"type":"service_account","client_email":"a@b","private_key_id":"k","private_key":42}"#)
            .unwrap_err();
        assert_eq!(
            err.message,
            "the service-account JSON has no private_key field"
        );
        let err = ServiceAccountKey::parse("[1,2]").unwrap_err();
        assert!(err.message.contains("not a JSON object"), "{}", err.message);
        let err = ServiceAccountKey::parse("{\"type\":").unwrap_err();
        assert_eq!(
            err.message,
            "the Secret does not hold a service-account JSON key"
        );
    }

    #[test]
    fn json_strings_unescape_in_place() {
        let cases = [
            (r#""""#, ""),
            (r#""plain""#, "plain"),
            (r#""a\nb\r\tc""#, "a\nb\r\tc"),
            (r#""\"\\\/\b\f""#, "\"\\/\u{8}\u{c}"),
            (r#""\u0041\u00e9\u20ac""#, "Aé€"),
            (r#""\ud83d\ude00!""#, "😀!"),
            (r#""\ud83d!""#, "\u{fffd}!"),
            (r#""\ude00\ud83d""#, "\u{fffd}\u{fffd}"),
            (r#""\ud83d\u0041""#, "\u{fffd}A"),
            (r#""é€😀""#, "é€😀"),
        ];
        for (raw, want) in cases {
            let got = unescape_json_string(raw).expect(raw);
            assert_eq!(got.as_str(), want, "{raw}");
            assert_eq!(
                got.capacity(),
                raw.len() - 2,
                "{raw}: the buffer never grew"
            );
            let via_serde: String = serde_json::from_str(raw).unwrap_or_else(|_| want.to_owned());
            assert_eq!(got.as_str(), via_serde, "{raw}: agrees with serde_json");
        }
        for not_a_string in ["42", "null", "{}", "\"", r#""\x""#, r#""\u12""#] {
            assert!(
                unescape_json_string(not_a_string).is_none(),
                "{not_a_string}"
            );
        }
    }

    #[test]
    fn pem_decoding() {
        let der = pkcs8_der(TEST_KEY).expect("the test key decodes");
        assert!(RsaKeyPair::from_pkcs8(&der).is_ok());
        let crlf = TEST_KEY.replace('\n', "\r\n");
        assert_eq!(pkcs8_der(&crlf).as_deref(), Some(&*der));
        let with_preamble = format!("Bag Attributes\n{TEST_KEY}");
        assert_eq!(pkcs8_der(&with_preamble).as_deref(), Some(&*der));
        for bad in [
            "",
            "-----BEGIN PRIVATE KEY-----\nQUJD\n",
            "-----BEGIN RSA PRIVATE KEY-----\nQUJD\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(pkcs8_der(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn token_request_body_is_the_form() {
        let body = token_request_body(&SecretString::from("aaa.bbb.ccc"));
        assert_eq!(
            &body[..],
            b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=aaa.bbb.ccc"
        );
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
