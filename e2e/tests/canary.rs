//! Canary: the real `byok-operator controller` binary, at trace-level logging, goes through the
//! life of several keys (valid, invalid, rotated, rejected rotation, operator-key rotation,
//! deletion), as a ServiceAccount holding only the Helm chart's RBAC. Not one fragment of any test key may appear in its logs, in an Event, in a
//! status, or in an error message.

use std::io::Read;
use std::process::{Command, Stdio};

use base64::Engine;
use byok_e2e::envtest::{TestEnv, shared};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::crd::ProviderKey;
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams};

/// Every fragment of a key that must never be shown: the key itself, its secret part
/// (after the recognisable prefix) in 8-character windows, and its base64 and hex forms.
fn fragments(key: &str, prefix: &str) -> Vec<String> {
    let secret = &key[prefix.len()..];
    let mut out = vec![
        key.to_string(),
        base64::engine::general_purpose::STANDARD.encode(key),
        base64::engine::general_purpose::STANDARD.encode(secret),
        hex::encode(key),
    ];
    let chars: Vec<char> = secret.chars().collect();
    out.extend(chars.windows(8).map(|w| w.iter().collect::<String>()));
    out
}

#[tokio::test]
async fn no_key_material_reaches_logs_events_status_or_errors() -> anyhow::Result<()> {
    let env = TestEnv::new("canary").await?;
    // The operator's own namespace (keyring, certificate, Lease), apart from the one it watches.
    let op_ns = TestEnv::new("canary-op").await?;
    install_crds(&env.client).await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let dir = std::env::temp_dir().join(format!("byok-canary-{}", env.namespace));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    // The operator runs as a ServiceAccount with exactly the chart's RBAC.
    let token = operator_service_account_token(&op_ns, &env.namespace).await?;
    byok_e2e::envtest::write_kubeconfig(&shared().kubeconfig_for_token(&token), &kubeconfig)?;
    let ca = dir.join("fake-ca.pem");
    std::fs::write(&ca, fake.ca_pem())?;
    let log_path = dir.join("operator.log");

    let binary = operator_binary()?;
    let mut cmd = Command::new(&binary);
    cmd.args([
        "--log-filter",
        "trace",
        "controller",
        "--namespace",
        &env.namespace,
    ])
    .args([
        "--operator-namespace",
        &op_ns.namespace,
        "--insecure-allow-private-base-urls",
    ])
    .arg("--extra-ca-file")
    .arg(&ca);
    // Every replica serves the webhook and the broker, with the operator's own CA.
    let broker_port = byok_e2e::operator::free_port()?;
    let webhook_port = byok_e2e::operator::free_port()?;
    cmd.args([
        "--webhook-addr",
        &format!("127.0.0.1:{webhook_port}"),
        "--broker-addr",
        &format!("127.0.0.1:{broker_port}"),
        "--broker-url",
        &format!("https://127.0.0.1:{broker_port}"),
        "--admin-addr",
        &format!("127.0.0.1:{}", byok_e2e::operator::free_port()?),
    ]);
    for p in [
        ProviderKind::Anthropic,
        ProviderKind::OpenAI,
        ProviderKind::Google,
    ] {
        cmd.args(["--provider-endpoint", &format!("{p}={}", fake.base_url(p))]);
    }
    cmd.env("KUBECONFIG", &kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?);
    let operator = OperatorProcess(cmd.spawn()?);

    let good = random_key("sk-ant-api03-");
    let rotated = random_key("sk-ant-api03-");
    let rejected = random_key("sk-ant-api03-");
    let invalid = random_key("sk-proj-");
    let gemini_invalid = random_key("AIza");
    fake.add_valid_key(ProviderKind::Anthropic, &good);
    fake.add_valid_key(ProviderKind::Anthropic, &rotated);

    put_secret(&env, "anthropic-raw", &[("api-key", &good)]).await?;
    put_secret(&env, "openai-raw", &[("api-key", &invalid)]).await?;
    put_secret(&env, "gemini-raw", &[("api-key", &gemini_invalid)]).await?;
    create_pk(
        &env,
        "anthropic",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "anthropic-raw"}}),
    )
    .await?;
    create_pk(
        &env,
        "openai",
        serde_json::json!({"provider": "openai", "secretRef": {"name": "openai-raw"}}),
    )
    .await?;
    create_pk(
        &env,
        "gemini",
        serde_json::json!({"provider": "google", "secretRef": {"name": "gemini-raw"}}),
    )
    .await?;
    wait_pk(&env, "anthropic", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    wait_pk(&env, "openai", "InvalidKey", |pk| {
        is_condition(pk, "Verified", "False", "InvalidKey")
    })
    .await?;
    wait_pk(&env, "gemini", "InvalidKey", |pk| {
        is_condition(pk, "Verified", "False", "InvalidKey")
    })
    .await?;

    put_secret(&env, "anthropic-raw", &[("api-key", &rotated)]).await?;
    wait_pk(&env, "anthropic", "v2", |pk| {
        pk.status.as_ref().and_then(|s| s.key_version) == Some(2)
    })
    .await?;
    // The key in service, through the webhook and the broker (the operator sets the
    // webhook's caBundle itself, with exactly the chart's RBAC).
    let mwc = byok_e2e::serving::webhook_configuration(
        "byok-operator",
        &env.namespace,
        &format!("https://127.0.0.1:{webhook_port}/mutate"),
    )?;
    let served = byok_e2e::serving::broker_serves(
        &env,
        mwc,
        (&op_ns.namespace, "byok-operator-tls"),
        broker_port,
        ("anthropic", &rotated),
        "openai",
    )
    .await?;
    put_secret(&env, "anthropic-raw", &[("api-key", &rejected)]).await?;
    wait_pk(&env, "anthropic", "rejected", |pk| {
        is_condition(pk, "Ready", "True", "PendingKeyRejected")
    })
    .await?;
    byok_operator::controller::keyring::rotate(
        &op_ns.api::<Secret>(),
        byok_operator::controller::keyring::DEFAULT_KEYRING_SECRET,
    )
    .await?;
    wait_pk(&env, "anthropic", "re-encrypted", |pk| {
        pk.status
            .as_ref()
            .and_then(|s| s.encryption_key_id.as_deref())
            == Some("k2")
    })
    .await?;
    env.api::<ProviderKey>()
        .delete("openai", &DeleteParams::default())
        .await?;
    let events: kube::Api<Event> = env.api();
    let deadline = std::time::Instant::now() + WAIT;
    while !events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("Deleted"))
    {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no Deleted event");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // polling interval
    }
    drop(operator);
    anyhow::ensure!(served.contains(&rotated));

    let mut logs = String::new();
    std::fs::File::open(&log_path)?.read_to_string(&mut logs)?;
    anyhow::ensure!(
        logs.lines().count() > 50,
        "trace logging produced too little to be a real canary"
    );
    // Events of both namespaces (the keyring's go to the operator's).
    let mut all_events = events.list(&ListParams::default()).await?.items;
    all_events.extend(
        op_ns
            .api::<Event>()
            .list(&ListParams::default())
            .await?
            .items,
    );
    let events = serde_json::to_string(&all_events)?;
    let statuses = serde_json::to_string(
        &env.api::<ProviderKey>()
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|p| &p.status)
            .collect::<Vec<_>>(),
    )?;
    for (key, prefix) in [
        (&good, "sk-ant-api03-"),
        (&rotated, "sk-ant-api03-"),
        (&rejected, "sk-ant-api03-"),
        (&invalid, "sk-proj-"),
        (&gemini_invalid, "AIza"),
    ] {
        for fragment in fragments(key, prefix) {
            assert!(
                !logs.contains(&fragment),
                "a key fragment reached the operator's log ({})",
                log_path.display()
            );
            assert!(
                !events.contains(&fragment),
                "a key fragment reached an Event"
            );
            assert!(
                !statuses.contains(&fragment),
                "a key fragment reached a status"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
