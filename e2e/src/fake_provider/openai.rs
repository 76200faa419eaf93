//! OpenAI API and OpenAI-compatible endpoints with `authorization: Bearer KEY`: `GET
//! {base}/models` (verification), `POST {base}/chat/completions`, `POST {base}/responses`
//! (each plain or `"stream": true`) and `POST {base}/embeddings`. One implementation serves
//! both, under different prefixes; Azure reuses the chat completion rendering.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use byok_operator::providers::ProviderKind;
use serde::Deserialize;
use serde_json::json;

use super::stream::{self, Events, sse};
use super::{
    BodyProbe, FAKE_TEXT, FakeMode, FakeProvider, Shared, bearer, estimate_tokens, json_response,
    json_str, note_key, note_request, raw_json_response, unix_now,
};

/// Which of the two providers a scope serves.
struct Flavor {
    kind: ProviderKind,
    prefix: &'static str,
}

pub(super) fn scope(kind: ProviderKind, prefix: &'static str) -> actix_web::Scope {
    web::scope(prefix)
        .app_data(web::Data::new(Flavor { kind, prefix }))
        .service(
            web::resource("/v1/models")
                .route(web::get().to(list_models))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/v1/chat/completions")
                .route(web::post().to(chat_completions))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/v1/responses")
                .route(web::post().to(responses))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/v1/embeddings")
                .route(web::post().to(embeddings))
                .default_service(web::to(not_found)),
        )
        .default_service(web::to(not_found))
}

pub(super) fn error(
    code: u16,
    message: &str,
    error_type: &str,
    error_code: Option<&str>,
) -> HttpResponse {
    json_response(
        code,
        json!({
            "error": {
                "message": message,
                "type": error_type,
                "param": null,
                "code": error_code,
            }
        }),
    )
}

/// OpenAI echoes a masked form of the key it was given; so does the fake, so that tests can
/// check the operator never repeats the provider's message.
fn masked(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "*".repeat(chars.len().max(4));
    }
    let head: String = chars[..chars.len().min(8)].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 12))
}

fn invalid_key(key: &str) -> HttpResponse {
    error(
        401,
        &format!(
            "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
            masked(key)
        ),
        "invalid_request_error",
        Some("invalid_api_key"),
    )
}

fn missing_key() -> HttpResponse {
    error(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
    )
}

fn with_retry_after(mut res: HttpResponse) -> HttpResponse {
    res.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    res
}

pub(super) fn mode_error(mode: FakeMode, key: Option<&str>) -> Option<HttpResponse> {
    Some(match mode {
        FakeMode::Normal | FakeMode::Slow(_) => return None,
        FakeMode::Unauthorized | FakeMode::GeminiKeyInvalid => match key {
            Some(key) => invalid_key(key),
            None => missing_key(),
        },
        FakeMode::RateLimited => with_retry_after(error(
            429,
            "Rate limit reached for requests",
            "requests",
            Some("rate_limit_exceeded"),
        )),
        FakeMode::InsufficientQuota => error(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            Some("insufficient_quota"),
        ),
        FakeMode::ServerError => error(
            500,
            "The server had an error while processing your request.",
            "server_error",
            None,
        ),
        FakeMode::Overloaded => error(
            503,
            "The engine is currently overloaded, please try again later",
            "server_error",
            None,
        ),
    })
}

async fn not_found(req: HttpRequest, flavor: web::Data<Flavor>) -> HttpResponse {
    let path = req.path().strip_prefix(flavor.prefix).unwrap_or(req.path());
    error(
        404,
        &format!("Invalid URL ({} {path})", req.method()),
        "invalid_request_error",
        None,
    )
}

async fn list_models(
    req: HttpRequest,
    shared: web::Data<Shared>,
    flavor: web::Data<Flavor>,
) -> HttpResponse {
    let key = bearer(&req);
    if let Some(res) = shared
        .apply_mode(flavor.kind, |mode| mode_error(mode, key))
        .await
    {
        return res;
    }
    let Some(key) = key else {
        return missing_key();
    };
    if !shared.key_is_valid(flavor.kind, key) {
        return invalid_key(key);
    }
    json_response(
        200,
        json!({
            "object": "list",
            "data": [{
                "id": "gpt-4o-mini",
                "object": "model",
                "created": 1721172741,
                "owned_by": "system",
            }],
        }),
    )
}

/// OpenAI's answer to a body that is not a JSON object.
pub(super) fn unparsable_body() -> HttpResponse {
    error(
        400,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
        "invalid_request_error",
        None,
    )
}

/// OpenAI's answer to a body without `model`.
pub(super) fn missing_model() -> HttpResponse {
    error(
        400,
        "you must provide a model parameter",
        "invalid_request_error",
        None,
    )
}

/// Mode, key and body checks shared by the generation endpoints: (model, stream), or the
/// answer to send.
async fn check_generation(
    req: &HttpRequest,
    shared: &Shared,
    kind: ProviderKind,
    body: &[u8],
) -> Result<(String, bool), HttpResponse> {
    let probe = BodyProbe::parse(body);
    let model = probe.as_ref().and_then(BodyProbe::model);
    let streamed = probe.as_ref().is_some_and(BodyProbe::stream);
    note_request(shared, req, model, body.len(), streamed);
    let key = bearer(req);
    if let Some(res) = shared.apply_mode(kind, |mode| mode_error(mode, key)).await {
        return Err(res);
    }
    let Some(key) = key else {
        return Err(missing_key());
    };
    if !shared.key_is_valid(kind, key) {
        return Err(invalid_key(key));
    }
    note_key(shared, req, || FakeProvider::key_id(key));
    let Some(probe) = &probe else {
        return Err(unparsable_body());
    };
    let Some(model) = probe.model() else {
        return Err(missing_model());
    };
    Ok((model.to_owned(), streamed))
}

/// A chat completion (plain or streamed) for `model`: OpenAI's shapes, shared with Azure.
/// A stream asked for with `stream_options.include_usage` carries `"usage":null` in every
/// chunk and ends with one more chunk holding the usage and no choices, as OpenAI sends.
pub(super) fn chat_completion(
    shared: &Arc<Shared>,
    kind: ProviderKind,
    path: &str,
    model: &str,
    body: &[u8],
    streamed: bool,
) -> HttpResponse {
    let body_len = body.len();
    let id = format!("chatcmpl-fake{:016x}", shared.next_id());
    let model = json_str(model);
    let created = unix_now();
    let prompt = estimate_tokens(body_len);
    if !streamed {
        return raw_json_response(
            200,
            format!(
                r#"{{"id":"{id}","object":"chat.completion","created":{created},"model":{model},"choices":[{{"index":0,"message":{{"role":"assistant","content":"{FAKE_TEXT}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":8,"total_tokens":{}}},"system_fingerprint":"fp_fake"}}"#,
                prompt + 8
            ),
        );
    }
    let (count, interval) = shared.stream_plan();
    let include_usage = BodyProbe::parse(body).is_some_and(|p| p.include_usage());
    let usage_null = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let chunk = |delta: &str, finish: &str| {
        sse(
            None,
            &format!(
                r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"system_fingerprint":"fp_fake","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{usage_null}}}"#
            ),
        )
    };
    let before = vec![chunk(
        r#"{"role":"assistant","content":"","refusal":null}"#,
        "null",
    )];
    let mut after = vec![chunk("{}", r#""stop""#)];
    if include_usage {
        after.push(sse(
            None,
            &format!(
                r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"system_fingerprint":"fp_fake","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{count},"total_tokens":{}}}}}"#,
                prompt + count as u64
            ),
        ));
    }
    after.push(sse(None, "[DONE]"));
    let events = Events::new(
        before,
        count,
        |i| chunk(&format!(r#"{{"content":"chunk-{i}"}}"#), "null"),
        after,
    );
    stream::respond(
        shared,
        kind,
        path,
        "text/event-stream; charset=utf-8",
        events,
        interval,
    )
}

async fn chat_completions(
    req: HttpRequest,
    shared: web::Data<Shared>,
    flavor: web::Data<Flavor>,
    body: web::Bytes,
) -> HttpResponse {
    match check_generation(&req, &shared, flavor.kind, &body).await {
        Ok((model, streamed)) => chat_completion(
            &shared.into_inner(),
            flavor.kind,
            req.path(),
            &model,
            &body,
            streamed,
        ),
        Err(res) => res,
    }
}

async fn responses(
    req: HttpRequest,
    shared: web::Data<Shared>,
    flavor: web::Data<Flavor>,
    body: web::Bytes,
) -> HttpResponse {
    let (model, streamed) = match check_generation(&req, &shared, flavor.kind, &body).await {
        Ok(ok) => ok,
        Err(res) => return res,
    };
    let n = shared.next_id();
    let id = format!("resp_fake{n:016x}");
    let item_id = format!("msg_fake{n:016x}");
    let model = json_str(&model);
    let created = unix_now();
    let input = estimate_tokens(body.len());
    // A Response object; `text` is the output text (already JSON), or `None` for none yet.
    let response = |status: &str, text: Option<&str>, output_tokens: usize| {
        let output = match text {
            Some(text) => format!(
                r#"[{{"id":"{item_id}","type":"message","status":"completed","role":"assistant","content":[{{"type":"output_text","text":{text},"annotations":[],"logprobs":[]}}]}}]"#
            ),
            None => "[]".to_owned(),
        };
        let usage = if text.is_some() {
            format!(
                r#"{{"input_tokens":{input},"input_tokens_details":{{"cached_tokens":0}},"output_tokens":{output_tokens},"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":{}}}"#,
                input + output_tokens as u64
            )
        } else {
            "null".to_owned()
        };
        format!(
            r#"{{"id":"{id}","object":"response","created_at":{created},"status":"{status}","error":null,"incomplete_details":null,"model":{model},"output":{output},"parallel_tool_calls":true,"tool_choice":"auto","tools":[],"usage":{usage}}}"#
        )
    };
    if !streamed {
        return raw_json_response(200, response("completed", Some(&json_str(FAKE_TEXT)), 8));
    }
    let (count, interval) = shared.stream_plan();
    let full_text = json_str(&(0..count).map(|i| format!("chunk-{i}")).collect::<String>());
    // sequence_number: the framing before the deltas is 0..=3, delta i is 4 + i.
    let event = |name: &str, seq: usize, rest: &str| {
        sse(
            Some(name),
            &format!(r#"{{"type":"{name}","sequence_number":{seq},{rest}}}"#),
        )
    };
    let in_progress = response("in_progress", None, 0);
    let item = |status: &str, content: &str| {
        format!(
            r#"{{"id":"{item_id}","type":"message","status":"{status}","role":"assistant","content":{content}}}"#
        )
    };
    let part = |text: &str| format!(r#"{{"type":"output_text","text":{text},"annotations":[]}}"#);
    let empty_text = json_str("");
    let before = vec![
        event(
            "response.created",
            0,
            &format!(r#""response":{in_progress}"#),
        ),
        event(
            "response.in_progress",
            1,
            &format!(r#""response":{in_progress}"#),
        ),
        event(
            "response.output_item.added",
            2,
            &format!(r#""output_index":0,"item":{}"#, item("in_progress", "[]")),
        ),
        event(
            "response.content_part.added",
            3,
            &format!(
                r#""item_id":"{item_id}","output_index":0,"content_index":0,"part":{}"#,
                part(&empty_text)
            ),
        ),
    ];
    let done = 4 + count;
    let after = vec![
        event(
            "response.output_text.done",
            done,
            &format!(
                r#""item_id":"{item_id}","output_index":0,"content_index":0,"text":{full_text}"#
            ),
        ),
        event(
            "response.content_part.done",
            done + 1,
            &format!(
                r#""item_id":"{item_id}","output_index":0,"content_index":0,"part":{}"#,
                part(&full_text)
            ),
        ),
        event(
            "response.output_item.done",
            done + 2,
            &format!(
                r#""output_index":0,"item":{}"#,
                item("completed", &format!("[{}]", part(&full_text)))
            ),
        ),
        event(
            "response.completed",
            done + 3,
            &format!(
                r#""response":{}"#,
                response("completed", Some(&full_text), count)
            ),
        ),
    ];
    let events = Events::new(
        before,
        count,
        |i| {
            event(
                "response.output_text.delta",
                4 + i,
                &format!(
                    r#""item_id":"{item_id}","output_index":0,"content_index":0,"delta":"chunk-{i}","logprobs":[]"#
                ),
            )
        },
        after,
    );
    stream::respond(
        &shared.into_inner(),
        flavor.kind,
        req.path(),
        "text/event-stream; charset=utf-8",
        events,
        interval,
    )
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    dimensions: Option<u32>,
    #[serde(default)]
    encoding_format: Option<String>,
}

async fn embeddings(
    req: HttpRequest,
    shared: web::Data<Shared>,
    flavor: web::Data<Flavor>,
    body: web::Bytes,
) -> HttpResponse {
    let (model, _) = match check_generation(&req, &shared, flavor.kind, &body).await {
        Ok(ok) => ok,
        Err(res) => return res,
    };
    let Ok(request) = serde_json::from_slice::<EmbeddingsRequest>(&body) else {
        return unparsable_body();
    };
    let inputs = match &request.input {
        Some(serde_json::Value::String(_)) => 1,
        Some(serde_json::Value::Array(items)) if !items.is_empty() => {
            // An array of strings is a batch; an array of token ids is one input.
            if items.iter().all(serde_json::Value::is_number) {
                1
            } else {
                items.len()
            }
        }
        _ => {
            return error(
                400,
                "'input' is a required property",
                "invalid_request_error",
                None,
            );
        }
    };
    let dims = request.dimensions.unwrap_or(8).clamp(1, 4096) as usize;
    // A fixed unit vector along the first axis.
    let vector: Vec<f32> = (0..dims).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    let embedding = if request.encoding_format.as_deref() == Some("base64") {
        let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(vector)
    };
    let data: Vec<serde_json::Value> = (0..inputs)
        .map(|index| json!({ "object": "embedding", "index": index, "embedding": embedding }))
        .collect();
    let tokens = estimate_tokens(body.len());
    json_response(
        200,
        json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        }),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn masks_like_openai() {
        assert_eq!(
            super::masked("sk-proj-0123456789abcd"),
            "sk-proj-**********abcd"
        );
        assert_eq!(super::masked("short"), "*****");
    }
}
