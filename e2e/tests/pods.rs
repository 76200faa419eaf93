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
use byok_e2e::node::{APP_IMAGE, NODE_NAME, Node, node_env};
use byok_e2e::operator::random_key;
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
    let (env, node) = node_env("pods-one").await?;
    let fake = FakeProvider::start(FakeProviderConfig {
        listen: (node.ip, 0).into(),
        ..Default::default()
    })
    .await?;
    let op = ServingOperator::start_for_node(&env, &fake, node.ip).await?;
    let key = random_key("sk-ant-");
    ready_anthropic(&env, &fake, "claude", &key, json!({})).await?;

    // One call, no retry: the app must only start once its key is loaded.
    let script = format!(
        r#"set -e
wget -q -O- --header 'content-type: application/json' --header 'anthropic-version: 2023-06-01' \
  --post-data '{{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{{"role":"user","content":"hi"}}]}}' \
  "$ANTHROPIC_BASE_URL/v1/messages"
echo
{LOOK_AROUND}"#
    );
    let created = env
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &app_pod("one-key-", &["claude"], &script),
        )
        .await?;
    let name = created.metadata.name.clone().unwrap_or_default();
    let (pod, log) = wait_done(&env, node, &name).await?;
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
    drop(op);
    Ok(())
}
