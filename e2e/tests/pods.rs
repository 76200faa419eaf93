//! Real pods on a real node: a kubelet (built from the API server's Kubernetes version) runs
//! what the webhook injected, with containerd, runc and the CNI bridge, inside the namespaces
//! of `hack/node-ns.sh`. The operator (webhook and broker) and the fake provider run in this
//! process on the node's address; pods are created through the API server, so the webhook
//! mutates them.
//!
//! `#[ignore]`d and named `node_…`: `make test` runs them under `hack/node-ns.sh`.

use std::time::Duration;

use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::node::{
    APP_IMAGE, CALLS, NODE_NAME, Node, calling_loop, cri_lines, node_env, wait_app_line,
};
use byok_e2e::operator::{create_pk, is_condition, put_secret, random_key, wait_pk};
use byok_e2e::serving::{ServingOperator, ready_anthropic};
use byok_operator::names;
use byok_operator::providers::ProviderKind;
use byok_operator::webhook::patch::SIDECAR_NAME;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde_json::json;
use tokio::time::Instant;

/// Pod create to `Succeeded` took 5–6 s on these machines; the first pod also waits for the
/// sidecar image's first use.
const POD_DONE: Duration = Duration::from_secs(120);

/// A pod on the test node that opts in to `keys` and runs `script` in busybox.
fn app_pod(generate_name: &str, keys: &[&str], script: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": generate_name,
            "labels": {names::INJECT_LABEL: names::INJECT_VALUE},
            "annotations": {names::PROVIDER_KEYS_ANNOTATION: keys.join(",")},
        },
        "spec": {
            "nodeName": NODE_NAME,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "app",
                "image": APP_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
            }],
        },
    }))
    .unwrap_or_default()
}

/// Waits for the pod to end; returns it with the app's output, or fails with the kubelet's
/// view of it.
async fn wait_done(env: &TestEnv, node: &Node, name: &str) -> anyhow::Result<(Pod, String)> {
    let pods = env.api::<Pod>();
    let deadline = Instant::now() + POD_DONE;
    loop {
        let pod = pods.get(name).await?;
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            let log = node.container_log(&pod, "app");
            return Ok((pod, log));
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "pod {name} still {phase:?} after {POD_DONE:?}: {:?}\nsidecar log:\n{}\nkubelet:\n{}",
                pod.status,
                node.container_log(&pod, SIDECAR_NAME),
                node.log_tail("kubelet", 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn started_at(pod: &Pod, init: bool, container: &str) -> Option<jiff::Timestamp> {
    let status = pod.status.as_ref()?;
    let statuses = if init {
        status.init_container_statuses.as_ref()?
    } else {
        status.container_statuses.as_ref()?
    };
    let state = statuses
        .iter()
        .find(|s| s.name == container)?
        .state
        .as_ref()?;
    let time = state
        .running
        .as_ref()
        .and_then(|r| r.started_at.as_ref())
        .or(state
            .terminated
            .as_ref()
            .and_then(|t| t.started_at.as_ref()))?;
    time.0.to_string().parse().ok()
}

/// What every test here starts from: a namespace, the node, the fake provider on the node's
/// address and an operator serving pods there.
struct Setup {
    env: TestEnv,
    node: &'static Node,
    fake: FakeProvider,
    op: Option<ServingOperator>,
}

async fn setup(prefix: &str) -> anyhow::Result<Setup> {
    let (env, node) = node_env(prefix).await?;
    let fake = FakeProvider::start(FakeProviderConfig {
        listen: (node.ip, 0).into(),
        ..Default::default()
    })
    .await?;
    let op = ServingOperator::start_for_node(&env, &fake, node.ip).await?;
    Ok(Setup {
        env,
        node,
        fake,
        op: Some(op),
    })
}

impl Setup {
    async fn create(&self, pod: &Pod) -> anyhow::Result<String> {
        let created = self
            .env
            .api::<Pod>()
            .create(&PostParams::default(), pod)
            .await?;
        Ok(created.metadata.name.unwrap_or_default())
    }

    async fn pod(&self, name: &str) -> anyhow::Result<Pod> {
        Ok(self.env.api::<Pod>().get(name).await?)
    }

    /// The app's output lines so far (the kubelet's log file, CRI prefix removed), with the
    /// time the kubelet stamped on each.
    async fn app_lines(&self, name: &str) -> anyhow::Result<Vec<(jiff::Timestamp, String)>> {
        let pod = self.pod(name).await?;
        Ok(cri_lines(&self.node.container_log(&pod, "app")))
    }

    async fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.env
            .api::<Pod>()
            .delete(name, &Default::default())
            .await?;
        Ok(())
    }

    /// The `ERR` lines of a [`calling_loop`].
    async fn failed_calls(&self, name: &str) -> anyhow::Result<Vec<(jiff::Timestamp, String)>> {
        let mut lines = self.app_lines(name).await?;
        lines.retain(|(_, l)| l.starts_with("ERR"));
        Ok(lines)
    }

    /// Waits until the app has printed a line containing `needle`.
    async fn wait_line(&self, name: &str, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let pods = self.env.api::<Pod>();
        let what = format!("{needle:?}");
        wait_app_line(&pods, self.node, name, &what, timeout, |l| {
            l.contains(needle)
        })
        .await?;
        Ok(())
    }

    /// Generation calls the fake provider answered for `kind`.
    fn calls(&self, kind: ProviderKind) -> Vec<byok_e2e::fake_provider::RecordedRequest> {
        self.fake
            .requests_log()
            .into_iter()
            .filter(|r| r.provider == Some(kind) && r.key_id.is_some())
            .collect()
    }
}

async fn ready_key(
    env: &TestEnv,
    fake: &FakeProvider,
    name: &str,
    provider: ProviderKind,
    key: &str,
) -> anyhow::Result<()> {
    fake.add_valid_key(provider, key);
    let source = format!("{name}-raw");
    put_secret(env, &source, &[("api-key", key)]).await?;
    create_pk(
        env,
        name,
        json!({"provider": provider.to_string(), "secretRef": {"name": source}}),
    )
    .await?;
    wait_pk(env, name, "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    Ok(())
}

/// What the app script prints after its call, so the test can look for the key: its own
/// environment, every environment it can read under /proc, and every file it can read.
const LOOK_AROUND: &str = r#"
echo '--- env'; env
echo '--- proc'; for f in /proc/[0-9]*/environ; do cat "$f" 2>/dev/null | tr '\0' '\n'; done
echo '--- files'; for f in $(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -type f -size -64k -print 2>/dev/null); do cat "$f" 2>/dev/null; done
echo '--- mounted'; cat /proc/self/mountinfo
"#;

#[tokio::test]
#[ignore = "needs a node: run under hack/node-ns.sh (make test does)"]
async fn node_an_injected_pod_calls_its_provider_and_completes() -> anyhow::Result<()> {
    let s = setup("pods-one").await?;
    let (env, node, fake) = (&s.env, s.node, &s.fake);
    let key = random_key("sk-ant-");
    ready_anthropic(env, fake, "claude", &key, json!({})).await?;

    // One call, no retry: the app must only start once its key is loaded.
    let script = format!("set -e\n{CALLS}\ncall\necho\n{LOOK_AROUND}");
    let name = s.create(&app_pod("one-key-", &["claude"], &script)).await?;
    let (pod, log) = wait_done(env, node, &name).await?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "app log:\n{log}\nsidecar log:\n{}",
        node.container_log(&pod, SIDECAR_NAME)
    );
    assert!(
        log.contains(r#""type":"message""#),
        "the app's call did not get a message: {log}"
    );

    // The sidecar is still a native sidecar (an init container that restarts), and it was
    // running before the app started.
    let spec = pod.spec.clone().unwrap_or_default();
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_NAME)
        .expect("the sidecar is an init container");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let (proxy_start, app_start) = (
        started_at(&pod, true, SIDECAR_NAME).expect("sidecar start time"),
        started_at(&pod, false, "app").expect("app start time"),
    );
    assert!(
        proxy_start <= app_start,
        "sidecar {proxy_start} after app {app_start}"
    );

    // The provider saw the ProviderKey's key, and only it.
    let calls: Vec<_> = fake
        .requests_log()
        .into_iter()
        .filter(|r| r.provider == Some(ProviderKind::Anthropic) && r.path.ends_with("/v1/messages"))
        .collect();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].key_id, Some(FakeProvider::key_id(&key)));
    assert_eq!(calls[0].status, Some(200));

    // The app never held it: not in its env, any readable /proc environ, or any file.
    assert!(
        log.contains("--- mounted"),
        "the look-around did not finish: {log}"
    );
    assert!(!log.contains(&key), "the app could read the key");
    assert!(
        !log.contains("byok.dev/token"),
        "the app sees the sidecar's token mount"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a node: run under hack/node-ns.sh (make test does)"]
async fn node_a_pod_with_two_providers_reaches_both_through_their_variables() -> anyhow::Result<()>
{
    let s = setup("pods-two").await?;
    let (claude, gpt) = (random_key("sk-ant-"), random_key("sk-proj-"));
    ready_key(&s.env, &s.fake, "claude", ProviderKind::Anthropic, &claude).await?;
    ready_key(&s.env, &s.fake, "gpt", ProviderKind::OpenAI, &gpt).await?;
    let script = format!("set -e\n{CALLS}\ncall; echo; openai_call; echo");
    let name = s
        .create(&app_pod("two-keys-", &["claude", "gpt"], &script))
        .await?;
    let (pod, log) = wait_done(&s.env, s.node, &name).await?;
    assert_eq!(
        pod.status.and_then(|st| st.phase).as_deref(),
        Some("Succeeded"),
        "{log}"
    );
    assert!(log.contains(r#""type":"message""#), "{log}");
    assert!(log.contains(r#""object":"chat.completion""#), "{log}");
    let anthropic = s.calls(ProviderKind::Anthropic);
    let openai = s.calls(ProviderKind::OpenAI);
    assert_eq!(anthropic.len(), 1, "{anthropic:?}");
    assert_eq!(openai.len(), 1, "{openai:?}");
    assert_eq!(anthropic[0].key_id, Some(FakeProvider::key_id(&claude)));
    assert_eq!(openai[0].key_id, Some(FakeProvider::key_id(&gpt)));
    Ok(())
}

#[tokio::test]
#[ignore = "needs a node: run under hack/node-ns.sh (make test does)"]
async fn node_a_pod_created_before_its_key_is_ready_starts_once_it_is() -> anyhow::Result<()> {
    let s = setup("pods-wait").await?;
    let key = random_key("sk-ant-");
    s.fake.add_valid_key(ProviderKind::Anthropic, &key);
    // The ProviderKey exists, its Secret does not yet: not Ready.
    create_pk(
        &s.env,
        "late",
        json!({"provider": "anthropic", "secretRef": {"name": "late-raw"}}),
    )
    .await?;
    let script = format!("set -e\n{CALLS}\ncall");
    let name = s.create(&app_pod("waiting-", &["late"], &script)).await?;

    // Meanwhile the pod says why it waits, and its app has not started.
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = s.env.api();
    let deadline = Instant::now() + Duration::from_secs(30);
    let warning = loop {
        let found = events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                    && e.reason.as_deref() == Some("WaitingForProviderKey")
            });
        if let Some(event) = found {
            break event;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no Warning Event on the waiting pod"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(note.contains("late"), "{note}");
    tokio::time::sleep(Duration::from_secs(30)).await; // the wait the issue asks about
    let pod = s.pod(&name).await?;
    assert_eq!(
        pod.status.as_ref().and_then(|st| st.phase.as_deref()),
        Some("Pending")
    );
    assert!(
        started_at(&pod, false, "app").is_none(),
        "the app started without its key"
    );

    let became_ready = Instant::now();
    put_secret(&s.env, "late-raw", &[("api-key", &key)]).await?;
    let (pod, log) = wait_done(&s.env, s.node, &name).await?;
    eprintln!("key Ready → pod done in {:?}", became_ready.elapsed());
    assert_eq!(
        pod.status.as_ref().and_then(|st| st.phase.as_deref()),
        Some("Succeeded"),
        "{log}"
    );
    let restarts = pod
        .status
        .as_ref()
        .and_then(|st| st.init_container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == SIDECAR_NAME))
        .map(|c| c.restart_count);
    assert_eq!(restarts, Some(0), "the sidecar waited without restarting");
    Ok(())
}

#[tokio::test]
#[ignore = "needs a node: run under hack/node-ns.sh (make test does)"]
async fn node_the_app_cannot_reach_the_sidecars_token_or_key() -> anyhow::Result<()> {
    let s = setup("pods-isolate").await?;
    let key = random_key("sk-ant-");
    ready_key(&s.env, &s.fake, "claude", ProviderKind::Anthropic, &key).await?;

    // The app cannot see the sidecar's processes (so not its environment, memory or files
    // through /proc), and a pod that would share the PID namespace is refused.
    let script = format!(
        r#"{CALLS}
call >/dev/null && echo CALLED
for p in /proc/[0-9]*; do
  [ "$(cat $p/comm 2>/dev/null)" = byok-operator ] || continue
  echo "SIDECAR $p"
  cat $p/environ >/dev/null 2>&1 && echo ENVIRON-READ
  cat $p/root/var/run/secrets/byok.dev/token/token >/dev/null 2>&1 && echo TOKEN-READ
  head -c 1 $p/mem >/dev/null 2>&1 && echo MEM-READ
done
echo DONE"#
    );
    let mut shared_pid = app_pod("shared-pid-", &["claude"], &script);
    if let Some(spec) = shared_pid.spec.as_mut() {
        spec.share_process_namespace = Some(true);
    }
    let refused = s
        .env
        .api::<Pod>()
        .create(&PostParams::default(), &shared_pid)
        .await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("shareProcessNamespace"),
        "a pod sharing its PID namespace: {message}"
    );
    let name = s.create(&app_pod("look-", &["claude"], &script)).await?;
    let (_, log) = wait_done(&s.env, s.node, &name).await?;
    assert!(log.contains("CALLED") && log.contains("DONE"), "{log}");
    for leak in ["SIDECAR", "ENVIRON-READ", "TOKEN-READ", "MEM-READ"] {
        assert!(!log.contains(leak), "{leak}: {log}");
    }
    assert!(!log.contains(&key));

    // Mounting the sidecar's token volume in the app is refused at admission.
    let mut thief = app_pod("mount-thief-", &["claude"], "true");
    if let Some(spec) = thief.spec.as_mut() {
        spec.containers[0].volume_mounts = Some(vec![serde_json::from_value(json!({
            "name": byok_operator::webhook::patch::TOKEN_VOLUME,
            "mountPath": "/stolen",
        }))?]);
    }
    let refused = s
        .env
        .api::<Pod>()
        .create(&PostParams::default(), &thief)
        .await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains(byok_operator::webhook::patch::TOKEN_VOLUME),
        "a pod mounting the sidecar's token volume: {message}"
    );

    // A pod that skips injection and projects its own byok.dev token, here or in another
    // namespace, gets nothing from the broker with it.
    let other = TestEnv::new("pods-forger").await?;
    for env in [&s.env, &other] {
        let own_token: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": "forger-",
                "annotations": {names::PROVIDER_KEYS_ANNOTATION: "claude"},
            },
            "spec": {
                "nodeName": NODE_NAME, "restartPolicy": "Never", "automountServiceAccountToken": false,
                "containers": [{
                    "name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", "cat /t/token; echo"],
                    "volumeMounts": [{"name": "t", "mountPath": "/t"}],
                }],
                "volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {
                    "audience": byok_operator::names::TOKEN_AUDIENCE, "path": "token", "expirationSeconds": 600,
                }}]}}],
            },
        }))?;
        if env.namespace != s.env.namespace {
            byok_e2e::node::add_root_ca(env).await?;
        }
        let created = env
            .api::<Pod>()
            .create(&PostParams::default(), &own_token)
            .await?;
        let forger = created.metadata.name.unwrap_or_default();
        let (pod, log) = wait_done(env, s.node, &forger).await?;
        assert_eq!(
            pod.status.and_then(|st| st.phase).as_deref(),
            Some("Succeeded"),
            "{log}"
        );
        let token = cri_lines(&log)
            .into_iter()
            .map(|(_, l)| l)
            .find(|l| l.starts_with("ey"))
            .unwrap_or_default();
        assert!(!token.is_empty(), "the forger printed no token: {log}");
        let op = s.op.as_ref().expect("operator");
        let res = op
            .https_client(&s.env)
            .await?
            .get(format!(
                "{}/v1/keys/{}/claude",
                op.broker_url(),
                s.env.namespace
            ))
            .bearer_auth(&token)
            .send()
            .await?;
        let status = res.status().as_u16();
        let body = res.text().await?;
        assert!(
            status == 403 || status == 404,
            "broker answered {status} to a forger in {}: {body}",
            env.namespace
        );
        assert!(!body.contains(&key), "the broker gave a forger the key");
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a node: run under hack/node-ns.sh (make test does)"]
async fn node_rotation_serves_the_new_key_and_deletion_answers_503() -> anyhow::Result<()> {
    let s = setup("pods-rotate").await?;
    let (old, new) = (random_key("sk-ant-"), random_key("sk-ant-"));
    ready_key(&s.env, &s.fake, "claude", ProviderKind::Anthropic, &old).await?;
    let name = s
        .create(&app_pod("looping-", &["claude"], &calling_loop(90)))
        .await?;
    s.wait_line(&name, "OK", POD_DONE).await?;

    s.fake.add_valid_key(ProviderKind::Anthropic, &new);
    let rotated = Instant::now();
    put_secret(&s.env, "claude-raw", &[("api-key", &new)]).await?;
    let new_id = FakeProvider::key_id(&new);
    while !s
        .calls(ProviderKind::Anthropic)
        .iter()
        .any(|c| c.key_id.as_ref() == Some(&new_id))
    {
        anyhow::ensure!(
            rotated.elapsed() < Duration::from_secs(10),
            "the new key was not used within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "new key in use {:?} after the Secret changed",
        rotated.elapsed()
    );
    let failed = s.failed_calls(&name).await?;
    assert!(
        failed.is_empty(),
        "requests failed during rotation: {failed:?}"
    );

    let deleted_at = jiff::Timestamp::now();
    let deleted = Instant::now();
    s.env
        .api::<byok_operator::crd::ProviderKey>()
        .delete("claude", &Default::default())
        .await?;
    s.wait_line(&name, "ERR", Duration::from_secs(15)).await?;
    let lines = s.app_lines(&name).await?;
    let (first_err_at, first_err) = lines
        .iter()
        .find(|(_, l)| l.starts_with("ERR"))
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "503 {:?} after the delete (seen by the test after {:?})",
        first_err_at.duration_since(deleted_at),
        deleted.elapsed()
    );
    assert!(first_err.contains("503"), "{first_err}");
    assert!(
        first_err_at.duration_since(deleted_at) < jiff::SignedDuration::from_secs(10),
        "first refusal {first_err_at}, deleted {deleted_at}"
    );
    s.delete(&name).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a node: run under hack/node-ns.sh (make test does)"]
async fn node_sidecars_keep_serving_while_the_operator_restarts() -> anyhow::Result<()> {
    let mut s = setup("pods-restart").await?;
    let key = random_key("sk-ant-");
    ready_key(&s.env, &s.fake, "claude", ProviderKind::Anthropic, &key).await?;
    let name = s
        .create(&app_pod("through-restart-", &["claude"], &calling_loop(60)))
        .await?;
    s.wait_line(&name, "OK", POD_DONE).await?;

    let op = s.op.take().expect("operator");
    let port: u16 = op.config.broker_addr.port();
    // The old replica's webhook configuration goes first (the new one reuses its name).
    op.stop().await?;
    let served_before = s.calls(ProviderKind::Anthropic).len();
    // Down for a few broker polls (5 s each).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let served_down = s.calls(ProviderKind::Anthropic).len() - served_before;
    let op = ServingOperator::start_for_node_at(&s.env, &s.fake, s.node.ip, port).await?;
    // The sidecar finds the restarted broker (it confirms the key it has), and goes on.
    let deadline = Instant::now() + Duration::from_secs(20);
    while op.metrics.broker_answers("not_modified") + op.metrics.broker_answers("granted") == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sidecar never polled the restarted broker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served_after = s.calls(ProviderKind::Anthropic).len();
    while s.calls(ProviderKind::Anthropic).len() < served_after + 10 {
        anyhow::ensure!(Instant::now() < deadline, "calls stopped after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A replica that had not listed its pods yet once said "no such pod", and the sidecar
    // dropped its key: answers that drop a key must not come from a restart.
    for dropping in [
        "pod_not_found",
        "pod_not_injected",
        "key_not_found",
        "key_not_ready",
    ] {
        assert_eq!(
            op.metrics.broker_answers(dropping),
            0,
            "the restarted broker answered {dropping}"
        );
    }
    s.op = Some(op);

    let failed = s.failed_calls(&name).await?;
    assert!(
        failed.is_empty(),
        "requests failed across the restart: {failed:?}"
    );
    assert!(
        served_down > 10,
        "only {served_down} calls while the operator was down"
    );
    s.delete(&name).await?;
    Ok(())
}

/// Issue 20 item 3, with the real kubelet: the operator's CA Secret is lost while it is down
/// (what deleting it or its namespace does); the restarted operator makes a new CA and writes
/// it to the namespace's trust bundle; the kubelet refreshes the running pod's mount and its
/// sidecar trusts the new broker, with no restart and no failed request. Reports how long
/// the kubelet took (this node's kubelet: `syncFrequency: 10s`; the default is 1 min).
#[tokio::test]
#[ignore = "needs a node: run under hack/node-ns.sh (make test does)"]
async fn node_a_lost_ca_reaches_running_pods_through_the_kubelets_refresh() -> anyhow::Result<()> {
    let mut s = setup("pods-lost-ca").await?;
    let key = random_key("sk-ant-");
    ready_key(&s.env, &s.fake, "claude", ProviderKind::Anthropic, &key).await?;
    let name = s
        .create(&app_pod("lost-ca-", &["claude"], &calling_loop(150)))
        .await?;
    s.wait_line(&name, "OK", POD_DONE).await?;
    let first_ca = byok_e2e::serving::serving_ca_pem(&s.env).await?;

    let op = s.op.take().expect("operator");
    let port: u16 = op.config.broker_addr.port();
    let lease = op.config.key_lease;
    op.stop().await?;
    s.env
        .api::<k8s_openapi::api::core::v1::Secret>()
        .delete(
            byok_operator::serving::certs::DEFAULT_SECRET_NAME,
            &Default::default(),
        )
        .await?;
    let lost_at = Instant::now();
    let op = ServingOperator::start_for_node_at(&s.env, &s.fake, s.node.ip, port).await?;
    let second_ca = byok_e2e::serving::serving_ca_pem(&s.env).await?;
    anyhow::ensure!(second_ca != first_ca, "the CA did not change");
    let bundles = s.env.api::<k8s_openapi::api::core::v1::ConfigMap>();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cm = bundles.get(names::TRUST_BUNDLE_CONFIGMAP).await?;
        if cm
            .data
            .and_then(|d| d.get(names::TRUST_BUNDLE_KEY).cloned())
            .as_ref()
            == Some(&second_ca)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the bundle never took the new CA"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let published_at = Instant::now();
    // The pod's sidecar reports the new bundle once the kubelet has refreshed its mount.
    let deadline = published_at + lease;
    while op.metrics.trust_bundle_pods("current") < 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the running sidecar never got the new bundle within its lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered_at = Instant::now();
    // Calls go on through the sidecar after it.
    let served_after = s.calls(ProviderKind::Anthropic).len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.calls(ProviderKind::Anthropic).len() < served_after + 10 {
        anyhow::ensure!(Instant::now() < deadline, "calls stopped after the new CA");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.op = Some(op);
    let failed = s.failed_calls(&name).await?;
    println!(
        "lost CA on the node: bundle published {:.1} s after the loss, the pod's sidecar served with it {:.1} s after that (kubelet refresh and one poll); {} failed calls",
        published_at.duration_since(lost_at).as_secs_f64(),
        recovered_at.duration_since(published_at).as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed across the lost CA: {failed:?}"
    );
    s.delete(&name).await?;
    Ok(())
}

/// `make bench` (not `make test`): pod create → the app's first successful call, p50 and
/// max over 20 pods created one after another, and the sidecar's RSS in a real pod.
#[tokio::test]
#[ignore = "a benchmark: make bench runs it under hack/node-ns.sh"]
async fn bench_pods_create_to_first_call() -> anyhow::Result<()> {
    const PODS: usize = 20;
    let s = setup("bench-pods").await?;
    let key = random_key("sk-ant-");
    ready_key(&s.env, &s.fake, "claude", ProviderKind::Anthropic, &key).await?;
    let script = format!("{CALLS}\ncall >/dev/null && echo OK");
    let mut took = Vec::new();
    for _ in 0..PODS {
        let created_at = jiff::Timestamp::now();
        let name = s.create(&app_pod("bench-", &["claude"], &script)).await?;
        s.wait_line(&name, "OK", POD_DONE).await?;
        let (at, _) = s
            .app_lines(&name)
            .await?
            .into_iter()
            .find(|(_, l)| l == "OK")
            .unwrap_or_default();
        took.push(at.duration_since(created_at).as_secs_f64() * 1000.0);
        s.delete(&name).await?;
    }
    took.sort_by(f64::total_cmp);

    // The sidecar's memory in a pod that has served 1 call, then 500.
    let name = s
        .create(&app_pod(
            "bench-rss-",
            &["claude"],
            &format!("{CALLS}\ncall >/dev/null && echo FIRST\nsleep 3\nfor i in $(seq 1 500); do call >/dev/null; done; echo MANY\nsleep 600"),
        ))
        .await?;
    s.wait_line(&name, "FIRST", POD_DONE).await?;
    let uid = s.pod(&name).await?.metadata.uid.unwrap_or_default();
    let idle = sidecar_rss_kib(&uid)?;
    s.wait_line(&name, "MANY", POD_DONE).await?;
    let busy = sidecar_rss_kib(&uid)?;
    s.delete(&name).await?;

    println!(
        "pods on a real node ({PODS} pods, one after another; sidecar image from {})",
        std::env::var("BYOK_SIDECAR_BINARY").unwrap_or_else(|_| "the debug build".into())
    );
    println!(
        "  test node: nothing → Ready        {:>8.0} ms",
        s.node.started_in.as_secs_f64() * 1000.0
    );
    println!(
        "  pod create → app's first call    p50 {:>6.0} ms   max {:>6.0} ms",
        took[PODS / 2],
        took[PODS - 1]
    );
    println!(
        "  sidecar RSS in the pod            after 1 call {:.1} MiB, after 500 more {:.1} MiB",
        idle as f64 / 1024.0,
        busy as f64 / 1024.0
    );
    Ok(())
}

/// VmRSS of the `byok-operator` process in the pod with this uid (the test runs in the
/// node's PID namespace, which holds every container's processes).
fn sidecar_rss_kib(pod_uid: &str) -> anyhow::Result<u64> {
    let cgroup_uid = pod_uid.replace('-', "_");
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let dir = entry.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        if comm.trim() != "byok-operator"
            || !(cgroup.contains(pod_uid) || cgroup.contains(&cgroup_uid))
        {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status"))?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        if let Some(rss) = rss {
            return Ok(rss);
        }
    }
    anyhow::bail!("no sidecar process of pod {pod_uid}")
}

/// Whether a sidecar container of `image` has started (the kubelet restarts a native sidecar
/// whose image changed); it may have ended since (a sidecar refused by the broker does).
fn sidecar_ran(pod: &Pod, image: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|all| all.iter().find(|c| c.name == SIDECAR_NAME))
        .is_some_and(|c| {
            c.image.ends_with(image.rsplit('/').next().unwrap_or(image))
                && c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
        })
}

impl Setup {
    /// Waits until a sidecar of `image` has run in pod `name`.
    async fn wait_sidecar_ran(&self, name: &str, image: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + POD_DONE;
        while !sidecar_ran(&self.pod(name).await?, image) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no {image} sidecar ran in {name}: {:?}",
                self.pod(name)
                    .await?
                    .status
                    .and_then(|s| s.init_container_statuses)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The token a swapped-in token printer wrote to the sidecar's log in pod `name`.
    async fn leaked_token(&self, name: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + POD_DONE;
        loop {
            let log = self
                .node
                .container_log(&self.pod(name).await?, SIDECAR_NAME);
            if let Some(token) = log
                .lines()
                .find_map(|l| l.split("token: ").nth(1))
                .map(str::trim)
                .filter(|t| t.starts_with("eyJ"))
            {
                return Ok(token.to_owned());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the swapped image never ran: {}",
                self.node.log_tail("kubelet", 20)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Item 1 of the trust boundary on a real kubelet: the sidecar's image swapped for one that
/// prints its token (another tag of the sidecar's own repository, which the broker's shape
/// check alone would accept), then restored. With `update.byok.dev` the swap is refused at
/// the API server; without it, the kubelet runs the swapped image and the token leaks, but
/// the broker refuses that token during the swap and after the restore: the pod is never
/// served again.
#[tokio::test]
#[ignore = "needs the test node: make test runs it under hack/node-ns.sh"]
async fn node_a_swapped_and_restored_sidecar_is_never_served_again() -> anyhow::Result<()> {
    use byok_e2e::node::TOKEN_PRINTER_IMAGE;
    use byok_e2e::serving::{TEST_PROXY_IMAGE, pod_token};
    let s = setup("pods-swap").await?;
    let key = random_key("sk-ant-");
    ready_key(&s.env, &s.fake, "claude", ProviderKind::Anthropic, &key).await?;
    let name = s
        .create(&app_pod("swapped-", &["claude"], "sleep 600"))
        .await?;
    let op = s.op.as_ref().expect("operator");
    let pods = s.env.api::<Pod>();
    s.wait_sidecar_ran(&name, TEST_PROXY_IMAGE).await?;
    let http = op.https_client(&s.env).await?;
    let url = format!("{}/v1/keys/{}/claude", op.broker_url(), s.env.namespace);
    let ask = |token: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            anyhow::Ok(
                http.get(&url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    // Control: a token bound to this pod is served before any swap.
    let before = pod_token(&s.env, "default", &s.pod(&name).await?, "byok.dev").await?;
    assert_eq!(ask(before.clone()).await?, 200);

    let swap = |image: &str| {
        kube::api::Patch::Strategic(json!({"spec": {"initContainers": [
            {"name": SIDECAR_NAME, "image": image}
        ]}}))
    };
    let refused = pods
        .patch(
            &name,
            &kube::api::PatchParams::default(),
            &swap(TOKEN_PRINTER_IMAGE),
        )
        .await;
    let message = format!("{refused:?}");
    assert!(
        refused.is_err() && message.contains("cannot change"),
        "the API server let the swap through: {message}"
    );

    // Without the update webhook (a cluster whose configuration lacks it).
    op.remove_webhook(&s.env, "update.byok.dev").await?;
    pods.patch(
        &name,
        &kube::api::PatchParams::default(),
        &swap(TOKEN_PRINTER_IMAGE),
    )
    .await?;
    let leaked = s.leaked_token(&name).await?;
    assert_eq!(ask(leaked.clone()).await?, 403, "served during the swap");

    pods.patch(
        &name,
        &kube::api::PatchParams::default(),
        &swap(TEST_PROXY_IMAGE),
    )
    .await?;
    s.wait_sidecar_ran(&name, TEST_PROXY_IMAGE).await?;
    assert_eq!(
        ask(leaked).await?,
        403,
        "the leaked token is served after the restore"
    );
    assert_eq!(ask(before).await?, 403, "the restored pod is served again");
    s.delete(&name).await?;

    // The same, hidden: the label removed for the swap (the pod leaves the broker's watch)
    // and put back after the restore. A control pod, relabelled the same way without a swap,
    // shows when the broker's cache has seen the relabelling.
    let hidden = s
        .create(&app_pod("hidden-", &["claude"], "sleep 600"))
        .await?;
    let control = s
        .create(&app_pod("control-", &["claude"], "sleep 600"))
        .await?;
    for name in [&hidden, &control] {
        s.wait_sidecar_ran(name, TEST_PROXY_IMAGE).await?;
    }
    let control_token = pod_token(&s.env, "default", &s.pod(&control).await?, "byok.dev").await?;
    let label = |value: serde_json::Value| {
        kube::api::Patch::Merge(json!({"metadata": {"labels": {names::INJECT_LABEL: value}}}))
    };
    let params = kube::api::PatchParams::default();
    for name in [&hidden, &control] {
        pods.patch(name, &params, &label(serde_json::Value::Null))
            .await?;
    }
    pods.patch(&hidden, &params, &swap(TOKEN_PRINTER_IMAGE))
        .await?;
    let leaked = s.leaked_token(&hidden).await?;
    pods.patch(&hidden, &params, &swap(TEST_PROXY_IMAGE))
        .await?;
    s.wait_sidecar_ran(&hidden, TEST_PROXY_IMAGE).await?;
    // While unlabelled, the control is not served; labelled again (after the hidden pod), it
    // is: from then on the broker judges the hidden pod as relabelled too.
    assert_eq!(ask(control_token.clone()).await?, 403);
    for name in [&hidden, &control] {
        pods.patch(name, &params, &label(json!(names::INJECT_VALUE)))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask(control_token.clone()).await? != 200 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relabelled control is never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ask(leaked).await?,
        403,
        "a swap hidden by removing the label was forgiven"
    );
    for name in [&hidden, &control] {
        s.delete(name).await?;
    }
    Ok(())
}
