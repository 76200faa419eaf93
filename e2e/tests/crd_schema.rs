//! Helm installs a chart's CRDs once and never upgrades them. An operator started against an
//! older ProviderKey CRD must say so (error log, Warning Event `CRDOutOfDate` on the CRD,
//! `byok_crd_schema_current 0`) and not reconcile, so a new schema rule or field never goes
//! missing silently; once the current CRD is applied it carries on by itself.
//!
//! Its own test binary: it changes the cluster-wide CRD, which other tests rely on.

use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::controller::crd_check::CRD_OUT_OF_DATE;
use byok_operator::crdgen::{SCHEMA_DIGEST_ANNOTATION, crd};
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};

/// The current CRD, carrying `digest` as its schema digest.
async fn apply_crd_with_digest(client: &kube::Client, digest: &str) -> anyhow::Result<()> {
    let mut crd = crd();
    crd.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(SCHEMA_DIGEST_ANNOTATION.into(), digest.into());
    apply_crd(client, &crd).await
}

#[tokio::test]
async fn an_older_crd_stops_reconciling_until_the_current_one_is_applied() -> anyhow::Result<()> {
    let env = TestEnv::new("crd-schema").await?;
    // The CRD of an older release: same served shape, another digest.
    apply_crd_with_digest(&env.client, "sha256:from-an-older-release").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let key = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &key);
    put_secret(&env, "anthropic-raw", &[("api-key", &key)]).await?;
    create_pk(
        &env,
        "anthropic",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "anthropic-raw"}}),
    )
    .await?;

    let config = dev_config(&env, &fake)?;
    let metrics = config.metrics.clone();
    // Not RunningController::start: that installs the current CRD first.
    let _controller = RunningController::start_with_client(env.client.clone(), config);

    // The Event (cluster-scoped objects' Events live in `default`) names both digests and the fix.
    let events: Api<Event> = Api::namespaced(env.client.clone(), "default");
    let deadline = std::time::Instant::now() + WAIT;
    let note = loop {
        let found = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(CRD_OUT_OF_DATE)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some("providerkeys.byok.dev")
            });
        if let Some(event) = found {
            break event.note.unwrap_or_default();
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no CRDOutOfDate Event"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // polling interval
    };
    assert!(note.contains("sha256:from-an-older-release"), "{note}");
    assert!(note.contains("kubectl apply --server-side"), "{note}");
    assert!(
        metrics.encode().contains("byok_crd_schema_current 0"),
        "the gauge says the schema is stale"
    );
    // The check runs before the first reconcile: the ProviderKey was not touched.
    let pk = env
        .api::<byok_operator::crd::ProviderKey>()
        .get("anthropic")
        .await?;
    assert!(pk.status.is_none(), "reconciled against a stale CRD");
    assert!(
        pk.metadata.finalizers.is_none(),
        "reconciled against a stale CRD"
    );

    // The upgrade step the docs give: apply the current CRD. Reconciling resumes by itself.
    apply_crd_with_digest(&env.client, &byok_operator::crdgen::expected_digest()).await?;
    wait_pk(&env, "anthropic", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    assert!(metrics.encode().contains("byok_crd_schema_current 1"));
    Ok(())
}
