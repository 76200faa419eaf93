//! `hop`: the proxy bench's reference of what a minimal Rust hop can do (see
//! `bench_proxy/mod.rs`). One multi-thread runtime (`HOP_WORKERS`, 2), hyper 1 HTTP/1.1 on a
//! loopback port, one pooled keep-alive client (hyper-rustls) to the provider; every request
//! has the provider's auth header set (`HOP_HEADER` = `HOP_KEY`) and `authorization`
//! removed, and its path appended to the upstream base URL. No checks, no log, no metrics.
//!
//! Usage: `HOP_KEY=... hop LISTEN_ADDR UPSTREAM_BASE_URL CA_PEM_FILE`

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

struct Hop {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Incoming>,
    base: String,
    header: HeaderName,
    value: HeaderValue,
}

impl Hop {
    async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<http::Response<Body>, BoxError> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(format!("{}{path}", self.base))?;
        parts.headers.remove(http::header::HOST);
        parts.headers.remove(http::header::AUTHORIZATION);
        parts
            .headers
            .insert(self.header.clone(), self.value.clone());
        let res = self
            .client
            .request(Request::from_parts(parts, body))
            .await?;
        Ok(res.map(|b| b.map_err(BoxError::from).boxed_unsync()))
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: hop LISTEN_ADDR UPSTREAM_BASE_URL CA_PEM_FILE"
    );
    let listen: SocketAddr = args[1].parse()?;
    let base = args[2].trim_end_matches('/').to_owned();
    let pem = std::fs::read(&args[3])?;
    let key = std::env::var("HOP_KEY").unwrap_or_default();
    let header = std::env::var("HOP_HEADER").unwrap_or_else(|_| "x-api-key".into());
    let workers: usize = std::env::var("HOP_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);

    let client = byok_e2e::pki::https_h1_client(&pem)?;
    let mut value = HeaderValue::from_str(&key)?;
    value.set_sensitive(true);
    let hop = Arc::new(Hop {
        client,
        base,
        header: HeaderName::try_from(header)?,
        value,
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let hop = hop.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| hop.clone().serve(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
