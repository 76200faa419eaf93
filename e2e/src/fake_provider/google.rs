//! Google Gemini API: `GET /v1beta/models?pageSize=1` with `x-goog-api-key`, and the error
//! envelope shared with Vertex AI (`google::error`).

use actix_web::{HttpRequest, HttpResponse, web};
use byok_operator::providers::ProviderKind;
use serde_json::{Value, json};

use super::{FakeMode, Shared, header, json_response, query_map};

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
        .default_service(web::to(not_found))
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
