//! The path table: where a request path the application's SDK sends goes upstream, and where
//! its model is named. Pure: no IO, no key material.
//!
//! The webhook gives each SDK a local base URL shaped like the provider's own default (see
//! `docs/proxy.md`), so the SDK sends the provider's real paths. Upstream, the key's verified
//! base URL (`baseURL` in the grant) takes the place of the local one:
//!
//! | provider | SDK variable | request path | upstream |
//! |---|---|---|---|
//! | anthropic | `http://127.0.0.1:P` | `/v1/messages` | `{base}/v1/messages` |
//! | openai, openai-compatible | `http://127.0.0.1:P/v1` | `/v1/chat/completions` | `{base}/chat/completions` (the base holds the version) |
//! | google | `http://127.0.0.1:P` | `/v1beta/models/M:generateContent` | `{base}/v1beta/models/M:generateContent` |
//! | azure | `http://127.0.0.1:P` | `/openai/deployments/D/chat/completions` | `{base}/openai/deployments/D/chat/completions` |
//! | vertex | `http://127.0.0.1:P` | `/v1/projects/P/locations/L/publishers/google/models/M:generateContent` | `{base}/v1/projects/...` |
//!
//! For the OpenAI shapes a request path without the leading `/v1` is accepted too (a key
//! whose provider the webhook did not know yet got a base URL without it), so neither form
//! ends up at `/v1/v1/...`.

use crate::providers::ProviderKind;
use crate::usage::Endpoint;

/// Where a request's model is, for `defaultModel` and `allowedModels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelAt {
    /// The JSON body's `model` field.
    Body,
    /// Anthropic message batches: `requests[].params.model`.
    BatchRequests,
    /// In the path (Gemini and Vertex models, Azure deployments).
    Path(String),
    /// A read-only listing or lookup (models, results of checked batches): no model is
    /// spent, so it is served whatever `allowedModels` says.
    ReadOnly,
    /// Anything else: refused when `allowedModels` is set, since its model cannot be checked.
    Unchecked,
}

/// A request path that is refused before anything is forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path must start with '/'")]
    NotAbsolute,
    #[error("the request path must not contain '.' or '..' segments, encoded or not")]
    DotSegment,
    #[error("the request path must not contain empty segments ('//') or backslashes")]
    EmptySegment,
    #[error("the request path must not contain an encoded '/' or '\\'")]
    EncodedSlash,
    #[error("the request path must not contain {0}")]
    Ambiguous(&'static str),
}

/// The route of one request: the path to send upstream and where its model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream_path: String,
    pub model_at: ModelAt,
    /// What its answer says about tokens.
    pub endpoint: Endpoint,
}

/// Maps `path` (as the SDK sent it, without the query) onto `base_path` (the verified base
/// URL's path, without a trailing slash) and classifies it.
pub fn route(
    provider: ProviderKind,
    method: &http::Method,
    base_path: &str,
    path: &str,
) -> Result<Route, PathError> {
    check_path(path)?;
    let api_path = match provider {
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible => strip_version(path),
        _ => path,
    };
    let upstream_path = if api_path == "/" && !base_path.is_empty() {
        base_path.to_owned()
    } else {
        [base_path, api_path].concat()
    };
    let s = segments(api_path);
    Ok(Route {
        upstream_path,
        model_at: model_at(provider, method, &s),
        endpoint: if method == http::Method::POST {
            metered_endpoint(provider, &s)
        } else {
            Endpoint::Unmetered
        },
    })
}

/// `/v1/x` -> `/x`, `/v1` -> `/`; anything else unchanged.
fn strip_version(path: &str) -> &str {
    match path.strip_prefix("/v1") {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

fn check_path(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.contains('\\') {
        return Err(PathError::EmptySegment);
    }
    // Without allocating: this runs on every request.
    let bytes = path.as_bytes();
    let escape = |i: usize| {
        bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
    };
    let escapes = || (0..bytes.len()).filter(|i| bytes[*i] == b'%').map(escape);
    if escapes().any(|c| matches!(c, Some(b'/' | b'\\'))) {
        return Err(PathError::EncodedSlash);
    }
    // What front ends decode differently (matrix parameters, double encoding, encoded
    // control and non-ASCII bytes that may fold to ASCII) could hide an endpoint from the
    // endpoint rules: no SDK path has any of it.
    if path.contains(';') {
        return Err(PathError::Ambiguous("';'"));
    }
    // Clients percent-encode what is not ASCII (RFC 3986); raw bytes past it (a C1 control
    // or a right-to-left override in UTF-8) have no business in a path, or in the access
    // line that shows it.
    if !path.is_ascii() {
        return Err(PathError::Ambiguous("a byte that is not ASCII"));
    }
    for hex in escapes() {
        match hex {
            None => return Err(PathError::Ambiguous("a '%' that starts no escape")),
            Some(b'%') => return Err(PathError::Ambiguous("'%25' (double encoding)")),
            Some(c) if !(0x20..0x7f).contains(&c) => {
                return Err(PathError::Ambiguous("an encoded control or non-ASCII byte"));
            }
            Some(_) => {}
        }
    }
    if path[1..].split('/').any(is_dot_segment) {
        return Err(PathError::DotSegment);
    }
    // One trailing slash is the only empty segment allowed.
    let inner = path.strip_suffix('/').unwrap_or(path);
    if !inner.is_empty() && inner[1..].split('/').any(str::is_empty) {
        return Err(PathError::EmptySegment);
    }
    Ok(())
}

/// `.` or `..`, any dot written as `%2e` or `%2E`.
fn is_dot_segment(segment: &str) -> bool {
    let mut dots = 0;
    let mut rest = segment.as_bytes();
    while !rest.is_empty() {
        match rest {
            [b'.', tail @ ..] => rest = tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => rest = tail,
            _ => return false,
        }
        dots += 1;
    }
    matches!(dots, 1 | 2)
}

/// Segments of `path` after the leading `/`.
fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .collect()
}

fn model_at(provider: ProviderKind, method: &http::Method, s: &[&str]) -> ModelAt {
    let post = method == http::Method::POST;
    let get = method == http::Method::GET;
    match provider {
        ProviderKind::Anthropic => anthropic(post, get, s),
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible => openai(post, get, s),
        ProviderKind::Google => gemini(post, get, s),
        ProviderKind::Vertex => vertex(post, get, s),
        ProviderKind::Azure => azure(post, get, s),
    }
}

/// [`endpoint`] on the segments as a provider's front end may read them: percent-decoded
/// and lower-cased (as the endpoint policy compares them), so `/v1/chat/%63ompletions`
/// cannot escape metering.
fn metered_endpoint(provider: ProviderKind, s: &[&str]) -> Endpoint {
    let plain = |seg: &&str| !seg.bytes().any(|b| b == b'%' || b.is_ascii_uppercase());
    if s.iter().all(plain) {
        return endpoint(provider, s);
    }
    let normalised: Vec<String> = s
        .iter()
        .map(|seg| {
            percent_encoding::percent_decode_str(seg)
                .decode_utf8_lossy()
                .to_ascii_lowercase()
        })
        .collect();
    let refs: Vec<&str> = normalised.iter().map(String::as_str).collect();
    endpoint(provider, &refs)
}

/// What a POST's answer says about tokens (`docs/usage.md` has the table); `s` is
/// lower-case.
fn endpoint(provider: ProviderKind, s: &[&str]) -> Endpoint {
    match provider {
        ProviderKind::Anthropic => match s {
            ["v1", "messages"] => Endpoint::Messages,
            ["v1", "messages", "count_tokens"] => Endpoint::TokenCount,
            _ => Endpoint::Unmetered,
        },
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible => openai_endpoint(s),
        ProviderKind::Google => match s {
            [v, "models", m] if is_version(v) => method_endpoint(m, false),
            _ => Endpoint::Unmetered,
        },
        ProviderKind::Vertex => match s {
            [
                v,
                "projects",
                _,
                "locations",
                _,
                "publishers",
                publisher,
                "models",
                m,
            ] if is_version(v) => method_endpoint(m, *publisher == "anthropic"),
            [
                v,
                "projects",
                _,
                "locations",
                _,
                "endpoints",
                "openapi",
                "chat",
                "completions",
            ] if is_version(v) => Endpoint::Chat,
            _ => Endpoint::Unmetered,
        },
        ProviderKind::Azure => match s {
            ["openai", "deployments", _, op @ ..] => openai_endpoint(op),
            ["openai", "v1", rest @ ..] => openai_endpoint(rest),
            ["openai", "responses"] => Endpoint::Responses,
            _ => Endpoint::Unmetered,
        },
    }
}

/// OpenAI's paths after the version.
fn openai_endpoint(s: &[&str]) -> Endpoint {
    match s {
        ["chat", "completions"] => Endpoint::Chat,
        ["completions"] => Endpoint::Completions,
        ["responses"] => Endpoint::Responses,
        ["responses", "input_tokens"] => Endpoint::TokenCount,
        ["embeddings"] => Endpoint::Embeddings,
        _ => Endpoint::Unmetered,
    }
}

/// A Gemini or Vertex model method (`M:generateContent`); `anthropic`: a Vertex Anthropic
/// model, whose `rawPredict` takes and answers Anthropic messages.
fn method_endpoint(segment: &str, anthropic: bool) -> Endpoint {
    match segment.rsplit_once(':').map(|(_, method)| method) {
        Some("generatecontent" | "streamgeneratecontent") => Endpoint::GenerateContent,
        Some("rawpredict" | "streamrawpredict") if anthropic => Endpoint::Messages,
        Some("counttokens" | "computetokens") => Endpoint::TokenCount,
        _ => Endpoint::Unmetered,
    }
}

fn anthropic(post: bool, get: bool, s: &[&str]) -> ModelAt {
    match s {
        ["v1", "messages"] | ["v1", "messages", "count_tokens"] if post => ModelAt::Body,
        ["v1", "messages", "batches"] if post => ModelAt::BatchRequests,
        ["v1", "messages", "batches", ..] if get => ModelAt::ReadOnly,
        ["v1", "models", ..] if get => ModelAt::ReadOnly,
        _ => ModelAt::Unchecked,
    }
}

/// OpenAI endpoints whose JSON body names the model (paths after the version).
const OPENAI_BODY_MODEL: [&[&str]; 8] = [
    &["chat", "completions"],
    &["completions"],
    &["responses"],
    &["embeddings"],
    &["moderations"],
    &["images", "generations"],
    &["audio", "speech"],
    &["responses", "input_tokens"],
];

fn openai(post: bool, get: bool, s: &[&str]) -> ModelAt {
    if post && OPENAI_BODY_MODEL.contains(&s) {
        return ModelAt::Body;
    }
    match s {
        ["models", ..] if get => ModelAt::ReadOnly,
        // Polling a stored or background response the key created.
        ["responses", _id] if get => ModelAt::ReadOnly,
        _ => ModelAt::Unchecked,
    }
}

/// Gemini and Vertex methods on a model resource that generate or count with it.
const MODEL_METHODS: [&str; 9] = [
    "generateContent",
    "streamGenerateContent",
    "countTokens",
    "embedContent",
    "batchEmbedContents",
    "predict",
    "rawPredict",
    "streamRawPredict",
    "computeTokens",
];

/// `gemini-2.5-flash:generateContent` -> the model, if the method is one of ours.
fn model_method(segment: &str) -> Option<&str> {
    let (model, method) = segment.rsplit_once(':')?;
    (MODEL_METHODS.contains(&method) && !model.is_empty()).then_some(model)
}

fn is_version(v: &str) -> bool {
    matches!(v, "v1" | "v1beta" | "v1alpha" | "v1beta1")
}

fn gemini(post: bool, get: bool, s: &[&str]) -> ModelAt {
    match s {
        [v, "models", m] if post && is_version(v) => match model_method(m) {
            Some(model) => ModelAt::Path(model.to_owned()),
            None => ModelAt::Unchecked,
        },
        [v, "models", ..] if get && is_version(v) => ModelAt::ReadOnly,
        _ => ModelAt::Unchecked,
    }
}

fn vertex(post: bool, get: bool, s: &[&str]) -> ModelAt {
    match s {
        [
            v,
            "projects",
            _,
            "locations",
            _,
            "publishers",
            publisher,
            "models",
            m,
        ] if post && is_version(v) => match model_method(m) {
            // The resource form: `normalise` makes it `M` for Google's models, `P/M` else.
            Some(model) => ModelAt::Path(format!("publishers/{publisher}/models/{model}")),
            None => ModelAt::Unchecked,
        },
        // Vertex's OpenAI-compatible endpoint names the model in the body.
        [
            v,
            "projects",
            _,
            "locations",
            _,
            "endpoints",
            "openapi",
            "chat",
            "completions",
        ] if post && is_version(v) => ModelAt::Body,
        [v, "publishers", _, "models", ..] if get && is_version(v) => ModelAt::ReadOnly,
        _ => ModelAt::Unchecked,
    }
}

/// Azure deployment operations that generate with the deployment's model.
const AZURE_DEPLOYMENT_OPS: [&[&str]; 6] = [
    &["chat", "completions"],
    &["completions"],
    &["embeddings"],
    &["images", "generations"],
    &["audio", "speech"],
    &["responses"],
];

fn azure(post: bool, get: bool, s: &[&str]) -> ModelAt {
    match s {
        ["openai", "deployments", deployment, op @ ..]
            if post && !deployment.is_empty() && AZURE_DEPLOYMENT_OPS.contains(&op) =>
        {
            ModelAt::Path((*deployment).to_owned())
        }
        // The v1 API: OpenAI's paths under /openai/v1, the deployment in the body's model.
        ["openai", "v1", rest @ ..] => openai(post, get, rest),
        // The Responses API of the classic SDK clients: no deployment in the path.
        ["openai", "responses"] if post => ModelAt::Body,
        ["openai", "responses", _id] if get => ModelAt::ReadOnly,
        ["openai", "models", ..] if get => ModelAt::ReadOnly,
        _ => ModelAt::Unchecked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderKind::*;
    use http::Method;

    fn up(p: ProviderKind, base: &str, path: &str) -> String {
        route(p, &Method::POST, base, path)
            .expect("routed")
            .upstream_path
    }

    /// The paths the official SDKs send (current and older releases) with the variables
    /// the webhook sets, against the base URLs a Ready key can have.
    #[test]
    fn path_table_never_doubles_a_version() {
        // anthropic: SDK base has no /v1, the provider base has none either.
        assert_eq!(up(Anthropic, "", "/v1/messages"), "/v1/messages");
        assert_eq!(
            up(Anthropic, "/anthropic", "/v1/messages"),
            "/anthropic/v1/messages"
        );
        // openai: the SDK variable ends in /v1, the base too.
        assert_eq!(
            up(OpenAI, "/v1", "/v1/chat/completions"),
            "/v1/chat/completions"
        );
        assert_eq!(
            up(OpenAI, "/v1", "/chat/completions"),
            "/v1/chat/completions"
        );
        assert_eq!(
            up(OpenAI, "/openai/v1", "/v1/responses"),
            "/openai/v1/responses"
        );
        assert_eq!(
            up(OpenAICompatible, "/api/v2", "/v1/chat/completions"),
            "/api/v2/chat/completions"
        );
        // google-genai calls /v1beta by default and /v1 when asked: both pass through.
        assert_eq!(
            up(
                Google,
                "",
                "/v1beta/models/gemini-2.5-flash:generateContent"
            ),
            "/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert_eq!(
            up(
                Google,
                "/google",
                "/v1/models/gemini-2.5-flash:streamGenerateContent"
            ),
            "/google/v1/models/gemini-2.5-flash:streamGenerateContent"
        );
        // azure: the classic deployment path and the v1 API, below the resource endpoint.
        assert_eq!(
            up(Azure, "", "/openai/deployments/gpt4o/chat/completions"),
            "/openai/deployments/gpt4o/chat/completions"
        );
        assert_eq!(
            up(Azure, "/azure", "/openai/v1/responses"),
            "/azure/openai/v1/responses"
        );
        assert_eq!(
            up(
                Vertex,
                "",
                "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
            ),
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
        );
        assert_eq!(up(OpenAI, "/v1", "/v1"), "/v1");
        assert_eq!(up(OpenAI, "/v1", "/v10/x"), "/v1/v10/x");
    }

    #[test]
    fn paths_that_could_climb_out_of_the_base_are_refused() {
        for bad in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E./admin",
            "/./v1/messages",
            "/v1//messages",
            "/v1/messages%2f..%2fx",
            "/v1\\..\\x",
            "/v1/realtime/;x/client_secrets",
            "/v1/%2572ealtime/sessions",
            "/v1/realt%C4%B1me/sessions",
            "/v1/messages%00",
            "/v1/messages%",
            "/v1/messages\u{85}\u{202e}status=200",
            "/v1/mess\u{e4}ges",
            "v1/messages",
            "",
        ] {
            assert!(
                route(Anthropic, &Method::POST, "/anthropic", bad).is_err(),
                "{bad:?} was routed"
            );
        }
        assert!(route(Anthropic, &Method::GET, "", "/v1/models/").is_ok());
        assert!(route(Anthropic, &Method::GET, "", "/").is_ok());
    }

    fn at(p: ProviderKind, m: Method, path: &str) -> ModelAt {
        route(p, &m, "/base", path).expect("routed").model_at
    }

    #[test]
    fn models_are_found_where_each_provider_puts_them() {
        assert_eq!(at(Anthropic, Method::POST, "/v1/messages"), ModelAt::Body);
        assert_eq!(
            at(Anthropic, Method::POST, "/v1/messages/count_tokens"),
            ModelAt::Body
        );
        assert_eq!(
            at(Anthropic, Method::POST, "/v1/messages/batches"),
            ModelAt::BatchRequests
        );
        assert_eq!(
            at(OpenAI, Method::POST, "/v1/chat/completions"),
            ModelAt::Body
        );
        assert_eq!(at(OpenAI, Method::POST, "/responses"), ModelAt::Body);
        assert_eq!(
            at(OpenAICompatible, Method::POST, "/v1/embeddings"),
            ModelAt::Body
        );
        assert_eq!(
            at(
                Google,
                Method::POST,
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
            ),
            ModelAt::Path("gemini-2.5-flash".into())
        );
        assert_eq!(
            at(
                Vertex,
                Method::POST,
                "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:generateContent"
            ),
            ModelAt::Path("publishers/google/models/gemini-2.5-pro".into())
        );
        assert_eq!(
            at(
                Azure,
                Method::POST,
                "/openai/deployments/prod-4o/chat/completions"
            ),
            ModelAt::Path("prod-4o".into())
        );
        assert_eq!(
            at(Azure, Method::POST, "/openai/v1/chat/completions"),
            ModelAt::Body
        );
        assert_eq!(at(Azure, Method::POST, "/openai/responses"), ModelAt::Body);
        assert_eq!(
            at(Azure, Method::POST, "/openai/deployments/d/embeddings"),
            ModelAt::Path("d".into())
        );
        // google-genai's Vertex client calls v1beta1.
        assert_eq!(
            at(
                Vertex,
                Method::POST,
                "/v1beta1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:streamGenerateContent"
            ),
            ModelAt::Path("publishers/google/models/gemini-2.5-flash".into())
        );
    }

    #[test]
    fn every_other_endpoint_is_unchecked() {
        for (p, m, path) in [
            (OpenAI, Method::POST, "/v1/batches"),
            (OpenAI, Method::POST, "/v1/files"),
            (OpenAI, Method::POST, "/v1/audio/transcriptions"),
            (OpenAI, Method::POST, "/v1/fine_tuning/jobs"),
            (OpenAI, Method::DELETE, "/v1/models/ft-x"),
            (Anthropic, Method::POST, "/v1/complete"),
            (Anthropic, Method::POST, "/v1/files"),
            (Google, Method::POST, "/v1beta/cachedContents"),
            (
                Google,
                Method::POST,
                "/v1beta/tunedModels/x:generateContent",
            ),
            (Google, Method::POST, "/v1beta/models/gemini:unknownMethod"),
            (Azure, Method::POST, "/openai/deployments/d/fine_tunes"),
            (
                Vertex,
                Method::POST,
                "/v1/projects/p/locations/l/endpoints/123:predict",
            ),
        ] {
            assert_eq!(at(p, m.clone(), path), ModelAt::Unchecked, "{p} {m} {path}");
        }
        assert_eq!(at(OpenAI, Method::GET, "/v1/models"), ModelAt::ReadOnly);
        assert_eq!(at(Google, Method::GET, "/v1beta/models"), ModelAt::ReadOnly);
    }

    /// Every endpoint shape the path table routes, as the SDKs send it: what its answer says
    /// about tokens.
    #[test]
    fn endpoints_that_report_tokens() {
        use Endpoint::*;
        let e = |p: ProviderKind, path: &str| {
            route(p, &Method::POST, "", path).expect("routed").endpoint
        };
        for (p, path, want) in [
            (OpenAI, "/v1/chat/completions", Chat),
            (OpenAI, "/chat/completions", Chat),
            (OpenAI, "/v1/completions", Completions),
            (OpenAI, "/v1/responses", Responses),
            (OpenAI, "/v1/responses/input_tokens", TokenCount),
            (OpenAI, "/v1/embeddings", Embeddings),
            (OpenAI, "/v1/batches", Unmetered),
            (OpenAI, "/v1/files", Unmetered),
            (OpenAI, "/v1/fine_tuning/jobs", Unmetered),
            (OpenAI, "/v1/threads/t/runs", Unmetered),
            (OpenAI, "/v1/images/generations", Unmetered),
            (OpenAICompatible, "/v1/chat/completions", Chat),
            (OpenAICompatible, "/v1/embeddings", Embeddings),
            (Azure, "/openai/deployments/gpt4o/chat/completions", Chat),
            (Azure, "/openai/deployments/gpt4o/completions", Completions),
            (Azure, "/openai/deployments/emb/embeddings", Embeddings),
            (Azure, "/openai/deployments/gpt4o/responses", Responses),
            (Azure, "/openai/v1/chat/completions", Chat),
            (Azure, "/openai/v1/responses", Responses),
            (Azure, "/openai/responses", Responses),
            (Anthropic, "/v1/messages", Messages),
            (Anthropic, "/v1/messages/count_tokens", TokenCount),
            (Anthropic, "/v1/messages/batches", Unmetered),
            (
                Google,
                "/v1beta/models/gemini-2.5-flash:generateContent",
                GenerateContent,
            ),
            (
                Google,
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                GenerateContent,
            ),
            (
                Google,
                "/v1beta/models/gemini-2.5-flash:countTokens",
                TokenCount,
            ),
            (
                Google,
                "/v1beta/models/text-embedding-004:embedContent",
                Unmetered,
            ),
            (
                Vertex,
                "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:generateContent",
                GenerateContent,
            ),
            (
                Vertex,
                "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
                GenerateContent,
            ),
            (
                Vertex,
                "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4-5:rawPredict",
                Messages,
            ),
            (
                Vertex,
                "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4-5:streamRawPredict",
                Messages,
            ),
            (
                Vertex,
                "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4-5:countTokens",
                TokenCount,
            ),
            (
                Vertex,
                "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:countTokens",
                TokenCount,
            ),
            (
                Vertex,
                "/v1/projects/p/locations/l/endpoints/openapi/chat/completions",
                Chat,
            ),
        ] {
            assert_eq!(e(p, path), want, "{p:?} {path}");
        }
        // Encoded and upper-case forms are classified as the provider reads them.
        for (p, path, want) in [
            (OpenAI, "/v1/chat/%63ompletions", Chat),
            (OpenAI, "/v1/CHAT/Completions", Chat),
            (Anthropic, "/v1/%6Dessages", Messages),
            (
                Google,
                "/v1beta/models/gemini-2.5-flash%3AstreamGenerateContent",
                GenerateContent,
            ),
            (
                Google,
                "/v1beta/models/gemini-2.5-flash:COUNTTOKENS",
                TokenCount,
            ),
        ] {
            assert_eq!(e(p, path), want, "{p:?} {path}");
        }
        // Only a POST generates.
        let get = route(OpenAI, &Method::GET, "", "/v1/chat/completions").expect("routed");
        assert_eq!(get.endpoint, Unmetered);
    }
}
