//! Anthropic: `x-api-key` plus `anthropic-version`; verified with `GET {base}/v1/models?limit=1`.
//! Contract: `docs/providers.md`, section "Anthropic".

use http::HeaderMap;
use url::Url;

use super::{
    ErrorBody, Provider, ProviderKind, ProviderParams, Verification, classify_status, const_url,
    credential_header, join_url, sensitive_headers,
};

/// The `anthropic-version` header every request carries.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Anthropic API.
#[derive(Debug, Clone, Copy, Default)]
pub struct Anthropic;

impl Provider for Anthropic {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn default_base_url(&self, _: &ProviderParams) -> Result<Url, Verification> {
        Ok(const_url("https://api.anthropic.com"))
    }

    fn auth_headers(&self, credential: &str) -> Result<HeaderMap, Verification> {
        let mut headers = credential_header(self.kind(), credential)?;
        headers.extend(sensitive_headers(
            self.kind(),
            &[("anthropic-version", ANTHROPIC_VERSION, false)],
        )?);
        Ok(headers)
    }

    fn verification_url(&self, base: &Url, _: &ProviderParams) -> Result<Url, Verification> {
        Ok(join_url(base, &["v1", "models"], Some(("limit", "1"))))
    }

    /// `{"type":"error","error":{"type":"authentication_error",...}}`; 529 is overloaded.
    fn classify(&self, status: u16, body: &[u8]) -> Verification {
        let e = ErrorBody::parse(body);
        let token = ErrorBody::token(&[&e.kind]);
        classify_status(self.kind(), status, token, e.insufficient_quota())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;

    fn err(kind: &str) -> String {
        format!(
            r#"{{"type":"error","error":{{"type":"{kind}","message":"invalid x-api-key sk-ant-api03-LEAK"}},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}}"#
        )
    }

    #[test]
    fn classify_wire_rows() {
        let ok = br#"{"data":[{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"}],"has_more":false,"first_id":"claude-sonnet-4-5","last_id":"claude-sonnet-4-5"}"#;
        assert_eq!(Anthropic.classify(200, ok).reason, Reason::Valid);
        let rows = [
            (400, "invalid_request_error", Reason::InvalidSpec),
            (401, "authentication_error", Reason::InvalidKey),
            (403, "permission_error", Reason::InvalidKey),
            (404, "not_found_error", Reason::InvalidSpec),
            (429, "rate_limit_error", Reason::RateLimited),
            (500, "api_error", Reason::ProviderUnavailable),
            (529, "overloaded_error", Reason::ProviderUnavailable),
        ];
        for (status, kind, want) in rows {
            let v = Anthropic.classify(status, err(kind).as_bytes());
            assert_eq!(v.reason, want, "{status} {kind}");
            assert!(v.message.contains(&status.to_string()), "{}", v.message);
            assert!(v.message.contains(kind), "{}", v.message);
            assert!(!v.message.contains("LEAK"), "{}", v.message);
        }
        // Not JSON at all (a proxy's HTML page): the status alone decides.
        assert_eq!(
            Anthropic.classify(502, b"<html>").reason,
            Reason::ProviderUnavailable
        );
    }

    #[test]
    fn request_shape() {
        let base = const_url("https://api.anthropic.com");
        let url = Anthropic
            .verification_url(&base, &ProviderParams::default())
            .expect("url");
        assert_eq!(url.as_str(), "https://api.anthropic.com/v1/models?limit=1");
        let h = Anthropic
            .auth_headers("sk-ant-api03-SECRETSECRET")
            .expect("headers");
        assert_eq!(h["anthropic-version"], ANTHROPIC_VERSION);
        assert!(h["x-api-key"].is_sensitive());
        assert!(!format!("{h:?}").contains("SECRETSECRET"));
        let bad = Anthropic.auth_headers("sk-ant\n").unwrap_err();
        assert_eq!(bad.reason, Reason::InvalidKey);
        assert!(!bad.message.contains("sk-ant"));
    }
}
