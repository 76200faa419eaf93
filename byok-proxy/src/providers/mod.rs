//! The providers as the sidecar and the operator both name them: [`ProviderKind`] and each
//! one's credential header ([`auth`]). Kubernetes-free; the verifiers live in the operator.

pub mod auth;

use serde::{Deserialize, Serialize};

/// The provider a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// Anthropic API (`x-api-key`).
    Anthropic,
    /// OpenAI API (`Authorization: Bearer`).
    #[serde(rename = "openai")]
    OpenAI,
    /// Google Gemini API (`x-goog-api-key`).
    Google,
    /// Google Vertex AI: the Secret holds a service-account JSON key.
    Vertex,
    /// Azure OpenAI (`api-key`); needs `baseURL` and `azure.apiVersion`.
    Azure,
    /// Any OpenAI-compatible endpoint (`Authorization: Bearer`); needs `baseURL`.
    #[serde(rename = "openai-compatible")]
    OpenAICompatible,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 6] = [
        ProviderKind::Anthropic,
        ProviderKind::OpenAI,
        ProviderKind::Google,
        ProviderKind::Vertex,
        ProviderKind::Azure,
        ProviderKind::OpenAICompatible,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenAI => "openai",
            ProviderKind::Google => "google",
            ProviderKind::Vertex => "vertex",
            ProviderKind::Azure => "azure",
            ProviderKind::OpenAICompatible => "openai-compatible",
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProviderKind::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown provider {s:?} (expected one of anthropic, openai, google, vertex, azure, openai-compatible)"))
    }
}
