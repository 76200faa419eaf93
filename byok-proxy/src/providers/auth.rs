//! How each provider takes its credential on a request: the header and the form of its
//! value. One home for the verifier ([`super::Provider::auth_headers`]), the sidecar
//! (`proxy::grant`, which adds it to every forwarded request) and the list of headers a
//! client's own credential may arrive in (never forwarded).

use super::ProviderKind;

/// The form of the credential header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthForm {
    /// `Bearer <credential>`.
    Bearer,
    /// The credential itself.
    Plain,
}

/// The header a provider reads its credential from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthHeader {
    /// Lowercase, as HTTP/2 sends it.
    pub name: &'static str,
    pub form: AuthForm,
}

impl AuthHeader {
    /// The value's parts, to be joined (into a buffer that is wiped after use).
    pub fn value_parts(self, credential: &str) -> [&str; 2] {
        match self.form {
            AuthForm::Bearer => ["Bearer ", credential],
            AuthForm::Plain => ["", credential],
        }
    }
}

impl ProviderKind {
    /// The header this provider's API key (Vertex: its OAuth access token) goes in.
    pub const fn auth_header(self) -> AuthHeader {
        let (name, form) = match self {
            ProviderKind::Anthropic => ("x-api-key", AuthForm::Plain),
            ProviderKind::Google => ("x-goog-api-key", AuthForm::Plain),
            ProviderKind::Azure => ("api-key", AuthForm::Plain),
            ProviderKind::OpenAI | ProviderKind::OpenAICompatible | ProviderKind::Vertex => {
                ("authorization", AuthForm::Bearer)
            }
        };
        AuthHeader { name, form }
    }
}

/// Every header a provider credential travels in (each provider's, without repeats).
pub const CREDENTIAL_HEADERS: [&str; 4] =
    ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_providers_credential_header_is_listed_and_valid() {
        for kind in ProviderKind::ALL {
            let auth = kind.auth_header();
            assert!(
                CREDENTIAL_HEADERS.contains(&auth.name),
                "{kind}: {}",
                auth.name
            );
            assert!(http::HeaderName::from_bytes(auth.name.as_bytes()).is_ok());
        }
        for name in CREDENTIAL_HEADERS {
            assert!(
                ProviderKind::ALL
                    .iter()
                    .any(|k| k.auth_header().name == name),
                "{name} is no provider's"
            );
        }
    }

    #[test]
    fn bearer_and_plain_values() {
        assert_eq!(
            ProviderKind::OpenAI.auth_header().value_parts("k").concat(),
            "Bearer k"
        );
        assert_eq!(
            ProviderKind::Anthropic
                .auth_header()
                .value_parts("k")
                .concat(),
            "k"
        );
    }
}
