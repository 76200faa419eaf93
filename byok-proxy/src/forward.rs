//! One request through the proxy: check, rewrite, forward, stream back.
//!
//! Request and response bodies are streamed frame by frame (an SSE event reaches the
//! application as soon as it arrives); only a JSON body whose model must be checked or
//! filled is read first, up to a cap. Dropping the response (the application went away)
//! drops the upstream request with it, which closes its HTTP/1 connection or resets its
//! HTTP/2 stream: the provider stops generating.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

use super::answers::{Refusal, error_response};
use super::keys::KeySlot;
use super::live::Live;
use super::metrics::{ErrorLabels, KeyMetrics, ProxyMetrics};
use super::models::Check;
use super::upstream::{self, Body, BoxError};
use super::usage::{self, Endpoint, Meter, Reading, UsageChunkFilter};
use super::{endpoints, routes};
use crate::metrics::UsageRecord;
use crate::providers::ProviderKind;

/// What every listener shares.
pub struct Shared {
    pub metrics: Arc<ProxyMetrics>,
    /// The cap on a body read for its model.
    pub max_inspected_body: u64,
    /// The memory all bodies read for their model may hold at once.
    pub inspect_budget: InspectBudget,
    pub access_log: bool,
    /// Requests whose response has not ended yet, for the drain.
    pub in_flight: AtomicU64,
}

/// Client headers that carry credentials: never forwarded (the sidecar adds its own).
const CLIENT_CREDENTIALS: [&str; 5] = {
    let [a, b, c, d] = crate::providers::auth::CREDENTIAL_HEADERS;
    [a, b, c, d, "proxy-authorization"]
};

/// Headers some front ends (Google's among them) take as the method to run instead of the
/// request's own: the endpoint rules judged the request's method, so they never go.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Hop-by-hop headers (RFC 9110 section 7.6.1), plus `host`, which hyper sets from the URI.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "host",
];

/// Whether a request header never goes upstream: hop-by-hop, a client credential or a
/// method override.
fn dropped_upstream(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
        || CLIENT_CREDENTIALS.contains(&name)
        || METHOD_OVERRIDES.contains(&name)
}

/// Whether a response header never goes back to the application: hop-by-hop.
fn dropped_downstream(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Removes the headers `dropped` names and those `Connection` names. One pass over the
/// headers present, then a removal by name for each found (usually one or two): removing
/// each of the 17 listed names by string instead parsed and hashed every one on every
/// request, ~9 % of the proxy's instructions.
fn strip_headers(headers: &mut HeaderMap, dropped: fn(&str) -> bool) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| dropped(name.as_str()))
        .cloned()
        .collect();
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok()),
    );
    for name in doomed {
        headers.remove(name);
    }
}

/// Query parameters that carry credentials at some provider (Google takes `key` and
/// `access_token`; others take `api-key` and friends): never forwarded. Compared after
/// percent-decoding and case folding, as the providers' front ends decode them.
const QUERY_CREDENTIALS: [&str; 7] = [
    "key",
    "access_token",
    "oauth_token",
    "bearer_token",
    "api-key",
    "api_key",
    "apikey",
];

fn is_query_credential(part: &str) -> bool {
    let raw = part.split_once('=').map_or(part, |(n, _)| n);
    let name: String = url::form_urlencoded::parse(raw.as_bytes())
        .next()
        .map(|(n, _)| n.into_owned())
        .unwrap_or_default();
    let name = name.trim().to_lowercase();
    QUERY_CREDENTIALS.contains(&name.as_str())
}

/// The query without credential parameters, and with Azure's `api-version` added when the
/// client sent none.
fn upstream_query(
    query: Option<&str>,
    azure_api_version: Option<&str>,
    deployment_path: bool,
) -> Option<String> {
    let mut parts: Vec<&str> = query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !is_query_credential(p))
        .collect();
    let added;
    if let Some(version) = azure_api_version.filter(|_| deployment_path)
        && !parts.iter().any(|p| p.starts_with("api-version="))
    {
        added = format!(
            "api-version={}",
            url::form_urlencoded::byte_serialize(version.as_bytes()).collect::<String>()
        );
        parts.push(&added);
    }
    (!parts.is_empty()).then(|| parts.join("&"))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case("application/json") || m.to_ascii_lowercase().ends_with("+json")
        })
}

pub type OutBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn full(bytes: Bytes) -> OutBody {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// The access log and metrics of one request, written when its response ends (or is
/// dropped half-way).
struct Done {
    shared: Arc<Shared>,
    key: Arc<KeyMetrics>,
    method: Method,
    /// The request's URI (its path is logged; a clone shares the parsed bytes).
    uri: Uri,
    status: u16,
    /// The request's model: from the path, the checked body, or read from a small body.
    model: Option<String>,
    key_version: i64,
    start: Instant,
    upstream_latency: Option<std::time::Duration>,
    provider: Option<ProviderKind>,
    /// What the answer says about tokens (`Unmetered` until routed).
    endpoint: Endpoint,
    /// The provider accepts `stream_options` on this request (Azure: by api-version).
    stream_options_accepted: bool,
    /// The sidecar added `stream_options.include_usage`: the usage-only chunk is taken out.
    injected_stream_usage: bool,
    /// The key's per-pod token limit counts this answer's tokens; what the request reserved.
    limited: Option<(Arc<KeySlot>, u64)>,
    /// The request body's size, when it was held (for the estimate of a token limit).
    request_bytes: u64,
    /// Recorded: the drop guard has nothing left to do.
    finished: bool,
}

impl Drop for Done {
    /// A request dropped before its answer began (the client went away while the provider
    /// was working): still counted, logged, and its in-flight count released.
    fn drop(&mut self) {
        if !self.finished {
            if self.status == 0 {
                // nginx's "client closed request".
                self.status = 499;
            }
            self.record(0, "client_closed", None);
        }
    }
}

impl Done {
    /// `reading`: what a metered answer said about tokens.
    fn finish(mut self, bytes: u64, outcome: &'static str, reading: Option<Reading>) {
        self.record(bytes, outcome, reading);
    }

    fn record(&mut self, bytes: u64, outcome: &'static str, reading: Option<Reading>) {
        self.finished = true;
        let m = &self.shared.metrics;
        self.key.answered(m, self.status);
        let elapsed = self.start.elapsed();
        self.key.duration(m).observe(elapsed.as_secs_f64());
        let tokens = reading.as_ref().and_then(|r| r.tokens);
        if let Some((slot, reserved)) = self.limited.take() {
            // An answer whose usage was not read (the client left before the usage chunk,
            // an upstream error) still spent tokens: estimated from the bytes, 4 a token.
            let spent = tokens.map_or_else(
                || (self.request_bytes + bytes).div_ceil(4),
                |t| t.input.saturating_add(t.output),
            );
            slot.settle(reserved, spent, Instant::now());
        }
        if let (Some(reading), Some(provider)) = (&reading, self.provider) {
            self.key.usage(
                m,
                &UsageRecord {
                    provider,
                    endpoint: self.endpoint,
                    request_model: self.model.as_deref(),
                    response_model: reading.model.as_deref(),
                    tokens,
                    seconds: elapsed.as_secs_f64(),
                },
            );
        }
        if let Some(l) = self.upstream_latency {
            self.key.upstream_latency(m).observe(l.as_secs_f64());
        }
        self.key.response_bytes(m).inc_by(bytes);
        m.in_flight.dec();
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.shared.access_log {
            crate::access::log(&crate::access::Line {
                key: &self.key.name,
                method: self.method.as_str(),
                path: self.uri.path(),
                status: self.status,
                upstream_ms: self.upstream_latency.map(|l| l.as_secs_f64() * 1000.0),
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                bytes,
                input_tokens: tokens.map(|t| t.input),
                output_tokens: tokens.map(|t| t.output),
                // The application names it: a name that is no plausible model (a prompt
                // pasted into `model`) is not written out.
                model: self.model.as_deref().map(|m| {
                    if crate::metrics::is_model_label(m) {
                        m
                    } else {
                        crate::metrics::OTHER_MODEL
                    }
                }),
                key_version: self.key_version,
                outcome,
            });
        }
    }
}

/// The provider's response body, counted and (for endpoints that report tokens) metered;
/// the access log is written at its end.
struct Tracked {
    inner: Incoming,
    bytes: u64,
    /// Boxed: the body is moved a few times on its way into hyper, and the meter's state
    /// is most of its size.
    meter: Option<Box<Meter>>,
    /// Takes out the usage-only chunk of a stream the sidecar asked usage for.
    filter: Option<UsageChunkFilter>,
    /// A trailers frame that came while the filter held part of an event.
    after_held: Option<Frame<Bytes>>,
    done: Option<Done>,
}

impl Tracked {
    fn finish(&mut self, outcome: &'static str) {
        if let Some(done) = self.done.take() {
            let reading = self.meter.as_mut().map(|m| m.reading());
            done.finish(self.bytes, outcome, reading);
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.filter.is_some() {
            return self.poll_filtered(cx);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    if let Some(meter) = &mut self.meter {
                        meter.feed(data);
                    }
                }
            }
            Poll::Ready(None) => self.finish("complete"),
            Poll::Ready(Some(Err(_))) => self.finish("upstream_error"),
            Poll::Pending => {}
        }
        polled.map(|o| o.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        // The filter may hold the end of the last event until the provider's body ends.
        self.filter.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.filter.is_some() {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

impl Tracked {
    /// [`Tracked::poll_frame`] through the usage-chunk filter: whole events, as each ends.
    fn poll_filtered(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.after_held.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            let Some(filter) = self.filter.as_mut() else {
                return Poll::Ready(None);
            };
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(meter) = &mut self.meter {
                            meter.feed(&data);
                        }
                        let out = filter.push(&data);
                        if !out.is_empty() {
                            self.bytes += out.len() as u64;
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    Err(frame) => {
                        // Trailers after the events held so far: those go first.
                        if filter.holds() {
                            let held = filter.finish();
                            self.bytes += held.len() as u64;
                            self.after_held = Some(frame);
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(held)))));
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                None => {
                    let rest = filter.finish();
                    self.filter = None;
                    self.bytes += rest.len() as u64;
                    self.finish("complete");
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
                Some(Err(e)) => {
                    self.finish("upstream_error");
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish("client_closed");
    }
}

/// Serves one request for `slot`'s key. Never fails: every problem is an HTTP answer.
pub async fn handle(
    slot: Arc<KeySlot>,
    key: Arc<KeyMetrics>,
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<OutBody>, Infallible> {
    let start = Instant::now();
    shared.metrics.in_flight.inc();
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    let mut done = Done {
        shared: shared.clone(),
        key,
        method: req.method().clone(),
        uri: req.uri().clone(),
        status: 0,
        model: None,
        key_version: 0,
        start,
        upstream_latency: None,
        provider: None,
        endpoint: Endpoint::Unmetered,
        stream_options_accepted: false,
        injected_stream_usage: false,
        limited: None,
        request_bytes: 0,
        finished: false,
    };
    match forward(&slot, &shared, req, &mut done).await {
        Ok(res) => {
            let (parts, body) = res.into_parts();
            done.status = parts.status.as_u16();
            let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
            // Only answers that succeeded carry usage.
            let meter = parts
                .status
                .is_success()
                .then(|| {
                    Meter::new(
                        done.endpoint,
                        header(header::CONTENT_TYPE),
                        header(header::CONTENT_ENCODING),
                    )
                })
                .flatten()
                .map(Box::new);
            let filter = (done.injected_stream_usage
                && parts.status.is_success()
                && header(header::CONTENT_ENCODING)
                    .is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"))
                && header(header::CONTENT_TYPE)
                    .is_some_and(|t| t.trim_start().starts_with("text/event-stream")))
            .then(UsageChunkFilter::default);
            let mut parts = parts;
            if filter.is_some() {
                // The filtered stream is shorter than what the provider announced.
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            let body = Tracked {
                inner: body,
                bytes: 0,
                meter,
                filter,
                after_held: None,
                done: Some(done),
            };
            let mut res = Response::from_parts(parts, body.boxed_unsync());
            strip_headers(res.headers_mut(), dropped_downstream);
            *res.version_mut() = Version::HTTP_11;
            Ok(res)
        }
        Err(refusal) => {
            let res = error_response(slot.provider(), &refusal);
            done.status = res.status().as_u16();
            let bytes = res.body().len() as u64;
            done.finish(bytes, "refused", None);
            Ok(res.map(full))
        }
    }
}

async fn forward(
    slot: &Arc<KeySlot>,
    shared: &Shared,
    req: Request<Incoming>,
    done: &mut Done,
) -> Result<Response<Incoming>, Refusal> {
    let live = slot.current(Instant::now())?;
    done.key_version = live.key_version;
    done.provider = Some(live.provider);
    let (route, uri) = admit(&live, &req, done)?;
    done.endpoint = route.endpoint;
    let (mut parts, body) = req.into_parts();
    let body = upstream_body(shared, &live, &route, &mut parts, body, done).await?;
    if live.limits.tokens_per_minute.is_some()
        && parts.method == Method::POST
        && route.endpoint == Endpoint::Unmetered
    {
        return Err(Refusal::EndpointNotAllowed(
            "this key has a per-pod token limit (spec.limits.perPod.tokensPerMinute), and this endpoint's tokens cannot be counted".into(),
        ));
    }
    // Only what would be forwarded counts against the pod's limits. A request reserves an
    // estimate of its input against a token limit.
    let estimate = done.request_bytes.div_ceil(4);
    slot.admit(&live, Instant::now(), estimate)?;
    if live.limits.tokens_per_minute.is_some() {
        done.limited = Some((slot.clone(), estimate));
    }

    strip_headers(&mut parts.headers, dropped_upstream);
    if route.endpoint.metered() {
        // Usage is read from the answer as it passes: it must come uncompressed (the
        // application, which may have asked for gzip, gets it uncompressed too).
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    parts
        .headers
        .insert(live.auth_name.clone(), live.auth_value.clone());
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    let Some(client) = live.upstream.as_ref().map(upstream::Upstream::client) else {
        return Err(Refusal::KeyUnavailable(
            "no connection pool for the key".into(),
        ));
    };
    send(slot, shared, client, upstream_req, done).await
}

/// Whether the request may go to the key's provider at all (method, route, endpoint
/// policy); its route and the upstream URI if so.
fn admit(
    live: &Live,
    req: &Request<Incoming>,
    done: &mut Done,
) -> Result<(routes::Route, Uri), Refusal> {
    if req.headers().contains_key(header::UPGRADE) || req.method() == Method::CONNECT {
        return Err(Refusal::Upgrade);
    }
    // TRACE would echo the request, the key's header included, back to the application.
    if !matches!(
        *req.method(),
        Method::GET
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::HEAD
            | Method::OPTIONS
    ) {
        return Err(Refusal::BadRequest(format!(
            "method {} is not forwarded",
            req.method()
        )));
    }
    let route = routes::route(
        live.provider,
        req.method(),
        &live.base_path,
        req.uri().path(),
    )
    .map_err(|e| Refusal::BadRequest(e.to_string()))?;
    endpoints::check(
        live.provider,
        req.method(),
        req.uri().path(),
        &live.endpoints,
    )
    .map_err(|r| Refusal::EndpointNotAllowed(r.message()))?;
    if let routes::ModelAt::Path(model) = &route.model_at {
        done.model = Some(model.clone());
    }
    let deployment_path = req.uri().path().starts_with("/openai/deployments/");
    let query = upstream_query(
        req.uri().query(),
        live.azure_api_version.as_deref(),
        deployment_path,
    );
    done.stream_options_accepted =
        takes_stream_options(live.provider, req.uri().path(), query.as_deref());
    // Written once and parsed in place (`Uri` takes the `String`'s buffer).
    let mut uri = String::with_capacity(
        live.origin.len() + route.upstream_path.len() + query.as_ref().map_or(0, |q| q.len() + 1),
    );
    uri.push_str(&live.origin);
    uri.push_str(&route.upstream_path);
    if let Some(q) = &query {
        uri.push('?');
        uri.push_str(q);
    }
    let uri = Uri::try_from(uri)
        .map_err(|_| Refusal::BadRequest("the request path is not a valid URI path".into()))?;
    Ok((route, uri))
}

/// The body to send upstream: streamed, whole when small, or read and checked (its model
/// judged, filled or refused) within the inspect budget.
async fn upstream_body(
    shared: &Shared,
    live: &Live,
    route: &routes::Route,
    parts: &mut http::request::Parts,
    body: Incoming,
    done: &mut Done,
) -> Result<Body, Refusal> {
    let json = is_json(&parts.headers);
    let check = live
        .models
        .check(&route.model_at, json && parts.method == Method::POST);
    // A key with a per-pod token limit reads every chat and completion body (strictly, as
    // a checked body): a stream that would report no usage is refused, not let through by
    // a large, non-JSON or ambiguous body.
    let check = match check {
        Check::Forward
            if live.limits.tokens_per_minute.is_some()
                && parts.method == Method::POST
                && matches!(
                    route.endpoint,
                    Endpoint::Chat | Endpoint::Completions | Endpoint::Responses
                ) =>
        {
            Check::ReadBody
        }
        other => other,
    };
    Ok(match check {
        Check::Refuse(refusal) => return Err(refusal),
        // A small body of known length has (almost always) arrived with the head: sent
        // whole, the provider gets head and body in one write instead of two.
        Check::Forward
            if body
                .size_hint()
                .exact()
                .is_some_and(|n| n > 0 && n <= WHOLE_BODY_MAX) =>
        {
            let bytes = read_capped(body, WHOLE_BODY_MAX).await?;
            done.request_bytes = bytes.len() as u64;
            if route.endpoint.metered() && route.model_at == routes::ModelAt::Body {
                // For the usage metrics: the model the application asked for.
                done.model = usage::request_model(&bytes);
            }
            let bytes = ask_stream_usage(live, route, parts, bytes, done)?;
            Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
        }
        Check::Forward => body.map_err(BoxError::from).boxed_unsync(),
        Check::ReadBody => {
            // The memory of bodies read at once is bounded: a request waits for its share.
            let cap = shared.max_inspected_body;
            // A body of unknown length may grow to the cap.
            let share = body.size_hint().exact().unwrap_or(cap).min(cap);
            let budget = shared
                .inspect_budget
                .acquire(share, live.models.default_model.is_some())
                .await?;
            let bytes = read_capped(body, cap).await?;
            let (rewritten, model) = live.models.apply(&route.model_at, &bytes, cap)?;
            done.model = model;
            let bytes = match rewritten {
                Some(new) => {
                    parts.headers.remove(header::CONTENT_LENGTH);
                    let new = Bytes::from(new);
                    if let Ok(v) = HeaderValue::from_str(&new.len().to_string()) {
                        parts.headers.insert(header::CONTENT_LENGTH, v);
                    }
                    new
                }
                None => bytes,
            };
            done.request_bytes = bytes.len() as u64;
            let bytes = ask_stream_usage(live, route, parts, bytes, done)?;
            // The share is held until the body has gone upstream (or the request is
            // dropped): the closure owns it, and goes with the body.
            Full::new(bytes)
                .map_frame(move |frame| {
                    let _held = &budget;
                    frame
                })
                .map_err(|e| match e {})
                .boxed_unsync()
        }
    })
}

/// `bytes` with `stream_options.include_usage` added when the key asks for stream usage
/// (`spec.usage.streamUsage`) and this is a streamed OpenAI-shaped generation the provider
/// takes the option on; `Content-Length` follows.
fn ask_stream_usage(
    live: &Live,
    route: &routes::Route,
    parts: &mut http::request::Parts,
    bytes: Bytes,
    done: &mut Done,
) -> Result<Bytes, Refusal> {
    let will_inject = live.inject_stream_usage
        && done.stream_options_accepted
        && matches!(route.endpoint, Endpoint::Chat | Endpoint::Completions);
    if live.limits.tokens_per_minute.is_some()
        && matches!(
            route.endpoint,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses
        )
        && let Some(problem) = usage::escapes_token_count(&bytes, will_inject)
    {
        return Err(Refusal::BadRequest(format!(
            "this key has a per-pod token limit (spec.limits.perPod.tokensPerMinute) and {problem}"
        )));
    }
    let Some(new) = will_inject
        .then(|| usage::with_stream_usage(&bytes))
        .flatten()
    else {
        return Ok(bytes);
    };
    done.injected_stream_usage = true;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(new.len()));
    Ok(Bytes::from(new))
}

/// Azure takes `stream_options` from api-version 2024-09-01 (previews included) and on its
/// v1 API; every other provider shape the option applies to takes it.
fn takes_stream_options(provider: ProviderKind, path: &str, query: Option<&str>) -> bool {
    if provider != ProviderKind::Azure || !path.starts_with("/openai/deployments/") {
        return true;
    }
    query
        .unwrap_or_default()
        .split('&')
        .find_map(|p| p.strip_prefix("api-version="))
        .and_then(|v| v.get(..10))
        .is_some_and(|date| date >= "2024-09-01")
}

/// Sends the request through the key's pool; a failure is counted, logged and answered.
async fn send(
    slot: &KeySlot,
    shared: &Shared,
    client: &upstream::Client,
    upstream_req: Request<Body>,
    done: &mut Done,
) -> Result<Response<Incoming>, Refusal> {
    let sent = Instant::now();
    match client.request(upstream_req).await {
        Ok(res) => {
            done.upstream_latency = Some(sent.elapsed());
            Ok(res)
        }
        Err(e) => {
            let kind = if upstream::rejected_address(&e).is_some() {
                "egress"
            } else if e.is_connect() {
                "connect"
            } else {
                "request"
            };
            shared
                .metrics
                .upstream_errors
                .get_or_create(&ErrorLabels {
                    key: slot.name.clone(),
                    kind,
                })
                .inc();
            let message = match upstream::rejected_address(&e) {
                Some(rejected) => format!(
                    "the provider's address is refused by the egress policy ({})",
                    rejected.class
                ),
                None if e.is_connect() => "the provider could not be reached".to_owned(),
                None => "the provider's connection failed".to_owned(),
            };
            tracing::warn!(key = %slot.name, kind, error = %error_chain(&e), "upstream request failed");
            Err(Refusal::Upstream(message))
        }
    }
}

/// The memory that bodies read for their model may hold at once, in KiB permits: a
/// request reserves twice its announced length (the cap when unknown: the body, and the
/// parser's scratch copy of its longest string with escapes), three times when a default
/// model may be spliced into a copy, and waits while others hold the rest. So a sidecar's
/// memory stays bounded however many large requests its application sends together.
pub struct InspectBudget {
    permits: Arc<tokio::sync::Semaphore>,
    total: u32,
}

impl InspectBudget {
    pub fn new(bytes: u64) -> Self {
        let total = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS as u32);
        InspectBudget {
            permits: Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
        }
    }

    async fn acquire(
        &self,
        bytes: u64,
        copy: bool,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .max(1);
        let kib = if copy { kib.saturating_mul(2) } else { kib };
        self.permits
            .clone()
            .acquire_many_owned(kib.min(self.total))
            .await
            .map_err(|_| Refusal::KeyUnavailable("the proxy is shutting down".into()))
    }
}

/// Bodies up to this size with a `content-length` are sent upstream in one piece.
const WHOLE_BODY_MAX: u64 = 64 * 1024;

/// The most a refused oversized body is read (and dropped) so that the client, which is
/// still sending it, sees the 413 instead of a reset connection.
const DRAIN_MAX: u64 = 256 * 1024 * 1024;

/// Reads a body of at most `cap` bytes. A larger one is drained (up to [`DRAIN_MAX`]) and
/// refused with 413.
async fn read_capped(mut body: Incoming, cap: u64) -> Result<Bytes, Refusal> {
    if body.size_hint().lower() > DRAIN_MAX {
        return Err(Refusal::TooLarge(cap));
    }
    // Sized once from what the client announced (within the cap, which the budget has
    // reserved), so a large body is not copied while its buffer doubles.
    let announced = body.size_hint().lower().min(cap);
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(announced).unwrap_or(0));
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| Refusal::BadRequest("the request body could not be read".into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > DRAIN_MAX {
            break;
        }
        if total <= cap {
            buf.extend_from_slice(&data);
        }
    }
    if total > cap {
        return Err(Refusal::TooLarge(cap));
    }
    Ok(buf.freeze())
}

/// An error and its sources on one line (hyper's own message is terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_loses_keys_and_gains_an_azure_version() {
        assert_eq!(
            upstream_query(Some("alt=sse&key=AIza"), None, false).as_deref(),
            Some("alt=sse")
        );
        assert_eq!(upstream_query(Some("KEY=x&%6Bey=y"), None, false), None);
        // Every spelling a front end decodes to a credential parameter goes.
        assert_eq!(
            upstream_query(
                Some("k%65y=a&%4B%45%59=b&access_token=c&Access%5Ftoken=d&alt=sse&k%2565y=e"),
                None,
                false
            )
            .as_deref(),
            Some("alt=sse&k%2565y=e")
        );
        assert_eq!(
            upstream_query(
                Some("api-key=x&api_key=y&oauth_token=z&key+=w"),
                None,
                false
            ),
            None
        );
        assert_eq!(
            upstream_query(Some("keys=1"), None, false).as_deref(),
            Some("keys=1")
        );
        assert_eq!(
            upstream_query(None, Some("2024-10-21"), true).as_deref(),
            Some("api-version=2024-10-21")
        );
        assert_eq!(
            upstream_query(Some("api-version=2025-01-01"), Some("2024-10-21"), true).as_deref(),
            Some("api-version=2025-01-01")
        );
        assert_eq!(upstream_query(None, Some("2024-10-21"), false), None);
    }

    /// Header names are compared as `http` stores them, lower case: an entry in another
    /// case would never match, and its header would go through.
    #[test]
    fn dropped_header_lists_are_lower_case() {
        for name in HOP_BY_HOP
            .iter()
            .chain(&CLIENT_CREDENTIALS)
            .chain(&METHOD_OVERRIDES)
        {
            assert_eq!(HeaderName::from_static(name).as_str(), *name);
        }
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:15100"));
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        let mut upstream = h.clone();
        strip_headers(&mut h, dropped_downstream);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("anthropic-version"));

        // Going upstream, every client credential and method override goes too, each with
        // all its values.
        for name in CLIENT_CREDENTIALS.iter().chain(&METHOD_OVERRIDES) {
            upstream.append(*name, HeaderValue::from_static("a"));
            upstream.append(*name, HeaderValue::from_static("b"));
        }
        upstream.append("x-request-id", HeaderValue::from_static("r1"));
        strip_headers(&mut upstream, dropped_upstream);
        let mut left: Vec<&str> = upstream.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["anthropic-version", "x-request-id"]);
    }

    #[test]
    fn json_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=x"),
        );
        assert!(!is_json(&h));
    }
}

#[cfg(test)]
mod stream_options_tests {
    use super::*;

    #[test]
    fn azure_takes_stream_options_from_2024_09_01_and_on_v1() {
        let azure =
            |path: &str, q: Option<&str>| takes_stream_options(ProviderKind::Azure, path, q);
        let chat = "/openai/deployments/gpt-4o/chat/completions";
        assert!(azure(chat, Some("api-version=2024-10-21")));
        assert!(azure(chat, Some("x=1&api-version=2024-09-01-preview")));
        assert!(azure(chat, Some("api-version=2025-04-01-preview")));
        assert!(!azure(chat, Some("api-version=2024-08-01-preview")));
        assert!(!azure(chat, Some("api-version=2024-06-01")));
        assert!(!azure(chat, Some("api-version=bogus")));
        assert!(!azure(chat, None));
        assert!(azure("/openai/v1/chat/completions", None));
        assert!(takes_stream_options(
            ProviderKind::OpenAI,
            "/v1/chat/completions",
            None
        ));
    }
}
