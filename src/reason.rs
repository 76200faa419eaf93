//! The typed outcomes that appear as `reason` on a ProviderKey's conditions, in Events and in
//! metrics. Kubernetes-free, so providers and the CLI share them with the controller.

use std::fmt;

/// Why a key is, or is not, in service. The string forms are API: they appear on the status
/// and users match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The provider accepted the key.
    Valid,
    /// The provider refused the key (401/403; Gemini 400 `API_KEY_INVALID`).
    InvalidKey,
    /// The key is valid but its account has no quota left (OpenAI 429 `insufficient_quota`).
    QuotaExhausted,
    /// The provider asked us to slow down (429).
    RateLimited,
    /// The provider could not be reached or failed (5xx, Anthropic 529, timeouts, DNS).
    ProviderUnavailable,
    /// The base URL breaks the egress policy; no connection was attempted.
    BaseURLRejected,
    /// The Secret named by `spec.secretRef` does not exist.
    SecretNotFound,
    /// The Secret exists but has no (non-empty) entry under `spec.secretRef.key`.
    SecretKeyMissing,
    /// The spec is consistent with the schema but cannot be used (e.g. a malformed
    /// service-account JSON for Vertex).
    InvalidSpec,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Valid => "Valid",
            Reason::InvalidKey => "InvalidKey",
            Reason::QuotaExhausted => "QuotaExhausted",
            Reason::RateLimited => "RateLimited",
            Reason::ProviderUnavailable => "ProviderUnavailable",
            Reason::BaseURLRejected => "BaseURLRejected",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::InvalidSpec => "InvalidSpec",
        }
    }

    /// A transient failure says nothing about the key: it never turns a verified key
    /// invalid, and it is retried with backoff instead of waiting for a change.
    pub const fn is_transient(self) -> bool {
        matches!(self, Reason::RateLimited | Reason::ProviderUnavailable)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
