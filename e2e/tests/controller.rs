//! The ProviderKey controller against the real kube-apiserver and the fake provider: each test
//! is a scenario a platform engineer would notice.

use std::time::Instant;

use base64::Engine;
use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{FakeMode, FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::controller::keyring::DEFAULT_KEYRING_SECRET;
use byok_operator::crd::ProviderKey;
use byok_operator::names::{annotations, managed_secret_name};
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use sha2::Digest;

struct Scenario {
    env: TestEnv,
    fake: FakeProvider,
    _controller: RunningController,
}

async fn scenario(prefix: &str) -> anyhow::Result<Scenario> {
    let env = TestEnv::new(prefix).await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let controller = RunningController::start(&env, dev_config(&env, &fake)?).await?;
    Ok(Scenario {
        env,
        fake,
        _controller: controller,
    })
}

fn openai_spec(secret: &str) -> serde_json::Value {
    serde_json::json!({"provider": "openai", "secretRef": {"name": secret}})
}

fn sha16(key: &str) -> String {
    format!(
        "sha256:{}",
        &hex::encode(sha2::Sha256::digest(key.as_bytes()))[..16]
    )
}

#[tokio::test]
async fn a_valid_key_becomes_ready_and_the_managed_secret_holds_only_ciphertext()
-> anyhow::Result<()> {
    let s = scenario("valid").await?;
    let key = random_key("sk-ant-api03-");
    s.fake.add_valid_key(ProviderKind::Anthropic, &key);
    put_secret(&s.env, "raw", &[("api-key", &key)]).await?;
    create_pk(
        &s.env,
        "team",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "raw"}}),
    )
    .await?;

    let pk = wait_pk(&s.env, "team", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    let status = pk.status.clone().unwrap_or_default();
    assert_eq!(status.fingerprint.as_deref(), Some(sha16(&key).as_str()));
    assert_eq!(
        status.masked_key,
        Some(format!("sk-ant-...{}", &key[key.len() - 4..]))
    );
    assert_eq!(status.key_version, Some(1));
    assert_eq!(status.encryption_key_id.as_deref(), Some("k1"));
    assert_eq!(status.managed_secret_name.as_deref(), Some("team-byok"));
    assert_eq!(status.observed_generation, pk.metadata.generation);
    assert!(status.last_verified_time.is_some() && status.last_rotation_time.is_some());
    assert!(is_condition(&pk, "Verified", "True", "Valid"));
    assert_eq!(
        s.fake.requests(ProviderKind::Anthropic),
        1,
        "one verification call"
    );

    let managed = s
        .env
        .api::<Secret>()
        .get(&managed_secret_name("team"))
        .await?;
    let owner = managed
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    assert_eq!(
        owner.first().map(|o| o.uid.as_str()),
        pk.metadata.uid.as_deref(),
        "owned by the ProviderKey"
    );
    let stored = serde_json::to_string(&managed)?; // data is base64 in here, metadata as is
    let raw_bytes: Vec<u8> = managed
        .data
        .iter()
        .flatten()
        .flat_map(|(_, v)| v.0.clone())
        .collect();
    for needle in [
        key.clone(),
        base64::engine::general_purpose::STANDARD.encode(&key),
        hex::encode(&key),
        key[key.len() - 12..].to_string(),
    ] {
        assert!(!stored.contains(&needle), "managed Secret leaks the key");
        assert!(
            !String::from_utf8_lossy(&raw_bytes).contains(&needle),
            "managed Secret data leaks the key"
        );
    }
    assert_eq!(
        decrypt_managed(&s.env, "team", "team").await?,
        key,
        "ciphertext decrypts to the key"
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_key_is_reported_and_nothing_is_stored() -> anyhow::Result<()> {
    let s = scenario("invalid").await?;
    put_secret(&s.env, "raw", &[("api-key", &random_key("sk-proj-"))]).await?;
    create_pk(&s.env, "bad", openai_spec("raw")).await?;
    let pk = wait_pk(&s.env, "bad", "Verified=False", |pk| {
        is_condition(pk, "Verified", "False", "InvalidKey")
    })
    .await?;
    assert!(is_condition(&pk, "Ready", "False", "InvalidKey"));
    let (_, _, message) = condition(&pk, "Verified").unwrap_or_default();
    assert!(
        message.contains("401"),
        "the message says what the provider answered: {message}"
    );
    assert!(
        s.env
            .api::<Secret>()
            .get_opt(&managed_secret_name("bad"))
            .await?
            .is_none(),
        "no managed Secret for a bad key"
    );
    Ok(())
}

#[tokio::test]
async fn rotating_the_source_secret_puts_the_new_key_in_service() -> anyhow::Result<()> {
    let s = scenario("rotate").await?;
    let (old, new) = (random_key("sk-proj-"), random_key("sk-proj-"));
    s.fake.add_valid_key(ProviderKind::OpenAI, &old);
    s.fake.add_valid_key(ProviderKind::OpenAI, &new);
    put_secret(&s.env, "raw", &[("api-key", &old)]).await?;
    create_pk(&s.env, "k", openai_spec("raw")).await?;
    let first = wait_pk(&s.env, "k", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    let first_rotation = first
        .status
        .as_ref()
        .and_then(|s| s.last_rotation_time.clone());
    let managed_annotations = |secret: Secret| secret.metadata.annotations.unwrap_or_default();
    let first_rotated_at =
        managed_annotations(s.env.api::<Secret>().get(&managed_secret_name("k")).await?)
            .remove(annotations::ROTATED_AT)
            .unwrap_or_default();

    let started = Instant::now();
    put_secret(&s.env, "raw", &[("api-key", &new)]).await?;
    let pk = wait_pk(&s.env, "k", "keyVersion 2", |pk| {
        pk.status.as_ref().and_then(|s| s.key_version) == Some(2)
    })
    .await?;
    eprintln!("rotation picked up in {:?}", started.elapsed());
    let status = pk.status.clone().unwrap_or_default();
    assert_eq!(status.fingerprint, Some(sha16(&new)));
    // Status times have one-second resolution (metav1.Time); the managed Secret keeps the
    // exact instant, which must have moved.
    assert!(
        status.last_rotation_time >= first_rotation,
        "lastRotationTime went backwards"
    );
    let rotated_at = |secret: &Secret| {
        secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotations::ROTATED_AT).cloned())
            .unwrap_or_default()
    };
    let managed = s.env.api::<Secret>().get(&managed_secret_name("k")).await?;
    let parse = |t: &str| t.parse::<jiff::Timestamp>().ok();
    assert!(
        parse(&rotated_at(&managed)) > parse(&first_rotated_at),
        "rotation time moved"
    );
    assert_eq!(decrypt_managed(&s.env, "k", "k").await?, new);
    Ok(())
}

#[tokio::test]
async fn rotating_to_a_bad_key_keeps_the_last_good_key_in_service() -> anyhow::Result<()> {
    let s = scenario("badrotate").await?;
    let (good, bad) = (random_key("sk-proj-"), random_key("sk-proj-"));
    s.fake.add_valid_key(ProviderKind::OpenAI, &good);
    put_secret(&s.env, "raw", &[("api-key", &good)]).await?;
    create_pk(&s.env, "k", openai_spec("raw")).await?;
    wait_pk(&s.env, "k", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;

    put_secret(&s.env, "raw", &[("api-key", &bad)]).await?;
    let pk = wait_pk(&s.env, "k", "pending key rejected", |pk| {
        is_condition(pk, "Verified", "False", "InvalidKey")
    })
    .await?;
    let status = pk.status.clone().unwrap_or_default();
    assert!(
        is_condition(&pk, "Ready", "True", "PendingKeyRejected"),
        "{:?}",
        status.conditions
    );
    assert_eq!(
        status.fingerprint,
        Some(sha16(&good)),
        "the good key stays in service"
    );
    assert_eq!(status.rejected_fingerprint, Some(sha16(&bad)));
    assert_eq!(status.key_version, Some(1));
    let (_, _, message) = condition(&pk, "Verified").unwrap_or_default();
    assert!(
        message.contains(&sha16(&bad)) && message.contains("last good key"),
        "{message}"
    );
    assert_eq!(decrypt_managed(&s.env, "k", "k").await?, good);
    Ok(())
}

#[tokio::test]
async fn a_provider_outage_keeps_a_verified_key_verified_and_retries_back_off() -> anyhow::Result<()>
{
    let s = scenario("outage").await?;
    let key = random_key("sk-ant-api03-");
    s.fake.add_valid_key(ProviderKind::Anthropic, &key);
    put_secret(&s.env, "raw", &[("api-key", &key)]).await?;
    create_pk(
        &s.env,
        "k",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "raw"}}),
    )
    .await?;
    wait_pk(&s.env, "k", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;

    // The provider goes down; a spec change forces a fresh verification.
    s.fake.set_mode(FakeMode::Overloaded);
    let before = s.fake.requests(ProviderKind::Anthropic);
    let started = Instant::now();
    let api = s.env.api::<ProviderKey>();
    let patch = serde_json::json!({"spec": {"defaultModel": "claude-sonnet-4-5"}});
    api.patch(
        "k",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;

    // Three failed attempts: with a 1s, 2s backoff in between they cannot come faster than 3s.
    let deadline = Instant::now() + WAIT;
    while s.fake.requests(ProviderKind::Anthropic) < before + 3 {
        anyhow::ensure!(Instant::now() < deadline, "the controller did not retry");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // polling interval
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(2900),
        "retries did not back off: 3 attempts in {elapsed:?}"
    );

    let pk = api.get("k").await?;
    assert!(
        is_condition(&pk, "Verified", "True", "Valid"),
        "an outage never unverifies: {:?}",
        pk.status
    );
    assert!(is_condition(&pk, "Ready", "True", "Valid"));

    // The provider recovers; the next retry succeeds and the new generation is observed.
    s.fake.set_mode(FakeMode::Normal);
    let generation = pk.metadata.generation;
    wait_pk(&s.env, "k", "observed the new generation", move |pk| {
        pk.status.as_ref().and_then(|s| s.observed_generation) == generation
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_missing_secret_or_entry_has_a_typed_reason_and_heals_when_created() -> anyhow::Result<()>
{
    let s = scenario("missing").await?;
    let key = random_key("sk-proj-");
    s.fake.add_valid_key(ProviderKind::OpenAI, &key);

    create_pk(&s.env, "nosecret", openai_spec("later")).await?;
    wait_pk(&s.env, "nosecret", "SecretNotFound", |pk| {
        is_condition(pk, "Ready", "False", "SecretNotFound")
    })
    .await?;
    put_secret(&s.env, "wrongentry", &[("token", &key)]).await?;
    create_pk(&s.env, "noentry", openai_spec("wrongentry")).await?;
    wait_pk(&s.env, "noentry", "SecretKeyMissing", |pk| {
        is_condition(pk, "Ready", "False", "SecretKeyMissing")
    })
    .await?;

    // Creating the Secret (or the entry) heals both without touching the ProviderKeys.
    put_secret(&s.env, "later", &[("api-key", &key)]).await?;
    put_secret(&s.env, "wrongentry", &[("token", &key), ("api-key", &key)]).await?;
    for name in ["nosecret", "noentry"] {
        let pk = wait_pk(&s.env, name, "healed", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
        assert_eq!(
            pk.metadata.generation,
            Some(1),
            "the ProviderKey was not touched"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_api_server_refuses_bad_specs_with_a_clear_message() -> anyhow::Result<()> {
    let env = TestEnv::new("schema").await?;
    install_crds(&env.client).await?;
    let cases = [
        (
            serde_json::json!({"provider": "cohere", "secretRef": {"name": "s"}}),
            "Unsupported value",
        ),
        (
            serde_json::json!({"provider": "azure", "secretRef": {"name": "s"}}),
            "provider azure requires spec.baseURL",
        ),
        (
            serde_json::json!({"provider": "openai-compatible", "secretRef": {"name": "s"}}),
            "provider openai-compatible requires spec.baseURL",
        ),
        (
            serde_json::json!({"provider": "openai-compatible", "secretRef": {"name": "s"}, "baseURL": "http://llm.example.com/v1"}),
            "baseURL must use https://",
        ),
        (
            serde_json::json!({"provider": "openai-compatible", "secretRef": {"name": "s"}, "baseURL": "https://u:p@llm.example.com/v1"}),
            "must not contain user info",
        ),
        (
            serde_json::json!({"provider": "openai-compatible", "secretRef": {"name": "s"}, "baseURL": "https://llm.example.com/v1?a=b"}),
            "must not have a query string or a fragment",
        ),
        (
            serde_json::json!({"provider": "openai-compatible", "secretRef": {"name": "s"}, "baseURL": "https://llm.example.com/v1#f"}),
            "must not have a query string or a fragment",
        ),
        (
            serde_json::json!({"provider": "openai"}),
            "secretRef: Required value",
        ),
        (
            serde_json::json!({"provider": "openai", "secretRef": {"name": "Not_A_Secret"}}),
            "secretRef.name must be a Secret name",
        ),
        (
            serde_json::json!({"provider": "openai", "secretRef": {"name": "s", "key": "a/b"}}),
            "secretRef.key must be a Secret data key",
        ),
        (
            serde_json::json!({"provider": "openai", "secretRef": {"name": "s"}, "verification": {"interval": "1h-1h"}}),
            "verification.interval must be a duration",
        ),
    ];
    // A ProviderKey's name is a label value on its managed Secret: 63 characters at most.
    let spec = serde_json::json!({"provider": "openai", "secretRef": {"name": "s"}});
    create_pk(&env, &"n".repeat(63), spec.clone()).await?;
    let err = create_pk(&env, &"n".repeat(64), spec)
        .await
        .expect_err("64 characters");
    assert!(err.to_string().contains("at most 63 characters"), "{err}");
    for (i, (spec, expected)) in cases.iter().enumerate() {
        let err = create_pk(&env, &format!("bad-{i}"), spec.clone())
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains(expected),
            "case {i}: expected {expected:?} in {text}"
        );
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 422),
            "case {i}: {err}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn deleting_a_providerkey_hard_deletes_its_managed_secret() -> anyhow::Result<()> {
    let s = scenario("delete").await?;
    let key = random_key("sk-proj-");
    s.fake.add_valid_key(ProviderKind::OpenAI, &key);
    put_secret(&s.env, "raw", &[("api-key", &key)]).await?;
    create_pk(&s.env, "k", openai_spec("raw")).await?;
    let pk = wait_pk(&s.env, "k", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    assert!(
        pk.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&byok_operator::names::FINALIZER.to_string())
    );

    let api = s.env.api::<ProviderKey>();
    api.delete("k", &DeleteParams::default()).await?;
    // There is no garbage collector in this control plane: only the finalizer can delete it.
    let uid = pk.metadata.uid.clone().unwrap_or_default();
    tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(
            api,
            "k",
            kube::runtime::wait::conditions::is_deleted(&uid),
        ),
    )
    .await??;
    assert!(
        s.env
            .api::<Secret>()
            .get_opt(&managed_secret_name("k"))
            .await?
            .is_none(),
        "managed Secret deleted"
    );
    Ok(())
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_providerkey_does_not_decrypt() -> anyhow::Result<()> {
    let s = scenario("copy").await?;
    let key = random_key("sk-proj-");
    s.fake.add_valid_key(ProviderKind::OpenAI, &key);
    put_secret(&s.env, "raw", &[("api-key", &key)]).await?;
    create_pk(&s.env, "a", openai_spec("raw")).await?;
    wait_pk(&s.env, "a", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    assert_eq!(decrypt_managed(&s.env, "a", "a").await?, key);
    let err = decrypt_managed(&s.env, "a", "b")
        .await
        .expect_err("bound to its ProviderKey");
    assert!(
        err.to_string().contains("copied from another object"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn rotating_the_operator_key_re_encrypts_every_managed_secret() -> anyhow::Result<()> {
    let s = scenario("rekey").await?;
    let mut keys = Vec::new();
    for name in ["a", "b", "c"] {
        let key = random_key("sk-proj-");
        s.fake.add_valid_key(ProviderKind::OpenAI, &key);
        put_secret(&s.env, &format!("raw-{name}"), &[("api-key", &key)]).await?;
        create_pk(&s.env, name, openai_spec(&format!("raw-{name}"))).await?;
        keys.push((name, key));
    }
    for (name, _) in &keys {
        wait_pk(&s.env, name, "Ready", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
    }
    let verifications = s.fake.total_requests();

    let secrets = s.env.api::<Secret>();
    let new_id =
        byok_operator::controller::keyring::rotate(&secrets, DEFAULT_KEYRING_SECRET).await?;
    assert_eq!(new_id, "k2");
    for (name, key) in &keys {
        wait_pk(&s.env, name, "encryptionKeyId k2", |pk| {
            pk.status
                .as_ref()
                .and_then(|s| s.encryption_key_id.as_deref())
                == Some("k2")
        })
        .await?;
        let managed = secrets.get(&managed_secret_name(name)).await?;
        let envelope = managed
            .data
            .unwrap_or_default()
            .remove(byok_operator::names::ENVELOPE_KEY)
            .unwrap_or_default();
        assert_eq!(byok_operator::crypto::envelope_key_id(&envelope.0)?, "k2");
        assert_eq!(&decrypt_managed(&s.env, name, name).await?, key);
    }
    assert_eq!(
        s.fake.total_requests(),
        verifications,
        "re-encryption needs no provider call"
    );
    Ok(())
}

#[tokio::test]
async fn every_provider_verifies_against_its_own_protocol() -> anyhow::Result<()> {
    let s = scenario("providers").await?;
    let compat = s.fake.base_url(ProviderKind::OpenAICompatible);
    let azure = s.fake.base_url(ProviderKind::Azure);
    let sa_json = byok_e2e::fake_provider::test_service_account_json(
        "byok@demo-project.iam.gserviceaccount.com",
        "demo-project",
    );
    s.fake.add_service_account_json(&sa_json)?;
    let cases = [
        (
            "anthropic",
            random_key("sk-ant-api03-"),
            serde_json::json!({}),
        ),
        ("openai", random_key("sk-proj-"), serde_json::json!({})),
        ("google", random_key("AIza"), serde_json::json!({})),
        (
            "azure",
            random_key(""),
            serde_json::json!({"baseURL": azure, "azure": {"apiVersion": "2024-10-21"}}),
        ),
        (
            "openai-compatible",
            random_key("sk-"),
            serde_json::json!({"baseURL": compat}),
        ),
        (
            "vertex",
            sa_json.clone(),
            serde_json::json!({"vertex": {"location": "us-central1"}}),
        ),
    ];
    for (provider, key, extra) in &cases {
        let kind: ProviderKind = provider.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        if kind != ProviderKind::Vertex {
            s.fake.add_valid_key(kind, key);
        }
        put_secret(&s.env, &format!("{provider}-raw"), &[("api-key", key)]).await?;
        let mut spec = serde_json::json!({"provider": provider, "secretRef": {"name": format!("{provider}-raw")}});
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        create_pk(&s.env, provider, spec).await?;
    }
    for (provider, key, _) in &cases {
        let pk = wait_pk(&s.env, provider, "Ready", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
        assert_eq!(
            pk.status.and_then(|s| s.fingerprint),
            Some(sha16(key)),
            "{provider}"
        );
        let kind: ProviderKind = provider.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        assert!(
            s.fake.requests(kind) >= 1,
            "{provider} was verified against its own endpoint"
        );
    }
    // The auth header each provider expects, and no other, reached the fake.
    let log = s.fake.requests_log();
    let headers_for = |kind: ProviderKind| -> Vec<String> {
        log.iter()
            .filter(|r| r.provider == Some(kind))
            .flat_map(|r| r.auth_headers.clone())
            .collect()
    };
    assert!(
        headers_for(ProviderKind::Anthropic)
            .iter()
            .all(|h| h == "x-api-key")
    );
    assert!(
        headers_for(ProviderKind::Google)
            .iter()
            .all(|h| h == "x-goog-api-key")
    );
    assert!(
        headers_for(ProviderKind::Azure)
            .iter()
            .all(|h| h == "api-key")
    );
    assert!(
        headers_for(ProviderKind::OpenAI)
            .iter()
            .all(|h| h == "authorization")
    );
    Ok(())
}

#[tokio::test]
async fn the_admin_server_serves_probes_and_verification_metrics() -> anyhow::Result<()> {
    let env = TestEnv::new("admin").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut config = dev_config(&env, &fake)?;
    config.admin_addr = Some(([127, 0, 0, 1], port).into());
    let _controller = RunningController::start(&env, config).await?;

    let key = random_key("sk-proj-");
    fake.add_valid_key(ProviderKind::OpenAI, &key);
    put_secret(&env, "good", &[("api-key", &key)]).await?;
    put_secret(&env, "bad", &[("api-key", &random_key("sk-proj-"))]).await?;
    create_pk(&env, "good", openai_spec("good")).await?;
    create_pk(&env, "bad", openai_spec("bad")).await?;
    wait_pk(&env, "good", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    wait_pk(&env, "bad", "InvalidKey", |pk| {
        is_condition(pk, "Verified", "False", "InvalidKey")
    })
    .await?;

    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://127.0.0.1:{port}{path}")).send();
    assert_eq!(get("/livez").await?.status(), 200);
    assert_eq!(get("/readyz").await?.status(), 200);
    let metrics = get("/metrics").await?.text().await?;
    for line in [
        r#"byok_verifications_total{provider="openai",reason="Valid"} 1"#,
        r#"byok_verifications_total{provider="openai",reason="InvalidKey"} 1"#,
        r#"byok_managed_secret_writes_total{kind="put"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn a_managed_secret_restored_from_backup_is_adopted() -> anyhow::Result<()> {
    let s = scenario("restore").await?;
    let key = random_key("sk-proj-");
    s.fake.add_valid_key(ProviderKind::OpenAI, &key);
    put_secret(&s.env, "raw", &[("api-key", &key)]).await?;
    create_pk(&s.env, "k", openai_spec("raw")).await?;
    let first = wait_pk(&s.env, "k", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;

    // A backup of the managed Secret, as Velero would hold it.
    let secrets = s.env.api::<Secret>();
    let managed_name = managed_secret_name("k");
    let backup = secrets.get(&managed_name).await?;

    // Disaster: the ProviderKey and its source are gone.
    let api = s.env.api::<ProviderKey>();
    api.delete("k", &DeleteParams::default()).await?;
    let old_uid = first.metadata.uid.clone().unwrap_or_default();
    tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(
            api.clone(),
            "k",
            kube::runtime::wait::conditions::is_deleted(&old_uid),
        ),
    )
    .await??;
    secrets.delete("raw", &DeleteParams::default()).await?;

    // Restore: the managed Secret (still naming the old owner), then the ProviderKey.
    let mut restored = backup.clone();
    restored.metadata = kube::api::ObjectMeta {
        name: backup.metadata.name.clone(),
        labels: backup.metadata.labels.clone(),
        annotations: backup.metadata.annotations.clone(),
        owner_references: backup.metadata.owner_references.clone(),
        ..Default::default()
    };
    secrets
        .create(&kube::api::PostParams::default(), &restored)
        .await?;
    create_pk(&s.env, "k", openai_spec("raw")).await?;
    let pk = wait_pk(&s.env, "k", "Ready from the restored Secret", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    assert!(is_condition(&pk, "Verified", "False", "SecretNotFound"));
    let status = pk.status.clone().unwrap_or_default();
    assert_eq!(status.fingerprint, Some(sha16(&key)));
    let adopted = secrets.get(&managed_name).await?;
    let owners = adopted.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(
        Some(owners[0].uid.clone()),
        pk.metadata.uid,
        "owner rewritten"
    );
    assert_eq!(adopted.data, backup.data, "the ciphertext itself is kept");
    assert_eq!(decrypt_managed(&s.env, "k", "k").await?, key);
    Ok(())
}

#[tokio::test]
async fn a_new_key_costs_exactly_one_verification() -> anyhow::Result<()> {
    let s = scenario("onecall").await?;
    let keys: Vec<String> = (0..3).map(|_| random_key("sk-ant-api03-")).collect();
    for (i, key) in keys.iter().enumerate() {
        s.fake.add_valid_key(ProviderKind::Anthropic, key);
        put_secret(&s.env, &format!("raw-{i}"), &[("api-key", key)]).await?;
        create_pk(
            &s.env,
            &format!("k{i}"),
            serde_json::json!({"provider": "anthropic", "secretRef": {"name": format!("raw-{i}")}}),
        )
        .await?;
    }
    for i in 0..3 {
        wait_pk(&s.env, &format!("k{i}"), "Ready", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
    }
    // The reconciles our own writes trigger (finalizer, managed Secret, status) have run once
    // a later change is seen through: rotate one source and wait for it.
    let rotated = random_key("sk-ant-api03-");
    s.fake.add_valid_key(ProviderKind::Anthropic, &rotated);
    put_secret(&s.env, "raw-0", &[("api-key", &rotated)]).await?;
    wait_pk(&s.env, "k0", "keyVersion 2", |pk| {
        pk.status.as_ref().and_then(|s| s.key_version) == Some(2)
    })
    .await?;
    assert_eq!(
        s.fake.requests(ProviderKind::Anthropic),
        4,
        "three new keys and one rotation: four calls"
    );
    Ok(())
}

/// Requests the controller sent that change something.
fn writes(m: &byok_operator::metrics::Metrics) -> u64 {
    ["secrets", "providerkeys", "providerkeys/status", "events"]
        .iter()
        .flat_map(|r| ["create", "update", "patch", "delete"].map(|v| m.api_requests(v, r)))
        .sum()
}

#[tokio::test]
async fn a_restart_calls_no_provider_and_a_steady_reconcile_sends_no_api_request()
-> anyhow::Result<()> {
    let env = TestEnv::new("steady").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let first = RunningController::start(&env, dev_config(&env, &fake)?).await?;
    for i in 0..3 {
        let key = random_key("sk-proj-");
        fake.add_valid_key(ProviderKind::OpenAI, &key);
        put_secret(&env, &format!("raw-{i}"), &[("api-key", &key)]).await?;
        create_pk(&env, &format!("k{i}"), openai_spec(&format!("raw-{i}"))).await?;
    }
    for i in 0..3 {
        wait_pk(&env, &format!("k{i}"), "Ready", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
    }
    drop(first);
    let calls = fake.total_requests();

    // A new replica: its caches fill from watches; it reads the keyring, and each key costs
    // one GET of its managed Secret (to open the envelope once) and nothing else.
    let config = dev_config(&env, &fake)?;
    let metrics = config.metrics.clone();
    let _second = RunningController::start(&env, config).await?;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while metrics.reconciliations(true) < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new replica did not reconcile"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // polling interval
    }
    let gets = metrics.api_requests("get", "secrets");
    assert_eq!(gets, 1 + 3, "the keyring, and one GET per managed Secret");

    // The keyring Secret touched without a change to its keys (its watch delivers it again,
    // as a restarted watch would) keeps every opened envelope.
    let loads = metrics.keyring_loads();
    env.api::<Secret>()
        .patch(
            DEFAULT_KEYRING_SECRET,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"touched": "yes"}}}),
            ),
        )
        .await?;
    while metrics.keyring_loads() == loads {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the keyring watch did not see the touch"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // polling interval
    }
    // A change that is not ours to act on (a label) reconciles the key from the caches alone.
    let done = metrics.reconciliations(true);
    env.api::<ProviderKey>()
        .patch(
            "k0",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await?;
    while metrics.reconciliations(true) <= done {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the label change was not reconciled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // polling interval
    }
    assert_eq!(
        metrics.api_requests("get", "secrets"),
        gets,
        "no GET in steady state"
    );
    assert_eq!(
        writes(&metrics),
        0,
        "nothing written: nothing changed\n{}",
        metrics.encode()
    );
    assert_eq!(
        fake.total_requests(),
        calls,
        "no verification after a restart"
    );
    Ok(())
}

#[tokio::test]
async fn a_queue_at_one_provider_keeps_its_rate_and_delays_no_other_provider() -> anyhow::Result<()>
{
    let env = TestEnv::new("fair").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let mut config = dev_config(&env, &fake)?;
    // One call per second per host, and only two workers: were a reconcile to wait for its
    // turn at the OpenAI host, both workers would be stuck there.
    config.verify_limits = (4, 1.0);
    config.max_concurrent_reconciles = 2;
    // Anthropic on another host name of the same fake provider.
    let anthropic = fake
        .base_url(ProviderKind::Anthropic)
        .replace("127.0.0.1", "localhost");
    config.endpoints = byok_operator::providers::Endpoints::parse(&[
        format!("openai={}", fake.base_url(ProviderKind::OpenAI)),
        format!("anthropic={anthropic}"),
    ])
    .map_err(|e| anyhow::anyhow!(e))?;
    let _controller = RunningController::start(&env, config).await?;

    let queued = 6;
    let started = Instant::now();
    for i in 0..queued {
        let key = random_key("sk-proj-");
        fake.add_valid_key(ProviderKind::OpenAI, &key);
        put_secret(&env, &format!("raw-{i}"), &[("api-key", &key)]).await?;
        create_pk(&env, &format!("k{i}"), openai_spec(&format!("raw-{i}"))).await?;
    }
    let key = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &key);
    put_secret(&env, "raw-a", &[("api-key", &key)]).await?;
    create_pk(
        &env,
        "a",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "raw-a"}}),
    )
    .await?;
    wait_pk(&env, "a", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    let other_ready = started.elapsed();
    for i in 0..queued {
        wait_pk(&env, &format!("k{i}"), "Ready", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
    }
    let all_ready = started.elapsed();
    assert!(
        all_ready >= std::time::Duration::from_secs(queued as u64 - 1),
        "{queued} calls at 1/s to one host took only {all_ready:?}"
    );
    assert!(
        other_ready < all_ready,
        "the Anthropic key ({other_ready:?}) waited for the OpenAI queue ({all_ready:?})"
    );
    assert!(
        other_ready < std::time::Duration::from_secs(3),
        "the Anthropic key took {other_ready:?}"
    );
    assert_eq!(
        fake.requests(ProviderKind::OpenAI),
        queued as u64,
        "one call per key"
    );
    Ok(())
}

#[tokio::test]
async fn a_lost_keyring_is_never_replaced_while_encrypted_keys_exist() -> anyhow::Result<()> {
    let env = TestEnv::new("keyring").await?;
    install_crds(&env.client).await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let key = random_key("sk-proj-");
    fake.add_valid_key(ProviderKind::OpenAI, &key);
    put_secret(&env, "raw", &[("api-key", &key)]).await?;
    create_pk(&env, "k", openai_spec("raw")).await?;
    let first = RunningController::start(&env, dev_config(&env, &fake)?).await?;
    wait_pk(&env, "k", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    drop(first);

    // The keyring is lost while the operator is down; a managed Secret still exists.
    let secrets = env.api::<Secret>();
    let keyring_name = DEFAULT_KEYRING_SECRET;
    let saved = secrets.get(keyring_name).await?;
    secrets
        .delete(keyring_name, &DeleteParams::default())
        .await?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut config = dev_config(&env, &fake)?;
    config.admin_addr = Some(([127, 0, 0, 1], port).into());
    let second = RunningController::start(&env, config).await?;
    let pk = wait_pk(&env, "k", "KeyringUnavailable", |pk| {
        is_condition(pk, "Ready", "False", "KeyringUnavailable")
    })
    .await?;
    let (_, _, message) = condition(&pk, "Ready").unwrap_or_default();
    assert!(message.contains("restore it from backup"), "{message}");
    assert!(
        secrets.get_opt(keyring_name).await?.is_none(),
        "a new keyring would make the old envelopes unreadable: none is created"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let gauge = format!(
        "byok_keyring_available{{secret=\"{}/{keyring_name}\"}} 0",
        env.namespace
    );
    assert!(metrics.contains(&gauge), "missing {gauge:?} in:\n{metrics}");

    // Restored from backup: the same operator recovers, no restart.
    let mut restored = saved.clone();
    restored.metadata = kube::api::ObjectMeta {
        name: saved.metadata.name.clone(),
        labels: saved.metadata.labels.clone(),
        ..Default::default()
    };
    secrets
        .create(&kube::api::PostParams::default(), &restored)
        .await?;
    wait_pk(&env, "k", "Ready again", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    assert_eq!(decrypt_managed(&env, "k", "k").await?, key);
    drop(second);
    Ok(())
}

#[tokio::test]
async fn an_operator_endpoint_change_reverifies_before_the_key_goes_there() -> anyhow::Result<()> {
    let env = TestEnv::new("endpoint").await?;
    install_crds(&env.client).await?;
    let first_fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let second_fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let key = random_key("sk-ant-api03-");
    first_fake.add_valid_key(ProviderKind::Anthropic, &key);
    second_fake.add_valid_key(ProviderKind::Anthropic, &key);
    put_secret(&env, "raw", &[("api-key", &key)]).await?;
    create_pk(
        &env,
        "k",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "raw"}}),
    )
    .await?;
    let ready = |pk: &ProviderKey| is_condition(pk, "Ready", "True", "Valid");
    let first = RunningController::start(&env, dev_config(&env, &first_fake)?).await?;
    wait_pk(&env, "k", "Ready", ready).await?;
    drop(first);
    let origin_of = |secret: &Secret| {
        secret.metadata.annotations.as_ref().and_then(|a| {
            a.get(byok_operator::names::annotations::VERIFIED_ORIGIN)
                .cloned()
        })
    };
    let managed_name = managed_secret_name("k");
    let secrets = env.api::<Secret>();
    let first_origin = origin_of(&secrets.get(&managed_name).await?);

    // An administrator points the operator at another Anthropic endpoint: the source key is
    // verified there before the managed Secret records the new destination.
    let second = RunningController::start(&env, dev_config(&env, &second_fake)?).await?;
    let deadline = Instant::now() + WAIT;
    while origin_of(&secrets.get(&managed_name).await?) == first_origin {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new destination was not recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // polling interval
    }
    let pk = wait_pk(&env, "k", "Ready", ready).await?;
    assert_eq!(second_fake.requests(ProviderKind::Anthropic), 1);
    assert_eq!(
        pk.status.and_then(|s| s.key_version),
        Some(1),
        "same key, same version"
    );
    drop(second);

    // Back to the first endpoint, but the source Secret is gone: the key in service, verified
    // only at the second endpoint, is not sent to the first.
    secrets.delete("raw", &DeleteParams::default()).await?;
    let calls_before = first_fake.requests(ProviderKind::Anthropic);
    let _third = RunningController::start(&env, dev_config(&env, &first_fake)?).await?;
    let pk = wait_pk(&env, "k", "DestinationChanged", |pk| {
        is_condition(pk, "Ready", "False", "DestinationChanged")
    })
    .await?;
    let (_, _, message) = condition(&pk, "Ready").unwrap_or_default();
    assert!(
        message.contains("not sent to the new destination"),
        "{message}"
    );
    assert_eq!(
        first_fake.requests(ProviderKind::Anthropic),
        calls_before,
        "no call with the key in service"
    );
    Ok(())
}
