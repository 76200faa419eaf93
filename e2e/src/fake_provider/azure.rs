//! Azure OpenAI: `GET /openai/models?api-version=…` with `api-key` (verification); chat
//! completions on a deployment (`POST /openai/deployments/{deployment}/chat/completions
//! ?api-version=…` with `api-key`) and on the v1 API (`POST /openai/v1/chat/completions`,
//! model in the body, `api-key` or `authorization: Bearer`), answered as OpenAI does.

use actix_web::{HttpRequest, HttpResponse, web};
use byok_operator::providers::ProviderKind;
use serde_json::json;

use super::{
    BodyProbe, FakeMode, FakeProvider, Shared, bearer, header, json_response, note_key,
    note_request, openai, query_map,
};

const KIND: ProviderKind = ProviderKind::Azure;

pub(super) fn scope() -> actix_web::Scope {
    web::scope("/azure")
        .service(
            web::resource("/openai/models")
                .route(web::get().to(list_models))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/openai/deployments/{deployment}/chat/completions")
                .route(web::post().to(deployment_chat))
                .default_service(web::to(not_found)),
        )
        .service(
            web::resource("/openai/v1/chat/completions")
                .route(web::post().to(v1_chat))
                .default_service(web::to(not_found)),
        )
        .default_service(web::to(not_found))
}

fn error(code: u16, message: &str) -> HttpResponse {
    json_response(
        code,
        json!({ "error": { "code": code.to_string(), "message": message } }),
    )
}

async fn not_found() -> HttpResponse {
    error(404, "Resource not found")
}

fn unauthorized() -> HttpResponse {
    error(
        401,
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
    )
}

fn mode_error(mode: FakeMode) -> Option<HttpResponse> {
    Some(match mode {
        FakeMode::Normal | FakeMode::Slow(_) => return None,
        FakeMode::Unauthorized | FakeMode::GeminiKeyInvalid => unauthorized(),
        FakeMode::RateLimited | FakeMode::InsufficientQuota => {
            let mut res = error(
                429,
                "Requests to the Models_List Operation under Azure OpenAI API version 2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.",
            );
            res.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from_static("1"),
            );
            res
        }
        FakeMode::ServerError => error(500, "Internal server error"),
        FakeMode::Overloaded => error(
            503,
            "The service is temporarily unable to process your request. Please try again later.",
        ),
    })
}

/// `2024-10-21`, `2025-04-01-preview`, …
fn is_api_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

async fn list_models(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    if let Some(res) = shared.apply_mode(KIND, mode_error).await {
        return res;
    }
    let api_version_ok = query_map(&req)
        .and_then(|q| q.get("api-version").map(|v| is_api_version(v)))
        .unwrap_or(false);
    if !api_version_ok {
        return error(404, "Resource not found");
    }
    match header(&req, "api-key") {
        Some(key) if shared.key_is_valid(KIND, key) => {}
        _ => return unauthorized(),
    }
    json_response(
        200,
        json!({
            "data": [{ "id": "gpt-4o", "object": "model", "status": "succeeded" }],
            "object": "list",
        }),
    )
}

/// The deployments API: `api-version` required, `api-key` only, model = deployment.
async fn deployment_chat(
    req: HttpRequest,
    shared: web::Data<Shared>,
    deployment: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let deployment = deployment.into_inner();
    let probe = BodyProbe::parse(&body);
    let streamed = probe.as_ref().is_some_and(BodyProbe::stream);
    note_request(&shared, &req, Some(&deployment), body.len(), streamed);
    if let Some(res) = shared.apply_mode(KIND, mode_error).await {
        return res;
    }
    match query_map(&req).and_then(|q| q.get("api-version").cloned()) {
        None => return error(404, "Resource not found"),
        Some(v) if !is_api_version(&v) => {
            return json_response(
                400,
                json!({ "error": { "code": "BadRequest", "message": "API version not supported" } }),
            );
        }
        Some(_) => {}
    }
    let Some(key) = header(&req, "api-key").filter(|k| shared.key_is_valid(KIND, k)) else {
        return unauthorized();
    };
    note_key(&shared, &req, || FakeProvider::key_id(key));
    if probe.is_none() {
        return openai::unparsable_body();
    }
    openai::chat_completion(
        &shared.into_inner(),
        KIND,
        req.path(),
        &deployment,
        &body,
        streamed,
    )
}

/// The v1 API: no `api-version`, `api-key` or a Bearer key, model in the body.
async fn v1_chat(req: HttpRequest, shared: web::Data<Shared>, body: web::Bytes) -> HttpResponse {
    let probe = BodyProbe::parse(&body);
    let model = probe.as_ref().and_then(BodyProbe::model);
    let streamed = probe.as_ref().is_some_and(BodyProbe::stream);
    note_request(&shared, &req, model, body.len(), streamed);
    if let Some(res) = shared.apply_mode(KIND, mode_error).await {
        return res;
    }
    let key = header(&req, "api-key").or_else(|| bearer(&req));
    let Some(key) = key.filter(|k| shared.key_is_valid(KIND, k)) else {
        return unauthorized();
    };
    note_key(&shared, &req, || FakeProvider::key_id(key));
    let Some(probe) = &probe else {
        return openai::unparsable_body();
    };
    let Some(model) = probe.model() else {
        return openai::missing_model();
    };
    openai::chat_completion(
        &shared.into_inner(),
        KIND,
        req.path(),
        model,
        &body,
        streamed,
    )
}
