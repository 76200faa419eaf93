//! The serving certificate machinery against the real kube-apiserver: replicas racing on a
//! fresh install share one CA, renewal keeps the CA, a broken CA is never replaced, and the
//! webhook caBundle is owned by its own field manager.

use std::sync::Arc;
use std::time::{Duration, Instant};

use byok_e2e::envtest::TestEnv;
use byok_operator::serving::certs::{CA_KEY, CertError, CertSettings};
use byok_operator::serving::{Bundle, CA_BUNDLE_FIELD_MANAGER, apply_ca_bundle, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

const SAN: &str = "byok-operator.byok-system.svc";

fn settings(env: &TestEnv) -> CertSettings {
    CertSettings::new(env.namespace.clone(), vec![SAN.into(), "127.0.0.1".into()])
}

/// Whether `ca_pem` alone validates `bundle`'s chain for `name` now.
fn validates(ca_pem: &str, bundle: &Bundle, name: &str) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(bundle.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()?;
    let (leaf, rest) = chain.split_first().ok_or(anyhow::anyhow!("empty chain"))?;
    verifier.verify_server_cert(
        leaf,
        rest,
        &ServerName::try_from(name.to_string())?,
        &[],
        UnixTime::now(),
    )?;
    Ok(())
}

async fn managed_secrets(env: &TestEnv) -> anyhow::Result<usize> {
    let list = env
        .api::<Secret>()
        .list_metadata(&ListParams::default().labels("app.kubernetes.io/managed-by=byok-operator"))
        .await?;
    Ok(list.items.len())
}

#[tokio::test]
async fn replicas_starting_together_end_up_with_one_ca() -> anyhow::Result<()> {
    let env = TestEnv::new("certs-race").await?;
    let s = settings(&env);
    // One client per "replica", so the requests really are concurrent.
    let mut apis = Vec::new();
    for _ in 0..4 {
        let client = byok_e2e::envtest::shared().client().await?;
        apis.push(Api::<Secret>::namespaced(client, &env.namespace));
    }
    let bundles = futures::future::try_join_all(apis.iter().map(|api| ensure(api, &s))).await?;

    for b in &bundles[1..] {
        assert_eq!(b.ca_pem, bundles[0].ca_pem, "every replica has the same CA");
        assert_eq!(b.cert_chain_pem, bundles[0].cert_chain_pem);
    }
    assert_eq!(managed_secrets(&env).await?, 1);
    let stored = env.api::<Secret>().get(&s.secret_name).await?;
    assert_eq!(stored.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = stored.data.unwrap_or_default();
    for key in ["tls.crt", "tls.key", "ca.crt", "ca.key"] {
        assert!(data.contains_key(key), "{key} is stored");
    }
    assert_eq!(data["ca.crt"].0, bundles[0].ca_pem.as_bytes());
    validates(&bundles[0].ca_pem, &bundles[0], SAN)?;
    validates(&bundles[0].ca_pem, &bundles[0], "127.0.0.1")?;

    // A restart with the Secret in place changes nothing.
    let again = ensure(&env.api(), &s).await?;
    assert!(again.same_certs(&bundles[0]));
    Ok(())
}

#[tokio::test]
async fn a_due_serving_certificate_is_renewed_from_the_same_ca() -> anyhow::Result<()> {
    let env = TestEnv::new("certs-renew").await?;
    let mut s = settings(&env);
    s.serving_validity = Duration::from_secs(4);
    s.renew_before = Duration::from_secs(2);
    let api: Api<Secret> = env.api();
    let first = ensure(&api, &s).await?;

    // Due two seconds after issue: poll until a replica renews it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let renewed = loop {
        let other: Api<Secret> = env.api();
        // Two replicas checking at the same moment agree on the result.
        let (a, b) = tokio::try_join!(ensure(&api, &s), ensure(&other, &s))?;
        assert!(
            a.same_certs(&b),
            "concurrent renewals end with one certificate"
        );
        if !a.same_certs(&first) {
            break a;
        }
        anyhow::ensure!(Instant::now() < deadline, "the certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(250)).await; // poll interval
    };
    assert_eq!(renewed.ca_pem, first.ca_pem, "renewal keeps the CA");
    assert!(renewed.not_after > first.not_after);
    validates(&first.ca_pem, &renewed, SAN)?;
    assert_eq!(managed_secrets(&env).await?, 1);
    let stored = api.get(&s.secret_name).await?.data.unwrap_or_default();
    assert_eq!(stored["tls.crt"].0, renewed.cert_chain_pem.as_bytes());
    assert_eq!(stored["ca.crt"].0, first.ca_pem.as_bytes());
    Ok(())
}

#[tokio::test]
async fn a_secret_with_a_broken_ca_key_is_an_error_and_left_alone() -> anyhow::Result<()> {
    let env = TestEnv::new("certs-broken").await?;
    let s = settings(&env);
    let api: Api<Secret> = env.api();
    ensure(&api, &s).await?;
    let mut secret = api.get(&s.secret_name).await?;
    secret.data.get_or_insert_default().insert(
        CA_KEY.into(),
        ByteString(
            b"-----BEGIN PRIVATE KEY-----\nZ2FyYmxlZA==\n-----END PRIVATE KEY-----\n".to_vec(),
        ),
    );
    secret.metadata.managed_fields = None;
    let before = api
        .replace(&s.secret_name, &Default::default(), &secret)
        .await?;

    let err = ensure(&api, &s).await.expect_err("a broken CA is an error");
    assert!(matches!(err, CertError::UnusableCa { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&s.secret_name) && message.contains("ca.key"),
        "{message}"
    );
    assert!(!message.contains("Z2FyYmxlZA"), "{message}");
    let after = api.get(&s.secret_name).await?;
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "not replaced"
    );
    Ok(())
}

fn chart_configuration(name: &str, label: &str) -> serde_json::Value {
    let webhook = |hook: &str| {
        serde_json::json!({
            "name": hook,
            "clientConfig": {"url": "https://127.0.0.1:1/mutate"},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Ignore",
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
            "objectSelector": {"matchLabels": {"byok-e2e-certs-never": "true"}},
        })
    };
    serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"revision": label}},
        "webhooks": [webhook("pods.byok.dev"), webhook("other.byok.dev")],
    })
}

#[tokio::test]
async fn the_ca_bundle_survives_the_installer_reapplying_without_it() -> anyhow::Result<()> {
    let env = TestEnv::new("certs-cabundle").await?;
    let name = format!("byok-e2e-{}", env.namespace);
    let api: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    let chart = PatchParams::apply("e2e-chart");
    api.patch(
        &name,
        &chart,
        &Patch::Apply(chart_configuration(&name, "1")),
    )
    .await?;

    let result = async {
        let bundle = ensure(&env.api(), &settings(&env)).await?;
        apply_ca_bundle(&env.client, &name, &bundle.ca_pem).await?;
        let has_bundle = |config: &MutatingWebhookConfiguration| {
            let hooks = config.webhooks.clone().unwrap_or_default();
            hooks.len() == 2
                && hooks.iter().all(|w| {
                    w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())
                        == Some(bundle.ca_pem.as_bytes())
                        && w.client_config.url.as_deref() == Some("https://127.0.0.1:1/mutate")
                })
        };
        let set = api.get(&name).await?;
        assert!(
            has_bundle(&set),
            "caBundle set, the rest untouched: {set:?}"
        );
        let managers: Vec<String> = set
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.manager)
            .collect();
        assert!(
            managers.iter().any(|m| m == CA_BUNDLE_FIELD_MANAGER),
            "{managers:?}"
        );

        // The installer applies its object again (a new revision), still without caBundle.
        let reapplied = api
            .patch(
                &name,
                &chart,
                &Patch::Apply(chart_configuration(&name, "2")),
            )
            .await?;
        assert_ne!(
            reapplied.metadata.resource_version,
            set.metadata.resource_version
        );
        assert!(
            has_bundle(&reapplied),
            "the installer's apply leaves the caBundle"
        );

        // A restart with the same CA writes nothing.
        apply_ca_bundle(&env.client, &name, &bundle.ca_pem).await?;
        let after = api.get(&name).await?;
        assert_eq!(
            after.metadata.resource_version, reapplied.metadata.resource_version,
            "no write when the caBundle is current"
        );

        // A missing configuration is named in the error.
        let missing = format!("{name}-missing");
        let err = apply_ca_bundle(&env.client, &missing, &bundle.ca_pem)
            .await
            .expect_err("missing configuration");
        assert!(err.to_string().contains(&missing), "{err}");
        anyhow::Ok(())
    }
    .await;
    api.delete(&name, &DeleteParams::default()).await?;
    result
}

#[tokio::test]
async fn keep_current_swaps_in_a_renewed_certificate() -> anyhow::Result<()> {
    use byok_operator::serving::{ReloadableCert, keep_current};
    let env = TestEnv::new("certs-loop").await?;
    let mut s = settings(&env);
    s.serving_validity = Duration::from_secs(4);
    s.renew_before = Duration::from_secs(2);
    s.check_every = Duration::from_secs(1);
    let api: Api<Secret> = env.api();
    let first = ensure(&api, &s).await?;
    let resolver = Arc::new(ReloadableCert::new(&first)?);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(keep_current(
        api,
        s,
        resolver.clone(),
        Default::default(),
        move |b: &Bundle| {
            let _ = tx.send(b.clone());
        },
    ));
    let changed = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await?
        .ok_or(anyhow::anyhow!("the loop ended"))?;
    task.abort();
    assert!(!changed.same_certs(&first));
    assert_eq!(changed.ca_pem, first.ca_pem);
    assert!(resolver.serves(&changed));
    Ok(())
}
