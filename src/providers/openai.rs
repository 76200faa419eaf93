//! OpenAI: `authorization: Bearer`; verified with `GET {base}/models`, base including `/v1`.
//! Contract: `docs/providers.md`, section "OpenAI".

use http::HeaderMap;
use url::Url;

use super::{
    ErrorBody, Provider, ProviderKind, ProviderParams, Verification, classify_status, const_url,
    credential_header, join_url,
};

/// OpenAI API.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAI;

impl Provider for OpenAI {
    fn kind(&self) -> ProviderKind {
        ProviderKind::OpenAI
    }

    fn default_base_url(&self, _: &ProviderParams) -> Result<Url, Verification> {
        Ok(const_url("https://api.openai.com/v1"))
    }

    fn auth_headers(&self, credential: &str) -> Result<HeaderMap, Verification> {
        credential_header(self.kind(), credential)
    }

    fn verification_url(&self, base: &Url, _: &ProviderParams) -> Result<Url, Verification> {
        Ok(join_url(base, &["models"], None))
    }

    fn classify(&self, status: u16, body: &[u8]) -> Verification {
        classify_openai_shape(self.kind(), status, body)
    }
}

/// `{"error":{"message":…,"type":…,"param":…,"code":…}}`, shared with openai-compatible.
pub(crate) fn classify_openai_shape(kind: ProviderKind, status: u16, body: &[u8]) -> Verification {
    let e = ErrorBody::parse(body);
    let token = ErrorBody::token(&[&e.code, &e.kind]);
    classify_status(kind, status, token, e.insufficient_quota())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reason::Reason;

    pub const OK: &[u8] = br#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1721172741,"owned_by":"system"}]}"#;
    pub const BAD_KEY: &[u8] = br#"{"error":{"message":"Incorrect API key provided: sk-proj-********abcd. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    pub const QUOTA: &[u8] = br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    pub const RATE: &[u8] = br#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    pub const SERVER: &[u8] = br#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#;

    /// The `docs/providers.md` rows for the OpenAI error shape, run against `p`.
    pub fn check_rows(p: &dyn Provider) {
        let rows: [(u16, &[u8], Reason, &str); 7] = [
            (200, OK, Reason::Valid, ""),
            (401, BAD_KEY, Reason::InvalidKey, "invalid_api_key"),
            (403, BAD_KEY, Reason::InvalidKey, "invalid_api_key"),
            (429, QUOTA, Reason::QuotaExhausted, "insufficient_quota"),
            (429, RATE, Reason::RateLimited, "rate_limit_exceeded"),
            (500, SERVER, Reason::ProviderUnavailable, "server_error"),
            (404, b"", Reason::InvalidSpec, "404"),
        ];
        for (status, body, want, token) in rows {
            let v = p.classify(status, body);
            assert_eq!(v.reason, want, "{} {status}", p.kind());
            assert!(v.message.contains(token), "{}", v.message);
            assert!(!v.message.contains("sk-proj"), "{}", v.message);
            assert!(!v.message.contains("abcd"), "{}", v.message);
        }
    }

    #[test]
    fn classify_wire_rows() {
        check_rows(&OpenAI);
    }

    #[test]
    fn request_shape() {
        let base = OpenAI
            .default_base_url(&ProviderParams::default())
            .expect("default");
        let url = OpenAI
            .verification_url(&base, &ProviderParams::default())
            .expect("url");
        assert_eq!(url.as_str(), "https://api.openai.com/v1/models");
        let h = OpenAI
            .auth_headers("sk-proj-SECRETSECRET")
            .expect("headers");
        assert_eq!(h["authorization"], "Bearer sk-proj-SECRETSECRET");
        assert!(h["authorization"].is_sensitive());
        assert!(!format!("{h:?}").contains("SECRETSECRET"));
    }
}
