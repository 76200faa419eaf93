//! The official SDKs, unmodified, against the real sidecar: Python (`anthropic`, `openai`,
//! `google-genai`), Node (`@anthropic-ai/sdk`, `openai`, `@google/genai`) and Go
//! (`openai-go/v3`, `anthropic-sdk-go/v2`, `google.golang.org/genai`), pinned by the lock files
//! under `e2e/sdk/` and installed by `make sdk-deps` (under `~/.cache/byok-operator/sdk`).
//!
//! Each language's program (`e2e/sdk/<language>/`) runs as a host process with exactly the
//! environment the webhook put in the admitted pod's app container (base URLs, placeholder
//! keys, and the container's own variables), the sidecar's ports moved to the ones the harness
//! gave it; nothing in the programs names a host, a port, a key or a header. Each scenario
//! prints a JSON line; the test checks that the SDK parsed the answer (text, usage, number of
//! stream deltas), that the fake provider got the request with the provider's own auth header
//! and the real key, and that the sidecar's refusals (403 `model_not_allowed`, 503
//! `key_unavailable`) surface as each SDK's own typed error, without reaching the provider.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{
    FakeProvider, FakeProviderConfig, RecordedRequest, VERTEX_TOKEN_PATH, test_service_account_json,
};
use byok_e2e::operator::{create_pk, is_condition, put_secret, random_key, wait_pk};
use byok_e2e::serving::{ServingOperator, opted_in_pod};
use byok_e2e::sidecar::{Sidecar, sidecar_container};
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Start-up includes the broker's caches seeing the new pod.
const READY_WAIT: Duration = Duration::from_secs(30);
/// One SDK program, every scenario of a run (interpreter start included).
const RUN_WAIT: Duration = Duration::from_secs(120);
/// The fake provider's answer text (`e2e/src/fake_provider.rs`).
const FAKE_TEXT: &str = "Hello from the fake provider.";
/// Delta events per streamed answer.
const DELTAS: usize = 4;
/// What the fake reports as output tokens of a plain answer.
const PLAIN_OUTPUT_TOKENS: u64 = 8;
/// The Vertex service account's project, and the location of the key; the app container
/// sets them itself (docs/injection.md: google-genai needs them in code for Vertex).
const VERTEX_PROJECT: &str = "demo-project";
const VERTEX_LOCATION: &str = "us-central1";

/// Where `make sdk-deps` installs (`e2e/sdk/install.sh`).
fn sdk_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("BYOK_SDK_DIR") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/byok-operator/sdk")
}

fn sdk_source(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk").join(rel)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    Python,
    Node,
    Go,
}

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Node => "node",
            Lang::Go => "go",
        }
    }

    /// The lock files whose digest `install.sh` writes to the stamp.
    fn locked_files(self) -> &'static [&'static str] {
        match self {
            Lang::Python => &["python/requirements.txt"],
            Lang::Node => &["node/package.json", "node/package-lock.json"],
            Lang::Go => &["go/go.mod", "go/go.sum", "go/main.go"],
        }
    }

    /// The program and its arguments before the scenarios; an error naming `make sdk-deps`
    /// when the installed SDKs are missing or older than the lock files.
    fn program(self) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
        let cache = sdk_cache();
        let stamp = cache.join(format!("{}.stamp", self.name()));
        let installed = std::fs::read_to_string(&stamp).unwrap_or_default();
        let mut digest = Sha256::new();
        for file in std::iter::once("install.sh").chain(self.locked_files().iter().copied()) {
            digest.update(std::fs::read(sdk_source(file))?);
        }
        let wanted = hex::encode(digest.finalize());
        anyhow::ensure!(
            installed.lines().next() == Some(wanted.as_str()),
            "the {} SDKs are not installed for these lock files ({} does not hold {wanted}): \
             run `make sdk-deps` (e2e/sdk/install.sh) first",
            self.name(),
            stamp.display()
        );
        let (program, args) = match self {
            Lang::Python => (
                cache.join("venv/bin/python"),
                // -B: no __pycache__ in the source tree.
                vec!["-B".into(), sdk_source("python/sdk.py")],
            ),
            Lang::Node => (which("node")?, vec![sdk_source("node/sdk.mjs")]),
            Lang::Go => (cache.join("go/byok-sdk-go"), vec![]),
        };
        anyhow::ensure!(
            program.exists(),
            "{} is missing: run `make sdk-deps`",
            program.display()
        );
        if self == Lang::Node {
            let modules = sdk_source("node/node_modules");
            anyhow::ensure!(
                modules.join("openai").exists(),
                "{} is missing: run `make sdk-deps`",
                modules.display()
            );
        }
        Ok((program, args))
    }
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` is not on PATH"))
}

/// Which key a scenario's request must reach the provider with, and how.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// The key's name in the pod's annotation.
    key: &'static str,
    /// The path the fake provider saw (without the query).
    path: &'static str,
    /// The model the fake recorded (for Azure's deployments API: the deployment).
    model: &'static str,
    stream: bool,
    /// Query parameter names the request must carry (e.g. Azure's `api-version`).
    query: &'static [&'static str],
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Answer(Answer),
    /// The SDK's error: its type as the program reports it, and the status.
    Refused {
        status: u16,
        error_type: &'static str,
    },
}

fn answer(key: &'static str, path: &'static str, model: &'static str, stream: bool) -> Expect {
    Expect::Answer(Answer {
        key,
        path,
        model,
        stream,
        query: &[],
    })
}

fn refused(status: u16, error_type: &'static str) -> Expect {
    Expect::Refused { status, error_type }
}

/// The provider's own auth header, as the fake records it.
fn auth_header(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Anthropic => "x-api-key",
        ProviderKind::OpenAI | ProviderKind::OpenAICompatible | ProviderKind::Vertex => {
            "authorization"
        }
        ProviderKind::Google => "x-goog-api-key",
        ProviderKind::Azure => "api-key",
    }
}

/// The fake's token estimate for a request body (`fake_provider::estimate_tokens`).
fn estimate_tokens(body_bytes: u64) -> u64 {
    body_bytes.div_ceil(4).max(1)
}

/// A key the test created: its provider and [`FakeProvider::key_id`].
struct Key {
    kind: ProviderKind,
    id: String,
}

/// A running sidecar and the environment its pod's app container got.
struct App {
    sidecar: Sidecar,
    env: Vec<(String, String)>,
}

/// Everything the scenarios run against: a serving operator and the fake provider; pod
/// `serving` with a Ready key of each provider (`claude`, `gpt`, `gemini` with
/// `allowedModels`), its sidecar ready; pod `refusing` with keys the fake refuses (`InvalidKey`,
/// so never served: `key_unavailable`).
struct World {
    _env: TestEnv,
    fake: FakeProvider,
    _op: ServingOperator,
    keys: BTreeMap<&'static str, Key>,
    serving: App,
    refusing: App,
}

async fn create_key(
    env: &TestEnv,
    name: &str,
    secret: &str,
    spec: serde_json::Value,
) -> anyhow::Result<()> {
    let source = format!("{name}-raw");
    put_secret(env, &source, &[("api-key", secret)]).await?;
    let mut spec = spec;
    spec["secretRef"] = json!({"name": source});
    create_pk(env, name, spec).await?;
    Ok(())
}

/// The app container's environment as the webhook left it, its `http://127.0.0.1:PORT`
/// values moved to the ports the harness started the sidecar on.
fn app_env(pod: &Pod, sidecar: &Sidecar) -> anyhow::Result<Vec<(String, String)>> {
    let mut moved = BTreeMap::new();
    for arg in sidecar_container(pod)?.args.iter().flatten() {
        if let Some(key) = arg.strip_prefix("--key=") {
            let (name, port) = key.split_once('=').context("--key without a port")?;
            let to = sidecar
                .ports
                .get(name)
                .with_context(|| format!("the harness did not start key {name}"))?;
            moved.insert(port.to_owned(), to.to_string());
        }
    }
    let app = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "app"))
        .context("the pod has no app container")?;
    let mut env = Vec::new();
    for var in app.env.iter().flatten() {
        let value = var
            .value
            .clone()
            .with_context(|| format!("{} is not a plain value", var.name))?;
        let value = match value.strip_prefix("http://127.0.0.1:") {
            Some(rest) => {
                let end = rest.find('/').unwrap_or(rest.len());
                let (port, path) = rest.split_at(end);
                let to = moved
                    .get(port)
                    .with_context(|| format!("{}={value}: no sidecar key port", var.name))?;
                format!("http://127.0.0.1:{to}{path}")
            }
            None => value,
        };
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

impl World {
    async fn start(lang: Lang) -> anyhow::Result<World> {
        let env = TestEnv::new(&format!("sdk-{}", lang.name())).await?;
        let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
        let op = ServingOperator::start(&env, &fake).await?;
        fake.set_stream_plan(DELTAS, Duration::ZERO);

        let mut keys = BTreeMap::new();
        let plain: [(&str, ProviderKind, String, Value); 5] = [
            (
                "claude",
                ProviderKind::Anthropic,
                random_key("sk-ant-"),
                json!({"provider": "anthropic", "allowedModels": ["claude-sonnet-4-5"]}),
            ),
            (
                "gpt",
                ProviderKind::OpenAI,
                random_key("sk-proj-"),
                json!({"provider": "openai", "allowedModels": ["gpt-4o-mini"]}),
            ),
            (
                "compat",
                ProviderKind::OpenAICompatible,
                random_key("sk-c-"),
                json!({"provider": "openai-compatible",
                       "baseURL": fake.base_url(ProviderKind::OpenAICompatible)}),
            ),
            (
                "gemini",
                ProviderKind::Google,
                random_key("AIza"),
                json!({"provider": "google", "allowedModels": ["gemini-2.5-flash"]}),
            ),
            (
                "azure",
                ProviderKind::Azure,
                random_key("az"),
                json!({"provider": "azure", "baseURL": fake.base_url(ProviderKind::Azure)}),
            ),
        ];
        for (name, kind, secret, spec) in plain {
            fake.add_valid_key(kind, &secret);
            create_key(&env, name, &secret, spec).await?;
            keys.insert(
                name,
                Key {
                    kind,
                    id: FakeProvider::key_id(&secret),
                },
            );
        }
        let sa_json = test_service_account_json(
            &format!("byok@{VERTEX_PROJECT}.iam.gserviceaccount.com"),
            VERTEX_PROJECT,
        );
        fake.add_service_account_json(&sa_json)?;
        create_key(
            &env,
            "vertex",
            &sa_json,
            json!({"provider": "vertex", "vertex": {"location": VERTEX_LOCATION}}),
        )
        .await?;
        keys.insert(
            "vertex",
            Key {
                kind: ProviderKind::Vertex,
                id: FakeProvider::key_id(&sa_json),
            },
        );
        // Keys the fake refuses: verified InvalidKey, never served.
        let off = [
            ("claude-off", "anthropic", random_key("sk-ant-")),
            ("gpt-off", "openai", random_key("sk-proj-")),
            ("gemini-off", "google", random_key("AIza")),
        ];
        for (name, provider, secret) in &off {
            create_key(&env, name, secret, json!({"provider": provider})).await?;
        }
        for name in keys.keys() {
            wait_pk(&env, name, "Ready", |pk| {
                is_condition(pk, "Ready", "True", "Valid")
            })
            .await?;
        }
        for (name, _, _) in &off {
            wait_pk(&env, name, "InvalidKey", |pk| {
                is_condition(pk, "Ready", "False", "InvalidKey")
            })
            .await?;
        }

        let mut pod = opted_in_pod(
            "sdk-",
            &["claude", "gpt", "compat", "gemini", "azure", "vertex"],
        );
        if let Some(app) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) {
            app.env = Some(serde_json::from_value(json!([
                {"name": "GOOGLE_CLOUD_PROJECT", "value": VERTEX_PROJECT},
                {"name": "GOOGLE_CLOUD_LOCATION", "value": VERTEX_LOCATION},
            ]))?);
        }
        let pod = env
            .api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await?;
        let mut sidecar = Sidecar::start(&env, &op, &pod, "default").await?;
        sidecar.wait_ready(READY_WAIT).await?;
        let serving = App {
            env: app_env(&pod, &sidecar)?,
            sidecar,
        };

        let off_pod = opted_in_pod("sdk-off-", &["claude-off", "gpt-off", "gemini-off"]);
        let off_pod = env
            .api::<Pod>()
            .create(&PostParams::default(), &off_pod)
            .await?;
        let sidecar = Sidecar::start(&env, &op, &off_pod, "default").await?;
        wait_key_unavailable(&sidecar, &["claude-off", "gpt-off", "gemini-off"]).await?;
        let refusing = App {
            env: app_env(&off_pod, &sidecar)?,
            sidecar,
        };
        Ok(World {
            _env: env,
            fake,
            _op: op,
            keys,
            serving,
            refusing,
        })
    }

    /// Runs `scenarios` in one process of `lang`'s program with `app`'s environment and
    /// checks each line against its expectation.
    async fn check(
        &self,
        lang: Lang,
        app: &App,
        scenarios: &[(&str, Expect)],
    ) -> anyhow::Result<()> {
        let before = self.fake.requests_log().len();
        let names: Vec<&str> = scenarios.iter().map(|(name, _)| *name).collect();
        let lines = run(lang, &app.env, &names).await?;
        for line in &lines {
            eprintln!("{}: {line}", lang.name());
        }
        // The requests that reached the provider, in order: generation calls only (the
        // operator's verification calls are GETs, its Vertex token requests go to the token
        // endpoint).
        let mut reached = self.fake.requests_log()[before..]
            .iter()
            .filter(|r| r.method == "POST" && r.path != VERTEX_TOKEN_PATH)
            .cloned()
            .collect::<Vec<_>>()
            .into_iter();
        for ((name, expect), line) in scenarios.iter().zip(&lines) {
            let context = format!("{} {name}: {line}", lang.name());
            anyhow::ensure!(line["scenario"] == *name, "out of order: {context}");
            match expect {
                Expect::Answer(want) => {
                    let seen = reached
                        .next()
                        .with_context(|| format!("the provider saw nothing: {context}"))?;
                    self.check_answer(want, line, &seen)
                        .with_context(|| format!("{context}\nthe provider saw {seen:?}"))?;
                }
                Expect::Refused { status, error_type } => {
                    let error = &line["error"];
                    anyhow::ensure!(
                        error["type"] == *error_type && error["status"] == *status,
                        "expected {error_type} with status {status}: {context}"
                    );
                    anyhow::ensure!(
                        error["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("byok-proxy")),
                        "the SDK's error does not carry the sidecar's message: {context}"
                    );
                }
            }
        }
        let rest: Vec<RecordedRequest> = reached.collect();
        anyhow::ensure!(
            rest.is_empty(),
            "{}: the provider got requests no scenario should have sent (a refusal was \
             forwarded?): {rest:?}",
            lang.name()
        );
        Ok(())
    }

    fn check_answer(
        &self,
        want: &Answer,
        line: &Value,
        seen: &RecordedRequest,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(line.get("error").is_none(), "the SDK failed");
        let key = &self.keys[want.key];
        anyhow::ensure!(seen.path == want.path, "path: want {}", want.path);
        anyhow::ensure!(seen.status == Some(200), "the provider did not answer 200");
        anyhow::ensure!(
            seen.auth_headers == [auth_header(key.kind)],
            "the provider must get its own auth header, and only it"
        );
        anyhow::ensure!(
            seen.key_id.as_deref() == Some(key.id.as_str()),
            "the provider must get key {}",
            want.key
        );
        anyhow::ensure!(
            seen.model.as_deref() == Some(want.model),
            "model: want {}",
            want.model
        );
        anyhow::ensure!(seen.stream == want.stream, "stream: want {}", want.stream);
        for name in want.query {
            anyhow::ensure!(
                seen.query_names.iter().any(|q| q == name),
                "query parameter {name} missing"
            );
        }
        let (text, output_tokens, deltas) = if want.stream {
            let text: String = (0..DELTAS).map(|i| format!("chunk-{i}")).collect();
            (text, DELTAS as u64, json!(DELTAS))
        } else {
            (FAKE_TEXT.to_owned(), PLAIN_OUTPUT_TOKENS, Value::Null)
        };
        anyhow::ensure!(line["text"] == text.as_str(), "text: want {text:?}");
        anyhow::ensure!(
            line["output_tokens"] == output_tokens,
            "output tokens: want {output_tokens}"
        );
        let input_tokens = estimate_tokens(seen.body_bytes);
        anyhow::ensure!(
            line["input_tokens"] == input_tokens,
            "input tokens: want {input_tokens} (the fake's count for {} bytes)",
            seen.body_bytes
        );
        anyhow::ensure!(line["deltas"] == deltas, "stream deltas: want {deltas}");
        Ok(())
    }
}

/// Polls the sidecar's key ports until each answers the proxy's own 503 `key_unavailable`
/// (the ports are bound and the broker's refusal is known).
async fn wait_key_unavailable(sidecar: &Sidecar, keys: &[&str]) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + READY_WAIT;
    for key in keys {
        loop {
            let last = match http
                .get(format!("{}/v1/models", sidecar.url(key)))
                .send()
                .await
            {
                Ok(r)
                    if r.status() == 503
                        && r.headers()
                            .get("x-byok-proxy-error")
                            .is_some_and(|v| v == "key_unavailable") =>
                {
                    break;
                }
                Ok(r) => format!("{} {:?}", r.status(), r.headers()),
                Err(e) => e.to_string(),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "key {key} never answered 503 key_unavailable: {last}\n{}",
                sidecar.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await; // polling interval
        }
    }
    Ok(())
}

/// Runs `lang`'s program with exactly `env`; one JSON line per scenario.
async fn run(
    lang: Lang,
    env: &[(String, String)],
    scenarios: &[&str],
) -> anyhow::Result<Vec<Value>> {
    let (program, args) = lang.program()?;
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&args)
        .args(scenarios)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_WAIT, cmd.output())
        .await
        .with_context(|| format!("{} did not finish within {RUN_WAIT:?}", program.display()))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "{} {scenarios:?} failed ({}):\n{stdout}\n{stderr}",
        program.display(),
        out.status
    );
    // The programs' lines; an SDK may print notices of its own (@google/genai does).
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("scenario").is_some())
        .collect();
    anyhow::ensure!(
        lines.len() == scenarios.len(),
        "{} scenarios, {} lines:\n{stdout}\n{stderr}",
        scenarios.len(),
        lines.len()
    );
    Ok(lines)
}

const ANTHROPIC_MESSAGES: &str = "/anthropic/v1/messages";
const OPENAI_CHAT: &str = "/openai/v1/chat/completions";
const OPENAI_RESPONSES: &str = "/openai/v1/responses";
const COMPAT_CHAT: &str = "/compat/v1/chat/completions";
const AZURE_CHAT: &str = "/azure/openai/deployments/gpt-4o/chat/completions";
const VERTEX_GENERATE: &str = "/vertex/v1beta1/projects/demo-project/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent";
const VERTEX_STREAM: &str = "/vertex/v1beta1/projects/demo-project/locations/us-central1/publishers/google/models/gemini-2.5-flash:streamGenerateContent";

fn azure(stream: bool) -> Expect {
    Expect::Answer(Answer {
        key: "azure",
        path: AZURE_CHAT,
        model: "gpt-4o",
        stream,
        query: &["api-version"],
    })
}

/// The scenarios every program implements that reach the provider, with the Gemini paths
/// the language's SDK sends.
fn answered(
    gemini_generate: &'static str,
    gemini_stream: &'static str,
) -> Vec<(&'static str, Expect)> {
    vec![
        (
            "anthropic.messages",
            answer("claude", ANTHROPIC_MESSAGES, "claude-sonnet-4-5", false),
        ),
        (
            "anthropic.stream",
            answer("claude", ANTHROPIC_MESSAGES, "claude-sonnet-4-5", true),
        ),
        (
            "openai.chat",
            answer("gpt", OPENAI_CHAT, "gpt-4o-mini", false),
        ),
        (
            "openai.chat.stream",
            answer("gpt", OPENAI_CHAT, "gpt-4o-mini", true),
        ),
        (
            "openai.responses",
            answer("gpt", OPENAI_RESPONSES, "gpt-4o-mini", false),
        ),
        (
            "openai.responses.stream",
            answer("gpt", OPENAI_RESPONSES, "gpt-4o-mini", true),
        ),
        ("azure.chat", azure(false)),
        ("azure.chat.stream", azure(true)),
        (
            "compat.chat",
            answer("compat", COMPAT_CHAT, "gpt-4o-mini", false),
        ),
        (
            "compat.chat.stream",
            answer("compat", COMPAT_CHAT, "gpt-4o-mini", true),
        ),
        (
            "gemini.generate",
            answer("gemini", gemini_generate, "gemini-2.5-flash", false),
        ),
        (
            "gemini.stream",
            answer("gemini", gemini_stream, "gemini-2.5-flash", true),
        ),
        (
            "vertex.generate",
            answer("vertex", VERTEX_GENERATE, "gemini-2.5-flash", false),
        ),
        (
            "vertex.stream",
            answer("vertex", VERTEX_STREAM, "gemini-2.5-flash", true),
        ),
    ]
}

/// The errors one language's SDKs raise: (anthropic 403, anthropic 503, openai 403, openai
/// 503, google 403, google 503).
struct Errors {
    anthropic: (&'static str, &'static str),
    openai: (&'static str, &'static str),
    google: (&'static str, &'static str),
}

async fn sdk_test(
    lang: Lang,
    gemini: (&'static str, &'static str),
    errors: Errors,
) -> anyhow::Result<()> {
    // Fail before the setup when the SDKs are not installed.
    lang.program()?;
    let world = World::start(lang).await?;
    let mut scenarios = answered(gemini.0, gemini.1);
    scenarios.extend([
        ("anthropic.denied", refused(403, errors.anthropic.0)),
        ("anthropic.denied.stream", refused(403, errors.anthropic.0)),
        ("openai.denied", refused(403, errors.openai.0)),
        ("openai.denied.stream", refused(403, errors.openai.0)),
        ("gemini.denied", refused(403, errors.google.0)),
        ("gemini.denied.stream", refused(403, errors.google.0)),
    ]);
    world.check(lang, &world.serving, &scenarios).await?;
    world
        .check(
            lang,
            &world.refusing,
            &[
                ("anthropic.unavailable", refused(503, errors.anthropic.1)),
                ("openai.unavailable", refused(503, errors.openai.1)),
                ("gemini.unavailable", refused(503, errors.google.1)),
            ],
        )
        .await?;
    anyhow::ensure!(
        world
            .serving
            .sidecar
            .output()
            .contains("byok_proxy::access")
            && world
                .refusing
                .sidecar
                .output()
                .contains("byok_proxy::access"),
        "the calls went through the sidecars"
    );
    Ok(())
}

#[tokio::test]
async fn python_sdks_through_the_sidecar() -> anyhow::Result<()> {
    sdk_test(
        Lang::Python,
        (
            "/google/v1/models/gemini-2.5-flash:generateContent",
            "/google/v1/models/gemini-2.5-flash:streamGenerateContent",
        ),
        Errors {
            anthropic: (
                "anthropic.PermissionDeniedError",
                "anthropic.ServiceUnavailableError",
            ),
            openai: ("openai.PermissionDeniedError", "openai.InternalServerError"),
            google: (
                "google.genai.errors.ClientError",
                "google.genai.errors.ServerError",
            ),
        },
    )
    .await
}

#[tokio::test]
async fn node_sdks_through_the_sidecar() -> anyhow::Result<()> {
    sdk_test(
        Lang::Node,
        (
            "/google/v1beta/models/gemini-2.5-flash:generateContent",
            "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        ),
        Errors {
            anthropic: (
                "Anthropic.PermissionDeniedError",
                "Anthropic.ServiceUnavailableError",
            ),
            openai: ("OpenAI.PermissionDeniedError", "OpenAI.InternalServerError"),
            google: ("genai.ApiError", "genai.ApiError"),
        },
    )
    .await
}

#[tokio::test]
async fn go_sdks_through_the_sidecar() -> anyhow::Result<()> {
    sdk_test(
        Lang::Go,
        (
            "/google/v1/models/gemini-2.5-flash:generateContent",
            "/google/v1/models/gemini-2.5-flash:streamGenerateContent",
        ),
        Errors {
            anthropic: ("*anthropic.Error", "*anthropic.Error"),
            openai: ("*openai.Error", "*openai.Error"),
            google: ("genai.APIError", "genai.APIError"),
        },
    )
    .await
}
