//! Serving with a certificate that can change under a running server: the resolver holds the
//! current key, and two loops swap in a new one (from the Secret, or from mounted files).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::certs::{self, Bundle, CA_CRT, CertError, CertSettings, TLS_CRT, TLS_KEY};

struct Current {
    key: Arc<CertifiedKey>,
    ca_pem: String,
    chain_pem: String,
}

/// The certificate a TLS server presents, replaceable while it runs: handshakes after
/// [`ReloadableCert::replace`] get the new one, connections already open keep theirs.
pub struct ReloadableCert {
    current: RwLock<Current>,
}

impl std::fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableCert").finish_non_exhaustive()
    }
}

fn certified_key(bundle: &Bundle) -> Result<Current, CertError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(bundle.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| CertError::Invalid("the certificate chain does not parse".into()))?;
    if chain.is_empty() {
        return Err(CertError::Invalid("the certificate chain is empty".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(bundle.key.expose_secret().as_bytes())
        .map_err(|_| CertError::Invalid("the private key does not parse".into()))?;
    let key = CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| CertError::Invalid(format!("the key does not fit the certificate: {e}")))?;
    Ok(Current {
        key: Arc::new(key),
        ca_pem: bundle.ca_pem.clone(),
        chain_pem: bundle.cert_chain_pem.clone(),
    })
}

impl ReloadableCert {
    pub fn new(bundle: &Bundle) -> Result<Self, CertError> {
        Ok(Self {
            current: RwLock::new(certified_key(bundle)?),
        })
    }

    /// Serves `bundle` from the next handshake on. A bundle whose key does not fit its
    /// certificate is refused and the old one stays.
    pub fn replace(&self, bundle: &Bundle) -> Result<(), CertError> {
        let next = certified_key(bundle)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// Whether `bundle` has the certificates being served now.
    pub fn serves(&self, bundle: &Bundle) -> bool {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.chain_pem == bundle.cert_chain_pem && current.ca_pem == bundle.ca_pem
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// TLS 1.2 and 1.3 with ring, no client authentication, h2 and http/1.1.
pub fn server_config(resolver: Arc<ReloadableCert>) -> ServerConfig {
    let mut config = builder().with_no_client_auth().with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// [`server_config`] that also requires a client certificate issued by a CA of `client_ca_pem`
/// (the webhook's, when the API server is configured to present one: see `docs/security.md`).
pub fn server_config_with_client_ca(
    resolver: Arc<ReloadableCert>,
    client_ca_pem: &str,
) -> Result<ServerConfig, CertError> {
    let invalid = |what: String| CertError::Invalid(format!("the webhook's client CA: {what}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| invalid(e.to_string()))?;
        roots.add(cert).map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no certificate in it".to_owned()));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| invalid(e.to_string()))?;
    let mut config = builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn builder() -> rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier> {
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // Fixed inputs: ring implements both versions, so this cannot fail.
        .expect("ring supports TLS 1.2 and 1.3")
}

/// Every `settings.check_every`, makes sure the Secret is current ([`certs::ensure`]) and
/// serves what it holds; `on_change` hears of each new bundle (to update the caBundle).
/// Errors are logged and retried at the next check. Runs until dropped.
pub async fn keep_current(
    api: Api<Secret>,
    settings: CertSettings,
    resolver: Arc<ReloadableCert>,
    recheck: Arc<tokio::sync::Notify>,
    on_change: impl Fn(&Bundle),
) {
    let period = settings.check_every.max(Duration::from_secs(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = recheck.notified() => {}
        }
        let bundle = match certs::ensure(&api, &settings).await {
            Ok(bundle) => bundle,
            Err(e) => {
                tracing::warn!(error = %e, "checking the serving certificate; retrying");
                continue;
            }
        };
        if resolver.serves(&bundle) {
            continue;
        }
        match resolver.replace(&bundle) {
            Ok(()) => {
                tracing::info!(not_after = %bundle.not_after, "serving a new certificate");
                on_change(&bundle);
            }
            Err(e) => tracing::warn!(error = %e, "the new serving certificate is unusable"),
        }
    }
}

/// Reads a mounted certificate (e.g. cert-manager's): `tls.crt` (leaf first), `tls.key`, and
/// `ca.crt` if present, else the last certificate of the chain.
pub fn load_dir(dir: &Path) -> Result<Bundle, CertError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let chain = read(TLS_CRT)?;
    let key = SecretString::from(read(TLS_KEY)?);
    let ca = match read(CA_CRT) {
        Ok(ca) if !ca.trim().is_empty() => ca,
        Ok(_) => last_cert_pem(&chain)?,
        Err(CertError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            last_cert_pem(&chain)?
        }
        Err(e) => return Err(e),
    };
    certs::bundle_from_parts(ca, chain, key)
}

fn last_cert_pem(chain: &str) -> Result<String, CertError> {
    let last = CertificateDer::pem_slice_iter(chain.as_bytes())
        .filter_map(Result::ok)
        .last()
        .ok_or_else(|| CertError::Invalid(format!("{TLS_CRT} holds no certificate")))?;
    Ok(der_to_pem(&last))
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A digest of the mounted files, to notice a change without keeping key bytes around.
fn dir_digest(dir: &Path) -> [u8; 32] {
    let mut hash = Sha256::new();
    for name in [TLS_CRT, TLS_KEY, CA_CRT] {
        let bytes = std::fs::read(dir.join(name)).unwrap_or_default();
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(&bytes);
    }
    hash.finalize().into()
}

/// Polls the mounted files every `check_every` and serves them when they change. A half-
/// updated set (a key that does not fit the certificate) is logged and tried again next time.
/// The operator does not touch the caBundle in this mode: whoever issues the files does.
pub async fn keep_dir_current(
    dir: PathBuf,
    resolver: Arc<ReloadableCert>,
    check_every: Duration,
    on_change: impl Fn(&Bundle) + Send + 'static,
) {
    let period = check_every.max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<[u8; 32]> = None;
    loop {
        ticks.tick().await;
        let dir2 = dir.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let digest = dir_digest(&dir2);
            (digest, load_dir(&dir2))
        })
        .await;
        let Ok((digest, loaded)) = loaded else {
            continue;
        };
        if Some(digest) == seen {
            continue;
        }
        match loaded {
            Ok(bundle) if resolver.serves(&bundle) => {
                on_change(&bundle);
                seen = Some(digest);
            }
            Ok(bundle) => match resolver.replace(&bundle) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), not_after = %bundle.not_after, "serving the new mounted certificate");
                    on_change(&bundle);
                    seen = Some(digest);
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "the mounted certificate is unusable; retrying")
                }
            },
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "reading the mounted certificate; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
    use rustls_pki_types::ServerName;

    fn bundle(sans: &[&str]) -> Bundle {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let now = Timestamp::now();
        let (ca_pem, ca_key) = certs::generate_ca(certs::DEFAULT_CA_VALIDITY, now).unwrap();
        let (cert, key, _) = certs::issue_serving(
            &ca_pem,
            &ca_key,
            &sans,
            certs::DEFAULT_SERVING_VALIDITY,
            now,
        )
        .unwrap();
        certs::bundle_from_parts(ca_pem, cert, key).unwrap()
    }

    /// A full in-memory handshake against `server`, trusting only `ca_pem`; the leaf served.
    fn handshake(
        server: &Arc<ServerConfig>,
        ca_pem: &str,
        name: &str,
    ) -> Result<CertificateDer<'static>, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut client = ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(name.to_string()).unwrap(),
        )?;
        let mut server = ServerConnection::new(server.clone())?;
        for _ in 0..20 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
        }
        assert!(!client.is_handshaking(), "handshake did not finish");
        Ok(client.peer_certificates().unwrap()[0].clone())
    }

    fn leaf(bundle: &Bundle) -> CertificateDer<'static> {
        certs::first_cert(&bundle.cert_chain_pem).unwrap()
    }

    #[test]
    fn after_replace_new_handshakes_get_the_new_certificate() {
        let first = bundle(&["webhook.ns.svc", "127.0.0.1"]);
        let second = bundle(&["webhook.ns.svc", "127.0.0.1"]);
        let resolver = Arc::new(ReloadableCert::new(&first).unwrap());
        let config = Arc::new(server_config(resolver.clone()));
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        assert_eq!(
            handshake(&config, &first.ca_pem, "webhook.ns.svc").unwrap(),
            leaf(&first)
        );
        assert_eq!(
            handshake(&config, &first.ca_pem, "127.0.0.1").unwrap(),
            leaf(&first)
        );
        assert!(handshake(&config, &second.ca_pem, "webhook.ns.svc").is_err());

        assert!(resolver.serves(&first) && !resolver.serves(&second));
        resolver.replace(&second).unwrap();
        assert!(resolver.serves(&second));
        assert_eq!(
            handshake(&config, &second.ca_pem, "webhook.ns.svc").unwrap(),
            leaf(&second)
        );
        assert!(handshake(&config, &first.ca_pem, "webhook.ns.svc").is_err());
    }

    #[test]
    fn a_key_that_does_not_fit_is_refused_and_the_old_certificate_stays() {
        let first = bundle(&["a.example"]);
        let other = bundle(&["a.example"]);
        let resolver = ReloadableCert::new(&first).unwrap();
        let broken = Bundle {
            key: other.key.clone(),
            ..first.clone()
        };
        let err = resolver.replace(&broken).unwrap_err();
        assert!(!err.to_string().contains("PRIVATE"), "{err}");
        assert!(resolver.serves(&first));
        assert!(format!("{resolver:?}").len() < 40);
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "byok-certs-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn load_dir_reads_mounted_files_and_falls_back_to_the_chain_for_the_ca() {
        let b = bundle(&["a.example"]);
        let dir = temp_dir("load");
        std::fs::write(
            dir.join(TLS_CRT),
            format!("{}{}", b.cert_chain_pem, b.ca_pem),
        )
        .unwrap();
        std::fs::write(dir.join(TLS_KEY), b.key.expose_secret()).unwrap();

        let loaded = load_dir(&dir).unwrap();
        assert_eq!(
            certs::first_cert(&loaded.ca_pem),
            certs::first_cert(&b.ca_pem),
            "no ca.crt: the last certificate of the chain"
        );
        assert_eq!(loaded.not_after, b.not_after);

        let other = bundle(&["a.example"]);
        std::fs::write(dir.join(CA_CRT), &other.ca_pem).unwrap();
        assert_eq!(load_dir(&dir).unwrap().ca_pem, other.ca_pem);

        std::fs::remove_file(dir.join(TLS_KEY)).unwrap();
        let err = load_dir(&dir).unwrap_err();
        assert!(err.to_string().contains(TLS_KEY), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_dir_loop_serves_files_that_change() {
        let first = bundle(&["a.example"]);
        let second = bundle(&["a.example"]);
        let dir = temp_dir("watch");
        let write = |b: &Bundle| {
            std::fs::write(dir.join(TLS_CRT), &b.cert_chain_pem).unwrap();
            std::fs::write(dir.join(TLS_KEY), b.key.expose_secret()).unwrap();
            std::fs::write(dir.join(CA_CRT), &b.ca_pem).unwrap();
        };
        write(&first);
        let resolver = Arc::new(ReloadableCert::new(&load_dir(&dir).unwrap()).unwrap());
        let task = tokio::spawn(keep_dir_current(
            dir.clone(),
            resolver.clone(),
            Duration::from_millis(100),
            |_: &Bundle| {},
        ));
        write(&second);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !resolver.serves(&second) {
            assert!(
                std::time::Instant::now() < deadline,
                "the new files were not picked up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
        }
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
