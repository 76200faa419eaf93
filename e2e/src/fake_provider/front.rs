//! The fake provider's HTTP/2 front ([`super::FakeProviderConfig::http2`]).
//!
//! Real providers answer over HTTP/2 when a client offers it (ALPN), and so does the
//! sidecar's pool: its h2 upstream path needs a provider that speaks h2. actix-web speaks
//! only HTTP/1.1 here: its `http2` feature would also switch on h2 in the operator's own
//! servers, which share the crate in the workspace's test builds but not in the shipped one.
//! So this front terminates TLS (ALPN `h2`, `http/1.1`, the fake's own certificate), serves
//! both with hyper, and passes each request on to the actix server over HTTP/1.1 and TLS,
//! streaming both bodies frame by frame: an SSE event leaves as soon as actix hands it over,
//! and a client that resets its stream drops the request to actix, which stops generating.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Shared;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Connection-specific headers: never passed between the HTTP/2 and HTTP/1.1 sides.
const CONNECTION_HEADERS: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

pub(crate) struct Front {
    tls: tokio_rustls::TlsAcceptor,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Incoming>,
    /// `https://127.0.0.1:PORT`, the actix server.
    internal: String,
}

impl Front {
    /// A front for the actix server at `internal`, presenting `tls` (its ALPN is set here)
    /// and trusting `ca_pem` on the way in.
    pub(crate) fn new(
        mut tls: rustls::ServerConfig,
        ca_pem: &str,
        internal: SocketAddr,
    ) -> anyhow::Result<Self> {
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Front {
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            client: crate::pki::https_h1_client(ca_pem.as_bytes())?,
            internal: format!("https://{internal}"),
        })
    }

    /// Serves one accepted connection from `peer` until it closes.
    pub(crate) async fn serve(
        self: Arc<Self>,
        inbound: tokio::net::TcpStream,
        peer: SocketAddr,
        shared: Arc<Shared>,
    ) {
        let _ = inbound.set_nodelay(true);
        let Ok(tls) = self.tls.accept(inbound).await else {
            return;
        };
        let service =
            hyper::service::service_fn(move |req| self.clone().pass(req, peer, shared.clone()));
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service)
            .await;
    }

    async fn pass(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        shared: Arc<Shared>,
    ) -> Result<Response<Body>, Infallible> {
        if req.version() == Version::HTTP_2 {
            shared.http2_requests.fetch_add(1, Ordering::SeqCst);
        }
        // The admin API is for loopback clients; behind the front actix sees only the
        // front's own (loopback) address, so the front judges.
        if req.uri().path().starts_with("/__fake") && !peer.ip().is_loopback() {
            return Ok(answer(StatusCode::FORBIDDEN, ""));
        }
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().map(ToString::to_string);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match format!("{}{path}", self.internal).parse() {
            Ok(uri) => uri,
            Err(_) => return Ok(answer(StatusCode::BAD_REQUEST, "bad path")),
        };
        parts.version = Version::HTTP_11;
        if let Some(authority) = authority.filter(|_| !parts.headers.contains_key(header::HOST))
            && let Ok(host) = HeaderValue::from_str(&authority)
        {
            parts.headers.insert(header::HOST, host);
        }
        for name in CONNECTION_HEADERS {
            parts.headers.remove(name);
        }
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(res) => {
                let (mut parts, body) = res.into_parts();
                for name in CONNECTION_HEADERS {
                    parts.headers.remove(name);
                }
                Ok(Response::from_parts(parts, body.boxed_unsync()))
            }
            Err(e) => Ok(answer(
                StatusCode::BAD_GATEWAY,
                &format!("the fake's front could not reach its server: {e}"),
            )),
        }
    }
}

fn answer(status: StatusCode, text: &str) -> Response<Body> {
    let mut res = Response::new(
        Full::new(Bytes::from(text.to_owned()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *res.status_mut() = status;
    res
}
