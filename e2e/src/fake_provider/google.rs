//! Google Gemini API: `GET /v1beta/models?pageSize=1` with `x-goog-api-key` (verification);
//! `POST /{v1beta|v1}/models/{model}:{generateContent|streamGenerateContent|countTokens|
//! embedContent}` with `x-goog-api-key` or `?key=`. Also the error envelope and the
//! `GenerateContentResponse` rendering shared with Vertex AI.

use std::sync::Arc;

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use byok_operator::providers::ProviderKind;
use serde_json::{Value, json};

use super::stream::{self, Events};
use super::{
    FAKE_TEXT, FakeMode, FakeProvider, Shared, estimate_tokens, header, json_response, json_str,
    note_key, note_request, query_map, raw_json_response,
};

const KIND: ProviderKind = ProviderKind::Google;

pub(super) fn scope() -> actix_web::Scope {
    let models = |path: &str| {
        web::resource(path.to_owned())
            .route(web::get().to(list_models))
            .default_service(web::to(not_found))
    };
    web::scope("/google")
        .service(models("/v1beta/models"))
        .service(models("/v1/models"))
        .service(
            web::resource("/{version}/models/{model_method}")
                .route(web::post().to(model_method))
                .default_service(web::to(not_found)),
        )
        .default_service(web::to(not_found))
}

/// The methods on `models/{model}` the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    GenerateContent,
    StreamGenerateContent,
    CountTokens,
    EmbedContent,
}

/// `gemini-2.5-flash:generateContent` -> (model, method).
pub(super) fn split_model_method(s: &str) -> Option<(&str, Method)> {
    let (model, method) = s.rsplit_once(':')?;
    let method = match method {
        "generateContent" => Method::GenerateContent,
        "streamGenerateContent" => Method::StreamGenerateContent,
        "countTokens" => Method::CountTokens,
        "embedContent" => Method::EmbedContent,
        _ => return None,
    };
    (!model.is_empty()).then_some((model, method))
}

/// Google's answer to a body that is not a JSON object.
pub(super) fn invalid_json() -> HttpResponse {
    error(
        400,
        "INVALID_ARGUMENT",
        "Invalid JSON payload received. Unexpected token.",
        None,
    )
}

/// Whether `body` is a JSON object (skipping its contents without keeping them).
pub(super) fn is_json_object(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
        && body.trim_ascii_start().first() == Some(&b'{')
}

/// The answer to a content method: the `GenerateContentResponse` (a JSON array of them when
/// streamed without `alt=sse`, SSE `data:` events with it), `countTokens`' or
/// `embedContent`'s.
pub(super) fn answer(
    shared: &Arc<Shared>,
    kind: ProviderKind,
    req: &HttpRequest,
    model: &str,
    method: Method,
    body_len: usize,
) -> HttpResponse {
    let prompt = estimate_tokens(body_len);
    match method {
        Method::CountTokens => {
            return raw_json_response(200, format!(r#"{{"totalTokens":{prompt}}}"#));
        }
        Method::EmbedContent => {
            return raw_json_response(
                200,
                r#"{"embedding":{"values":[1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0]}}"#.to_owned(),
            );
        }
        Method::GenerateContent | Method::StreamGenerateContent => {}
    }
    let response_id = format!("fake{:016x}", shared.next_id());
    let model_version = json_str(model);
    // One GenerateContentResponse; `last` carries finishReason.
    let render = |text: &str, output_tokens: usize, last: bool| {
        let finish = if last {
            r#","finishReason":"STOP""#
        } else {
            ""
        };
        format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{text}"}}],"role":"model"}}{finish},"index":0}}],"usageMetadata":{{"promptTokenCount":{prompt},"candidatesTokenCount":{output_tokens},"totalTokenCount":{}}},"modelVersion":{model_version},"responseId":"{response_id}"}}"#,
            prompt + output_tokens as u64
        )
    };
    if method == Method::GenerateContent {
        return raw_json_response(200, render(FAKE_TEXT, 8, true));
    }
    let sse = query_map(req).is_some_and(|q| q.get("alt").is_some_and(|a| a == "sse"));
    let (count, interval) = shared.stream_plan();
    // Gemini frames SSE events with CRLF, and separates array elements with ",\r\n".
    let frame = |i: usize, json: String| {
        Bytes::from(if sse {
            format!("data: {json}\r\n\r\n")
        } else if i == 0 {
            format!("[{json}")
        } else {
            format!(",\r\n{json}")
        })
    };
    let mut after = Vec::new();
    if count == 0 {
        after.push(frame(0, render("", 0, true)));
    }
    if !sse {
        after.push(Bytes::from_static(b"]"));
    }
    let events = Events::new(
        Vec::new(),
        count,
        |i| frame(i, render(&format!("chunk-{i}"), i + 1, i + 1 == count)),
        after,
    );
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/json; charset=UTF-8"
    };
    stream::respond(shared, kind, req.path(), content_type, events, interval)
}

async fn model_method(
    req: HttpRequest,
    shared: web::Data<Shared>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (version, model_method) = path.into_inner();
    let Some((model, method)) =
        split_model_method(&model_method).filter(|_| version == "v1beta" || version == "v1")
    else {
        return not_found().await;
    };
    let streamed = method == Method::StreamGenerateContent;
    note_request(&shared, &req, Some(model), body.len(), streamed);
    if let Some(res) = shared.apply_mode(KIND, mode_error).await {
        return res;
    }
    let query_key = query_map(&req).and_then(|mut q| q.remove("key"));
    let Some(key) = header(&req, "x-goog-api-key").or(query_key.as_deref()) else {
        return missing_key(&req);
    };
    if !shared.key_is_valid(KIND, key) {
        return api_key_invalid();
    }
    note_key(&shared, &req, || FakeProvider::key_id(key));
    if !is_json_object(&body) {
        return invalid_json();
    }
    answer(&shared.into_inner(), KIND, &req, model, method, body.len())
}

/// No API key: 401 if some other credential was sent, else 403.
fn missing_key(req: &HttpRequest) -> HttpResponse {
    if req.headers().contains_key("authorization") {
        return unauthenticated();
    }
    error(
        403,
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        None,
    )
}

/// Google's `{"error":{"code","message","status"[,"details"]}}` envelope.
pub(super) fn error(
    code: u16,
    status: &str,
    message: &str,
    details: Option<Value>,
) -> HttpResponse {
    let mut error = json!({ "code": code, "message": message, "status": status });
    if let Some(details) = details {
        error["details"] = details;
    }
    json_response(code, json!({ "error": error }))
}

pub(super) fn with_retry_after(mut res: HttpResponse) -> HttpResponse {
    res.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    res
}

pub(super) fn unauthenticated() -> HttpResponse {
    error(
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        None,
    )
}

fn api_key_invalid() -> HttpResponse {
    error(
        400,
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
        Some(json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": { "service": "generativelanguage.googleapis.com" },
        }])),
    )
}

/// The rate-limit and server modes, shared with Vertex AI's models endpoint.
pub(super) fn availability_error(mode: FakeMode) -> Option<HttpResponse> {
    Some(match mode {
        FakeMode::RateLimited | FakeMode::InsufficientQuota => with_retry_after(error(
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            None,
        )),
        FakeMode::ServerError => error(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            None,
        ),
        FakeMode::Overloaded => error(
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            None,
        ),
        _ => return None,
    })
}

fn mode_error(mode: FakeMode) -> Option<HttpResponse> {
    match mode {
        FakeMode::Unauthorized => Some(unauthenticated()),
        FakeMode::GeminiKeyInvalid => Some(api_key_invalid()),
        mode => availability_error(mode),
    }
}

pub(super) async fn not_found() -> HttpResponse {
    error(404, "NOT_FOUND", "Method not found.", None)
}

pub(super) fn bad_page_size() -> Option<HttpResponse> {
    Some(error(
        400,
        "INVALID_ARGUMENT",
        "Invalid value at 'page_size' (TYPE_INT32)",
        None,
    ))
}

/// `None` if the query is well formed, else the 400 to send.
pub(super) fn check_page_size(req: &HttpRequest) -> Option<HttpResponse> {
    let Some(query) = query_map(req) else {
        return bad_page_size();
    };
    match query.get("pageSize") {
        Some(size) if size.parse::<i32>().is_err() => bad_page_size(),
        _ => None,
    }
}

async fn list_models(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    if let Some(res) = shared.apply_mode(KIND, mode_error).await {
        return res;
    }
    // The wire contract never puts a key in the URL, so `?key=` is not accepted here.
    let Some(key) = header(&req, "x-goog-api-key") else {
        if req.headers().contains_key("authorization") {
            return unauthenticated();
        }
        return error(
            403,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            None,
        );
    };
    if !shared.key_is_valid(KIND, key) {
        return api_key_invalid();
    }
    if let Some(res) = check_page_size(&req) {
        return res;
    }
    json_response(
        200,
        json!({
            "models": [{ "name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash" }],
            "nextPageToken": "Chxtb2RlbHMvZ2VtaW5pLTIuNS1mbGFzaA==",
        }),
    )
}
