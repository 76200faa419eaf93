//! The managed Secret's envelope: what it seals besides the key ([`Sealed`]) and how it
//! opens under the keyring. The controller and the broker both open envelopes; neither does
//! it through the other.

use k8s_openapi::api::core::v1::Secret;
use secrecy::{ExposeSecret, SecretString};

use crate::crypto::{self, Keyring};
use crate::names;

/// What an envelope seals, besides the key: the facts decisions need, kept per managed
/// Secret by the digest of its envelope so that it is decrypted once per change, not once
/// per reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub fingerprint: String,
    pub masked_key: String,
    pub encryption_key_id: String,
    /// `scheme://host:port` the key was verified against (`None`: not recorded).
    pub origin: Option<String>,
}

impl Sealed {
    pub fn of(key: &str, encryption_key_id: &str, origin: Option<&str>) -> Sealed {
        Sealed {
            fingerprint: crypto::fingerprint(key.as_bytes()),
            masked_key: crypto::mask(key),
            encryption_key_id: encryption_key_id.to_string(),
            origin: origin.map(str::to_string),
        }
    }
}

/// The managed Secret's envelope, decrypted; `None` when it does not authenticate here.
pub fn open(
    keyring: &Keyring,
    ns: &str,
    name: &str,
    secret: &Secret,
) -> Option<(SecretString, Sealed)> {
    let envelope = secret
        .data
        .as_ref()
        .and_then(|d| d.get(names::ENVELOPE_KEY))
        .map(|b| b.0.as_slice())?;
    let plaintext = keyring.decrypt(ns, name, envelope).ok()?;
    // The origin is sealed with the key: an annotation beside it could be edited.
    let (origin, key_bytes) = crypto::open_payload(plaintext.expose_secret());
    let text = std::str::from_utf8(key_bytes).ok()?;
    let key_id = crypto::envelope_key_id(envelope).ok()?;
    let sealed = Sealed::of(text, key_id, origin);
    Some((SecretString::from(text.to_string()), sealed))
}
