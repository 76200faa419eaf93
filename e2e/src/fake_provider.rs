//! A fake LLM provider for tests, benchmarks and `make run`: one HTTPS server that speaks
//! each provider's real wire protocol, for the key-verification call and for generation
//! (plain and streamed), with each provider under its own path prefix. The contract it
//! implements, and what it checks, is `docs/providers.md` ("The fake provider"); change the
//! two together.
//!
//! | provider | base URL (what the operator is given) | generation endpoints (under the prefix) |
//! |---|---|---|
//! | anthropic | `https://127.0.0.1:PORT/anthropic` | `POST /v1/messages`, `POST /v1/messages/count_tokens` |
//! | openai | `https://127.0.0.1:PORT/openai/v1` | `POST /v1/chat/completions`, `POST /v1/responses`, `POST /v1/embeddings` |
//! | google (Gemini) | `https://127.0.0.1:PORT/google` | `POST /{v1beta,v1}/models/{model}:{generateContent,streamGenerateContent,countTokens,embedContent}` |
//! | azure | `https://127.0.0.1:PORT/azure` | `POST /openai/deployments/{deployment}/chat/completions?api-version=…`, `POST /openai/v1/chat/completions` |
//! | openai-compatible | `https://127.0.0.1:PORT/compat/v1` | as openai |
//! | vertex (aiplatform) | `https://127.0.0.1:PORT/vertex` | `POST /{v1,v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{model}:{generateContent,streamGenerateContent,countTokens}` |
//! | vertex token URL | `https://127.0.0.1:PORT/vertex-token/token` | |
//!
//! # Runtime
//!
//! [`FakeProvider::start`] runs the whole server on a dedicated OS thread with its own Tokio
//! runtime (actix-web's worker runs on a further thread of its own, as actix-server does under
//! plain Tokio). It therefore works the same from `#[tokio::test]` (current-thread or
//! multi-thread flavour), from `#[actix_web::test]`, and from a binary, and it keeps answering
//! even while the calling runtime is blocked. It stops when the handle is dropped, or on
//! [`FakeProvider::stop`], which also waits until the port is closed.
//!
//! # Connections
//!
//! A small TCP forwarder in front of actix-web counts every accepted TCP connection *before*
//! the TLS handshake ([`FakeProvider::connections`]), so "zero connections" really means no
//! TCP connection was made, even one whose handshake then failed. (actix-web itself listens on
//! a second, internal loopback port; connections made to that port directly are not counted.)
//! actix-web runs with `TCP_NODELAY` and without half-closed connections, so that streamed
//! events leave one by one and a client that hangs up mid-stream is noticed at once.
//!
//! # Modes
//!
//! A [`FakeMode`] other than `Normal` decides the answer of every verification and generation
//! endpoint of that provider before the request's credentials are looked at (the test asked
//! for that answer); unmatched paths still get the provider's 404. A failure mode never starts
//! a stream: the error is the whole (JSON) answer. For vertex, `Unauthorized` and
//! `GeminiKeyInvalid` fail the token endpoint (401 `invalid_client`) and the aiplatform calls
//! (401 `UNAUTHENTICATED`); the rate-limit and server modes let the token exchange succeed and
//! fail the aiplatform calls; `Slow` delays them all.
//!
//! # Streams
//!
//! A streamed answer (`"stream": true`, or Gemini's `:streamGenerateContent`) follows
//! [`FakeProvider::set_stream_plan`]: N delta events whose text is `chunk-0`, `chunk-1`, …,
//! with the plan's interval between consecutive deltas, each handed to actix as its own chunk
//! of the response body (no buffering). Each stream gets a [`StreamRecord`]: when every delta
//! was handed over, whether the last event went out (`completed`), and whether the body was
//! dropped before that (`cancelled`: the client went away). [`FakeProvider::open_streams`]
//! counts the streams in progress.
//!
//! # Recording
//!
//! Every request is counted and recorded by one middleware as a [`RecordedRequest`]: header
//! and query parameter *names*, never a value; generation handlers add the model, the
//! credential's [`FakeProvider::key_id`], the body size and the stream flag. The request log
//! and the stream log keep the newest [`LOG_CAP`] entries each;
//! [`FakeProvider::set_recording`]`(false)` turns both off for benchmarks (counters go on).
//! Non-streamed answers are formatted straight into one string, with no sleep and no
//! per-request JSON tree, so the fake can serve as a throughput benchmark's upstream.
//!
//! # Extending
//!
//! Each provider is a module with a `scope` function that configures its routes; add further
//! endpoints there. [`FakeMode`] failures are rendered by each provider's `mode_error`;
//! generation handlers report what they learnt with `note_request` / `note_key`, and stream
//! with `stream::respond`.

mod anthropic;
mod azure;
mod front;
mod google;
mod openai;
mod stream;
mod vertex;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use actix_web::HttpMessage as _;
use actix_web::dev::Service as _;
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context;
use byok_operator::providers::ProviderKind;
use rand::Rng;
use rand::distr::Alphanumeric;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::pki::TestCa;

pub use stream::StreamRecord;
pub use vertex::{
    TEST_SA_KEY_ID, TEST_SA_PRIVATE_KEY_PEM, TEST_SA_PUBLIC_KEY_PEM, test_service_account_json,
};

/// Path of the Vertex token endpoint; a JWT's `aud` must be a URL with this path.
pub const VERTEX_TOKEN_PATH: &str = "/vertex-token/token";

/// At most this many entries are kept in the request log and in the stream log each; older
/// ones are dropped first.
pub const LOG_CAP: usize = 100_000;

/// Request bodies up to this size are accepted (actix's default is 256 KiB).
pub const MAX_BODY_BYTES: usize = 128 << 20;

/// Header names recorded in [`RecordedRequest::auth_headers`] when present.
pub const AUTH_HEADER_NAMES: [&str; 5] = [
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
];

#[derive(Debug, Clone)]
pub struct FakeProviderConfig {
    /// Where to listen; port 0 picks a free one. Default 127.0.0.1:0.
    pub listen: SocketAddr,
    /// Keys accepted from the start. For [`ProviderKind::Vertex`] the "key" is a
    /// service-account JSON (see [`FakeProvider::add_service_account_json`]).
    pub valid_keys: Vec<(ProviderKind, String)>,
    /// Offer HTTP/2 (ALPN `h2`, then `http/1.1`), as real providers do. Off: HTTP/1.1 only
    /// (see `fake_provider/front.rs`).
    pub http2: bool,
}

impl Default for FakeProviderConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            valid_keys: Vec::new(),
            http2: false,
        }
    }
}

/// How a provider answers its verification and generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeMode {
    /// Real behaviour: valid keys get 200, others the provider's real rejection.
    #[default]
    Normal,
    /// 401 with the provider's body (vertex: token endpoint 401 `invalid_client`).
    Unauthorized,
    /// Gemini's 400 `API_KEY_INVALID` for google; 401 (as `Unauthorized`) for the others.
    GeminiKeyInvalid,
    /// 429 with the provider's rate-limit body and `retry-after: 1`.
    RateLimited,
    /// OpenAI's 429 `insufficient_quota` for openai and openai-compatible; `RateLimited`
    /// for the others.
    InsufficientQuota,
    /// 500 with the provider's body.
    ServerError,
    /// Anthropic 529 `overloaded_error`; 503 for the others.
    Overloaded,
    /// Sleep, then answer as in `Normal`.
    Slow(Duration),
}

impl FakeMode {
    /// The admin API's name for this mode (`slow` carries `delay_ms` separately).
    pub fn name(&self) -> &'static str {
        match self {
            FakeMode::Normal => "normal",
            FakeMode::Unauthorized => "unauthorized",
            FakeMode::GeminiKeyInvalid => "gemini-key-invalid",
            FakeMode::RateLimited => "rate-limited",
            FakeMode::InsufficientQuota => "insufficient-quota",
            FakeMode::ServerError => "server-error",
            FakeMode::Overloaded => "overloaded",
            FakeMode::Slow(_) => "slow",
        }
    }

    /// Parses an admin API mode name (kebab- or snake-case); `slow` takes `delay`.
    pub fn parse(name: &str, delay: Duration) -> Option<FakeMode> {
        Some(match name.replace('_', "-").as_str() {
            "normal" => FakeMode::Normal,
            "unauthorized" => FakeMode::Unauthorized,
            "gemini-key-invalid" => FakeMode::GeminiKeyInvalid,
            "rate-limited" => FakeMode::RateLimited,
            "insufficient-quota" => FakeMode::InsufficientQuota,
            "server-error" => FakeMode::ServerError,
            "overloaded" => FakeMode::Overloaded,
            "slow" => FakeMode::Slow(delay),
            _ => return None,
        })
    }
}

/// One request as the fake saw it. Header *names* only: never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The provider whose path prefix it hit (`None` for paths outside every prefix).
    pub provider: Option<ProviderKind>,
    pub method: String,
    /// Path without the query, e.g. `/anthropic/v1/models`.
    pub path: String,
    /// Names of the query parameters, in order (values are not recorded).
    pub query_names: Vec<String>,
    /// Which of [`AUTH_HEADER_NAMES`] were present (lower case).
    pub auth_headers: Vec<String>,
    /// All header names present (lower case, sorted, deduplicated).
    pub header_names: Vec<String>,
    /// The status answered; `None` while in flight or if the client went away first.
    pub status: Option<u16>,
    /// The model a generation request named: the body's `model`; for Gemini and Vertex the
    /// `{model}` of `models/{model}:method` in the path; for Azure's deployments API the
    /// deployment. `None` for other requests.
    pub model: Option<String>,
    /// Which credential authenticated a generation request: [`FakeProvider::key_id`] of the
    /// key (vertex: of the service-account JSON, or the public-key PEM, it was registered
    /// with). `None` when it was not authenticated, and for verification requests.
    pub key_id: Option<String>,
    /// Size of the request body a generation endpoint received (0 for other requests).
    pub body_bytes: u64,
    /// Whether the request asked for a streamed answer.
    pub stream: bool,
    /// The request's `Accept-Encoding`, as sent.
    pub accept_encoding: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct ServiceAccount {
    /// PKCS#1 `RSAPublicKey` DER.
    pub(crate) public_key: Vec<u8>,
    /// `private_key_id`, when registered from a JSON key: the JWT's `kid` must match it.
    pub(crate) key_id: Option<String>,
    /// `project_id`, when registered from a JSON key: other projects get 403.
    pub(crate) project: Option<String>,
    /// [`FakeProvider::key_id`] of the JSON key or PEM it was registered with.
    pub(crate) credential_id: String,
}

#[derive(Debug, Clone)]
pub(crate) struct IssuedToken {
    pub(crate) client_email: String,
    pub(crate) expires: std::time::Instant,
    /// The issuing account's `credential_id`.
    pub(crate) credential_id: String,
}

/// A bounded log whose entries keep their id (position since the start) when old ones are
/// dropped.
pub(crate) struct Log<T> {
    entries: VecDeque<T>,
    /// Id of `entries[0]`.
    first: u64,
}

impl<T> Default for Log<T> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            first: 0,
        }
    }
}

impl<T: Clone> Log<T> {
    pub(crate) fn push(&mut self, entry: T) -> u64 {
        if self.entries.len() >= LOG_CAP {
            self.entries.pop_front();
            self.first += 1;
        }
        self.entries.push_back(entry);
        self.first + self.entries.len() as u64 - 1
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        let index = usize::try_from(id.checked_sub(self.first)?).ok()?;
        self.entries.get_mut(index)
    }

    fn to_vec(&self) -> Vec<T> {
        self.entries.iter().cloned().collect()
    }
}

/// State shared by the handle, the forwarder and the actix worker.
pub(crate) struct Shared {
    keys: Mutex<HashSet<(ProviderKind, String)>>,
    modes: Mutex<HashMap<ProviderKind, FakeMode>>,
    pub(crate) accounts: Mutex<HashMap<String, ServiceAccount>>,
    pub(crate) tokens: Mutex<HashMap<String, IssuedToken>>,
    requests: Mutex<HashMap<ProviderKind, u64>>,
    total: AtomicU64,
    connections: AtomicU64,
    log: Mutex<Log<RecordedRequest>>,
    /// Whether requests and streams are logged ([`FakeProvider::set_recording`]).
    recording: AtomicBool,
    pub(crate) streams: Mutex<Log<StreamRecord>>,
    pub(crate) open_streams: AtomicUsize,
    /// (delta events, interval) of every streamed answer.
    stream_plan: Mutex<(usize, Duration)>,
    /// Source of response ids.
    next_id: AtomicU64,
    /// Forwarder's outbound address (actix's peer) -> the real client address.
    peers: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// Requests that arrived over HTTP/2 (with [`FakeProviderConfig::http2`]).
    http2_requests: AtomicU64,
    /// `https://127.0.0.1:PORT/vertex-token/token`.
    pub(crate) token_url: String,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn key_is_valid(&self, kind: ProviderKind, key: &str) -> bool {
        lock(&self.keys).contains(&(kind, key.to_owned()))
    }

    pub(crate) fn mode(&self, kind: ProviderKind) -> FakeMode {
        lock(&self.modes).get(&kind).copied().unwrap_or_default()
    }

    pub(crate) fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    pub(crate) fn stream_plan(&self) -> (usize, Duration) {
        *lock(&self.stream_plan)
    }

    /// A fresh number for response ids.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Applies the provider's mode: sleeps for `Slow`, and returns the forced answer for
    /// failure modes (rendered by `render`), or `None` to answer normally.
    pub(crate) async fn apply_mode(
        &self,
        kind: ProviderKind,
        render: impl FnOnce(FakeMode) -> Option<HttpResponse>,
    ) -> Option<HttpResponse> {
        match self.mode(kind) {
            FakeMode::Normal => None,
            FakeMode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                None
            }
            mode => render(mode),
        }
    }

    fn add_service_account(&self, email: &str, account: ServiceAccount) {
        lock(&self.accounts).insert(email.to_owned(), account);
    }

    fn remove_service_account(&self, email: &str) {
        lock(&self.accounts).remove(email);
        lock(&self.tokens).retain(|_, t| t.client_email != email);
    }

    fn add_key(&self, kind: ProviderKind, key: &str) -> anyhow::Result<()> {
        if kind == ProviderKind::Vertex {
            let (email, account) = vertex::parse_service_account_json(key)?;
            self.add_service_account(&email, account);
        } else {
            lock(&self.keys).insert((kind, key.to_owned()));
        }
        Ok(())
    }
}

/// A running fake provider. Dropping it stops the server.
pub struct FakeProvider {
    addr: SocketAddr,
    ca_pem: String,
    shared: Arc<Shared>,
    /// The server certificate's config and the actix server (for [`Self::listen_http2`]).
    tls: rustls::ServerConfig,
    internal_addr: SocketAddr,
    stop_tx: Option<oneshot::Sender<()>>,
    done_rx: Option<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeProvider {
    /// Starts the server on its own thread and returns once it accepts connections.
    pub async fn start(cfg: FakeProviderConfig) -> anyhow::Result<FakeProvider> {
        let ca = TestCa::new("byok fake provider CA")?;
        // Plus the listen address when it is a specific one (a test node's address).
        let listen_ip = cfg.listen.ip().to_string();
        let mut sans = vec!["localhost", "127.0.0.1"];
        if !cfg.listen.ip().is_unspecified() && !cfg.listen.ip().is_loopback() {
            sans.push(&listen_ip);
        }
        let leaf = ca.issue("byok fake provider", &sans)?;
        let tls = server_tls_config(&leaf.cert_pem, &leaf.key_pem)?;

        let public = std::net::TcpListener::bind(cfg.listen)
            .with_context(|| format!("binding the fake provider to {}", cfg.listen))?;
        public.set_nonblocking(true)?;
        let addr = public.local_addr()?;
        let internal = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let internal_addr = internal.local_addr()?;

        let shared = Arc::new(Shared {
            keys: Mutex::default(),
            modes: Mutex::default(),
            accounts: Mutex::default(),
            tokens: Mutex::default(),
            requests: Mutex::default(),
            total: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            log: Mutex::default(),
            recording: AtomicBool::new(true),
            streams: Mutex::default(),
            open_streams: AtomicUsize::new(0),
            stream_plan: Mutex::new(DEFAULT_STREAM_PLAN),
            next_id: AtomicU64::new(1),
            peers: Mutex::default(),
            http2_requests: AtomicU64::new(0),
            token_url: format!("https://{}{VERTEX_TOKEN_PATH}", url_authority(addr)),
        });
        for (kind, key) in &cfg.valid_keys {
            shared
                .add_key(*kind, key)
                .with_context(|| format!("registering a valid {kind} key"))?;
        }

        let front = if cfg.http2 {
            let front = front::Front::new(tls.clone(), &ca.cert_pem(), internal_addr)?;
            Some(Arc::new(front))
        } else {
            None
        };
        let (ready_tx, ready_rx) = oneshot::channel::<anyhow::Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let thread_shared = shared.clone();
        let thread_tls = tls.clone();
        std::thread::Builder::new()
            .name("fake-provider".into())
            .spawn(move || {
                serve(
                    thread_shared,
                    public,
                    internal,
                    (internal_addr, front),
                    thread_tls,
                    ready_tx,
                    stop_rx,
                );
                let _ = done_tx.send(());
            })?;
        ready_rx
            .await
            .context("the fake provider thread exited early")??;
        tracing::debug!(%addr, "fake provider listening");
        Ok(FakeProvider {
            addr,
            ca_pem: ca.cert_pem(),
            shared,
            tls,
            internal_addr,
            stop_tx: Some(stop_tx),
            done_rx: Some(done_rx),
        })
    }

    /// PEM of the CA that issued the server certificate (SANs `localhost`, `127.0.0.1` and a
    /// specific listen address).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` (or the listen address, if it is not unspecified).
    pub fn origin(&self) -> String {
        format!("https://{}", url_authority(self.addr))
    }

    /// The base URL to configure for this provider (see the module docs).
    pub fn base_url(&self, kind: ProviderKind) -> String {
        format!("{}{}", self.origin(), base_path(kind))
    }

    /// The Vertex token URL (the operator's `--provider-endpoint vertex-token=URL`).
    pub fn vertex_token_url(&self) -> String {
        self.shared.token_url.clone()
    }

    /// Accepts `key` for `kind`. For vertex, `key` is a service-account JSON; panics if it
    /// cannot be parsed (use [`Self::add_service_account_json`] to get the error instead).
    pub fn add_valid_key(&self, kind: ProviderKind, key: &str) {
        if let Err(e) = self.shared.add_key(kind, key) {
            panic!("add_valid_key({kind}): {e:#}");
        }
    }

    /// Stops accepting `key` (for vertex: the service account of that JSON, and its tokens).
    pub fn remove_valid_key(&self, kind: ProviderKind, key: &str) {
        if kind == ProviderKind::Vertex {
            if let Ok((email, _)) = vertex::parse_service_account_json(key) {
                self.shared.remove_service_account(&email);
            }
        } else {
            lock(&self.shared.keys).remove(&(kind, key.to_owned()));
        }
    }

    /// Registers a vertex service account by its public key (PEM: `PUBLIC KEY` SPKI,
    /// `RSA PUBLIC KEY`, or a PKCS#8 `PRIVATE KEY` whose public half is used). Any project
    /// and any `kid` are accepted for it.
    pub fn add_service_account(
        &self,
        client_email: &str,
        public_key_pem: &str,
    ) -> anyhow::Result<()> {
        let public_key = vertex::rsa_public_key_from_pem(public_key_pem)?;
        self.shared.add_service_account(
            client_email,
            ServiceAccount {
                public_key,
                key_id: None,
                project: None,
                credential_id: FakeProvider::key_id(public_key_pem),
            },
        );
        Ok(())
    }

    /// Registers a vertex service account from its JSON key: the public half of
    /// `private_key`, with `private_key_id` as the expected `kid` and `project_id` as the
    /// only project it may list models in.
    pub fn add_service_account_json(&self, json: &str) -> anyhow::Result<()> {
        self.shared.add_key(ProviderKind::Vertex, json)
    }

    /// Forgets a service account and revokes its access tokens.
    pub fn remove_service_account(&self, client_email: &str) {
        self.shared.remove_service_account(client_email);
    }

    /// Sets the mode of every provider.
    pub fn set_mode(&self, mode: FakeMode) {
        let mut modes = lock(&self.shared.modes);
        for kind in ProviderKind::ALL {
            modes.insert(kind, mode);
        }
    }

    /// Sets the mode of one provider.
    pub fn set_mode_for(&self, kind: ProviderKind, mode: FakeMode) {
        lock(&self.shared.modes).insert(kind, mode);
    }

    pub fn mode(&self, kind: ProviderKind) -> FakeMode {
        self.shared.mode(kind)
    }

    /// Requests to this provider's paths (vertex: token endpoint and aiplatform together).
    pub fn requests(&self, kind: ProviderKind) -> u64 {
        lock(&self.shared.requests).get(&kind).copied().unwrap_or(0)
    }

    /// All requests except the admin API's.
    pub fn total_requests(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// Opens a second public port on loopback that offers HTTP/2 (as with
    /// [`FakeProviderConfig::http2`]) in front of the same server, served on the caller's
    /// runtime while it runs; returns its address. The proxy bench's h2 upstream.
    pub async fn listen_http2(&self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let front = front::Front::new(self.tls.clone(), &self.ca_pem, self.internal_addr)?;
        tokio::spawn(forward(
            listener,
            self.internal_addr,
            Some(Arc::new(front)),
            self.shared.clone(),
        ));
        Ok(addr)
    }

    /// Requests that arrived over HTTP/2 (with [`FakeProviderConfig::http2`] or
    /// [`Self::listen_http2`]).
    pub fn http2_requests(&self) -> u64 {
        self.shared.http2_requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted (counted before the TLS handshake; includes admin API ones).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every request so far except the admin API's, oldest first (the newest [`LOG_CAP`],
    /// and only while recording is on).
    pub fn requests_log(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.log).to_vec()
    }

    /// How [`RecordedRequest::key_id`] names a credential: the first 12 hex digits of the
    /// SHA-256 of `value` (for vertex: of the service-account JSON or public-key PEM it was
    /// registered with).
    pub fn key_id(value: &str) -> String {
        let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        let mut id = hex::encode(&digest[..6]);
        id.truncate(12);
        id
    }

    /// Turns the request log and the stream log on or off (on by default). Off, a request
    /// costs a few atomic increments, for benchmarks; counters keep counting, and
    /// [`Self::open_streams`] stays exact.
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }

    /// Shapes every streamed answer from now on: `events` delta events (the text of delta `i`
    /// is `chunk-{i}`), with `interval` between consecutive deltas. The events before the
    /// first delta (e.g. Anthropic's `message_start`) are sent at once, the ones after the
    /// last delta right after it. Default: 3 deltas, no delay.
    pub fn set_stream_plan(&self, events: usize, interval: Duration) {
        *lock(&self.shared.stream_plan) = (events, interval);
    }

    /// Every streamed answer so far, oldest first (the newest [`LOG_CAP`], and only while
    /// recording is on).
    pub fn streams(&self) -> Vec<StreamRecord> {
        lock(&self.shared.streams).to_vec()
    }

    /// Streamed answers currently in progress (started and neither finished nor abandoned).
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until it has shut down.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(rx) = self.done_rx.take() {
            let _ = rx.await;
        }
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
    }
}

/// Default of [`FakeProvider::set_stream_plan`].
const DEFAULT_STREAM_PLAN: (usize, Duration) = (3, Duration::ZERO);

fn base_path(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Anthropic => "/anthropic",
        ProviderKind::OpenAI => "/openai/v1",
        ProviderKind::Google => "/google",
        ProviderKind::Azure => "/azure",
        ProviderKind::OpenAICompatible => "/compat/v1",
        ProviderKind::Vertex => "/vertex",
    }
}

/// The provider whose path prefix `path` is under (whole segments only).
fn provider_for_path(path: &str) -> Option<ProviderKind> {
    const PREFIXES: [(&str, ProviderKind); 7] = [
        ("/anthropic", ProviderKind::Anthropic),
        ("/openai", ProviderKind::OpenAI),
        ("/google", ProviderKind::Google),
        ("/azure", ProviderKind::Azure),
        ("/compat", ProviderKind::OpenAICompatible),
        ("/vertex-token", ProviderKind::Vertex),
        ("/vertex", ProviderKind::Vertex),
    ];
    PREFIXES.into_iter().find_map(|(prefix, kind)| {
        let rest = path.strip_prefix(prefix)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(kind)
    })
}

fn url_authority(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        addr.ip()
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

fn server_tls_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<rustls::ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the server certificate")?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parsing the server key")?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(config)
}

/// The server thread: a Tokio runtime driving the forwarder and actix-web's server future
/// (actix-server runs its worker on a thread of its own).
fn serve(
    shared: Arc<Shared>,
    public: std::net::TcpListener,
    internal: std::net::TcpListener,
    (internal_addr, front): (SocketAddr, Option<Arc<front::Front>>),
    tls: rustls::ServerConfig,
    ready_tx: oneshot::Sender<anyhow::Result<()>>,
    stop_rx: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready_tx.send(Err(e.into()));
            return;
        }
    };
    runtime.block_on(async move {
        let app_shared = shared.clone();
        let server = HttpServer::new(move || {
            let record_shared = app_shared.clone();
            App::new()
                .app_data(web::Data::from(app_shared.clone()))
                .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
                .wrap_fn(|req, srv| {
                    let gzip = accepts_gzip(req.request());
                    let fut = srv.call(req);
                    async move { gzip_json(fut.await?, gzip).await }
                })
                .wrap_fn(move |req, srv| {
                    let entry = start_record(&record_shared, req.request());
                    let fut = srv.call(req);
                    let shared = record_shared.clone();
                    async move {
                        let res = fut.await?;
                        if let Some(id) = entry {
                            let exchange = res.request().extensions_mut().remove::<Exchange>();
                            if let Some(r) = lock(&shared.log).get_mut(id) {
                                r.status = Some(res.status().as_u16());
                                if let Some(x) = exchange {
                                    r.model = x.model;
                                    r.key_id = x.key_id;
                                    r.body_bytes = x.body_bytes;
                                    r.stream = x.stream;
                                }
                            }
                        }
                        Ok(res)
                    }
                })
                .configure(routes)
        })
        .workers(1)
        // Each streamed event goes out at once (Nagle plus the forwarder's delayed ACK would
        // hold the second write of a connection for ~40 ms).
        .tcp_nodelay(true)
        // A client that closes its end mid-stream is gone: without this actix would keep
        // streaming into the half-closed connection the forwarder leaves behind.
        .h1_allow_half_closed(false)
        .disable_signals()
        .shutdown_timeout(1)
        .listen_rustls_0_23(internal, tls);
        let server = match server {
            Ok(s) => s.run(),
            Err(e) => {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
        };
        let public = match tokio::net::TcpListener::from_std(public) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
        };
        let handle = server.handle();
        let forwarder = tokio::spawn(forward(public, internal_addr, front, shared));
        let _ = ready_tx.send(Ok(()));
        let stopper = async move {
            // Err (handle dropped without a message) means stop too.
            let _ = stop_rx.await;
            forwarder.abort();
            let _ = forwarder.await;
            handle.stop(false).await;
        };
        let (result, ()) = tokio::join!(server, stopper);
        if let Err(e) = result {
            tracing::warn!(error = %e, "fake provider server failed");
        }
    });
}

/// Whether the client takes gzip (`Accept-Encoding`, q-values other than 0 ignored).
fn accepts_gzip(req: &HttpRequest) -> bool {
    header(req, "accept-encoding").is_some_and(|v| {
        v.split(',').any(|c| {
            let mut parts = c.split(';');
            parts
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case("gzip"))
                && !parts.any(|p| p.trim().replace(' ', "") == "q=0")
        })
    })
}

/// Real providers compress JSON answers for a client that takes gzip (the SDKs do): so
/// does the fake (streams are left alone).
async fn gzip_json(
    res: actix_web::dev::ServiceResponse,
    gzip: bool,
) -> Result<actix_web::dev::ServiceResponse, actix_web::Error> {
    use std::io::Write as _;
    let json = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !gzip || !json || res.headers().contains_key("content-encoding") {
        return Ok(res);
    }
    let (req, res) = res.into_parts();
    let (head, body) = res.into_parts();
    let bytes = actix_web::body::to_bytes(body)
        .await
        .map_err(|_| actix_web::error::ErrorInternalServerError("body"))?;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&bytes)?;
    let compressed = encoder.finish()?;
    let mut res = head.set_body(compressed);
    res.headers_mut().insert(
        actix_web::http::header::CONTENT_ENCODING,
        actix_web::http::header::HeaderValue::from_static("gzip"),
    );
    Ok(actix_web::dev::ServiceResponse::new(req, res).map_into_boxed_body())
}

/// Accepts on the public port, counts, and pipes each connection to actix-web.
async fn forward(
    listener: tokio::net::TcpListener,
    target: SocketAddr,
    front: Option<Arc<front::Front>>,
    shared: Arc<Shared>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, peer)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    match &front {
                        Some(front) => {
                            conns.spawn(front.clone().serve(inbound, peer, shared.clone()));
                        }
                        None => {
                            conns.spawn(pipe(inbound, peer, target, shared.clone()));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fake provider accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn pipe(
    mut inbound: tokio::net::TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
) {
    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    let Ok(local) = outbound.local_addr() else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    lock(&shared.peers).insert(local, peer);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    lock(&shared.peers).remove(&local);
}

/// Every route: the admin API and one scope per provider. Add endpoints in the provider
/// modules' `scope` functions.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(admin_scope())
        .service(vertex::token_scope())
        .service(vertex::scope())
        .service(anthropic::scope())
        .service(openai::scope(ProviderKind::OpenAI, "/openai"))
        .service(openai::scope(ProviderKind::OpenAICompatible, "/compat"))
        .service(google::scope())
        .service(azure::scope())
        .default_service(web::to(|| async {
            HttpResponse::NotFound()
                .content_type("text/plain")
                .body("Not Found")
        }));
}

/// Counts and logs a request; returns its log id (`None` for the admin API, or when not
/// recording).
fn start_record(shared: &Shared, req: &HttpRequest) -> Option<u64> {
    let path = req.path();
    if path == "/__fake" || path.starts_with("/__fake/") {
        return None;
    }
    let provider = provider_for_path(path);
    shared.total.fetch_add(1, Ordering::SeqCst);
    if let Some(kind) = provider {
        *lock(&shared.requests).entry(kind).or_default() += 1;
    }
    if !shared.recording() {
        return None;
    }
    let query_names = req
        .query_string()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split('=').next().unwrap_or_default().to_owned())
        .collect();
    let mut header_names: Vec<String> = req
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    header_names.sort();
    header_names.dedup();
    let auth_headers = AUTH_HEADER_NAMES
        .iter()
        .filter(|n| req.headers().contains_key(**n))
        .map(|n| n.to_string())
        .collect();
    let id = lock(&shared.log).push(RecordedRequest {
        provider,
        method: req.method().as_str().to_owned(),
        path: path.to_owned(),
        query_names,
        auth_headers,
        header_names,
        status: None,
        model: None,
        key_id: None,
        body_bytes: 0,
        stream: false,
        accept_encoding: header(req, "accept-encoding").map(str::to_owned),
    });
    Some(id)
}

/// What a generation handler learnt about its request, for [`RecordedRequest`]; left in the
/// request's extensions for the recording middleware.
#[derive(Debug, Default)]
pub(crate) struct Exchange {
    model: Option<String>,
    key_id: Option<String>,
    body_bytes: u64,
    stream: bool,
}

/// Notes a generation request's model, body size and stream flag (when recording).
pub(crate) fn note_request(
    shared: &Shared,
    req: &HttpRequest,
    model: Option<&str>,
    body_bytes: usize,
    stream: bool,
) {
    if !shared.recording() {
        return;
    }
    let mut ext = req.extensions_mut();
    let x = ext.get_or_insert_with(Exchange::default);
    x.model = model.map(str::to_owned);
    x.body_bytes = body_bytes as u64;
    x.stream = stream;
}

/// Notes which credential authenticated a generation request (when recording); `id` is
/// only called then.
pub(crate) fn note_key(shared: &Shared, req: &HttpRequest, id: impl FnOnce() -> String) {
    if !shared.recording() {
        return;
    }
    req.extensions_mut()
        .get_or_insert_with(Exchange::default)
        .key_id = Some(id());
}

/// The fields of a generation request body the fake looks at; everything else is skipped
/// without being kept.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct BodyProbe {
    #[serde(default)]
    pub(crate) model: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) stream: Option<serde_json::Value>,
    /// OpenAI's `stream_options` (`include_usage`).
    #[serde(default)]
    pub(crate) stream_options: Option<serde_json::Value>,
}

impl BodyProbe {
    /// The body's fields, or `None` if it is not a JSON object.
    pub(crate) fn parse(body: &[u8]) -> Option<BodyProbe> {
        serde_json::from_slice(body).ok()
    }

    /// `model`, if it is a non-empty string.
    pub(crate) fn model(&self) -> Option<&str> {
        self.model
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .filter(|m| !m.is_empty())
    }

    pub(crate) fn stream(&self) -> bool {
        matches!(self.stream, Some(serde_json::Value::Bool(true)))
    }

    /// OpenAI's `stream_options.include_usage: true`: a streamed chat completion ends with
    /// a chunk holding the usage (and no choices).
    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .is_some_and(|v| v == &serde_json::Value::Bool(true))
    }
}

/// A rough token count for `bytes` of input, as the fake reports usage.
pub(crate) fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// `s` as a JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The answer text of a non-streamed generation request (the tests' completion canary).
pub const FAKE_TEXT: &str = "Hello from the fake provider.";

/// A JSON body that is already serialized (the cheap path of non-streamed answers).
pub(crate) fn raw_json_response(code: u16, body: String) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .content_type("application/json")
        .body(body)
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- shared helpers for the provider modules ----

pub(crate) fn json_response(code: u16, body: serde_json::Value) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .content_type("application/json")
        .body(body.to_string())
}

/// A header's value, if present and visible ASCII.
pub(crate) fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The token of `authorization: Bearer TOKEN`, if that is what was sent.
pub(crate) fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = header(req, "authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The query string as a map, or `None` if it does not parse.
pub(crate) fn query_map(req: &HttpRequest) -> Option<HashMap<String, String>> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .map(web::Query::into_inner)
}

pub(crate) fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

// ---- admin API (loopback clients only) ----

fn admin_scope() -> actix_web::Scope {
    web::scope("/__fake")
        .route("/mode", web::post().to(admin_set_mode))
        .route("/stats", web::get().to(admin_stats))
}

fn is_loopback_client(req: &HttpRequest, shared: &Shared) -> bool {
    let Some(peer) = req.peer_addr() else {
        return false;
    };
    let client = lock(&shared.peers).get(&peer).copied().unwrap_or(peer);
    client.ip().is_loopback()
}

#[derive(Deserialize)]
struct ModeRequest {
    mode: String,
    provider: Option<String>,
    delay_ms: Option<u64>,
}

async fn admin_set_mode(
    req: HttpRequest,
    shared: web::Data<Shared>,
    body: web::Bytes,
) -> HttpResponse {
    if !is_loopback_client(&req, &shared) {
        return HttpResponse::Forbidden().finish();
    }
    let bad = |msg: String| json_response(400, serde_json::json!({ "error": msg }));
    let Ok(request) = serde_json::from_slice::<ModeRequest>(&body) else {
        return bad(
            "expected JSON {\"mode\": NAME, \"provider\": optional, \"delay_ms\": for slow}".into(),
        );
    };
    let delay = Duration::from_millis(request.delay_ms.unwrap_or(10_000));
    let Some(mode) = FakeMode::parse(&request.mode, delay) else {
        return bad(format!(
            "unknown mode {:?} (normal, unauthorized, gemini-key-invalid, rate-limited, \
             insufficient-quota, server-error, overloaded, slow)",
            request.mode
        ));
    };
    let mut modes = lock(&shared.modes);
    match request.provider.as_deref() {
        None | Some("all") => {
            for kind in ProviderKind::ALL {
                modes.insert(kind, mode);
            }
        }
        Some(name) => match name.parse::<ProviderKind>() {
            Ok(kind) => {
                modes.insert(kind, mode);
            }
            Err(e) => return bad(e),
        },
    }
    json_response(200, serde_json::json!({ "ok": true }))
}

async fn admin_stats(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    if !is_loopback_client(&req, &shared) {
        return HttpResponse::Forbidden().finish();
    }
    let counts = lock(&shared.requests).clone();
    let modes = lock(&shared.modes).clone();
    let mut requests = BTreeMap::new();
    let mut mode_names = BTreeMap::new();
    for kind in ProviderKind::ALL {
        requests.insert(kind.as_str(), counts.get(&kind).copied().unwrap_or(0));
        let mode = modes.get(&kind).copied().unwrap_or_default();
        mode_names.insert(kind.as_str(), mode.name());
    }
    json_response(
        200,
        serde_json::json!({
            "total_requests": shared.total.load(Ordering::SeqCst),
            "connections": shared.connections.load(Ordering::SeqCst),
            "requests": requests,
            "modes": mode_names,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert_eq!(
            provider_for_path("/vertex-token/token"),
            Some(ProviderKind::Vertex)
        );
        assert_eq!(
            provider_for_path("/vertex/v1/projects"),
            Some(ProviderKind::Vertex)
        );
        assert_eq!(
            provider_for_path("/compat/v1/models"),
            Some(ProviderKind::OpenAICompatible)
        );
        assert_eq!(provider_for_path("/openaix/v1"), None);
        assert_eq!(provider_for_path("/"), None);
    }
}
