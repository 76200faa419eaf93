//! The Argo CD health check (`config/argocd/health.lua`), run with `lua5.4` through
//! `config/argocd/run_health.lua`: over hand-made objects for every branch and every reason,
//! and over ProviderKeys exactly as the real API server returns them.
//!
//! `lua5.4` must be installed (Debian/Ubuntu: `apt-get install -y lua5.4`); without it these
//! tests fail rather than skip.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::crd::ProviderKey;
use byok_operator::providers::ProviderKind;
use byok_operator::reason::Reason;
use byok_operator::status::ready_reasons;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

const LUA: &str = "lua5.4";
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/argocd");
const HEALTH_KEY: &str = "resource.customizations.health.byok.dev_ProviderKey";

/// Argo CD's verdict on an object: `(status, message)`.
fn health_of_json(json: &str) -> anyhow::Result<(String, String)> {
    let runner = format!("{CONFIG}/run_health.lua");
    let mut child = match Command::new(LUA)
        .arg(&runner)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "{LUA} is not installed; it runs the Argo CD health check in these tests. \
             Install it (Debian/Ubuntu: `apt-get install -y lua5.4`)"
        ),
        Err(e) => return Err(e).with_context(|| format!("starting {LUA}")),
    };
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(json.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8(out.stdout)?;
    anyhow::ensure!(
        out.status.success(),
        "{LUA} {runner} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .strip_suffix('\n')
        .context("no newline-terminated result")?;
    let (status, message) = line
        .split_once('\t')
        .with_context(|| format!("not `status<TAB>message`: {line:?}"))?;
    Ok((status.to_string(), message.to_string()))
}

fn health(obj: &Value) -> anyhow::Result<(String, String)> {
    health_of_json(&serde_json::to_string(obj)?)
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": 1,
        "lastTransitionTime": "2025-06-01T10:00:00Z",
    })
}

fn ready(status: &str, reason: &str, message: &str) -> Value {
    condition("Ready", status, reason, message)
}

fn verified(status: &str, reason: &str, message: &str) -> Value {
    condition("Verified", status, reason, message)
}

/// A ProviderKey at generation 1 whose status (for generation 1) has `conditions`.
fn provider_key(conditions: Vec<Value>) -> Value {
    json!({
        "apiVersion": "byok.dev/v1alpha1",
        "kind": "ProviderKey",
        "metadata": {
            "name": "team-anthropic",
            "namespace": "research",
            "uid": "6b0d1c5e-7f1a-4a57-9a59-2f8e3c1d0a11",
            "generation": 1,
            "creationTimestamp": "2025-06-01T09:59:58Z",
            "finalizers": ["byok.dev/managed-secret"],
        },
        "spec": {"provider": "anthropic", "secretRef": {"name": "anthropic-raw"}},
        "status": {
            "observedGeneration": 1,
            "conditions": conditions,
            "managedSecretName": "team-anthropic-byok",
        },
    })
}

/// The health Argo CD shows for each reason, decided here once for every variant: a new
/// reason does not compile until someone decides (and updates health.lua and docs/gitops.md).
fn expected_health(reason: Reason) -> &'static str {
    match reason {
        Reason::Valid => "Healthy",
        // Retried with backoff by the operator; nothing for a person to do yet.
        Reason::RateLimited | Reason::ProviderUnavailable => "Progressing",
        // Someone has to act: fix the key, the Secret, the spec, the keyring or the conflict.
        Reason::InvalidKey
        | Reason::QuotaExhausted
        | Reason::BaseURLRejected
        | Reason::SecretNotFound
        | Reason::SecretKeyMissing
        | Reason::SecretNotLabelled
        | Reason::ManagedSecretConflict
        | Reason::DecryptionFailed
        | Reason::KeyringUnavailable
        | Reason::DestinationChanged
        | Reason::InvalidSpec => "Degraded",
    }
}

/// The conditions the controller writes when `reason` is the outcome (src/controller/plan.rs).
fn reported(reason: Reason) -> Vec<Value> {
    let r = reason.as_str();
    let message = format!("the controller's words for {r}");
    match reason {
        Reason::Valid => vec![
            ready(
                "True",
                r,
                "key sha256:4f1c0d9e8a7b6c5d (version 1) is in service",
            ),
            verified("True", r, "the provider accepted the key"),
        ],
        // A first key the provider could not be asked about yet.
        Reason::RateLimited | Reason::ProviderUnavailable => vec![
            ready("False", r, &message),
            verified("Unknown", r, &message),
        ],
        // Verification found it (a rejected key, a refused destination, an unusable source).
        Reason::InvalidKey
        | Reason::QuotaExhausted
        | Reason::BaseURLRejected
        | Reason::SecretNotFound
        | Reason::SecretKeyMissing
        | Reason::SecretNotLabelled => {
            vec![ready("False", r, &message), verified("False", r, &message)]
        }
        // Blockers: Verified carries what was found before (here: nothing yet, or Valid).
        Reason::ManagedSecretConflict => vec![
            ready("False", r, &message),
            verified(
                "Unknown",
                ready_reasons::PENDING,
                "verification has not run yet",
            ),
        ],
        Reason::KeyringUnavailable => vec![
            ready("False", r, &message),
            verified("True", "Valid", "the provider accepted the key"),
        ],
        // The key in service cannot be used and the source could not replace it.
        Reason::DecryptionFailed | Reason::DestinationChanged => vec![
            ready("False", r, &message),
            verified("False", "SecretNotFound", "Secret anthropic-raw not found"),
        ],
        // An object that does not match the API gets Ready only.
        Reason::InvalidSpec => vec![ready("False", r, &message)],
    }
}

#[test]
fn every_reason_has_the_health_argo_cd_should_show() -> anyhow::Result<()> {
    for reason in Reason::ALL {
        let want = expected_health(reason);
        if reason != Reason::Valid {
            assert_eq!(
                want == "Progressing",
                reason.is_transient(),
                "{reason}: only transient reasons (src/reason.rs) are Progressing"
            );
        }
        let (status, message) = health(&provider_key(reported(reason)))?;
        assert_eq!(status, want, "{reason}: {message}");
        assert!(
            message.starts_with(&format!("{reason}: ")),
            "{reason}: the message leads with the reason: {message}"
        );
        if reason != Reason::Valid {
            assert!(
                message.contains(&format!("the controller's words for {reason}")),
                "{reason}: the message carries the condition's: {message}"
            );
        }
    }
    Ok(())
}

#[test]
fn ready_only_reasons_pending_and_pending_key_rejected() -> anyhow::Result<()> {
    let pending = provider_key(vec![
        ready(
            "False",
            ready_reasons::PENDING,
            "waiting for the first verification",
        ),
        verified(
            "Unknown",
            ready_reasons::PENDING,
            "verification has not run yet",
        ),
    ]);
    assert_eq!(
        health(&pending)?,
        (
            "Progressing".to_string(),
            "Pending: waiting for the first verification".to_string()
        )
    );

    // Ready stays True (the last good key serves), but what Git declares is not what runs.
    let rejected = provider_key(vec![
        ready(
            "True",
            ready_reasons::PENDING_KEY_REJECTED,
            "key sha256:aaaa is in service; a newer key was rejected (see the Verified condition)",
        ),
        verified(
            "False",
            "InvalidKey",
            "new key sha256:bbbb rejected: 401; the last good key stays in service",
        ),
    ]);
    let (status, message) = health(&rejected)?;
    assert_eq!(status, "Degraded");
    assert!(
        message.starts_with("PendingKeyRejected: key sha256:aaaa is in service")
            && message.contains("Verified InvalidKey: new key sha256:bbbb rejected: 401"),
        "{message}"
    );
    Ok(())
}

#[test]
fn the_key_in_service_with_an_unusable_source_is_degraded() -> anyhow::Result<()> {
    // The source Secret went away: its key keeps serving, which Git no longer describes.
    let obj = provider_key(vec![
        ready("True", "Valid", "key sha256:aaaa (version 2) is in service"),
        verified("False", "SecretNotFound", "Secret anthropic-raw not found"),
    ]);
    let (status, message) = health(&obj)?;
    assert_eq!(status, "Degraded");
    assert_eq!(
        message,
        "Valid: key sha256:aaaa (version 2) is in service; but Verified SecretNotFound: Secret \
         anthropic-raw not found"
    );
    Ok(())
}

#[test]
fn a_rotation_retried_with_backoff_stays_healthy() -> anyhow::Result<()> {
    let obj = provider_key(vec![
        ready("True", "Valid", "key sha256:aaaa (version 1) is in service"),
        verified(
            "Unknown",
            "ProviderUnavailable",
            "could not verify key sha256:bbbb yet (ProviderUnavailable); retrying with backoff",
        ),
    ]);
    let (status, message) = health(&obj)?;
    assert_eq!(status, "Healthy");
    assert!(message.contains("retrying with backoff"), "{message}");
    Ok(())
}

#[test]
fn a_replacement_key_still_being_verified_is_progressing() -> anyhow::Result<()> {
    for reason in [Reason::DestinationChanged, Reason::DecryptionFailed] {
        let obj = provider_key(vec![
            ready(
                "False",
                reason.as_str(),
                "the source key could not replace it yet",
            ),
            verified(
                "Unknown",
                "RateLimited",
                "could not verify key sha256:bbbb yet (RateLimited); retrying with backoff",
            ),
        ]);
        assert_eq!(health(&obj)?.0, "Progressing", "{reason}");
    }
    Ok(())
}

#[test]
fn no_verdict_before_the_controller_has_seen_the_object() -> anyhow::Result<()> {
    let mut fresh = provider_key(vec![]);
    fresh.as_object_mut().context("object")?.remove("status");
    assert_eq!(
        health(&fresh)?,
        (
            "Progressing".to_string(),
            "waiting for the controller: no status yet".to_string()
        )
    );

    let no_ready = provider_key(vec![verified("True", "Valid", "")]);
    let (status, message) = health(&no_ready)?;
    assert_eq!(
        (status.as_str(), message.as_str()),
        (
            "Progressing",
            "waiting for the controller: no Ready condition yet"
        )
    );

    // Ready=True for generation 1 says nothing about generation 2.
    let mut stale = provider_key(reported(Reason::Valid));
    stale["metadata"]["generation"] = json!(2);
    let (status, message) = health(&stale)?;
    assert_eq!(status, "Progressing");
    assert_eq!(
        message,
        "waiting for the controller: generation 2 not observed yet (status is for generation 1)"
    );

    let mut unknown = provider_key(vec![ready("Unknown", "Reconciling", "working on it")]);
    assert_eq!(health(&unknown)?.0, "Progressing");
    unknown["status"]
        .as_object_mut()
        .context("status")?
        .remove("observedGeneration");
    assert_eq!(health(&unknown)?.0, "Progressing");
    Ok(())
}

#[test]
fn deletion_in_progress_is_progressing_whatever_the_conditions() -> anyhow::Result<()> {
    for conditions in [reported(Reason::Valid), reported(Reason::InvalidKey)] {
        let mut obj = provider_key(conditions);
        obj["metadata"]["deletionTimestamp"] = json!("2025-06-01T11:00:00Z");
        let (status, message) = health(&obj)?;
        assert_eq!(status, "Progressing");
        assert!(message.starts_with("being deleted"), "{message}");
    }
    Ok(())
}

#[test]
fn a_reason_this_check_does_not_know_is_degraded() -> anyhow::Result<()> {
    // Loud rather than silently green: a newer operator may report reasons added later.
    let obj = provider_key(vec![ready("False", "SomethingNew", "explained here")]);
    assert_eq!(
        health(&obj)?,
        (
            "Degraded".to_string(),
            "SomethingNew: explained here".to_string()
        )
    );
    Ok(())
}

#[test]
fn the_runner_reads_json_as_kubectl_prints_it() -> anyhow::Result<()> {
    // Escapes, non-ASCII text, numbers, nulls and nesting, as `kubectl get -o json` may print.
    let text = r#"{
      "apiVersion": "byok.dev/v1alpha1", "kind": "ProviderKey",
      "metadata": {"name": "k", "generation": 3, "labels": null, "annotations": {"a/b": "x\/y"},
                   "managedFields": [{"fieldsV1": {"f:spec": {}}, "time": null}, []]},
      "spec": {"provider": "openai", "allowedModels": [], "verification": {"interval": "1.5h"}},
      "status": {
        "observedGeneration": 3, "keyVersion": 12, "ratio": -1.5e-3,
        "conditions": [
          {"type": "Verified", "status": "True", "reason": "Valid", "message": ""},
          {"type": "Ready", "status": "True", "reason": "Valid",
           "message": "key \"sk-\u2026x\" \\ caf\u00e9 \ud83d\ude00 ✓\ttab"}
        ]
      }
    }"#;
    assert_eq!(
        health_of_json(text)?,
        (
            "Healthy".to_string(),
            "Valid: key \"sk-…x\" \\ café 😀 ✓\ttab".to_string()
        )
    );
    let broken = health_of_json(r#"{"status": {"conditions": [}"#);
    assert!(broken.is_err(), "malformed JSON is an error, not a verdict");
    Ok(())
}

#[test]
fn the_argocd_cm_patch_carries_health_lua_byte_for_byte() -> anyhow::Result<()> {
    let script = std::fs::read_to_string(format!("{CONFIG}/health.lua"))?;
    let patch: ConfigMap = serde_saphyr::from_str(&std::fs::read_to_string(format!(
        "{CONFIG}/argocd-cm-patch.yaml"
    ))?)?;
    assert_eq!(patch.metadata.name.as_deref(), Some("argocd-cm"));
    assert_eq!(patch.metadata.namespace.as_deref(), Some("argocd"));
    let data = patch.data.unwrap_or_default();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        [HEALTH_KEY],
        "only the health check"
    );
    assert!(
        data[HEALTH_KEY] == script,
        "config/argocd/argocd-cm-patch.yaml and config/argocd/health.lua differ; re-indent \
         health.lua (four spaces) under {HEALTH_KEY}"
    );
    Ok(())
}

#[test]
fn health_lua_stays_within_argo_cds_lua_5_1() -> anyhow::Result<()> {
    // Argo CD runs gopher-lua (Lua 5.1); lua5.4 here would accept these.
    let script = std::fs::read_to_string(format!("{CONFIG}/health.lua"))?;
    let code: String = script
        .lines()
        .map(|l| l.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    for construct in [
        "goto ",
        "::",
        "//",
        "<const>",
        "<close>",
        "utf8.",
        "table.unpack",
        "math.type",
        "string.pack",
        "0x",
        " & ",
        " | ",
        " << ",
        " >> ",
    ] {
        assert!(
            !code.contains(construct),
            "health.lua uses `{construct}`, which Lua 5.1 (Argo CD) lacks"
        );
    }
    Ok(())
}

/// The object exactly as the API server serves it (what Argo CD's cache holds).
async fn live_json(env: &TestEnv, name: &str) -> anyhow::Result<String> {
    let path = format!(
        "/apis/byok.dev/v1alpha1/namespaces/{}/providerkeys/{name}",
        env.namespace
    );
    Ok(env
        .client
        .request_text(http::Request::get(path).body(Vec::new())?)
        .await?)
}

#[tokio::test]
async fn live_objects_healthy_degraded_degraded() -> anyhow::Result<()> {
    let env = TestEnv::new("argocd").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let _controller = RunningController::start(&env, dev_config(&env, &fake)?).await?;

    let good = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &good);
    put_secret(&env, "anthropic-raw", &[("api-key", &good)]).await?;
    put_secret(&env, "openai-raw", &[("api-key", &random_key("sk-proj-"))]).await?;
    create_pk(
        &env,
        "valid",
        json!({"provider": "anthropic", "secretRef": {"name": "anthropic-raw"}}),
    )
    .await?;
    create_pk(
        &env,
        "invalid",
        json!({"provider": "openai", "secretRef": {"name": "openai-raw"}}),
    )
    .await?;
    create_pk(
        &env,
        "missing",
        json!({"provider": "openai", "secretRef": {"name": "not-there"}}),
    )
    .await?;

    for (name, reason, want) in [
        ("valid", "Valid", "Healthy"),
        ("invalid", "InvalidKey", "Degraded"),
        ("missing", "SecretNotFound", "Degraded"),
    ] {
        let ready_status = if want == "Healthy" { "True" } else { "False" };
        wait_pk(&env, name, reason, |pk: &ProviderKey| {
            is_condition(pk, "Ready", ready_status, reason)
        })
        .await?;
        let (status, message) = health_of_json(&live_json(&env, name).await?)?;
        assert_eq!(status, want, "{name}: {message}");
        assert!(
            message.starts_with(&format!("{reason}: ")),
            "{name}: {message}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn live_objects_the_controller_has_not_caught_up_with_are_progressing() -> anyhow::Result<()>
{
    // No controller watches this namespace: nothing races the status written here.
    let env = TestEnv::new("argocd-idle").await?;
    install_crds(&env.client).await?;
    let api = env.api::<ProviderKey>();
    let spec = json!({"provider": "anthropic", "secretRef": {"name": "anthropic-raw"}});

    create_pk(&env, "fresh", spec.clone()).await?;
    assert_eq!(
        health_of_json(&live_json(&env, "fresh").await?)?,
        (
            "Progressing".to_string(),
            "waiting for the controller: no status yet".to_string()
        )
    );

    // A status for generation 1 is Healthy until the spec moves on to generation 2.
    let status = json!({"status": {
        "observedGeneration": 1,
        "conditions": [
            ready("True", "Valid", "key sha256:aaaa (version 1) is in service"),
            verified("True", "Valid", "accepted"),
        ],
    }});
    api.patch_status("fresh", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    assert_eq!(
        health_of_json(&live_json(&env, "fresh").await?)?.0,
        "Healthy"
    );
    let moved = api
        .patch(
            "fresh",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"defaultModel": "claude-sonnet-4-5"}})),
        )
        .await?;
    assert_eq!(moved.metadata.generation, Some(2));
    let (health, message) = health_of_json(&live_json(&env, "fresh").await?)?;
    assert_eq!(health, "Progressing");
    assert!(
        message.contains("generation 2 not observed yet"),
        "{message}"
    );

    // Deleting, held by a finalizer as the operator's would hold it.
    api.patch(
        "fresh",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["byok.dev/e2e-hold"]}})),
    )
    .await?;
    api.delete("fresh", &DeleteParams::default()).await?;
    let (health, message) = health_of_json(&live_json(&env, "fresh").await?)?;
    assert_eq!(health, "Progressing");
    assert!(message.starts_with("being deleted"), "{message}");
    api.patch(
        "fresh",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    Ok(())
}
