//! Anthropic API with `x-api-key` and `anthropic-version`: `GET /v1/models` (verification),
//! `POST /v1/messages` (plain or `"stream": true`) and `POST /v1/messages/count_tokens`.

use actix_web::{HttpRequest, HttpResponse, web};
use byok_operator::providers::ProviderKind;
use serde_json::json;

use super::stream::{self, Events, sse};
use super::{
    BodyProbe, FAKE_TEXT, FakeMode, FakeProvider, Shared, estimate_tokens, header, json_response,
    json_str, note_key, note_request, query_map, random_alnum, raw_json_response,
};

const KIND: ProviderKind = ProviderKind::Anthropic;
/// The `anthropic-version` values the API accepts that SDKs send: 2023-06-01 (the Python and
/// TypeScript SDKs), 2023-01-01, and 2026-10-21 (anthropic-sdk-go v2.0 to v2.18).
const KNOWN_VERSIONS: [&str; 3] = ["2023-06-01", "2023-01-01", "2026-10-21"];

pub(super) fn scope() -> actix_web::Scope {
    web::scope("/anthropic")
        .service(
            web::resource("/v1/models")
                .route(web::get().to(list_models))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/v1/messages")
                .route(web::post().to(messages))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/v1/messages/count_tokens")
                .route(web::post().to(count_tokens))
                .default_service(web::to(not_found)),
        )
        .default_service(web::to(not_found))
}

/// Anthropic's error envelope, with its `request-id` header.
pub(super) fn error(code: u16, error_type: &str, message: &str) -> HttpResponse {
    let request_id = format!("req_{}", random_alnum(24));
    let mut res = json_response(
        code,
        json!({
            "type": "error",
            "error": { "type": error_type, "message": message },
            "request_id": request_id,
        }),
    );
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("request-id"),
            v,
        );
    }
    res
}

fn with_retry_after(mut res: HttpResponse) -> HttpResponse {
    res.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    res
}

fn mode_error(mode: FakeMode) -> Option<HttpResponse> {
    Some(match mode {
        FakeMode::Normal | FakeMode::Slow(_) => return None,
        FakeMode::Unauthorized | FakeMode::GeminiKeyInvalid => {
            error(401, "authentication_error", "invalid x-api-key")
        }
        FakeMode::RateLimited | FakeMode::InsufficientQuota => with_retry_after(error(
            429,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50 requests per minute.",
        )),
        FakeMode::ServerError => error(500, "api_error", "Internal server error"),
        FakeMode::Overloaded => error(529, "overloaded_error", "Overloaded"),
    })
}

async fn not_found() -> HttpResponse {
    error(404, "not_found_error", "Not Found")
}

/// The `anthropic-version` check; `None` if it passes, else the 400 to send.
fn check_version(req: &HttpRequest) -> Option<HttpResponse> {
    match header(req, "anthropic-version") {
        None => Some(error(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        )),
        Some(v) if !KNOWN_VERSIONS.contains(&v) => Some(error(
            400,
            "invalid_request_error",
            &format!("anthropic-version: invalid version {v}"),
        )),
        Some(_) => None,
    }
}

/// The `x-api-key` check; `None` if the key is registered, else the 401 to send.
fn check_key(req: &HttpRequest, shared: &Shared) -> Option<HttpResponse> {
    let Some(key) = header(req, "x-api-key") else {
        return Some(error(
            401,
            "authentication_error",
            "x-api-key header is required",
        ));
    };
    if !shared.key_is_valid(KIND, key) {
        return Some(error(401, "authentication_error", "invalid x-api-key"));
    }
    note_key(shared, req, || FakeProvider::key_id(key));
    None
}

/// Mode, version, key and body checks shared by the generation endpoints: the body's model
/// and stream flag, or the answer to send.
async fn check_generation(
    req: &HttpRequest,
    shared: &Shared,
    body: &[u8],
) -> Result<(String, bool), HttpResponse> {
    let probe = BodyProbe::parse(body);
    let model = probe.as_ref().and_then(BodyProbe::model);
    let streamed = probe.as_ref().is_some_and(BodyProbe::stream);
    note_request(shared, req, model, body.len(), streamed);
    if let Some(res) = shared.apply_mode(KIND, mode_error).await {
        return Err(res);
    }
    if let Some(res) = check_version(req).or_else(|| check_key(req, shared)) {
        return Err(res);
    }
    let Some(probe) = &probe else {
        return Err(error(
            400,
            "invalid_request_error",
            "There was an error parsing the body of your request. The body must be a JSON object.",
        ));
    };
    let Some(model) = probe.model() else {
        return Err(error(400, "invalid_request_error", "model: Field required"));
    };
    Ok((model.to_owned(), streamed))
}

fn with_request_id(mut res: HttpResponse, shared: &Shared) -> HttpResponse {
    let id = format!("req_fake{:016x}", shared.next_id());
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&id) {
        res.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("request-id"),
            v,
        );
    }
    res
}

async fn messages(req: HttpRequest, shared: web::Data<Shared>, body: web::Bytes) -> HttpResponse {
    let (model, streamed) = match check_generation(&req, &shared, &body).await {
        Ok(ok) => ok,
        Err(res) => return res,
    };
    let id = format!("msg_fake{:016x}", shared.next_id());
    let model = json_str(&model);
    let input_tokens = estimate_tokens(body.len());
    if !streamed {
        let res = raw_json_response(
            200,
            format!(
                r#"{{"id":"{id}","type":"message","role":"assistant","model":{model},"content":[{{"type":"text","text":"{FAKE_TEXT}"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{{"input_tokens":{input_tokens},"output_tokens":8}}}}"#
            ),
        );
        return with_request_id(res, &shared);
    }
    let (count, interval) = shared.stream_plan();
    let before = vec![
        sse(
            Some("message_start"),
            &format!(
                r#"{{"type":"message_start","message":{{"id":"{id}","type":"message","role":"assistant","model":{model},"content":[],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":{input_tokens},"output_tokens":1}}}}}}"#
            ),
        ),
        sse(
            Some("content_block_start"),
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
    ];
    let after = vec![
        sse(
            Some("content_block_stop"),
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        sse(
            Some("message_delta"),
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{count}}}}}"#
            ),
        ),
        sse(Some("message_stop"), r#"{"type":"message_stop"}"#),
    ];
    let events = Events::new(
        before,
        count,
        |i| {
            sse(
                Some("content_block_delta"),
                &format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"chunk-{i}"}}}}"#
                ),
            )
        },
        after,
    );
    let shared = shared.into_inner();
    let res = stream::respond(
        &shared,
        KIND,
        req.path(),
        "text/event-stream; charset=utf-8",
        events,
        interval,
    );
    with_request_id(res, &shared)
}

async fn count_tokens(
    req: HttpRequest,
    shared: web::Data<Shared>,
    body: web::Bytes,
) -> HttpResponse {
    if let Err(res) = check_generation(&req, &shared, &body).await {
        return res;
    }
    let res = raw_json_response(
        200,
        format!(r#"{{"input_tokens":{}}}"#, estimate_tokens(body.len())),
    );
    with_request_id(res, &shared)
}

async fn list_models(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    if let Some(res) = shared.apply_mode(KIND, mode_error).await {
        return res;
    }
    match header(&req, "anthropic-version") {
        None => {
            return error(
                400,
                "invalid_request_error",
                "anthropic-version: header is required",
            );
        }
        Some(v) if !KNOWN_VERSIONS.contains(&v) => {
            return error(
                400,
                "invalid_request_error",
                &format!("anthropic-version: invalid version {v}"),
            );
        }
        Some(_) => {}
    }
    let Some(key) = header(&req, "x-api-key") else {
        return error(401, "authentication_error", "x-api-key header is required");
    };
    if !shared.key_is_valid(KIND, key) {
        return error(401, "authentication_error", "invalid x-api-key");
    }
    let Some(query) = query_map(&req) else {
        return error(400, "invalid_request_error", "invalid query string");
    };
    if let Some(limit) = query.get("limit")
        && !matches!(limit.parse::<u32>(), Ok(1..=1000))
    {
        return error(
            400,
            "invalid_request_error",
            "limit: Input should be a valid integer between 1 and 1000",
        );
    }
    json_response(
        200,
        json!({
            "data": [{
                "type": "model",
                "id": "claude-sonnet-4-5",
                "display_name": "Claude Sonnet 4.5",
                "created_at": "2025-09-29T00:00:00Z",
            }],
            "has_more": false,
            "first_id": "claude-sonnet-4-5",
            "last_id": "claude-sonnet-4-5",
        }),
    )
}
