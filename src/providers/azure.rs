//! Azure OpenAI: `api-key`; `spec.baseURL` is required (e.g. `https://myres.openai.azure.com`);
//! verified with `GET {base}/openai/models?api-version={spec.azure.apiVersion}`.
//! Contract: `docs/providers.md`, section "Azure OpenAI".

use http::HeaderMap;
use url::Url;

use super::{
    ErrorBody, Provider, ProviderKind, ProviderParams, Verification, classify_status,
    credential_header, join_url, safe_token,
};

/// The `api-version` used when `spec.azure.apiVersion` is not set.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// Azure OpenAI.
#[derive(Debug, Clone, Copy, Default)]
pub struct Azure;

impl Azure {
    /// `spec.azure.apiVersion`, or the default; checked to be a plain token.
    pub fn api_version(params: &ProviderParams) -> Result<&str, Verification> {
        let v = params
            .azure_api_version
            .as_deref()
            .unwrap_or(DEFAULT_AZURE_API_VERSION);
        safe_token(v).filter(|v| v.len() <= 32).ok_or_else(|| {
            Verification::invalid_spec(
                "spec.azure.apiVersion must look like 2024-10-21 (letters, digits, '.', '-')",
            )
        })
    }
}

impl Provider for Azure {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Azure
    }

    fn default_base_url(&self, _: &ProviderParams) -> Result<Url, Verification> {
        Err(Verification::invalid_spec(
            "azure needs spec.baseURL (the resource endpoint, e.g. https://myres.openai.azure.com)",
        ))
    }

    fn auth_headers(&self, credential: &str) -> Result<HeaderMap, Verification> {
        credential_header(self.kind(), credential)
    }

    fn verification_url(&self, base: &Url, params: &ProviderParams) -> Result<Url, Verification> {
        let version = Azure::api_version(params)?;
        Ok(join_url(
            base,
            &["openai", "models"],
            Some(("api-version", version)),
        ))
    }

    /// `{"error":{"code":"401","message":…}}`.
    fn classify(&self, status: u16, body: &[u8]) -> Verification {
        let e = ErrorBody::parse(body);
        let token = ErrorBody::token(&[&e.code, &e.kind]);
        classify_status(self.kind(), status, token, e.insufficient_quota())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::const_url;
    use crate::reason::Reason;

    #[test]
    fn classify_wire_rows() {
        let ok =
            br#"{"data":[{"id":"gpt-4o","object":"model","status":"succeeded"}],"object":"list"}"#;
        assert_eq!(Azure.classify(200, ok).reason, Reason::Valid);
        let rows: [(u16, &[u8], Reason); 4] = [
            (
                401,
                br#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#,
                Reason::InvalidKey,
            ),
            (
                429,
                r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing tier."}}"#.as_bytes(),
                Reason::RateLimited,
            ),
            (
                404,
                br#"{"error":{"code":"404","message":"Resource not found"}}"#,
                Reason::InvalidSpec,
            ),
            (500, b"", Reason::ProviderUnavailable),
        ];
        for (status, body, want) in rows {
            let v = Azure.classify(status, body);
            assert_eq!(v.reason, want, "{status}");
            assert!(!v.message.contains("Access denied"), "{}", v.message);
            assert!(!v.message.contains("Resource not found"), "{}", v.message);
        }
    }

    #[test]
    fn request_shape() {
        let base = const_url("https://myres.openai.azure.com");
        let mut params = ProviderParams::default();
        let url = Azure.verification_url(&base, &params).expect("url");
        assert_eq!(
            url.as_str(),
            "https://myres.openai.azure.com/openai/models?api-version=2024-10-21"
        );
        params.azure_api_version = Some("2025-04-01-preview".into());
        let url = Azure.verification_url(&base, &params).expect("url");
        assert_eq!(url.query(), Some("api-version=2025-04-01-preview"));
        params.azure_api_version = Some("x&api-key=1".into());
        let err = Azure.verification_url(&base, &params).unwrap_err();
        assert_eq!(err.reason, Reason::InvalidSpec);

        let h = Azure.auth_headers("0123SECRETSECRET").expect("headers");
        assert!(h["api-key"].is_sensitive());
        assert!(!format!("{h:?}").contains("SECRETSECRET"));
        assert!(Azure.default_base_url(&params).is_err());
    }
}
