//! Any OpenAI-compatible endpoint: `authorization: Bearer`; `spec.baseURL` is required and
//! includes the version path (e.g. `https://llm.example.com/v1`); verified with
//! `GET {base}/models`.
//! Contract: `docs/providers.md`, section "OpenAI-compatible".

use http::HeaderMap;
use url::Url;

use super::{Provider, ProviderKind, ProviderParams, Verification, credential_header, join_url};

/// An OpenAI-compatible API.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAICompatible;

impl Provider for OpenAICompatible {
    fn kind(&self) -> ProviderKind {
        ProviderKind::OpenAICompatible
    }

    fn default_base_url(&self, _: &ProviderParams) -> Result<Url, Verification> {
        Err(Verification::invalid_spec(
            "openai-compatible needs spec.baseURL, including the version path \
             (e.g. https://llm.example.com/v1)",
        ))
    }

    fn auth_headers(&self, credential: &str) -> Result<HeaderMap, Verification> {
        credential_header(self.kind(), credential)
    }

    fn verification_url(&self, base: &Url, _: &ProviderParams) -> Result<Url, Verification> {
        Ok(join_url(base, &["models"], None))
    }

    fn classify(&self, status: u16, body: &[u8]) -> Verification {
        super::openai::classify_openai_shape(self.kind(), status, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::const_url;

    #[test]
    fn classify_wire_rows() {
        crate::providers::openai::tests::check_rows(&OpenAICompatible);
    }

    #[test]
    fn request_shape() {
        let base = const_url("https://llm.example.com/v1/");
        let url = OpenAICompatible
            .verification_url(&base, &ProviderParams::default())
            .expect("url");
        assert_eq!(url.as_str(), "https://llm.example.com/v1/models");
        let h = OpenAICompatible
            .auth_headers("tok-SECRETSECRET")
            .expect("headers");
        assert!(h["authorization"].is_sensitive());
        assert!(!format!("{h:?}").contains("SECRETSECRET"));
        assert!(
            OpenAICompatible
                .default_base_url(&ProviderParams::default())
                .is_err()
        );
    }
}
