//! The connection pool to providers: hyper's client over rustls, kept alive, HTTP/2 where the
//! provider offers it (ALPN), with the egress policy the broker sent applied to every address
//! dialled. One pool per distinct policy (in practice one per process).
//!
//! The policy is enforced in the resolver: hyper dials exactly the addresses it returns, so
//! a name that resolves (or re-resolves, DNS rebinding) to a loopback, private, link-local or
//! metadata address is never connected to. A raw IP host never reaches a resolver; the grant
//! check ([`super::grant::Live::from_grant`]) refuses those unless the policy allows private
//! addresses.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::grant::Egress;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends: the client's, streamed, or one it rewrote.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type Client = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector<Resolver>>, Body>;

/// Connect timeout to a provider (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Fixed answers instead of DNS (tests).
pub type FixedHosts = Arc<HashMap<String, Vec<SocketAddr>>>;

/// The system resolver, with forbidden addresses dropped unless the policy allows them.
#[derive(Clone)]
pub struct Resolver {
    filter: bool,
    fixed: Option<FixedHosts>,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, BoxError>> + Send>>;

impl tower::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Resolving {
        let filter = self.filter;
        let fixed = self.fixed.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = match fixed {
                Some(map) => map.get(&host).cloned().unwrap_or_default(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let addrs = if filter {
                crate::egress::filter_addrs(&host, addrs)?
            } else {
                addrs
            };
            Ok(addrs.into_iter())
        })
    }
}

/// The operating system's trust roots, read once.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::warn!(
                errors = found.errors.len(),
                "some system CA certificates could not be read"
            );
        }
        found.certs
    })
}

/// Builds a pool for `egress`; `fixed` replaces DNS (tests only).
pub fn build(egress: &Egress, fixed: Option<FixedHosts>) -> anyhow::Result<Client> {
    let mut roots = rustls::RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(native_roots().iter().cloned());
    if let Some(pem) = &egress.extra_ca_pem {
        let extra: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("the extra CA is not valid PEM: {e}"))?;
        anyhow::ensure!(!extra.is_empty(), "the extra CA holds no certificate");
        for cert in extra {
            roots.add(cert)?;
        }
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "no trusted CA certificates: install the system CA bundle"
    );
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new_with_resolver(Resolver {
        filter: !egress.allow_private_addresses,
        fixed,
    });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .build(https),
    )
}

/// One pool per distinct egress policy, shared by every key of the pod.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<Egress, Client>>,
    fixed: Option<FixedHosts>,
}

impl Pools {
    #[cfg(test)]
    pub fn with_fixed_hosts(fixed: FixedHosts) -> Self {
        Self {
            pools: Mutex::default(),
            fixed: Some(fixed),
        }
    }

    pub fn get(&self, egress: &Egress) -> anyhow::Result<Client> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = pools.get(egress) {
            return Ok(client.clone());
        }
        let client = build(egress, self.fixed.clone())?;
        pools.insert(egress.clone(), client.clone());
        Ok(client)
    }
}

/// The egress refusal behind a client error, if the policy caused it.
pub fn rejected_address<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a crate::egress::AddressRejected> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(rejected) = e.downcast_ref::<crate::egress::AddressRejected>() {
            return Some(rejected);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A name that resolves only to forbidden addresses is never dialled: the resolver is
    /// fixed, so even a wrong filter could only reach loopback, where nothing listens on 443
    /// in a test (and a connect failure is told apart from a policy refusal).
    #[tokio::test]
    async fn forbidden_addresses_are_never_dialled() {
        let fixed: FixedHosts = Arc::new(HashMap::from([(
            "provider.test".to_owned(),
            vec![
                "127.0.0.1:443".parse().expect("addr"),
                "169.254.169.254:443".parse().expect("addr"),
            ],
        )]));
        let pools = Pools::with_fixed_hosts(fixed);
        let client = pools.get(&Egress::default()).expect("client");
        let req = http::Request::post("https://provider.test/v1/messages")
            .body(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .expect("request");
        let err = client.request(req).await.expect_err("refused");
        let rejected = rejected_address(&err).expect("refused by the policy");
        assert_eq!(rejected.host, "provider.test");
        assert!(!err.to_string().contains("169.254"));
    }
}
