//! The operator as the chart runs it: the real binary with the arguments of the chart's
//! Deployment (default values), as the chart's ServiceAccount holding exactly the chart's
//! RBAC, behind the chart's webhook configuration. Only what a test machine cannot have is
//! changed: loopback listen addresses instead of a pod IP and a Service, and the fake
//! provider's endpoints. It goes through the happy path of the controller and the webhook:
//! a key verified and encrypted, the caBundle set, a pod injected, the key served to it.

use std::process::{Command, Stdio};

use anyhow::Context as _;
use byok_e2e::envtest::{TestEnv, shared};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::manifests::{chart_service_account_token, one};
use byok_e2e::operator::*;
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;

/// The chart's args with the listen addresses moved to loopback ports.
fn local_args(chart_args: &[String], ports: (u16, u16, u16)) -> Vec<String> {
    let (admin, webhook, broker) = ports;
    let mut args: Vec<String> = chart_args
        .iter()
        .filter(|a| {
            !["--admin-addr=", "--webhook-addr=", "--broker-addr="]
                .iter()
                .any(|flag| a.starts_with(flag))
        })
        .cloned()
        .collect();
    args.extend([
        format!("--admin-addr=127.0.0.1:{admin}"),
        format!("--webhook-addr=127.0.0.1:{webhook}"),
        format!("--broker-addr=127.0.0.1:{broker}"),
        // Sidecars would use the Service's DNS name; here the broker is on loopback.
        format!("--broker-url=https://127.0.0.1:{broker}"),
    ]);
    args
}

/// `shutdownDelaySeconds` for this test.
const SHUTDOWN_DELAY: std::time::Duration = std::time::Duration::from_secs(10);

#[tokio::test]
async fn the_operator_runs_with_the_charts_arguments_and_rbac() -> anyhow::Result<()> {
    let operator_ns = TestEnv::new("chart-op").await?;
    let tenant = TestEnv::new("chart-tenant").await?;
    install_crds(&operator_ns.client).await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let release = "chart";
    // A shutdown delay longer than the chart's default, so the checks of the drain below
    // fit inside it on a busy machine.
    let (token, rendered) = chart_service_account_token(
        &operator_ns,
        release,
        &[format!("shutdownDelaySeconds={}", SHUTDOWN_DELAY.as_secs())],
    )
    .await?;
    let fullname = format!("{release}-byok-operator");

    let deployment = one(&rendered, "Deployment")?;
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let chart_args: Vec<String> = container["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    let (admin, webhook, broker) = (free_port()?, free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("byok-chart-{}", operator_ns.namespace));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    byok_e2e::envtest::write_kubeconfig(&shared().kubeconfig_for_token(&token), &kubeconfig)?;
    let ca = dir.join("fake-ca.pem");
    std::fs::write(&ca, fake.ca_pem())?;
    let log = dir.join("operator.log");

    let mut cmd = Command::new(operator_binary()?);
    cmd.args(local_args(&chart_args, (admin, webhook, broker)))
        .args(["--insecure-allow-private-base-urls", "--extra-ca-file"])
        .arg(&ca);
    for p in [ProviderKind::Anthropic, ProviderKind::OpenAI] {
        cmd.args(["--provider-endpoint", &format!("{p}={}", fake.base_url(p))]);
    }
    // The Deployment's environment: the downward API gives the namespace and pod name.
    cmd.env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", &operator_ns.namespace)
        .env("POD_NAME", format!("{fullname}-7d9f-abcde"))
        .env("BYOK_LOG", "info")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let mut operator = OperatorProcess(cmd.spawn()?);

    // The controller: a key verified, encrypted and put in service.
    let key = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &key);
    put_secret(&tenant, "anthropic-raw", &[("api-key", &key)]).await?;
    create_pk(
        &tenant,
        "anthropic",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "anthropic-raw"}}),
    )
    .await?;
    wait_pk(&tenant, "anthropic", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await
    .with_context(|| format!("operator log: {}", log.display()))?;

    // Leader election with the chart's Lease name.
    let lease = operator_ns.api::<Lease>().get(&fullname).await?;
    assert!(
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .is_some_and(|h| h.starts_with(&fullname)),
        "the chart's replica holds the chart's Lease"
    );

    // The webhook, through the chart's own configuration (only its clientConfig points at
    // loopback): the operator sets its caBundle, a pod is injected, the broker serves the key.
    let mut mwc: MutatingWebhookConfiguration =
        serde_json::from_value(one(&rendered, "MutatingWebhookConfiguration")?.clone())?;
    // Without token.byok.dev: the test mints the sidecar's token itself, as an admin (that
    // webhook's own test is webhook.rs `only_nodes_may_mint_broker_tokens`).
    mwc.webhooks
        .get_or_insert_with(Vec::new)
        .retain(|w| w.name != byok_e2e::serving::TOKEN_WEBHOOK);
    for hook in mwc.webhooks.iter_mut().flatten() {
        hook.client_config.service = None;
        hook.client_config.url = Some(format!("https://127.0.0.1:{webhook}/mutate"));
    }
    let served = byok_e2e::serving::broker_serves(
        &tenant,
        mwc,
        (&operator_ns.namespace, &format!("{fullname}-tls")),
        broker,
        ("anthropic", &key),
        "openai",
    )
    .await
    .with_context(|| format!("operator log: {}", log.display()))?;
    assert!(served.contains(&key));

    // The webhook's random path: written into the configuration only once the operator's
    // Deployment has rolled out (replicas of an older release serve only `/mutate`). Until
    // then `/mutate` keeps working (the pod above was injected through it).
    let paths = byok_e2e::serving::configured_paths(&tenant.client, &fullname).await?;
    assert!(
        paths.iter().all(|p| p == "/mutate"),
        "published before the Deployment rolled out: {paths:?}"
    );
    // What the Deployment controller would have made: the Deployment at revision 1, its
    // ReplicaSet, and this replica's pod (POD_NAME) of that ReplicaSet.
    let mut deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(deployment.clone())?;
    deployment.metadata.namespace = Some(operator_ns.namespace.clone());
    let revision = || {
        Some(std::collections::BTreeMap::from([(
            "deployment.kubernetes.io/revision".to_owned(),
            "1".to_owned(),
        )]))
    };
    deployment.metadata.annotations = revision();
    let mut template = deployment.spec.template.clone();
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert("pod-template-hash".into(), "7d9f".into());
    let mut selector = deployment.spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert("pod-template-hash".into(), "7d9f".into());
    let replica_set = k8s_openapi::api::apps::v1::ReplicaSet {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{fullname}-7d9f")),
            annotations: revision(),
            ..Default::default()
        },
        spec: k8s_openapi::api::apps::v1::ReplicaSetSpec {
            selector,
            template: Some(template.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    operator_ns
        .api::<k8s_openapi::api::apps::v1::ReplicaSet>()
        .create(&kube::api::PostParams::default(), &replica_set)
        .await?;
    let pod = k8s_openapi::api::core::v1::Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{fullname}-7d9f-abcde")),
            ..template.metadata.clone().unwrap_or_default()
        },
        spec: template.spec.clone(),
        ..Default::default()
    };
    operator_ns
        .api::<k8s_openapi::api::core::v1::Pod>()
        .create(&kube::api::PostParams::default(), &pod)
        .await?;
    let deployments = operator_ns.api::<k8s_openapi::api::apps::v1::Deployment>();
    let created = deployments
        .create(&kube::api::PostParams::default(), &deployment)
        .await?;
    // No controller-manager here: report the rollout done, as it would.
    let replicas = created.spec.replicas.unwrap_or(1);
    deployments
        .patch_status(
            &fullname,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {
                "observedGeneration": created.metadata.generation,
                "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas,
            }})),
        )
        .await?;
    let path = byok_e2e::serving::webhook_path(&operator_ns, &format!("{fullname}-tls")).await?;
    assert!(
        byok_operator::serving::webhook_path::is_valid(&path),
        "{path}"
    );
    let deadline =
        tokio::time::Instant::now() + WAIT + byok_operator::serving::webhook_path::PUBLISH_AFTER;
    loop {
        let paths = byok_e2e::serving::configured_paths(&tenant.client, &fullname).await?;
        if paths.iter().all(|p| *p == path) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the path was never published: {paths:?}; operator log: {}",
            log.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let injected = byok_e2e::serving::create_dry_run(
        &tenant,
        &byok_e2e::serving::opted_in_pod("at-path-", &["anthropic"]),
    )
    .await?;
    assert!(
        byok_e2e::serving::has_sidecar(&injected),
        "the API server follows the published path"
    );

    // The keyring the chart names, generated on this first install.
    let keyring = operator_ns
        .api::<k8s_openapi::api::core::v1::Secret>()
        .get(&format!("{fullname}-keyring"))
        .await?;
    assert_eq!(
        keyring.metadata.annotations.unwrap_or_default()["helm.sh/resource-policy"],
        "keep"
    );

    // SIGTERM, as the kubelet stops a replica: it serves on (webhook and broker) for the
    // chart's shutdownDelaySeconds, not ready, then stops.
    let stop_asked = tokio::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(operator.0.id())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    loop {
        let answer = reqwest::get(&readyz).await?;
        let status = answer.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            && answer.text().await?.contains("shutting down")
        {
            break;
        }
        anyhow::ensure!(
            stop_asked.elapsed() < SHUTDOWN_DELAY,
            "/readyz still {status} after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let injected = byok_e2e::serving::create_dry_run(
        &tenant,
        &byok_e2e::serving::opted_in_pod("draining-", &["anthropic"]),
    )
    .await?;
    assert!(
        byok_e2e::serving::has_sidecar(&injected),
        "a stopping replica still serves the webhook during its shutdown delay"
    );
    // The broker too: a new connection is answered (401: no token), not refused.
    let broker_answer = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()?
        .get(format!(
            "https://127.0.0.1:{broker}/v1/keys/{}/anthropic",
            tenant.namespace
        ))
        .send()
        .await?;
    assert!(
        broker_answer.status().is_client_error(),
        "the broker during the drain: {}",
        broker_answer.status()
    );
    assert!(
        stop_asked.elapsed() < SHUTDOWN_DELAY,
        "the calls above must fall within the delay to prove anything"
    );
    let status = loop {
        if let Some(status) = operator.0.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            stop_asked.elapsed() < SHUTDOWN_DELAY + std::time::Duration::from_secs(15),
            "the operator did not stop within the delay and 15 s of SIGTERM; log: {}",
            log.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let stopped_after = stop_asked.elapsed();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        stopped_after >= SHUTDOWN_DELAY,
        "stopped {stopped_after:?} after SIGTERM, before the shutdown delay"
    );
    eprintln!("stopped {stopped_after:?} after SIGTERM (shutdownDelaySeconds {SHUTDOWN_DELAY:?})");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
