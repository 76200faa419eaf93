//! Endpoints a key never reaches through the sidecar, whatever its `allowedModels`: those
//! that mint a credential usable outside the pod, and key and admin management. Vertex keys
//! are pinned to inference methods of their own project and location. Pure.
//!
//! A credential minted through the sidecar (an OpenAI realtime client secret, a Gemini
//! ephemeral token) works from anywhere and outlives the key's revocation: it would turn
//! "use the key" into "hold a key". `spec.allowCredentialMinting` lets a ProviderKey allow
//! the ephemeral ones; key and admin management stay refused.
//!
//! Paths are matched after the normalisation a provider's front end may apply: each segment
//! percent-decoded, lower-cased and cut at `;` (matrix parameters), a trailing slash
//! dropped. Encoded slashes and dot segments never get here ([`super::routes`] refuses
//! them). A rule matches anywhere in the path, so prefixes (`/v1`, `/openai/v1`, a
//! gateway's `/api`) cannot hide an endpoint.

use std::borrow::Cow;

use crate::providers::ProviderKind;

/// What a key's grant says about endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// `spec.allowCredentialMinting`: ephemeral tokens may be minted.
    pub allow_credential_minting: bool,
    /// Vertex: the project and location the key serves (from the broker).
    pub vertex_scope: Option<VertexScope>,
}

/// A Vertex key's project and location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VertexScope {
    pub project: String,
    pub location: String,
}

/// Why an endpoint is refused: the message names the rule, never a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Mints an ephemeral credential; allowed by `spec.allowCredentialMinting`.
    MintsCredential(&'static str),
    /// Key, organisation or access management: never through the sidecar.
    Management(&'static str),
    /// Vertex: not an inference method of the key's project and location.
    OutsideVertexScope,
    /// Vertex: the broker named no project and location (an older operator).
    NoVertexScope,
}

impl Refused {
    pub fn message(&self) -> String {
        match self {
            Refused::MintsCredential(what) => format!(
                "{what} mints a credential that works outside this pod; the ProviderKey must set spec.allowCredentialMinting to allow it"
            ),
            Refused::Management(what) => format!(
                "{what} is key or organisation management, which the byok proxy never forwards"
            ),
            Refused::OutsideVertexScope => "a Vertex key serves only inference methods under projects/<spec.vertex.project>/locations/<spec.vertex.location>".into(),
            Refused::NoVertexScope => "the broker did not name this Vertex key's project and location; upgrade the operator".into(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Ephemeral,
    Management,
}

/// A path pattern: literal segments (lower case), `*` for any one segment, `*:verb` for a
/// segment ending in `:verb`, and `**` (last only) for any rest, none included.
struct Rule {
    pattern: &'static [&'static str],
    /// Only at the start of the path, after any of `openai`, `v1`, `v2`, `api`.
    anchored: bool,
    class: Class,
    what: &'static str,
}

const fn rule(pattern: &'static [&'static str], class: Class, what: &'static str) -> Rule {
    Rule {
        pattern,
        anchored: false,
        class,
        what,
    }
}

/// OpenAI's API, as OpenAI, Azure (`/openai/v1/...`, `/openai/...`) and compatible servers
/// serve it.
const OPENAI: &[Rule] = &[
    rule(
        &["realtime", "client_secrets"],
        Class::Ephemeral,
        "the realtime client secrets endpoint",
    ),
    rule(
        &["realtime", "translations", "client_secrets"],
        Class::Ephemeral,
        "the realtime translation client secrets endpoint",
    ),
    rule(
        &["realtime", "sessions"],
        Class::Ephemeral,
        "the realtime sessions endpoint",
    ),
    rule(
        &["realtime", "transcription_sessions"],
        Class::Ephemeral,
        "the realtime transcription sessions endpoint",
    ),
    // Azure's preview realtime sessions (`/openai/realtimeapi/sessions`).
    rule(
        &["realtimeapi", "**"],
        Class::Ephemeral,
        "the realtime sessions endpoint",
    ),
    rule(
        &["chatkit", "sessions"],
        Class::Ephemeral,
        "the ChatKit sessions endpoint",
    ),
    rule(
        &["organization", "**"],
        Class::Management,
        "the organization admin API",
    ),
    Rule {
        pattern: &["projects", "**"],
        anchored: true,
        class: Class::Management,
        what: "the projects admin API",
    },
    rule(
        &["fine_tuning", "checkpoints", "*", "permissions", "**"],
        Class::Management,
        "sharing a fine-tuned checkpoint",
    ),
];

/// Key management and admin APIs of common OpenAI-compatible gateways (OpenRouter,
/// LiteLLM). A gateway key in a sidecar should be a virtual key without admin rights; these
/// rules are a second line.
const GATEWAYS: &[Rule] = &[
    Rule {
        pattern: &["user", "**"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's user admin API",
    },
    Rule {
        pattern: &["team", "**"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's team admin API",
    },
    Rule {
        pattern: &["credentials", "**"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's credentials API",
    },
    Rule {
        pattern: &["config", "**"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's configuration API",
    },
    Rule {
        pattern: &["model", "**"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's model admin API",
    },
    Rule {
        pattern: &["keys", "**"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's key management API",
    },
    Rule {
        pattern: &["key", "**"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's key management API",
    },
    Rule {
        pattern: &["auth", "keys"],
        anchored: true,
        class: Class::Management,
        what: "the gateway's key exchange",
    },
];

const GEMINI: &[Rule] = &[
    rule(
        &["auth_tokens", "**"],
        Class::Ephemeral,
        "the ephemeral auth tokens endpoint",
    ),
    rule(
        &["tunedmodels", "*", "permissions", "**"],
        Class::Management,
        "tuned model permissions",
    ),
    rule(
        &["corpora", "*", "permissions", "**"],
        Class::Management,
        "corpus permissions",
    ),
    rule(
        &["tunedmodels", "*:transferownership"],
        Class::Management,
        "transferring a tuned model",
    ),
];

const ANTHROPIC: &[Rule] = &[
    rule(&["organizations", "**"], Class::Management, "the Admin API"),
    rule(
        &["oauth", "**"],
        Class::Management,
        "the OAuth token endpoint",
    ),
    rule(&["tunnels", "**"], Class::Management, "the tunnels API"),
    rule(
        &["user_profiles", "*", "enrollment_url"],
        Class::Management,
        "user enrollment URLs",
    ),
    rule(
        &["environments", "*", "work", "**"],
        Class::Management,
        "environment worker credentials",
    ),
];

/// Vertex methods that run a model (on a publisher model or the project's own endpoint).
const VERTEX_INFERENCE: &[&str] = &[
    "generatecontent",
    "streamgeneratecontent",
    "counttokens",
    "computetokens",
    "embedcontent",
    "batchembedcontents",
    "predict",
    "rawpredict",
    "streamrawpredict",
    "serverstreamingpredict",
    "predictlongrunning",
    "fetchpredictoperation",
];

/// Whether a request for `path` (as the application sent it, without the query) may go to
/// the provider under `policy`.
pub fn check(
    provider: ProviderKind,
    method: &http::Method,
    path: &str,
    policy: &EndpointPolicy,
) -> Result<(), Refused> {
    let segments = normalised(path);
    let segments: Vec<&str> = segments.iter().map(Cow::as_ref).collect();
    let rules: &[&[Rule]] = match provider {
        ProviderKind::OpenAI | ProviderKind::Azure => &[OPENAI],
        // A gateway may pass requests through to any provider (LiteLLM's `/gemini/...`).
        ProviderKind::OpenAICompatible => &[OPENAI, GATEWAYS, GEMINI, ANTHROPIC],
        ProviderKind::Google => &[GEMINI],
        ProviderKind::Anthropic => &[ANTHROPIC],
        ProviderKind::Vertex => {
            let scope = policy.vertex_scope.as_ref().ok_or(Refused::NoVertexScope)?;
            return vertex(method, &segments, scope);
        }
    };
    for rule in rules.iter().flat_map(|r| r.iter()) {
        if !matches(rule, &segments) {
            continue;
        }
        match rule.class {
            Class::Ephemeral if policy.allow_credential_minting => {}
            Class::Ephemeral => return Err(Refused::MintsCredential(rule.what)),
            Class::Management => return Err(Refused::Management(rule.what)),
        }
    }
    Ok(())
}

fn normalised(path: &str) -> Vec<Cow<'_, str>> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|segment| {
            let segment = segment.split(';').next().unwrap_or_default();
            let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
            match decoded {
                Cow::Borrowed(s) if !s.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Borrowed(s),
                other => Cow::Owned(other.to_lowercase()),
            }
        })
        .collect()
}

fn matches(rule: &Rule, segments: &[&str]) -> bool {
    if rule.anchored {
        let start = segments
            .iter()
            .take_while(|s| matches!(**s, "openai" | "v1" | "v2" | "api"))
            .count();
        // Any of the skippable prefixes may itself be the rule's first segment.
        (0..=start).any(|at| matches_at(rule.pattern, &segments[at..]))
    } else {
        (0..segments.len()).any(|at| matches_at(rule.pattern, &segments[at..]))
    }
}

fn matches_at(pattern: &[&str], segments: &[&str]) -> bool {
    match (pattern.split_first(), segments.split_first()) {
        (Some((&"**", _)), _) => true,
        (None, _) => true,
        (Some(_), None) => false,
        (Some((p, rest_p)), Some((s, rest_s))) => {
            let one = match p.strip_prefix("*:") {
                Some(verb) => s.rsplit_once(':').is_some_and(|(_, v)| v == verb),
                None => *p == "*" || p == s,
            };
            one && matches_at(rest_p, rest_s)
        }
    }
}

fn vertex(method: &http::Method, s: &[&str], scope: &VertexScope) -> Result<(), Refused> {
    let post = method == http::Method::POST;
    let get = method == http::Method::GET;
    let inference = |segment: &str| {
        segment
            .rsplit_once(':')
            .is_some_and(|(name, verb)| !name.is_empty() && VERTEX_INFERENCE.contains(&verb))
    };
    let [v, "projects", project, "locations", location, rest @ ..] = s else {
        return Err(Refused::OutsideVertexScope);
    };
    if !matches!(*v, "v1" | "v1beta1")
        || *project != scope.project.to_lowercase()
        || *location != scope.location.to_lowercase()
    {
        return Err(Refused::OutsideVertexScope);
    }
    let allowed = match rest {
        ["publishers", _, "models", m] if post => inference(m),
        ["publishers", _, "models", ..] if get => true,
        ["endpoints", "openapi", "chat", "completions"] if post => true,
        ["endpoints", "openapi", "embeddings"] if post => true,
        ["endpoints", e] if post => inference(e),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Refused::OutsideVertexScope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderKind::*;
    use http::Method;

    fn denied(p: ProviderKind, path: &str, policy: &EndpointPolicy) -> Option<Refused> {
        check(p, &Method::POST, path, policy).err()
    }

    fn default() -> EndpointPolicy {
        EndpointPolicy::default()
    }

    /// Each endpoint that reached the provider with the real key, and its disguises.
    #[test]
    fn credential_minting_is_refused_in_every_spelling() {
        for (p, path) in [
            (OpenAI, "/v1/realtime/client_secrets"),
            (OpenAI, "/realtime/client_secrets"),
            (OpenAI, "/v1/realtime/sessions"),
            (OpenAI, "/v1/realtime/transcription_sessions"),
            (OpenAI, "/v1/realtime/translations/client_secrets"),
            (OpenAI, "/v1/chatkit/sessions"),
            (OpenAI, "/V1/Realtime/Client_Secrets/"),
            (OpenAI, "/v1/realtime/client%5Fsecrets"),
            (OpenAI, "/v1/realtime;x=1/client_secrets;y"),
            (OpenAI, "/v1/%72ealtime/sessions"),
            (Azure, "/openai/realtimeapi/sessions"),
            (Azure, "/openai/v1/realtime/client_secrets"),
            (Azure, "/openai/realtime/transcription_sessions"),
            (OpenAICompatible, "/v1/realtime/sessions"),
            (Google, "/v1alpha/auth_tokens"),
            (Google, "/v1beta/auth_tokens"),
            (Google, "/v1alpha/AUTH_TOKENS/"),
            (OpenAICompatible, "/gemini/v1alpha/auth_tokens"),
        ] {
            assert!(
                matches!(
                    denied(p, path, &default()),
                    Some(Refused::MintsCredential(_))
                ),
                "{p} {path}"
            );
            let allowing = EndpointPolicy {
                allow_credential_minting: true,
                ..default()
            };
            assert_eq!(denied(p, path, &allowing), None, "{p} {path}");
        }
    }

    #[test]
    fn management_is_refused_even_when_minting_is_allowed() {
        let allowing = EndpointPolicy {
            allow_credential_minting: true,
            ..default()
        };
        for (p, path) in [
            (OpenAI, "/v1/organization/admin_api_keys"),
            (OpenAI, "/v1/organization/projects/p/service_accounts"),
            (OpenAI, "/organization/users"),
            (OpenAI, "/v1/projects/p/roles"),
            (OpenAI, "/v1/fine_tuning/checkpoints/ft:x/permissions"),
            (Azure, "/openai/v1/organization/invites"),
            (OpenAICompatible, "/api/v1/keys"),
            (OpenAICompatible, "/key/generate"),
            (OpenAICompatible, "/v2/key/info"),
            (OpenAICompatible, "/user/new"),
            (OpenAICompatible, "/model/new"),
            (OpenAICompatible, "/gemini/v1beta/tunedModels/m/permissions"),
            (Anthropic, "/v1/organizations/api_keys"),
            (Anthropic, "/v1/organizations/workspaces/w/members"),
            (Anthropic, "/v1/oauth/token"),
            (Anthropic, "/v1/tunnels/t/reveal_token"),
            (Google, "/v1beta/tunedModels/m/permissions"),
            (Google, "/v1beta/tunedModels/m:transferOwnership"),
        ] {
            assert!(
                matches!(denied(p, path, &allowing), Some(Refused::Management(_))),
                "{p} {path}"
            );
        }
    }

    #[test]
    fn inference_is_untouched() {
        for (p, path) in [
            (OpenAI, "/v1/chat/completions"),
            (OpenAI, "/v1/responses"),
            (OpenAI, "/v1/realtime/calls"),
            (OpenAI, "/v1/models"),
            (Azure, "/openai/deployments/d/chat/completions"),
            (OpenAICompatible, "/v1/chat/completions"),
            (Anthropic, "/v1/messages"),
            (Anthropic, "/v1/messages/batches"),
            (Google, "/v1beta/models/gemini-2.5-flash:generateContent"),
            (Google, "/v1beta/tunedModels/m:generateContent"),
        ] {
            assert_eq!(denied(p, path, &default()), None, "{p} {path}");
        }
    }

    #[test]
    fn vertex_keys_stay_in_their_project_and_location() {
        let policy = EndpointPolicy {
            allow_credential_minting: true,
            vertex_scope: Some(VertexScope {
                project: "my-proj".into(),
                location: "us-central1".into(),
            }),
        };
        let base = "/projects/my-proj/locations/us-central1";
        for (m, path) in [
            (
                Method::POST,
                format!("/v1{base}/publishers/google/models/gemini-2.5-flash:generateContent"),
            ),
            (
                Method::POST,
                format!(
                    "/v1beta1{base}/publishers/google/models/gemini-2.5-flash:streamGenerateContent"
                ),
            ),
            (
                Method::POST,
                format!("/v1{base}/publishers/anthropic/models/claude-sonnet-4-5:rawPredict"),
            ),
            (
                Method::POST,
                format!("/v1{base}/publishers/anthropic/models/count-tokens:rawPredict"),
            ),
            (
                Method::POST,
                format!("/v1beta1{base}/endpoints/openapi/chat/completions"),
            ),
            (Method::POST, format!("/v1{base}/endpoints/123:predict")),
            (Method::GET, format!("/v1{base}/publishers/google/models")),
        ] {
            assert_eq!(check(Vertex, &m, &path, &policy), Ok(()), "{m} {path}");
        }
        for (m, path) in [
            (Method::POST, "/v1/projects/other-proj/locations/us-central1/publishers/google/models/g:generateContent".to_owned()),
            (Method::POST, "/v1/projects/my-proj/locations/europe-west4/publishers/google/models/g:generateContent".to_owned()),
            (Method::POST, "/v1/publishers/google/models/g:generateContent".to_owned()),
            (Method::POST, format!("/v1{base}/endpoints/123:deployModel")),
            (Method::POST, format!("/v1{base}/publishers/google/models/g:setPublisherModelConfig")),
            (Method::POST, format!("/v1{base}/datasets")),
            (Method::DELETE, format!("/v1{base}/endpoints/123")),
            (Method::GET, format!("/v1{base}/customJobs")),
            (Method::GET, "/v1/projects/my-proj/locations".to_owned()),
            (Method::POST, format!("/v2{base}/publishers/google/models/g:generateContent")),
        ] {
            assert_eq!(
                check(Vertex, &m, &path, &policy),
                Err(Refused::OutsideVertexScope),
                "{m} {path}"
            );
        }
        assert_eq!(
            check(
                Vertex,
                &Method::POST,
                &format!("/v1{base}/publishers/google/models/g:generateContent"),
                &default()
            ),
            Err(Refused::NoVertexScope)
        );
    }
}
