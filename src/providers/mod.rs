//! LLM providers: how each one authenticates and how a key is verified with a cheap,
//! non-billable call. One file per provider behind the [`Provider`] trait.
//! Kubernetes-free: the controller and `byok-operator verify` share this code path.
//!
//! The wire contract (URLs, headers, error bodies, classification, limits, egress) is
//! documented in `docs/providers.md`; the fake provider (`e2e/src/fake_provider.rs`)
//! implements the same contract. Change the code, the fake and the doc together.

mod anthropic;
pub use byok_proxy::providers::{ProviderKind, auth};
mod azure;
mod google;
pub mod limiter;
mod openai;
mod openai_compatible;
pub mod vertex;

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};

use url::Url;

use crate::egress;
use crate::reason::Reason;

pub use anthropic::Anthropic;
pub use azure::{Azure, DEFAULT_AZURE_API_VERSION};
pub use google::Google;
pub use openai::OpenAI;
pub use openai_compatible::OpenAICompatible;
pub use vertex::{DEFAULT_VERTEX_TOKEN_URL, ServiceAccountKey, Vertex, VertexAccessToken};

/// `scheme://host:port` of a URL: what "the same destination" means.
pub fn origin(url: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default()
    )
}

/// The most of a response body we read (error bodies are small; a model list is cut short).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What a ProviderKey's spec says about where and how to reach its provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderParams {
    /// `spec.baseURL`.
    pub base_url: Option<Url>,
    /// `spec.azure.apiVersion` (default [`DEFAULT_AZURE_API_VERSION`]).
    pub azure_api_version: Option<String>,
    /// `spec.vertex.project` (default: the service-account JSON's `project_id`).
    pub vertex_project: Option<String>,
    /// `spec.vertex.location` (required for Vertex; `global` is allowed).
    pub vertex_location: Option<String>,
}

/// The typed outcome of one verification. `message` is ours: it never carries provider
/// text (providers echo parts of the key), only the HTTP status and, at most, the
/// provider's error type/code token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub reason: Reason,
    pub message: String,
}

impl Verification {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Verification {
            reason,
            message: message.into(),
        }
    }

    pub fn invalid_spec(message: impl Into<String>) -> Self {
        Self::new(Reason::InvalidSpec, message)
    }

    pub fn base_url_rejected(message: impl Into<String>) -> Self {
        Self::new(Reason::BaseURLRejected, message)
    }

    pub fn is_valid(&self) -> bool {
        self.reason == Reason::Valid
    }
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// How one provider authenticates and how its verification call is made and judged.
/// Everything here is pure: the [`Verifier`] does the I/O.
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// The base URL when neither `spec.baseURL` nor an operator override gives one.
    /// Azure and openai-compatible have none (InvalidSpec: they need `spec.baseURL`).
    fn default_base_url(&self, params: &ProviderParams) -> Result<Url, Verification>;

    /// The headers that carry `credential`, values marked sensitive. For Vertex the
    /// credential is the OAuth access token, not the service-account JSON.
    fn auth_headers(&self, credential: &str) -> Result<HeaderMap, Verification>;

    /// The cheap, non-billable GET that proves the credential works.
    fn verification_url(&self, base: &Url, params: &ProviderParams) -> Result<Url, Verification>;

    /// Judges the verification call's response. Pure.
    fn classify(&self, status: u16, body: &[u8]) -> Verification;
}

/// The provider implementation for a kind.
pub fn provider(kind: ProviderKind) -> &'static dyn Provider {
    match kind {
        ProviderKind::Anthropic => &Anthropic,
        ProviderKind::OpenAI => &OpenAI,
        ProviderKind::Google => &Google,
        ProviderKind::Vertex => &Vertex,
        ProviderKind::Azure => &Azure,
        ProviderKind::OpenAICompatible => &OpenAICompatible,
    }
}

/// Operator overrides from repeated `--provider-endpoint PROVIDER=URL`: the URL replaces the
/// provider's default base URL (`vertex-token` replaces the Vertex OAuth token URL). A
/// ProviderKey's own `spec.baseURL` still wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    base: BTreeMap<ProviderKind, Url>,
    vertex_token: Option<Url>,
}

impl Endpoints {
    /// The key naming the Vertex OAuth token endpoint.
    pub const VERTEX_TOKEN: &'static str = "vertex-token";

    pub fn parse(items: &[String]) -> Result<Endpoints, String> {
        let mut out = Endpoints::default();
        for item in items {
            let (name, raw) = item
                .split_once('=')
                .ok_or_else(|| format!("--provider-endpoint {item:?}: expected PROVIDER=URL"))?;
            let name = name.trim();
            let url = Url::parse(raw.trim())
                .map_err(|e| format!("--provider-endpoint {name}: invalid URL: {e}"))?;
            egress::check_shape(&url).map_err(|e| format!("--provider-endpoint {name}: {e}"))?;
            if name == Self::VERTEX_TOKEN {
                if out.vertex_token.replace(url).is_some() {
                    return Err(format!("--provider-endpoint {name} is given twice"));
                }
                continue;
            }
            let kind: ProviderKind = name
                .parse()
                .map_err(|e| format!("--provider-endpoint: {e} (or {})", Self::VERTEX_TOKEN))?;
            if matches!(kind, ProviderKind::Azure | ProviderKind::OpenAICompatible) {
                return Err(format!(
                    "--provider-endpoint {name}: {kind} has no default endpoint to replace; \
                     each ProviderKey sets spec.baseURL"
                ));
            }
            if out.base.insert(kind, url).is_some() {
                return Err(format!("--provider-endpoint {name} is given twice"));
            }
        }
        Ok(out)
    }

    /// The override for a provider's default base URL.
    pub fn base_url(&self, kind: ProviderKind) -> Option<&Url> {
        self.base.get(&kind)
    }

    /// The override for the Vertex OAuth token URL.
    pub fn vertex_token_url(&self) -> Option<&Url> {
        self.vertex_token.as_ref()
    }
}

/// What goes in a provider's auth header: the API key itself, or for Vertex a short-lived
/// access token minted from the service-account key. Verification and the key broker both
/// get it through [`Verifier::credential`], so a sidecar is handed exactly what was verified
/// to work, never the service-account private key.
#[derive(Debug, Clone)]
pub enum Credential {
    ApiKey(SecretString),
    AccessToken(vertex::VertexAccessToken),
}

/// Verifies keys with a live call. One per process; cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Verifier {
    http: reqwest::Client,
    endpoints: Endpoints,
    allow_private: bool,
    limiter: std::sync::Arc<limiter::HostLimiter>,
    /// Through an egress proxy: the resolver the target is checked with before each call.
    proxied: Option<ProxiedTargets>,
}

/// The resolver targets are checked with before a call through an egress proxy.
#[derive(Clone)]
struct ProxiedTargets(Option<std::sync::Arc<dyn reqwest::dns::Resolve>>);

impl std::fmt::Debug for ProxiedTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxiedTargets")
    }
}

impl Verifier {
    /// `http` must come from [`egress::http_client`]; `allow_private` must match the
    /// [`egress::EgressConfig`] it was built with.
    pub fn new(http: reqwest::Client, endpoints: Endpoints, allow_private: bool) -> Verifier {
        Verifier {
            http,
            endpoints,
            allow_private,
            limiter: Default::default(),
            proxied: None,
        }
    }

    /// Calls go through `cfg`'s egress proxy: check each target's addresses before it.
    pub fn with_egress(mut self, cfg: &egress::EgressConfig) -> Self {
        if cfg.proxy.is_some() && !cfg.allow_private {
            self.proxied = Some(ProxiedTargets(cfg.resolver.clone()));
        }
        self
    }

    /// The credential for `key` (see [`Credential`]): the key itself, or for Vertex an access
    /// token from the token endpoint (one call, counted by the per-host limiter).
    pub async fn credential(
        &self,
        kind: ProviderKind,
        key: &SecretString,
    ) -> Result<Credential, Verification> {
        match kind {
            ProviderKind::Vertex => Ok(Credential::AccessToken(
                self.vertex_access_token(key).await?,
            )),
            _ => Ok(Credential::ApiKey(key.clone())),
        }
    }

    /// The per-host limits every verification of this verifier shares.
    pub fn limiter(&self) -> &limiter::HostLimiter {
        &self.limiter
    }

    /// Replaces the default per-host limits (see [`limiter`]).
    pub fn with_limiter(mut self, limiter: limiter::HostLimiter) -> Verifier {
        self.limiter = std::sync::Arc::new(limiter);
        self
    }

    /// The base URL for a key: `spec.baseURL`, else the operator override, else the
    /// provider's default; then the egress policy (shape always, host unless
    /// `allow_private`). An error means no request may be made.
    pub fn resolve_base_url(
        &self,
        kind: ProviderKind,
        params: &ProviderParams,
    ) -> Result<Url, Verification> {
        let base = match (&params.base_url, self.endpoints.base_url(kind)) {
            (Some(url), _) => url.clone(),
            (None, Some(url)) => url.clone(),
            (None, None) => provider(kind).default_base_url(params)?,
        };
        self.check_url(&base, "baseURL")?;
        Ok(base)
    }

    fn check_url(&self, url: &Url, what: &str) -> Result<(), Verification> {
        egress::check_shape(url)
            .map_err(|e| Verification::base_url_rejected(format!("{what} refused: {e}")))?;
        if !self.allow_private {
            egress::check_host(url)
                .map_err(|e| Verification::base_url_rejected(format!("{what} refused: {e}")))?;
        }
        Ok(())
    }

    /// One live verification of `credential` (an API key, or for Vertex the
    /// service-account JSON).
    pub async fn verify(
        &self,
        kind: ProviderKind,
        credential: &SecretString,
        params: &ProviderParams,
    ) -> Verification {
        let result = if kind == ProviderKind::Vertex {
            self.verify_vertex(credential, params).await
        } else {
            self.verify_simple(kind, credential.expose_secret(), params)
                .await
        };
        let (v, host, status) = match result {
            Ok(outcome) => outcome,
            Err((v, host)) => (v, host, None),
        };
        tracing::debug!(
            provider = %kind,
            host = host.as_deref().unwrap_or(""),
            status,
            reason = %v.reason,
            "key verification finished"
        );
        v
    }

    async fn verify_simple(
        &self,
        kind: ProviderKind,
        credential: &str,
        params: &ProviderParams,
    ) -> Result<(Verification, Option<String>, Option<u16>), (Verification, Option<String>)> {
        let p = provider(kind);
        let base = self.resolve_base_url(kind, params).map_err(|v| (v, None))?;
        let host = base.host_str().map(str::to_owned);
        let url = p
            .verification_url(&base, params)
            .map_err(|v| (v, host.clone()))?;
        let headers = p.auth_headers(credential).map_err(|v| (v, host.clone()))?;
        let (status, body) = self
            .send(kind, self.http.get(url).headers(headers))
            .await
            .map_err(|v| (v, host.clone()))?;
        Ok((p.classify(status, &body), host, Some(status)))
    }

    /// Sends a request and reads at most [`MAX_BODY_BYTES`] of the response.
    async fn send(
        &self,
        kind: ProviderKind,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), Verification> {
        let request = request.build().map_err(|e| transport_error(kind, &e))?;
        let host = request.url().host_str().unwrap_or_default().to_owned();
        // Held until the body is read: the call is in flight until then. The start time was
        // reserved by the caller (the controller, see [`limiter`]).
        let _slot = self.limiter.slot(&host).await;
        if let Some(ProxiedTargets(resolver)) = &self.proxied {
            egress::check_target(&host, resolver.as_ref())
                .await
                .map_err(|rejected| {
                    Verification::base_url_rejected(format!(
                        "the address of {} is {}: refused by the egress policy, no connection attempted",
                        rejected.host, rejected.class
                    ))
                })?;
        }
        let mut response = self
            .http
            .execute(request)
            .await
            .map_err(|e| transport_error(kind, &e))?;
        let status = response.status().as_u16();
        if status == 429 {
            self.limiter.rate_limited(&host);
        } else {
            self.limiter.answered(&host);
        }
        // A body may carry a credential (the token endpoint's access token, an error that
        // echoes the key): all the room up front so no reallocation leaves an unwiped copy.
        let mut body = Zeroizing::new(Vec::with_capacity(MAX_BODY_BYTES));
        // A body cut short by an error still leaves the status, which decides most cases.
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = MAX_BODY_BYTES - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() >= MAX_BODY_BYTES {
                break;
            }
        }
        Ok((status, body))
    }
}

/// Maps a transport error to a reason. The message names the failure class and, for
/// connect errors, the root cause (an I/O or TLS error: never a URL, header or body).
fn transport_error(kind: ProviderKind, err: &reqwest::Error) -> Verification {
    if let Some(rejected) = egress::rejected_address(err) {
        return Verification::base_url_rejected(format!(
            "the address of {} is {}: refused by the egress policy, no connection attempted",
            rejected.host, rejected.class
        ));
    }
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_dns() {
        "DNS resolution failed"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_redirect() {
        "redirect refused"
    } else {
        "request failed"
    };
    let mut message = format!("calling {kind} {what}");
    if err.is_connect() || err.is_dns() {
        let mut root: &dyn std::error::Error = err;
        while let Some(next) = root.source() {
            root = next;
        }
        let cause: String = root.to_string().chars().take(200).collect();
        message.push_str(": ");
        message.push_str(&cause);
    }
    message.push_str("; will retry");
    Verification::new(Reason::ProviderUnavailable, message)
}

// ---- shared helpers for the providers ----

/// A provider error token we may repeat in a message: `^[A-Za-z0-9_.-]{1,64}$`.
pub(crate) fn safe_token(s: &str) -> Option<&str> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    ok.then_some(s)
}

/// The machine-readable parts of a provider error body; never the human message.
#[derive(Debug, Default)]
pub(crate) struct ErrorBody {
    /// `error.code` when a string (OpenAI `invalid_api_key`, Azure `"401"`).
    pub code: Option<String>,
    /// `error.type` (Anthropic, OpenAI).
    pub kind: Option<String>,
    /// `error.status` (Google `INVALID_ARGUMENT`).
    pub status: Option<String>,
    /// Top-level `error` when a string (OAuth token endpoint `invalid_grant`).
    pub oauth: Option<String>,
    /// `error.details[].reason` (Google `API_KEY_INVALID`).
    pub reasons: Vec<String>,
}

impl ErrorBody {
    pub fn parse(body: &[u8]) -> ErrorBody {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return ErrorBody::default();
        };
        let err = &v["error"];
        let s = |x: &serde_json::Value| x.as_str().map(str::to_owned);
        ErrorBody {
            code: s(&err["code"]),
            kind: s(&err["type"]),
            status: s(&err["status"]),
            oauth: s(err),
            reasons: err["details"]
                .as_array()
                .map(|d| d.iter().filter_map(|x| s(&x["reason"])).collect())
                .unwrap_or_default(),
        }
    }

    /// True when the code or type says the account has no quota.
    pub fn insufficient_quota(&self) -> bool {
        [&self.code, &self.kind]
            .into_iter()
            .any(|t| t.as_deref() == Some("insufficient_quota"))
    }

    /// The first safe token among `candidates`.
    pub fn token<'a>(candidates: &[&'a Option<String>]) -> Option<&'a str> {
        candidates
            .iter()
            .find_map(|c| c.as_deref().and_then(safe_token))
    }
}

/// The common status table of `docs/providers.md`. `token` is an already-sanitized error type/code.
pub(crate) fn classify_status(
    kind: ProviderKind,
    status: u16,
    token: Option<&str>,
    quota: bool,
) -> Verification {
    let detail = |status: u16| match token {
        Some(t) => format!("HTTP {status} {t}"),
        None => format!("HTTP {status}"),
    };
    match status {
        200..=299 => Verification::new(Reason::Valid, format!("{kind} accepted the key")),
        401 | 403 => Verification::new(
            Reason::InvalidKey,
            format!("{kind} refused the key ({})", detail(status)),
        ),
        429 if quota => Verification::new(
            Reason::QuotaExhausted,
            format!(
                "{kind} accepted the key but its account has no quota left (HTTP 429 insufficient_quota)"
            ),
        ),
        429 => Verification::new(
            Reason::RateLimited,
            format!(
                "{kind} asked us to slow down ({}); will retry",
                detail(status)
            ),
        ),
        500..=599 => Verification::new(
            Reason::ProviderUnavailable,
            format!("{kind} is unavailable ({}); will retry", detail(status)),
        ),
        _ => Verification::invalid_spec(format!(
            "the provider answered {} to the verification call: check baseURL",
            detail(status)
        )),
    }
}

/// `base` with `segments` appended to its path and `query` set. The base path's trailing
/// slash does not matter; segments are percent-encoded.
pub(crate) fn join_url(base: &Url, segments: &[&str], query: Option<(&str, &str)>) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url.set_query(None);
    url.set_fragment(None);
    if let Some((k, v)) = query {
        url.query_pairs_mut().append_pair(k, v);
    }
    url
}

/// Bytes backed by a buffer that is wiped when the last reference (ours or the HTTP
/// stack's) is dropped. Copies that hyper and rustls make while sending are out of reach.
pub(crate) fn zeroizing_bytes(buf: Zeroizing<Vec<u8>>) -> bytes::Bytes {
    bytes::Bytes::from_owner(buf)
}

/// One header map entry per `(name, value, sensitive)`. A sensitive value is marked so
/// (never logged, never HPACK-indexed) and is held in a buffer wiped on drop. A value that
/// cannot be a header (a stray newline in the Secret, say) is InvalidKey; the message never
/// shows it.
pub(crate) fn sensitive_headers(
    kind: ProviderKind,
    entries: &[(&'static str, &str, bool)],
) -> Result<HeaderMap, Verification> {
    let mut headers = HeaderMap::new();
    for (name, value, sensitive) in entries {
        let v = if *sensitive {
            secret_header_value(kind, &[value])?
        } else {
            HeaderValue::from_str(value).map_err(|_| invalid_header_value(kind))?
        };
        headers.insert(http::HeaderName::from_static(name), v);
    }
    Ok(headers)
}

/// The provider's credential header ([`ProviderKind::auth_header`]) holding `credential`,
/// sensitive.
pub(crate) fn credential_header(
    kind: ProviderKind,
    credential: &str,
) -> Result<HeaderMap, Verification> {
    let auth = kind.auth_header();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::HeaderName::from_static(auth.name),
        secret_header_value(kind, &auth.value_parts(credential))?,
    );
    Ok(headers)
}

/// The concatenation of `parts` as a sensitive header value. Built in a zeroizing buffer
/// of exactly the right size (no reallocation leaves a copy) that the value then shares
/// rather than copies.
fn secret_header_value(kind: ProviderKind, parts: &[&str]) -> Result<HeaderValue, Verification> {
    let mut buf = Zeroizing::new(Vec::with_capacity(parts.iter().map(|p| p.len()).sum()));
    for part in parts {
        buf.extend_from_slice(part.as_bytes());
    }
    let mut value = HeaderValue::from_maybe_shared(zeroizing_bytes(buf))
        .map_err(|_| invalid_header_value(kind))?;
    value.set_sensitive(true);
    Ok(value)
}

fn invalid_header_value(kind: ProviderKind) -> Verification {
    Verification::new(
        Reason::InvalidKey,
        format!(
            "the {kind} key holds characters not allowed in an HTTP header \
             (a trailing newline in the Secret?)"
        ),
    )
}

/// A base URL built from a constant.
pub(crate) fn const_url(s: &'static str) -> Url {
    // The constants are valid URLs; a test checks each default parses.
    Url::parse(s).unwrap_or_else(|_| unreachable!("invalid built-in URL {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoints::parse(&[
            "anthropic=https://fake.test:8443".into(),
            "openai=https://fake.test:8443/v1".into(),
            "vertex-token=https://fake.test:8443/token".into(),
        ])
        .expect("valid");
        assert_eq!(
            e.base_url(ProviderKind::OpenAI).map(Url::as_str),
            Some("https://fake.test:8443/v1")
        );
        assert_eq!(
            e.vertex_token_url().map(Url::as_str),
            Some("https://fake.test:8443/token")
        );
        assert!(e.base_url(ProviderKind::Google).is_none());
        assert_eq!(Endpoints::parse(&[]), Ok(Endpoints::default()));
    }

    #[test]
    fn endpoints_parse_errors() {
        for bad in [
            "anthropic",
            "nosuch=https://x.test",
            "anthropic=not a url",
            "anthropic=http://x.test",
            "anthropic=https://x.test/?q=1",
            "anthropic=https://u:p@x.test",
            "azure=https://x.test",
            "openai-compatible=https://x.test/v1",
        ] {
            assert!(Endpoints::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
        let dup = Endpoints::parse(&[
            "google=https://a.test".into(),
            "google=https://b.test".into(),
        ]);
        assert!(dup.unwrap_err().contains("twice"));
        let dup = Endpoints::parse(&[
            "vertex-token=https://a.test".into(),
            "vertex-token=https://b.test".into(),
        ]);
        assert!(dup.is_err());
        let msg = Endpoints::parse(&["anthropic=https://u:s3cret@x.test".into()]).unwrap_err();
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn safe_tokens() {
        assert_eq!(safe_token("insufficient_quota"), Some("insufficient_quota"));
        assert_eq!(safe_token("API_KEY_INVALID"), Some("API_KEY_INVALID"));
        assert_eq!(safe_token("401"), Some("401"));
        assert_eq!(safe_token(""), None);
        assert_eq!(safe_token("sk-proj abc"), None);
        assert_eq!(safe_token("Incorrect API key provided: sk-proj-****"), None);
        assert_eq!(safe_token(&"a".repeat(65)), None);
    }

    #[test]
    fn join_url_handles_slashes_and_encoding() {
        let q = Some(("limit", "1"));
        let a = join_url(&const_url("https://x.test"), &["v1", "models"], q);
        assert_eq!(a.as_str(), "https://x.test/v1/models?limit=1");
        let b = join_url(&const_url("https://x.test/v1/"), &["models"], None);
        assert_eq!(b.as_str(), "https://x.test/v1/models");
        let c = join_url(&const_url("https://x.test/v1"), &["a/b", "..", "c?d"], None);
        // `url` drops `.` and `..` segments: a segment can never climb the base path.
        assert_eq!(c.as_str(), "https://x.test/v1/a%2Fb/c%3Fd");
    }

    #[test]
    fn defaults_parse_and_pass_the_policy() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = egress::http_client(&egress::EgressConfig::default()).expect("client");
        let v = Verifier::new(http, Endpoints::default(), false);
        let params = ProviderParams {
            vertex_location: Some("us-central1".into()),
            ..Default::default()
        };
        for kind in [
            ProviderKind::Anthropic,
            ProviderKind::OpenAI,
            ProviderKind::Google,
            ProviderKind::Vertex,
        ] {
            let base = v.resolve_base_url(kind, &params).expect("default base URL");
            assert!(egress::check_host(&base).is_ok(), "{kind}");
        }
        for kind in [ProviderKind::Azure, ProviderKind::OpenAICompatible] {
            let err = v.resolve_base_url(kind, &params).unwrap_err();
            assert_eq!(err.reason, Reason::InvalidSpec, "{kind}");
            assert!(
                err.message.contains("spec.baseURL"),
                "{kind}: {}",
                err.message
            );
        }
    }

    #[test]
    fn base_url_precedence_and_policy() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = egress::http_client(&egress::EgressConfig::default()).expect("client");
        let endpoints = Endpoints::parse(&["openai=https://override.test/v1".into()]).expect("ok");
        let strict = Verifier::new(http.clone(), endpoints.clone(), false);
        let mut params = ProviderParams::default();
        assert_eq!(
            strict
                .resolve_base_url(ProviderKind::OpenAI, &params)
                .map(String::from),
            Ok("https://override.test/v1".to_owned())
        );
        params.base_url = Some(const_url("https://spec.test/v1"));
        assert_eq!(
            strict
                .resolve_base_url(ProviderKind::OpenAI, &params)
                .map(String::from),
            Ok("https://spec.test/v1".to_owned())
        );
        for bad in [
            "https://127.0.0.1/v1",
            "https://localhost/v1",
            "https://spec.test:8443/v1",
            "https://[::ffff:169.254.169.254]/",
        ] {
            params.base_url = Some(const_url_owned(bad));
            let err = strict
                .resolve_base_url(ProviderKind::OpenAI, &params)
                .unwrap_err();
            assert_eq!(err.reason, Reason::BaseURLRejected, "{bad}");
        }
        // allow_private lifts the host checks, never the shape checks.
        let lax = Verifier::new(http, endpoints, true);
        params.base_url = Some(const_url_owned("https://127.0.0.1:8443/v1"));
        assert!(lax.resolve_base_url(ProviderKind::OpenAI, &params).is_ok());
        params.base_url = Some(const_url_owned("http://127.0.0.1:8443/v1"));
        let err = lax
            .resolve_base_url(ProviderKind::OpenAI, &params)
            .unwrap_err();
        assert_eq!(err.reason, Reason::BaseURLRejected);
    }

    fn const_url_owned(s: &str) -> Url {
        Url::parse(s).expect("test URL")
    }

    #[tokio::test]
    async fn rejected_base_url_makes_no_request() {
        // A resolver that would panic if asked: a rejected URL never reaches DNS.
        struct NoResolve;
        impl reqwest::dns::Resolve for NoResolve {
            fn resolve(&self, _: reqwest::dns::Name) -> reqwest::dns::Resolving {
                panic!("no request may be made for a rejected base URL")
            }
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = egress::http_client(&egress::EgressConfig {
            resolver: Some(std::sync::Arc::new(NoResolve)),
            ..Default::default()
        })
        .expect("client");
        let v = Verifier::new(http, Endpoints::default(), false);
        let key = SecretString::from("sk-test-key");
        for (kind, base) in [
            (ProviderKind::OpenAICompatible, "https://localhost/v1"),
            (ProviderKind::Azure, "https://10.0.0.1"),
            (ProviderKind::Anthropic, "https://api.anthropic.com:444"),
        ] {
            let params = ProviderParams {
                base_url: Some(const_url_owned(base)),
                ..Default::default()
            };
            let out = v.verify(kind, &key, &params).await;
            assert_eq!(out.reason, Reason::BaseURLRejected, "{base}");
            assert!(!out.message.contains("sk-test-key"));
        }
    }

    #[tokio::test]
    async fn resolver_rejection_maps_to_base_url_rejected() {
        // Loopback only: if the filter were broken, the dial would go to 127.0.0.1:443.
        struct Loopback;
        impl reqwest::dns::Resolve for Loopback {
            fn resolve(&self, _: reqwest::dns::Name) -> reqwest::dns::Resolving {
                Box::pin(async {
                    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
                    Ok(Box::new(std::iter::once(addr)) as reqwest::dns::Addrs)
                })
            }
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = egress::http_client(&egress::EgressConfig {
            resolver: Some(std::sync::Arc::new(Loopback)),
            ..Default::default()
        })
        .expect("client");
        let v = Verifier::new(http, Endpoints::default(), false);
        let params = ProviderParams {
            base_url: Some(const_url_owned("https://rebind.test/v1")),
            ..Default::default()
        };
        let out = v
            .verify(
                ProviderKind::OpenAICompatible,
                &SecretString::from("sk-x"),
                &params,
            )
            .await;
        assert_eq!(out.reason, Reason::BaseURLRejected, "{out}");
        assert!(out.message.contains("loopback"), "{out}");
        assert!(out.message.contains("rebind.test"), "{out}");
        assert!(
            !out.message.contains("127.0.0.1"),
            "the resolved address is not shown: {out}"
        );
    }

    #[test]
    fn every_auth_header_is_sensitive() {
        const KEY: &str = "SECRET-key-0123456789";
        for kind in ProviderKind::ALL {
            let headers = provider(kind).auth_headers(KEY).expect("headers");
            let mut carriers = 0;
            for (name, value) in &headers {
                let carries_key = value
                    .as_bytes()
                    .windows(KEY.len())
                    .any(|w| w == KEY.as_bytes());
                assert_eq!(value.is_sensitive(), carries_key, "{kind} {name}");
                carriers += usize::from(carries_key);
            }
            assert_eq!(carriers, 1, "{kind}");
            assert!(!format!("{headers:?}").contains(KEY), "{kind}");

            let err = provider(kind)
                .auth_headers("SECRET\nkey")
                .expect_err("a newline cannot be in a header");
            assert_eq!(err.reason, Reason::InvalidKey, "{kind}");
            assert!(!err.message.contains("SECRET"), "{kind}: {err}");
        }
        let headers = credential_header(ProviderKind::OpenAI, "tok").expect("bearer");
        assert_eq!(headers[http::header::AUTHORIZATION], "Bearer tok");
        let headers = provider(ProviderKind::Anthropic)
            .auth_headers(KEY)
            .expect("headers");
        assert!(!headers["anthropic-version"].is_sensitive());
    }

    #[test]
    fn status_table_defaults() {
        let k = ProviderKind::OpenAI;
        assert_eq!(classify_status(k, 204, None, false).reason, Reason::Valid);
        assert_eq!(
            classify_status(k, 403, None, false).reason,
            Reason::InvalidKey
        );
        assert_eq!(
            classify_status(k, 429, None, true).reason,
            Reason::QuotaExhausted
        );
        assert_eq!(
            classify_status(k, 429, None, false).reason,
            Reason::RateLimited
        );
        assert_eq!(
            classify_status(k, 529, None, false).reason,
            Reason::ProviderUnavailable
        );
        assert_eq!(
            classify_status(k, 301, None, false).reason,
            Reason::InvalidSpec
        );
        assert_eq!(
            classify_status(k, 404, None, false).message,
            "the provider answered HTTP 404 to the verification call: check baseURL"
        );
    }
}
