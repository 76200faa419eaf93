//! The key broker against the real kube-apiserver: pods admitted through the operator's own
//! webhook, real pod-bound TokenRequest tokens, TokenReview by the API server, and the
//! operator's pod and ProviderKey caches. Each test has its own namespace and operator.
//!
//! Caches lag the API server: every answer that depends on a cache having seen a change is
//! polled for with a deadline, and every refusal is checked after the same request path has
//! been seen to succeed (or after a later-created pod was served, so the cache is past it).

use std::time::Duration;

use anyhow::Context as _;

use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{
    FakeProvider, FakeProviderConfig, TEST_SA_PRIVATE_KEY_PEM, test_service_account_json,
};
use byok_e2e::operator::*;
use byok_e2e::serving::{
    ServingOperator, has_sidecar, opted_in_pod, pod_token, ready_anthropic, service_account,
};
use byok_operator::names;
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use tokio::time::Instant;

/// How long a cache may take to catch up with a change the test just made.
const CACHE_WAIT: Duration = Duration::from_secs(20);
/// DESIGN.md: a new keyVersion and a revocation reach the broker within 10 s.
const CHANGE_WAIT: Duration = Duration::from_secs(10);
/// Between two attempts of a poll.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// One broker answer.
struct Answer {
    status: u16,
    etag: Option<String>,
    lease: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    fn reason(&self) -> String {
        self.json()["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// For failure messages: never the body of a grant (it holds the key).
    fn describe(&self) -> String {
        if self.status == 200 {
            let j = self.json();
            format!(
                "200 keyVersion={} provider={}",
                j["keyVersion"], j["provider"]
            )
        } else {
            format!("{} {}", self.status, String::from_utf8_lossy(&self.body))
        }
    }
}

/// A sidecar-like caller of one operator's broker.
struct Sidecar {
    http: reqwest::Client,
    url: String,
}

impl Sidecar {
    async fn new(op: &ServingOperator, env: &TestEnv) -> anyhow::Result<Self> {
        Ok(Self {
            http: op.https_client(env).await?,
            url: op.broker_url().to_string(),
        })
    }

    async fn ask(
        &self,
        namespace: &str,
        name: &str,
        token: Option<&str>,
        etag: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut req = self
            .http
            .get(format!("{}/v1/keys/{namespace}/{name}", self.url))
            .timeout(Duration::from_secs(10));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(etag) = etag {
            req = req.header("if-none-match", etag);
        }
        let resp = req.send().await?;
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (status, etag, lease) = (
            resp.status().as_u16(),
            header("etag"),
            header("x-byok-lease-seconds"),
        );
        let body = resp.bytes().await?.to_vec();
        Ok(Answer {
            status,
            etag,
            lease,
            body,
        })
    }

    /// Asks until `ok` holds or `within` passes.
    async fn ask_until(
        &self,
        (namespace, name): (&str, &str),
        token: Option<&str>,
        etag: Option<&str>,
        within: Duration,
        what: &str,
        ok: impl Fn(&Answer) -> bool,
    ) -> anyhow::Result<Answer> {
        let deadline = Instant::now() + within;
        loop {
            let answer = self.ask(namespace, name, token, etag).await?;
            if ok(&answer) {
                return Ok(answer);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{namespace}/{name}: not {what} within {within:?}; last answer: {}",
                    answer.describe()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// The fingerprint the operator gives a key (as in `status.fingerprint`).
fn fingerprint_of(key: &str) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        &hex::encode(sha2::Sha256::digest(key.as_bytes()))[..16]
    )
}

/// Creates a pod through the API server (so the webhook sees it) and returns it as stored.
async fn create_pod(env: &TestEnv, pod: &Pod) -> anyhow::Result<Pod> {
    Ok(env.api::<Pod>().create(&PostParams::default(), pod).await?)
}

/// An opted-in pod running as `service_account`.
fn opted_in_pod_as(generate_name: &str, keys: &[&str], service_account: &str) -> Pod {
    let mut pod = opted_in_pod(generate_name, keys);
    if let Some(spec) = pod.spec.as_mut() {
        spec.service_account_name = Some(service_account.into());
    }
    pod
}

/// A pod that lists keys but does not carry the inject label: the webhook never sees it.
fn unlabelled_pod(generate_name: &str, keys: &[&str]) -> Pod {
    let mut pod = opted_in_pod(generate_name, keys);
    pod.metadata.labels = None;
    pod
}

/// Waits until the API server no longer has the pod (unscheduled pods go at once).
async fn delete_pod(env: &TestEnv, name: &str) -> anyhow::Result<()> {
    let pods = env.api::<Pod>();
    pods.delete(name, &DeleteParams::default()).await?;
    let deadline = Instant::now() + CACHE_WAIT;
    while pods.get_opt(name).await?.is_some() {
        anyhow::ensure!(Instant::now() < deadline, "pod {name} was not deleted");
        tokio::time::sleep(POLL_EVERY).await;
    }
    Ok(())
}

/// 1, 2, 3 and 9: the pod that lists the key gets it (and 304 while nothing changed); a pod
/// of another namespace, a pod that did not list it, a pod that did not opt in, a token for
/// another audience and no token are refused, alike where they must not tell anything apart;
/// the operator counted each answer.
#[tokio::test]
async fn the_pod_that_lists_a_key_gets_it_and_nobody_else_does() -> anyhow::Result<()> {
    let env = TestEnv::new("broker-grant").await?;
    let other = TestEnv::new("broker-other").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();

    let key = random_key("sk-ant-api03-");
    let pk = ready_anthropic(&env, &fake, "team", &key, serde_json::json!({})).await?;
    let fingerprint = pk.status.and_then(|s| s.fingerprint).unwrap_or_default();

    // Created before the pod that gets the key: once the broker serves that one, its pod
    // cache (a watch, in resourceVersion order) has seen these too.
    let lists_other = create_pod(&env, &opted_in_pod("lists-other-", &["something-else"])).await?;
    let unlabelled = create_pod(&env, &unlabelled_pod("unlabelled-", &["team"])).await?;
    assert!(
        !has_sidecar(&unlabelled),
        "a pod without the label is not injected"
    );
    let pod = create_pod(&env, &opted_in_pod("app-", &["team"])).await?;
    assert!(has_sidecar(&pod), "the webhook injected the sidecar");
    let token = pod_token(&env, "default", &pod, names::TOKEN_AUDIENCE).await?;

    // 1. The right pod gets the key.
    let granted = sidecar
        .ask_until(
            (ns, "team"),
            Some(&token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;
    let grant = granted.json();
    assert_eq!(grant["credential"]["type"], "apiKey");
    assert!(
        grant["credential"]["value"] == key.as_str(),
        "the grant carries the raw key"
    );
    assert_eq!(grant["provider"], "anthropic");
    assert_eq!(grant["keyVersion"], 1);
    assert_eq!(grant["fingerprint"], fingerprint.as_str());
    assert_eq!(fingerprint, fingerprint_of(&key));
    assert_eq!(grant["namespace"], ns);
    assert_eq!(grant["providerKey"], "team");
    assert_eq!(grant["origin"], fake.origin().as_str());
    assert!(
        grant["baseURL"]
            .as_str()
            .is_some_and(|u| u.starts_with(&fake.origin())),
        "baseURL {} is the fake's",
        grant["baseURL"]
    );
    assert!(granted.lease.is_some(), "a grant carries a lease");
    let etag = granted.etag.clone().expect("a grant has an ETag");

    let again = sidecar.ask(ns, "team", Some(&token), Some(&etag)).await?;
    assert_eq!(again.status, 304, "{}", again.describe());
    assert!(again.body.is_empty(), "a 304 carries no body");
    assert!(
        again
            .lease
            .as_deref()
            .is_some_and(|l| l.parse::<u64>().is_ok_and(|s| s > 0)),
        "a 304 renews the lease: {:?}",
        again.lease
    );
    assert_eq!(again.etag.as_deref(), Some(etag.as_str()));
    let stale = sidecar
        .ask(ns, "team", Some(&token), Some("\"not-the-etag\""))
        .await?;
    assert_eq!(stale.status, 200, "another ETag gets the grant");

    // 2. Another namespace: 403, and the same bytes whether the key exists or not.
    let foreign = create_pod(&other, &opted_in_pod("foreign-", &["team"])).await?;
    let foreign_token = pod_token(&other, "default", &foreign, names::TOKEN_AUDIENCE).await?;
    let across = sidecar.ask(ns, "team", Some(&foreign_token), None).await?;
    let across_missing = sidecar
        .ask(ns, "no-such-key", Some(&foreign_token), None)
        .await?;
    assert_eq!(across.status, 403, "{}", across.describe());
    assert_eq!(
        across.body, across_missing.body,
        "no oracle across namespaces"
    );
    assert_eq!(across_missing.status, 403);
    assert_eq!(across.reason(), "Forbidden");
    assert!(
        !String::from_utf8_lossy(&across.body).contains(&key),
        "no key in a refusal"
    );

    // 3. A pod that did not list the key, a pod that did not opt in: 403, the same bytes.
    let token_other = pod_token(&env, "default", &lists_other, names::TOKEN_AUDIENCE).await?;
    let not_listed = sidecar.ask(ns, "team", Some(&token_other), None).await?;
    assert_eq!(not_listed.status, 403, "{}", not_listed.describe());
    assert_eq!(not_listed.body, across.body, "not listed: the same refusal");
    // The right pod asking for a name it did not list (that does not exist): the same.
    let unlisted_missing = sidecar.ask(ns, "no-such-key", Some(&token), None).await?;
    assert_eq!(
        unlisted_missing.status,
        403,
        "{}",
        unlisted_missing.describe()
    );
    assert_eq!(
        unlisted_missing.body, across.body,
        "no oracle within the namespace"
    );
    let token_unlabelled = pod_token(&env, "default", &unlabelled, names::TOKEN_AUDIENCE).await?;
    let not_opted_in = sidecar
        .ask(ns, "team", Some(&token_unlabelled), None)
        .await?;
    assert_eq!(not_opted_in.status, 403, "{}", not_opted_in.describe());
    assert_eq!(
        not_opted_in.body, across.body,
        "not opted in: the same refusal"
    );

    // Tokens for another audience (the API server's default, or anything else): 401, without
    // a TokenReview.
    let reviews_before = op.metrics.token_reviews("accepted") + op.metrics.token_reviews("refused");
    for audience in [None, Some("other")] {
        let wrong = match audience {
            Some(a) => pod_token(&env, "default", &pod, a).await?,
            None => pod_token(&env, "default", &pod, "").await?,
        };
        let answer = sidecar.ask(ns, "team", Some(&wrong), None).await?;
        assert_eq!(
            answer.status,
            401,
            "audience {audience:?}: {}",
            answer.describe()
        );
    }
    // No token, or not a bearer token: 401.
    let none = sidecar.ask(ns, "team", None, None).await?;
    assert_eq!(none.status, 401, "{}", none.describe());
    assert_eq!(none.reason(), "Unauthenticated");
    let garbage = sidecar.ask(ns, "team", Some("not-a-jwt"), None).await?;
    assert_eq!(garbage.status, 401, "{}", garbage.describe());
    assert_eq!(garbage.reason(), "Unauthenticated");
    assert_eq!(
        op.metrics.token_reviews("accepted") + op.metrics.token_reviews("refused"),
        reviews_before,
        "refused before any TokenReview"
    );

    // 9. Every answer was counted by what it was.
    let m = &op.metrics;
    assert_eq!(
        m.broker_answers("granted"),
        2,
        "the first grant and the one for a stale ETag"
    );
    assert_eq!(m.broker_answers("not_modified"), 1);
    assert_eq!(m.broker_answers("other_namespace"), 2);
    assert_eq!(m.broker_answers("key_not_listed"), 2);
    // The unlabelled pod is not in the (opted-in only) pod cache; polls before the good pod
    // reached the cache were counted as pod_not_found too.
    assert!(m.broker_answers("pod_not_opted_in") + m.broker_answers("pod_not_found") >= 1);
    // Two wrong audiences and a garbage token, refused by the broker's own checks.
    assert_eq!(m.broker_answers("wrong_audience"), 2);
    assert_eq!(m.broker_answers("token_malformed"), 1);
    assert_eq!(m.broker_answers("unauthenticated"), 1, "no token");
    let encoded = m.encode();
    assert!(
        encoded.contains("broker_answers") && encoded.contains("result=\"granted\""),
        "exposed on /metrics:\n{encoded}"
    );
    Ok(())
}

/// 4. A deleted pod is refused once the cache sees it, though its token's review is cached;
/// a pod recreated under the same name (a new uid) does not make the old token good again.
#[tokio::test]
async fn a_deleted_or_recreated_pod_loses_the_key() -> anyhow::Result<()> {
    let env = TestEnv::new("broker-pods").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();
    let key = random_key("sk-ant-api03-");
    ready_anthropic(&env, &fake, "team", &key, serde_json::json!({})).await?;

    let mut named = opted_in_pod("", &["team"]);
    named.metadata.generate_name = None;
    named.metadata.name = Some("worker".into());
    let first = create_pod(&env, &named).await?;
    let old_token = pod_token(&env, "default", &first, names::TOKEN_AUDIENCE).await?;
    sidecar
        .ask_until(
            (ns, "team"),
            Some(&old_token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;

    delete_pod(&env, "worker").await?;
    let gone = sidecar
        .ask_until(
            (ns, "team"),
            Some(&old_token),
            None,
            CACHE_WAIT,
            "refused",
            |a| a.status != 200,
        )
        .await?;
    assert_eq!(
        gone.status,
        403,
        "the review is cached, the pod cache decides: {}",
        gone.describe()
    );
    assert_eq!(gone.reason(), "Forbidden");

    let second = create_pod(&env, &named).await?;
    assert_ne!(second.metadata.uid, first.metadata.uid, "a new pod");
    let new_token = pod_token(&env, "default", &second, names::TOKEN_AUDIENCE).await?;
    // Once the new pod is served, the cache has it: the old token's refusal is not lag.
    sidecar
        .ask_until(
            (ns, "team"),
            Some(&new_token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;
    let old = sidecar.ask(ns, "team", Some(&old_token), None).await?;
    assert!(
        old.status == 403 || old.status == 401,
        "the old pod's token is refused: {}",
        old.describe()
    );
    assert_ne!(old.status, 200);
    assert!(op.metrics.broker_answers("pod_not_found") >= 2);
    Ok(())
}

/// 5. `consumers` narrowed after a pod was admitted: the pod's ServiceAccount decides.
#[tokio::test]
async fn consumers_added_after_admission_are_enforced() -> anyhow::Result<()> {
    let env = TestEnv::new("broker-consumers").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();
    service_account(&env, "app").await?;
    service_account(&env, "batch").await?;
    let key = random_key("sk-ant-api03-");
    ready_anthropic(&env, &fake, "team", &key, serde_json::json!({})).await?;

    let app = create_pod(&env, &opted_in_pod_as("app-", &["team"], "app")).await?;
    assert!(has_sidecar(&app));
    let app_token = pod_token(&env, "app", &app, names::TOKEN_AUDIENCE).await?;
    sidecar
        .ask_until(
            (ns, "team"),
            Some(&app_token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;

    let patch = serde_json::json!({"spec": {"consumers": {"serviceAccounts": ["batch"]}}});
    env.api::<byok_operator::crd::ProviderKey>()
        .patch("team", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let refused = sidecar
        .ask_until(
            (ns, "team"),
            Some(&app_token),
            None,
            CACHE_WAIT,
            "refused",
            |a| a.status != 200,
        )
        .await?;
    assert_eq!(refused.status, 403, "{}", refused.describe());
    assert_eq!(refused.reason(), "ServiceAccountNotAllowed");
    assert!(!String::from_utf8_lossy(&refused.body).contains(&key));

    let batch = create_pod(&env, &opted_in_pod_as("batch-", &["team"], "batch")).await?;
    let batch_token = pod_token(&env, "batch", &batch, names::TOKEN_AUDIENCE).await?;
    let granted = sidecar
        .ask_until(
            (ns, "team"),
            Some(&batch_token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;
    assert!(granted.json()["credential"]["value"] == key.as_str());
    assert!(op.metrics.broker_answers("service_account_not_consumer") >= 1);
    Ok(())
}

/// The Warning Events on `pod` with reason WaitingForProviderKey.
async fn waiting_events(env: &TestEnv, pod: &Pod) -> anyhow::Result<Vec<Event>> {
    let uid = pod.metadata.uid.clone();
    Ok(env
        .api::<Event>()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.uid == uid && r.kind.as_deref() == Some("Pod") && r.name == pod.metadata.name
            }) && e.reason.as_deref() == Some("WaitingForProviderKey")
        })
        .collect())
}

/// 6 and 7. A pod that waits for a key that does not exist yet gets 404 and a Warning Event,
/// then the key once it is created; a rotated source reaches it as keyVersion 2 within 10 s
/// (the old ETag no longer matches), and a deleted ProviderKey is 404 within 10 s.
#[tokio::test]
async fn a_waiting_pod_gets_its_key_then_rotations_and_the_deletion() -> anyhow::Result<()> {
    let env = TestEnv::new("broker-lifecycle").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();

    // 6. The key does not exist yet: admitted (GitOps order), 404 and a Warning Event.
    let pod = create_pod(&env, &opted_in_pod("early-", &["later"])).await?;
    assert!(has_sidecar(&pod), "admitted while the key does not exist");
    let token = pod_token(&env, "default", &pod, names::TOKEN_AUDIENCE).await?;
    let missing = sidecar
        .ask_until((ns, "later"), Some(&token), None, CACHE_WAIT, "404", |a| {
            a.status == 404
        })
        .await?;
    assert_eq!(missing.reason(), "ProviderKeyNotFound");
    let deadline = Instant::now() + CACHE_WAIT;
    let event = loop {
        if let Some(e) = waiting_events(&env, &pod).await?.into_iter().next() {
            break e;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no WaitingForProviderKey Event on the pod"
        );
        tokio::time::sleep(POLL_EVERY).await;
    };
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(
        event.note.as_deref().is_some_and(|n| n.contains("later")),
        "the Event names the key: {:?}",
        event.note
    );
    // Asked again: still one Event (once per period), not one per request.
    sidecar.ask(ns, "later", Some(&token), None).await?;
    assert_eq!(
        waiting_events(&env, &pod)
            .await?
            .iter()
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum::<i32>(),
        1,
        "one Event while waiting"
    );

    let first_key = random_key("sk-ant-api03-");
    ready_anthropic(&env, &fake, "later", &first_key, serde_json::json!({})).await?;
    let granted = sidecar
        .ask_until(
            (ns, "later"),
            Some(&token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;
    assert!(granted.json()["credential"]["value"] == first_key.as_str());
    assert_eq!(granted.json()["keyVersion"], 1);
    let old_etag = granted.etag.clone().expect("ETag");

    // 7. Rotation: the source Secret gets a second valid key.
    let second_key = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &second_key);
    let started = Instant::now();
    put_secret(&env, "later-raw", &[("api-key", &second_key)]).await?;
    // Every grant on the way is one whole key: its version and fingerprint go with it.
    let mixed = std::sync::Mutex::new(Vec::<String>::new());
    let rotated = sidecar
        .ask_until(
            (ns, "later"),
            Some(&token),
            None,
            CHANGE_WAIT,
            "keyVersion 2 with the new key",
            |a| {
                if a.status != 200 {
                    return false;
                }
                let j = a.json();
                let value = j["credential"]["value"].as_str().unwrap_or_default();
                let expected = match value {
                    v if v == first_key => 1,
                    v if v == second_key => 2,
                    _ => 0,
                };
                if j["keyVersion"] != expected || j["fingerprint"] != fingerprint_of(value).as_str()
                {
                    mixed.lock().unwrap().push(format!(
                        "keyVersion {} with key #{expected}, fingerprint {}",
                        j["keyVersion"], j["fingerprint"]
                    ));
                }
                expected == 2 && j["keyVersion"] == 2
            },
        )
        .await?;
    let mixed = mixed.into_inner().unwrap();
    assert!(mixed.is_empty(), "grants that mix two keys: {mixed:?}");
    eprintln!("rotation reached the broker in {:?}", started.elapsed());
    assert_ne!(rotated.etag.as_deref(), Some(old_etag.as_str()));
    let with_old = sidecar
        .ask(ns, "later", Some(&token), Some(&old_etag))
        .await?;
    assert_eq!(
        with_old.status,
        200,
        "the old ETag no longer gives 304: {}",
        with_old.describe()
    );
    assert!(with_old.json()["credential"]["value"] == second_key.as_str());

    // Deletion: 404 within 10 s.
    let started = Instant::now();
    env.api::<byok_operator::crd::ProviderKey>()
        .delete("later", &DeleteParams::default())
        .await?;
    let deleted = sidecar
        .ask_until((ns, "later"), Some(&token), None, CHANGE_WAIT, "404", |a| {
            a.status == 404
        })
        .await?;
    eprintln!("deletion reached the broker in {:?}", started.elapsed());
    assert!(
        ["ProviderKeyDeleting", "ProviderKeyNotFound"].contains(&deleted.reason().as_str()),
        "{}",
        deleted.describe()
    );
    assert!(op.metrics.broker_answers("key_not_found") >= 1);
    assert!(op.metrics.broker_answers("granted") >= 3);
    Ok(())
}

/// 8. Vertex: the broker hands out a short-lived access token, never the service account.
#[tokio::test]
async fn vertex_gets_an_access_token_never_the_private_key() -> anyhow::Result<()> {
    let env = TestEnv::new("broker-vertex").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();
    let sa_json =
        test_service_account_json("byok@demo-project.iam.gserviceaccount.com", "demo-project");
    fake.add_service_account_json(&sa_json)?;
    put_secret(&env, "vertex-raw", &[("api-key", &sa_json)]).await?;
    create_pk(
        &env,
        "gemini",
        serde_json::json!({"provider": "vertex", "secretRef": {"name": "vertex-raw"},
                           "vertex": {"location": "us-central1"}}),
    )
    .await?;
    wait_pk(&env, "gemini", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;

    let pod = create_pod(&env, &opted_in_pod("vertex-", &["gemini"])).await?;
    let token = pod_token(&env, "default", &pod, names::TOKEN_AUDIENCE).await?;
    let granted = sidecar
        .ask_until(
            (ns, "gemini"),
            Some(&token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;
    let grant = granted.json();
    assert_eq!(grant["provider"], "vertex");
    assert_eq!(grant["credential"]["type"], "accessToken");
    let value = grant["credential"]["value"].as_str().unwrap_or_default();
    assert!(!value.is_empty(), "an access token");
    assert_ne!(value, sa_json, "not the service account JSON");
    let expires: jiff::Timestamp = grant["credential"]["expiresAt"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert!(expires > jiff::Timestamp::now(), "expires in the future");

    let body = String::from_utf8_lossy(&granted.body);
    // A line from the middle of the PEM body: distinctive, and present in any encoding of it.
    let fragment = TEST_SA_PRIVATE_KEY_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .nth(3)
        .expect("a PEM body line");
    assert!(fragment.len() >= 40);
    for needle in [fragment, "private_key", "PRIVATE KEY", "client_email"] {
        assert!(
            !body.contains(needle),
            "the grant must not contain {needle:?}"
        );
    }
    // The same token again (cached until shortly before it expires), and 304 by ETag.
    let etag = granted.etag.clone().expect("ETag");
    let again = sidecar.ask(ns, "gemini", Some(&token), Some(&etag)).await?;
    assert_eq!(again.status, 304, "{}", again.describe());
    assert_eq!(op.metrics.broker_answers("not_modified"), 1);
    Ok(())
}

/// The key goes to the injected sidecar only, never to a container of the application: a pod
/// created without the label (the webhook never saw it) with a byok.dev token of its own and
/// labelled afterwards, a sidecar whose image was swapped after admission, and an ephemeral
/// container mounting the sidecar's token are all refused like any other stranger.
#[tokio::test]
async fn only_the_injected_sidecar_gets_the_key() -> anyhow::Result<()> {
    use kube::api::{Patch, PatchParams};
    let env = TestEnv::new("broker-past").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();
    let key = random_key("sk-ant-api03-");
    ready_anthropic(&env, &fake, "team", &key, serde_json::json!({})).await?;
    let pods = env.api::<Pod>();

    // The control: an injected pod gets the key.
    let good = create_pod(&env, &opted_in_pod("good-", &["team"])).await?;
    let debugged = create_pod(&env, &opted_in_pod("debugged-", &["team"])).await?;
    assert!(has_sidecar(&good) && has_sidecar(&debugged));
    for pod in [&good, &debugged] {
        let token = pod_token(&env, "default", pod, names::TOKEN_AUDIENCE).await?;
        sidecar
            .ask_until(
                (ns, "team"),
                Some(&token),
                None,
                CACHE_WAIT,
                "granted",
                |a| a.status == 200,
            )
            .await?;
    }

    // Past the webhook: no label at creation, its own token volume mounted by the app, then
    // labelled (labels and annotations can change; containers and volumes cannot).
    let mut sneaky: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": "sneaky-",
            "annotations": {(names::PROVIDER_KEYS_ANNOTATION): "team"}},
        "spec": {
            "containers": [{"name": "app", "image": "busybox",
                "volumeMounts": [{"name": "stolen", "mountPath": "/stolen"}]}],
            "volumes": [{"name": "stolen", "projected": {"sources": [{"serviceAccountToken":
                {"audience": names::TOKEN_AUDIENCE, "path": "token"}}]}}]
        }
    }))?;
    sneaky = create_pod(&env, &sneaky).await?;
    assert!(!has_sidecar(&sneaky), "the webhook never saw it");
    let name = sneaky.metadata.name.clone().unwrap_or_default();
    let label = Patch::Merge(
        serde_json::json!({"metadata": {"labels": {(names::INJECT_LABEL): names::INJECT_VALUE}}}),
    );
    // Refused at the API server (update.byok.dev)...
    let refused = pods
        .patch(&name, &PatchParams::default(), &label)
        .await
        .expect_err("a late opt-in is refused");
    assert!(
        refused
            .to_string()
            .contains("can only be set when a pod is created"),
        "{refused}"
    );
    // ...and by the broker where that webhook is missing (or was bypassed): the rest of
    // this test runs without it.
    op.remove_webhook(&env, "update.byok.dev").await?;
    pods.patch(&name, &PatchParams::default(), &label).await?;
    let token = pod_token(&env, "default", &sneaky, names::TOKEN_AUDIENCE).await?;
    // Every answer is a refusal; wait until one came from the labelled pod in the cache.
    let deadline = Instant::now() + CACHE_WAIT;
    while op.metrics.broker_answers("pod_not_injected") == 0 {
        let answer = sidecar.ask(ns, "team", Some(&token), None).await?;
        assert_eq!(answer.status, 403, "{}", answer.describe());
        assert!(
            Instant::now() < deadline,
            "the labelled pod was never judged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }

    // The sidecar's image swapped after admission (the kubelet would restart it as that image;
    // without update.byok.dev, removed above, the API server lets it through).
    let good_name = good.metadata.name.clone().unwrap_or_default();
    pods.patch(
        &good_name,
        &PatchParams::default(),
        &Patch::Strategic(serde_json::json!({"spec": {"initContainers": [
            {"name": byok_operator::webhook::patch::SIDECAR_NAME, "image": "evil.example/steal:1"}]}})),
    )
    .await?;
    let token = pod_token(&env, "default", &good, names::TOKEN_AUDIENCE).await?;
    let refused = sidecar
        .ask_until(
            (ns, "team"),
            Some(&token),
            None,
            CACHE_WAIT,
            "refused",
            |a| a.status == 403,
        )
        .await?;
    assert_eq!(refused.reason(), "Forbidden");

    // An ephemeral container (kubectl debug) mounting the sidecar's token: refused at the
    // API server (ephemeral.byok.dev); without that webhook, by the broker.
    let debugged_name = debugged.metadata.name.clone().unwrap_or_default();
    let debug = Patch::Strategic(serde_json::json!({"spec": {"ephemeralContainers": [{
        "name": "debug", "image": "busybox",
        "volumeMounts": [{"name": byok_operator::webhook::patch::TOKEN_VOLUME,
            "mountPath": "/stolen"}]}]}}));
    let refused = pods
        .patch_subresource(
            "ephemeralcontainers",
            &debugged_name,
            &PatchParams::default(),
            &debug,
        )
        .await
        .expect_err("refused at the API server");
    assert!(
        refused.to_string().contains("ephemeral.byok.dev"),
        "{refused}"
    );
    op.remove_webhook(&env, "ephemeral.byok.dev").await?;
    let deadline = Instant::now() + CACHE_WAIT;
    while let Err(e) = pods
        .patch_subresource(
            "ephemeralcontainers",
            &debugged_name,
            &PatchParams::default(),
            &debug,
        )
        .await
    {
        // The API server's view of the configuration catches up.
        anyhow::ensure!(Instant::now() < deadline, "still refused: {e}");
        tokio::time::sleep(POLL_EVERY).await;
    }
    let token = pod_token(&env, "default", &debugged, names::TOKEN_AUDIENCE).await?;
    sidecar
        .ask_until(
            (ns, "team"),
            Some(&token),
            None,
            CACHE_WAIT,
            "refused",
            |a| a.status == 403,
        )
        .await?;
    assert!(op.metrics.broker_answers("pod_not_injected") >= 3);
    assert_eq!(
        op.metrics.broker_answers("granted"),
        2,
        "only the two injected pods, before"
    );
    Ok(())
}

/// Issue 19, item 1, as a pod editor would do it: a pod created *without* the inject label
/// (the webhook never sees it) whose init container `byok-proxy` copies an injected sidecar
/// exactly (image, args, env, the token and empty volumes) plus an emptyDir mounted with
/// `subPath` over the binary's path, then labelled and annotated. Its pod-bound token once
/// got 200 with the key; the broker now holds the token holder to the accepted shape, on
/// the pod as stored, and refuses it. So does a pod past the webhook that reaches the node
/// (a privileged container, a hostPath volume) around an otherwise perfect copy.
#[tokio::test]
async fn a_hand_made_copy_of_the_sidecar_gets_no_key() -> anyhow::Result<()> {
    let env = TestEnv::new("broker-copy").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();
    let key = random_key("sk-ant-api03-");
    ready_anthropic(&env, &fake, "ant", &key, serde_json::json!({})).await?;
    let pods = env.api::<Pod>();

    // The model: an injected pod (it gets the key).
    let good = create_pod(&env, &opted_in_pod("model-", &["ant"])).await?;
    let token = pod_token(&env, "default", &good, names::TOKEN_AUDIENCE).await?;
    sidecar
        .ask_until(
            (ns, "ant"),
            Some(&token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;
    let spec = good.spec.clone().unwrap_or_default();
    let injected = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == byok_operator::webhook::patch::SIDECAR_NAME)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no sidecar"))?;
    let volumes: Vec<serde_json::Value> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name.starts_with("byok-"))
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;

    // (what is added to the exact copy, the volumes it needs); the first, nothing: an exact
    // copy of the sidecar can only take the token to this broker, and is served (a pod
    // creator may use the keys anyway; what the broker cannot tell apart is written in
    // docs/upgrade.md).
    let variants: Vec<(&str, serde_json::Value, Vec<serde_json::Value>)> = vec![
        ("an exact copy", serde_json::json!({}), vec![]),
        (
            "an emptyDir over the binary",
            serde_json::json!({"volumeMounts+": [{"name": "swap", "mountPath": "/byok-operator", "subPath": "byok-operator"}]}),
            vec![serde_json::json!({"name": "swap", "emptyDir": {}})],
        ),
        (
            "a privileged app container",
            serde_json::json!({"app": {"securityContext": {"privileged": true}}}),
            vec![],
        ),
        (
            "a hostPath volume",
            serde_json::json!({"app": {"volumeMounts": [{"name": "node", "mountPath": "/node"}]}}),
            vec![
                serde_json::json!({"name": "node", "hostPath": {"path": "/var/lib/kubelet/pods"}}),
            ],
        ),
    ];
    // Labelling a pod after creation is refused at the API server (update.byok.dev, see
    // `the_api_server_refuses_late_opt_in_image_swaps_and_exec`); here the broker is the
    // last line, as in a cluster without that webhook.
    op.remove_webhook(&env, "update.byok.dev").await?;
    for (what, change, extra_volumes) in variants {
        let mut copy = serde_json::to_value(&injected)?;
        if let Some(mounts) = change.get("volumeMounts+") {
            for m in mounts.as_array().into_iter().flatten() {
                copy["volumeMounts"]
                    .as_array_mut()
                    .ok_or_else(|| anyhow::anyhow!("mounts"))?
                    .push(m.clone());
            }
        }
        let mut app = serde_json::json!({"name": "app", "image": "busybox"});
        if let Some(extra) = change.get("app").and_then(|a| a.as_object()) {
            for (k, v) in extra {
                app[k] = v.clone();
            }
        }
        let mut all_volumes = volumes.clone();
        all_volumes.extend(extra_volumes);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"generateName": "copy-"},
            "spec": {"initContainers": [copy], "containers": [app], "volumes": all_volumes}
        }))?;
        let pod = create_pod(&env, &pod).await?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        pods.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {
                "labels": {(names::INJECT_LABEL): names::INJECT_VALUE},
                "annotations": {(names::PROVIDER_KEYS_ANNOTATION): "ant"}}})),
        )
        .await?;
        let token = pod_token(&env, "default", &pod, names::TOKEN_AUDIENCE).await?;
        if what == "an exact copy" {
            sidecar
                .ask_until(
                    (ns, "ant"),
                    Some(&token),
                    None,
                    CACHE_WAIT,
                    "granted",
                    |a| a.status == 200,
                )
                .await?;
            continue;
        }
        // Every answer is a refusal; wait until the labelled pod was judged in the cache.
        let before = op.metrics.broker_answers("pod_not_injected");
        let deadline = Instant::now() + CACHE_WAIT;
        while op.metrics.broker_answers("pod_not_injected") == before {
            let answer = sidecar.ask(ns, "ant", Some(&token), None).await?;
            assert_eq!(answer.status, 403, "{what}: {}", answer.describe());
            assert!(
                !String::from_utf8_lossy(&answer.body).contains(&key),
                "{what}: the key"
            );
            anyhow::ensure!(Instant::now() < deadline, "{what}: never judged");
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    assert_eq!(
        op.metrics.broker_answers("granted"),
        2,
        "only the model pod and the exact copy"
    );
    Ok(())
}

/// Forged tokens sent while the flood test runs: copies of a real one, only the signature
/// wrong (issue 19: each cost a TokenReview).
const FORGED: usize = 2_000;
/// Forged requests in flight.
const FLOOD_CONCURRENCY: usize = 32;

/// What the flood saw.
#[derive(Default)]
struct Flood {
    sent: usize,
    /// Answers other than 401 `Unauthenticated`, with the first of them.
    other: usize,
    first_other: Option<String>,
}

/// Made-up tokens carrying a real pod's claims (issuer, audience, expiry, `kid`, the pod's
/// name and uid) cost the API server no TokenReview: at most 1 % of them reach it (none, in
/// fact), each is refused 401, and meanwhile a reviewed sidecar keeps being served from the
/// cache (and refused at once when its key is deleted) and a new pod gets its key within 5 s. (How fast the reviewed sidecar stays is
/// measured by `make bench`, section `forged`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_cost_no_token_review() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = TestEnv::new("broker-forged").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let sidecar = Sidecar::new(&op, &env).await?;
    let ns = env.namespace.as_str();
    ready_anthropic(
        &env,
        &fake,
        "team",
        &random_key("sk-ant-api03-"),
        serde_json::json!({}),
    )
    .await?;

    let pod = create_pod(&env, &opted_in_pod("reviewed-", &["team"])).await?;
    let token = pod_token(&env, "default", &pod, names::TOKEN_AUDIENCE).await?;
    let granted = sidecar
        .ask_until(
            (ns, "team"),
            Some(&token),
            None,
            CACHE_WAIT,
            "granted",
            |a| a.status == 200,
        )
        .await?;
    let etag = granted.etag.clone().expect("a grant has an ETag");
    let forged = byok_e2e::forged::forged_tokens(&token, FORGED)?;
    // One forgery first: the broker has fetched the API server's keys by now (the grant above
    // needed them), so it is refused locally.
    let one = sidecar.ask(ns, "team", Some(&forged[0]), None).await?;
    assert_eq!((one.status, one.reason()), (401, "Unauthenticated".into()));

    let reviews = || {
        ["accepted", "refused", "failed"]
            .into_iter()
            .map(|r| op.metrics.token_reviews(r))
            .sum::<u64>()
    };
    let reviews_before = reviews();
    let bad_signatures_before = op.metrics.broker_answers("token_bad_signature");

    // The flood: every forgery once, then again until the rest of the test is done.
    let http = op.https_client(&env).await?;
    let url = format!("{}/v1/keys/{ns}/team", op.broker_url());
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (stop, forged) = (stop.clone(), Arc::new(forged));
        tokio::spawn(async move {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let tasks: Vec<_> = (0..FLOOD_CONCURRENCY)
                .map(|_| {
                    let (http, url, stop, forged, next) = (
                        http.clone(),
                        url.clone(),
                        stop.clone(),
                        forged.clone(),
                        next.clone(),
                    );
                    tokio::spawn(async move {
                        let mut seen = Flood::default();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= forged.len() && stop.load(Ordering::Relaxed) {
                                return seen;
                            }
                            let answer = http
                                .get(&url)
                                .bearer_auth(&forged[i % forged.len()])
                                .timeout(Duration::from_secs(10))
                                .send()
                                .await;
                            seen.sent += 1;
                            let what = match answer {
                                Ok(r) => {
                                    let status = r.status().as_u16();
                                    let body = r.text().await.unwrap_or_default();
                                    (status == 401 && body.contains("\"Unauthenticated\""))
                                        .then_some(())
                                        .ok_or(format!("{status} {body}"))
                                }
                                Err(e) => Err(e.to_string()),
                            };
                            if let Err(what) = what {
                                seen.other += 1;
                                seen.first_other.get_or_insert(what);
                            }
                        }
                    })
                })
                .collect();
            let mut all = Flood::default();
            for task in futures::future::join_all(tasks).await {
                let seen = task.unwrap_or_default();
                all.sent += seen.sent;
                all.other += seen.other;
                all.first_other = all.first_other.or(seen.first_other);
            }
            all
        })
    };
    // The flood is under way before the new pod asks.
    let deadline = Instant::now() + CACHE_WAIT;
    while op.metrics.broker_answers("token_bad_signature") < bad_signatures_before + 200 {
        anyhow::ensure!(Instant::now() < deadline, "the flood did not start");
        tokio::time::sleep(POLL_EVERY).await;
    }

    // The reviewed sidecar is answered from the cache: 304, never 503 TooBusy.
    for _ in 0..20 {
        let answer = sidecar.ask(ns, "team", Some(&token), Some(&etag)).await?;
        assert_eq!(answer.status, 304, "{}", answer.describe());
    }
    // A new pod, its token never reviewed: its key within 5 s.
    let new_pod = create_pod(&env, &opted_in_pod("new-", &["team"])).await?;
    let new_token = pod_token(&env, "default", &new_pod, names::TOKEN_AUDIENCE).await?;
    let asked = Instant::now();
    sidecar
        .ask_until(
            (ns, "team"),
            Some(&new_token),
            None,
            Duration::from_secs(5),
            "granted during the flood",
            |a| a.status == 200,
        )
        .await?;
    let new_pod_took = asked.elapsed();
    let during = op.metrics.broker_answers("token_bad_signature") - bad_signatures_before;
    // A revocation reaches the reviewed sidecar during the flood: the key deleted, 404.
    env.api::<byok_operator::crd::ProviderKey>()
        .delete("team", &DeleteParams::default())
        .await?;
    sidecar
        .ask_until(
            (ns, "team"),
            Some(&token),
            Some(&etag),
            CHANGE_WAIT,
            "refused once the key is deleted",
            |a| a.status == 404,
        )
        .await?;

    stop.store(true, Ordering::Relaxed);
    let seen = flood.await?;
    let reviews = reviews() - reviews_before;
    eprintln!(
        "flood: {} forged requests ({} distinct tokens), {during} of them refused before the new pod had its key; TokenReviews meanwhile: {reviews} (the new pod's included); the new pod's key after {new_pod_took:?}",
        seen.sent, FORGED
    );
    assert!(seen.sent >= FORGED, "the flood sent {}", seen.sent);
    assert_eq!(
        seen.other, 0,
        "every forgery is refused 401 Unauthenticated; first other answer: {:?}",
        seen.first_other
    );
    assert_eq!(
        op.metrics.broker_answers("token_bad_signature") - bad_signatures_before,
        seen.sent as u64,
        "each forgery was refused for its signature"
    );
    // The new pod's token costs one review; forgeries at most 1 % of theirs.
    assert!(
        reviews <= 1 + seen.sent as u64 / 100,
        "{reviews} TokenReviews for {} forged requests",
        seen.sent
    );
    Ok(())
}

/// Where each release's injected pod is kept (`NN.json`, oldest first).
const SIDECAR_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/sidecars");
/// In a fixture, the broker CA the pod was injected with (each test has its own).
const CA_PLACEHOLDER: &str = "{{BROKER_CA}}";
/// In a fixture, the broker URL (each test's broker has its own port).
const URL_PLACEHOLDER: &str = "{{BROKER_URL}}";

/// A stored injected pod as a fixture: its spec, the CA and broker URL replaced by
/// placeholders, nothing that one API server assigns and the next would not.
fn fixture_of(pod: &Pod, ca: &str, broker_url: &str) -> anyhow::Result<serde_json::Value> {
    let mut spec = serde_json::to_value(pod.spec.as_ref().context("spec")?)?;
    if let Some(spec) = spec.as_object_mut() {
        spec.remove("nodeName");
    }
    let text = serde_json::to_string_pretty(&spec)?
        .replace(serde_json::to_string(ca)?.trim_matches('"'), CA_PLACEHOLDER)
        .replace(broker_url, URL_PLACEHOLDER);
    Ok(serde_json::from_str(&text)?)
}

/// The fixture pod's sidecar.
fn sidecar(pod: &mut Pod) -> &mut k8s_openapi::api::core::v1::Container {
    pod.spec
        .as_mut()
        .and_then(|s| s.init_containers.as_mut())
        .and_then(|c| c.iter_mut().find(|c| c.name == "byok-proxy"))
        .expect("a sidecar in the fixture")
}

/// An opted-in pod from a fixture, with `ca` as its broker's CA.
fn from_fixture(
    fixture: &serde_json::Value,
    (ca, broker_url): (&str, &str),
    name: &str,
) -> anyhow::Result<Pod> {
    let spec = serde_json::to_string(fixture)?
        .replace(CA_PLACEHOLDER, serde_json::to_string(ca)?.trim_matches('"'))
        .replace(URL_PLACEHOLDER, broker_url);
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {names::INJECT_LABEL: names::INJECT_VALUE},
            "annotations": {names::PROVIDER_KEYS_ANNOTATION: "claude"},
        },
        "spec": serde_json::from_str::<serde_json::Value>(&spec)?,
    }))?)
}

/// Issue 20 item 1: pods injected by every release keep their keys, whatever changed that
/// does not matter to security (admin port, broker URL, image tag, resources); a copy with a
/// change that does (whom it trusts, where its token comes from, what it runs) is refused.
/// The newest fixture is what the webhook injects now: a change of the sidecar's shape fails
/// here until `make sidecar-fixture` adds it as a new fixture (the old ones stay).
#[tokio::test]
async fn every_released_sidecar_shape_is_served_and_security_changes_are_not() -> anyhow::Result<()>
{
    let env = TestEnv::new("shapes").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    ready_anthropic(
        &env,
        &fake,
        "claude",
        &random_key("sk-ant-"),
        serde_json::json!({}),
    )
    .await?;
    let ca = op.ca_pem(&env).await?;
    let pods = env.api::<Pod>();

    // What this release injects, as stored (defaults and all).
    let mut base = opted_in_pod("current-", &["claude"]);
    if let Some(spec) = base.spec.as_mut() {
        spec.automount_service_account_token = Some(false);
    }
    let current = pods.create(&PostParams::default(), &base).await?;
    anyhow::ensure!(has_sidecar(&current), "not injected");
    let now = fixture_of(&current, &ca, op.broker_url())?;
    let broker = (ca.as_str(), op.broker_url());
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(SIDECAR_FIXTURES)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let newest = files
        .last()
        .map(|f| {
            anyhow::Ok(serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(f)?,
            )?)
        })
        .transpose()?;
    if newest.as_ref() != Some(&now) {
        let next = format!("{SIDECAR_FIXTURES}/{:02}.json", files.len() + 1);
        if std::env::var_os("BYOK_WRITE_SIDECAR_FIXTURE").is_some() {
            std::fs::write(&next, serde_json::to_string_pretty(&now)? + "\n")?;
            files.push(next.into());
        } else {
            anyhow::bail!(
                "the injected sidecar's shape changed: run `make sidecar-fixture` to add {next} \
                 (keep the older fixtures: running pods have their shapes)"
            );
        }
    }
    // From here on the API server must not inject: fixtures are pods as stored.
    op.remove_webhook(&env, "inject.byok.dev").await?;

    let served = |pod: Pod| {
        let (env, op) = (&env, &op);
        async move {
            let pod = env
                .api::<Pod>()
                .create(&PostParams::default(), &pod)
                .await?;
            let token = pod_token(env, "default", &pod, "byok.dev").await?;
            let http = op.https_client(env).await?;
            let url = format!("{}/v1/keys/{}/claude", op.broker_url(), env.namespace);
            // The pod cache may lag its creation: a final answer is 200 or a shape refusal
            // (this request's, as counted by the operator).
            let refused_before = op.metrics.broker_answers("pod_not_injected");
            let deadline = Instant::now() + CACHE_WAIT;
            loop {
                let status = http.get(&url).bearer_auth(&token).send().await?.status();
                if status == 200 {
                    return anyhow::Ok(true);
                }
                if status == 403 && op.metrics.broker_answers("pod_not_injected") > refused_before {
                    return Ok(false);
                }
                anyhow::ensure!(Instant::now() < deadline, "no final answer: {status}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for (n, file) in files.iter().enumerate() {
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
        let name = |what: &str| format!("f{n}-{what}");
        assert!(
            served(from_fixture(&fixture, broker, &name("as-released"))?).await?,
            "{}: as released",
            file.display()
        );
        // Not security-relevant: served.
        let mut varied = from_fixture(&fixture, broker, &name("varied"))?;
        {
            let c = sidecar(&mut varied);
            c.image = c.image.as_ref().map(|i| {
                format!(
                    "{}:another-tag",
                    byok_operator::sidecar::shape::image_repository(i)
                )
            });
            c.image_pull_policy = Some("Always".into());
            c.resources = None;
            for arg in c.args.iter_mut().flatten() {
                if arg.starts_with("--admin-addr=") {
                    *arg = "--admin-addr=0.0.0.0:16090".into();
                } else if arg.starts_with("--broker-url=") {
                    // The same host, another port and a path: not what is checked.
                    *arg = format!(
                        "--broker-url={}:1/elsewhere",
                        op.broker_url().rsplit_once(':').map_or("", |(h, _)| h)
                    );
                }
            }
        }
        assert!(served(varied).await?, "{}: varied", file.display());
    }
    // Security-relevant, on every fixture it applies to: each refused.
    type Mutation = fn(&mut Pod);
    fn volume(pod: &mut Pod, name: &str) -> Option<k8s_openapi::api::core::v1::Volume> {
        pod.spec
            .as_mut()
            .and_then(|s| s.volumes.as_mut())
            .and_then(|v| v.iter_mut().find(|v| v.name == name))
            .map(|v| v.clone())
    }
    fn set_volume(pod: &mut Pod, v: k8s_openapi::api::core::v1::Volume) {
        if let Some(slot) = pod
            .spec
            .as_mut()
            .and_then(|s| s.volumes.as_mut())
            .and_then(|vs| vs.iter_mut().find(|x| x.name == v.name))
        {
            *slot = v;
        }
    }
    let mutations: [(&str, Mutation); 15] = [
        // Resolving the broker's name with servers of its own (the broker judges its cache's
        // copy of the pod, which must keep how the pod resolves names).
        ("own-nameservers", |p| {
            if let Some(s) = p.spec.as_mut() {
                s.dns_policy = Some("None".into());
                s.dns_config = Some(k8s_openapi::api::core::v1::PodDNSConfig {
                    nameservers: Some(vec!["10.9.9.9".into()]),
                    ..Default::default()
                });
            }
        }),
        // Another image, whatever it runs.
        ("other-repository", |p| {
            sidecar(p).image = Some("registry.example/grabber:1".into());
        }),
        // The program and its image belong together: the operator's image runs `proxy`, the
        // byok-proxy image takes its flags with no subcommand.
        ("legacy-args-on-the-proxy-image", |p| {
            let c = sidecar(p);
            if c.args.as_ref().and_then(|a| a.first()).map(String::as_str) != Some("proxy") {
                c.args
                    .get_or_insert_with(Vec::new)
                    .insert(0, "proxy".into());
            }
        }),
        ("proxy-image-with-legacy-args", |p| {
            let c = sidecar(p);
            if c.args.as_ref().and_then(|a| a.first()).map(String::as_str) == Some("proxy") {
                c.image = Some(byok_e2e::serving::TEST_PROXY_IMAGE.into());
            }
        }),
        ("other-ca", |p| {
            for e in sidecar(p).env.iter_mut().flatten() {
                if e.name == "BYOK_BROKER_CA" {
                    e.value = Some(
                        "-----BEGIN CERTIFICATE-----\nother\n-----END CERTIFICATE-----\n".into(),
                    );
                }
            }
        }),
        // The trust bundle: a ConfigMap the namespace's editors write, or frozen.
        ("other-bundle", |p| {
            if let Some(mut v) = volume(p, byok_operator::webhook::patch::TRUST_VOLUME) {
                if let Some(cm) = v.config_map.as_mut() {
                    cm.name = "mine".into();
                }
                set_volume(p, v);
            }
        }),
        ("frozen-bundle", |p| {
            for m in sidecar(p).volume_mounts.iter_mut().flatten() {
                if m.name == byok_operator::webhook::patch::TRUST_VOLUME {
                    m.sub_path = Some(names::TRUST_BUNDLE_KEY.into());
                }
            }
        }),
        ("bundle-file-env", |p| {
            if volume(p, byok_operator::webhook::patch::TRUST_VOLUME).is_some() {
                sidecar(p).env.get_or_insert_with(Vec::new).push(
                    k8s_openapi::api::core::v1::EnvVar {
                        name: "BYOK_BROKER_CA_FILE".into(),
                        value: Some("/tmp/ca.pem".into()),
                        value_from: None,
                    },
                );
            }
        }),
        ("ssl-cert-file", |p| {
            sidecar(p)
                .env
                .get_or_insert_with(Vec::new)
                .push(k8s_openapi::api::core::v1::EnvVar {
                    name: "SSL_CERT_FILE".into(),
                    value: Some("/tmp/ca.pem".into()),
                    value_from: None,
                });
        }),
        ("token-file", |p| {
            sidecar(p)
                .args
                .get_or_insert_with(Vec::new)
                .push("--token-file=/tmp/token".into());
        }),
        ("command", |p| {
            sidecar(p).command = Some(vec!["/bin/sh".into()])
        }),
        ("foreign-host", |p| {
            // A name the broker's certificate is not for (its CA may sign for others).
            for arg in sidecar(p).args.iter_mut().flatten() {
                if arg.starts_with("--broker-url=") {
                    *arg = "--broker-url=https://grab.example:443".into();
                }
            }
        }),
        ("expanded", |p| {
            sidecar(p)
                .args
                .get_or_insert_with(Vec::new)
                .push("--key=$(KEY)=15101".into());
        }),
        ("plain-broker", |p| {
            for arg in sidecar(p).args.iter_mut().flatten() {
                if arg.starts_with("--broker-url=") {
                    *arg = "--broker-url=http://byok.example:80".into();
                }
            }
        }),
        ("writable-token", |p| {
            for m in sidecar(p).volume_mounts.iter_mut().flatten() {
                if m.name == "byok-token" {
                    m.read_only = Some(false);
                }
            }
        }),
    ];
    for (n, file) in files.iter().enumerate() {
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
        for (what, mutate) in mutations {
            let name = format!("f{n}-mutated-{what}");
            let pod = from_fixture(&fixture, broker, &name)?;
            let mut mutated = pod.clone();
            mutate(&mut mutated);
            if mutated == pod {
                continue; // Not a field of this release's shape.
            }
            assert!(
                !served(mutated).await?,
                "{}: {what} was served",
                file.display()
            );
        }
    }
    Ok(())
}

/// Issue 20 item 2: a sidecar that calls the broker at a previous address (another Service
/// name or port, which the chart keeps answering) is served, and the operator counts it and
/// says so on the pod, so the platform team knows whom to restart before the alias goes.
#[tokio::test]
async fn a_sidecar_calling_a_previous_broker_address_is_served_and_named() -> anyhow::Result<()> {
    let env = TestEnv::new("broker-alias").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    let key = random_key("sk-ant-");
    ready_anthropic(&env, &fake, "claude", &key, serde_json::json!({})).await?;
    let pod = create_pod(&env, &opted_in_pod("alias-", &["claude"])).await?;
    let token = pod_token(&env, "default", &pod, "byok.dev").await?;
    let http = op.https_client(&env).await?;
    let path = format!("/v1/keys/{}/claude", env.namespace);
    // At --broker-url (127.0.0.1): served, nothing to say.
    let deadline = Instant::now() + CACHE_WAIT;
    while http
        .get(format!("{}{path}", op.broker_url()))
        .bearer_auth(&token)
        .send()
        .await?
        .status()
        != 200
    {
        anyhow::ensure!(Instant::now() < deadline, "never served");
        tokio::time::sleep(POLL_EVERY).await;
    }
    assert_eq!(op.metrics.broker_outdated_addresses(), 0);
    // At another name for the same broker (its certificate covers localhost).
    let port = op.config.broker_addr.port();
    let answer = http
        .get(format!("https://localhost:{port}{path}"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await?.contains(&key));
    assert_eq!(op.metrics.broker_outdated_addresses(), 1);
    let deadline = Instant::now() + CACHE_WAIT;
    loop {
        let events = env.api::<Event>().list(&ListParams::default()).await?.items;
        let told = events.iter().find(|e| {
            e.reason.as_deref() == Some("BrokerAddressOutdated")
                && e.regarding
                    .as_ref()
                    .is_some_and(|r| r.uid == pod.metadata.uid)
        });
        if let Some(event) = told {
            let note = event.note.clone().unwrap_or_default();
            assert!(note.contains(&format!("localhost:{port}")), "{note}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no BrokerAddressOutdated Event");
        tokio::time::sleep(POLL_EVERY).await;
    }
    Ok(())
}
