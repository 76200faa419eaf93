//! Anthropic API: `GET /v1/models` with `x-api-key` and `anthropic-version`.

use actix_web::{HttpRequest, HttpResponse, web};
use byok_operator::providers::ProviderKind;
use serde_json::json;

use super::{FakeMode, Shared, header, json_response, query_map, random_alnum};

const KIND: ProviderKind = ProviderKind::Anthropic;
const KNOWN_VERSIONS: [&str; 2] = ["2023-06-01", "2023-01-01"];

pub(super) fn scope() -> actix_web::Scope {
    web::scope("/anthropic")
        .service(
            web::resource("/v1/models")
                .route(web::get().to(list_models))
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
