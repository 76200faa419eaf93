//! The hostile tenant: namespace A holds every bad ProviderKey and Secret a tenant could write
//! to stall, rob or confuse the controller. Meanwhile a ProviderKey in namespace B becomes
//! Ready, the controller never stops, a second server of the attacker's choosing sees no key,
//! Secrets the operator did not create are left byte-for-byte alone, and no canary reaches a
//! log line, an Event or a status.
//!
//! One test per binary: it installs an older, looser CRD for a while, which other tests on the
//! same control plane must not see.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use byok_e2e::envtest::{TestEnv, shared};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::crd::ProviderKey;
use byok_operator::names;
use byok_operator::providers::ProviderKind;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use kube::{CustomResourceExt, ResourceExt};

/// Log lines of the in-process controller, at trace level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).to_string()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every request the controller's client sends: method, path and Accept header.
#[derive(Clone, Default)]
struct RequestLog(Arc<Mutex<Vec<(String, String, String)>>>);

impl RequestLog {
    /// Requests for `path` that would return a whole object (not metadata only).
    fn full_reads(&self, path: &str) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(m, p, accept)| {
                m == "GET" && p == path && !accept.contains("as=PartialObjectMetadata")
            })
            .count()
    }
    fn metadata_reads(&self, path: &str) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(m, p, accept)| {
                m == "GET" && p == path && accept.contains("as=PartialObjectMetadata")
            })
            .count()
    }
}

async fn counting_client(log: RequestLog) -> anyhow::Result<kube::Client> {
    let config = shared().kube_config().await?;
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        let accept = req
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        log.0.lock().unwrap_or_else(|p| p.into_inner()).push((
            req.method().to_string(),
            req.uri().path().to_string(),
            accept,
        ));
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// The CRD as an older release shipped it: `verification.interval` any string or integer,
/// and no immutability rules.
fn looser_crd() -> anyhow::Result<serde_json::Value> {
    // ProviderKey::crd(): no schema digest annotation, as a release before the check had.
    let mut crd = serde_json::to_value(ProviderKey::crd())?;
    let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    spec["properties"]["verification"]["properties"]["interval"] =
        serde_json::json!({"x-kubernetes-int-or-string": true});
    let strip_transitions = |v: &mut serde_json::Value| {
        if let Some(rules) = v
            .get_mut("x-kubernetes-validations")
            .and_then(|r| r.as_array_mut())
        {
            rules.retain(|r| !r["rule"].as_str().unwrap_or_default().contains("oldSelf"));
        }
    };
    strip_transitions(spec);
    if let Some(props) = spec["properties"].as_object_mut() {
        for field in props.values_mut() {
            strip_transitions(field);
        }
    }
    Ok(crd)
}

async fn install_crd(client: &kube::Client, crd: &serde_json::Value) -> anyhow::Result<()> {
    apply_crd(client, &serde_json::from_value(crd.clone())?).await
}

async fn strict_crd(client: &kube::Client) -> anyhow::Result<()> {
    install_crd(client, &serde_json::to_value(byok_operator::crdgen::crd())?).await
}

fn ready_reason(pk: &ProviderKey) -> Option<(String, String)> {
    condition(pk, "Ready").map(|(s, r, _)| (s, r))
}

async fn wait_ready(
    env: &TestEnv,
    name: &str,
    status: &str,
    reason: &str,
) -> anyhow::Result<ProviderKey> {
    let (status, reason) = (status.to_string(), reason.to_string());
    wait_pk(env, name, &format!("Ready={status} {reason}"), move |pk| {
        ready_reason(pk) == Some((status.clone(), reason.clone()))
    })
    .await
}

/// ProviderKeys of any shape, including ones our types cannot read.
fn any_pk(env: &TestEnv) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<ProviderKey>(&());
    Api::namespaced_with(env.client.clone(), &env.namespace, &resource)
}

/// Polls (with a deadline) until the Ready condition of a ProviderKey of any shape has
/// `status` and `reason`; returns its message.
async fn wait_ready_any(
    env: &TestEnv,
    name: &str,
    status: &str,
    reason: &str,
) -> anyhow::Result<String> {
    let api = any_pk(env);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let obj = api.get(name).await?;
        let ready = obj.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .cloned()
            .unwrap_or_default();
        if ready["status"] == status && ready["reason"] == reason {
            return Ok(ready["message"].as_str().unwrap_or_default().to_string());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{name}: timed out waiting for Ready={status} {reason}; status is {}",
            obj.data["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }
}

#[tokio::test]
async fn a_hostile_tenant_cannot_stop_rob_or_confuse_the_controller() -> anyhow::Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("byok_operator=trace,kube=debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init();

    let a = TestEnv::new("tenant-a").await?;
    let b = TestEnv::new("tenant-b").await?;
    let operator_ns = TestEnv::new("operator").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let evil = FakeProvider::start(FakeProviderConfig::default()).await?;
    let canary = format!("hunter2-canary-{}", random_key(""));

    // 1. Objects stored through an older, looser CRD, before the schema refused them.
    install_crd(&a.client, &looser_crd()?).await?;
    for (name, interval) in [
        ("iv-negative", serde_json::json!("1h-1h")),
        ("iv-overflow", serde_json::json!("99999999999999999h")),
        ("iv-banana", serde_json::json!("banana")),
        ("iv-integer", serde_json::json!(5)),
    ] {
        put_secret(
            &a,
            &format!("{name}-raw"),
            &[("api-key", &random_key("sk-proj-"))],
        )
        .await?;
        create_pk(
            &a,
            name,
            serde_json::json!({"provider": "openai", "secretRef": {"name": format!("{name}-raw")},
                "verification": {"interval": interval}}),
        )
        .await?;
    }
    strict_crd(&a.client).await?;

    // The controller watches every namespace, with a client that records its requests.
    let requests = RequestLog::default();
    let mut config = dev_config(&operator_ns, &fake)?;
    config.watch_namespace = None;
    let controller =
        RunningController::start_with_client(counting_client(requests.clone()).await?, config);

    // 2. A secretRef at an unlabelled database password, sent to a server of the tenant's
    //    choosing.
    put_secret_labelled(&a, "db-password", &[("api-key", &canary)], &[]).await?;
    create_pk(
        &a,
        "steal",
        serde_json::json!({"provider": "openai-compatible", "baseURL": evil.base_url(ProviderKind::OpenAICompatible),
            "secretRef": {"name": "db-password"}}),
    )
    .await?;

    // 3. Secrets in the way of the managed Secret: an Opaque one, a managed-typed one with no
    //    owner, and one claiming a previous same-named owner whose envelope does not
    //    authenticate here.
    let good_key = random_key("sk-proj-");
    fake.add_valid_key(ProviderKind::OpenAI, &good_key);
    put_secret(&a, "good-raw", &[("api-key", &good_key)]).await?;
    let foreign = |name: &str, type_: &str, owner: Option<&str>| Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(names::managed_secret_name(name)),
            owner_references: owner.map(|o| {
                vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "byok.dev/v1alpha1".into(),
                        kind: "ProviderKey".into(),
                        name: o.into(),
                        uid: "00000000-0000-0000-0000-000000000000".into(),
                        ..Default::default()
                    },
                ]
            }),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(
            [(
                names::ENVELOPE_KEY.to_string(),
                ByteString(canary.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let secrets_a = a.api::<Secret>();
    let mut foreign_before = Vec::new();
    for (name, type_, owner) in [
        ("opaque", "Opaque", None),
        ("typed", names::MANAGED_SECRET_TYPE, None),
        ("forged", names::MANAGED_SECRET_TYPE, Some("forged")),
    ] {
        let created = secrets_a
            .create(&PostParams::default(), &foreign(name, type_, owner))
            .await?;
        foreign_before.push(created);
        create_pk(
            &a,
            name,
            serde_json::json!({"provider": "openai", "secretRef": {"name": "good-raw"}}),
        )
        .await?;
    }

    // 4. A ProviderKey whose key is in service, then its source deleted, then its baseURL
    //    moved to the tenant's server (refused by the schema; then forced through a looser
    //    CRD, as an object stored before the rule would be).
    let compat_key = random_key("sk-");
    fake.add_valid_key(ProviderKind::OpenAICompatible, &compat_key);
    put_secret(&a, "moved-raw", &[("api-key", &compat_key)]).await?;
    create_pk(
        &a,
        "moved",
        serde_json::json!({"provider": "openai-compatible", "baseURL": fake.base_url(ProviderKind::OpenAICompatible),
            "secretRef": {"name": "moved-raw"}, "verification": {"interval": "1m"}}),
    )
    .await?;

    // 5. Two keys whose managed Secrets will be tampered with.
    for name in ["tamper-heal", "tamper-dead"] {
        put_secret(&a, &format!("{name}-raw"), &[("api-key", &good_key)]).await?;
        create_pk(
            &a,
            name,
            serde_json::json!({"provider": "openai", "secretRef": {"name": format!("{name}-raw")}}),
        )
        .await?;
    }

    // Meanwhile, namespace B.
    let b_key = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &b_key);
    put_secret(&b, "raw", &[("api-key", &b_key)]).await?;
    create_pk(
        &b,
        "victim",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "raw"}}),
    )
    .await?;
    wait_ready(&b, "victim", "True", "Valid").await?;

    // Every bad object got its own typed reason.
    for name in ["iv-negative", "iv-overflow", "iv-banana"] {
        let message = wait_ready_any(&a, name, "False", "InvalidSpec").await?;
        assert!(message.contains("interval"), "{name}: {message}");
    }
    // An integer, stored where the old schema allowed one, does not deserialise at all; the
    // API server now refuses even status writes for it, so the Warning Event says why.
    let deadline = tokio::time::Instant::now() + WAIT;
    let events_a: Api<Event> = a.api();
    loop {
        let found = events_a
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("InvalidSpec")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("iv-integer")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("spec.verification.interval"))
            });
        if found {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no InvalidSpec Event for iv-integer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }
    for name in ["iv-negative", "iv-overflow", "iv-banana", "iv-integer"] {
        let managed = names::managed_secret_name(name);
        assert!(
            secrets_a.get_opt(&managed).await?.is_none(),
            "{name}: nothing imported"
        );
    }
    let steal = wait_ready(&a, "steal", "False", "SecretNotLabelled").await?;
    let (_, _, message) = condition(&steal, "Ready").unwrap_or_default();
    assert!(
        message.contains(&format!(
            "kubectl label secret db-password -n {} byok.dev/key-source=true",
            a.namespace
        )),
        "{message}"
    );
    let db_path = format!("/api/v1/namespaces/{}/secrets/db-password", a.namespace);
    assert!(
        requests.metadata_reads(&db_path) >= 1,
        "the label was checked"
    );
    assert_eq!(
        requests.full_reads(&db_path),
        0,
        "the unlabelled Secret's data was never read"
    );
    for name in ["opaque", "typed", "forged"] {
        wait_ready(&a, name, "False", "ManagedSecretConflict").await?;
    }
    wait_ready(&a, "moved", "True", "Valid").await?;
    for name in ["tamper-heal", "tamper-dead"] {
        wait_ready(&a, name, "True", "Valid").await?;
    }

    // The baseURL cannot be moved...
    secrets_a
        .delete("moved-raw", &DeleteParams::default())
        .await?;
    wait_pk(&a, "moved", "source gone", |pk| {
        is_condition(pk, "Verified", "False", "SecretNotFound")
    })
    .await?;
    let pks_a = a.api::<ProviderKey>();
    let to_evil =
        serde_json::json!({"spec": {"baseURL": evil.base_url(ProviderKind::OpenAICompatible)}});
    let refused = pks_a
        .patch("moved", &PatchParams::default(), &Patch::Merge(&to_evil))
        .await
        .expect_err("baseURL is immutable");
    assert!(refused.to_string().contains("baseURL"), "{refused}");
    // ...and when it is anyway, the key in service does not follow it.
    install_crd(&a.client, &looser_crd()?).await?;
    // Established is not enforced: each API server instance swaps its CRD handler a little
    // later (on a busy machine, long enough for the patch to meet the old schema). Wait with
    // a dry run until the looser schema answers.
    let deadline = tokio::time::Instant::now() + WAIT;
    let dry_run = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    while let Err(e) = pks_a
        .patch("moved", &dry_run, &Patch::Merge(&to_evil))
        .await
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the looser CRD was never enforced: {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    pks_a
        .patch("moved", &PatchParams::default(), &Patch::Merge(&to_evil))
        .await?;
    strict_crd(&a.client).await?;
    wait_ready(&a, "moved", "False", "DestinationChanged").await?;

    // Tampered ciphertexts: healed from a source that still verifies; reported otherwise.
    secrets_a
        .delete("tamper-dead-raw", &DeleteParams::default())
        .await?;
    wait_pk(&a, "tamper-dead", "source gone", |pk| {
        is_condition(pk, "Verified", "False", "SecretNotFound")
    })
    .await?;
    for name in ["tamper-heal", "tamper-dead"] {
        let managed = names::managed_secret_name(name);
        let mut secret = secrets_a.get(&managed).await?;
        if let Some(last) = secret
            .data
            .as_mut()
            .and_then(|d| d.get_mut(names::ENVELOPE_KEY))
            .and_then(|envelope| envelope.0.last_mut())
        {
            *last ^= 0x01;
        }
        secrets_a
            .replace(&managed, &PostParams::default(), &secret)
            .await?;
    }
    let healed = wait_pk(&a, "tamper-heal", "re-imported", |pk| {
        pk.status.as_ref().and_then(|s| s.key_version) == Some(2)
            && is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    assert_eq!(
        healed.status.and_then(|s| s.fingerprint),
        Some(byok_operator::crypto::fingerprint(good_key.as_bytes())),
        "the source key is back in service"
    );
    wait_ready(&a, "tamper-dead", "False", "DecryptionFailed").await?;

    // The keyring deleted: nothing is replaced, everyone is told; restored: all recover.
    let keyring_api = operator_ns.api::<Secret>();
    let keyring_name = byok_operator::controller::keyring::DEFAULT_KEYRING_SECRET;
    let saved = keyring_api.get(keyring_name).await?;
    keyring_api
        .delete(keyring_name, &DeleteParams::default())
        .await?;
    wait_ready(&b, "victim", "False", "KeyringUnavailable").await?;
    assert!(
        keyring_api.get_opt(keyring_name).await?.is_none(),
        "the keyring was not re-created"
    );
    let events: Api<Event> = operator_ns.api();
    let keyring_events = events.list(&ListParams::default()).await?;
    assert!(
        keyring_events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("KeyringUnavailable")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(keyring_name)),
        "a Warning Event names the keyring Secret"
    );
    let mut restored = saved.clone();
    restored.metadata = kube::api::ObjectMeta {
        name: saved.metadata.name.clone(),
        labels: saved.metadata.labels.clone(),
        ..Default::default()
    };
    keyring_api
        .create(&PostParams::default(), &restored)
        .await?;
    wait_ready(&b, "victim", "True", "Valid").await?;

    // A new ProviderKey in B still becomes Ready while all of this sits in A.
    let late_key = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &late_key);
    put_secret(&b, "late-raw", &[("api-key", &late_key)]).await?;
    create_pk(
        &b,
        "late",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "late-raw"}}),
    )
    .await?;
    wait_ready(&b, "late", "True", "Valid").await?;

    // The tenant's server saw nothing at all.
    assert_eq!(evil.connections(), 0, "the second server was never dialled");
    assert_eq!(evil.total_requests(), 0);

    // Deleting every ProviderKey in A leaves the foreign Secrets byte-for-byte as they were.
    let all_a = any_pk(&a);
    let names_a: Vec<String> = all_a
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|pk| pk.name_any())
        .collect();
    for name in &names_a {
        all_a.delete(name, &DeleteParams::default()).await?;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !all_a.list(&ListParams::default()).await?.items.is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "ProviderKeys in A were not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }
    for before in &foreign_before {
        let after = secrets_a.get(&before.name_any()).await?;
        assert_eq!(
            after.metadata.resource_version,
            before.metadata.resource_version,
            "{}",
            before.name_any()
        );
        assert_eq!(after.data, before.data);
        assert_eq!(after.type_, before.type_);
        assert_eq!(
            after.metadata.owner_references,
            before.metadata.owner_references
        );
    }
    assert!(secrets_a.get_opt("db-password").await?.is_some());

    assert!(controller.is_running(), "the controller never stopped");

    // No canary anywhere: logs, Events, statuses.
    let logs = captured.text();
    assert!(!logs.is_empty(), "logs were captured");
    let mut seen = vec![("logs".to_string(), logs)];
    for env in [&a, &b] {
        let events: Api<Event> = env.api();
        for e in events.list(&ListParams::default()).await?.items {
            seen.push((
                format!("event {}", e.name_any()),
                serde_json::to_string(&e)?,
            ));
        }
        for pk in env
            .api::<ProviderKey>()
            .list(&ListParams::default())
            .await?
            .items
        {
            seen.push((
                format!("status of {}", pk.name_any()),
                serde_json::to_string(&pk.status)?,
            ));
        }
    }
    let secret_part = &canary["hunter2-canary-".len()..];
    for (place, text) in &seen {
        for needle in [canary.as_str(), secret_part, &b_key, &good_key, &compat_key] {
            assert!(!text.contains(needle), "a key reached {place}");
        }
    }
    Ok(())
}
