//! A bearer token checked locally before any TokenReview: made-up tokens must cost the API
//! server nothing. Pure: the clock, the API server's issuer and keys, and the pod cache's
//! answer are passed in; [`super::tokens`] fetches them and runs the review.
//!
//! In this order, the first failing check decides the answer:
//!
//! | check | refused as |
//! |---|---|
//! | three base64url parts, at most [`MAX_TOKEN_BYTES`], JSON header and claims | 401 `token_malformed` |
//! | header `alg` one the API server signs with (RS256, ES256, ES384, ES512) | 401 `token_algorithm` |
//! | `aud` holds `byok.dev` | 401 `wrong_audience` |
//! | `exp` not past, `nbf` not ahead ([`LEEWAY`] for clock skew) | 401 `token_expired`, `token_not_yet_valid` |
//! | `iss` is the API server's (when known) | 401 `token_wrong_issuer` |
//! | the `kubernetes.io` claim names a pod (namespace, name, uid) and a ServiceAccount | 401 `not_pod_bound` |
//! | it is of the namespace asked for, that pod is in the pod cache with that uid, opted in | 403 as the broker's own checks ([`super::decide::check_pod`]) |
//! | the signature verifies with the API server's key of that `kid` | 401 `token_unknown_key`, `token_bad_signature` |
//!
//! A token that passes all of them still goes to a TokenReview (revocation, a deleted bound
//! object). When the issuer's keys are not known, or the key is of a kind this code does not
//! verify, the signature is left to the TokenReview ([`Precheck::Unverified`]): the pre-check
//! never refuses a token because its own inputs are missing.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature;
use serde::Deserialize;

use super::decide::{Caller, Denial};
#[cfg(test)]
use super::decide::{PodFacts, check_pod};
use crate::names;

/// Kubernetes ServiceAccount tokens are about 1 KiB; a bound token with long names stays far
/// below this.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY: i64 = 60;

/// Why a token was refused before any TokenReview.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFault {
    /// Not a JWT: parts, size, base64url, JSON, claim types.
    Malformed,
    /// An `alg` the API server never signs with (`none`, HMAC, PSS...).
    Algorithm,
    Expired,
    NotYetValid,
    /// Another issuer than the API server's.
    WrongIssuer,
    /// A `kid` the API server has no key for (its keys just fetched).
    UnknownKey,
    /// The signature does not verify with the API server's key.
    BadSignature,
}

impl TokenFault {
    /// Whether no kubelet-projected token of this cluster can fail this way (a late clock
    /// can make a real token look expired or not valid yet).
    pub fn is_forgery(self) -> bool {
        !matches!(self, TokenFault::Expired | TokenFault::NotYetValid)
    }

    pub fn metric_label(self) -> &'static str {
        match self {
            TokenFault::Malformed => "token_malformed",
            TokenFault::Algorithm => "token_algorithm",
            TokenFault::Expired => "token_expired",
            TokenFault::NotYetValid => "token_not_yet_valid",
            TokenFault::WrongIssuer => "token_wrong_issuer",
            TokenFault::UnknownKey => "token_unknown_key",
            TokenFault::BadSignature => "token_bad_signature",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            TokenFault::Expired => {
                "the token has expired (or this node's clock is off); the kubelet renews projected tokens"
            }
            TokenFault::NotYetValid => "the token is not valid yet (is this node's clock off?)",
            TokenFault::WrongIssuer => "the token was not issued by this cluster's API server",
            TokenFault::Malformed
            | TokenFault::Algorithm
            | TokenFault::UnknownKey
            | TokenFault::BadSignature => "the token is not a ServiceAccount token of this cluster",
        }
    }
}

/// The signing algorithms a kube-apiserver uses (RSA keys: RS256; ECDSA: by curve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    Es384,
    Es512,
}

impl Alg {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "ES384" => Some(Alg::Es384),
            "ES512" => Some(Alg::Es512),
            _ => None,
        }
    }
}

/// What the API server publishes about its ServiceAccount tokens: its issuer
/// (`/.well-known/openid-configuration`) and public keys (`/openid/v1/jwks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub issuer: String,
    pub keys: Vec<Jwk>,
}

/// One public key of the API server's JWKS.
#[derive(Clone, PartialEq, Eq)]
pub enum Jwk {
    /// At least 2048 bits (ring verifies no smaller RSA key).
    Rsa {
        kid: Option<String>,
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// P-256 or P-384, as an uncompressed point.
    Ec {
        kid: Option<String>,
        alg: Alg,
        point: Vec<u8>,
    },
    /// A key this code does not verify with (P-521, small RSA, another type): tokens signed
    /// with it go to the TokenReview unverified.
    Unsupported { kid: Option<String> },
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, kid) = match self {
            Jwk::Rsa { kid, .. } => ("RSA", kid),
            Jwk::Ec { kid, alg, .. } => (if *alg == Alg::Es256 { "P-256" } else { "P-384" }, kid),
            Jwk::Unsupported { kid } => ("unsupported", kid),
        };
        write!(f, "Jwk({kind}, kid={kid:?})")
    }
}

impl Jwk {
    fn kid(&self) -> Option<&str> {
        match self {
            Jwk::Rsa { kid, .. } | Jwk::Ec { kid, .. } | Jwk::Unsupported { kid } => kid.as_deref(),
        }
    }
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// The keys of a JWKS document; `None` when it is not one.
pub fn parse_jwks(json: &str) -> Option<Vec<Jwk>> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_str(json).ok()?;
    Some(
        set.keys
            .into_iter()
            .map(|value| {
                let kid = value
                    .get("kid")
                    .and_then(|k| k.as_str())
                    .map(str::to_string);
                serde_json::from_value::<RawJwk>(value)
                    .ok()
                    .and_then(jwk)
                    .unwrap_or(Jwk::Unsupported { kid })
            })
            .collect(),
    )
}

fn jwk(raw: RawJwk) -> Option<Jwk> {
    let b64 = |s: &Option<String>| URL_SAFE_NO_PAD.decode(s.as_deref()?).ok();
    match (raw.kty.as_str(), raw.crv.as_deref()) {
        ("RSA", _) => {
            let n = strip_zeros(b64(&raw.n)?);
            let e = strip_zeros(b64(&raw.e)?);
            (n.len() >= 256).then_some(Jwk::Rsa { kid: raw.kid, n, e })
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (alg, len) = if crv == "P-256" {
                (Alg::Es256, 32)
            } else {
                (Alg::Es384, 48)
            };
            let (x, y) = (b64(&raw.x)?, b64(&raw.y)?);
            if x.len() != len || y.len() != len {
                return None;
            }
            let point = [&[0x04][..], &x, &y].concat();
            Some(Jwk::Ec {
                kid: raw.kid,
                alg,
                point,
            })
        }
        _ => None,
    }
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    v
}

/// The `issuer` of an OpenID discovery document.
pub fn parse_issuer(json: &str) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_str(json).ok()?;
    doc.get("issuer")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A token split and decoded, its signature not checked yet. No `Debug`: it holds the token.
pub struct Jwt<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    pub claims: Claims,
    /// `header.payload`, what the signature covers.
    signed: &'a [u8],
    signature: Vec<u8>,
}

/// The claims the broker reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Claims {
    pub iss: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub nbf: Option<i64>,
    /// From the `kubernetes.io` claim, when it names a pod and a ServiceAccount.
    pub caller: Option<Caller>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    aud: Audience,
    exp: i64,
    nbf: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: Option<String>,
    pod: Option<NameUid>,
    serviceaccount: Option<NameUid>,
}

#[derive(Deserialize)]
struct NameUid {
    name: Option<String>,
    uid: Option<String>,
}

/// Splits and decodes the token: shape and `alg`.
pub fn parse(token: &str) -> Result<Jwt<'_>, Denial> {
    let malformed = Denial::TokenRejected(TokenFault::Malformed);
    if token.len() > MAX_TOKEN_BYTES {
        return Err(malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    let decode = |part: &str| {
        (!part.is_empty())
            .then(|| URL_SAFE_NO_PAD.decode(part).ok())
            .flatten()
    };
    let (Some(header), Some(payload), Some(signature)) =
        (decode(header), decode(payload), decode(signature))
    else {
        return Err(malformed);
    };
    let header: Header = serde_json::from_slice(&header).map_err(|_| malformed.clone())?;
    let raw: RawClaims = serde_json::from_slice(&payload).map_err(|_| malformed.clone())?;
    let alg = Alg::parse(&header.alg).ok_or(Denial::TokenRejected(TokenFault::Algorithm))?;
    let caller = raw.kubernetes.and_then(|k| {
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let pod = k.pod?;
        Some(Caller {
            namespace: nonempty(k.namespace)?,
            service_account: nonempty(k.serviceaccount?.name)?,
            pod_name: nonempty(pod.name)?,
            pod_uid: nonempty(pod.uid)?,
        })
    });
    let aud = match raw.aud {
        Audience::None => Vec::new(),
        Audience::One(a) => vec![a],
        Audience::Many(a) => a,
    };
    let signed_len = token.len() - signature_len(token);
    Ok(Jwt {
        alg,
        kid: header.kid,
        claims: Claims {
            iss: raw.iss,
            aud,
            exp: raw.exp,
            nbf: raw.nbf,
            caller,
        },
        signed: &token.as_bytes()[..signed_len],
        signature,
    })
}

/// Length of the signature part with its dot.
fn signature_len(token: &str) -> usize {
    token.rfind('.').map_or(0, |dot| token.len() - dot)
}

/// Audience, time and issuer (skipped when `issuer` is unknown); the caller it names.
pub fn check_claims(claims: &Claims, now: i64, issuer: Option<&str>) -> Result<Caller, Denial> {
    if !claims.aud.iter().any(|a| a == names::TOKEN_AUDIENCE) {
        return Err(Denial::WrongAudience);
    }
    if claims.exp.saturating_add(LEEWAY) < now {
        return Err(Denial::TokenRejected(TokenFault::Expired));
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf.saturating_sub(LEEWAY) > now)
    {
        return Err(Denial::TokenRejected(TokenFault::NotYetValid));
    }
    if issuer.is_some_and(|issuer| issuer != claims.iss) {
        return Err(Denial::TokenRejected(TokenFault::WrongIssuer));
    }
    claims.caller.clone().ok_or(Denial::NotPodBound)
}

/// What the signature check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    Valid,
    Invalid,
    /// No key with the token's `kid`.
    UnknownKey,
    /// The key is of a kind this code does not verify: the TokenReview decides.
    Unsupported,
}

/// Verifies the signature with the key the token's `kid` names (every key when it names none
/// and the keys have no `kid` either: the API server sets one whenever its keys have one, so a
/// token without it is not one of its).
pub fn verify(jwt: &Jwt<'_>, keys: &[Jwk]) -> Signature {
    let candidates: Vec<&Jwk> = match jwt.kid.as_deref() {
        Some(kid) => keys.iter().filter(|k| k.kid() == Some(kid)).collect(),
        None if keys.iter().any(|k| k.kid().is_some()) => Vec::new(),
        None => keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Signature::UnknownKey;
    }
    let mut unsupported = false;
    for key in candidates {
        let ok = match (key, jwt.alg) {
            (Jwk::Rsa { n, e, .. }, Alg::Rs256) => signature::RsaPublicKeyComponents { n, e }
                .verify(
                    &signature::RSA_PKCS1_2048_8192_SHA256,
                    jwt.signed,
                    &jwt.signature,
                )
                .is_ok(),
            (Jwk::Ec { alg, point, .. }, token_alg) if *alg == token_alg => {
                let algorithm = if *alg == Alg::Es256 {
                    &signature::ECDSA_P256_SHA256_FIXED
                } else {
                    &signature::ECDSA_P384_SHA384_FIXED
                };
                signature::UnparsedPublicKey::new(algorithm, point)
                    .verify(jwt.signed, &jwt.signature)
                    .is_ok()
            }
            (Jwk::Unsupported { .. }, _) => {
                unsupported = true;
                false
            }
            // A key of another type than the token's `alg` says.
            _ => false,
        };
        if ok {
            return Signature::Valid;
        }
    }
    if unsupported {
        Signature::Unsupported
    } else {
        Signature::Invalid
    }
}

/// What the pre-check lets through to the TokenReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precheck {
    /// Every check passed, the signature included: the caller is who the token says (unless
    /// the token was revoked, which only the TokenReview tells).
    Verified(Caller),
    /// Issuer and signature not checked (the API server's keys are not known, or of a kind
    /// not verified here): only the TokenReview tells who this is.
    Unverified(Caller),
}

/// The broker's checks of the caller the token names, against the namespace asked for and
/// the pod cache ([`super::decide::check_pod`]).
pub type PodCheck<'a> = &'a (dyn Fn(&Caller) -> Result<(), Denial> + Sync);

/// Every local check, in order. `discovery`: the API server's issuer and keys, `None` when
/// they could not be fetched. `pod_check`: `None` while the pod cache has not listed yet
/// (the pod check is then skipped).
pub fn precheck(
    token: &str,
    now: i64,
    discovery: Option<&Discovery>,
    pod_check: Option<PodCheck<'_>>,
) -> Result<Precheck, Denial> {
    let jwt = parse(token)?;
    let caller = check_claims(&jwt.claims, now, discovery.map(|d| d.issuer.as_str()))?;
    if let Some(pod_check) = pod_check {
        pod_check(&caller)?;
    }
    let Some(discovery) = discovery else {
        return Ok(Precheck::Unverified(caller));
    };
    match verify(&jwt, &discovery.keys) {
        Signature::Valid => Ok(Precheck::Verified(caller)),
        Signature::Unsupported => Ok(Precheck::Unverified(caller)),
        Signature::UnknownKey => Err(Denial::TokenRejected(TokenFault::UnknownKey)),
        Signature::Invalid => Err(Denial::TokenRejected(TokenFault::BadSignature)),
    }
}

/// Seconds until the token's `exp`, read without checking anything: only to not trust a
/// review past the token's own end.
pub fn seconds_left(token: &str, now: i64) -> Option<u64> {
    let claims = parse(token).ok()?.claims;
    Some(u64::try_from(claims.exp.saturating_sub(now)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair};

    const NOW: i64 = 1_800_000_000;
    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    /// A PKCS#1 RSAPrivateKey (ring generates no RSA keys).
    const RSA_DER: &[u8] = include_bytes!("testdata/rsa2048.der");

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn caller() -> Caller {
        Caller {
            namespace: "team".into(),
            service_account: "app".into(),
            pod_name: "p".into(),
            pod_uid: "u1".into(),
        }
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({
            "iss": ISSUER, "aud": ["byok.dev"], "exp": NOW + 600, "iat": NOW - 10,
            "nbf": NOW - 10, "sub": "system:serviceaccount:team:app",
            "kubernetes.io": {
                "namespace": "team",
                "pod": {"name": "p", "uid": "u1"},
                "serviceaccount": {"name": "app", "uid": "sa-uid"},
            },
        })
    }

    /// The API server's signing keys, as the tests sign with them.
    struct Signer {
        ec: EcdsaKeyPair,
        rsa: RsaKeyPair,
        rng: SystemRandom,
    }

    impl Signer {
        fn new() -> Self {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("P-256 key");
            Self {
                ec: EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("P-256 key"),
                rsa: RsaKeyPair::from_der(RSA_DER).expect("RSA key"),
                rng,
            }
        }

        fn discovery(&self) -> Discovery {
            let point = self.ec.public_key().as_ref();
            let rsa = signature::RsaPublicKeyComponents::<Vec<u8>>::from(self.rsa.public());
            let jwks = serde_json::json!({"keys": [
                {"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig", "alg": "ES256",
                 "x": b64(&point[1..33]), "y": b64(&point[33..])},
                {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
                 "n": b64(&rsa.n), "e": b64(&rsa.e)},
                {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
            ]});
            Discovery {
                issuer: ISSUER.into(),
                keys: parse_jwks(&jwks.to_string()).expect("JWKS"),
            }
        }

        /// A token with this header and these claims, signed with the key `alg` names.
        fn sign(&self, header: serde_json::Value, claims: &serde_json::Value) -> String {
            let signed = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let signature = if header["alg"] == "RS256" {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PKCS1_SHA256,
                        &self.rng,
                        signed.as_bytes(),
                        &mut sig,
                    )
                    .expect("RSA signature");
                sig
            } else {
                self.ec
                    .sign(&self.rng, signed.as_bytes())
                    .expect("ECDSA signature")
                    .as_ref()
                    .to_vec()
            };
            format!("{signed}.{}", b64(&signature))
        }

        fn es256(&self, claims: &serde_json::Value) -> String {
            self.sign(serde_json::json!({"alg": "ES256", "kid": "ec-1"}), claims)
        }
    }

    fn with(
        claims: &serde_json::Value,
        path: &[&str],
        value: serde_json::Value,
    ) -> serde_json::Value {
        let mut out = claims.clone();
        let mut at = &mut out;
        for key in &path[..path.len() - 1] {
            at = &mut at[*key];
        }
        at[path[path.len() - 1]] = value;
        out
    }

    fn pod() -> PodFacts {
        PodFacts {
            uid: "u1".into(),
            opted_in: true,
            injected: true,
            deleting: false,
            trusts_namespace_bundle: true,
            created: None,
            keys: vec!["k".into()],
        }
    }

    fn check(
        token: &str,
        discovery: Option<&Discovery>,
        pod: Option<PodFacts>,
    ) -> Result<Precheck, Denial> {
        let pod_check = move |c: &Caller| {
            let facts = pod.clone().filter(|_| c.pod_name == "p");
            check_pod(c, "team", facts.as_ref()).map(drop)
        };
        precheck(token, NOW, discovery, Some(&pod_check))
    }

    fn rejected(fault: TokenFault) -> Result<Precheck, Denial> {
        Err(Denial::TokenRejected(fault))
    }

    /// The table: each token, forged or malformed one way, against the answer it gets.
    #[test]
    fn each_forged_or_malformed_token_gets_its_refusal() {
        let s = Signer::new();
        let d = s.discovery();
        let good = s.es256(&claims());
        let (head, rest) = good.split_once('.').expect("a JWT");
        let (payload, sig) = rest.split_once('.').expect("a JWT");
        let mut flipped = URL_SAFE_NO_PAD.decode(sig).expect("b64");
        flipped[10] ^= 1;
        let other = Signer::new();
        let header = |alg: &str, kid: &str| serde_json::json!({"alg": alg, "kid": kid});
        let unsigned = |h: serde_json::Value| {
            format!(
                "{}.{}.{}",
                b64(h.to_string().as_bytes()),
                b64(claims().to_string().as_bytes()),
                b64(b"sig")
            )
        };
        let cases: Vec<(&str, String, Result<Precheck, Denial>)> = vec![
            (
                "a real token",
                good.clone(),
                Ok(Precheck::Verified(caller())),
            ),
            (
                "RS256",
                s.sign(header("RS256", "rsa-1"), &claims()),
                Ok(Precheck::Verified(caller())),
            ),
            ("empty", String::new(), rejected(TokenFault::Malformed)),
            (
                "two parts",
                format!("{head}.{payload}"),
                rejected(TokenFault::Malformed),
            ),
            (
                "four parts",
                format!("{good}.x"),
                rejected(TokenFault::Malformed),
            ),
            (
                "an empty signature",
                format!("{head}.{payload}."),
                rejected(TokenFault::Malformed),
            ),
            (
                "not base64url",
                format!("{head}.{payload}.+/+/"),
                rejected(TokenFault::Malformed),
            ),
            (
                "padded",
                format!("{head}.{payload}.{sig}=="),
                rejected(TokenFault::Malformed),
            ),
            (
                "JSON header missing",
                format!("{}.{payload}.{sig}", b64(b"[]")),
                rejected(TokenFault::Malformed),
            ),
            (
                "claims not JSON",
                format!("{head}.{}.{sig}", b64(b"{")),
                rejected(TokenFault::Malformed),
            ),
            (
                "exp not a number",
                s.es256(&with(&claims(), &["exp"], "soon".into())),
                rejected(TokenFault::Malformed),
            ),
            (
                "too long",
                s.es256(&with(
                    &claims(),
                    &["pad"],
                    "x".repeat(MAX_TOKEN_BYTES).into(),
                )),
                rejected(TokenFault::Malformed),
            ),
            (
                "alg none",
                unsigned(serde_json::json!({"alg": "none"})),
                rejected(TokenFault::Algorithm),
            ),
            (
                "alg HS256",
                unsigned(header("HS256", "ec-1")),
                rejected(TokenFault::Algorithm),
            ),
            (
                "alg PS256",
                unsigned(header("PS256", "rsa-1")),
                rejected(TokenFault::Algorithm),
            ),
            (
                "another audience",
                s.es256(&with(
                    &claims(),
                    &["aud"],
                    serde_json::json!(["https://kubernetes.default.svc"]),
                )),
                Err(Denial::WrongAudience),
            ),
            (
                "no audience",
                s.es256(&with(&claims(), &["aud"], serde_json::Value::Null)),
                Err(Denial::WrongAudience),
            ),
            (
                "audience as a string",
                s.es256(&with(&claims(), &["aud"], "byok.dev".into())),
                Ok(Precheck::Verified(caller())),
            ),
            (
                "expired past the leeway",
                s.es256(&with(&claims(), &["exp"], (NOW - LEEWAY - 1).into())),
                rejected(TokenFault::Expired),
            ),
            (
                "expired within the leeway",
                s.es256(&with(&claims(), &["exp"], (NOW - LEEWAY).into())),
                Ok(Precheck::Verified(caller())),
            ),
            (
                "not valid yet",
                s.es256(&with(&claims(), &["nbf"], (NOW + LEEWAY + 1).into())),
                rejected(TokenFault::NotYetValid),
            ),
            (
                "another issuer",
                s.es256(&with(&claims(), &["iss"], "https://evil.example".into())),
                rejected(TokenFault::WrongIssuer),
            ),
            (
                "no kubernetes.io claim",
                s.es256(&with(
                    &claims(),
                    &["kubernetes.io"],
                    serde_json::Value::Null,
                )),
                Err(Denial::NotPodBound),
            ),
            (
                "not bound to a pod",
                s.es256(&with(
                    &claims(),
                    &["kubernetes.io", "pod"],
                    serde_json::Value::Null,
                )),
                Err(Denial::NotPodBound),
            ),
            (
                "an empty pod uid",
                s.es256(&with(
                    &claims(),
                    &["kubernetes.io", "pod", "uid"],
                    "".into(),
                )),
                Err(Denial::NotPodBound),
            ),
            (
                "a pod of another namespace than the one asked for",
                s.es256(&with(
                    &claims(),
                    &["kubernetes.io", "namespace"],
                    "other".into(),
                )),
                Err(Denial::OtherNamespace),
            ),
            (
                "a pod the cache does not have",
                s.es256(&with(
                    &claims(),
                    &["kubernetes.io", "pod", "name"],
                    "q".into(),
                )),
                Err(Denial::PodNotFound),
            ),
            (
                "another uid (the pod was recreated)",
                s.es256(&with(
                    &claims(),
                    &["kubernetes.io", "pod", "uid"],
                    "u2".into(),
                )),
                Err(Denial::PodNotFound),
            ),
            (
                "a flipped signature bit",
                format!("{head}.{payload}.{}", b64(&flipped)),
                rejected(TokenFault::BadSignature),
            ),
            (
                "claims changed after signing",
                format!(
                    "{head}.{}.{sig}",
                    b64(with(
                        &claims(),
                        &["kubernetes.io", "serviceaccount", "name"],
                        "admin".into()
                    )
                    .to_string()
                    .as_bytes())
                ),
                rejected(TokenFault::BadSignature),
            ),
            (
                "signed by another key, same kid",
                other.es256(&claims()),
                rejected(TokenFault::BadSignature),
            ),
            (
                "an ES256 signature under the RSA key's kid",
                s.sign(header("ES256", "rsa-1"), &claims()),
                rejected(TokenFault::BadSignature),
            ),
            (
                "an RS256 signature under the EC key's kid",
                s.sign(header("RS256", "ec-1"), &claims()),
                rejected(TokenFault::BadSignature),
            ),
            (
                "an unknown kid",
                s.sign(header("ES256", "nope"), &claims()),
                rejected(TokenFault::UnknownKey),
            ),
            (
                "no kid where the API server's keys have one: not its token",
                s.sign(serde_json::json!({"alg": "ES256"}), &claims()),
                rejected(TokenFault::UnknownKey),
            ),
            (
                "no kid and a bad signature: not tried against an unsupported key either",
                other.sign(serde_json::json!({"alg": "ES256"}), &claims()),
                rejected(TokenFault::UnknownKey),
            ),
            (
                "a key type not verified here: the TokenReview decides",
                unsigned(header("ES512", "p521")),
                Ok(Precheck::Unverified(caller())),
            ),
        ];
        for (what, token, want) in cases {
            assert_eq!(check(&token, Some(&d), Some(pod())), want, "{what}");
        }
    }

    #[test]
    fn pod_checks_use_the_brokers_own_refusals() {
        let s = Signer::new();
        let d = s.discovery();
        let token = s.es256(&claims());
        let unlabelled = PodFacts {
            opted_in: false,
            ..pod()
        };
        assert_eq!(
            check(&token, Some(&d), Some(unlabelled)),
            Err(Denial::PodNotOptedIn)
        );
        let deleting = PodFacts {
            deleting: true,
            ..pod()
        };
        assert_eq!(
            check(&token, Some(&d), Some(deleting)),
            Err(Denial::PodNotFound)
        );
        assert_eq!(check(&token, Some(&d), None), Err(Denial::PodNotFound));
        // The pod cache not listed yet: the pod check is left to the broker.
        assert_eq!(
            precheck(&token, NOW, Some(&d), None),
            Ok(Precheck::Verified(caller()))
        );
    }

    #[test]
    fn without_the_api_servers_keys_the_signature_is_left_to_the_review() {
        let s = Signer::new();
        let forged = Signer::new().es256(&with(&claims(), &["iss"], "https://evil.example".into()));
        // Issuer and signature unchecked; shape, audience, time and pod still are.
        assert_eq!(
            check(&forged, None, Some(pod())),
            Ok(Precheck::Unverified(caller()))
        );
        let expired = s.es256(&with(&claims(), &["exp"], (NOW - 3600).into()));
        assert_eq!(
            check(&expired, None, Some(pod())),
            rejected(TokenFault::Expired)
        );
        assert_eq!(
            check("a.b.c", None, Some(pod())),
            rejected(TokenFault::Malformed)
        );
        let unknown_pod = s.es256(&with(
            &claims(),
            &["kubernetes.io", "pod", "name"],
            "q".into(),
        ));
        assert_eq!(
            check(&unknown_pod, None, Some(pod())),
            Err(Denial::PodNotFound)
        );
    }

    #[test]
    fn jwks_keys_that_cannot_be_verified_here_are_marked_so() {
        let jwks = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "small", "n": b64(&[0xab; 128]), "e": "AQAB"},
            {"kty": "RSA", "kid": "padded", "n": b64(&[[0u8].as_slice(), &[0xab; 256]].concat()), "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "short", "x": b64(&[1; 31]), "y": b64(&[1; 32])},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": b64(&[1; 48]), "y": b64(&[1; 48])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AA"},
            {"kty": 7},
        ]});
        let keys = parse_jwks(&jwks.to_string()).expect("a JWKS");
        let kinds: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
        assert_eq!(
            kinds,
            [
                "Jwk(unsupported, kid=Some(\"small\"))",
                "Jwk(RSA, kid=Some(\"padded\"))",
                "Jwk(unsupported, kid=Some(\"short\"))",
                "Jwk(P-384, kid=Some(\"p384\"))",
                "Jwk(unsupported, kid=Some(\"ed\"))",
                "Jwk(unsupported, kid=None)",
            ]
        );
        assert_eq!(parse_jwks("{}"), None);
        assert_eq!(parse_jwks("not json"), None);
        assert_eq!(
            parse_issuer(r#"{"issuer": "https://x"}"#).as_deref(),
            Some("https://x")
        );
        assert_eq!(parse_issuer(r#"{"issuer": ""}"#), None);
    }

    #[test]
    fn seconds_left_reads_exp_and_tolerates_garbage() {
        let s = Signer::new();
        assert_eq!(seconds_left(&s.es256(&claims()), NOW), Some(600));
        let expired = s.es256(&with(&claims(), &["exp"], 10.into()));
        assert_eq!(seconds_left(&expired, NOW), Some(0));
        for garbage in ["", "a", "a.b.c", "a.!!!.c", "a.e30.c"] {
            assert_eq!(seconds_left(garbage, NOW), None, "{garbage}");
        }
    }
}
