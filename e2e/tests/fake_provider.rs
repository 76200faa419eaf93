//! The fake LLM provider against a real HTTPS client (reqwest + rustls): every provider's
//! verification call, its failure modes, the counters, the Vertex JWT flow, the admin API and
//! the `fake-provider` binary. Traffic goes to 127.0.0.1 only.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use byok_e2e::fake_provider::{
    FakeMode, FakeProvider, FakeProviderConfig, TEST_SA_KEY_ID, TEST_SA_PRIVATE_KEY_PEM,
    TEST_SA_PUBLIC_KEY_PEM, test_service_account_json,
};
use byok_operator::providers::ProviderKind;
use reqwest::header::HeaderMap;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

const ANTHROPIC_KEY: &str = "sk-ant-api03-good-key-0001";
const OPENAI_KEY: &str = "sk-proj-good0123456789abcd";
const COMPAT_KEY: &str = "compat-good-key-0123456789";
const GOOGLE_KEY: &str = "AIzaSyGoodKey0123456789";
const AZURE_KEY: &str = "0123456789abcdef0123456789abcdef";
const SA_EMAIL: &str = "verifier@proj-1.iam.gserviceaccount.com";
const SA_PROJECT: &str = "proj-1";

/// The providers verified with a static key (vertex is separate).
const KEYED: [(ProviderKind, &str); 5] = [
    (ProviderKind::Anthropic, ANTHROPIC_KEY),
    (ProviderKind::OpenAI, OPENAI_KEY),
    (ProviderKind::OpenAICompatible, COMPAT_KEY),
    (ProviderKind::Google, GOOGLE_KEY),
    (ProviderKind::Azure, AZURE_KEY),
];

fn install_crypto() {
    // Err only means another test installed it first.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn start() -> FakeProvider {
    install_crypto();
    let mut valid_keys: Vec<_> = KEYED.iter().map(|(k, v)| (*k, v.to_string())).collect();
    valid_keys.push((
        ProviderKind::Vertex,
        test_service_account_json(SA_EMAIL, SA_PROJECT),
    ));
    FakeProvider::start(FakeProviderConfig {
        valid_keys,
        ..Default::default()
    })
    .await
    .expect("starting the fake provider")
}

fn client(fake: &FakeProvider) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(fake.ca_pem().as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let res = req.send().await.expect("request failed");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

/// The wire contract's verification request for `kind`, authenticated with `key` the way
/// that provider expects.
fn verify_request(
    client: &reqwest::Client,
    fake: &FakeProvider,
    kind: ProviderKind,
    key: &str,
) -> reqwest::RequestBuilder {
    let base = fake.base_url(kind);
    match kind {
        ProviderKind::Anthropic => client
            .get(format!("{base}/v1/models?limit=1"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01"),
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible => client
            .get(format!("{base}/models"))
            .header("authorization", format!("Bearer {key}")),
        ProviderKind::Google => client
            .get(format!("{base}/v1beta/models?pageSize=1"))
            .header("x-goog-api-key", key),
        ProviderKind::Azure => client
            .get(format!("{base}/openai/models?api-version=2024-10-21"))
            .header("api-key", key),
        ProviderKind::Vertex => unreachable!("vertex has its own flow"),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign_jwt(header: &Value, claims: &Value) -> String {
    let der = PrivateKeyDer::from_pem_slice(TEST_SA_PRIVATE_KEY_PEM.as_bytes()).unwrap();
    let pair = RsaKeyPair::from_pkcs8(der.secret_der()).unwrap();
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signed.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn jwt_header() -> Value {
    json!({ "alg": "RS256", "typ": "JWT", "kid": TEST_SA_KEY_ID })
}

fn jwt_claims(fake: &FakeProvider, iss: &str) -> Value {
    let now = unix_now();
    json!({
        "iss": iss,
        "scope": "https://www.googleapis.com/auth/cloud-platform",
        "aud": fake.vertex_token_url(),
        "iat": now,
        "exp": now + 3600,
    })
}

fn token_request(
    client: &reqwest::Client,
    fake: &FakeProvider,
    assertion: &str,
) -> reqwest::RequestBuilder {
    client
        .post(fake.vertex_token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        ))
}

fn vertex_models(
    client: &reqwest::Client,
    fake: &FakeProvider,
    project: &str,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    let req = client.get(format!(
        "{}/v1/projects/{project}/locations/us-central1/models?pageSize=1",
        fake.base_url(ProviderKind::Vertex)
    ));
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

async fn vertex_token(client: &reqwest::Client, fake: &FakeProvider) -> String {
    let jwt = sign_jwt(&jwt_header(), &jwt_claims(fake, SA_EMAIL));
    let a = send(token_request(client, fake, &jwt)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "current_thread")]
async fn base_urls_follow_the_layout() {
    let fake = start().await;
    let origin = format!("https://127.0.0.1:{}", fake.addr().port());
    assert!(fake.addr().ip().is_loopback());
    for (kind, path) in [
        (ProviderKind::Anthropic, "/anthropic"),
        (ProviderKind::OpenAI, "/openai/v1"),
        (ProviderKind::Google, "/google"),
        (ProviderKind::Azure, "/azure"),
        (ProviderKind::OpenAICompatible, "/compat/v1"),
        (ProviderKind::Vertex, "/vertex"),
    ] {
        assert_eq!(fake.base_url(kind), format!("{origin}{path}"));
    }
    assert_eq!(
        fake.vertex_token_url(),
        format!("{origin}/vertex-token/token")
    );
    assert!(fake.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
}

/// With `http2`, a client offering h2 (ALPN) gets HTTP/2, as from a real provider, and one
/// that offers only HTTP/1.1 still gets HTTP/1.1; answers are the same either way. Without
/// it, the fake answers HTTP/1.1 whatever the client offers.
#[tokio::test(flavor = "current_thread")]
async fn http2_when_configured_and_offered() {
    install_crypto();
    for http2 in [true, false] {
        let fake = FakeProvider::start(FakeProviderConfig {
            valid_keys: vec![(ProviderKind::Anthropic, ANTHROPIC_KEY.into())],
            http2,
            ..Default::default()
        })
        .await
        .expect("starting the fake provider");
        let ca = reqwest::Certificate::from_pem(fake.ca_pem().as_bytes()).unwrap();
        let offers_h2 = client(&fake);
        let h1_only = reqwest::Client::builder()
            .tls_certs_only([ca])
            .no_proxy()
            .http1_only()
            .build()
            .unwrap();
        for (c, expected) in [
            (
                &offers_h2,
                if http2 {
                    reqwest::Version::HTTP_2
                } else {
                    reqwest::Version::HTTP_11
                },
            ),
            (&h1_only, reqwest::Version::HTTP_11),
        ] {
            for (key, status) in [(ANTHROPIC_KEY, 200), ("sk-ant-nope", 401)] {
                let res = verify_request(c, &fake, ProviderKind::Anthropic, key)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(res.version(), expected, "http2: {http2}");
                assert_eq!(res.status().as_u16(), status);
                let body: Value = res.json().await.expect("json");
                if status == 401 {
                    assert_eq!(body["error"]["type"], "authentication_error");
                } else {
                    assert_eq!(body["data"][0]["type"], "model");
                }
            }
        }
        let expected_h2 = if http2 { 2 } else { 0 };
        assert_eq!(fake.http2_requests(), expected_h2);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn anthropic_wire_protocol() {
    let fake = start().await;
    let c = client(&fake);
    let base = fake.base_url(ProviderKind::Anthropic);

    let ok = send(verify_request(
        &c,
        &fake,
        ProviderKind::Anthropic,
        ANTHROPIC_KEY,
    ))
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body["data"][0]["type"], "model");
    assert_eq!(ok.body["data"][0]["id"], "claude-sonnet-4-5");
    assert_eq!(ok.body["has_more"], false);

    let bad = send(verify_request(
        &c,
        &fake,
        ProviderKind::Anthropic,
        "sk-ant-nope",
    ))
    .await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.body["type"], "error");
    assert_eq!(bad.body["error"]["type"], "authentication_error");
    assert_eq!(bad.body["error"]["message"], "invalid x-api-key");
    assert!(bad.body["request_id"].as_str().unwrap().starts_with("req_"));
    assert!(bad.headers.contains_key("request-id"));

    // Wrong auth style: a Bearer token instead of x-api-key.
    let bearer = send(
        c.get(format!("{base}/v1/models?limit=1"))
            .bearer_auth(ANTHROPIC_KEY)
            .header("anthropic-version", "2023-06-01"),
    )
    .await;
    assert_eq!(bearer.status, 401);
    assert_eq!(bearer.body["error"]["type"], "authentication_error");

    let no_version = send(
        c.get(format!("{base}/v1/models?limit=1"))
            .header("x-api-key", ANTHROPIC_KEY),
    )
    .await;
    assert_eq!(no_version.status, 400);
    assert_eq!(no_version.body["error"]["type"], "invalid_request_error");

    // What anthropic-sdk-go v2 sends is accepted; a made-up version is the API's 400.
    for (version, status) in [("2026-10-21", 200), ("2024-13-45", 400)] {
        let answer = send(
            c.post(format!("{base}/v1/messages"))
                .header("x-api-key", ANTHROPIC_KEY)
                .header("anthropic-version", version)
                .json(&json!({
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 16,
                    "messages": [{ "role": "user", "content": "hi" }],
                })),
        )
        .await;
        assert_eq!(answer.status, status, "{version}: {}", answer.body);
    }

    let wrong_path = send(c.get(format!("{base}/v2/models"))).await;
    assert_eq!(wrong_path.status, 404);
    assert_eq!(wrong_path.body["error"]["type"], "not_found_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_compatible_wire_protocol() {
    let fake = start().await;
    let c = client(&fake);
    for (kind, key, other_key) in [
        (ProviderKind::OpenAI, OPENAI_KEY, COMPAT_KEY),
        (ProviderKind::OpenAICompatible, COMPAT_KEY, OPENAI_KEY),
    ] {
        let ok = send(verify_request(&c, &fake, kind, key)).await;
        assert_eq!(ok.status, 200, "{kind}");
        assert_eq!(ok.body["object"], "list");
        assert_eq!(ok.body["data"][0]["object"], "model");

        // Keys are per provider.
        let bad = send(verify_request(&c, &fake, kind, other_key)).await;
        assert_eq!(bad.status, 401, "{kind}");
        assert_eq!(bad.body["error"]["code"], "invalid_api_key");
        assert_eq!(bad.body["error"]["type"], "invalid_request_error");
        assert_eq!(bad.body["error"]["param"], Value::Null);
        let message = bad.body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("Incorrect API key provided: "));
        // Like OpenAI, the message echoes part of the key (but never all of it).
        assert!(message.contains(&other_key[other_key.len() - 4..]));
        assert!(!message.contains(other_key));

        // Wrong auth style: x-api-key instead of a Bearer token.
        let wrong_style = send(
            c.get(format!("{}/models", fake.base_url(kind)))
                .header("x-api-key", key),
        )
        .await;
        assert_eq!(wrong_style.status, 401, "{kind}");
        assert_eq!(wrong_style.body["error"]["type"], "invalid_request_error");

        let wrong_path = send(c.get(format!("{}/engines", fake.base_url(kind)))).await;
        assert_eq!(wrong_path.status, 404);
        assert_eq!(
            wrong_path.body["error"]["message"],
            "Invalid URL (GET /v1/engines)"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn google_wire_protocol() {
    let fake = start().await;
    let c = client(&fake);
    let base = fake.base_url(ProviderKind::Google);

    let ok = send(verify_request(&c, &fake, ProviderKind::Google, GOOGLE_KEY)).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body["models"][0]["name"], "models/gemini-2.5-flash");
    assert!(ok.body["nextPageToken"].is_string());

    let bad = send(verify_request(&c, &fake, ProviderKind::Google, "AIzaNope")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"]["code"], 400);
    assert_eq!(bad.body["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(bad.body["error"]["details"][0]["reason"], "API_KEY_INVALID");
    assert_eq!(
        bad.body["error"]["details"][0]["@type"],
        "type.googleapis.com/google.rpc.ErrorInfo"
    );

    let bearer = send(
        c.get(format!("{base}/v1beta/models?pageSize=1"))
            .bearer_auth(GOOGLE_KEY),
    )
    .await;
    assert_eq!(bearer.status, 401);
    assert_eq!(bearer.body["error"]["status"], "UNAUTHENTICATED");

    let anonymous = send(c.get(format!("{base}/v1beta/models?pageSize=1"))).await;
    assert_eq!(anonymous.status, 403);
    assert_eq!(anonymous.body["error"]["status"], "PERMISSION_DENIED");
}

#[tokio::test(flavor = "current_thread")]
async fn azure_wire_protocol() {
    let fake = start().await;
    let c = client(&fake);
    let base = fake.base_url(ProviderKind::Azure);

    let ok = send(verify_request(&c, &fake, ProviderKind::Azure, AZURE_KEY)).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body["object"], "list");
    assert_eq!(ok.body["data"][0]["status"], "succeeded");

    let bad = send(verify_request(&c, &fake, ProviderKind::Azure, "nope")).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.body["error"]["code"], "401");
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Access denied due to invalid subscription key")
    );

    let bearer = send(
        c.get(format!("{base}/openai/models?api-version=2024-10-21"))
            .bearer_auth(AZURE_KEY),
    )
    .await;
    assert_eq!(bearer.status, 401);

    let not_found = json!({ "error": { "code": "404", "message": "Resource not found" } });
    let no_version = send(
        c.get(format!("{base}/openai/models"))
            .header("api-key", AZURE_KEY),
    )
    .await;
    assert_eq!(no_version.status, 404);
    assert_eq!(no_version.body, not_found);

    let wrong_path = send(
        c.get(format!("{base}/openai/deployments?api-version=2024-10-21"))
            .header("api-key", AZURE_KEY),
    )
    .await;
    assert_eq!(wrong_path.status, 404);
    assert_eq!(wrong_path.body, not_found);
}

/// (status, error type/code/status token, retry-after expected) for a provider in a mode.
fn expected(kind: ProviderKind, mode: FakeMode) -> (u16, &'static str, bool) {
    use FakeMode::*;
    use ProviderKind::*;
    match (kind, mode) {
        (Anthropic, Unauthorized | GeminiKeyInvalid) => (401, "authentication_error", false),
        (Anthropic, RateLimited | InsufficientQuota) => (429, "rate_limit_error", true),
        (Anthropic, ServerError) => (500, "api_error", false),
        (Anthropic, Overloaded) => (529, "overloaded_error", false),
        (OpenAI | OpenAICompatible, Unauthorized | GeminiKeyInvalid) => {
            (401, "invalid_api_key", false)
        }
        (OpenAI | OpenAICompatible, RateLimited) => (429, "rate_limit_exceeded", true),
        (OpenAI | OpenAICompatible, InsufficientQuota) => (429, "insufficient_quota", false),
        (OpenAI | OpenAICompatible, ServerError) => (500, "server_error", false),
        (OpenAI | OpenAICompatible, Overloaded) => (503, "server_error", false),
        (Google, Unauthorized) => (401, "UNAUTHENTICATED", false),
        (Google, GeminiKeyInvalid) => (400, "API_KEY_INVALID", false),
        (Google, RateLimited | InsufficientQuota) => (429, "RESOURCE_EXHAUSTED", true),
        (Google, ServerError) => (500, "INTERNAL", false),
        (Google, Overloaded) => (503, "UNAVAILABLE", false),
        (Azure, Unauthorized | GeminiKeyInvalid) => (401, "401", false),
        (Azure, RateLimited | InsufficientQuota) => (429, "429", true),
        (Azure, ServerError) => (500, "500", false),
        (Azure, Overloaded) => (503, "503", false),
        other => unreachable!("{other:?}"),
    }
}

/// The token `expected` names, read from the provider's error body.
fn error_token(kind: ProviderKind, body: &Value) -> String {
    let e = &body["error"];
    let token = match kind {
        ProviderKind::Anthropic => e["type"].clone(),
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible => {
            if e["code"].is_null() {
                e["type"].clone()
            } else {
                e["code"].clone()
            }
        }
        ProviderKind::Google => {
            if e["details"][0]["reason"].is_string() {
                e["details"][0]["reason"].clone()
            } else {
                e["status"].clone()
            }
        }
        ProviderKind::Azure => e["code"].clone(),
        ProviderKind::Vertex => unreachable!(),
    };
    token.as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_gives_each_providers_real_failure() {
    let fake = start().await;
    let c = client(&fake);
    for mode in [
        FakeMode::Unauthorized,
        FakeMode::GeminiKeyInvalid,
        FakeMode::RateLimited,
        FakeMode::InsufficientQuota,
        FakeMode::ServerError,
        FakeMode::Overloaded,
    ] {
        fake.set_mode(mode);
        for (kind, key) in KEYED {
            let (status, token, retry_after) = expected(kind, mode);
            let a = send(verify_request(&c, &fake, kind, key)).await;
            assert_eq!(a.status, status, "{kind} {mode:?}: {}", a.body);
            assert_eq!(
                error_token(kind, &a.body),
                token,
                "{kind} {mode:?}: {}",
                a.body
            );
            assert_eq!(
                a.headers.get("retry-after").map(|v| v.to_str().unwrap()),
                retry_after.then_some("1"),
                "{kind} {mode:?}"
            );
            assert_eq!(
                a.headers.get("content-type").unwrap(),
                "application/json",
                "{kind} {mode:?}"
            );
        }
    }
    fake.set_mode(FakeMode::Normal);
    for (kind, key) in KEYED {
        assert_eq!(send(verify_request(&c, &fake, kind, key)).await.status, 200);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn set_mode_for_changes_one_provider_only() {
    let fake = start().await;
    let c = client(&fake);
    fake.set_mode_for(ProviderKind::OpenAI, FakeMode::InsufficientQuota);
    assert_eq!(fake.mode(ProviderKind::OpenAI), FakeMode::InsufficientQuota);
    assert_eq!(fake.mode(ProviderKind::Anthropic), FakeMode::Normal);
    for (kind, key) in KEYED {
        let a = send(verify_request(&c, &fake, kind, key)).await;
        let want = if kind == ProviderKind::OpenAI {
            429
        } else {
            200
        };
        assert_eq!(a.status, want, "{kind}");
    }
    // Unknown keys still get the real rejection in Normal mode, and set_mode(Normal)
    // resets the override.
    fake.set_mode(FakeMode::Normal);
    let a = send(verify_request(&c, &fake, ProviderKind::OpenAI, OPENAI_KEY)).await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "current_thread")]
async fn slow_mode_delays_then_answers_normally() {
    let fake = start().await;
    let c = client(&fake);
    let delay = Duration::from_millis(150);
    fake.set_mode_for(ProviderKind::Anthropic, FakeMode::Slow(delay));

    let started = Instant::now();
    let a = send(verify_request(
        &c,
        &fake,
        ProviderKind::Anthropic,
        ANTHROPIC_KEY,
    ))
    .await;
    assert_eq!(a.status, 200);
    assert!(started.elapsed() >= delay);

    let slow_invalid = send(verify_request(&c, &fake, ProviderKind::Anthropic, "nope")).await;
    assert_eq!(slow_invalid.status, 401);

    // A client timeout shorter than the delay sees a timeout.
    let err = verify_request(&c, &fake, ProviderKind::Anthropic, ANTHROPIC_KEY)
        .timeout(Duration::from_millis(30))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn counters_and_request_log() {
    let fake = start().await;
    // A base URL the operator rejects never reaches the fake: zero connections.
    assert_eq!(fake.connections(), 0);
    assert_eq!(fake.total_requests(), 0);

    let c = client(&fake);
    send(verify_request(
        &c,
        &fake,
        ProviderKind::Anthropic,
        ANTHROPIC_KEY,
    ))
    .await;
    send(verify_request(&c, &fake, ProviderKind::Anthropic, "nope")).await;
    send(verify_request(&c, &fake, ProviderKind::Google, GOOGLE_KEY)).await;
    send(c.get(format!("{}/elsewhere", fake.origin()))).await;
    assert_eq!(fake.requests(ProviderKind::Anthropic), 2);
    assert_eq!(fake.requests(ProviderKind::Google), 1);
    assert_eq!(fake.requests(ProviderKind::OpenAI), 0);
    assert_eq!(fake.total_requests(), 4);
    assert_eq!(fake.connections(), 1, "one pooled keep-alive connection");

    // A second client opens a second connection.
    send(verify_request(
        &client(&fake),
        &fake,
        ProviderKind::Azure,
        AZURE_KEY,
    ))
    .await;
    assert_eq!(fake.connections(), 2);

    let log = fake.requests_log();
    assert_eq!(log.len(), 5);
    assert_eq!(log[0].provider, Some(ProviderKind::Anthropic));
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].path, "/anthropic/v1/models");
    assert_eq!(log[0].query_names, ["limit"]);
    assert_eq!(log[0].auth_headers, ["x-api-key"]);
    assert!(
        log[0]
            .header_names
            .contains(&"anthropic-version".to_owned())
    );
    assert_eq!(log[0].status, Some(200));
    assert_eq!(log[1].status, Some(401));
    assert_eq!(log[2].auth_headers, ["x-goog-api-key"]);
    assert_eq!(log[3].provider, None);
    assert_eq!(log[3].status, Some(404));
    assert_eq!(log[4].auth_headers, ["api-key"]);
    let dump = format!("{log:?}");
    for (_, key) in KEYED {
        assert!(!dump.contains(key), "the log must not hold key values");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn failed_tls_handshake_still_counts_a_connection() {
    let fake = start().await;
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .no_proxy()
        .build()
        .unwrap();
    let err = verify_request(&untrusting, &fake, ProviderKind::OpenAI, OPENAI_KEY)
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(fake.connections(), 1);
    assert_eq!(fake.total_requests(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn keys_can_be_added_and_removed() {
    let fake = start().await;
    let c = client(&fake);
    let key = "sk-ant-api03-added-later";
    let status = |a: Answer| a.status;
    assert_eq!(
        status(send(verify_request(&c, &fake, ProviderKind::Anthropic, key)).await),
        401
    );
    fake.add_valid_key(ProviderKind::Anthropic, key);
    assert_eq!(
        status(send(verify_request(&c, &fake, ProviderKind::Anthropic, key)).await),
        200
    );
    // Valid for that provider only.
    assert_eq!(
        status(send(verify_request(&c, &fake, ProviderKind::OpenAI, key)).await),
        401
    );
    fake.remove_valid_key(ProviderKind::Anthropic, key);
    assert_eq!(
        status(send(verify_request(&c, &fake, ProviderKind::Anthropic, key)).await),
        401
    );
}

#[tokio::test(flavor = "current_thread")]
async fn vertex_jwt_flow_happy_path() {
    let fake = start().await;
    let c = client(&fake);
    let jwt = sign_jwt(&jwt_header(), &jwt_claims(&fake, SA_EMAIL));
    let t = send(token_request(&c, &fake, &jwt)).await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert_eq!(t.body["token_type"], "Bearer");
    assert_eq!(t.body["expires_in"], 3599);
    let token = t.body["access_token"].as_str().unwrap();
    assert!(token.starts_with("ya29.fake-"));

    let m = send(vertex_models(&c, &fake, SA_PROJECT, Some(token))).await;
    assert_eq!(m.status, 200, "{}", m.body);
    assert_eq!(m.body, json!({ "models": [] }));

    assert_eq!(fake.requests(ProviderKind::Vertex), 2);
    let log = fake.requests_log();
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].path, "/vertex-token/token");
    assert!(log[0].auth_headers.is_empty());
    assert_eq!(
        log[1].path,
        format!("/vertex/v1/projects/{SA_PROJECT}/locations/us-central1/models")
    );
    assert_eq!(log[1].auth_headers, ["authorization"]);
    assert!(!format!("{log:?}").contains(token));
}

#[tokio::test(flavor = "current_thread")]
async fn vertex_token_endpoint_rejections() {
    let fake = start().await;
    let c = client(&fake);
    let claims = jwt_claims(&fake, SA_EMAIL);

    // Bad signature: one bit of the signature flipped.
    let good = sign_jwt(&jwt_header(), &claims);
    let (signed, sig) = good.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[10] ^= 0x01;
    let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig));
    let a = send(token_request(&c, &fake, &tampered)).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body,
        json!({ "error": "invalid_grant", "error_description": "Invalid JWT Signature." })
    );

    // Signed by the right key, but claims altered after signing.
    let mut other = claims.clone();
    other["scope"] = json!("https://www.googleapis.com/auth/cloud-platform.read-only");
    let (_, other_claims, _) = {
        let s = sign_jwt(&jwt_header(), &other);
        let mut p = s.split('.').map(str::to_owned);
        (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
    };
    let mut parts: Vec<&str> = good.split('.').collect();
    parts[1] = &other_claims;
    let a = send(token_request(&c, &fake, &parts.join("."))).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "invalid_grant");

    // Unknown issuer.
    let jwt = sign_jwt(
        &jwt_header(),
        &jwt_claims(&fake, "nobody@x.iam.gserviceaccount.com"),
    );
    let a = send(token_request(&c, &fake, &jwt)).await;
    assert_eq!(a.status, 401);
    assert_eq!(
        a.body,
        json!({ "error": "invalid_client", "error_description": "The OAuth client was not found." })
    );

    // Wrong kid for a service account registered from its JSON key.
    let jwt = sign_jwt(
        &json!({ "alg": "RS256", "typ": "JWT", "kid": "0000" }),
        &claims,
    );
    let a = send(token_request(&c, &fake, &jwt)).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error_description"], "Invalid JWT Signature.");

    // aud is the real Google token URL, not the one the fake serves: audience check fails.
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("https://oauth2.googleapis.com/token");
    let a = send(token_request(
        &c,
        &fake,
        &sign_jwt(&jwt_header(), &wrong_aud),
    ))
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "invalid_grant");
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("Failed audience check")
    );
    // Only the path is compared: `localhost` instead of 127.0.0.1 is fine.
    let mut localhost_aud = claims.clone();
    localhost_aud["aud"] = json!(format!(
        "https://localhost:{}/vertex-token/token",
        fake.addr().port()
    ));
    let a = send(token_request(
        &c,
        &fake,
        &sign_jwt(&jwt_header(), &localhost_aud),
    ))
    .await;
    assert_eq!(a.status, 200, "{}", a.body);

    // Expired.
    let mut expired = claims.clone();
    expired["iat"] = json!(unix_now() - 7200);
    expired["exp"] = json!(unix_now() - 3600);
    let a = send(token_request(&c, &fake, &sign_jwt(&jwt_header(), &expired))).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "invalid_grant");

    // No cloud-platform scope.
    let mut no_scope = claims.clone();
    no_scope.as_object_mut().unwrap().remove("scope");
    let a = send(token_request(
        &c,
        &fake,
        &sign_jwt(&jwt_header(), &no_scope),
    ))
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "invalid_scope");

    // Wrong grant type; garbage assertion.
    let a = send(
        c.post(fake.vertex_token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("grant_type=client_credentials&assertion={good}")),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "unsupported_grant_type");
    let a = send(token_request(&c, &fake, "not.a-jwt")).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "invalid_grant");
}

#[tokio::test(flavor = "current_thread")]
async fn vertex_models_endpoint_rejections() {
    let fake = start().await;
    let c = client(&fake);

    let a = send(vertex_models(&c, &fake, SA_PROJECT, None)).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.body["error"]["status"], "UNAUTHENTICATED");

    let a = send(vertex_models(&c, &fake, SA_PROJECT, Some("ya29.made-up"))).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.body["error"]["status"], "UNAUTHENTICATED");

    // A service account registered from JSON may list models in its own project only.
    let token = vertex_token(&c, &fake).await;
    let a = send(vertex_models(&c, &fake, "someone-elses", Some(&token))).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body["error"]["code"], 403);
    assert_eq!(a.body["error"]["status"], "PERMISSION_DENIED");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Permission 'aiplatform.models.list' denied")
    );

    // Removing the service account revokes its tokens.
    fake.remove_valid_key(
        ProviderKind::Vertex,
        &test_service_account_json(SA_EMAIL, SA_PROJECT),
    );
    let a = send(vertex_models(&c, &fake, SA_PROJECT, Some(&token))).await;
    assert_eq!(a.status, 401);

    // Registered by public key only: any project.
    fake.add_service_account(SA_EMAIL, TEST_SA_PUBLIC_KEY_PEM)
        .unwrap();
    let token = vertex_token(&c, &fake).await;
    let a = send(vertex_models(&c, &fake, "any-project", Some(&token))).await;
    assert_eq!(a.status, 200, "{}", a.body);

    let a = send(c.get(format!(
        "{}/v1/projects/p/elsewhere",
        fake.base_url(ProviderKind::Vertex)
    )))
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.body["error"]["status"], "NOT_FOUND");
}

#[tokio::test(flavor = "current_thread")]
async fn vertex_modes() {
    let fake = start().await;
    let c = client(&fake);
    let jwt = sign_jwt(&jwt_header(), &jwt_claims(&fake, SA_EMAIL));

    for mode in [FakeMode::Unauthorized, FakeMode::GeminiKeyInvalid] {
        fake.set_mode_for(ProviderKind::Vertex, mode);
        let a = send(token_request(&c, &fake, &jwt)).await;
        assert_eq!(a.status, 401, "{mode:?}");
        assert_eq!(a.body["error"], "invalid_client");
    }

    for (mode, status, token) in [
        (FakeMode::RateLimited, 429, "RESOURCE_EXHAUSTED"),
        (FakeMode::InsufficientQuota, 429, "RESOURCE_EXHAUSTED"),
        (FakeMode::ServerError, 500, "INTERNAL"),
        (FakeMode::Overloaded, 503, "UNAVAILABLE"),
    ] {
        fake.set_mode_for(ProviderKind::Vertex, mode);
        let access = vertex_token(&c, &fake).await;
        let a = send(vertex_models(&c, &fake, SA_PROJECT, Some(&access))).await;
        assert_eq!(a.status, status, "{mode:?}");
        assert_eq!(a.body["error"]["status"], token, "{mode:?}");
        assert_eq!(a.headers.contains_key("retry-after"), status == 429);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn admin_api_sets_modes_and_reports_stats() {
    let fake = start().await;
    let c = client(&fake);
    let admin = format!("{}/__fake", fake.origin());

    let a = send(
        c.post(format!("{admin}/mode"))
            .json(&json!({ "mode": "insufficient-quota", "provider": "openai-compatible" })),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        fake.mode(ProviderKind::OpenAICompatible),
        FakeMode::InsufficientQuota
    );
    let a = send(verify_request(
        &c,
        &fake,
        ProviderKind::OpenAICompatible,
        COMPAT_KEY,
    ))
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.body["error"]["code"], "insufficient_quota");

    let a = send(
        c.post(format!("{admin}/mode"))
            .json(&json!({ "mode": "slow", "delay_ms": 5 })),
    )
    .await;
    assert_eq!(a.status, 200);
    for kind in ProviderKind::ALL {
        assert_eq!(fake.mode(kind), FakeMode::Slow(Duration::from_millis(5)));
    }

    let a = send(
        c.post(format!("{admin}/mode"))
            .json(&json!({ "mode": "sideways" })),
    )
    .await;
    assert_eq!(a.status, 400);
    let a = send(
        c.post(format!("{admin}/mode"))
            .json(&json!({ "mode": "normal", "provider": "nope" })),
    )
    .await;
    assert_eq!(a.status, 400);

    let stats = send(c.get(format!("{admin}/stats"))).await;
    assert_eq!(stats.status, 200);
    assert_eq!(
        stats.body["total_requests"], 1,
        "admin calls are not counted"
    );
    assert_eq!(stats.body["requests"]["openai-compatible"], 1);
    assert_eq!(stats.body["requests"]["anthropic"], 0);
    assert_eq!(stats.body["modes"]["google"], "slow");
    assert!(stats.body["connections"].as_u64().unwrap() >= 1);
    assert_eq!(fake.requests_log().len(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn stop_closes_the_port() {
    let fake = start().await;
    let addr = fake.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    fake.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[test]
fn starts_from_synchronous_code_too() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fake = runtime.block_on(start());
    // The server has its own thread: it answers while this one is not polling anything.
    let stream = std::net::TcpStream::connect(fake.addr()).unwrap();
    drop(stream);
    drop(runtime);
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = fake.addr();
    std::thread::spawn(move || {
        let _ = tx.send(std::net::TcpStream::connect(addr).is_ok());
    });
    assert!(
        rx.recv().unwrap(),
        "still serving after the runtime that started it is gone"
    );
    drop(fake);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;

    install_crypto();
    let dir = std::env::temp_dir().join(format!(
        "fake-provider-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_path = dir.join("ca.pem");
    let sa_path = dir.join("sa.json");
    let key_path = dir.join("google.key");
    std::fs::write(&sa_path, test_service_account_json(SA_EMAIL, SA_PROJECT)).unwrap();
    std::fs::write(&key_path, format!("{GOOGLE_KEY}\n")).unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-provider"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--ca-out")
        .arg(&ca_path)
        .arg("--valid-key")
        .arg(format!("openai={OPENAI_KEY}"))
        .arg("--valid-key-file")
        .arg(format!("google={}", key_path.display()))
        .arg("--service-account-json")
        .arg(&sa_path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = lines.next_line().await.unwrap().expect("a ready line");
    assert!(line.starts_with("fake-provider ready:"), "{line}");
    let url = |name: &str| {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {line}"))
            .to_owned()
    };

    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_path).unwrap()).unwrap();
    let c = reqwest::Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .build()
        .unwrap();
    let a = send(
        c.get(format!("{}/models", url("openai")))
            .bearer_auth(OPENAI_KEY),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = send(
        c.get(format!("{}/v1beta/models?pageSize=1", url("google")))
            .header("x-goog-api-key", GOOGLE_KEY),
    )
    .await;
    assert_eq!(a.status, 200, "the key file's newline is trimmed");
    assert!(url("vertex-token").ends_with("/vertex-token/token"));
    let stats = send(c.get(format!("{}/stats", url("admin")))).await;
    assert_eq!(stats.body["total_requests"], 2);

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- generation endpoints ----

/// Splits an SSE body into (event name, data) pairs; CRLF and LF framing alike.
fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (event, data)
        })
        .collect()
}

/// The `data:` payloads of an SSE body, parsed (`[DONE]` kept as a string).
fn sse_data(text: &str) -> Vec<Value> {
    sse_events(text)
        .into_iter()
        .map(|(_, d)| serde_json::from_str(&d).unwrap_or(Value::String(d)))
        .collect()
}

/// Sends and returns (status, content-type, body text).
async fn send_text(req: reqwest::RequestBuilder) -> (u16, String, String) {
    let res = req.send().await.expect("request failed");
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, res.text().await.unwrap())
}

/// Waits (polling, with a deadline) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A generation request to `kind` (not vertex) for `model`, authenticated with `key` the
/// way that provider expects; `stream` asks for a streamed answer.
fn generate_request(
    client: &reqwest::Client,
    fake: &FakeProvider,
    kind: ProviderKind,
    key: &str,
    model: &str,
    stream: bool,
) -> reqwest::RequestBuilder {
    let base = fake.base_url(kind);
    let chat = json!({
        "model": model,
        "messages": [{ "role": "user", "content": "hi" }],
        "stream": stream,
    });
    match kind {
        ProviderKind::Anthropic => client
            .post(format!("{base}/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({
                "model": model,
                "max_tokens": 16,
                "messages": [{ "role": "user", "content": "hi" }],
                "stream": stream,
            })),
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible => client
            .post(format!("{base}/chat/completions"))
            .bearer_auth(key)
            .json(&chat),
        ProviderKind::Google => {
            let method = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            client
                .post(format!("{base}/v1beta/models/{model}:{method}"))
                .header("x-goog-api-key", key)
                .json(&json!({ "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }] }))
        }
        ProviderKind::Azure => client
            .post(format!(
                "{base}/openai/deployments/{model}/chat/completions?api-version=2024-10-21"
            ))
            .header("api-key", key)
            .json(&chat),
        ProviderKind::Vertex => unreachable!("vertex has its own flow"),
    }
}

/// The delta texts of a streamed answer of `kind`, in order.
fn delta_texts(kind: ProviderKind, body: &str) -> Vec<String> {
    let data = sse_data(body);
    let texts = data.iter().filter_map(|d| match kind {
        ProviderKind::Anthropic => (d["type"] == "content_block_delta")
            .then(|| d["delta"]["text"].as_str().unwrap().to_owned()),
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible | ProviderKind::Azure => d["choices"]
            [0]["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
        ProviderKind::Google | ProviderKind::Vertex => {
            d["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        }
    });
    texts.collect()
}

fn chunks(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("chunk-{i}")).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn anthropic_messages() {
    let fake = start().await;
    let c = client(&fake);
    let base = fake.base_url(ProviderKind::Anthropic);
    let kind = ProviderKind::Anthropic;

    let ok = send(generate_request(
        &c,
        &fake,
        kind,
        ANTHROPIC_KEY,
        "claude-x",
        false,
    ))
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["type"], "message");
    assert_eq!(ok.body["role"], "assistant");
    assert_eq!(ok.body["model"], "claude-x");
    assert_eq!(ok.body["content"][0]["type"], "text");
    assert!(ok.body["content"][0]["text"].is_string());
    assert_eq!(ok.body["stop_reason"], "end_turn");
    assert!(ok.body["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(ok.body["id"].as_str().unwrap().starts_with("msg_"));
    assert!(ok.headers.contains_key("request-id"));
    let r = fake.requests_log().pop().unwrap();
    assert_eq!(r.path, "/anthropic/v1/messages");
    assert_eq!(r.model.as_deref(), Some("claude-x"));
    assert_eq!(r.key_id, Some(FakeProvider::key_id(ANTHROPIC_KEY)));
    assert!(r.body_bytes > 20);
    assert!(!r.stream);
    assert_eq!(r.auth_headers, ["x-api-key"]);
    assert_eq!(r.status, Some(200));

    let counted = send(
        c.post(format!("{base}/v1/messages/count_tokens"))
            .header("x-api-key", ANTHROPIC_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({ "model": "claude-x", "messages": [] })),
    )
    .await;
    assert_eq!(counted.status, 200);
    assert!(counted.body["input_tokens"].as_u64().unwrap() > 0);

    // A second key: key_id tells which one was used.
    let other = "sk-ant-api03-rotated-0002";
    fake.add_valid_key(kind, other);
    send(generate_request(&c, &fake, kind, other, "claude-x", false)).await;
    let r = fake.requests_log().pop().unwrap();
    assert_eq!(r.key_id, Some(FakeProvider::key_id(other)));
    assert_ne!(r.key_id, Some(FakeProvider::key_id(ANTHROPIC_KEY)));

    let bad = send(generate_request(
        &c,
        &fake,
        kind,
        "sk-ant-nope",
        "claude-x",
        false,
    ))
    .await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.body["error"]["type"], "authentication_error");
    let r = fake.requests_log().pop().unwrap();
    assert_eq!(r.key_id, None, "not authenticated");
    assert_eq!(r.model.as_deref(), Some("claude-x"));

    let bearer = send(
        c.post(format!("{base}/v1/messages"))
            .bearer_auth(ANTHROPIC_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({ "model": "claude-x", "messages": [] })),
    )
    .await;
    assert_eq!(bearer.status, 401);
    assert_eq!(bearer.body["error"]["type"], "authentication_error");
    assert_eq!(
        fake.requests_log().pop().unwrap().auth_headers,
        ["authorization"],
        "the x-api-key header never arrived"
    );

    let no_version = send(
        c.post(format!("{base}/v1/messages"))
            .header("x-api-key", ANTHROPIC_KEY)
            .json(&json!({ "model": "claude-x", "messages": [] })),
    )
    .await;
    assert_eq!(no_version.status, 400);
    assert_eq!(no_version.body["error"]["type"], "invalid_request_error");

    let no_model = send(
        c.post(format!("{base}/v1/messages"))
            .header("x-api-key", ANTHROPIC_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({ "messages": [] })),
    )
    .await;
    assert_eq!(no_model.status, 400);
    assert_eq!(no_model.body["error"]["type"], "invalid_request_error");
    assert_eq!(no_model.body["error"]["message"], "model: Field required");

    // Streamed: Anthropic's event framing, with the planned number of deltas.
    fake.set_stream_plan(4, Duration::ZERO);
    let (status, ct, text) = send_text(generate_request(
        &c,
        &fake,
        kind,
        ANTHROPIC_KEY,
        "claude-x",
        true,
    ))
    .await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for (name, data) in &events {
        let data: Value = serde_json::from_str(data).unwrap();
        assert_eq!(data["type"], name.as_deref().unwrap(), "data.type = event");
    }
    assert_eq!(delta_texts(kind, &text), chunks(4));
    let start: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(start["message"]["model"], "claude-x");
    let r = fake.requests_log().pop().unwrap();
    assert!(r.stream);
    let s = fake.streams().pop().unwrap();
    assert_eq!(s.provider, kind);
    assert_eq!(s.path, "/anthropic/v1/messages");
    assert_eq!(s.sent.len(), 4);
    assert!(s.completed && !s.cancelled);
    assert_eq!(fake.open_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_compatible_generation() {
    let fake = start().await;
    let c = client(&fake);
    fake.set_stream_plan(3, Duration::ZERO);
    for (kind, key, other_key) in [
        (ProviderKind::OpenAI, OPENAI_KEY, COMPAT_KEY),
        (ProviderKind::OpenAICompatible, COMPAT_KEY, OPENAI_KEY),
    ] {
        let base = fake.base_url(kind);
        let ok = send(generate_request(&c, &fake, kind, key, "gpt-x", false)).await;
        assert_eq!(ok.status, 200, "{kind}: {}", ok.body);
        assert_eq!(ok.body["object"], "chat.completion");
        assert_eq!(ok.body["model"], "gpt-x");
        assert_eq!(ok.body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(ok.body["choices"][0]["finish_reason"], "stop");
        assert!(ok.body["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let r = fake.requests_log().pop().unwrap();
        assert_eq!(r.provider, Some(kind));
        assert_eq!(r.model.as_deref(), Some("gpt-x"));
        assert_eq!(r.key_id, Some(FakeProvider::key_id(key)));
        assert_eq!(r.auth_headers, ["authorization"]);

        // Another provider's key, no key, and no model.
        let bad = send(generate_request(&c, &fake, kind, other_key, "gpt-x", false)).await;
        assert_eq!(bad.status, 401, "{kind}");
        assert_eq!(bad.body["error"]["code"], "invalid_api_key");
        let none = send(
            c.post(format!("{base}/chat/completions"))
                .json(&json!({ "model": "gpt-x", "messages": [] })),
        )
        .await;
        assert_eq!(none.status, 401);
        assert_eq!(none.body["error"]["type"], "invalid_request_error");
        assert!(fake.requests_log().pop().unwrap().auth_headers.is_empty());
        let no_model = send(
            c.post(format!("{base}/chat/completions"))
                .bearer_auth(key)
                .json(&json!({ "messages": [] })),
        )
        .await;
        assert_eq!(no_model.status, 400);
        assert_eq!(
            no_model.body["error"]["message"],
            "you must provide a model parameter"
        );

        // Chat stream: chunks, then `data: [DONE]`.
        let (status, ct, text) =
            send_text(generate_request(&c, &fake, kind, key, "gpt-x", true)).await;
        assert_eq!(status, 200);
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let data = sse_data(&text);
        assert_eq!(data.last().unwrap(), "[DONE]");
        assert!(sse_events(&text).iter().all(|(e, _)| e.is_none()));
        for chunk in &data[..data.len() - 1] {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "gpt-x");
        }
        assert_eq!(data[data.len() - 2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(delta_texts(kind, &text), chunks(3));

        // Responses API, plain and streamed.
        let resp = send(
            c.post(format!("{base}/responses"))
                .bearer_auth(key)
                .json(&json!({ "model": "gpt-r", "input": "hi" })),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.body["object"], "response");
        assert_eq!(resp.body["status"], "completed");
        assert_eq!(resp.body["model"], "gpt-r");
        assert_eq!(resp.body["output"][0]["content"][0]["type"], "output_text");
        let (status, ct, text) = send_text(
            c.post(format!("{base}/responses"))
                .bearer_auth(key)
                .json(&json!({ "model": "gpt-r", "input": "hi", "stream": true })),
        )
        .await;
        assert_eq!(status, 200);
        assert!(ct.starts_with("text/event-stream"));
        let events = sse_events(&text);
        let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
        assert_eq!(names.first(), Some(&"response.created"));
        assert_eq!(names.last(), Some(&"response.completed"));
        let deltas: Vec<String> = events
            .iter()
            .filter(|(e, _)| e.as_deref() == Some("response.output_text.delta"))
            .map(|(_, d)| {
                serde_json::from_str::<Value>(d).unwrap()["delta"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(deltas, chunks(3));
        let seqs: Vec<u64> = events
            .iter()
            .map(|(_, d)| {
                serde_json::from_str::<Value>(d).unwrap()["sequence_number"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let completed: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
        assert_eq!(completed["response"]["status"], "completed");
        assert_eq!(
            completed["response"]["output"][0]["content"][0]["text"],
            "chunk-0chunk-1chunk-2"
        );

        // Embeddings.
        let emb = send(
            c.post(format!("{base}/embeddings"))
                .bearer_auth(key)
                .json(&json!({ "model": "text-embedding-3-small", "input": ["a", "b"] })),
        )
        .await;
        assert_eq!(emb.status, 200, "{}", emb.body);
        assert_eq!(emb.body["object"], "list");
        assert_eq!(emb.body["data"].as_array().unwrap().len(), 2);
        assert_eq!(emb.body["data"][1]["object"], "embedding");
        assert!(emb.body["data"][0]["embedding"].is_array());
        assert_eq!(emb.body["model"], "text-embedding-3-small");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn google_generation() {
    let fake = start().await;
    let c = client(&fake);
    let base = fake.base_url(ProviderKind::Google);
    let kind = ProviderKind::Google;
    let body = json!({ "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }] });

    let ok = send(generate_request(
        &c, &fake, kind, GOOGLE_KEY, "gemini-x", false,
    ))
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["candidates"][0]["content"]["role"], "model");
    assert!(ok.body["candidates"][0]["content"]["parts"][0]["text"].is_string());
    assert_eq!(ok.body["candidates"][0]["finishReason"], "STOP");
    assert_eq!(ok.body["modelVersion"], "gemini-x");
    assert!(
        ok.body["usageMetadata"]["totalTokenCount"]
            .as_u64()
            .unwrap()
            > 0
    );
    let r = fake.requests_log().pop().unwrap();
    assert_eq!(r.path, "/google/v1beta/models/gemini-x:generateContent");
    assert_eq!(r.model.as_deref(), Some("gemini-x"));
    assert_eq!(r.key_id, Some(FakeProvider::key_id(GOOGLE_KEY)));
    assert_eq!(r.auth_headers, ["x-goog-api-key"]);

    // The key as a query parameter, on v1; only its name is recorded.
    let q = send(
        c.post(format!(
            "{base}/v1/models/gemini-x:generateContent?key={GOOGLE_KEY}"
        ))
        .json(&body),
    )
    .await;
    assert_eq!(q.status, 200, "{}", q.body);
    let r = fake.requests_log().pop().unwrap();
    assert_eq!(r.query_names, ["key"]);
    assert!(r.auth_headers.is_empty());
    assert_eq!(r.key_id, Some(FakeProvider::key_id(GOOGLE_KEY)));
    assert!(!format!("{r:?}").contains(GOOGLE_KEY));

    let bad = send(generate_request(
        &c, &fake, kind, "AIzaNope", "gemini-x", false,
    ))
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let bad = send(
        c.post(format!(
            "{base}/v1beta/models/gemini-x:generateContent?key=AIzaNope"
        ))
        .json(&body),
    )
    .await;
    assert_eq!(bad.body["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let anonymous = send(
        c.post(format!("{base}/v1beta/models/gemini-x:generateContent"))
            .json(&body),
    )
    .await;
    assert_eq!(anonymous.status, 403);
    assert_eq!(anonymous.body["error"]["status"], "PERMISSION_DENIED");
    let bearer = send(
        c.post(format!("{base}/v1beta/models/gemini-x:generateContent"))
            .bearer_auth(GOOGLE_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(bearer.status, 401);
    assert_eq!(bearer.body["error"]["status"], "UNAUTHENTICATED");
    let unknown = send(
        c.post(format!("{base}/v1beta/models/gemini-x:doSomething"))
            .header("x-goog-api-key", GOOGLE_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(unknown.status, 404);

    // Streamed with alt=sse: `data:` events; without: one JSON array.
    fake.set_stream_plan(3, Duration::ZERO);
    let (status, ct, text) = send_text(generate_request(
        &c, &fake, kind, GOOGLE_KEY, "gemini-x", true,
    ))
    .await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert_eq!(delta_texts(kind, &text), chunks(3));
    let data = sse_data(&text);
    assert_eq!(data.len(), 3);
    assert_eq!(data[2]["candidates"][0]["finishReason"], "STOP");
    assert!(fake.requests_log().pop().unwrap().stream);

    let (status, ct, text) = send_text(
        c.post(format!(
            "{base}/v1beta/models/gemini-x:streamGenerateContent"
        ))
        .header("x-goog-api-key", GOOGLE_KEY)
        .json(&body),
    )
    .await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("application/json"), "{ct}");
    let array: Vec<Value> = serde_json::from_str(&text).unwrap();
    let texts: Vec<&str> = array
        .iter()
        .map(|r| {
            r["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(texts, chunks(3));
    assert_eq!(fake.streams().len(), 2);

    let count = send(
        c.post(format!("{base}/v1beta/models/gemini-x:countTokens"))
            .header("x-goog-api-key", GOOGLE_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(count.status, 200);
    assert!(count.body["totalTokens"].as_u64().unwrap() > 0);
    let embed = send(
        c.post(format!(
            "{base}/v1beta/models/text-embedding-004:embedContent"
        ))
        .header("x-goog-api-key", GOOGLE_KEY)
        .json(&json!({ "content": { "parts": [{ "text": "hi" }] } })),
    )
    .await;
    assert_eq!(embed.status, 200);
    assert!(embed.body["embedding"]["values"].is_array());
    assert_eq!(
        fake.requests_log().pop().unwrap().model.as_deref(),
        Some("text-embedding-004")
    );
}

#[tokio::test(flavor = "current_thread")]
async fn azure_generation() {
    let fake = start().await;
    let c = client(&fake);
    let base = fake.base_url(ProviderKind::Azure);
    let kind = ProviderKind::Azure;
    let body = json!({ "messages": [{ "role": "user", "content": "hi" }] });

    let ok = send(generate_request(
        &c, &fake, kind, AZURE_KEY, "my-gpt4o", false,
    ))
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["object"], "chat.completion");
    assert_eq!(ok.body["model"], "my-gpt4o");
    let r = fake.requests_log().pop().unwrap();
    assert_eq!(r.model.as_deref(), Some("my-gpt4o"), "the deployment");
    assert_eq!(r.key_id, Some(FakeProvider::key_id(AZURE_KEY)));
    assert_eq!(r.auth_headers, ["api-key"]);

    let not_found = json!({ "error": { "code": "404", "message": "Resource not found" } });
    let no_version = send(
        c.post(format!(
            "{base}/openai/deployments/my-gpt4o/chat/completions"
        ))
        .header("api-key", AZURE_KEY)
        .json(&body),
    )
    .await;
    assert_eq!(no_version.status, 404);
    assert_eq!(no_version.body, not_found);
    let bad_version = send(
        c.post(format!(
            "{base}/openai/deployments/my-gpt4o/chat/completions?api-version=latest"
        ))
        .header("api-key", AZURE_KEY)
        .json(&body),
    )
    .await;
    assert_eq!(bad_version.status, 400);
    assert_eq!(bad_version.body["error"]["code"], "BadRequest");
    let bad = send(generate_request(&c, &fake, kind, "nope", "my-gpt4o", false)).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.body["error"]["code"], "401");
    let bearer = send(
        c.post(format!(
            "{base}/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
        ))
        .bearer_auth(AZURE_KEY)
        .json(&body),
    )
    .await;
    assert_eq!(bearer.status, 401, "deployments take api-key only");

    // The v1 API: model in the body; api-key or Bearer.
    for req in [
        c.post(format!("{base}/openai/v1/chat/completions"))
            .header("api-key", AZURE_KEY),
        c.post(format!("{base}/openai/v1/chat/completions"))
            .bearer_auth(AZURE_KEY),
    ] {
        let a = send(req.json(&json!({ "model": "gpt-4o", "messages": [] }))).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["model"], "gpt-4o");
        let r = fake.requests_log().pop().unwrap();
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert_eq!(r.key_id, Some(FakeProvider::key_id(AZURE_KEY)));
    }
    let no_model = send(
        c.post(format!("{base}/openai/v1/chat/completions"))
            .header("api-key", AZURE_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(no_model.status, 400);
    let no_key = send(
        c.post(format!("{base}/openai/v1/chat/completions"))
            .json(&body),
    )
    .await;
    assert_eq!(no_key.status, 401);

    fake.set_stream_plan(2, Duration::ZERO);
    let (status, ct, text) = send_text(generate_request(
        &c, &fake, kind, AZURE_KEY, "my-gpt4o", true,
    ))
    .await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/event-stream"));
    assert_eq!(sse_data(&text).last().unwrap(), "[DONE]");
    assert_eq!(delta_texts(kind, &text), chunks(2));
}

#[tokio::test(flavor = "current_thread")]
async fn vertex_generation() {
    let fake = start().await;
    let c = client(&fake);
    let token = vertex_token(&c, &fake).await;
    let url = |project: &str, version: &str, method: &str| {
        format!(
            "{}/{version}/projects/{project}/locations/us-central1/publishers/google/models/gemini-v:{method}",
            fake.base_url(ProviderKind::Vertex)
        )
    };
    let body = json!({ "contents": [{ "role": "user", "parts": [{ "text": "hi" }] }] });

    for version in ["v1", "v1beta1"] {
        let ok = send(
            c.post(url(SA_PROJECT, version, "generateContent"))
                .bearer_auth(&token)
                .json(&body),
        )
        .await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert_eq!(ok.body["candidates"][0]["finishReason"], "STOP");
        assert_eq!(ok.body["modelVersion"], "gemini-v");
        let r = fake.requests_log().pop().unwrap();
        assert_eq!(r.model.as_deref(), Some("gemini-v"));
        assert_eq!(
            r.key_id,
            Some(FakeProvider::key_id(&test_service_account_json(
                SA_EMAIL, SA_PROJECT
            )))
        );
        assert_eq!(r.auth_headers, ["authorization"]);
    }

    fake.set_stream_plan(3, Duration::ZERO);
    let (status, ct, text) = send_text(
        c.post(url(SA_PROJECT, "v1", "streamGenerateContent?alt=sse"))
            .bearer_auth(&token)
            .json(&body),
    )
    .await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/event-stream"));
    assert_eq!(delta_texts(ProviderKind::Vertex, &text), chunks(3));
    assert_eq!(fake.streams().pop().unwrap().provider, ProviderKind::Vertex);

    let none = send(c.post(url(SA_PROJECT, "v1", "generateContent")).json(&body)).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.body["error"]["status"], "UNAUTHENTICATED");
    let made_up = send(
        c.post(url(SA_PROJECT, "v1", "generateContent"))
            .bearer_auth("ya29.made-up")
            .json(&body),
    )
    .await;
    assert_eq!(made_up.status, 401);
    // A Gemini API key is not a Vertex credential.
    let api_key = send(
        c.post(url(SA_PROJECT, "v1", "generateContent"))
            .header("x-goog-api-key", GOOGLE_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(api_key.status, 401);
    let elsewhere = send(
        c.post(url("someone-elses", "v1", "generateContent"))
            .bearer_auth(&token)
            .json(&body),
    )
    .await;
    assert_eq!(elsewhere.status, 403);
    assert_eq!(
        elsewhere.body["error"]["details"][0]["metadata"]["permission"],
        "aiplatform.endpoints.predict"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn stream_events_are_spaced_by_the_plan() {
    let fake = start().await;
    let c = client(&fake);
    let interval = Duration::from_millis(60);
    fake.set_stream_plan(5, interval);
    for (i, (kind, key)) in KEYED.into_iter().enumerate() {
        let started = Instant::now();
        let mut res = generate_request(&c, &fake, kind, key, "m", true)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{kind}");
        // Each delta arrives on its own: the client sees chunk-0 long before the end.
        let mut text = String::new();
        let mut arrivals = Vec::new();
        while let Some(bytes) = res.chunk().await.unwrap() {
            text.push_str(std::str::from_utf8(&bytes).unwrap());
            arrivals.push((Instant::now(), text.matches("chunk-").count()));
        }
        assert_eq!(delta_texts(kind, &text), chunks(5), "{kind}");
        let first = arrivals.iter().find(|(_, n)| *n >= 1).unwrap().0;
        let last = arrivals.last().unwrap().0;
        let sent = fake.streams()[i].sent.clone();
        assert!(
            last - first >= interval * 4 - Duration::from_millis(5),
            "{kind}: {:?} sent {:?}",
            arrivals
                .iter()
                .map(|(t, n)| (*t - started, *n))
                .collect::<Vec<_>>(),
            sent.iter().map(|t| *t - started).collect::<Vec<_>>()
        );
        assert!(started.elapsed() < Duration::from_secs(10));

        let streams = fake.streams();
        assert_eq!(streams.len(), i + 1);
        let s = &streams[i];
        assert_eq!(s.provider, kind);
        assert!(s.completed && !s.cancelled, "{kind}: {s:?}");
        assert_eq!(s.sent.len(), 5);
        for pair in s.sent.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= interval - Duration::from_millis(2)
                    && gap < interval + Duration::from_secs(2),
                "{kind}: gap {gap:?}"
            );
        }
    }
    assert_eq!(fake.open_streams(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn client_going_away_cancels_the_stream() {
    let fake = start().await;
    let c = client(&fake);
    fake.set_stream_plan(1000, Duration::from_millis(20));
    for (i, (kind, key)) in KEYED.into_iter().enumerate() {
        let mut res = generate_request(&c, &fake, kind, key, "m", true)
            .send()
            .await
            .unwrap();
        let mut text = String::new();
        while !text.contains("chunk-1") {
            let bytes = res.chunk().await.unwrap().expect("more of the stream");
            text.push_str(std::str::from_utf8(&bytes).unwrap());
        }
        assert_eq!(fake.open_streams(), 1, "{kind}");
        drop(res);
        eventually("the stream to be cancelled", || {
            fake.streams().get(i).is_some_and(|s| s.cancelled)
        })
        .await;
        let s = &fake.streams()[i];
        assert!(!s.completed, "{kind}");
        assert!(
            s.sent.len() >= 2 && s.sent.len() < 1000,
            "{kind}: {}",
            s.sent.len()
        );
        assert_eq!(fake.open_streams(), 0, "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_apply_to_generation_too() {
    let fake = start().await;
    let c = client(&fake);
    for mode in [
        FakeMode::Unauthorized,
        FakeMode::GeminiKeyInvalid,
        FakeMode::RateLimited,
        FakeMode::InsufficientQuota,
        FakeMode::ServerError,
        FakeMode::Overloaded,
    ] {
        fake.set_mode(mode);
        for stream in [false, true] {
            for (kind, key) in KEYED {
                let (status, token, retry_after) = expected(kind, mode);
                let a = send(generate_request(&c, &fake, kind, key, "m", stream)).await;
                assert_eq!(a.status, status, "{kind} {mode:?}: {}", a.body);
                assert_eq!(error_token(kind, &a.body), token, "{kind} {mode:?}");
                assert_eq!(
                    a.headers.get("retry-after").map(|v| v.to_str().unwrap()),
                    retry_after.then_some("1"),
                    "{kind} {mode:?}"
                );
            }
        }
    }
    assert!(fake.streams().is_empty(), "no stream was started");

    let delay = Duration::from_millis(100);
    fake.set_mode(FakeMode::Slow(delay));
    for (kind, key) in KEYED {
        let started = Instant::now();
        let a = send(generate_request(&c, &fake, kind, key, "m", false)).await;
        assert_eq!(a.status, 200, "{kind}");
        assert!(started.elapsed() >= delay);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn large_bodies_and_recording_off() {
    let fake = start().await;
    let c = client(&fake);
    let big = "x".repeat(65 << 20);
    let body = format!(r#"{{"model":"gpt-big","messages":[{{"role":"user","content":"{big}"}}]}}"#);
    let len = body.len() as u64;
    let a = send(
        c.post(format!(
            "{}/chat/completions",
            fake.base_url(ProviderKind::OpenAI)
        ))
        .bearer_auth(OPENAI_KEY)
        .header("content-type", "application/json")
        .body(body),
    )
    .await;
    assert_eq!(a.status, 200);
    let r = fake.requests_log().pop().unwrap();
    assert_eq!(r.body_bytes, len);
    assert_eq!(r.model.as_deref(), Some("gpt-big"));

    fake.set_recording(false);
    let before = fake.requests_log().len();
    for stream in [false, true] {
        let a = send(generate_request(
            &c,
            &fake,
            ProviderKind::OpenAI,
            OPENAI_KEY,
            "m",
            stream,
        ))
        .await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(fake.requests_log().len(), before);
    assert!(fake.streams().is_empty());
    assert_eq!(fake.total_requests(), 3, "still counted");
    assert_eq!(fake.open_streams(), 0);
    fake.set_recording(true);
    send(generate_request(
        &c,
        &fake,
        ProviderKind::OpenAI,
        OPENAI_KEY,
        "m",
        false,
    ))
    .await;
    assert_eq!(fake.requests_log().len(), before + 1);
}
