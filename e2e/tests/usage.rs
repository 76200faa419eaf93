//! Token usage, end to end: the real sidecar (started as the webhook's container says)
//! against the operator's broker on the real API server, and the fake provider answering
//! with each provider's usage fields. The counts the sidecar's metrics and access log show
//! must be what the application itself can read from the answers it got, plain, streamed
//! and asked for with `Accept-Encoding: gzip` as the SDKs ask.

use std::time::Duration;

use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::FAKE_TEXT;
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig, test_service_account_json};
use byok_e2e::operator::*;
use byok_e2e::serving::{ServingOperator, opted_in_pod};
use byok_e2e::sidecar::{Options, Sidecar};
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde_json::{Value, json};
use tokio::time::Instant;

const READY_WAIT: Duration = Duration::from_secs(30);
/// In every prompt, and in one request's `model`: found in no log line and no metric.
const PROMPT_CANARY: &str = "canary-prompt-5b1d0e";
const MODEL_CANARY: &str = "gpt-4o canary model 9c2e";

/// What the application reads of an answer's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The usage the provider sent, which the sidecar counts too.
    Read,
    /// None: the sidecar asked for it (`streamUsage: Inject`), counted it, and took it out.
    Injected,
    /// None, and the sidecar counts a stream without usage.
    Nothing,
}

/// Input and output tokens, as the application reads them from one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    input: u64,
    output: u64,
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The usage an answer's JSON document carries, by the provider's documented fields; `None`
/// when it carries none. Streams: later documents' fields replace earlier ones.
fn usage_of(doc: &Value, seen: &mut Option<Seen>) {
    let usage = [
        &doc["usage"],
        &doc["message"]["usage"],
        &doc["response"]["usage"],
        &doc["usageMetadata"],
    ]
    .into_iter()
    .find(|u| u.is_object());
    let Some(u) = usage else { return };
    let s = seen.get_or_insert_with(Seen::default);
    if let Some(p) = u.get("prompt_tokens") {
        s.input = n(p);
        s.output = n(&u["completion_tokens"]);
    } else if let Some(p) = u.get("promptTokenCount") {
        s.input = n(p);
        s.output = n(&u["candidatesTokenCount"]) + n(&u["thoughtsTokenCount"]);
    } else {
        if let Some(i) = u.get("input_tokens") {
            s.input =
                n(i) + n(&u["cache_read_input_tokens"]) + n(&u["cache_creation_input_tokens"]);
        }
        if let Some(o) = u.get("output_tokens") {
            s.output = n(o);
        }
    }
}

/// What the application read: a JSON answer, or the `data:` documents of a stream.
fn usage_in(body: &str, stream: bool) -> Option<Seen> {
    let mut seen = None;
    if stream {
        for line in body.lines() {
            if let Some(data) = line.strip_prefix("data:")
                && let Ok(doc) = serde_json::from_str::<Value>(data.trim())
            {
                usage_of(&doc, &mut seen);
            }
        }
    } else if let Ok(doc) = serde_json::from_str::<Value>(body) {
        usage_of(&doc, &mut seen);
    }
    seen
}

/// `byok_proxy_tokens_total` for `key` and `kind`, summed over models.
fn tokens_total(metrics: &str, key: &str, kind: &str) -> u64 {
    let key = format!("key=\"{key}\"");
    let kind = format!("type=\"{kind}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("byok_proxy_tokens_total{") && l.contains(&key))
        .filter(|l| l.contains(&kind))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn without_usage(metrics: &str, key: &str) -> u64 {
    let prefix = format!("byok_proxy_requests_without_usage_total{{key=\"{key}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// Every provider and endpoint shape the fake serves, plain and streamed: the sidecar's
/// token counters move by exactly what the application read from each answer; an OpenAI
/// stream is asked for usage (and the usage chunk taken out) on an openai key, not on an
/// openai-compatible one, where it is counted as a stream without usage, not as zero; the provider was asked for `identity`
/// although the application asked for gzip; the access line carries the counts. With
/// trace-level logs, no prompt, completion or pasted `model` text reaches the sidecar's
/// output or metrics.
#[tokio::test]
async fn tokens_are_counted_per_provider_plain_streamed_and_asked_for_gzip() -> anyhow::Result<()> {
    let env = TestEnv::new("usage-six").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    fake.set_stream_plan(5, Duration::from_millis(1));
    let op = ServingOperator::start(&env, &fake).await?;
    for (kind, name, key) in [
        (ProviderKind::Anthropic, "claude", random_key("sk-ant-")),
        (ProviderKind::OpenAI, "gpt", random_key("sk-proj-")),
        (
            ProviderKind::OpenAICompatible,
            "compat",
            random_key("sk-c-"),
        ),
        (ProviderKind::Google, "gemini", random_key("AIza")),
        (ProviderKind::Azure, "azure", random_key("az")),
    ] {
        fake.add_valid_key(kind, &key);
        let spec = match kind {
            ProviderKind::Azure | ProviderKind::OpenAICompatible => {
                json!({"provider": kind.to_string(), "baseURL": fake.base_url(kind)})
            }
            _ => json!({"provider": kind.to_string()}),
        };
        put_ready_pk(&env, name, &key, spec).await?;
    }
    let sa_json =
        test_service_account_json("byok@demo-project.iam.gserviceaccount.com", "demo-project");
    fake.add_service_account_json(&sa_json)?;
    put_ready_pk(
        &env,
        "vertex",
        &sa_json,
        json!({"provider": "vertex", "vertex": {"location": "us-central1"}}),
    )
    .await?;
    let pod = env
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &opted_in_pod(
                "usage-",
                &["claude", "gpt", "compat", "gemini", "azure", "vertex"],
            ),
        )
        .await?;
    let options = Options {
        env: vec![("BYOK_LOG".into(), "trace".into())],
        ..Options::default()
    };
    let mut sidecar = Sidecar::start_with(&env, &op, &pod, "default", options).await?;
    sidecar.wait_ready(READY_WAIT).await?;

    let chat = |stream: bool, include_usage: bool| {
        let mut b = json!({"model": "gpt-4o-mini", "stream": stream,
            "messages": [{"role": "user", "content": format!("how many tokens is {PROMPT_CANARY}")}]});
        if include_usage {
            b["stream_options"] = json!({"include_usage": true});
        }
        b
    };
    let anthropic = |stream: bool| {
        json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
            "system": PROMPT_CANARY,
            "messages": [{"role": "user", "content": format!("count me, {PROMPT_CANARY}")}]})
    };
    let gemini = json!({"contents": [{"role": "user", "parts": [{"text": format!("count {PROMPT_CANARY}")}]}]});
    let mut pasted = chat(false, false);
    pasted["model"] = json!(MODEL_CANARY);
    let vertex_model =
        "/v1/projects/demo-project/locations/us-central1/publishers/google/models/gemini-2.5-flash";
    // (key, path, body, streamed, what the application reads of usage)
    let calls: Vec<(&str, String, Value, bool, Expect)> = vec![
        (
            "claude",
            "/v1/messages".into(),
            anthropic(false),
            false,
            Expect::Read,
        ),
        (
            "claude",
            "/v1/messages".into(),
            anthropic(true),
            true,
            Expect::Read,
        ),
        (
            "gpt",
            "/v1/chat/completions".into(),
            chat(false, false),
            false,
            Expect::Read,
        ),
        (
            "gpt",
            "/v1/chat/completions".into(),
            chat(true, true),
            true,
            Expect::Read,
        ),
        // The openai key injects stream_options (its default): counted, and the
        // application's stream has no usage chunk, as it asked.
        (
            "gpt",
            "/v1/chat/completions".into(),
            chat(true, false),
            true,
            Expect::Injected,
        ),
        // openai-compatible does not (its default): a stream without usage.
        (
            "compat",
            "/v1/chat/completions".into(),
            chat(true, false),
            true,
            Expect::Nothing,
        ),
        (
            "gpt",
            "/v1/chat/completions".into(),
            pasted,
            false,
            Expect::Read,
        ),
        (
            "gpt",
            "/v1/responses".into(),
            json!({"model": "gpt-4.1", "input": PROMPT_CANARY}),
            false,
            Expect::Read,
        ),
        (
            "gpt",
            "/v1/responses".into(),
            json!({"model": "gpt-4.1", "input": PROMPT_CANARY, "stream": true}),
            true,
            Expect::Read,
        ),
        (
            "gpt",
            "/v1/embeddings".into(),
            json!({"model": "text-embedding-3-small", "input": PROMPT_CANARY}),
            false,
            Expect::Read,
        ),
        (
            "compat",
            "/v1/chat/completions".into(),
            chat(false, false),
            false,
            Expect::Read,
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent".into(),
            gemini.clone(),
            false,
            Expect::Read,
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse".into(),
            gemini.clone(),
            true,
            Expect::Read,
        ),
        (
            "azure",
            "/openai/deployments/gpt-4o/chat/completions".into(),
            chat(false, false),
            false,
            Expect::Read,
        ),
        (
            "azure",
            "/openai/deployments/gpt-4o/chat/completions".into(),
            chat(true, true),
            true,
            Expect::Read,
        ),
        (
            "vertex",
            format!("{vertex_model}:generateContent"),
            gemini.clone(),
            false,
            Expect::Read,
        ),
        (
            "vertex",
            format!("{vertex_model}:streamGenerateContent?alt=sse"),
            gemini.clone(),
            true,
            Expect::Read,
        ),
    ];
    let http = reqwest::Client::new();
    let metrics = || async {
        anyhow::Ok(
            reqwest::get(sidecar.admin_url("/metrics"))
                .await?
                .text()
                .await?,
        )
    };
    for (key, path, body, stream, expect) in &calls {
        let before = metrics().await?;
        let log_before = fake.requests_log().len();
        let res = http
            .post(format!("{}{path}", sidecar.url(key)))
            .header("anthropic-version", "2023-06-01")
            .header("accept-encoding", "gzip, deflate, br, zstd")
            .json(body)
            .send()
            .await?;
        let status = res.status().as_u16();
        let encoding = res.headers().get("content-encoding").cloned();
        let text = res.text().await?;
        assert_eq!(status, 200, "{key} {path}: {text}");
        assert_eq!(encoding, None, "{key} {path}: the answer came compressed");
        let log = fake.requests_log();
        let seen_upstream = log[log_before..]
            .iter()
            .find(|r| r.method == "POST")
            .unwrap_or_else(|| panic!("{key} {path}: not forwarded"));
        assert_eq!(
            seen_upstream.accept_encoding.as_deref(),
            Some("identity"),
            "{key} {path}: the provider was asked for identity"
        );
        let read = usage_in(&text, *stream);
        assert_eq!(
            read.is_some(),
            *expect == Expect::Read,
            "{key} {path}: {text}"
        );
        if *expect == Expect::Injected {
            assert!(
                text.contains("data: [DONE]") && !text.contains("\"choices\":[]"),
                "{key} {path}: the usage-only chunk reached the application: {text}"
            );
        }
        // The counters move when the response has ended: poll briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let after = metrics().await?;
            let moved =
                |kind: &str| tokens_total(&after, key, kind) - tokens_total(&before, key, kind);
            let unknown = without_usage(&after, key) - without_usage(&before, key);
            let counted = match (expect, read) {
                (Expect::Read, Some(s)) => {
                    moved("input") == s.input && moved("output") == s.output && unknown == 0
                }
                (Expect::Injected, _) => moved("input") > 0 && moved("output") > 0 && unknown == 0,
                _ => unknown == 1 && moved("input") == 0,
            };
            if counted {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{key} {path}: the application read {read:?}, the sidecar counted input +{} output +{}, without usage {} -> {}",
                moved("input"),
                moved("output"),
                without_usage(&before, key),
                without_usage(&after, key)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(s) = read {
            let line = format!("input_tokens={} output_tokens={}", s.input, s.output);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !sidecar.output().contains(&line) {
                assert!(
                    Instant::now() < deadline,
                    "{key} {path}: no access line with {line}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The conventions' series are there too, with the provider's name.
    let page = metrics().await?;
    for provider in [
        "anthropic",
        "openai",
        "openai_compatible",
        "gcp.gemini",
        "azure.ai.openai",
        "gcp.vertex_ai",
    ] {
        let name = format!("gen_ai_provider_name=\"{provider}\"");
        assert!(
            page.lines().any(|l| l
                .starts_with("gen_ai_client_token_usage_count{gen_ai_token_type=\"input\"")
                && l.contains(&name)),
            "no gen_ai series for {provider}"
        );
    }
    let output = sidecar.output();
    assert!(
        output.contains("TRACE"),
        "the sidecar logged at trace level"
    );
    for canary in [PROMPT_CANARY, MODEL_CANARY, FAKE_TEXT] {
        assert!(
            !output.contains(canary),
            "the sidecar's output holds {canary:?}"
        );
        assert!(
            !page.contains(canary),
            "the sidecar's metrics hold {canary:?}"
        );
    }
    assert!(
        page.contains(r#"byok_proxy_tokens_total{key="gpt",model="other",type="input"}"#),
        "the pasted model is counted as other"
    );
    Ok(())
}

/// `spec.limits.perPod` on the real API server: requests per minute are exact (the
/// provider sees exactly the limit, the rest get the provider's 429 shape with
/// `retry-after`); a token limit admits until the minute's counted tokens reach it; on a
/// key with a token limit, a stream that would report no usage is refused clearly.
#[tokio::test]
async fn per_pod_limits_answer_in_the_providers_rate_limit_shape() -> anyhow::Result<()> {
    let env = TestEnv::new("usage-limits").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let (claude, gpt, compat) = (
        random_key("sk-ant-"),
        random_key("sk-proj-"),
        random_key("sk-c-"),
    );
    fake.add_valid_key(ProviderKind::Anthropic, &claude);
    fake.add_valid_key(ProviderKind::OpenAI, &gpt);
    fake.add_valid_key(ProviderKind::OpenAICompatible, &compat);
    put_ready_pk(
        &env,
        "claude",
        &claude,
        json!({"provider": "anthropic", "limits": {"perPod": {"requestsPerMinute": 3}}}),
    )
    .await?;
    put_ready_pk(
        &env,
        "gpt",
        &gpt,
        json!({"provider": "openai", "limits": {"perPod": {"tokensPerMinute": 1}}}),
    )
    .await?;
    put_ready_pk(
        &env,
        "compat",
        &compat,
        json!({"provider": "openai-compatible", "baseURL": fake.base_url(ProviderKind::OpenAICompatible),
            "limits": {"perPod": {"tokensPerMinute": 1000000}}}),
    )
    .await?;
    let pod = env
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &opted_in_pod("limits-", &["claude", "gpt", "compat"]),
        )
        .await?;
    let mut sidecar = Sidecar::start(&env, &op, &pod, "default").await?;
    sidecar.wait_ready(READY_WAIT).await?;
    let http = reqwest::Client::new();

    // Requests per minute: 3 of 5 reach the provider.
    let before = fake.requests(ProviderKind::Anthropic);
    let mut codes = Vec::new();
    for _ in 0..5 {
        let res = http
            .post(format!("{}/v1/messages", sidecar.url("claude")))
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await?;
        let code = res.status().as_u16();
        let retry_after: Option<u64> = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body: Value = res.json().await?;
        if code == 429 {
            assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
            assert!(
                retry_after.is_some_and(|s| (1..=60).contains(&s)),
                "retry-after {retry_after:?}"
            );
        }
        codes.push(code);
    }
    assert_eq!(codes, [200, 200, 200, 429, 429]);
    assert_eq!(fake.requests(ProviderKind::Anthropic) - before, 3);

    // On a key with a token limit, an endpoint whose tokens cannot be counted is refused
    // (fail closed), and so is a body that hides `stream` in another case.
    let res = http
        .post(format!("{}/v1/batches", sidecar.url("gpt")))
        .json(&json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}))
        .send()
        .await?;
    assert_eq!(res.status(), 403);
    assert_eq!(
        res.headers()
            .get("x-byok-proxy-error")
            .map(|v| v.as_bytes()),
        Some(&b"endpoint_not_allowed"[..])
    );
    let res = http
        .post(format!("{}/v1/chat/completions", sidecar.url("compat")))
        .json(&json!({"model": "m", "stream": false, "STREAM": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await?;
    assert_eq!(res.status(), 400);

    // Tokens per minute: the first answer's tokens reach the limit; the next is refused.
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let first = http
        .post(format!("{}/v1/chat/completions", sidecar.url("gpt")))
        .json(&chat)
        .send()
        .await?;
    assert_eq!(first.status(), 200);
    first.bytes().await?;
    // The tokens are counted when the answer has ended, just after the client has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let res = http
            .post(format!("{}/v1/chat/completions", sidecar.url("gpt")))
            .json(&chat)
            .send()
            .await?;
        let code = res.status().as_u16();
        let body: Value = res.json().await?;
        if code == 429 {
            assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never limited: {code} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A stream that would report no usage, on a key with a token limit: refused, clearly.
    let res = http
        .post(format!("{}/v1/chat/completions", sidecar.url("compat")))
        .json(
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stream_options.include_usage")),
        "{body}"
    );
    // Asked with usage, it goes.
    let res = http
        .post(format!("{}/v1/chat/completions", sidecar.url("compat")))
        .json(
            &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    Ok(())
}
