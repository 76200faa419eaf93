//! Encryption of provider keys at rest, the operator keyring, and the key fingerprint and
//! mask shown on a ProviderKey's status.
//!
//! - The operator keyring ([`Keyring`]) holds 32-byte operator keys ([`OperatorKey`]) by id
//!   (`k1`, `k2`, …), one of them active. It lives in a Kubernetes Secret's `data`: one entry
//!   `key.<id>` per key (32 raw bytes) and `active` (the active id).
//! - Per namespace, a data key is derived from an operator key with HKDF-SHA256
//!   (salt `byok.dev/v1`, info `byok.dev/v1/data-key|<namespace>`).
//! - A managed Secret holds an envelope: `v1:<key id>:<12-byte nonce><AES-256-GCM ciphertext
//!   and tag>`, with AAD `byok.dev/v1|<namespace>|<providerkey name>`, so a ciphertext copied
//!   to another object does not decrypt.
//!
//! Nothing in this module puts key, plaintext or ciphertext bytes in an error message or a
//! `Debug` output.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use k8s_openapi::ByteString;
use rand::rngs::OsRng;
use rand::{RngCore, TryRngCore};
use secrecy::zeroize::{Zeroize, Zeroizing};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretSlice};
use sha2::{Digest, Sha256};

/// Length of an operator key and of a derived data key, in bytes.
pub const KEY_LEN: usize = 32;
/// Length of the AES-GCM nonce in an envelope, in bytes.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM tag at the end of an envelope, in bytes.
pub const TAG_LEN: usize = 16;

/// The keyring Secret entry that names the active key id.
pub const ACTIVE_ENTRY: &str = "active";
/// Prefix of the keyring Secret entries holding keys: `key.<id>`.
pub const KEY_ENTRY_PREFIX: &str = "key.";

/// Envelope version written by this operator (the bytes before the first `:`).
const ENVELOPE_VERSION: &[u8] = b"v1";
const HKDF_SALT: &[u8] = b"byok.dev/v1";
const HKDF_INFO_PREFIX: &[u8] = b"byok.dev/v1/data-key|";
const AAD_PREFIX: &str = "byok.dev/v1|";
/// Highest numeric part of a key id (`k` followed by 1 to 9 digits).
const MAX_KEY_ID_NUMBER: u32 = 999_999_999;
/// Longest key id: `k` and 9 digits.
const MAX_KEY_ID_LEN: usize = 10;

/// Everything that can go wrong here. No variant carries key, plaintext or ciphertext bytes;
/// the strings they carry are key ids and Secret entry names, which are not secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The keyring Secret has no `active` entry.
    #[error("the operator keyring Secret has no `active` entry")]
    MissingActive,
    /// The keyring Secret's `active` entry is not a key id (its value is not shown).
    #[error(
        "the operator keyring Secret's `active` entry is not a valid key id (expected `k` and 1 to 9 digits, e.g. k1)"
    )]
    InvalidActive,
    /// The active key id has no `key.<id>` entry.
    #[error("the operator keyring Secret names {0} as active but has no `key.{0}` entry")]
    ActiveKeyMissing(String),
    /// A `key.<id>` entry does not hold exactly 32 bytes.
    #[error(
        "the operator keyring Secret entry `key.{id}` holds {len} bytes; an operator key is exactly 32 bytes"
    )]
    InvalidKeyLength {
        /// The key id.
        id: String,
        /// The length found.
        len: usize,
    },
    /// A `key.<id>` entry whose id does not match `^k[0-9]{1,9}$` (the entry name is shown).
    #[error(
        "the operator keyring Secret entry `{0}` does not name a valid key id (expected `key.k` and 1 to 9 digits, e.g. key.k1)"
    )]
    InvalidKeyId(String),
    /// An entry that is neither `active` nor `key.<id>` (the entry name is shown).
    #[error(
        "the operator keyring Secret has an unexpected entry `{0}` (only `active` and `key.<id>` are allowed)"
    )]
    UnexpectedEntry(String),
    /// The envelope has a version this operator does not read.
    #[error("unsupported envelope version {0}; this operator reads v1")]
    UnsupportedVersion(String),
    /// The envelope is truncated or otherwise not a v1 envelope.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The envelope names a key id that is not in the keyring.
    #[error(
        "the envelope was encrypted with operator key {0}, which is not in the operator keyring"
    )]
    UnknownKeyId(String),
    /// Authentication failed: wrong namespace or name, wrong key, or modified bytes.
    #[error(
        "decryption failed: the ciphertext does not authenticate for this namespace and name; it may have been copied from another object or tampered with"
    )]
    DecryptFailed,
    /// The namespace or name cannot be bound into the AAD.
    #[error(
        "invalid encryption context: namespace and name must be non-empty and must not contain '|'"
    )]
    InvalidContext,
    /// The operating system's random number generator failed.
    #[error("the operating system random number generator failed")]
    Rng,
    /// The data key could not be derived (not expected to happen).
    #[error("data key derivation failed")]
    KeyDerivation,
    /// Encryption failed (the plaintext is too long for AES-GCM).
    #[error("encryption failed: the plaintext is too long")]
    EncryptFailed,
}

/// A 32-byte operator key. Held in a [`SecretBox`]: zeroized on drop, redacted in `Debug`.
pub struct OperatorKey(SecretBox<[u8; KEY_LEN]>);

impl OperatorKey {
    /// A fresh key from the operating system's random number generator.
    ///
    /// # Panics
    /// If the operating system's random number generator fails (as [`rand::rng`] would).
    #[must_use]
    pub fn generate() -> Self {
        Self(SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| {
            OsRng.unwrap_err().fill_bytes(k);
        }))
    }

    fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self(SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| {
            k.copy_from_slice(bytes);
        }))
    }

    fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }

    /// The AES-256-GCM cipher keyed with this key's data key for `namespace`.
    fn data_cipher(&self, namespace: &str) -> Result<Aes256Gcm, CryptoError> {
        let data_key = self.derive_data_key(namespace)?;
        Aes256Gcm::new_from_slice(data_key.as_slice()).map_err(|_| CryptoError::KeyDerivation)
    }

    /// HKDF-SHA256(ikm = this key, salt = `byok.dev/v1`,
    /// info = `byok.dev/v1/data-key|<namespace>`), 32 bytes, zeroized on drop.
    fn derive_data_key(&self, namespace: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), self.expose());
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        hkdf.expand_multi_info(
            &[HKDF_INFO_PREFIX, namespace.as_bytes()],
            okm.as_mut_slice(),
        )
        .map_err(|_| CryptoError::KeyDerivation)?;
        Ok(okm)
    }
}

impl Clone for OperatorKey {
    fn clone(&self) -> Self {
        Self::from_bytes(self.expose())
    }
}

impl fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OperatorKey([REDACTED])")
    }
}

/// The operator keys by id, one of them active. Invariant: `keys` contains `active`, and
/// every id matches `^k[0-9]{1,9}$`.
#[derive(Debug, Clone)]
pub struct Keyring {
    active: String,
    keys: BTreeMap<String, OperatorKey>,
}

impl Keyring {
    /// A new keyring with one fresh key, `k1`, active.
    ///
    /// # Panics
    /// If the operating system's random number generator fails.
    #[must_use]
    pub fn generate() -> Self {
        let active = "k1".to_owned();
        let keys = BTreeMap::from([(active.clone(), OperatorKey::generate())]);
        Self { active, keys }
    }

    /// Adds a fresh key with the next id (one more than the highest numeric id), makes it
    /// active and returns its id. Old keys stay, so existing envelopes still decrypt.
    ///
    /// # Panics
    /// If the operating system's random number generator fails.
    pub fn rotate(&mut self) -> String {
        let id = self.next_id();
        self.keys.insert(id.clone(), OperatorKey::generate());
        self.active.clone_from(&id);
        id
    }

    fn next_id(&self) -> String {
        let highest = self
            .keys
            .keys()
            .filter_map(|id| key_id_number(id))
            .max()
            .unwrap_or(0);
        let number = if highest < MAX_KEY_ID_NUMBER {
            highest + 1
        } else {
            // Only reachable with a hand-made k999999999: take the lowest free id instead.
            (1..=MAX_KEY_ID_NUMBER)
                .find(|n| !self.keys.contains_key(&format!("k{n}")))
                .unwrap_or(MAX_KEY_ID_NUMBER)
        };
        format!("k{number}")
    }

    /// The id of the key new envelopes are encrypted with.
    #[must_use]
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// All key ids, in numeric order (`k2` before `k10`).
    #[must_use]
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_by_key(|id| (key_id_number(id), *id));
        ids
    }

    /// Whether `other` holds the same keys under the same ids, with the same one active:
    /// a re-read of an unchanged keyring Secret (a watch restarting, say) is no change.
    #[must_use]
    pub fn same_as(&self, other: &Keyring) -> bool {
        self.active == other.active
            && self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .zip(&other.keys)
                .all(|((a, ka), (b, kb))| a == b && ka.0.expose_secret() == kb.0.expose_secret())
    }

    /// Whether the keyring holds a key with this id.
    #[must_use]
    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// Reads a keyring from a Secret's `data`: `active` (the active id; surrounding ASCII
    /// whitespace is ignored) and one `key.<id>` entry of 32 raw bytes per key.
    ///
    /// # Errors
    /// [`CryptoError::MissingActive`], [`CryptoError::InvalidActive`],
    /// [`CryptoError::ActiveKeyMissing`], [`CryptoError::InvalidKeyLength`],
    /// [`CryptoError::InvalidKeyId`] or [`CryptoError::UnexpectedEntry`]; none of them
    /// carries key bytes.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, CryptoError> {
        let mut active = None;
        let mut keys = BTreeMap::new();
        for (entry, value) in data {
            if entry == ACTIVE_ENTRY {
                active = Some(value.0.as_slice());
            } else if let Some(id) = entry.strip_prefix(KEY_ENTRY_PREFIX) {
                if !is_valid_key_id(id) {
                    return Err(CryptoError::InvalidKeyId(entry.clone()));
                }
                let bytes = <&[u8; KEY_LEN]>::try_from(value.0.as_slice()).map_err(|_| {
                    CryptoError::InvalidKeyLength {
                        id: id.to_owned(),
                        len: value.0.len(),
                    }
                })?;
                keys.insert(id.to_owned(), OperatorKey::from_bytes(bytes));
            } else {
                return Err(CryptoError::UnexpectedEntry(entry.clone()));
            }
        }
        let active = active.ok_or(CryptoError::MissingActive)?;
        let active = std::str::from_utf8(active)
            .map(str::trim)
            .ok()
            .filter(|id| is_valid_key_id(id))
            .ok_or(CryptoError::InvalidActive)?;
        if !keys.contains_key(active) {
            return Err(CryptoError::ActiveKeyMissing(active.to_owned()));
        }
        Ok(Self {
            active: active.to_owned(),
            keys,
        })
    }

    /// The keyring as a Secret's `data` (the inverse of [`Keyring::from_secret_data`]).
    #[must_use]
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        data.insert(
            ACTIVE_ENTRY.to_owned(),
            ByteString(self.active.as_bytes().to_vec()),
        );
        for (id, key) in &self.keys {
            data.insert(
                format!("{KEY_ENTRY_PREFIX}{id}"),
                ByteString(key.expose().to_vec()),
            );
        }
        data
    }

    /// Encrypts `plaintext` for the ProviderKey `namespace`/`name` with the active key and a
    /// fresh random nonce; returns the v1 envelope.
    ///
    /// # Errors
    /// [`CryptoError::InvalidContext`] for an empty namespace or name or one containing `|`,
    /// [`CryptoError::Rng`] if the OS random number generator fails.
    pub fn encrypt(
        &self,
        namespace: &str,
        name: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|_| CryptoError::Rng)?;
        self.seal(namespace, name, plaintext, nonce)
    }

    fn seal(
        &self,
        namespace: &str,
        name: &str,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>, CryptoError> {
        check_context(namespace, name)?;
        let key = self
            .keys
            .get(&self.active)
            .ok_or_else(|| CryptoError::UnknownKeyId(self.active.clone()))?;
        let cipher = key.data_cipher(namespace)?;
        let aad = aad(namespace, name);

        let header_len = ENVELOPE_VERSION.len() + 1 + self.active.len() + 1;
        // Exact capacity: the plaintext is never left behind by a reallocation.
        let mut out = Vec::with_capacity(header_len + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(ENVELOPE_VERSION);
        out.push(b':');
        out.extend_from_slice(self.active.as_bytes());
        out.push(b':');
        out.extend_from_slice(&nonce);
        let body_start = out.len();
        out.extend_from_slice(plaintext);
        let sealed = cipher.encrypt_inout_detached(
            &Nonce::<Aes256Gcm>::from(nonce),
            aad.as_bytes(),
            InOutBuf::from(&mut out[body_start..]),
        );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(out)
            }
            Err(_) => {
                out.zeroize();
                Err(CryptoError::EncryptFailed)
            }
        }
    }

    /// Decrypts an envelope for the ProviderKey `namespace`/`name` with the key the envelope
    /// names (any key in the keyring, not only the active one).
    ///
    /// # Errors
    /// [`CryptoError::UnsupportedVersion`], [`CryptoError::Malformed`],
    /// [`CryptoError::UnknownKeyId`], [`CryptoError::DecryptFailed`] (wrong namespace or
    /// name, or modified bytes), [`CryptoError::InvalidContext`].
    pub fn decrypt(
        &self,
        namespace: &str,
        name: &str,
        envelope: &[u8],
    ) -> Result<SecretSlice<u8>, CryptoError> {
        check_context(namespace, name)?;
        let parsed = parse_envelope(envelope)?;
        let key = self
            .keys
            .get(parsed.key_id)
            .ok_or_else(|| CryptoError::UnknownKeyId(parsed.key_id.to_owned()))?;
        let cipher = key.data_cipher(namespace)?;
        let aad = aad(namespace, name);
        let tag = Tag::<Aes256Gcm>::try_from(parsed.tag)
            .map_err(|_| CryptoError::Malformed("truncated"))?;
        // Exact-size buffer owned by the secret from the start; decrypted in place.
        let mut plaintext = SecretSlice::from(parsed.ciphertext.to_vec());
        cipher
            .decrypt_inout_detached(
                &Nonce::<Aes256Gcm>::from(parsed.nonce),
                aad.as_bytes(),
                InOutBuf::from(plaintext.expose_secret_mut()),
                &tag,
            )
            .map_err(|_| CryptoError::DecryptFailed)?;
        Ok(plaintext)
    }
}

/// What a managed Secret's envelope seals: the verified origin (`scheme://host:port`) and the
/// key, so the destination a key was verified against is authenticated with the key itself
/// and cannot be edited beside it. Layout: `byok-origin:<origin>\n<key>`.
pub const PAYLOAD_ORIGIN_PREFIX: &[u8] = b"byok-origin:";

/// Builds the plaintext to seal for `key` verified at `origin` (which holds no newline).
pub fn seal_payload(origin: &str, key: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(
        PAYLOAD_ORIGIN_PREFIX.len() + origin.len() + 1 + key.len(),
    ));
    out.extend_from_slice(PAYLOAD_ORIGIN_PREFIX);
    out.extend_from_slice(origin.replace('\n', "").as_bytes());
    out.push(b'\n');
    out.extend_from_slice(key);
    out
}

/// Splits an opened payload into the verified origin and the key. An envelope written before
/// origins were sealed holds the key alone: no origin.
pub fn open_payload(plaintext: &[u8]) -> (Option<&str>, &[u8]) {
    let Some(rest) = plaintext.strip_prefix(PAYLOAD_ORIGIN_PREFIX) else {
        return (None, plaintext);
    };
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (std::str::from_utf8(&rest[..i]).ok(), &rest[i + 1..]),
        None => (None, plaintext),
    }
}

/// The key id an envelope names, e.g. to find envelopes that still use an old key. Parses
/// the whole envelope strictly, as [`Keyring::decrypt`] does.
///
/// # Errors
/// [`CryptoError::UnsupportedVersion`] or [`CryptoError::Malformed`].
pub fn envelope_key_id(envelope: &[u8]) -> Result<&str, CryptoError> {
    parse_envelope(envelope).map(|parsed| parsed.key_id)
}

struct ParsedEnvelope<'a> {
    key_id: &'a str,
    nonce: [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: &'a [u8],
}

fn parse_envelope(envelope: &[u8]) -> Result<ParsedEnvelope<'_>, CryptoError> {
    let Some(rest) = envelope
        .strip_prefix(ENVELOPE_VERSION)
        .and_then(|rest| rest.strip_prefix(b":"))
    else {
        return Err(version_error(envelope));
    };
    // The key id ends at the next ':' (ids never contain one; nonces may).
    let id_window = &rest[..rest.len().min(MAX_KEY_ID_LEN + 1)];
    let Some(id_end) = id_window.iter().position(|&b| b == b':') else {
        return Err(if rest.len() <= MAX_KEY_ID_LEN {
            CryptoError::Malformed("truncated")
        } else {
            CryptoError::Malformed("invalid key id")
        });
    };
    let (id, rest) = rest.split_at(id_end);
    let key_id = std::str::from_utf8(id)
        .ok()
        .filter(|id| is_valid_key_id(id))
        .ok_or(CryptoError::Malformed("invalid key id"))?;
    let rest = rest.get(1..).unwrap_or_default();
    let (nonce, rest) = rest
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(CryptoError::Malformed("truncated"))?;
    let tag_start = rest
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(CryptoError::Malformed("truncated"))?;
    let (ciphertext, tag) = rest.split_at(tag_start);
    Ok(ParsedEnvelope {
        key_id,
        nonce: *nonce,
        ciphertext,
        tag,
    })
}

/// The error for bytes that do not start with `v1:`: a `v<digits>:` prefix is another
/// version; anything else (including a prefix of `v1:`) is malformed.
fn version_error(envelope: &[u8]) -> CryptoError {
    let full_prefix = b"v1:";
    if full_prefix.starts_with(envelope) {
        return CryptoError::Malformed("truncated");
    }
    let window = &envelope[..envelope.len().min(8)];
    if let Some(end) = window.iter().position(|&b| b == b':') {
        let token = &window[..end];
        if let Some(digits) = token.strip_prefix(b"v")
            && !digits.is_empty()
            && digits.iter().all(u8::is_ascii_digit)
        {
            return CryptoError::UnsupportedVersion(String::from_utf8_lossy(token).into_owned());
        }
    }
    CryptoError::Malformed("not a byok envelope (no version prefix)")
}

fn check_context(namespace: &str, name: &str) -> Result<(), CryptoError> {
    let ok = |s: &str| !s.is_empty() && !s.contains('|');
    if ok(namespace) && ok(name) {
        Ok(())
    } else {
        Err(CryptoError::InvalidContext)
    }
}

fn aad(namespace: &str, name: &str) -> String {
    format!("{AAD_PREFIX}{namespace}|{name}")
}

/// `^k[0-9]{1,9}$`
fn is_valid_key_id(id: &str) -> bool {
    id.strip_prefix('k').is_some_and(|digits| {
        (1..=9).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

fn key_id_number(id: &str) -> Option<u32> {
    if is_valid_key_id(id) {
        id.strip_prefix('k')?.parse().ok()
    } else {
        None
    }
}

/// `sha256:` and the first 16 lowercase hex characters of the SHA-256 of exactly these bytes
/// (the same as `printf %s "$KEY" | sha256sum | cut -c1-16`).
#[must_use]
pub fn fingerprint(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    format!("sha256:{}", hex::encode(&digest[..8]))
}

/// Recognisable key prefixes, longest match first.
const KNOWN_PREFIXES: [&str; 6] = [
    "sk-svcacct-",
    "sk-admin-",
    "sk-proj-",
    "sk-ant-",
    "sk-",
    "AIza",
];

/// The tail is shown only when at least this many characters follow the recognised prefix
/// (the whole key without one): four characters of a short key narrow a guess too much.
const MIN_MASKED_REST: usize = 16;
/// How many trailing characters a mask shows.
const MASK_TAIL: usize = 4;

/// A masked form of a key for the status.
///
/// - A recognised prefix (`sk-ant-`, `sk-proj-`, `sk-svcacct-`, `sk-admin-`, `sk-`, `AIza`;
///   none otherwise) is shown as is.
/// - The last 4 characters follow `...` only when at least 16 characters come after the
///   prefix, so the tail never overlaps the prefix; otherwise the mask is the prefix and
///   `...` alone (`...` for a short key without a prefix).
/// - A Google service-account JSON is shown as
///   `<client_email> (key ...<last 4 of private_key_id>)`.
///
/// Lengths are counted in characters, not bytes.
#[must_use]
pub fn mask(key: &str) -> String {
    if let Some(masked) = mask_service_account(key) {
        return masked;
    }
    let prefix = KNOWN_PREFIXES
        .iter()
        .find(|p| key.starts_with(**p))
        .copied()
        .unwrap_or("");
    let rest = &key[prefix.len()..];
    if rest.chars().count() < MIN_MASKED_REST {
        return format!("{prefix}...");
    }
    format!("{prefix}...{}", last_chars(rest, MASK_TAIL))
}

/// The two service-account fields a mask shows. Every other field, the private key among
/// them, is skipped by the parser rather than copied into a `serde_json::Value`.
#[derive(serde::Deserialize)]
struct ServiceAccountIdentity {
    client_email: String,
    // Any JSON type is accepted so that an odd key id degrades to `(key ...)` instead of
    // hiding the email; only a string is ever shown.
    #[serde(default)]
    private_key_id: Option<serde_json::Value>,
}

fn mask_service_account(key: &str) -> Option<String> {
    if !key.trim_start().starts_with('{') {
        return None;
    }
    let identity: ServiceAccountIdentity = serde_json::from_str(key).ok()?;
    let email = identity.client_email.as_str();
    // An email is short and printable; anything else is not shown.
    if email.is_empty() || email.len() > 320 || email.chars().any(char::is_control) {
        return None;
    }
    let key_id_tail = identity
        .private_key_id
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .filter(|id| id.chars().count() >= MASK_TAIL && !id.chars().any(char::is_control))
        .map(|id| last_chars(id, MASK_TAIL))
        .unwrap_or_default();
    Some(format!("{email} (key ...{key_id_tail})"))
}

fn last_chars(s: &str, n: usize) -> &str {
    let start = s
        .char_indices()
        .rev()
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i);
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    const NS: &str = "team-a";
    const NAME: &str = "anthropic";
    const SECRET: &[u8] = b"sk-ant-api03-secret";

    fn fixed_keyring() -> Keyring {
        let mut bytes = [0u8; KEY_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap_or_default();
        }
        Keyring {
            active: "k1".to_owned(),
            keys: BTreeMap::from([("k1".to_owned(), OperatorKey::from_bytes(&bytes))]),
        }
    }

    fn data(entries: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
            .collect()
    }

    fn key_bytes(kr: &Keyring, id: &str) -> Vec<u8> {
        kr.keys[id].expose().to_vec()
    }

    fn assert_no_bytes(haystack: &str, bytes: &[u8]) {
        let hex_lower = hex::encode(bytes);
        let hex_upper = hex::encode_upper(bytes);
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let b64_nopad = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        let lossy = String::from_utf8_lossy(bytes);
        for needle in [&hex_lower, &hex_upper, &b64, &b64_nopad] {
            assert!(
                !haystack.contains(needle.as_str()),
                "{haystack} leaks {needle}"
            );
        }
        if bytes.len() >= 8 {
            assert!(
                !haystack.contains(lossy.as_ref()),
                "{haystack} leaks raw bytes"
            );
        }
        // The decimal array form that a derived Debug of [u8; N] would print.
        let decimal = format!("{:?}", &bytes[..bytes.len().min(8)]);
        let decimal = decimal.trim_start_matches('[').trim_end_matches(']');
        assert!(!haystack.contains(decimal), "{haystack} leaks {decimal}");
    }

    #[test]
    fn a_re_read_keyring_is_the_same_and_a_rotated_or_other_one_is_not() {
        let kr = Keyring::generate();
        let re_read = Keyring::from_secret_data(&kr.to_secret_data()).expect("parses");
        assert!(kr.same_as(&re_read));
        assert!(
            !kr.same_as(&Keyring::generate()),
            "same ids, other key bytes"
        );
        let mut rotated = Keyring::from_secret_data(&kr.to_secret_data()).expect("parses");
        rotated.rotate();
        assert!(!kr.same_as(&rotated));
        assert!(!rotated.same_as(&kr));
    }

    #[test]
    fn round_trip() {
        let kr = Keyring::generate();
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        let plain = kr.decrypt(NS, NAME, &env).expect("decrypt");
        assert_eq!(plain.expose_secret(), SECRET);
    }

    #[test]
    fn round_trip_empty_and_large() {
        let kr = Keyring::generate();
        for pt in [Vec::new(), vec![0xa5; 64 * 1024]] {
            let env = kr.encrypt(NS, NAME, &pt).expect("encrypt");
            assert_eq!(env.len(), "v1:k1:".len() + NONCE_LEN + pt.len() + TAG_LEN);
            let plain = kr.decrypt(NS, NAME, &env).expect("decrypt");
            assert_eq!(plain.expose_secret(), pt.as_slice());
        }
    }

    #[test]
    fn envelope_layout() {
        let kr = Keyring::generate();
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        assert!(env.starts_with(b"v1:k1:"));
        assert_eq!(env.len(), 6 + NONCE_LEN + SECRET.len() + TAG_LEN);
        assert!(
            !env.windows(SECRET.len()).any(|w| w == SECRET),
            "plaintext appears in the envelope"
        );
        assert_eq!(envelope_key_id(&env), Ok("k1"));
    }

    #[test]
    fn same_plaintext_encrypts_differently_each_time() {
        let kr = Keyring::generate();
        let a = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        let b = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        assert_ne!(a, b);
        assert_ne!(a[6..6 + NONCE_LEN], b[6..6 + NONCE_LEN], "nonce reused");
        assert_eq!(kr.decrypt(NS, NAME, &a).expect("a").expose_secret(), SECRET);
        assert_eq!(kr.decrypt(NS, NAME, &b).expect("b").expose_secret(), SECRET);
    }

    #[test]
    fn ciphertext_moved_to_another_object_does_not_decrypt() {
        let kr = Keyring::generate();
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        for (ns, name) in [
            (NS, "openai"),
            ("team-b", NAME),
            ("team-b", "openai"),
            ("team-a-", NAME),
            (NS, "anthropic2"),
        ] {
            assert_eq!(
                kr.decrypt(ns, name, &env).map(|_| ()),
                Err(CryptoError::DecryptFailed),
                "{ns}/{name}"
            );
        }
    }

    #[test]
    fn other_keyring_cannot_decrypt() {
        let kr = Keyring::generate();
        let other = Keyring::generate();
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        assert_eq!(
            other.decrypt(NS, NAME, &env).map(|_| ()),
            Err(CryptoError::DecryptFailed)
        );
    }

    #[test]
    fn flipping_any_byte_fails() {
        let kr = Keyring::generate();
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        let header = "v1:k1:".len();
        for i in 0..env.len() {
            for flip in [0x01u8, 0x80] {
                let mut bad = env.clone();
                bad[i] ^= flip;
                let result = kr.decrypt(NS, NAME, &bad).map(|_| ());
                assert!(
                    result.is_err(),
                    "byte {i} flipped by {flip:#x} still decrypts"
                );
                if i >= header {
                    assert_eq!(result, Err(CryptoError::DecryptFailed), "byte {i}");
                }
            }
        }
    }

    #[test]
    fn truncation_and_extension_fail() {
        let kr = Keyring::generate();
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        let min_len = "v1:k1:".len() + NONCE_LEN + TAG_LEN;
        for len in 0..env.len() {
            let result = kr.decrypt(NS, NAME, &env[..len]).map(|_| ());
            if len < min_len {
                assert!(
                    matches!(result, Err(CryptoError::Malformed(_))),
                    "len {len}: {result:?}"
                );
            } else {
                assert_eq!(result, Err(CryptoError::DecryptFailed), "len {len}");
            }
        }
        let mut longer = env.clone();
        longer.push(0);
        assert_eq!(
            kr.decrypt(NS, NAME, &longer).map(|_| ()),
            Err(CryptoError::DecryptFailed)
        );
    }

    #[test]
    fn envelope_parsing_is_strict() {
        let body = [7u8; NONCE_LEN + TAG_LEN];
        let with = |head: &[u8]| [head, &body[..]].concat();
        assert_eq!(
            envelope_key_id(&with(b"v2:k1:")),
            Err(CryptoError::UnsupportedVersion("v2".to_owned()))
        );
        assert_eq!(
            envelope_key_id(&with(b"v10:k1:")),
            Err(CryptoError::UnsupportedVersion("v10".to_owned()))
        );
        for bad in [
            &b""[..],
            b"v",
            b"v1",
            b"v1:",
            b"v1:k1",
            b"v1:k1:",
            b"x1:k1:",
            b"V1:k1:",
            b"v1k1:",
            b"sk-ant-api03-plaintext",
            b"{\"type\":\"service_account\"}",
        ] {
            assert!(
                matches!(envelope_key_id(bad), Err(CryptoError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for head in [
            &b"v1::"[..],
            b"v1:k:",
            b"v1:K1:",
            b"v1:1:",
            b"v1:kx:",
            b"v1:k1234567890:",
            b"v1:k-1:",
            b"v1:k 1:",
        ] {
            assert_eq!(
                envelope_key_id(&with(head)),
                Err(CryptoError::Malformed("invalid key id")),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(envelope_key_id(&with(b"v1:k123456789:")), Ok("k123456789"));
        // A ':' inside the nonce is not taken for a delimiter.
        let colons = [b':'; NONCE_LEN + TAG_LEN];
        assert_eq!(
            envelope_key_id(&[&b"v1:k7:"[..], &colons].concat()),
            Ok("k7")
        );
    }

    #[test]
    fn unknown_key_id_is_named() {
        let kr = Keyring::generate();
        let mut env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        env[4] = b'9';
        let err = kr
            .decrypt(NS, NAME, &env)
            .map(|_| ())
            .expect_err("unknown id");
        assert_eq!(err, CryptoError::UnknownKeyId("k9".to_owned()));
        assert!(err.to_string().contains("k9"));
    }

    #[test]
    fn rotation_keeps_old_envelopes_readable() {
        let mut kr = Keyring::generate();
        let old = kr.encrypt(NS, NAME, b"old").expect("encrypt");
        assert_eq!(kr.rotate(), "k2");
        assert_eq!(kr.active_id(), "k2");
        let new = kr.encrypt(NS, NAME, b"new").expect("encrypt");
        assert_eq!(envelope_key_id(&new), Ok("k2"));
        assert_eq!(envelope_key_id(&old), Ok("k1"));
        assert_eq!(
            kr.decrypt(NS, NAME, &old).expect("old").expose_secret(),
            b"old"
        );
        assert_eq!(
            kr.decrypt(NS, NAME, &new).expect("new").expose_secret(),
            b"new"
        );
        assert_eq!(kr.rotate(), "k3");
        assert_eq!(kr.ids(), ["k1", "k2", "k3"]);
        assert_ne!(key_bytes(&kr, "k1"), key_bytes(&kr, "k2"));
        assert_ne!(key_bytes(&kr, "k2"), key_bytes(&kr, "k3"));
    }

    #[test]
    fn rotation_follows_the_highest_numeric_id() {
        let k = [1u8; KEY_LEN];
        let mut kr = Keyring::from_secret_data(&data(&[
            ("active", b"k2"),
            ("key.k2", &k),
            ("key.k9", &k),
            ("key.k10", &k),
        ]))
        .expect("keyring");
        assert_eq!(kr.ids(), ["k2", "k9", "k10"]);
        assert_eq!(kr.rotate(), "k11");
        assert!(kr.contains("k11"));

        let mut at_max = Keyring::from_secret_data(&data(&[
            ("active", b"k999999999"),
            ("key.k999999999", &k),
            ("key.k1", &k),
        ]))
        .expect("keyring");
        let id = at_max.rotate();
        assert_eq!(id, "k2", "falls back to the lowest free id");
        assert!(is_valid_key_id(&id));
        assert_eq!(at_max.ids().len(), 3);
    }

    #[test]
    fn keyring_survives_secret_data() {
        let mut kr = Keyring::generate();
        let old = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        kr.rotate();
        let data = kr.to_secret_data();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["active", "key.k1", "key.k2"]
        );
        assert_eq!(data["active"].0, b"k2");
        assert_eq!(data["key.k1"].0, key_bytes(&kr, "k1"));
        assert_eq!(data["key.k2"].0.len(), KEY_LEN);

        let back = Keyring::from_secret_data(&data).expect("from_secret_data");
        assert_eq!(back.active_id(), "k2");
        assert_eq!(back.ids(), ["k1", "k2"]);
        assert_eq!(back.to_secret_data(), data);
        assert_eq!(
            back.decrypt(NS, NAME, &old).expect("old").expose_secret(),
            SECRET
        );
        let new = back.encrypt(NS, NAME, SECRET).expect("encrypt");
        assert_eq!(
            kr.decrypt(NS, NAME, &new).expect("new").expose_secret(),
            SECRET
        );
    }

    #[test]
    fn active_entry_tolerates_surrounding_whitespace() {
        let k = [3u8; KEY_LEN];
        let kr = Keyring::from_secret_data(&data(&[("active", b"k1\n"), ("key.k1", &k)]))
            .expect("keyring");
        assert_eq!(kr.active_id(), "k1");
    }

    #[test]
    fn malformed_keyring_data_gives_specific_errors() {
        let k = [0x42u8; KEY_LEN];
        let short = [0x42u8; 31];
        let long = [0x42u8; 33];
        type Entries<'a> = Vec<(&'a str, &'a [u8])>;
        let cases: Vec<(Entries, CryptoError)> = vec![
            (vec![], CryptoError::MissingActive),
            (vec![("key.k1", &k)], CryptoError::MissingActive),
            (
                vec![("active", b"k1")],
                CryptoError::ActiveKeyMissing("k1".into()),
            ),
            (
                vec![("active", b"k2"), ("key.k1", &k)],
                CryptoError::ActiveKeyMissing("k2".into()),
            ),
            (
                vec![("active", b""), ("key.k1", &k)],
                CryptoError::InvalidActive,
            ),
            (
                vec![("active", b"K1"), ("key.k1", &k)],
                CryptoError::InvalidActive,
            ),
            (
                vec![("active", &k), ("key.k1", &k)],
                CryptoError::InvalidActive,
            ),
            (
                vec![("active", b"k1"), ("key.k1", &short)],
                CryptoError::InvalidKeyLength {
                    id: "k1".into(),
                    len: 31,
                },
            ),
            (
                vec![("active", b"k1"), ("key.k1", &long)],
                CryptoError::InvalidKeyLength {
                    id: "k1".into(),
                    len: 33,
                },
            ),
            (
                vec![("active", b"k1"), ("key.k1", b"")],
                CryptoError::InvalidKeyLength {
                    id: "k1".into(),
                    len: 0,
                },
            ),
            (
                vec![("active", b"k1"), ("key.k1", &k), ("key.main", &k)],
                CryptoError::InvalidKeyId("key.main".into()),
            ),
            (
                vec![("active", b"k1"), ("key.k1", &k), ("key.k1234567890", &k)],
                CryptoError::InvalidKeyId("key.k1234567890".into()),
            ),
            (
                vec![("active", b"k1"), ("key.k1", &k), ("key.", &k)],
                CryptoError::InvalidKeyId("key.".into()),
            ),
            (
                vec![("active", b"k1"), ("key.k1", &k), ("keys.k2", &k)],
                CryptoError::UnexpectedEntry("keys.k2".into()),
            ),
        ];
        for (entries, expected) in cases {
            let err = Keyring::from_secret_data(&data(&entries)).expect_err("must fail");
            assert_eq!(err, expected, "{entries:?}");
            assert_no_bytes(&err.to_string(), &k);
            assert_no_bytes(&format!("{err:?}"), &k);
        }
    }

    #[test]
    fn debug_output_shows_no_key_bytes() {
        let mut kr = Keyring::generate();
        kr.rotate();
        let debug = format!("{kr:?} {kr:#?}");
        assert!(debug.contains("k1") && debug.contains("k2"), "{debug}");
        for id in ["k1", "k2"] {
            let bytes = key_bytes(&kr, id);
            assert_no_bytes(&debug, &bytes);
            let key_debug = format!("{:?} {:#?}", kr.keys[id], kr.keys[id]);
            assert_eq!(key_debug, "OperatorKey([REDACTED]) OperatorKey([REDACTED])");
        }
        let plain = kr
            .decrypt(NS, NAME, &kr.encrypt(NS, NAME, SECRET).expect("encrypt"))
            .expect("decrypt");
        let debug = format!("{plain:?}");
        assert!(debug.contains("REDACTED"), "{debug}");
        assert_no_bytes(&debug, SECRET);
    }

    #[test]
    fn error_messages_carry_no_bytes() {
        let kr = Keyring::generate();
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        let err = kr
            .decrypt("team-b", NAME, &env)
            .map(|_| ())
            .expect_err("moved");
        let msg = err.to_string();
        assert!(msg.contains("copied from another object"), "{msg}");
        assert!(msg.contains("tampered with"), "{msg}");
        for text in [msg, format!("{err:?}")] {
            assert_no_bytes(&text, SECRET);
            assert_no_bytes(&text, &env[6..]);
            assert_no_bytes(&text, &key_bytes(&kr, "k1"));
        }
        let mut garbage = b"v1:".to_vec();
        garbage.extend_from_slice(SECRET);
        let err = envelope_key_id(&garbage).expect_err("malformed");
        assert_no_bytes(&err.to_string(), SECRET);
        let err = envelope_key_id(SECRET).expect_err("malformed");
        assert_no_bytes(&err.to_string(), SECRET);
    }

    #[test]
    fn invalid_context_is_refused() {
        let kr = Keyring::generate();
        for (ns, name) in [("", NAME), (NS, ""), ("a|b", NAME), (NS, "x|y")] {
            assert_eq!(
                kr.encrypt(ns, name, SECRET),
                Err(CryptoError::InvalidContext)
            );
        }
        let env = kr.encrypt(NS, NAME, SECRET).expect("encrypt");
        assert_eq!(
            kr.decrypt(NS, "", &env).map(|_| ()),
            Err(CryptoError::InvalidContext)
        );
    }

    /// Known answer computed independently with Python's hmac/hashlib (RFC 5869):
    /// ```text
    /// python3 -c 'import hmac,hashlib
    /// ikm=bytes(range(32)); prk=hmac.new(b"byok.dev/v1",ikm,hashlib.sha256).digest()
    /// for ns in [b"team-a",b"default"]:
    ///   print(hmac.new(prk,b"byok.dev/v1/data-key|"+ns+b"\x01",hashlib.sha256).hexdigest())'
    /// ```
    #[test]
    fn data_key_derivation_known_answer() {
        let kr = fixed_keyring();
        let key = &kr.keys["k1"];
        let team_a = key.derive_data_key("team-a").expect("derive");
        assert_eq!(
            hex::encode(team_a.as_slice()),
            "5a7f3ac5998018a7754021b9da79db8626694a0a86c5607666543a97c57b9d67"
        );
        let default = key.derive_data_key("default").expect("derive");
        assert_eq!(
            hex::encode(default.as_slice()),
            "281fbec5e37f5e3e1959a6c38fc75219be04855817524bb750c37f9ed79acf7d"
        );
    }

    /// Known answer computed independently with Python `cryptography` (AESGCM), using the
    /// HKDF above: key bytes 0..32, nonce bytes 100..112, plaintext `sk-ant-api03-secret`,
    /// AAD `byok.dev/v1|team-a|anthropic`, envelope `b"v1:k1:" + nonce + ct_and_tag`.
    #[test]
    fn envelope_known_answer() {
        let expected = "76313a6b313a6465666768696a6b6c6d6e6f08b52e3a869585a4591f83d7fe7f04\
                        e3e9abcadb390c25a0c4a289b9794aacb500c9cd";
        let kr = fixed_keyring();
        let mut nonce = [0u8; NONCE_LEN];
        for (i, b) in nonce.iter_mut().enumerate() {
            *b = 100 + u8::try_from(i).unwrap_or_default();
        }
        let env = kr.seal("team-a", "anthropic", SECRET, nonce).expect("seal");
        assert_eq!(hex::encode(&env), expected);
        let from_python = hex::decode(expected).expect("hex");
        let plain = kr
            .decrypt("team-a", "anthropic", &from_python)
            .expect("decrypt");
        assert_eq!(plain.expose_secret(), SECRET);
    }

    #[test]
    fn data_keys_differ_per_namespace_and_operator_key() {
        let kr = Keyring::generate();
        let key = &kr.keys["k1"];
        let a = key.derive_data_key("team-a").expect("a");
        let b = key.derive_data_key("team-b").expect("b");
        assert_ne!(a.as_slice(), b.as_slice());
        assert_ne!(a.as_slice(), key.expose().as_slice());
        let other = OperatorKey::generate();
        let c = other.derive_data_key("team-a").expect("c");
        assert_ne!(a.as_slice(), c.as_slice());
    }

    /// Known answers from the command line:
    /// `printf %s "sk-ant-api03-test-key-0123456789" | sha256sum | cut -c1-16` -> b01580fb7410bbd3
    /// `printf '%s\n' "sk-ant-api03-test-key-0123456789" | sha256sum | cut -c1-16` -> 579a94838b3d4e62
    /// `printf %s "" | sha256sum | cut -c1-16` -> e3b0c44298fc1c14
    #[test]
    fn fingerprint_matches_sha256sum() {
        assert_eq!(
            fingerprint(b"sk-ant-api03-test-key-0123456789"),
            "sha256:b01580fb7410bbd3"
        );
        assert_eq!(
            fingerprint(b"sk-ant-api03-test-key-0123456789\n"),
            "sha256:579a94838b3d4e62",
            "the exact bytes are hashed, a trailing newline included"
        );
        assert_eq!(fingerprint(b""), "sha256:e3b0c44298fc1c14");
        let fp = fingerprint(b"anything");
        assert_eq!(fp.len(), "sha256:".len() + 16);
        assert!(
            fp["sha256:".len()..]
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
    }

    /// The mask rule as a table: 16 characters after the recognised prefix (the whole key
    /// without one) are needed before the last 4 are shown.
    #[test]
    fn the_payload_seals_the_origin_with_the_key() {
        let sealed = seal_payload("https://api.openai.com:443", b"sk-x\nwith-newline");
        assert_eq!(
            open_payload(&sealed),
            (
                Some("https://api.openai.com:443"),
                &b"sk-x\nwith-newline"[..]
            )
        );
        assert_eq!(open_payload(b"sk-legacy"), (None, &b"sk-legacy"[..]));
        assert_eq!(
            open_payload(b"byok-origin:no-newline"),
            (None, &b"byok-origin:no-newline"[..])
        );
    }

    #[test]
    fn mask_table() {
        let cases = [
            // Real key shapes.
            ("sk-ant-api03-abcdefghijklmnopQa9x", "sk-ant-...Qa9x"),
            ("sk-proj-abcdefghijklmnop1234", "sk-proj-...1234"),
            ("sk-svcacct-abcdefghijklmnopWXYZ", "sk-svcacct-...WXYZ"),
            ("sk-admin-abcdefghijklmnop9876", "sk-admin-...9876"),
            ("sk-abcdefghijklmnopqrst5678", "sk-...5678"),
            ("AIzaSyAbcdefghijklmnopqrstuvwxyz12", "AIza...yz12"),
            ("gsk_abcdefghijklmnopqrstuvwxyz", "...wxyz"),
            // Boundaries: 15 characters after the prefix hide the tail, 16 show it.
            ("sk-ant-abcdefghijklmno", "sk-ant-..."),
            ("sk-ant-abcdefghijklmnop", "sk-ant-...mnop"),
            ("sk-proj-abcdefghijklmno", "sk-proj-..."),
            ("sk-proj-abcdefghijklmnop", "sk-proj-...mnop"),
            ("sk-svcacct-abcdefghijklmno", "sk-svcacct-..."),
            ("sk-svcacct-abcdefghijklmnop", "sk-svcacct-...mnop"),
            ("sk-admin-abcdefghijklmno", "sk-admin-..."),
            ("sk-admin-abcdefghijklmnop", "sk-admin-...mnop"),
            ("sk-abcdefghijklmno", "sk-..."),
            ("sk-abcdefghijklmnop", "sk-...mnop"),
            ("AIzaabcdefghijklmno", "AIza..."),
            ("AIzaabcdefghijklmnop", "AIza...mnop"),
            ("abcdefghijklmno", "..."),
            ("abcdefghijklmnop", "...mnop"),
            // Short keys: the prefix (if any) and `...` only.
            ("", "..."),
            ("a", "..."),
            ("abcdefghijkl", "..."),
            ("sk-", "sk-..."),
            ("sk-ant-", "sk-ant-..."),
            ("sk-ant-abcde", "sk-ant-..."),
            ("AIza1234567", "AIza..."),
            // The longest recognised prefix wins; prefixes are case-sensitive.
            ("sk-antXabcdefghijklmn", "sk-...klmn"),
            ("SK-ANT-abcdefghijklmn", "...klmn"),
            // Characters, not bytes.
            ("ééééééééééééééé", "..."),
            ("éééééééééééééééé", "...éééé"),
            ("sk-ant-€€€€€€€€€€€€€€€", "sk-ant-..."),
            ("sk-ant-abcdefghijkl€€€€", "sk-ant-...€€€€"),
        ];
        for (key, expected) in cases {
            assert_eq!(mask(key), expected, "{key:?}");
        }
    }

    #[test]
    fn mask_tail_never_overlaps_the_prefix() {
        for prefix in KNOWN_PREFIXES.iter().copied().chain([""]) {
            for rest_len in 0..40 {
                let rest: String = "0123456789".chars().cycle().take(rest_len).collect();
                let key = format!("{prefix}{rest}");
                let masked = mask(&key);
                let shown = masked
                    .strip_prefix(prefix)
                    .and_then(|m| m.strip_prefix("..."))
                    .unwrap_or_else(|| panic!("{key:?} masked as {masked:?}"));
                if rest_len >= MIN_MASKED_REST {
                    assert_eq!(shown, last_chars(&rest, MASK_TAIL), "{key:?}");
                } else {
                    assert_eq!(shown, "", "{key:?} reveals {shown:?}");
                }
            }
        }
    }

    #[test]
    fn mask_shows_at_most_prefix_and_four_characters() {
        let key = "sk-ant-api03-SECRETSECRETSECRETSECRET-tail";
        let masked = mask(key);
        assert_eq!(masked, "sk-ant-...tail");
        assert!(!masked.contains("SECRET"));
    }

    #[test]
    fn mask_service_account_json() {
        let sa = r#"{
  "type": "service_account",
  "project_id": "my-project",
  "private_key_id": "0123456789abcdef0123456789abcdef01234a7f",
  "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n",
  "client_email": "byok@my-project.iam.gserviceaccount.com",
  "client_id": "123456789012345678901"
}
"#;
        let masked = mask(sa);
        assert_eq!(
            masked,
            "byok@my-project.iam.gserviceaccount.com (key ...4a7f)"
        );
        assert!(!masked.contains("PRIVATE"));
        assert_eq!(
            fingerprint(sa.as_bytes()),
            format!(
                "sha256:{}",
                &hex::encode(Sha256::digest(sa.as_bytes()))[..16]
            ),
            "the fingerprint is of the whole JSON"
        );

        let no_key_id = r#"{"client_email":"a@b.iam.gserviceaccount.com","private_key":"x"}"#;
        assert_eq!(mask(no_key_id), "a@b.iam.gserviceaccount.com (key ...)");
        let odd_key_id = r#"{"client_email":"a@b.iam.gserviceaccount.com","private_key_id":7}"#;
        assert_eq!(mask(odd_key_id), "a@b.iam.gserviceaccount.com (key ...)");
        let leading_space = format!("  {sa}");
        assert_eq!(mask(&leading_space), masked);
    }

    #[test]
    fn mask_json_without_client_email_is_masked_generically() {
        let not_sa = r#"{"private_key_id":"abcdef","private_key":"SECRETSECRET"}"#;
        assert_eq!(mask(not_sa), r#"...ET"}"#);
        let broken = r#"{"client_email":"a@b.com", "private_key": "SECRETSECRET"#;
        assert_eq!(mask(broken), "...CRET");
        let not_string = r#"{"client_email":42,"private_key":"SECRETSECRET"}"#;
        assert!(!mask(not_string).contains("42"));
    }
}
