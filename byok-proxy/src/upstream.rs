//! The connection pool to providers: hyper's client over rustls, kept alive, HTTP/2 where the
//! provider offers it (ALPN), with the egress policy the broker sent applied to every address
//! dialled. One pool per distinct policy (in practice one per process).
//!
//! The policy is enforced where connections are opened ([`Dial`]): the name is resolved, the
//! addresses the policy refuses are dropped, and only what is left is dialled, so a name that
//! resolves (or re-resolves, DNS rebinding) to a loopback, private, link-local or metadata
//! address is never connected to. Raw IP hosts are judged the same way (and refused earlier,
//! by `live::Live::from_grant`, unless the policy allows private addresses).
//!
//! With the operator's `--egress-proxy` the same check runs on the target before the
//! `CONNECT`; a name this resolver cannot resolve is left to the proxy.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

use crate::grant::Egress;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends: the client's, streamed, or one it rewrote.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type Client = hyper_util::client::legacy::Client<HttpsConnector<Dial>, Body>;

/// Connect timeout to a provider or the egress proxy (TCP, and CONNECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// The longest answer to CONNECT read from an egress proxy.
const MAX_CONNECT_RESPONSE: usize = 8 * 1024;

/// Fixed answers instead of DNS (tests).
pub type FixedHosts = Arc<HashMap<String, Vec<SocketAddr>>>;

/// The egress proxy sidecars tunnel through (`CONNECT host:port`).
#[derive(Clone)]
struct TunnelVia {
    host: String,
    port: u16,
    /// `Proxy-Authorization` value, marked sensitive.
    authorization: Option<http::HeaderValue>,
}

/// Opens TCP connections to providers: resolves the name, drops the addresses the policy
/// refuses, and dials what is left, directly or through the egress proxy.
#[derive(Clone)]
pub struct Dial {
    filter: bool,
    fixed: Option<FixedHosts>,
    via: Option<TunnelVia>,
}

type Dialling = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl Dial {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(ip) = crate::egress::ip_literal(host) {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        match &self.fixed {
            Some(map) => Ok(map.get(host).cloned().unwrap_or_default()),
            None => Ok(tokio::net::lookup_host((host, port)).await?.collect()),
        }
    }

    async fn dial(self, uri: Uri) -> Result<TokioIo<TcpStream>, BoxError> {
        let host = uri.host().ok_or("the request has no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let target = match self.resolve(&host, port).await {
            Ok(addrs) if self.filter => Some(crate::egress::filter_addrs(&host, addrs)?),
            Ok(addrs) => Some(addrs),
            // Through a proxy, a name only the proxy can resolve is its to judge.
            Err(_) if self.via.is_some() => None,
            Err(e) => return Err(e.into()),
        };
        let stream = match &self.via {
            None => connect_any(&target.unwrap_or_default()).await?,
            Some(via) => {
                // The proxy itself is the admin's choice: its address is not filtered.
                let proxies = self.resolve(&via.host, via.port).await?;
                let mut stream = connect_any(&proxies).await?;
                let authority = crate::egress::authority(&host, port);
                tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tunnel(&mut stream, &authority, via.authorization.as_ref()),
                )
                .await
                .map_err(|_| "the egress proxy did not answer CONNECT in time")??;
                stream
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }
}

impl tower::Service<Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Dialling;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Dialling {
        Box::pin(self.clone().dial(uri))
    }
}

/// Connects to the first address that answers, each within the connect timeout.
async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, BoxError> {
    let mut last: Option<BoxError> = None;
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Some(e.into()),
            Err(_) => last = Some("connect timed out".into()),
        }
    }
    Err(last.unwrap_or_else(|| "no address to connect to".into()))
}

/// Asks the proxy for a tunnel to `authority`; Ok once it answered 2xx.
async fn tunnel(
    stream: &mut TcpStream,
    authority: &str,
    authorization: Option<&http::HeaderValue>,
) -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
    if let Some(auth) = authorization {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    stream.write_all(&request).await?;
    let mut answer = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the blank line may be consumed (it is the TLS handshake).
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= MAX_CONNECT_RESPONSE {
            return Err("the egress proxy's answer to CONNECT is too long".into());
        }
        if stream.read(&mut byte).await? == 0 {
            return Err("the egress proxy closed the connection during CONNECT".into());
        }
        answer.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&answer);
    let status_line = status_line.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') || code.len() != 3 {
        let shown: String = status_line.chars().take(80).collect();
        return Err(format!("the egress proxy refused the tunnel: {shown:?}").into());
    }
    Ok(())
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

/// Builds the pools for `egress`, one per worker; `fixed` replaces DNS (tests only).
pub fn build(
    egress: &Egress,
    workers: usize,
    fixed: Option<FixedHosts>,
) -> anyhow::Result<Upstream> {
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

    let via = match &egress.proxy_url {
        None => None,
        Some(url) => {
            let proxy = crate::egress::EgressProxy::parse(&url.0).map_err(anyhow::Error::msg)?;
            let authorization = proxy.credentials().map(|(user, pass)| {
                use base64::Engine;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                let mut v = http::HeaderValue::from_str(&format!("Basic {token}"))
                    .unwrap_or_else(|_| http::HeaderValue::from_static(""));
                v.set_sensitive(true);
                v
            });
            let (host, port) = proxy.host_port();
            Some(TunnelVia {
                host,
                port,
                authorization,
            })
        }
    };
    let dial = Dial {
        filter: !egress.allow_private_addresses,
        fixed,
        via,
    };
    let client = || {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(dial.clone());
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .build(https)
    };
    Ok(Upstream {
        per_worker: (0..workers.max(1)).map(|_| client()).collect(),
    })
}

thread_local! {
    /// The worker thread this is (0 outside workers: tests, the control thread).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as worker `index` (see `workers.rs`).
pub fn pin_to_worker(index: usize) {
    WORKER.set(index);
}

/// A key's way to its provider: one connection pool per worker thread. A connection's task
/// runs on the thread that opened it, so a request sent on a connection its own thread
/// opened never wakes another thread: with one pool shared by all workers, a request on
/// worker A over a connection worker B opened cost two thread wake-ups (a futex each) and
/// the request bounced between threads.
#[derive(Clone)]
pub struct Upstream {
    per_worker: Arc<[Client]>,
}

impl Upstream {
    /// The calling worker's pool.
    pub fn client(&self) -> &Client {
        let at = WORKER.get() % self.per_worker.len();
        &self.per_worker[at]
    }
}

/// One set of pools per distinct egress policy, shared by every key of the pod.
pub struct Pools {
    pools: Mutex<HashMap<Egress, Upstream>>,
    workers: usize,
    fixed: Option<FixedHosts>,
}

impl Pools {
    /// Pools for `workers` worker threads.
    pub fn new(workers: usize) -> Self {
        Self {
            pools: Mutex::default(),
            workers,
            fixed: None,
        }
    }

    #[cfg(test)]
    pub fn with_fixed_hosts(fixed: FixedHosts) -> Self {
        Self {
            fixed: Some(fixed),
            ..Self::new(1)
        }
    }

    pub fn get(&self, egress: &Egress) -> anyhow::Result<Upstream> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(upstream) = pools.get(egress) {
            return Ok(upstream.clone());
        }
        let upstream = build(egress, self.workers, self.fixed.clone())?;
        pools.insert(egress.clone(), upstream.clone());
        Ok(upstream)
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
        let upstream = pools.get(&Egress::default()).expect("client");
        let client = upstream.client();
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

    /// A loopback stand-in for an egress proxy: records each request head, answers 403.
    async fn refusing_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                while !buf.ends_with(b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let _ = s
                    .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        (addr, heads)
    }

    fn post(uri: &str) -> http::Request<Body> {
        http::Request::post(uri)
            .body(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .expect("request")
    }

    #[tokio::test]
    async fn the_egress_proxy_gets_a_connect_with_credentials() {
        let (proxy, heads) = refusing_proxy().await;
        // A public address the test never dials: the tunnel goes through the proxy.
        let fixed: FixedHosts = Arc::new(HashMap::from([(
            "provider.test".to_owned(),
            vec!["8.8.8.8:443".parse().expect("addr")],
        )]));
        let egress = Egress {
            proxy_url: Some(super::super::grant::ProxyUrl(format!(
                "http://byok:s3cret@{proxy}"
            ))),
            ..Egress::default()
        };
        let upstream = build(&egress, 1, Some(fixed)).expect("client");
        let client = upstream.client();
        let err = client
            .request(post("https://provider.test/v1/messages"))
            .await
            .expect_err("refused");
        let chain = format!("{:?}", err);
        assert!(chain.contains("refused the tunnel"), "{chain}");
        let heads = heads.lock().expect("lock").clone();
        assert_eq!(heads.len(), 1, "{heads:?}");
        assert!(
            heads[0].starts_with("CONNECT provider.test:443 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        // base64("byok:s3cret")
        assert!(
            heads[0].contains("Proxy-Authorization: Basic YnlvazpzM2NyZXQ="),
            "{}",
            heads[0]
        );
    }

    #[tokio::test]
    async fn a_forbidden_target_is_refused_before_the_connect() {
        let (proxy, heads) = refusing_proxy().await;
        let fixed: FixedHosts = Arc::new(HashMap::from([(
            "provider.test".to_owned(),
            vec!["10.0.0.7:443".parse().expect("addr")],
        )]));
        let egress = Egress {
            proxy_url: Some(super::super::grant::ProxyUrl(format!("http://{proxy}"))),
            ..Egress::default()
        };
        let upstream = build(&egress, 1, Some(fixed)).expect("client");
        let client = upstream.client();
        let err = client
            .request(post("https://provider.test/"))
            .await
            .expect_err("refused");
        assert_eq!(rejected_address(&err).map(|r| r.class), Some("private"));
        assert!(
            heads.lock().expect("lock").is_empty(),
            "the proxy was asked"
        );
    }
}
