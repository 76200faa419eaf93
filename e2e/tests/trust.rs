//! Issue 20 item 3: the sidecar's trust in the broker can change under a running pod, and
//! nobody but the operator can choose it. On the real API server: the chart's
//! ValidatingAdmissionPolicy against a namespace editor, and a lost CA Secret recovered by
//! running sidecars through their mounted bundle (the kubelet's refresh played by the test;
//! `pods.rs` measures the real kubelet's).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use byok_e2e::envtest::{TestEnv, shared};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::manifests::{chart_service_account_token, one};
use byok_e2e::operator::random_key;
use byok_e2e::serving::{ServingOperator, opted_in_pod, ready_anthropic, serving_ca_pem};
use byok_e2e::sidecar::serving_claude;
use byok_operator::names;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;

/// A client authenticating as a ServiceAccount of `env`'s namespace.
async fn client_as(env: &TestEnv, service_account: &str) -> anyhow::Result<kube::Client> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let sas: Api<ServiceAccount> = env.api();
    let token = sas
        .create_token_request(
            service_account,
            &PostParams::default(),
            &TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await?
        .status
        .and_then(|s| s.token)
        .context("no token")?;
    let config = kube::Config::from_custom_kubeconfig(
        shared().kubeconfig_for_token(&token),
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// A namespace editor: every verb on ConfigMaps and pods of `env`'s namespace.
async fn editor(env: &TestEnv) -> anyhow::Result<kube::Client> {
    let name = "editor";
    env.api::<ServiceAccount>()
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    env.api::<Role>()
        .create(
            &PostParams::default(),
            &Role {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["configmaps".into(), "pods".into()]),
                    verbs: vec!["*".into()],
                    ..Default::default()
                }]),
            },
        )
        .await?;
    env.api::<RoleBinding>()
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "Role".into(),
                    name: name.into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: name.into(),
                    namespace: Some(env.namespace.clone()),
                    ..Default::default()
                }]),
            },
        )
        .await?;
    client_as(env, name).await
}

fn bundle(pem: &str) -> ConfigMap {
    byok_operator::serving::trust_bundle::config_map("", pem)
}

/// Installs the chart's trust-bundle policy, its binding scoped to `env`'s namespace (tests
/// share one API server), named after it (left behind: it binds a namespace that goes).
struct Policy;

impl Policy {
    async fn install(env: &TestEnv, rendered: &[serde_json::Value]) -> anyhow::Result<Self> {
        let names = format!("trust-bundle-{}", env.namespace);
        let mut policy = one(rendered, "ValidatingAdmissionPolicy")?.clone();
        let mut binding = one(rendered, "ValidatingAdmissionPolicyBinding")?.clone();
        policy["metadata"]["name"] = names.clone().into();
        binding["metadata"]["name"] = names.clone().into();
        binding["spec"]["policyName"] = names.clone().into();
        binding["spec"]["matchResources"] = serde_json::json!({"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": env.namespace}}});
        for (object, plural, kind) in [
            (
                policy,
                "validatingadmissionpolicies",
                "ValidatingAdmissionPolicy",
            ),
            (
                binding,
                "validatingadmissionpolicybindings",
                "ValidatingAdmissionPolicyBinding",
            ),
        ] {
            let api: Api<DynamicObject> =
                Api::all_with(env.client.clone(), &resource(plural, kind));
            api.create(&PostParams::default(), &serde_json::from_value(object)?)
                .await?;
        }
        Ok(Self)
    }
}

fn resource(plural: &str, kind: &str) -> ApiResource {
    ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The chart's policy, on the real API server: a namespace editor can neither create, change
/// nor delete the namespace's trust bundle, by any verb; the operator's ServiceAccount can;
/// the editor's other ConfigMaps are untouched by it.
#[tokio::test]
async fn only_the_operator_writes_a_namespaces_trust_bundle() -> anyhow::Result<()> {
    let env = TestEnv::new("trust-vap").await?;
    let (operator_token, rendered) = chart_service_account_token(&env, "tb", &[]).await?;
    let _policy = Policy::install(&env, &rendered).await?;
    let attacker = editor(&env).await?;
    let theirs: Api<ConfigMap> = Api::namespaced(attacker.clone(), &env.namespace);
    let operator = {
        let config = kube::Config::from_custom_kubeconfig(
            shared().kubeconfig_for_token(&operator_token),
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        kube::Client::try_from(config)?
    };
    let ours: Api<ConfigMap> = Api::namespaced(operator, &env.namespace);
    let evil = "-----BEGIN CERTIFICATE-----\nattacker\n-----END CERTIFICATE-----\n";

    // A new policy takes a moment to be enforced: wait for the editor's dry-run create to be
    // refused (by the policy: its message names the bundle).
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        match theirs.create(&dry, &bundle(evil)).await {
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => break e,
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => anyhow::bail!("the policy is not enforced: {other:?}"),
        }
    };
    assert!(
        refusal.message.contains("byok-broker-ca") && refusal.message.contains("only the operator"),
        "{refusal:?}"
    );
    // Every way in, before the operator wrote one: create, apply.
    assert!(
        theirs
            .create(&PostParams::default(), &bundle(evil))
            .await
            .is_err()
    );
    let apply = |pem: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": names::TRUST_BUNDLE_CONFIGMAP}, "data": {"ca.crt": pem}})
    };
    assert!(
        theirs
            .patch(
                names::TRUST_BUNDLE_CONFIGMAP,
                &PatchParams::apply("attacker").force(),
                &Patch::Apply(apply(evil)),
            )
            .await
            .is_err()
    );
    // A generateName create is refused too only if it lands on the name: it cannot.
    // The operator writes it.
    let pem = "-----BEGIN CERTIFICATE-----\nreal\n-----END CERTIFICATE-----\n";
    ours.create(&PostParams::default(), &bundle(pem)).await?;
    // After: apply, merge patch, JSON patch, replace, delete, delete collection.
    let name = names::TRUST_BUNDLE_CONFIGMAP;
    assert!(
        theirs
            .patch(
                name,
                &PatchParams::apply("attacker").force(),
                &Patch::Apply(apply(evil))
            )
            .await
            .is_err()
    );
    assert!(
        theirs
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"data": {"ca.crt": evil}})),
            )
            .await
            .is_err()
    );
    let mut replaced = theirs.get(name).await?;
    replaced.data = Some([("ca.crt".to_owned(), evil.to_owned())].into());
    assert!(
        theirs
            .replace(name, &PostParams::default(), &replaced)
            .await
            .is_err()
    );
    assert!(theirs.delete(name, &DeleteParams::default()).await.is_err());
    let _ = theirs
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    let held = ours.get(name).await?;
    assert_eq!(
        held.data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(String::as_str),
        Some(pem),
        "the bundle changed"
    );
    // The editor's own ConfigMaps are theirs as before (deleted by the collection delete).
    let own = ConfigMap {
        metadata: ObjectMeta {
            name: Some("app-config".into()),
            ..Default::default()
        },
        data: Some([("ca.crt".to_owned(), evil.to_owned())].into()),
        ..Default::default()
    };
    theirs.create(&PostParams::default(), &own).await?;
    theirs
        .delete("app-config", &DeleteParams::default())
        .await?;
    // And the operator keeps it current.
    ours.patch(
        name,
        &PatchParams::apply(names::TRUST_BUNDLE_FIELD_MANAGER).force(),
        &Patch::Apply(apply(
            "-----BEGIN CERTIFICATE-----\nnew\n-----END CERTIFICATE-----\n",
        )),
    )
    .await?;
    Ok(())
}

/// Polls `check` every 100 ms until it holds, for at most `within`.
async fn until<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    loop {
        if check().await? {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A lost CA Secret (deleted with the operator down, as deleting its namespace would): the
/// restarted operator makes a new CA and writes it to the namespace's bundle; the running
/// sidecar rides out the change on its lease, and once its mounted bundle is refreshed it is
/// served again, without a restart. Every application request succeeds throughout.
#[tokio::test]
async fn a_lost_ca_reaches_a_running_sidecar_through_its_bundle() -> anyhow::Result<()> {
    let env = TestEnv::new("trust-lost").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let lease = Duration::from_secs(60);
    let op = ServingOperator::start_leased(&env, &fake, lease, None).await?;
    let sidecar = serving_claude(&env, &fake, &op, "lost-").await?;
    let first_ca = serving_ca_pem(&env).await?;

    // The application calls through the sidecar the whole time.
    let calls = byok_e2e::sidecar::AppCalls::start(&sidecar.url("claude"));

    // Lost: the operator stops, its Secret goes; it starts again at the same broker address.
    let broker = (op.config.broker_addr, op.config.broker_url.clone());
    op.stop().await?;
    let secrets: Api<Secret> = env.api();
    secrets
        .delete(
            byok_operator::serving::certs::DEFAULT_SECRET_NAME,
            &DeleteParams::default(),
        )
        .await?;
    let lost_at = Instant::now();
    let op = ServingOperator::start_leased(&env, &fake, lease, Some(broker)).await?;
    let second_ca = serving_ca_pem(&env).await?;
    anyhow::ensure!(second_ca != first_ca, "the CA did not change");
    let bundles: Api<ConfigMap> = env.api();
    until(
        Duration::from_secs(45),
        "the bundle follows the new CA",
        || {
            let bundles = bundles.clone();
            let second_ca = second_ca.clone();
            async move {
                let cm = bundles.get(names::TRUST_BUNDLE_CONFIGMAP).await?;
                Ok(cm
                    .data
                    .and_then(|d| d.get(names::TRUST_BUNDLE_KEY).cloned())
                    == Some(second_ca))
            }
        },
    )
    .await?;
    let published = lost_at.elapsed();
    // Until its mount is refreshed the sidecar cannot verify the new broker, and keeps the
    // key on its lease (the application sees nothing).
    let served_before =
        op.metrics.broker_answers("not_modified") + op.metrics.broker_answers("granted");
    // Cut off: its next poll fails to verify the new broker (so what follows is the bundle's
    // doing, not a CA that never changed).
    let failures = |out: &str| out.matches("asking the key broker failed").count();
    let failed_before = failures(&sidecar.output());
    until(
        Duration::from_secs(20),
        "the sidecar no longer verifies the broker",
        || {
            let now = failures(&sidecar.output());
            async move { Ok(now > failed_before) }
        },
    )
    .await?;
    assert!(
        sidecar.output().contains("invalid peer certificate"),
        "{}",
        sidecar.output()
    );
    // The kubelet's refresh.
    let trust = sidecar
        .trust_bundle
        .as_ref()
        .context("the sidecar mounts a bundle")?;
    trust.sync(&env).await?;
    let recovered = until(
        Duration::from_secs(30),
        "the sidecar is served again",
        || {
            let served =
                op.metrics.broker_answers("not_modified") + op.metrics.broker_answers("granted");
            let current = op.metrics.trust_bundle_pods("current");
            async move { Ok(served > served_before && current >= 1) }
        },
    )
    .await?;
    let (ok, failed) = calls.finish().await?;
    println!(
        "lost CA: new bundle published {:.1} s after the loss; sidecar served again {:.1} s after its mount was refreshed; {ok} requests, {} failed",
        published.as_secs_f64(),
        recovered.as_secs_f64(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 0);
    assert!(
        sidecar.output().contains("trust bundle changed"),
        "{}",
        sidecar.output()
    );
    Ok(())
}

/// The broker's answer to the pod's sidecar asking for key `claude`: status and body.
async fn ask(op: &ServingOperator, env: &TestEnv, token: &str) -> anyhow::Result<(u16, String)> {
    let url = format!("{}/v1/keys/{}/claude", op.broker_url(), env.namespace);
    let res = op
        .https_client(env)
        .await?
        .get(&url)
        .bearer_auth(token)
        .send()
        .await?;
    let status = res.status().as_u16();
    Ok((status, res.text().await.unwrap_or_default()))
}

/// A bundle the operator did not write (made before the policy guarded it, immutable so it
/// cannot be rewritten, naming another CA): no pod trusting it gets a key while it stands (a
/// transient refusal: 503, sidecars would keep a key they hold), and the operator deletes and
/// writes it again, after which the pod is served.
#[tokio::test]
async fn a_bundle_the_operator_did_not_write_gets_no_pod_a_key() -> anyhow::Result<()> {
    let env = TestEnv::new("trust-planted").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let mut planted = bundle("-----BEGIN CERTIFICATE-----\nattacker\n-----END CERTIFICATE-----\n");
    planted.immutable = Some(true);
    env.api::<ConfigMap>()
        .create(&PostParams::default(), &planted)
        .await?;
    // The key made Ready by a leader (no pod uses keys here yet: it leaves the bundle alone).
    let op = ServingOperator::start(&env, &fake).await?;
    ready_anthropic(
        &env,
        &fake,
        "claude",
        &random_key("sk-ant-"),
        serde_json::json!({}),
    )
    .await?;
    op.stop().await?;
    // A replica that never leads (another holds the lease), so nothing repairs the bundle
    // while the broker is asked.
    let lease = format!("held-{}", env.namespace);
    env.api::<k8s_openapi::api::coordination::v1::Lease>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": lease},
                "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 3600,
                    "renewTime": jiff::Timestamp::now().to_string()}
            }))?,
        )
        .await?;
    let follower = ServingOperator::start_with(&env, &fake, |config| {
        config.leader = Some(byok_operator::controller::leader::LeaderConfig {
            lease_name: lease.clone(),
            identity: "follower".into(),
        });
    })
    .await?;
    let pod = env
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &opted_in_pod("planted-", &["claude"]),
        )
        .await?;
    let token = byok_e2e::serving::pod_token(&env, "default", &pod, names::TOKEN_AUDIENCE).await?;
    // Refused while the planted bundle stands (the pod cache may lag its creation first).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = ask(&follower, &env, &token).await?;
        anyhow::ensure!(status != 200, "served while a planted bundle stood");
        if status == 503 && body.contains("trust bundle") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no trust-bundle refusal: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    follower.stop().await?;
    let op = ServingOperator::start(&env, &fake).await?;
    // The operator replaces it. The pod made while it stood may have mounted it (an immutable
    // one is never refreshed): it stays refused. A pod made after is served.
    let ca = serving_ca_pem(&env).await?;
    let replaced = until(
        Duration::from_secs(45),
        "the planted bundle is replaced",
        || {
            let cms = env.api::<ConfigMap>();
            let ca = ca.clone();
            async move {
                Ok(cms
                    .get_opt(names::TRUST_BUNDLE_CONFIGMAP)
                    .await?
                    .is_some_and(|cm| byok_operator::serving::trust_bundle::conforms(&cm, &ca)))
            }
        },
    )
    .await?;
    // Pods' creation times are whole seconds: the next pod is made once the clock has passed
    // the second after the replacement.
    let replaced_at: jiff::Timestamp = env
        .api::<ConfigMap>()
        .get(names::TRUST_BUNDLE_CONFIGMAP)
        .await?
        .metadata
        .annotations
        .and_then(|a| {
            a.get(byok_operator::serving::trust_bundle::REPLACED_AT_ANNOTATION)
                .cloned()
        })
        .context("the replacement is marked")?
        .parse()?;
    until(
        Duration::from_secs(5),
        "the clock passes the replacement's second",
        || {
            let passed = jiff::Timestamp::now().as_second() > replaced_at.as_second();
            async move { Ok(passed) }
        },
    )
    .await?;
    let fresh = env
        .api::<Pod>()
        .create(&PostParams::default(), &opted_in_pod("after-", &["claude"]))
        .await?;
    let fresh_token =
        byok_e2e::serving::pod_token(&env, "default", &fresh, names::TOKEN_AUDIENCE).await?;
    until(
        Duration::from_secs(15),
        "a pod made after the replacement is served",
        || async { Ok(ask(&op, &env, &fresh_token).await?.0 == 200) },
    )
    .await?;
    let (status, body) = ask(&op, &env, &token).await?;
    assert_eq!(status, 503, "the pod made with the planted bundle: {body}");
    assert!(body.contains("trust bundle"), "{body}");
    println!(
        "planted bundle replaced within {:.1} s",
        replaced.as_secs_f64()
    );
    Ok(())
}

/// A planned CA rotation (`byok-operator ca rotate`, or the CA nearing its end): the operator
/// serves the new certificate with the new CA issued by the old one, and publishes both CAs as
/// the bundle. A running sidecar whose mount still holds only the old CA keeps being served
/// (reported `outdated`), and once its mount is refreshed reports `current`; no application
/// request fails, and the pod is never restarted.
#[tokio::test]
async fn a_planned_ca_rotation_keeps_sidecars_with_the_old_bundle_served() -> anyhow::Result<()> {
    use byok_operator::serving::certs;
    let env = TestEnv::new("trust-rotate").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start_with(&env, &fake, |config| {
        if let Some(serve) = config.serving.as_mut()
            && let byok_operator::serve::TlsSource::Own(settings) = &mut serve.tls
        {
            // The Secret is read again every second (60 s in a cluster).
            settings.check_every = Duration::from_secs(1);
            // The serving certificate moves to the new CA 3 s after the rotation (3 min).
            settings.ca_switch_after = Duration::from_secs(3);
        }
    })
    .await?;
    let sidecar = serving_claude(&env, &fake, &op, "rotate-").await?;
    let old_ca = serving_ca_pem(&env).await?;
    let calls = byok_e2e::sidecar::AppCalls::start(&sidecar.url("claude"));

    let secrets: Api<Secret> = env.api();
    let rotated = certs::rotate_now(&secrets, certs::DEFAULT_SECRET_NAME).await?;
    anyhow::ensure!(rotated.ca_pem != old_ca, "the CA did not change");
    let trust = rotated.trust_pem();
    // The operator serves it and publishes both CAs.
    let bundles: Api<ConfigMap> = env.api();
    let published = until(Duration::from_secs(30), "the bundle holds both CAs", || {
        let (bundles, trust) = (bundles.clone(), trust.clone());
        async move {
            Ok(bundles
                .get_opt(names::TRUST_BUNDLE_CONFIGMAP)
                .await?
                .is_some_and(|cm| byok_operator::serving::trust_bundle::conforms(&cm, &trust)))
        }
    })
    .await?;
    // Then the serving certificate moves to the new CA: a client trusting only the new CA
    // completes TLS with the broker (any HTTP answer).
    let new_only = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(rotated.ca_pem.as_bytes())?])
        .build()?;
    let broker_url = op.broker_url().to_owned();
    until(
        Duration::from_secs(30),
        "the serving certificate moves to the new CA",
        || {
            let (http, url) = (new_only.clone(), broker_url.clone());
            async move { Ok(http.get(&url).send().await.is_ok()) }
        },
    )
    .await?;
    let served_at_switch =
        op.metrics.broker_answers("not_modified") + op.metrics.broker_answers("granted");
    // The sidecar, its mount not refreshed (old CA only), is served by the new certificate
    // (through the cross-signed one).
    let outdated_served = until(
        Duration::from_secs(30),
        "served with the old bundle after the switch",
        || {
            let served =
                op.metrics.broker_answers("not_modified") + op.metrics.broker_answers("granted");
            let n = op.metrics.trust_bundle_pods("outdated");
            async move { Ok(n >= 1 && served > served_at_switch + 1) }
        },
    )
    .await?;
    let held = std::fs::read_to_string(&sidecar.trust_bundle.as_ref().context("bundle")?.path)?;
    anyhow::ensure!(held == old_ca, "the sidecar's bundle was refreshed already");
    // Then the kubelet refreshes it.
    sidecar
        .trust_bundle
        .as_ref()
        .context("bundle")?
        .sync(&env)
        .await?;
    until(
        Duration::from_secs(30),
        "served with the new bundle",
        || {
            let n = op.metrics.trust_bundle_pods("current");
            async move { Ok(n >= 1) }
        },
    )
    .await?;
    let (ok, failed) = calls.finish().await?;
    println!(
        "planned CA rotation: bundle with both CAs published {:.1} s after, the sidecar with the old bundle served {:.1} s after that; {ok} requests, {} failed",
        published.as_secs_f64(),
        outdated_served.as_secs_f64(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    Ok(())
}

/// A planned CA rotation with two replicas, one reading the Secret every second and one every
/// 10 s (60 s in a cluster), the certificate switching 15 s after the rotation: at every
/// moment, both replicas' brokers complete TLS with a sidecar holding only the old CA and with
/// one holding the new bundle (both CAs), and the API server (Go's verifier) reaches the
/// webhook for every pod admission. After the switch both serve the new CA's certificate.
#[tokio::test]
async fn two_replicas_rotating_the_ca_are_verified_by_every_bundle_throughout() -> anyhow::Result<()>
{
    use byok_e2e::operator::{RunningController, dev_config, install_crds};
    use byok_e2e::serving::{create_dry_run, register_webhook, serve_config};
    use byok_operator::serve::TlsSource;
    use byok_operator::serving::certs;
    let env = TestEnv::new("trust-replicas").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    install_crds(&env.client).await?;
    let name = format!("byok-{}", env.namespace);
    const SWITCH: Duration = Duration::from_secs(15);
    let replica =
        |identity: &str, check: Duration| -> anyhow::Result<byok_operator::startup::Config> {
            let mut config = dev_config(&env, &fake)?;
            let mut serve = serve_config(&env, &name)?;
            if let TlsSource::Own(settings) = &mut serve.tls {
                settings.check_every = check;
                settings.ca_switch_after = SWITCH;
            }
            config.serving = Some(serve);
            if let Some(leader) = config.leader.as_mut() {
                leader.identity = identity.to_string();
            }
            Ok(config)
        };
    let a = replica("replica-a", Duration::from_secs(1))?;
    let b = replica("replica-b", Duration::from_secs(10))?;
    let brokers: Vec<String> = [&a, &b]
        .iter()
        .filter_map(|c| c.serving.as_ref().map(|s| s.broker_url.clone()))
        .collect();
    let webhook_addr = a.serving.as_ref().context("serving")?.webhook_addr;
    register_webhook(&env, &name, webhook_addr).await?;
    let (ra, rb) = tokio::join!(
        RunningController::start(&env, a),
        RunningController::start(&env, b)
    );
    let (_ra, _rb) = (ra?, rb?);
    let pod = opted_in_pod("admitted-", &["claude"]);
    until(Duration::from_secs(30), "the webhook answers", || async {
        Ok(create_dry_run(&env, &pod).await.is_ok())
    })
    .await?;

    let old_ca = serving_ca_pem(&env).await?;
    let client = |pem: &str| {
        reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(pem.as_bytes())?)
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(anyhow::Error::from)
    };
    let old_only = client(&old_ca)?;
    let secrets: Api<Secret> = env.api();
    let rotated = certs::rotate_now(&secrets, certs::DEFAULT_SECRET_NAME).await?;
    let started = Instant::now();
    let both = client(&rotated.trust_pem())?;
    let new_only = client(&rotated.ca_pem)?;
    let (mut failures, mut probes, mut admissions) = (Vec::new(), 0u32, 0u32);
    let mut switched_at = None;
    while started.elapsed() < SWITCH + Duration::from_secs(20) {
        for broker in &brokers {
            for (who, http) in [("old bundle", &old_only), ("new bundle", &both)] {
                probes += 1;
                if let Err(e) = http.get(broker.as_str()).send().await {
                    failures.push(format!(
                        "{:.1}s {who} -> {broker}: {e}",
                        started.elapsed().as_secs_f64()
                    ));
                }
            }
        }
        admissions += 1;
        if let Err(e) = create_dry_run(&env, &pod).await {
            failures.push(format!(
                "{:.1}s admission: {e}",
                started.elapsed().as_secs_f64()
            ));
        }
        if switched_at.is_none() {
            let mut all = true;
            for broker in &brokers {
                all &= new_only.get(broker.as_str()).send().await.is_ok();
            }
            if all {
                switched_at = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let switched_at = switched_at.context("the replicas never served the new CA's certificate")?;
    println!(
        "CA rotation, two replicas: {probes} TLS probes and {admissions} admissions, {} failed; both replicas on the new CA's certificate {:.1} s after the rotation",
        failures.len(),
        switched_at.as_secs_f64()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        switched_at >= SWITCH,
        "switched before the replicas converged: {switched_at:?}"
    );
    Ok(())
}
