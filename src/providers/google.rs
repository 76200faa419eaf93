//! Google Gemini API: `x-goog-api-key`; verified with `GET {base}/v1beta/models?pageSize=1`.
//! Contract: `docs/providers.md`, section "Google Gemini".

use http::HeaderMap;
use url::Url;

use super::{
    ErrorBody, Provider, ProviderKind, ProviderParams, Verification, classify_status, const_url,
    credential_header, join_url,
};
use crate::reason::Reason;

/// Google Gemini API.
#[derive(Debug, Clone, Copy, Default)]
pub struct Google;

impl Provider for Google {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Google
    }

    fn default_base_url(&self, _: &ProviderParams) -> Result<Url, Verification> {
        Ok(const_url("https://generativelanguage.googleapis.com"))
    }

    fn auth_headers(&self, credential: &str) -> Result<HeaderMap, Verification> {
        credential_header(self.kind(), credential)
    }

    fn verification_url(&self, base: &Url, _: &ProviderParams) -> Result<Url, Verification> {
        Ok(join_url(
            base,
            &["v1beta", "models"],
            Some(("pageSize", "1")),
        ))
    }

    fn classify(&self, status: u16, body: &[u8]) -> Verification {
        classify_google_shape(self.kind(), status, body)
    }
}

/// `{"error":{"code":400,"message":…,"status":"INVALID_ARGUMENT","details":[{"reason":…}]}}`,
/// shared with Vertex. A 400 whose details carry `API_KEY_INVALID` is a refused key.
pub(crate) fn classify_google_shape(kind: ProviderKind, status: u16, body: &[u8]) -> Verification {
    let e = ErrorBody::parse(body);
    if status == 400 && e.reasons.iter().any(|r| r == "API_KEY_INVALID") {
        return Verification::new(
            Reason::InvalidKey,
            format!("{kind} refused the key (HTTP 400 API_KEY_INVALID)"),
        );
    }
    let token = ErrorBody::token(&[&e.status]);
    classify_status(kind, status, token, e.insufficient_quota())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn google_error(code: u16, status: &str) -> String {
        format!(
            r#"{{"error":{{"code":{code},"message":"Something about AIzaSyLEAK","status":"{status}"}}}}"#
        )
    }

    #[test]
    fn classify_wire_rows() {
        let ok = br#"{"models":[{"name":"models/gemini-2.5-flash","displayName":"Gemini 2.5 Flash"}],"nextPageToken":"Ch1tb2RlbHMvZ2VtaW5pLTIuNS1mbGFzaA=="}"#;
        assert_eq!(Google.classify(200, ok).reason, Reason::Valid);

        let bad_key = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;
        let v = Google.classify(400, bad_key);
        assert_eq!(v.reason, Reason::InvalidKey);
        assert!(v.message.contains("API_KEY_INVALID"));
        assert!(!v.message.contains("not valid"));

        let rows = [
            (400, "INVALID_ARGUMENT", Reason::InvalidSpec),
            (403, "PERMISSION_DENIED", Reason::InvalidKey),
            (404, "NOT_FOUND", Reason::InvalidSpec),
            (429, "RESOURCE_EXHAUSTED", Reason::RateLimited),
            (500, "INTERNAL", Reason::ProviderUnavailable),
            (503, "UNAVAILABLE", Reason::ProviderUnavailable),
        ];
        for (code, status, want) in rows {
            let v = Google.classify(code, google_error(code, status).as_bytes());
            assert_eq!(v.reason, want, "{code} {status}");
            assert!(v.message.contains(status), "{}", v.message);
            assert!(!v.message.contains("LEAK"), "{}", v.message);
        }
    }

    #[test]
    fn request_shape() {
        let base = Google
            .default_base_url(&ProviderParams::default())
            .expect("default");
        let url = Google
            .verification_url(&base, &ProviderParams::default())
            .expect("url");
        assert_eq!(
            url.as_str(),
            "https://generativelanguage.googleapis.com/v1beta/models?pageSize=1"
        );
        let h = Google.auth_headers("AIzaSECRETSECRET").expect("headers");
        assert!(h["x-goog-api-key"].is_sensitive());
        assert!(!format!("{h:?}").contains("SECRETSECRET"));
    }
}
