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
    /// service-account JSON for Vertex, an unparsable `verification.interval` stored before
    /// the schema refused it, or an object that does not match the API at all).
    InvalidSpec,
    /// The Secret named by `spec.secretRef` exists but is not labelled
    /// `byok.dev/key-source: "true"`; its data is never read.
    SecretNotLabelled,
    /// A Secret named `<name>-byok` exists and was not created by this ProviderKey; it is
    /// left untouched.
    ManagedSecretConflict,
    /// The managed Secret's ciphertext does not authenticate for this ProviderKey (tampered
    /// with, copied from another object, or encrypted with an operator key that is gone).
    DecryptionFailed,
    /// The operator keyring Secret is missing or unusable while encrypted keys exist.
    KeyringUnavailable,
    /// The provider endpoint changed since the key in service was verified; that key is
    /// never sent to the new destination.
    DestinationChanged,
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
            Reason::SecretNotLabelled => "SecretNotLabelled",
            Reason::ManagedSecretConflict => "ManagedSecretConflict",
            Reason::DecryptionFailed => "DecryptionFailed",
            Reason::KeyringUnavailable => "KeyringUnavailable",
            Reason::DestinationChanged => "DestinationChanged",
        }
    }

    /// Every reason, in the order of the documented table.
    pub const ALL: [Reason; 14] = [
        Reason::Valid,
        Reason::InvalidKey,
        Reason::QuotaExhausted,
        Reason::RateLimited,
        Reason::ProviderUnavailable,
        Reason::BaseURLRejected,
        Reason::SecretNotFound,
        Reason::SecretKeyMissing,
        Reason::SecretNotLabelled,
        Reason::ManagedSecretConflict,
        Reason::DecryptionFailed,
        Reason::KeyringUnavailable,
        Reason::DestinationChanged,
        Reason::InvalidSpec,
    ];

    /// The reason a status string names, if it is one of ours.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_and_is_in_the_readme_table() {
        let readme = include_str!("../README.md");
        let mut reasons: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        reasons.extend([
            crate::status::ready_reasons::PENDING,
            crate::status::ready_reasons::PENDING_KEY_REJECTED,
        ]);
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        for r in reasons {
            assert!(
                readme.contains(&format!("\n| `{r}` |")),
                "README's reason table has no row for {r}"
            );
        }
    }
}
