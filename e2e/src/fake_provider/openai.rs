//! OpenAI API and OpenAI-compatible endpoints: `GET {base}/models` with `authorization:
//! Bearer KEY`. One implementation serves both, under different prefixes.

use actix_web::{HttpRequest, HttpResponse, web};
use byok_operator::providers::ProviderKind;
use serde_json::json;

use super::{FakeMode, Shared, bearer, json_response};

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

fn mode_error(mode: FakeMode, key: Option<&str>) -> Option<HttpResponse> {
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
