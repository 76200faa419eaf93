//! The proxy's own answers, in the error shape of the key's provider, so the application's
//! SDK raises its usual typed error with our message. Pure.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::providers::ProviderKind;

/// Why the proxy answers itself instead of the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The key is not (or no longer) in service: 503.
    KeyUnavailable(String),
    /// `allowedModels` says no, or the model cannot be checked: 403.
    ModelNotAllowed(String),
    /// An endpoint the key never reaches through the sidecar (see [`super::endpoints`]): 403.
    EndpointNotAllowed(String),
    /// The request is malformed for the proxy (path, body): 400.
    BadRequest(String),
    /// The body to inspect is larger than the cap: 413.
    TooLarge(u64),
    /// WebSocket and other upgrades (realtime APIs): 400.
    Upgrade,
    /// The provider could not be reached or the connection failed: 502.
    Upstream(String),
    /// A per-pod limit (`spec.limits.perPod`): 429, `retry-after` in seconds.
    RateLimited { message: String, retry_after: u64 },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::KeyUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::ModelNotAllowed(_) | Refusal::EndpointNotAllowed(_) => StatusCode::FORBIDDEN,
            Refusal::BadRequest(_) | Refusal::Upgrade => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Upstream(_) => StatusCode::BAD_GATEWAY,
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn message(&self) -> String {
        let text = match self {
            Refusal::KeyUnavailable(m)
            | Refusal::ModelNotAllowed(m)
            | Refusal::EndpointNotAllowed(m)
            | Refusal::BadRequest(m)
            | Refusal::Upstream(m)
            | Refusal::RateLimited { message: m, .. } => m.clone(),
            Refusal::TooLarge(cap) => format!(
                "the request body is larger than the {cap} bytes the byok proxy reads to check its model"
            ),
            Refusal::Upgrade => {
                "WebSocket upgrades (realtime APIs) are not supported by the byok proxy".into()
            }
        };
        format!("byok-proxy: {text}")
    }

    /// The `type`/`code` word of the error body.
    fn code(&self) -> &'static str {
        match self {
            Refusal::KeyUnavailable(_) => "key_unavailable",
            Refusal::ModelNotAllowed(_) => "model_not_allowed",
            Refusal::EndpointNotAllowed(_) => "endpoint_not_allowed",
            Refusal::BadRequest(_) => "invalid_request",
            Refusal::TooLarge(_) => "request_too_large",
            Refusal::Upgrade => "upgrade_not_supported",
            Refusal::Upstream(_) => "upstream_unreachable",
            Refusal::RateLimited { .. } => "rate_limit_exceeded",
        }
    }
}

/// The JSON body of `refusal` in `provider`'s error shape.
pub fn error_body(provider: Option<ProviderKind>, refusal: &Refusal) -> serde_json::Value {
    let status = refusal.status();
    let message = refusal.message();
    match provider {
        Some(ProviderKind::Anthropic) => {
            let error_type = match status {
                StatusCode::FORBIDDEN => "permission_error",
                StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
                StatusCode::BAD_REQUEST => "invalid_request_error",
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": error_type, "message": message}})
        }
        Some(ProviderKind::Google | ProviderKind::Vertex) => {
            let grpc = match status {
                StatusCode::FORBIDDEN => "PERMISSION_DENIED",
                StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "INVALID_ARGUMENT",
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
                StatusCode::TOO_MANY_REQUESTS => "RESOURCE_EXHAUSTED",
                _ => "INTERNAL",
            };
            json!({"error": {"code": status.as_u16(), "message": message, "status": grpc}})
        }
        // OpenAI's shape, which Azure and compatible servers share; also for a key whose
        // provider is not known yet.
        _ => {
            let error_type = match status {
                StatusCode::FORBIDDEN => "permission_error",
                StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
                // OpenAI's own rate-limit answers say `requests` or `tokens`.
                StatusCode::TOO_MANY_REQUESTS => "requests",
                _ => "server_error",
            };
            let param = matches!(refusal, Refusal::ModelNotAllowed(_)).then_some("model");
            json!({"error": {"message": message, "type": error_type, "param": param, "code": refusal.code()}})
        }
    }
}

/// The full HTTP answer for `refusal`.
pub fn error_response(provider: Option<ProviderKind>, refusal: &Refusal) -> http::Response<Bytes> {
    let body = Bytes::from(error_body(provider, refusal).to_string());
    let mut res = http::Response::new(body);
    *res.status_mut() = refusal.status();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    match refusal {
        Refusal::KeyUnavailable(_) => {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        Refusal::RateLimited { retry_after, .. } => {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        _ => {}
    }
    res.headers_mut().insert(
        http::HeaderName::from_static("x-byok-proxy-error"),
        HeaderValue::from_static(refusal.code()),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_provider_gets_its_own_error_shape() {
        let r = Refusal::ModelNotAllowed("model \"x\" is not allowed".into());
        let a = error_body(Some(ProviderKind::Anthropic), &r);
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "permission_error");
        let o = error_body(Some(ProviderKind::OpenAI), &r);
        assert_eq!(o["error"]["param"], "model");
        assert_eq!(o["error"]["code"], "model_not_allowed");
        let g = error_body(Some(ProviderKind::Google), &r);
        assert_eq!(g["error"]["status"], "PERMISSION_DENIED");
        assert_eq!(g["error"]["code"], 403);
        let res = error_response(
            Some(ProviderKind::Vertex),
            &Refusal::KeyUnavailable("revoked".into()),
        );
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()[header::RETRY_AFTER], "5");
        assert!(String::from_utf8_lossy(res.body()).contains("byok-proxy: revoked"));
    }

    /// The SDKs retry a 429 after `retry-after` and raise their rate-limit error type.
    #[test]
    fn a_limit_answers_in_each_providers_rate_limit_shape() {
        let r = Refusal::RateLimited {
            message: "over".into(),
            retry_after: 17,
        };
        let a = error_body(Some(ProviderKind::Anthropic), &r);
        assert_eq!(a["error"]["type"], "rate_limit_error");
        let o = error_body(Some(ProviderKind::OpenAI), &r);
        assert_eq!(o["error"]["code"], "rate_limit_exceeded");
        assert_eq!(o["error"]["type"], "requests");
        let g = error_body(Some(ProviderKind::Google), &r);
        assert_eq!(g["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(g["error"]["code"], 429);
        let res = error_response(Some(ProviderKind::Azure), &r);
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()[header::RETRY_AFTER], "17");
    }
}
