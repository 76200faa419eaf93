//! Vertex AI: the OAuth 2.0 JWT-bearer token endpoint (`POST /vertex-token/token`), the
//! aiplatform models list (`GET /vertex/v1/projects/{project}/locations/{location}/models`),
//! and Gemini on Vertex (`POST /vertex/{v1|v1beta1}/projects/{project}/locations/{location}/
//! publishers/google/models/{model}:{generateContent|streamGenerateContent|countTokens}`),
//! each with a bearer access token the token endpoint issued.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::{HttpRequest, HttpResponse, web};
use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use byok_operator::providers::ProviderKind;
use ring::signature::{self, KeyPair, RsaKeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    FakeMode, FakeProvider, IssuedToken, ServiceAccount, Shared, VERTEX_TOKEN_PATH, bearer, google,
    header, json_response, lock, note_key, note_request, random_alnum,
};

const KIND: ProviderKind = ProviderKind::Vertex;
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const TOKEN_LIFETIME: Duration = Duration::from_secs(3599);

/// The throwaway RSA key of [`test_service_account_json`] (PKCS#8 PEM).
pub const TEST_SA_PRIVATE_KEY_PEM: &str = include_str!("../../fixtures/vertex-test-sa-key.pem");
/// Its public half (SPKI PEM).
pub const TEST_SA_PUBLIC_KEY_PEM: &str = include_str!("../../fixtures/vertex-test-sa-pubkey.pem");
/// The `private_key_id` of [`test_service_account_json`].
pub const TEST_SA_KEY_ID: &str = "5f1e2d3c4b5a69788796a5b4c3d2e1f001234567";

/// A realistic service-account JSON key around the throwaway fixture key.
pub fn test_service_account_json(client_email: &str, project_id: &str) -> String {
    json!({
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": TEST_SA_KEY_ID,
        "private_key": TEST_SA_PRIVATE_KEY_PEM,
        "client_email": client_email,
        "client_id": "112233445566778899001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": format!(
            "https://www.googleapis.com/robot/v1/metadata/x509/{}",
            client_email.replace('@', "%40")
        ),
        "universe_domain": "googleapis.com",
    })
    .to_string()
}

#[derive(Deserialize)]
struct ServiceAccountJson {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    project_id: Option<String>,
}

/// (client_email, account) from a service-account JSON key.
pub(super) fn parse_service_account_json(json: &str) -> anyhow::Result<(String, ServiceAccount)> {
    // Not `{e}` of serde's error for the whole document: it could quote key material.
    let sa: ServiceAccountJson = serde_json::from_str(json)
        .map_err(|e| anyhow::anyhow!("not a service-account JSON key (line {})", e.line()))?;
    if sa.kind != "service_account" {
        bail!("type is {:?}, not \"service_account\"", sa.kind);
    }
    let public_key = rsa_public_key_from_pem(&sa.private_key).context("private_key")?;
    Ok((
        sa.client_email,
        ServiceAccount {
            public_key,
            key_id: sa.private_key_id,
            project: sa.project_id,
            credential_id: FakeProvider::key_id(json),
        },
    ))
}

/// A PKCS#1 `RSAPublicKey` DER from a PEM `PUBLIC KEY` (SPKI), `RSA PUBLIC KEY`, or PKCS#8
/// `PRIVATE KEY` (RSA).
pub(super) fn rsa_public_key_from_pem(pem: &str) -> anyhow::Result<Vec<u8>> {
    // rustls-pki-types has no section kind for PKCS#1 public keys.
    if let Some(rest) = pem.split("-----BEGIN RSA PUBLIC KEY-----").nth(1) {
        let body = rest
            .split("-----END RSA PUBLIC KEY-----")
            .next()
            .unwrap_or_default();
        let b64: String = body.split_whitespace().collect();
        return base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("bad base64 in RSA PUBLIC KEY");
    }
    let (kind, der) = <(SectionKind, Vec<u8>)>::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("no PEM key found: {e}"))?;
    match kind {
        SectionKind::PublicKey => spki_rsa_public_key(&der),
        SectionKind::PrivateKey => {
            let pair = RsaKeyPair::from_pkcs8(&der)
                .map_err(|e| anyhow::anyhow!("not an RSA PKCS#8 key: {e}"))?;
            Ok(pair.public_key().as_ref().to_vec())
        }
        other => bail!("unsupported PEM section {other:?}"),
    }
}

/// One DER TLV: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// SubjectPublicKeyInfo { AlgorithmIdentifier { rsaEncryption, NULL }, BIT STRING RSAPublicKey }.
fn spki_rsa_public_key(der: &[u8]) -> anyhow::Result<Vec<u8>> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let parse = || {
        let (0x30, spki, _) = der_tlv(der)? else {
            return None;
        };
        let (0x30, alg, rest) = der_tlv(spki)? else {
            return None;
        };
        let (0x06, oid, _) = der_tlv(alg)? else {
            return None;
        };
        if oid != RSA_ENCRYPTION {
            return None;
        }
        let (0x03, bits, _) = der_tlv(rest)? else {
            return None;
        };
        let (0, key) = bits.split_first()? else {
            return None;
        };
        Some(key.to_vec())
    };
    parse().context("not an RSA SubjectPublicKeyInfo")
}

// ---- token endpoint ----

pub(super) fn token_scope() -> actix_web::Scope {
    let token = VERTEX_TOKEN_PATH
        .strip_prefix("/vertex-token")
        .unwrap_or(VERTEX_TOKEN_PATH);
    web::scope("/vertex-token")
        .service(
            web::resource(token)
                .route(web::post().to(token_endpoint))
                .default_service(web::to(method_not_allowed)),
        )
        .default_service(web::to(google::not_found))
}

fn oauth_error(code: u16, error: &str, description: &str) -> HttpResponse {
    json_response(
        code,
        json!({ "error": error, "error_description": description }),
    )
}

fn invalid_client() -> HttpResponse {
    oauth_error(401, "invalid_client", "The OAuth client was not found.")
}

fn invalid_grant(description: &str) -> HttpResponse {
    oauth_error(400, "invalid_grant", description)
}

async fn method_not_allowed() -> HttpResponse {
    oauth_error(405, "invalid_request", "Method not allowed.")
}

fn token_mode_error(mode: FakeMode) -> Option<HttpResponse> {
    match mode {
        FakeMode::Unauthorized | FakeMode::GeminiKeyInvalid => Some(invalid_client()),
        // The rate-limit and server modes fail the models call instead.
        _ => None,
    }
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    kid: Option<String>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The path of an `https://` URL (`/` if it has none).
fn https_path(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://")?;
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    Some(path.split(['?', '#']).next().unwrap_or(path))
}

async fn token_endpoint(
    req: HttpRequest,
    shared: web::Data<Shared>,
    body: web::Bytes,
) -> HttpResponse {
    if let Some(res) = shared.apply_mode(KIND, token_mode_error).await {
        return res;
    }
    let is_form = header(&req, "content-type").is_some_and(|ct| {
        ct.split(';').next().is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    let form = std::str::from_utf8(&body)
        .ok()
        .filter(|_| is_form)
        .and_then(|s| web::Query::<std::collections::HashMap<String, String>>::from_query(s).ok())
        .map(web::Query::into_inner)
        .unwrap_or_default();
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type != JWT_BEARER {
        return oauth_error(
            400,
            "unsupported_grant_type",
            &format!("Invalid grant_type: {grant_type}"),
        );
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error(
            400,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };
    match verify_assertion(&shared, assertion) {
        Ok((client_email, credential_id)) => {
            let token = format!("ya29.fake-{}", random_alnum(40));
            lock(&shared.tokens).insert(
                token.clone(),
                IssuedToken {
                    client_email,
                    expires: Instant::now() + TOKEN_LIFETIME,
                    credential_id,
                },
            );
            let mut res = json_response(
                200,
                json!({
                    "access_token": token,
                    "expires_in": TOKEN_LIFETIME.as_secs(),
                    "token_type": "Bearer",
                }),
            );
            res.headers_mut().insert(
                actix_web::http::header::CACHE_CONTROL,
                actix_web::http::header::HeaderValue::from_static(
                    "no-cache, no-store, max-age=0, must-revalidate",
                ),
            );
            res
        }
        Err(e) => e.respond(&shared.token_url),
    }
}

/// Why an assertion was refused; `respond` renders Google's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AssertionError {
    Malformed,
    UnknownClient,
    BadSignature,
    Audience,
    Lifetime,
    Scope,
}

impl AssertionError {
    fn respond(self, token_url: &str) -> HttpResponse {
        match self {
            AssertionError::Malformed => invalid_grant("Invalid JWT: malformed assertion."),
            AssertionError::UnknownClient => invalid_client(),
            AssertionError::BadSignature => invalid_grant("Invalid JWT Signature."),
            AssertionError::Audience => invalid_grant(&format!(
                "Invalid JWT: Failed audience check. The right audience is {token_url}"
            )),
            AssertionError::Lifetime => invalid_grant(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
            ),
            AssertionError::Scope => oauth_error(
                400,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.",
            ),
        }
    }
}

/// Checks a JWT-bearer assertion as Google's token endpoint does; returns its `iss` and the
/// account's `credential_id`.
fn verify_assertion(shared: &Shared, jwt: &str) -> Result<(String, String), AssertionError> {
    use AssertionError::*;
    let mut parts = jwt.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed);
    };
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|_| Malformed);
    let header: JwtHeader = serde_json::from_slice(&decode(h64)?).map_err(|_| Malformed)?;
    let claims: Value = serde_json::from_slice(&decode(c64)?).map_err(|_| Malformed)?;
    let sig = decode(s64)?;
    if header.alg != "RS256" {
        return Err(BadSignature);
    }
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(UnknownClient)?;
    let account = lock(&shared.accounts)
        .get(iss)
        .cloned()
        .ok_or(UnknownClient)?;
    if let (Some(want), Some(got)) = (&account.key_id, &header.kid)
        && want != got
    {
        return Err(BadSignature);
    }
    let signed = &jwt[..h64.len() + 1 + c64.len()];
    UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &account.public_key)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| BadSignature)?;
    let expected_path = https_path(&shared.token_url).unwrap_or(VERTEX_TOKEN_PATH);
    let aud_ok = claims
        .get("aud")
        .and_then(Value::as_str)
        .and_then(https_path)
        .is_some_and(|p| p == expected_path);
    if !aud_ok {
        return Err(Audience);
    }
    let now = unix_now();
    let iat = claims.get("iat").and_then(Value::as_i64);
    let exp = claims.get("exp").and_then(Value::as_i64);
    let times_ok = match (iat, exp) {
        (Some(iat), Some(exp)) => exp > now && iat <= now + 300 && exp > iat && exp - iat <= 3600,
        _ => false,
    };
    if !times_ok {
        return Err(Lifetime);
    }
    let scope_ok = claims
        .get("scope")
        .and_then(Value::as_str)
        .is_some_and(|s| s.split(' ').any(|s| s == CLOUD_PLATFORM_SCOPE));
    if !scope_ok {
        return Err(Scope);
    }
    Ok((iss.to_owned(), account.credential_id))
}

// ---- aiplatform ----

pub(super) fn scope() -> actix_web::Scope {
    web::scope("/vertex")
        .service(
            web::resource("/v1/projects/{project}/locations/{location}/models")
                .route(web::get().to(list_models))
                .default_service(web::to(google::not_found)),
        )
        .service(
            web::resource(
                "/{version}/projects/{project}/locations/{location}/publishers/google/models/{model_method}",
            )
            .route(web::post().to(model_method))
            .default_service(web::to(google::not_found)),
        )
        .default_service(web::to(google::not_found))
}

fn models_mode_error(mode: FakeMode) -> Option<HttpResponse> {
    match mode {
        FakeMode::Unauthorized | FakeMode::GeminiKeyInvalid => Some(google::unauthenticated()),
        mode => google::availability_error(mode),
    }
}

async fn list_models(
    req: HttpRequest,
    shared: web::Data<Shared>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    if let Some(res) = shared.apply_mode(KIND, models_mode_error).await {
        return res;
    }
    let (project, location) = path.into_inner();
    if let Err(res) = authenticate(&req, &shared, &project, "aiplatform.models.list", || {
        format!("projects/{project}/locations/{location}")
    }) {
        return *res;
    }
    if let Some(res) = google::check_page_size(&req) {
        return res;
    }
    json_response(200, json!({ "models": [] }))
}

/// The bearer-token check of the aiplatform endpoints: the token's account's
/// `credential_id`, or the 401 (no, unknown or expired token) or 403 (a project other than
/// the account's, naming `permission` on `resource()`) to send.
fn authenticate(
    req: &HttpRequest,
    shared: &Shared,
    project: &str,
    permission: &str,
    resource: impl FnOnce() -> String,
) -> Result<String, Box<HttpResponse>> {
    let Some(token) = bearer(req) else {
        return Err(Box::new(google::error(
            401,
            "UNAUTHENTICATED",
            "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            None,
        )));
    };
    let issued = lock(&shared.tokens).get(token).cloned();
    let Some(issued) = issued.filter(|t| t.expires > Instant::now()) else {
        return Err(Box::new(google::unauthenticated()));
    };
    let account = lock(&shared.accounts).get(&issued.client_email).cloned();
    let Some(account) = account else {
        return Err(Box::new(google::unauthenticated()));
    };
    if account.project.as_ref().is_some_and(|p| p != project) {
        return Err(Box::new(google::error(
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission '{permission}' denied on resource '//aiplatform.googleapis.com/{}' (or it may not exist).",
                resource()
            ),
            Some(json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "IAM_PERMISSION_DENIED",
                "domain": "aiplatform.googleapis.com",
                "metadata": { "permission": permission },
            }])),
        )));
    }
    Ok(issued.credential_id)
}

async fn model_method(
    req: HttpRequest,
    shared: web::Data<Shared>,
    path: web::Path<(String, String, String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (version, project, location, model_method) = path.into_inner();
    let Some((model, method)) = google::split_model_method(&model_method)
        .filter(|(_, m)| *m != google::Method::EmbedContent)
        .filter(|_| version == "v1" || version == "v1beta1")
    else {
        return google::not_found().await;
    };
    let streamed = method == google::Method::StreamGenerateContent;
    note_request(&shared, &req, Some(model), body.len(), streamed);
    if let Some(res) = shared.apply_mode(KIND, models_mode_error).await {
        return res;
    }
    let credential_id = match authenticate(
        &req,
        &shared,
        &project,
        "aiplatform.endpoints.predict",
        || format!("projects/{project}/locations/{location}/publishers/google/models/{model}"),
    ) {
        Ok(id) => id,
        Err(res) => return *res,
    };
    note_key(&shared, &req, || credential_id);
    if !google::is_json_object(&body) {
        return google::invalid_json();
    }
    google::answer(&shared.into_inner(), KIND, &req, model, method, body.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_from_spki_matches_private_key() {
        let from_spki = rsa_public_key_from_pem(TEST_SA_PUBLIC_KEY_PEM).unwrap();
        let from_pkcs8 = rsa_public_key_from_pem(TEST_SA_PRIVATE_KEY_PEM).unwrap();
        assert_eq!(from_spki, from_pkcs8);
    }

    #[test]
    fn https_path_extraction() {
        assert_eq!(
            https_path("https://h:1/vertex-token/token"),
            Some("/vertex-token/token")
        );
        assert_eq!(
            https_path("https://h:1/vertex-token/token?x"),
            Some("/vertex-token/token")
        );
        assert_eq!(https_path("https://h"), Some("/"));
        assert_eq!(https_path("http://h/vertex-token/token"), None);
    }
}
