//! The admission webhook, called by the real kube-apiserver over TLS (registered by `url`,
//! its `caBundle` set by the operator), and what every replica serves.

use std::time::Duration;

use anyhow::Context as _;
use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_e2e::serving::*;
use byok_operator::providers::ProviderKind;
use byok_operator::serve::TlsSource;
use byok_operator::webhook::patch::{SIDECAR_NAME, TOKEN_VOLUME};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};

fn env_of(c: &Container) -> std::collections::BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

fn init_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map(|c| c.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

fn container<'a>(pod: &'a Pod, name: &str) -> anyhow::Result<&'a Container> {
    let spec = pod.spec.as_ref().context("no spec")?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .with_context(|| format!("no container {name}"))
}

async fn ready_key(env: &TestEnv, fake: &FakeProvider, name: &str) -> anyhow::Result<()> {
    let key = random_key("sk-ant-api03-");
    ready_anthropic(env, fake, name, &key, serde_json::json!({})).await?;
    Ok(())
}

async fn create(env: &TestEnv, pod: &Pod) -> Result<Pod, kube::Error> {
    env.api::<Pod>().create(&PostParams::default(), pod).await
}

/// Sends `pod` through the webhook once more, as the API server would on reinvocation, and
/// returns the patch it answers with (`None`: no patch).
async fn second_pass(
    op: &ServingOperator,
    env: &TestEnv,
    pod: &Pod,
) -> anyhow::Result<Option<String>> {
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": env.namespace,
            "operation": "CREATE",
            "userInfo": {"username": "e2e"},
            "object": pod,
            "dryRun": false,
        }
    });
    let http = op.https_client(env).await?;
    let answer: serde_json::Value = http
        .post(op.webhook_url(env).await?)
        .json(&review)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(
        answer["response"]["allowed"] == true,
        "second pass refused: {answer}"
    );
    Ok(answer["response"]["patch"].as_str().map(str::to_string))
}

#[tokio::test]
async fn an_opted_in_pod_gets_exactly_one_sidecar_and_its_variables() -> anyhow::Result<()> {
    let env = TestEnv::new("inject").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    ready_key(&env, &fake, "team-a").await?;
    ready_key(&env, &fake, "team-b").await?;

    // No API call on the admission path: what the webhook reads comes from caches.
    let reads = |m: &byok_operator::metrics::Metrics| {
        [
            ("get", "providerkeys"),
            ("list", "providerkeys"),
            ("get", "pods"),
            ("list", "pods"),
        ]
        .map(|(verb, resource)| m.api_requests(verb, resource))
    };
    let before = reads(&op.metrics);

    // One key, from generateName.
    let pod = create(&env, &opted_in_pod("one-", &["team-a"])).await?;
    assert!(
        pod.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("one-"))
    );
    assert_eq!(init_names(&pod), [SIDECAR_NAME]);
    let sidecar = container(&pod, SIDECAR_NAME)?;
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image.as_deref(), Some(TEST_PROXY_IMAGE));
    let sc = sidecar
        .security_context
        .as_ref()
        .context("sidecar securityContext")?;
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert!(sidecar.startup_probe.is_some(), "startup probe on /readyz");
    assert!(
        sidecar
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == TOKEN_VOLUME),
        "the sidecar mounts its token"
    );
    let app = container(&pod, "app")?;
    assert!(
        !app.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == TOKEN_VOLUME),
        "the app never mounts the token"
    );
    let vars = env_of(app);
    assert_eq!(vars["ANTHROPIC_BASE_URL"], "http://127.0.0.1:15100");
    assert_eq!(vars["ANTHROPIC_API_KEY"], "byok-proxy");
    assert_eq!(vars["BYOK_TEAM_A_BASE_URL"], "http://127.0.0.1:15100");
    let volume = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == TOKEN_VOLUME))
        .context("token volume")?;
    let token = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.iter().find_map(|s| s.service_account_token.clone()))
        .context("projected token")?;
    assert_eq!(token.audience.as_deref(), Some("byok.dev"));
    assert_eq!(token.expiration_seconds, Some(600));
    // A second pass (reinvocation) changes nothing.
    let again = second_pass(&op, &env, &pod).await?;
    assert!(
        again.is_none() || again.as_deref() == Some("W10="),
        "second pass patched: {again:?}"
    );

    // Two keys of one provider: both reachable, the SDK variable points at the first.
    let pod = create(&env, &opted_in_pod("two-", &["team-a", "team-b"])).await?;
    assert_eq!(sidecars(&pod), 1);
    let vars = env_of(container(&pod, "app")?);
    assert_eq!(vars["ANTHROPIC_BASE_URL"], "http://127.0.0.1:15100");
    assert_eq!(vars["BYOK_TEAM_A_BASE_URL"], "http://127.0.0.1:15100");
    assert_eq!(vars["BYOK_TEAM_B_BASE_URL"], "http://127.0.0.1:15101");

    // A mesh's native sidecar stays first; a regular init container after ours gets the
    // variables, the mesh sidecar does not; a variable the user set is left alone.
    let mut meshed = opted_in_pod("mesh-", &["team-a"]);
    let spec = meshed.spec.get_or_insert_with(Default::default);
    spec.init_containers = Some(serde_json::from_value(serde_json::json!([
        {"name": "istio-proxy", "image": "istio/proxyv2", "restartPolicy": "Always"},
        {"name": "migrate", "image": "busybox"},
    ]))?);
    spec.containers[0].env = Some(serde_json::from_value(serde_json::json!([
        {"name": "ANTHROPIC_BASE_URL", "value": "https://my.gateway"}
    ]))?);
    let pod = create(&env, &meshed).await?;
    assert_eq!(init_names(&pod), ["istio-proxy", SIDECAR_NAME, "migrate"]);
    assert!(!env_of(container(&pod, "istio-proxy")?).contains_key("ANTHROPIC_BASE_URL"));
    assert_eq!(
        env_of(container(&pod, "migrate")?)["ANTHROPIC_BASE_URL"],
        "http://127.0.0.1:15100"
    );
    assert_eq!(
        env_of(container(&pod, "app")?)["ANTHROPIC_BASE_URL"],
        "https://my.gateway"
    );

    // No label: untouched.
    let mut plain = opted_in_pod("plain-", &["team-a"]);
    plain.metadata.labels = None;
    let pod = create(&env, &plain).await?;
    assert_eq!(sidecars(&pod), 0);
    assert!(!env_of(container(&pod, "app")?).contains_key("ANTHROPIC_BASE_URL"));

    assert!(op.metrics.admissions("injected") >= 3);
    assert_eq!(reads(&op.metrics), before, "the webhook made API calls");
    Ok(())
}

#[tokio::test]
async fn refusals_name_the_problem() -> anyhow::Result<()> {
    let env = TestEnv::new("refuse").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    ready_key(&env, &fake, "team-a").await?;
    let restricted = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &restricted);
    put_secret(&env, "batch-raw", &[("api-key", &restricted)]).await?;
    create_pk(
        &env,
        "batch-only",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "batch-raw"},
                           "consumers": {"serviceAccounts": ["batch"]}}),
    )
    .await?;

    let with = |f: &dyn Fn(&mut serde_json::Value)| -> anyhow::Result<Pod> {
        let mut v = serde_json::to_value(opted_in_pod("bad-", &["team-a"]))?;
        f(&mut v);
        Ok(serde_json::from_value(v)?)
    };
    let cases: Vec<(&str, Pod, &str)> = vec![
        (
            "hostNetwork",
            with(&|v| v["spec"]["hostNetwork"] = true.into())?,
            "hostNetwork",
        ),
        (
            "shareProcessNamespace",
            with(&|v| v["spec"]["shareProcessNamespace"] = true.into())?,
            "shareProcessNamespace",
        ),
        (
            "a container named like the sidecar",
            with(&|v| v["spec"]["containers"][0]["name"] = SIDECAR_NAME.into())?,
            "reserved",
        ),
        (
            "a container mounting the token volume",
            with(&|v| {
                v["spec"]["volumes"] = serde_json::json!([{"name": TOKEN_VOLUME, "emptyDir": {}}]);
                v["spec"]["containers"][0]["volumeMounts"] =
                    serde_json::json!([{"name": TOKEN_VOLUME, "mountPath": "/t"}]);
            })?,
            TOKEN_VOLUME,
        ),
        (
            "a malformed annotation",
            with(&|v| v["metadata"]["annotations"]["byok.dev/provider-keys"] = "Team_A,".into())?,
            "byok.dev/provider-keys",
        ),
        (
            "a service account outside consumers",
            opted_in_pod("sa-", &["batch-only"]),
            "batch-only",
        ),
    ];
    for (what, pod, needle) in cases {
        match create(&env, &pod).await {
            Ok(_) => anyhow::bail!("{what}: admitted"),
            Err(kube::Error::Api(status)) => {
                assert!(
                    status.message.contains("denied the request")
                        && status.message.contains(needle),
                    "{what}: {}",
                    status.message
                );
            }
            Err(e) => anyhow::bail!("{what}: {e}"),
        }
    }
    assert!(op.metrics.admissions("refused") >= 6);

    // A malformed review is a 400, never a panic; the webhook keeps serving.
    let http = op.https_client(&env).await?;
    for body in [
        b"not json".to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#
            .to_vec(),
    ] {
        let answer = http
            .post(op.webhook_url(&env).await?)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(answer.status(), 400);
    }
    assert!(op.metrics.admissions("malformed") >= 3);
    create(&env, &opted_in_pod("after-", &["team-a"])).await?;
    Ok(())
}

#[tokio::test]
async fn a_missing_or_unready_key_is_admitted_with_a_warning() -> anyhow::Result<()> {
    let env = TestEnv::new("warn").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let _op = ServingOperator::start(&env, &fake).await?;
    put_secret(&env, "bad-raw", &[("api-key", "sk-ant-api03-not-accepted")]).await?;
    create_pk(
        &env,
        "unready",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "bad-raw"}}),
    )
    .await?;
    wait_pk(&env, "unready", "Ready=False", |pk| {
        byok_e2e::operator::condition(pk, "Ready").is_some_and(|(s, _, _)| s == "False")
    })
    .await?;

    // Create through the raw API to read the admission warnings the API server passes on.
    let pod = opted_in_pod("waits-", &["not-yet", "unready"]);
    let request = http::Request::post(format!("/api/v1/namespaces/{}/pods", env.namespace))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&pod)?)?;
    let response = env
        .client
        .send(request.map(kube::client::Body::from))
        .await?;
    assert_eq!(response.status(), 201, "the pod is admitted");
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let joined = warnings.join("\n");
    assert!(joined.contains("not-yet"), "warnings: {joined}");
    assert!(joined.contains("unready"), "warnings: {joined}");
    Ok(())
}

/// The serving certificate a TLS server presents now (DER).
async fn presented_cert(addr: std::net::SocketAddr, ca_pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut sock = std::net::TcpStream::connect(addr)?;
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned(),
        )?;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
        tls.flush()?;
        let der = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .context("no peer certificate")?
            .to_vec();
        anyhow::Ok(der)
    })
    .await?
}

#[tokio::test]
async fn serving_certificate_rotation_keeps_pods_admitted_and_sidecars_trusting()
-> anyhow::Result<()> {
    let env = TestEnv::new("rotate-cert").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start_with(&env, &fake, |config| {
        if let Some(serving) = config.serving.as_mut()
            && let TlsSource::Own(settings) = &mut serving.tls
        {
            settings.serving_validity = Duration::from_secs(12);
            settings.renew_before = Duration::from_secs(8);
            settings.check_every = Duration::from_millis(500);
        }
    })
    .await?;
    ready_key(&env, &fake, "team-a").await?;
    let early = create(&env, &opted_in_pod("early-", &["team-a"])).await?;
    anyhow::ensure!(
        byok_e2e::sidecar::mounts_trust_bundle(container(&early, SIDECAR_NAME)?),
        "the sidecar mounts the namespace's trust bundle"
    );
    // What the kubelet puts in the sidecar's mount.
    let sidecar_ca = byok_e2e::sidecar::TrustBundleFile::mount(&env).await?;
    let sidecar_ca = std::fs::read_to_string(&sidecar_ca.path)?;
    let first = presented_cert(op.config.webhook_addr, &sidecar_ca).await?;

    // Keep creating pods while the serving certificate is renewed (every ~4 s) at least twice.
    let mut seen = vec![first];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut created = 0;
    while seen.len() < 3 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the serving certificate was not renewed twice in time"
        );
        let pod = create(&env, &opted_in_pod("during-", &["team-a"])).await?;
        assert_eq!(sidecars(&pod), 1);
        created += 1;
        let now = presented_cert(op.config.webhook_addr, &sidecar_ca).await?;
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(created >= 3);
    // The CA did not change: a sidecar configured before the renewals still reaches the
    // broker (TLS with only that CA; the 401 proves the handshake succeeded).
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(sidecar_ca.as_bytes())?])
        .build()?;
    let answer = http
        .get(format!(
            "{}/v1/keys/{}/team-a",
            op.broker_url(),
            env.namespace
        ))
        .send()
        .await?;
    assert_eq!(answer.status(), 401);
    Ok(())
}

#[tokio::test]
async fn two_replicas_share_one_ca_both_serve_and_one_reconciles() -> anyhow::Result<()> {
    let env = TestEnv::new("replicas").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    install_crds(&env.client).await?;
    let name = format!("byok-{}", env.namespace);
    let replica = |identity: &str| -> anyhow::Result<byok_operator::startup::Config> {
        let mut config = dev_config(&env, &fake)?;
        config.serving = Some(serve_config(&env, &name)?);
        if let Some(leader) = config.leader.as_mut() {
            leader.identity = identity.to_string();
        }
        Ok(config)
    };
    let (a, b) = (replica("replica-a")?, replica("replica-b")?);
    let (a_serve, b_serve) = (a.serving.clone(), b.serving.clone());
    let (a_metrics, b_metrics) = (a.metrics.clone(), b.metrics.clone());
    let webhook_addr = a_serve.as_ref().context("serving")?.webhook_addr;
    register_webhook(&env, &name, webhook_addr).await?;
    // Both start at once on a fresh install: one CA between them.
    let (ra, rb) = tokio::join!(
        RunningController::start(&env, a),
        RunningController::start(&env, b)
    );
    let (ra, rb) = (ra?, rb?);
    let ready = |m: &byok_operator::metrics::Metrics| m.is_ready();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(ready(&a_metrics) && ready(&b_metrics)) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "replicas not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaders = || usize::from(a_metrics.is_leader()) + usize::from(b_metrics.is_leader());
    let deadline = tokio::time::Instant::now() + WAIT;
    while leaders() == 0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(leaders(), 1, "exactly one replica reconciles");

    // Both serve with certificates of the one CA in the Secret.
    let secret = env
        .api::<k8s_openapi::api::core::v1::Secret>()
        .get(byok_operator::serving::certs::DEFAULT_SECRET_NAME)
        .await?;
    let ca = String::from_utf8(
        secret
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("ca.crt")?
            .0,
    )?;
    for serve in [&a_serve, &b_serve] {
        let serve = serve.as_ref().context("serving")?;
        presented_cert(serve.webhook_addr, &ca).await?;
        presented_cert(serve.broker_addr, &ca).await?;
    }
    ready_key(&env, &fake, "team-a").await?;

    // The leader loses its lease (another holder takes it): it stops reconciling, but the
    // process goes on and keeps serving.
    let (leader_metrics, leader_serve) = if a_metrics.is_leader() {
        (&a_metrics, &a_serve)
    } else {
        (&b_metrics, &b_serve)
    };
    let now = jiff::Timestamp::now();
    Api::<Lease>::namespaced(env.client.clone(), &env.namespace)
        .patch(
            "byok-operator",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {
                "holderIdentity": "someone-else",
                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
                "leaseDurationSeconds": 600,
            }})),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while leader_metrics.is_leader() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the leader did not notice it lost the lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ra.is_running() && rb.is_running(),
        "losing the lease stops reconciling, not the process"
    );
    assert_eq!(leaders(), 0);
    let leader_serve = leader_serve.as_ref().context("serving")?;
    presented_cert(leader_serve.webhook_addr, &ca).await?;
    let pod = create(&env, &opted_in_pod("still-", &["team-a"])).await?;
    assert_eq!(sidecars(&pod), 1);
    Ok(())
}

/// A review of a pod with `containers` containers asking for `keys` keys, as the API server
/// sends it.
fn big_review(namespace: &str, containers: usize, keys: usize) -> serde_json::Value {
    let names: Vec<String> = (0..keys).map(|i| format!("key-{i}")).collect();
    let mut pod = serde_json::to_value(opted_in_pod(
        "big-",
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .unwrap_or_default();
    pod["spec"]["containers"] = (0..containers)
        .map(|i| serde_json::json!({"name": format!("c{i}"), "image": "busybox"}))
        .collect();
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "4f4bd9a5-5a5e-4d8c-9a0e-000000000019",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "", "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "tenant"},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// Issue 19, item 2, played by whoever can create a labelled pod or reach the webhook
/// port: a pod spec that would inflate the answer (3,000 containers × 16 keys once gave an
/// 18 MB response and +118 MiB of operator memory) is refused by the pre-scan with a small
/// denial naming the limit, through the API server as well as posted directly; and while
/// clients trickle bodies into the webhook, an ordinary pod is still admitted.
#[tokio::test]
async fn reviews_past_the_limits_are_refused_before_they_are_parsed() -> anyhow::Result<()> {
    let env = TestEnv::new("prescan").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    ready_key(&env, &fake, "team-a").await?;
    let http = op.https_client(&env).await?;

    let body = serde_json::to_vec(&big_review(&env.namespace, 3000, 16))?;
    let res = http
        .post(op.webhook_url(&env).await?)
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let answer = res.bytes().await?;
    assert!(
        answer.len() < 4096,
        "the refusal is small: {} bytes",
        answer.len()
    );
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(
        answer["response"]["uid"],
        "4f4bd9a5-5a5e-4d8c-9a0e-000000000019"
    );
    let message = answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("3000 containers"), "{message}");
    // Keys × containers past the bound, within the container limit.
    let res = http
        .post(op.webhook_url(&env).await?)
        .body(serde_json::to_vec(&big_review(&env.namespace, 40, 16))?)
        .send()
        .await?;
    let answer: serde_json::Value = res.json().await?;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("640 variables"),
        "{answer}"
    );

    // Through the API server, as a tenant sees it.
    let mut pod = serde_json::to_value(opted_in_pod("many-", &["team-a"]))?;
    pod["spec"]["containers"] = (0..101)
        .map(|i| serde_json::json!({"name": format!("c{i}"), "image": "busybox"}))
        .collect();
    let err = create(&env, &serde_json::from_value(pod)?)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("at most 100"), "{err}");

    // Clients that trickle bodies in hold only what they sent: an ordinary pod is admitted
    // meanwhile.
    let addr = op.config.webhook_addr;
    let mut tricklers = Vec::new();
    for _ in 0..50 {
        let http = http.clone();
        let url = op.webhook_url(&env).await?;
        let prefix = body[..64 * 1024].to_vec();
        tricklers.push(tokio::spawn(async move {
            let (mut tx, rx) =
                futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
            let send = http
                .post(url)
                .header("content-length", (3 * 1024 * 1024).to_string())
                .body(reqwest::Body::wrap_stream(rx))
                .send();
            let feed = async move {
                use futures::SinkExt;
                let _ = tx.send(Ok(prefix)).await;
                // Never finish: the webhook gives up on the body.
                std::future::pending::<()>().await;
            };
            tokio::select! { r = send => r.map(|r| r.status().as_u16()).ok(), () = feed => None }
        }));
    }
    let pod = create(&env, &opted_in_pod("ordinary-", &["team-a"])).await?;
    assert_eq!(sidecars(&pod), 1, "admitted and injected at {addr}");
    // The webhook gave up on each trickled body (408) instead of holding it.
    for t in tricklers {
        if let Some(status) = tokio::time::timeout(Duration::from_secs(20), t).await?? {
            assert_eq!(status, 408);
        }
    }
    Ok(())
}

/// `POST` to a pod's subresource as kubectl starts a connection (`query` after `?`); the API
/// server's answer (admission runs before it would reach a node).
async fn connect_to(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    sub: &str,
    query: &str,
) -> anyhow::Result<(u16, String)> {
    let url = format!("/api/v1/namespaces/{namespace}/pods/{pod}/{sub}{query}");
    let req = http::Request::post(url).body(Vec::new())?;
    match client.request_text(req).await {
        Ok(text) => Ok((200, text)),
        Err(kube::Error::Api(e)) => Ok((e.code, e.message)),
        Err(e) => Ok((0, e.to_string())),
    }
}

/// `exec` (or `attach`) into `container`.
async fn connect(
    env: &TestEnv,
    pod: &str,
    sub: &str,
    container: &str,
) -> anyhow::Result<(u16, String)> {
    let query = format!("?container={container}&stdout=true&command=id");
    connect_to(&env.client, &env.namespace, pod, sub, &query).await
}

/// Issue 19, item 1, at the API server, played by a pod editor: labelling a pod the webhook
/// never saw, changing its keys, swapping the sidecar's image, and exec or attach into the
/// sidecar are refused with a message saying why; ordinary updates and exec into the
/// application are not; with the operator unreachable, exec into the sidecar stays refused
/// (failurePolicy Fail) and exec into the application is untouched (never sent to it).
#[tokio::test]
async fn the_api_server_refuses_late_opt_in_image_swaps_and_exec() -> anyhow::Result<()> {
    use kube::api::{Patch, PatchParams};
    let env = TestEnv::new("guard").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    ready_key(&env, &fake, "team-a").await?;
    let pods = env.api::<Pod>();
    let patch = |v: serde_json::Value| Patch::Merge(v);
    let inject = byok_operator::names::INJECT_LABEL;
    let keys = byok_operator::names::PROVIDER_KEYS_ANNOTATION;

    // A pod created without the label, labelled afterwards.
    let plain: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": "plain-", "annotations": {(keys): "team-a"}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]}
    }))?;
    let plain = create(&env, &plain).await?;
    let plain_name = plain.metadata.name.clone().unwrap_or_default();
    let err = pods
        .patch(
            &plain_name,
            &PatchParams::default(),
            &patch(serde_json::json!({"metadata": {"labels": {(inject): "true"}}})),
        )
        .await
        .expect_err("late opt-in refused");
    assert!(
        err.to_string()
            .contains("can only be set when a pod is created"),
        "{err}"
    );

    // An injected pod: its keys and its sidecar's image are fixed; the rest is not.
    let pod = create(&env, &opted_in_pod("guarded-", &["team-a"])).await?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let err = pods
        .patch(
            &name,
            &PatchParams::default(),
            &patch(serde_json::json!({"metadata": {"annotations": {(keys): "team-a,other"}}})),
        )
        .await
        .expect_err("keys change refused");
    assert!(
        err.to_string().contains("cannot change after creation"),
        "{err}"
    );
    let err = pods
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({"spec": {"initContainers": [
                {"name": SIDECAR_NAME, "image": "evil.example/steal:1"}]}})),
        )
        .await
        .expect_err("image swap refused");
    assert!(
        err.to_string().contains("image of the byok-proxy sidecar"),
        "{err}"
    );
    pods.patch(
        &name,
        &PatchParams::default(),
        &patch(serde_json::json!({"metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}}})),
    )
    .await?;
    // kubectl debug on the sidecar.
    let err = pods
        .patch_subresource(
            "ephemeralcontainers",
            &name,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({"spec": {"ephemeralContainers": [{
                "name": "debug", "image": "busybox", "targetContainerName": SIDECAR_NAME}]}})),
        )
        .await
        .expect_err("debugging the sidecar refused");
    assert!(
        err.to_string().contains("ephemeral container \"debug\""),
        "{err}"
    );
    // Opting out is allowed (the broker then refuses the pod)...
    pods.patch(
        &name,
        &PatchParams::default(),
        &patch(serde_json::json!({"metadata": {"labels": {(inject): null}}})),
    )
    .await?;
    // ...but the opted-out pod's sidecar image stays, and the label does not come back, not
    // even through pods/status.
    let err = pods
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({"spec": {"initContainers": [
                {"name": SIDECAR_NAME, "image": "evil.example/steal:1"}]}})),
        )
        .await
        .expect_err("image swap after opting out refused");
    assert!(
        err.to_string().contains("image of the byok-proxy sidecar"),
        "{err}"
    );
    let err = pods
        .patch_status(
            &name,
            &PatchParams::default(),
            &patch(serde_json::json!({"metadata": {"labels": {(inject): "true"}}})),
        )
        .await
        .expect_err("labelling through pods/status refused");
    assert!(
        err.to_string()
            .contains("can only be set when a pod is created"),
        "{err}"
    );

    // exec and attach into the sidecar; exec into the application.
    for sub in ["exec", "attach"] {
        let (code, message) = connect(&env, &name, sub, SIDECAR_NAME).await?;
        assert_eq!(code, 403, "{sub}: {message}");
        assert!(
            message.contains("into the byok-proxy container is refused"),
            "{message}"
        );
    }
    let (code, message) = connect(&env, &name, "exec", "app").await?;
    assert!(
        !message.contains("byok") && code != 403,
        "exec into the app is not ours to refuse: {code} {message}"
    );

    // The operator unreachable: every webhook now points at a closed port.
    let mwcs =
        Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
            env.client.clone(),
        );
    let mut mwc = mwcs.get(&op.webhook_configuration).await?;
    for w in mwc.webhooks.iter_mut().flatten() {
        w.client_config.url = Some(format!("https://127.0.0.1:{}/mutate", free_port()?));
    }
    mwcs.replace(&op.webhook_configuration, &PostParams::default(), &mwc)
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, message) = connect(&env, &name, "exec", SIDECAR_NAME).await?;
        if message.contains("failed calling webhook") {
            assert_ne!(code, 200);
            break;
        }
        assert!(
            message.contains("is refused") && code == 403,
            "exec into the sidecar got through: {code} {message}"
        );
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the API server kept the old URL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }
    let (code, message) = connect(&env, &name, "exec", "app").await?;
    assert!(
        !message.contains("webhook") && code != 403,
        "exec into the app must not depend on the operator: {code} {message}"
    );
    Ok(())
}

/// The opt-in port-forward refusal (`webhook.refusePortForward`), asked as kubectl asks:
/// `POST pods/NAME/portforward` naming no port (kubectl sends the ports in stream headers,
/// after admission). A pod using keys is refused; another pod is not the webhook's concern.
/// A review naming the sidecar's ports (kube-rs clients send `?ports=`) is refused too.
#[tokio::test]
async fn port_forward_to_a_pod_using_keys_is_refused_when_asked() -> anyhow::Result<()> {
    let env = TestEnv::new("portfwd").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    ready_key(&env, &fake, "team-a").await?;
    let keyed = create(&env, &opted_in_pod("keyed-", &["team-a"])).await?;
    let keyed = keyed.metadata.name.clone().unwrap_or_default();
    let plain: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": "plain-"},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]}
    }))?;
    let plain = create(&env, &plain)
        .await?
        .metadata
        .name
        .unwrap_or_default();
    op.add_chart_webhook(
        &env,
        "portforward.byok.dev",
        &["webhook.refusePortForward=true".to_owned()],
    )
    .await?;
    // The pod cache sees the pod, and the API server the new webhook: poll until refused.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, message) =
            connect_to(&env.client, &env.namespace, &keyed, "portforward", "").await?;
        if code == 403 {
            assert!(
                message.contains("port-forward to a pod using byok keys"),
                "{message}"
            );
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "port-forward to a pod using keys got {code} {message}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }
    let (code, message) = connect_to(
        &env.client,
        &env.namespace,
        &keyed,
        "portforward",
        "?ports=15100",
    )
    .await?;
    assert_eq!(code, 403, "{message}");
    // Naming another port does not help: SPDY streams name their own.
    let (code, message) = connect_to(
        &env.client,
        &env.namespace,
        &keyed,
        "portforward",
        "?ports=8080",
    )
    .await?;
    assert_eq!(code, 403, "{message}");
    let (code, message) =
        connect_to(&env.client, &env.namespace, &plain, "portforward", "").await?;
    assert!(
        code != 403 && !message.contains("byok"),
        "a pod without keys: {code} {message}"
    );
    Ok(())
}

/// The optional refusal of `byok.dev` TokenRequests (token.byok.dev, chart value
/// `webhook.refuseTokenRequests`): someone allowed to create `serviceaccounts/token` asks for a token bound to an
/// injected pod, which the broker would take as the sidecar's. Refused for them (with a
/// message saying why); other audiences are not affected.
#[tokio::test]
async fn only_nodes_may_mint_broker_tokens() -> anyhow::Result<()> {
    let env = TestEnv::new("tokenreq").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start(&env, &fake).await?;
    ready_key(&env, &fake, "team-a").await?;
    let pod = create(&env, &opted_in_pod("minted-", &["team-a"])).await?;
    // Before: an admin (the test's identity) mints one.
    pod_token(&env, "default", &pod, byok_operator::names::TOKEN_AUDIENCE).await?;
    op.add_chart_webhook(
        &env,
        TOKEN_WEBHOOK,
        &["webhook.refuseTokenRequests=true".to_owned()],
    )
    .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let refused = loop {
        match pod_token(&env, "default", &pod, byok_operator::names::TOKEN_AUDIENCE).await {
            Err(e) => break e.to_string(),
            Ok(_) => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "byok.dev tokens are still minted"
                );
                tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
            }
        }
    };
    assert!(
        refused.contains("are for the kubelet to mount"),
        "{refused}"
    );
    // Another audience is none of the webhook's business.
    pod_token(&env, "default", &pod, "https://example.com/other").await?;
    Ok(())
}

/// A review about the test namespace, asking for `key`: what a pod that reaches the webhook's
/// port would post to learn whether a ProviderKey exists there.
fn probing_review(env: &TestEnv, key: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000007",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": env.namespace,
            "operation": "CREATE",
            "userInfo": {"username": "someone-else"},
            "object": serde_json::to_value(opted_in_pod("probe-", &[key]))?,
            "dryRun": true,
        }
    }))
}

/// What a caller can tell apart: the status, every header but `date`, the body.
async fn observable(response: reqwest::Response) -> anyhow::Result<String> {
    let status = response.status();
    let mut headers: Vec<String> = response
        .headers()
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("?")))
        .collect();
    headers.sort();
    let body = response.text().await?;
    Ok(format!("{status} {headers:?} {body:?}"))
}

#[tokio::test]
async fn a_caller_without_the_webhook_path_learns_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("webhook-path").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    // A longer grace than the harness's, so the old path is still open when the test looks.
    let grace = Duration::from_secs(10);
    let op = ServingOperator::start_with(&env, &fake, |config| {
        if let Some(serve) = config.serving.as_mut() {
            serve.webhook_path.grace = grace;
        }
    })
    .await?;
    ready_key(&env, &fake, "team-a").await?;
    let secret = op.config.webhook_path.secret.clone();
    let path = webhook_path(&env, &secret).await?;
    assert!(
        byok_operator::serving::webhook_path::is_valid(&path),
        "128 random bits: {path}"
    );
    let origin = format!("https://{}", op.config.webhook_addr);
    let http = op.https_client(&env).await?;

    // At the path, the answers tell a Ready key from a missing one: worth hiding.
    let (exists, missing) = (
        probing_review(&env, "team-a")?,
        probing_review(&env, "nope")?,
    );
    let at_path =
        |review: &serde_json::Value| http.post(format!("{origin}{path}")).json(review).send();
    let (a, b) = (
        at_path(&exists).await?.json::<serde_json::Value>().await?,
        at_path(&missing).await?.json::<serde_json::Value>().await?,
    );
    assert_eq!(a["response"]["warnings"], serde_json::Value::Null, "{a}");
    assert!(
        b["response"]["warnings"]
            .to_string()
            .contains("does not exist"),
        "{b}"
    );

    // The configuration's first path (what a release before this served) closes after the
    // grace; then it answers like any other.
    let deadline = tokio::time::Instant::now() + WAIT + grace;
    while http
        .post(format!("{origin}/mutate"))
        .json(&exists)
        .send()
        .await?
        .status()
        != 404
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "/mutate is still served"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let guess = byok_operator::serving::webhook_path::generate();
    let mut seen = std::collections::BTreeSet::new();
    for other in [
        "/mutate".to_owned(),
        "/".to_owned(),
        guess.clone(),
        format!("{path}/"),
        path.to_uppercase(),
        format!("{path}x"),
        path[..path.len() - 1].to_owned(),
    ] {
        for review in [&exists, &missing] {
            let answer = http
                .post(format!("{origin}{other}"))
                .json(review)
                .send()
                .await?;
            seen.insert(observable(answer).await?);
        }
    }
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let answer = http
            .request(method, format!("{origin}{path}"))
            .json(&exists)
            .send()
            .await?;
        seen.insert(observable(answer).await?);
    }
    assert_eq!(
        seen.len(),
        1,
        "every other request looks the same: {seen:#?}"
    );
    assert!(seen.iter().all(|s| s.starts_with("404 ")), "{seen:?}");

    // The path lost (its Secret key removed): a new one is written, published, served; the
    // old one stays open for the grace, then closes; the API server follows.
    env.api::<k8s_openapi::api::core::v1::Secret>()
        .patch(
            &secret,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(serde_json::json!([
                {"op": "remove", "path": format!("/data/{}", byok_operator::serving::webhook_path::SECRET_KEY)}
            ]))?),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let new_path = loop {
        if let Ok(new) = webhook_path(&env, &secret).await
            && new != path
            && configured_paths(&env.client, &op.webhook_configuration)
                .await?
                .iter()
                .all(|p| *p == new)
        {
            break new;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no new path was published"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(byok_operator::serving::webhook_path::is_valid(&new_path));
    let old = at_path(&exists).await?;
    assert_eq!(old.status(), 200, "the previous path is open for the grace");
    let new = http
        .post(format!("{origin}{new_path}"))
        .json(&exists)
        .send()
        .await?;
    assert_eq!(new.status(), 200);
    let injected = create_dry_run(&env, &opted_in_pod("after-", &["team-a"])).await?;
    assert!(
        has_sidecar(&injected),
        "the API server follows the new path"
    );
    let deadline = tokio::time::Instant::now() + WAIT + grace;
    while at_path(&exists).await?.status() != 404 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the previous path never closed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

#[tokio::test]
async fn with_a_client_ca_only_the_api_servers_certificate_gets_a_tls_session() -> anyhow::Result<()>
{
    let env = TestEnv::new("webhook-mtls").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let client_ca = byok_e2e::envtest::shared()
        .webhook_client_ca_pem()
        .to_owned();
    // Starting waits until the API server, with its client certificate, gets a pod injected.
    let op = ServingOperator::start_with(&env, &fake, |config| {
        if let Some(serve) = config.serving.as_mut() {
            serve.webhook_client_ca_pem = Some(client_ca);
        }
    })
    .await?;
    ready_key(&env, &fake, "team-a").await?;
    let url = op.webhook_url(&env).await?;
    let review = probing_review(&env, "team-a")?;
    let ca = op.ca_pem(&env).await?;

    // Knowing the path is not enough: without a certificate, or with one of another CA, the
    // handshake fails and no review is read.
    let stranger = byok_e2e::pki::TestCa::new("not-the-api-servers-ca")?.issue("a-pod", &[])?;
    let with_stranger = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
        .identity(reqwest::Identity::from_pem(
            format!("{}{}", stranger.cert_pem, stranger.key_pem).as_bytes(),
        )?)
        .build()?;
    for (who, client) in [
        ("no certificate", op.https_client(&env).await?),
        ("another CA", with_stranger),
    ] {
        let sent = client.post(&url).json(&review).send().await;
        assert!(sent.is_err(), "{who}: {sent:?}");
    }

    // The API server's own calls still get through.
    let injected = create_dry_run(&env, &opted_in_pod("mtls-", &["team-a"])).await?;
    assert!(has_sidecar(&injected));
    Ok(())
}

/// The path is named in the API server's errors to pod creators when a call fails, so it
/// rotates: with a short period, pods keep being admitted while the path changes under them.
#[tokio::test]
async fn the_webhook_path_rotates_while_pods_keep_being_admitted() -> anyhow::Result<()> {
    let env = TestEnv::new("webhook-rotate").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = ServingOperator::start_with(&env, &fake, |config| {
        if let Some(serve) = config.serving.as_mut() {
            serve.webhook_path.rotate_every = Some(Duration::from_secs(2));
        }
    })
    .await?;
    ready_key(&env, &fake, "team-a").await?;
    let first = webhook_path(&env, &op.config.webhook_path.secret).await?;
    let mut published = std::collections::BTreeSet::from([first.clone()]);
    let (mut admitted, mut refused) = (0, Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while published.len() < 4 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the path did not rotate: {published:?}"
        );
        match create_dry_run(&env, &opted_in_pod("rotating-", &["team-a"])).await {
            Ok(pod) if has_sidecar(&pod) => admitted += 1,
            other => refused.push(format!("{other:?}")),
        }
        for path in configured_paths(&env.client, &op.webhook_configuration).await? {
            assert!(
                byok_operator::serving::webhook_path::is_valid(&path),
                "{path}"
            );
            published.insert(path);
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {} pods refused while the path rotated: {refused:?}",
        refused.len(),
        admitted + refused.len()
    );
    Ok(())
}

/// A pod as Istio's injector writes it (istio-init with NET_ADMIN and NET_RAW, istio-proxy
/// declaring 15090 `http-envoy-prom`, 15021 and 15020), classic and native: admitted, its
/// ports clear of the sidecar's, our sidecar after a native istio-proxy. Releases before used
/// 15090 for the sidecar's admin port and refused every such pod.
#[tokio::test]
async fn istio_meshed_pods_are_admitted_classic_and_native() -> anyhow::Result<()> {
    let env = TestEnv::new("istio").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let _op = ServingOperator::start(&env, &fake).await?;
    ready_key(&env, &fake, "team-a").await?;
    let istio_proxy = serde_json::json!({
        "name": "istio-proxy",
        "image": "docker.io/istio/proxyv2:1.26.2",
        "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
        "ports": [
            {"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"},
            {"containerPort": 15021, "name": "health-port", "protocol": "TCP"},
            {"containerPort": 15020, "name": "http-monitoring", "protocol": "TCP"},
        ],
        "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}},
    });
    let istio_init = serde_json::json!({
        "name": "istio-init",
        "image": "docker.io/istio/proxyv2:1.26.2",
        "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
            "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"],
        "securityContext": {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false,
            "allowPrivilegeEscalation": false, "privileged": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}},
    });
    let mut native_proxy = istio_proxy.clone();
    native_proxy["restartPolicy"] = "Always".into();
    for (what, spec) in [
        (
            "classic",
            serde_json::json!({
                "initContainers": [istio_init.clone()],
                "containers": [{"name": "app", "image": "busybox"}, istio_proxy],
            }),
        ),
        (
            "native",
            serde_json::json!({
                "initContainers": [istio_init, native_proxy],
                "containers": [{"name": "app", "image": "busybox"}],
            }),
        ),
    ] {
        let mut pod = opted_in_pod(&format!("{what}-"), &["team-a"]);
        pod.spec = Some(serde_json::from_value(spec)?);
        let created = create(&env, &pod)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        assert!(has_sidecar(&created), "{what}");
        // Identity webhooks that edit every container are told to leave ours alone.
        let annotations = created.metadata.annotations.clone().unwrap_or_default();
        for key in [
            "eks.amazonaws.com/skip-containers",
            "azure.workload.identity/skip-containers",
        ] {
            assert_eq!(
                annotations.get(key).map(String::as_str),
                Some(SIDECAR_NAME),
                "{key}"
            );
        }
        let inits = init_names(&created);
        // Native: after Istio's proxy, which runs before it. Classic: before istio-init, whose
        // redirect would send the sidecar's broker call to an Envoy not yet running.
        let expected = if what == "native" {
            vec!["istio-init", "istio-proxy", SIDECAR_NAME]
        } else {
            vec![SIDECAR_NAME, "istio-init"]
        };
        assert_eq!(inits, expected, "{what}");
        let ports: Vec<i32> = container(&created, SIDECAR_NAME)?
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert!(
            ports.iter().all(|p| !(15000..15100).contains(p)),
            "{what}: {ports:?} in Istio's range"
        );
    }
    Ok(())
}
