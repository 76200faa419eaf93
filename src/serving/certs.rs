//! The operator's own CA and serving certificate, kept in one `kubernetes.io/tls` Secret that
//! every replica shares.
//!
//! The CA is created once (the first replica to create the Secret wins; the others read it).
//! The serving certificate is re-issued from that CA when it is due. The CA itself is
//! rotated when it nears its end ([`CertSettings::ca_rotate_before`]) or when asked
//! (`byok-operator ca rotate`): the new CA is also issued by the old one (a cross-signed
//! certificate, served after the leaf), so a sidecar whose trust bundle still holds only the
//! old CA verifies the new certificate; and the trust bundle holds both CAs, so a sidecar with
//! the new bundle verifies a replica still serving the old certificate. After
//! [`CertSettings::ca_transition`] the old CA and the cross certificate go.
//!
//! [`decide`] is the whole policy and is pure; [`ensure`] only reads and writes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::names;

pub const DEFAULT_SECRET_NAME: &str = "byok-operator-tls";
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const DEFAULT_SERVING_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(60);
/// A CA with less than this left is rotated.
pub const DEFAULT_CA_ROTATE_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the old CA stays trusted (in the bundle) and cross-signs the new one after a
/// rotation: every kubelet has refreshed its pods' bundles long before (about two minutes
/// with the default `syncFrequency`), and pods that have not are counted
/// (`byok_broker_trust_bundle_pods{bundle="outdated"}`).
pub const DEFAULT_CA_TRANSITION: Duration = Duration::from_secs(24 * 3600);
/// How long after a rotation the replicas keep serving a certificate of the old CA: every
/// replica reads the Secret within `check_every` (60 s) and then trusts, and publishes in the
/// webhook's `caBundle`, both CAs; only then does the serving certificate move to the new CA
/// (Go's verifier, the API server's, would not follow the cross certificate under a CA with
/// path length 0, which every CA of this operator has).
pub const DEFAULT_CA_SWITCH_AFTER: Duration = Duration::from_secs(180);

/// Secret data keys. `tls.crt`/`tls.key` are what `kubernetes.io/tls` requires.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// During a CA rotation: the CA before, the new CA issued by it, and when the rotation began.
pub const PREVIOUS_CA_CRT: &str = "previous-ca.crt";
pub const CROSS_CA_CRT: &str = "cross-ca.crt";
pub const CA_ROTATED_AT: &str = "ca-rotated-at";
/// The first CA's common name; a rotated CA's adds when it was made, so the old and the new
/// CA never share a name (a verifier matches issuers by name first).
const CA_NAME: &str = "byok-operator-ca";
const SECRET_TYPE: &str = "kubernetes.io/tls";

/// Certificates are dated this far back, so a replica or client whose clock runs a little
/// behind does not reject a certificate issued a moment ago.
const BACKDATE: Duration = Duration::from_secs(3600);
/// How often [`ensure`] re-reads after losing a write race before giving up for this round.
const WRITE_ATTEMPTS: usize = 3;

#[derive(Debug, Clone)]
pub struct CertSettings {
    pub namespace: String,
    pub secret_name: String,
    /// DNS names and IP literals the serving certificate must cover; IPs become IP SANs.
    pub sans: Vec<String>,
    pub ca_validity: Duration,
    pub serving_validity: Duration,
    /// A serving certificate that expires within this is re-issued.
    pub renew_before: Duration,
    /// How often [`super::tls::keep_current`] looks at the Secret.
    pub check_every: Duration,
    /// A CA with less than this left is rotated.
    pub ca_rotate_before: Duration,
    /// How long a rotation keeps the old CA trusted and the cross certificate served.
    pub ca_transition: Duration,
    /// How long after a rotation the serving certificate stays the old CA's.
    pub ca_switch_after: Duration,
}

impl CertSettings {
    /// The defaults: Secret `byok-operator-tls`, CA 10 years, serving certificate 90 days,
    /// renewed 30 days before it expires, checked every minute.
    pub fn new(namespace: impl Into<String>, sans: Vec<String>) -> Self {
        Self {
            namespace: namespace.into(),
            secret_name: DEFAULT_SECRET_NAME.into(),
            sans,
            ca_validity: DEFAULT_CA_VALIDITY,
            serving_validity: DEFAULT_SERVING_VALIDITY,
            renew_before: DEFAULT_RENEW_BEFORE,
            check_every: DEFAULT_CHECK_EVERY,
            ca_rotate_before: DEFAULT_CA_ROTATE_BEFORE,
            ca_transition: DEFAULT_CA_TRANSITION,
            ca_switch_after: DEFAULT_CA_SWITCH_AFTER,
        }
    }

    fn validate(&self) -> Result<(), CertError> {
        let bad = |reason: &str| Err(CertError::Settings(reason.into()));
        if self.sans.is_empty() {
            return bad("no subject alternative names: a serving certificate needs at least one");
        }
        // Otherwise every check would find a brand-new certificate already due.
        if self.renew_before >= self.serving_validity {
            return bad("renew_before must be shorter than serving_validity");
        }
        if self.serving_validity > self.ca_validity {
            return bad("serving_validity must not exceed ca_validity");
        }
        // Otherwise a new CA would be due for rotation at once.
        if self.ca_rotate_before >= self.ca_validity {
            return bad("ca_rotate_before must be shorter than ca_validity");
        }
        Ok(())
    }
}

/// What a TLS server needs: the CA to publish, the chain to present and its key.
#[derive(Clone)]
pub struct Bundle {
    pub ca_pem: String,
    /// During a CA rotation, the CA before: still trusted by the bundle sidecars get.
    pub previous_ca_pem: Option<String>,
    /// Leaf first.
    pub cert_chain_pem: String,
    /// PKCS#8 PEM.
    pub key: SecretString,
    /// When the leaf expires.
    pub not_after: Timestamp,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// Same certificates (the key follows the leaf).
    pub fn same_certs(&self, other: &Bundle) -> bool {
        self.ca_pem == other.ca_pem
            && self.cert_chain_pem == other.cert_chain_pem
            && self.previous_ca_pem == other.previous_ca_pem
    }

    /// What clients should trust: the CA, and during a rotation the CA before it too.
    pub fn trust_pem(&self) -> String {
        trust_pem(&self.ca_pem, self.previous_ca_pem.as_deref())
    }
}

/// The trust bundle for `ca_pem` and, during a rotation, `previous`.
pub fn trust_pem(ca_pem: &str, previous: Option<&str>) -> String {
    match previous {
        Some(prev) => {
            let mut out = ca_pem.trim_end().to_owned();
            out.push('\n');
            out.push_str(prev.trim_end());
            out.push('\n');
            out
        }
        None => ca_pem.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading or writing TLS Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error(
        "TLS Secret {namespace}/{name} holds an unusable CA ({reason}); it is not replaced \
         because clients trust that CA. Restore it, or delete the Secret to have a new CA \
         generated (the webhook caBundle is then updated)"
    )]
    UnusableCa {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("TLS Secret {namespace}/{name} kept changing under concurrent writers; retrying later")]
    Contended { namespace: String, name: String },
    #[error("certificate settings: {0}")]
    Settings(String),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate or key: {0}")]
    Invalid(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("MutatingWebhookConfiguration {name} does not exist")]
    WebhookConfigurationMissing { name: String },
    #[error("updating the caBundle of MutatingWebhookConfiguration {name}: {source}")]
    WebhookConfiguration { name: String, source: kube::Error },
}

/// Why a serving certificate is re-issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewReason {
    Missing,
    Unparsable,
    KeyMismatch,
    NotSignedByCa,
    MissingSan(String),
    Expiring { not_after: Timestamp },
}

impl std::fmt::Display for RenewReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(f, "no serving certificate"),
            Self::Unparsable => write!(f, "the serving certificate or key does not parse"),
            Self::KeyMismatch => write!(f, "the serving key does not match the certificate"),
            Self::NotSignedByCa => write!(f, "the serving certificate is not signed by the CA"),
            Self::MissingSan(san) => write!(f, "the serving certificate does not cover {san}"),
            Self::Expiring { not_after } => {
                write!(f, "the serving certificate expires at {not_after}")
            }
        }
    }
}

/// What to do with what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing stored: generate a CA and a serving certificate.
    Create,
    /// The stored serving certificate is good.
    Keep,
    /// Issue a new serving certificate from the stored CA.
    Renew(RenewReason),
    /// The stored CA cannot sign; a person must act.
    UnusableCa(String),
    /// The CA nears its end: make a new one, cross-signed by it.
    RotateCa { not_after: Timestamp },
    /// A rotation's transition is over: forget the old CA and the cross certificate.
    EndTransition,
}

/// The policy: given the Secret (if any), the settings and the time, what to do.
pub fn decide(secret: Option<&Secret>, settings: &CertSettings, now: Timestamp) -> Decision {
    let Some(secret) = secret else {
        return Decision::Create;
    };
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let ca = match StoredCa::parse(data) {
        Ok(ca) => ca,
        Err(reason) => return Decision::UnusableCa(reason),
    };
    if ca.not_after <= now {
        return Decision::UnusableCa(format!("the CA expired at {}", ca.not_after));
    }
    match rotation_began(data) {
        Some(began)
            if began
                .checked_add(to_span(settings.ca_transition))
                .is_ok_and(|end| now >= end) =>
        {
            return Decision::EndTransition;
        }
        Some(_) => {}
        None if now + to_span(settings.ca_rotate_before) >= ca.not_after => {
            return Decision::RotateCa {
                not_after: ca.not_after,
            };
        }
        None => {}
    }
    // The first part of a rotation: a certificate of the old CA is still fine.
    let old_leaf_ok = rotation_began(data).is_some_and(|began| {
        began
            .checked_add(to_span(settings.ca_switch_after))
            .is_ok_and(|switch| now < switch)
    });
    let state = match serving_state(data, &ca, &settings.sans) {
        Err(RenewReason::NotSignedByCa) if old_leaf_ok => text(data, PREVIOUS_CA_CRT)
            .and_then(|pem| first_cert(&pem))
            .map_or(Err(RenewReason::NotSignedByCa), |cert_der| {
                serving_state(
                    data,
                    &StoredCa {
                        cert_der,
                        not_after: ca.not_after,
                    },
                    &settings.sans,
                )
            }),
        other => other,
    };
    match state {
        Err(reason) => Decision::Renew(reason),
        Ok(not_after) => {
            let due = now + to_span(settings.renew_before) >= not_after;
            // A leaf cannot outlive its CA; renewing one that already ends with it gains nothing.
            if due && not_after < ca.not_after {
                Decision::Renew(RenewReason::Expiring { not_after })
            } else {
                Decision::Keep
            }
        }
    }
}

/// When the rotation in progress began (`None`: none is, or its record is unreadable, which
/// ends it: a rotation needs both its time and the cross certificate).
fn rotation_began(data: &BTreeMap<String, ByteString>) -> Option<Timestamp> {
    text(data, CROSS_CA_CRT)?;
    text(data, PREVIOUS_CA_CRT)?;
    text(data, CA_ROTATED_AT)?.trim().parse().ok()
}

/// The CA from a Secret's data, checked: present, parses, is a CA, and the key is its key.
struct StoredCa {
    cert_der: CertificateDer<'static>,
    not_after: Timestamp,
}

impl StoredCa {
    fn parse(data: &BTreeMap<String, ByteString>) -> Result<Self, String> {
        let cert_pem = text(data, CA_CRT).ok_or_else(|| format!("{CA_CRT} is missing"))?;
        let cert_der = first_cert(&cert_pem).ok_or_else(|| format!("{CA_CRT} does not parse"))?;
        let key_pem = secret_text(data, CA_KEY).ok_or_else(|| format!("{CA_KEY} is missing"))?;
        // rcgen's error could quote the input; say only which entry is wrong.
        let key = KeyPair::from_pem(key_pem.expose_secret())
            .map_err(|_| format!("{CA_KEY} does not parse as a PKCS#8 private key"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|_| format!("{CA_CRT} does not parse"))?;
        if !cert.is_ca() {
            return Err(format!("{CA_CRT} is not a CA certificate"));
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(format!("{CA_KEY} is not the key of {CA_CRT}"));
        }
        let not_after = asn1_time(cert.validity().not_after);
        drop(cert);
        Ok(Self {
            cert_der,
            not_after,
        })
    }
}

/// The serving certificate's expiry when it is usable with this CA and covers `sans`.
fn serving_state(
    data: &BTreeMap<String, ByteString>,
    ca: &StoredCa,
    sans: &[String],
) -> Result<Timestamp, RenewReason> {
    let (Some(cert_pem), Some(key_pem)) = (text(data, TLS_CRT), secret_text(data, TLS_KEY)) else {
        return Err(RenewReason::Missing);
    };
    let der = first_cert(&cert_pem).ok_or(RenewReason::Unparsable)?;
    let key = KeyPair::from_pem(key_pem.expose_secret()).map_err(|_| RenewReason::Unparsable)?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&der).map_err(|_| RenewReason::Unparsable)?;
    if leaf.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(RenewReason::KeyMismatch);
    }
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca.cert_der)
        .map_err(|_| RenewReason::NotSignedByCa)?;
    if leaf.issuer() != ca_cert.subject()
        || leaf.verify_signature(Some(ca_cert.public_key())).is_err()
    {
        return Err(RenewReason::NotSignedByCa);
    }
    if let Some(missing) = missing_san(&leaf, sans) {
        return Err(RenewReason::MissingSan(missing));
    }
    Ok(asn1_time(leaf.validity().not_after))
}

/// The DNS names and IP addresses the first certificate of `chain_pem` is for (lowercased;
/// IPs as text). Empty when it does not parse.
pub fn leaf_sans(chain_pem: &str) -> Vec<String> {
    use rustls_pki_types::pem::PemObject;
    let Some(Ok(der)) =
        rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()
    else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes)
                            .ok()
                            .map(|b| IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(|b| IpAddr::from(b).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The first of `sans` the certificate does not carry. DNS names compare case-insensitively.
fn missing_san(cert: &X509Certificate<'_>, sans: &[String]) -> Option<String> {
    let names: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    sans.iter()
        .find(|san| {
            !names
                .iter()
                .any(|name| match (name, san.parse::<IpAddr>()) {
                    (GeneralName::IPAddress(bytes), Ok(ip)) => ip_bytes(ip) == *bytes,
                    (GeneralName::DNSName(dns), Err(_)) => dns.eq_ignore_ascii_case(san),
                    _ => false,
                })
        })
        .cloned()
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|s| !s.trim().is_empty())
}

fn secret_text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<SecretString> {
    text(data, key).map(SecretString::from)
}

pub(crate) fn first_cert(pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

pub(crate) fn asn1_time(t: x509_parser::time::ASN1Time) -> Timestamp {
    Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::MIN)
}

fn to_span(d: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX)
}

fn offset_date_time(t: Timestamp) -> Result<time::OffsetDateTime, CertError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .map_err(|e| CertError::Settings(format!("time out of range: {e}")))
}

fn add(now: Timestamp, d: Duration) -> Result<Timestamp, CertError> {
    now.checked_add(to_span(d))
        .map_err(|e| CertError::Settings(format!("validity out of range: {e}")))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A new self-signed CA: (certificate PEM, PKCS#8 key PEM).
pub fn generate_ca(
    validity: Duration,
    now: Timestamp,
) -> Result<(String, SecretString), CertError> {
    let (params, key) = ca_params(CA_NAME, validity, now)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), SecretString::from(key.serialize_pem())))
}

/// What a rotation writes: the new CA (self-signed, named for `now`), its key, and the same
/// CA issued by the old one (the cross certificate, valid while the old CA is).
pub fn rotate_ca_certs(
    old_ca_pem: &str,
    old_ca_key: &SecretString,
    validity: Duration,
    now: Timestamp,
) -> Result<(String, SecretString, String), CertError> {
    let name = format!("{CA_NAME} {}", now.strftime("%Y-%m-%dT%H:%M:%SZ"));
    let (params, key) = ca_params(&name, validity, now)?;
    let new_ca = params.self_signed(&key)?;
    let old_key = KeyPair::from_pem(old_ca_key.expose_secret())
        .map_err(|_| CertError::Invalid("the CA key does not parse".into()))?;
    let old_der = first_cert(old_ca_pem)
        .ok_or_else(|| CertError::Invalid("the CA certificate does not parse".into()))?;
    let old_not_after = x509_parser::parse_x509_certificate(&old_der)
        .map(|(_, c)| asn1_time(c.validity().not_after))
        .map_err(|_| CertError::Invalid("the CA certificate does not parse".into()))?;
    let old = Issuer::from_ca_cert_der(&old_der, old_key)?;
    let (mut cross_params, _) = ca_params(&name, validity, now)?;
    cross_params.not_after = offset_date_time(add(now, validity)?.min(old_not_after))?;
    let cross = cross_params.signed_by(&key, &old)?;
    Ok((
        new_ca.pem(),
        SecretString::from(key.serialize_pem()),
        cross.pem(),
    ))
}

/// A CA's parameters and a fresh key.
fn ca_params(
    name: &str,
    validity: Duration,
    now: Timestamp,
) -> Result<(CertificateParams, KeyPair), CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset_date_time(now - to_span(BACKDATE))?;
    params.not_after = offset_date_time(add(now, validity)?)?;
    params.serial_number = Some(random_serial());
    Ok((params, KeyPair::generate()?))
}

/// A serving certificate for `sans`, signed by the CA: (leaf PEM, PKCS#8 key PEM, not after).
/// It never outlives the CA.
pub fn issue_serving(
    ca_pem: &str,
    ca_key: &SecretString,
    sans: &[String],
    validity: Duration,
    now: Timestamp,
) -> Result<(String, SecretString, Timestamp), CertError> {
    let ca_key = KeyPair::from_pem(ca_key.expose_secret())
        .map_err(|_| CertError::Invalid("the CA key does not parse".into()))?;
    let ca_der = first_cert(ca_pem)
        .ok_or_else(|| CertError::Invalid("the CA certificate does not parse".into()))?;
    let ca_not_after = x509_parser::parse_x509_certificate(&ca_der)
        .map(|(_, c)| asn1_time(c.validity().not_after))
        .map_err(|_| CertError::Invalid("the CA certificate does not parse".into()))?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for san in sans {
        params.subject_alt_names.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.clone().try_into()?),
        });
    }
    let common_name = sans.first().map(String::as_str).unwrap_or("byok-operator");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_after = add(now, validity)?.min(ca_not_after);
    params.not_before = offset_date_time(now - to_span(BACKDATE))?;
    params.not_after = offset_date_time(not_after)?;
    params.serial_number = Some(random_serial());
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((
        cert.pem(),
        SecretString::from(key.serialize_pem()),
        not_after,
    ))
}

/// Secret data for a CA and a serving certificate.
fn secret_data(
    ca_pem: &str,
    ca_key: &SecretString,
    cert_pem: &str,
    key: &SecretString,
) -> BTreeMap<String, ByteString> {
    [
        (CA_CRT, ca_pem.as_bytes()),
        (CA_KEY, ca_key.expose_secret().as_bytes()),
        (TLS_CRT, cert_pem.as_bytes()),
        (TLS_KEY, key.expose_secret().as_bytes()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
    .collect()
}

/// The bundle a stored Secret serves (after [`decide`] said `Keep`).
pub fn bundle_from_secret(secret: &Secret) -> Result<Bundle, CertError> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let get = |key: &str| {
        text(data, key).ok_or_else(|| CertError::Invalid(format!("{key} is missing or not text")))
    };
    let key = secret_text(data, TLS_KEY)
        .ok_or_else(|| CertError::Invalid(format!("{TLS_KEY} is missing or not text")))?;
    let mut bundle = bundle_from_parts(get(CA_CRT)?, get(TLS_CRT)?, key)?;
    // During a rotation: the cross certificate after the leaf (clients with the old CA chain
    // through it), and the old CA for the trust bundle.
    if rotation_began(data).is_some() {
        let cross = get(CROSS_CA_CRT)?;
        bundle.cert_chain_pem = format!(
            "{}\n{}\n",
            bundle.cert_chain_pem.trim_end(),
            cross.trim_end()
        );
        bundle.previous_ca_pem = Some(get(PREVIOUS_CA_CRT)?);
    }
    Ok(bundle)
}

/// A bundle from PEM text, checked: the chain parses, the key parses and matches the leaf.
pub fn bundle_from_parts(
    ca_pem: String,
    cert_chain_pem: String,
    key: SecretString,
) -> Result<Bundle, CertError> {
    let leaf = first_cert(&cert_chain_pem)
        .ok_or_else(|| CertError::Invalid("the certificate chain has no certificate".into()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|_| CertError::Invalid("the leaf certificate does not parse".into()))?;
    let key_der = PrivateKeyDer::from_pem_slice(key.expose_secret().as_bytes())
        .map_err(|_| CertError::Invalid("the private key does not parse".into()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|_| CertError::Invalid("the private key type is not supported".into()))?;
    if let Some(spki) = signer.public_key()
        && spki.as_ref() != parsed.public_key().raw
    {
        return Err(CertError::Invalid(
            "the private key does not match the leaf certificate".into(),
        ));
    }
    if first_cert(&ca_pem).is_none() {
        return Err(CertError::Invalid(
            "the CA certificate does not parse".into(),
        ));
    }
    Ok(Bundle {
        not_after: asn1_time(parsed.validity().not_after),
        ca_pem,
        previous_ca_pem: None,
        cert_chain_pem,
        key,
    })
}

fn new_secret(settings: &CertSettings, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(names::managed_by_labels()),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Makes sure the Secret holds a CA and a current serving certificate, and returns what to
/// serve. Replicas racing on a fresh install end up with one CA; concurrent renewals with one
/// certificate (the loser reads the winner's).
pub async fn ensure(api: &Api<Secret>, settings: &CertSettings) -> Result<Bundle, CertError> {
    settings.validate()?;
    let name = settings.secret_name.as_str();
    for _ in 0..WRITE_ATTEMPTS {
        let stored = api
            .get_opt(name)
            .await
            .map_err(|e| api_error(settings, e))?;
        let now = Timestamp::now();
        // Each write is `None` when another replica wrote first: read theirs, and decide again.
        let written = match (decide(stored.as_ref(), settings, now), stored) {
            (Decision::Keep, Some(secret)) => return bundle_from_secret(&secret),
            (Decision::UnusableCa(reason), _) => {
                return Err(CertError::UnusableCa {
                    namespace: settings.namespace.clone(),
                    name: name.to_string(),
                    reason,
                });
            }
            (Decision::Create, _) => create(api, settings, now).await?,
            (Decision::RotateCa { not_after }, Some(secret)) => {
                rotate_ca(api, settings, secret, now, not_after).await?
            }
            (Decision::EndTransition, Some(secret)) => {
                end_transition(api, settings, secret).await?
            }
            (Decision::Renew(reason), Some(secret)) => {
                renew(api, settings, secret, now, reason).await?
            }
            // Gone since it was read: read again.
            _ => None,
        };
        if let Some(bundle) = written {
            return Ok(bundle);
        }
    }
    Err(CertError::Contended {
        namespace: settings.namespace.clone(),
        name: name.to_string(),
    })
}

fn api_error(settings: &CertSettings, source: kube::Error) -> CertError {
    CertError::Api {
        namespace: settings.namespace.clone(),
        name: settings.secret_name.clone(),
        source,
    }
}

/// The Secret as written, or `None` when another replica wrote it first (409).
fn written(
    result: Result<Secret, kube::Error>,
    settings: &CertSettings,
) -> Result<Option<Secret>, CertError> {
    match result {
        Ok(secret) => Ok(Some(secret)),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
        Err(e) => Err(api_error(settings, e)),
    }
}

/// Nothing stored: creates a CA and a serving certificate.
async fn create(
    api: &Api<Secret>,
    settings: &CertSettings,
    now: Timestamp,
) -> Result<Option<Bundle>, CertError> {
    let (ca_pem, ca_key) = generate_ca(settings.ca_validity, now)?;
    let (cert_pem, key, not_after) = issue_serving(
        &ca_pem,
        &ca_key,
        &settings.sans,
        settings.serving_validity,
        now,
    )?;
    let secret = new_secret(settings, secret_data(&ca_pem, &ca_key, &cert_pem, &key));
    let created = api.create(&PostParams::default(), &secret).await;
    // Another replica created it first: use theirs (one CA for everyone).
    if written(created, settings)?.is_none() {
        return Ok(None);
    }
    tracing::info!(secret = settings.secret_name.as_str(), %not_after, "created the serving CA and certificate");
    Ok(Some(Bundle {
        ca_pem,
        previous_ca_pem: None,
        cert_chain_pem: cert_pem,
        key,
        not_after,
    }))
}

/// The CA nears its end (`not_after`): rotates it ([`rotated_secret`]).
async fn rotate_ca(
    api: &Api<Secret>,
    settings: &CertSettings,
    secret: Secret,
    now: Timestamp,
    not_after: Timestamp,
) -> Result<Option<Bundle>, CertError> {
    let name = settings.secret_name.as_str();
    let rotated = rotated_secret(secret, settings, now)?;
    let replaced = api.replace(name, &PostParams::default(), &rotated).await;
    let Some(stored) = written(replaced, settings)? else {
        return Ok(None);
    };
    tracing::warn!(secret = name, ca_not_after = %not_after, "the CA nears its end: rotated it (cross-signed by the old one, which stays trusted for the transition)");
    bundle_from_secret(&stored).map(Some)
}

/// The CA rotation's transition is over: drops the previous CA, so it is no longer trusted.
async fn end_transition(
    api: &Api<Secret>,
    settings: &CertSettings,
    mut secret: Secret,
) -> Result<Option<Bundle>, CertError> {
    let name = settings.secret_name.as_str();
    let data = secret.data.get_or_insert_default();
    for key in [PREVIOUS_CA_CRT, CROSS_CA_CRT, CA_ROTATED_AT] {
        data.remove(key);
    }
    secret.metadata.managed_fields = None;
    let replaced = api.replace(name, &PostParams::default(), &secret).await;
    let Some(stored) = written(replaced, settings)? else {
        return Ok(None);
    };
    tracing::info!(
        secret = name,
        "the CA rotation's transition is over: the old CA is no longer trusted"
    );
    bundle_from_secret(&stored).map(Some)
}

/// Issues a new serving certificate from the stored CA.
async fn renew(
    api: &Api<Secret>,
    settings: &CertSettings,
    mut secret: Secret,
    now: Timestamp,
    reason: RenewReason,
) -> Result<Option<Bundle>, CertError> {
    let name = settings.secret_name.as_str();
    let data = secret.data.get_or_insert_default();
    // decide() has checked both are present and usable.
    let (Some(ca_pem), Some(ca_key)) = (text(data, CA_CRT), secret_text(data, CA_KEY)) else {
        return Ok(None);
    };
    let (cert_pem, key, not_after) = issue_serving(
        &ca_pem,
        &ca_key,
        &settings.sans,
        settings.serving_validity,
        now,
    )?;
    data.insert(TLS_CRT.into(), ByteString(cert_pem.clone().into_bytes()));
    data.insert(
        TLS_KEY.into(),
        ByteString(key.expose_secret().as_bytes().to_vec()),
    );
    // The resourceVersion stays: the write fails if another replica got there first.
    secret.metadata.managed_fields = None;
    let replaced = api.replace(name, &PostParams::default(), &secret).await;
    // Another replica renewed it: read theirs.
    let Some(stored) = written(replaced, settings)? else {
        return Ok(None);
    };
    tracing::info!(secret = name, %reason, %not_after, "renewed the serving certificate");
    bundle_from_secret(&stored).map(Some)
}

/// `secret` with its CA rotated at `now`: a new CA and serving certificate, the old CA kept as
/// `previous-ca.crt` and the new CA issued by it as `cross-ca.crt`. Refused while a
/// rotation's transition is in progress (pods may still trust only the CA before it).
pub fn rotated_secret(
    mut secret: Secret,
    settings: &CertSettings,
    now: Timestamp,
) -> Result<Secret, CertError> {
    let data = secret.data.get_or_insert_default();
    if rotation_began(data).is_some() {
        return Err(CertError::Settings(
            "a CA rotation is still in its transition; rotate again after it ends".into(),
        ));
    }
    let (Some(old_pem), Some(old_key)) = (text(data, CA_CRT), secret_text(data, CA_KEY)) else {
        return Err(CertError::Invalid("the Secret holds no usable CA".into()));
    };
    let (ca_pem, ca_key, cross) = rotate_ca_certs(&old_pem, &old_key, settings.ca_validity, now)?;
    // The serving certificate stays the old CA's until `ca_switch_after` (see there).
    let (Some(cert_pem), Some(key)) = (text(data, TLS_CRT), secret_text(data, TLS_KEY)) else {
        return Err(CertError::Invalid(
            "the Secret holds no serving certificate".into(),
        ));
    };
    let mut next = secret_data(&ca_pem, &ca_key, &cert_pem, &key);
    for (k, v) in [
        (PREVIOUS_CA_CRT, old_pem),
        (CROSS_CA_CRT, cross),
        (CA_ROTATED_AT, now.to_string()),
    ] {
        next.insert(k.to_owned(), ByteString(v.into_bytes()));
    }
    // Anything else the Secret holds (the webhook's path) stays.
    for (k, v) in std::mem::take(data) {
        next.entry(k).or_insert(v);
    }
    secret.data = Some(next);
    // The resourceVersion stays: the write fails if another replica got there first.
    secret.metadata.managed_fields = None;
    Ok(secret)
}

/// Rotates the CA now (`byok-operator ca rotate`): what [`decide`] does when the CA nears its
/// end. The serving certificate's names are the stored one's.
pub async fn rotate_now(api: &Api<Secret>, secret_name: &str) -> Result<Bundle, CertError> {
    let err = |source| CertError::Api {
        namespace: api.namespace().unwrap_or_default().to_owned(),
        name: secret_name.to_owned(),
        source,
    };
    let secret = api.get(secret_name).await.map_err(err)?;
    let sans = secret
        .data
        .as_ref()
        .and_then(|d| text(d, TLS_CRT))
        .map(|chain| leaf_sans(&chain))
        .unwrap_or_default();
    let settings = CertSettings::new(api.namespace().unwrap_or_default(), sans);
    settings.validate()?;
    let rotated = rotated_secret(secret, &settings, Timestamp::now())?;
    let stored = api
        .replace(secret_name, &PostParams::default(), &rotated)
        .await
        .map_err(err)?;
    bundle_from_secret(&stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn settings() -> CertSettings {
        CertSettings::new(
            "ns",
            vec![
                "byok-operator.ns.svc".into(),
                "localhost".into(),
                "127.0.0.1".into(),
                "::1".into(),
            ],
        )
    }

    fn now() -> Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }

    /// A Secret as `ensure` would create it at `at`.
    fn stored(s: &CertSettings, at: Timestamp) -> Secret {
        let (ca_pem, ca_key) = generate_ca(s.ca_validity, at).unwrap();
        let (cert, key, _) =
            issue_serving(&ca_pem, &ca_key, &s.sans, s.serving_validity, at).unwrap();
        new_secret(s, secret_data(&ca_pem, &ca_key, &cert, &key))
    }

    fn set(secret: &mut Secret, key: &str, value: &str) {
        secret
            .data
            .get_or_insert_default()
            .insert(key.into(), ByteString(value.as_bytes().to_vec()));
    }

    fn get(secret: &Secret, key: &str) -> String {
        text(secret.data.as_ref().unwrap(), key).unwrap()
    }

    /// Whether a client trusting exactly `roots_pem` accepts `chain_pem` for `name` at `at`.
    fn verifies(roots_pem: &str, chain_pem: &str, name: &str, at: Timestamp) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            roots.add(der.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
        let server = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let now = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(at.as_second()).unwrap(),
        ));
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &server, &[], now)
            .is_ok()
    }

    /// Issue 20 item 3: a CA rotated when it nears its end. Every client in use during the
    /// transition verifies every replica: a sidecar whose bundle still holds only the old CA
    /// verifies the new certificate (through the cross certificate), one with the new bundle
    /// (old and new CA) verifies a replica still serving the old certificate. After the
    /// transition the old CA goes.
    #[test]
    fn a_rotated_ca_is_verified_by_old_and_new_bundles_through_the_transition() {
        let s = settings();
        let installed = now();
        let mut old = stored(&s, installed);
        let name = "byok-operator.ns.svc";
        // Nine years on, a year before the CA ends: rotate. (The serving certificate was
        // renewed lately, as it is every 60 days.)
        let due = installed + to_span(DEFAULT_CA_VALIDITY - DEFAULT_CA_ROTATE_BEFORE + DAY);
        let data = old.data.as_mut().unwrap();
        let (leaf, key, _) = issue_serving(
            &text(data, CA_CRT).unwrap(),
            &secret_text(data, CA_KEY).unwrap(),
            &s.sans,
            s.serving_validity,
            due - to_span(DAY),
        )
        .unwrap();
        data.insert(TLS_CRT.into(), ByteString(leaf.into_bytes()));
        data.insert(
            TLS_KEY.into(),
            ByteString(key.expose_secret().as_bytes().to_vec()),
        );
        let old_bundle = bundle_from_secret(&old).unwrap();
        assert!(matches!(
            decide(Some(&old), &s, due),
            Decision::RotateCa { .. }
        ));
        assert_eq!(
            decide(Some(&old), &s, installed + to_span(DAY)),
            Decision::Keep
        );
        let rotated = rotated_secret(old.clone(), &s, due).unwrap();
        // First part: the old CA's certificate is still served, and both CAs are trusted.
        assert_eq!(decide(Some(&rotated), &s, due), Decision::Keep);
        let first_part = bundle_from_secret(&rotated).unwrap();
        assert_ne!(first_part.ca_pem, old_bundle.ca_pem);
        assert_eq!(
            first_part.previous_ca_pem.as_deref(),
            Some(old_bundle.ca_pem.as_str())
        );
        let trust = first_part.trust_pem();
        assert!(verifies(
            &old_bundle.ca_pem,
            &first_part.cert_chain_pem,
            name,
            due
        ));
        assert!(verifies(&trust, &first_part.cert_chain_pem, name, due));
        // Then the serving certificate moves to the new CA.
        let switch = due + to_span(DEFAULT_CA_SWITCH_AFTER);
        assert_eq!(
            decide(Some(&rotated), &s, switch),
            Decision::Renew(RenewReason::NotSignedByCa)
        );
        let mut renewed = rotated.clone();
        let data = renewed.data.as_mut().unwrap();
        let (leaf, key, _) = issue_serving(
            &text(data, CA_CRT).unwrap(),
            &secret_text(data, CA_KEY).unwrap(),
            &s.sans,
            s.serving_validity,
            switch,
        )
        .unwrap();
        data.insert(TLS_CRT.into(), ByteString(leaf.into_bytes()));
        data.insert(
            TLS_KEY.into(),
            ByteString(key.expose_secret().as_bytes().to_vec()),
        );
        assert_eq!(decide(Some(&renewed), &s, switch), Decision::Keep);
        let new_bundle = bundle_from_secret(&renewed).unwrap();
        assert_eq!(new_bundle.trust_pem(), trust);

        // Old bundle (a sidecar whose mount is not refreshed) -> the new certificate, through
        // the cross certificate; new bundle -> old and new certificates.
        assert!(verifies(
            &old_bundle.ca_pem,
            &new_bundle.cert_chain_pem,
            name,
            switch
        ));
        assert!(verifies(&trust, &new_bundle.cert_chain_pem, name, switch));
        assert!(verifies(&trust, &first_part.cert_chain_pem, name, switch));
        // Without the cross certificate the old bundle would not verify the new leaf.
        let bare = text(renewed.data.as_ref().unwrap(), TLS_CRT).unwrap();
        assert!(!verifies(&old_bundle.ca_pem, &bare, name, switch));
        assert!(!verifies(
            &new_bundle.ca_pem,
            &old_bundle.cert_chain_pem,
            name,
            due
        ));
        // A second rotation waits for the transition to end.
        assert!(rotated_secret(renewed.clone(), &s, due).is_err());

        // The transition ends: the old CA and the cross certificate go.
        let later = due + to_span(DEFAULT_CA_TRANSITION);
        assert_eq!(decide(Some(&renewed), &s, later), Decision::EndTransition);
        let mut ended = renewed.clone();
        for key in [PREVIOUS_CA_CRT, CROSS_CA_CRT, CA_ROTATED_AT] {
            ended.data.as_mut().unwrap().remove(key);
        }
        let after = bundle_from_secret(&ended).unwrap();
        assert_eq!(after.previous_ca_pem, None);
        assert_eq!(after.trust_pem(), new_bundle.ca_pem);
        assert!(verifies(&after.ca_pem, &after.cert_chain_pem, name, later));
        assert_eq!(decide(Some(&ended), &s, later), Decision::Keep);
    }

    #[test]
    fn the_generated_ca_is_a_ca_and_the_serving_cert_chains_to_it_with_every_san() {
        let s = settings();
        let (ca_pem, ca_key) = generate_ca(s.ca_validity, now()).unwrap();
        let ca_der = first_cert(&ca_pem).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        assert_eq!(
            asn1_time(ca.validity().not_after),
            now() + to_span(DEFAULT_CA_VALIDITY)
        );

        let (cert, _key, not_after) =
            issue_serving(&ca_pem, &ca_key, &s.sans, s.serving_validity, now()).unwrap();
        assert_eq!(not_after, now() + to_span(90 * DAY));
        let der = first_cert(&cert).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!leaf.is_ca());
        assert_eq!(leaf.issuer(), ca.subject());
        leaf.verify_signature(Some(ca.public_key())).unwrap();
        assert_eq!(missing_san(&leaf, &s.sans), None);
        let names = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::DNSName("byok-operator.ns.svc")));
        let listed = leaf_sans(&cert);
        assert!(
            listed.contains(&"byok-operator.ns.svc".to_owned()),
            "{listed:?}"
        );
        assert!(listed.contains(&"127.0.0.1".to_owned()), "{listed:?}");
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert!(
            !names.contains(&GeneralName::DNSName("127.0.0.1")),
            "IPs are IP SANs"
        );
        assert_eq!(
            missing_san(&leaf, &["other.example".into()]),
            Some("other.example".into())
        );
    }

    #[test]
    fn a_serving_cert_never_outlives_its_ca() {
        let (ca_pem, ca_key) = generate_ca(10 * DAY, now()).unwrap();
        let (_, _, not_after) =
            issue_serving(&ca_pem, &ca_key, &["a.example".into()], 90 * DAY, now()).unwrap();
        assert_eq!(not_after, now() + to_span(10 * DAY));
    }

    #[test]
    fn decision_table() {
        let s = settings();
        assert_eq!(decide(None, &s, now()), Decision::Create);

        let fresh = stored(&s, now());
        assert_eq!(decide(Some(&fresh), &s, now()), Decision::Keep);
        // 59 days on, 31 left: still fresh. 61 days on, 29 left: due.
        assert_eq!(
            decide(Some(&fresh), &s, now() + to_span(59 * DAY)),
            Decision::Keep
        );
        assert!(matches!(
            decide(Some(&fresh), &s, now() + to_span(61 * DAY)),
            Decision::Renew(RenewReason::Expiring { .. })
        ));
        // Long expired: still renewed from the same CA.
        assert!(matches!(
            decide(Some(&fresh), &s, now() + to_span(400 * DAY)),
            Decision::Renew(RenewReason::Expiring { .. })
        ));

        let mut wider = s.clone();
        wider.sans.push("10.0.0.7".into());
        assert_eq!(
            decide(Some(&fresh), &wider, now()),
            Decision::Renew(RenewReason::MissingSan("10.0.0.7".into()))
        );
        // Fewer SANs than the certificate carries is fine.
        let mut narrower = s.clone();
        narrower.sans.truncate(1);
        assert_eq!(decide(Some(&fresh), &narrower, now()), Decision::Keep);

        let other = stored(&s, now());
        let mut foreign = fresh.clone();
        set(&mut foreign, TLS_CRT, &get(&other, TLS_CRT));
        set(&mut foreign, TLS_KEY, &get(&other, TLS_KEY));
        assert_eq!(
            decide(Some(&foreign), &s, now()),
            Decision::Renew(RenewReason::NotSignedByCa)
        );

        let mut mismatched = fresh.clone();
        set(&mut mismatched, TLS_KEY, &get(&other, TLS_KEY));
        assert_eq!(
            decide(Some(&mismatched), &s, now()),
            Decision::Renew(RenewReason::KeyMismatch)
        );

        let mut garbled_leaf = fresh.clone();
        set(
            &mut garbled_leaf,
            TLS_CRT,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        assert_eq!(
            decide(Some(&garbled_leaf), &s, now()),
            Decision::Renew(RenewReason::Unparsable)
        );

        let mut no_leaf = fresh.clone();
        no_leaf.data.as_mut().unwrap().remove(TLS_CRT);
        assert_eq!(
            decide(Some(&no_leaf), &s, now()),
            Decision::Renew(RenewReason::Missing)
        );
    }

    #[test]
    fn an_unusable_ca_is_an_error_not_a_new_ca() {
        let s = settings();
        let fresh = stored(&s, now());
        let other = stored(&s, now());

        let mut garbled = fresh.clone();
        set(
            &mut garbled,
            CA_KEY,
            "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
        );
        let Decision::UnusableCa(reason) = decide(Some(&garbled), &s, now()) else {
            panic!("a garbled CA key must not be replaced");
        };
        assert!(reason.contains(CA_KEY), "{reason}");
        assert!(
            !reason.contains("not a key"),
            "the key's text stays out: {reason}"
        );

        let mut missing = fresh.clone();
        missing.data.as_mut().unwrap().remove(CA_KEY);
        assert!(matches!(
            decide(Some(&missing), &s, now()),
            Decision::UnusableCa(_)
        ));

        let mut wrong_key = fresh.clone();
        set(&mut wrong_key, CA_KEY, &get(&other, CA_KEY));
        assert!(matches!(
            decide(Some(&wrong_key), &s, now()),
            Decision::UnusableCa(_)
        ));

        // A leaf in ca.crt is not a CA.
        let mut not_ca = fresh.clone();
        set(&mut not_ca, CA_CRT, &get(&fresh, TLS_CRT));
        set(&mut not_ca, CA_KEY, &get(&fresh, TLS_KEY));
        assert!(matches!(
            decide(Some(&not_ca), &s, now()),
            Decision::UnusableCa(_)
        ));

        let empty = Secret::default();
        assert!(matches!(
            decide(Some(&empty), &s, now()),
            Decision::UnusableCa(_)
        ));

        assert!(matches!(
            decide(Some(&fresh), &s, now() + to_span(11 * 365 * DAY)),
            Decision::UnusableCa(_)
        ));
    }

    #[test]
    fn a_renewed_cert_comes_from_the_stored_ca_and_is_then_kept() {
        let s = settings();
        let mut secret = stored(&s, now());
        let later = now() + to_span(70 * DAY);
        assert!(matches!(
            decide(Some(&secret), &s, later),
            Decision::Renew(_)
        ));
        let data = secret.data.as_ref().unwrap();
        let ca_key = SecretString::from(get(&secret, CA_KEY));
        let (cert, key, _) = issue_serving(
            &text(data, CA_CRT).unwrap(),
            &ca_key,
            &s.sans,
            s.serving_validity,
            later,
        )
        .unwrap();
        set(&mut secret, TLS_CRT, &cert);
        set(&mut secret, TLS_KEY, key.expose_secret());
        assert_eq!(decide(Some(&secret), &s, later), Decision::Keep);
        let bundle = bundle_from_secret(&secret).unwrap();
        assert_eq!(bundle.not_after, later + to_span(90 * DAY));
    }

    #[test]
    fn bundle_debug_and_errors_hide_the_key() {
        let s = settings();
        let secret = stored(&s, now());
        let bundle = bundle_from_secret(&secret).unwrap();
        let debug = format!("{bundle:?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(!debug.contains(&get(&secret, TLS_KEY)[40..80]), "{debug}");

        let garbage =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n";
        let err = bundle_from_parts(
            get(&secret, CA_CRT),
            get(&secret, TLS_CRT),
            SecretString::from(garbage),
        )
        .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("c2VjcmV0"), "{err:?}");

        let other = stored(&s, now());
        let err = bundle_from_parts(
            get(&secret, CA_CRT),
            get(&secret, TLS_CRT),
            SecretString::from(get(&other, TLS_KEY)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn settings_that_would_renew_forever_are_refused() {
        let mut s = settings();
        s.renew_before = s.serving_validity;
        assert!(s.validate().is_err());
        let mut s = settings();
        s.sans.clear();
        assert!(s.validate().is_err());
        assert!(settings().validate().is_ok());
    }
}
