//! Tests of what every replica serves: the operator (in this process) with its webhook and
//! broker on loopback ports, the API server calling the webhook by `url` + `caBundle` (the
//! operator sets the caBundle itself), and sidecar-style callers of the broker with real
//! pod-bound ServiceAccount tokens.

use std::time::Duration;

use anyhow::Context as _;
use byok_operator::names;
use byok_operator::serve::{ProxyOptions, ServeConfig, TlsSource};
use byok_operator::serving::CertSettings;
use byok_operator::serving::path_store::PathSettings;
use byok_operator::serving::webhook_path;
use byok_operator::startup;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

use crate::envtest::TestEnv;
use crate::fake_provider::FakeProvider;
use crate::operator::{RunningController, WAIT, dev_config, free_port};

/// How long the tests' operators keep accepting a path the configuration no longer carries.
pub const TEST_PATH_GRACE: Duration = Duration::from_secs(5);

/// The sidecar image the tests' webhook injects (never pulled: no kubelet here).
pub const TEST_PROXY_IMAGE: &str = "byok.dev/test/byok-proxy:e2e";
/// The operator's image in tests: releases before the `byok-proxy` image injected it as the
/// sidecar (`byok-operator proxy`; fixtures 01 to 03 of `fixtures/sidecars/`).
pub const TEST_OPERATOR_IMAGE: &str = "byok.dev/test/byok-operator:e2e";

/// The serving part of a test operator: loopback ports, own CA in the test namespace,
/// the test's own webhook configuration.
pub fn serve_config(env: &TestEnv, webhook_configuration: &str) -> anyhow::Result<ServeConfig> {
    let broker_port = free_port()?;
    Ok(ServeConfig {
        webhook_addr: format!("127.0.0.1:{}", free_port()?).parse()?,
        broker_addr: format!("127.0.0.1:{broker_port}").parse()?,
        broker_url: format!("https://127.0.0.1:{broker_port}"),
        tls: TlsSource::Own(CertSettings::new(
            env.namespace.clone(),
            vec!["127.0.0.1".into(), "localhost".into()],
        )),
        webhook_configuration: Some(webhook_configuration.to_string()),
        // The path lives in the TLS Secret; one replica, so it is published at once, and the
        // configuration's first path (`/mutate`) is refused soon after.
        webhook_path: PathSettings {
            configuration: Some(webhook_configuration.to_string()),
            publish_after: Duration::ZERO,
            grace: TEST_PATH_GRACE,
            rotate_every: None,
            ..PathSettings::new(
                &env.namespace,
                byok_operator::serving::certs::DEFAULT_SECRET_NAME,
            )
        },
        webhook_client_ca_pem: None,
        proxy: ProxyOptions {
            image: TEST_PROXY_IMAGE.into(),
            operator_image: TEST_OPERATOR_IMAGE.into(),
            pull_policy: "IfNotPresent".into(),
            resources: byok_operator::cli::parse_resources(
                "requests.cpu=10m,requests.memory=16Mi,limits.memory=64Mi",
            )
            .map_err(anyhow::Error::msg)?,
            ports: Default::default(),
        },
        key_lease: Duration::from_secs(300),
        egress: Default::default(),
        operator_namespace: env.namespace.clone(),
        workers: 1,
    })
}

/// The MutatingWebhookConfiguration the chart renders by default (`config/base/`), pointed at the test
/// operator by `url` and scoped to the test namespace (tests run side by side on one API
/// server). Everything else (selectors, failure policy, reinvocation, timeout) is the file's.
/// No caBundle: the operator sets it. Without [`TOKEN_WEBHOOK`] (see below).
pub fn webhook_configuration(
    name: &str,
    namespace: &str,
    url: &str,
) -> anyhow::Result<MutatingWebhookConfiguration> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/base/mutatingwebhookconfiguration.yaml"
    );
    let mut mwc: MutatingWebhookConfiguration =
        serde_saphyr::from_str(&std::fs::read_to_string(path)?)?;
    mwc.metadata.name = Some(name.to_string());
    // The tests mint sidecar tokens themselves (as an admin, a TokenRequest), which this
    // webhook (opt-in, `webhook.refuseTokenRequests`) refuses to all but nodes: it is added by
    // the test of it alone, should a default render ever hold it.
    mwc.webhooks
        .get_or_insert_with(Vec::new)
        .retain(|w| w.name != TOKEN_WEBHOOK);
    for webhook in mwc.webhooks.iter_mut().flatten() {
        anyhow::ensure!(
            webhook.client_config.ca_bundle.is_none(),
            "the chart must not render a caBundle"
        );
        webhook.client_config.service = None;
        webhook.client_config.url = Some(url.to_string());
        webhook.namespace_selector = Some(serde_json::from_value(serde_json::json!(
            {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
        ))?);
    }
    Ok(mwc)
}

/// Registers [`webhook_configuration`] `name`, scoped to `env`'s namespace and pointed at the
/// webhook listening on `webhook_addr` (its `/mutate` path).
pub async fn register_webhook(
    env: &TestEnv,
    name: &str,
    webhook_addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let url = format!("https://{webhook_addr}/mutate");
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .create(
            &PostParams::default(),
            &webhook_configuration(name, &env.namespace, &url)?,
        )
        .await?;
    Ok(())
}

/// An operator serving the webhook and the broker for one test namespace, with the API
/// server's webhook pointed at it. Dropping it stops the operator and removes the
/// (cluster-scoped) webhook configuration.
pub struct ServingOperator {
    pub controller: RunningController,
    pub config: ServeConfig,
    pub webhook_configuration: String,
    pub metrics: std::sync::Arc<byok_operator::metrics::Metrics>,
    client: kube::Client,
}

impl ServingOperator {
    pub async fn start(env: &TestEnv, fake: &FakeProvider) -> anyhow::Result<Self> {
        Self::start_with(env, fake, |_| {}).await
    }

    /// Starts with a changed configuration; waits until the API server calls the webhook.
    pub async fn start_with(
        env: &TestEnv,
        fake: &FakeProvider,
        change: impl FnOnce(&mut startup::Config),
    ) -> anyhow::Result<Self> {
        let name = format!("byok-{}", env.namespace);
        let serve = serve_config(env, &name)?;
        let url = format!("https://{}/mutate", serve.webhook_addr);
        let mwc = webhook_configuration(&name, &env.namespace, &url)?;
        let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
        mwcs.create(&PostParams::default(), &mwc).await?;
        let mut config = dev_config(env, fake)?;
        let mut serve = serve;
        // What `--insecure-allow-private-base-urls` and `--extra-ca-file` pass to sidecars.
        serve.egress = byok_operator::broker::EgressPolicy {
            allow_private_addresses: true,
            extra_ca_pem: Some(fake.ca_pem()),
            proxy: None,
        };
        config.serving = Some(serve);
        change(&mut config);
        let serve = config
            .serving
            .clone()
            .context("the change removed serving")?;
        let metrics = config.metrics.clone();
        let controller = RunningController::start(env, config).await?;
        let mut op = Self {
            controller,
            config: serve,
            webhook_configuration: name,
            metrics,
            client: env.client.clone(),
        };
        op.wait_webhook_called(env).await?;
        Ok(op)
    }

    /// An operator whose sidecars keep a key for `lease` without the broker; at `broker`
    /// (address, URL) when given, as a restarted operator that sidecars already call.
    pub async fn start_leased(
        env: &TestEnv,
        fake: &FakeProvider,
        lease: Duration,
        broker: Option<(std::net::SocketAddr, String)>,
    ) -> anyhow::Result<Self> {
        Self::start_with(env, fake, move |config| {
            if let Some(serve) = config.serving.as_mut() {
                serve.key_lease = lease;
                if let Some((addr, url)) = broker {
                    serve.broker_addr = addr;
                    serve.broker_url = url;
                }
            }
        })
        .await
    }

    /// An operator whose broker pods on the test node reach on the node's address, and whose
    /// webhook injects the locally imported sidecar image (never pulled).
    pub async fn start_for_node(
        env: &TestEnv,
        fake: &FakeProvider,
        node_ip: std::net::Ipv4Addr,
    ) -> anyhow::Result<Self> {
        Self::start_for_node_at(env, fake, node_ip, free_port()?).await
    }

    /// As [`Self::start_for_node`], with the broker on `port` (a restarted operator).
    pub async fn start_for_node_at(
        env: &TestEnv,
        fake: &FakeProvider,
        node_ip: std::net::Ipv4Addr,
        port: u16,
    ) -> anyhow::Result<Self> {
        Self::start_with(env, fake, |config| {
            if let Some(serve) = config.serving.as_mut() {
                serve.broker_addr = std::net::SocketAddr::from((node_ip, port));
                serve.broker_url = format!("https://{node_ip}:{port}");
                serve.tls = TlsSource::Own(CertSettings::new(
                    env.namespace.clone(),
                    vec!["127.0.0.1".into(), "localhost".into(), node_ip.to_string()],
                ));
                serve.proxy.pull_policy = "Never".into();
            }
        })
        .await
    }

    /// The CA sidecars trust, from the operator's certificate Secret.
    pub async fn ca_pem(&self, env: &TestEnv) -> anyhow::Result<String> {
        serving_ca_pem(env).await
    }

    /// Polls with dry-run pod creations until the API server gets through to the webhook
    /// at its random path (the caBundle and the path are set by the operator after it
    /// starts; tests then change the configuration without racing it).
    async fn wait_webhook_called(&mut self, env: &TestEnv) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let pod = opted_in_pod("probe-", &["no-such-key"]);
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            if let Some(how) = self.controller.ended() {
                anyhow::bail!("the operator stopped before serving: {how}");
            }
            let published = match webhook_path(env, &self.config.webhook_path.secret).await {
                Ok(path) => configured_paths(&self.client, &self.webhook_configuration)
                    .await?
                    .iter()
                    .all(|p| *p == path)
                    .then_some(())
                    .context("the configuration does not carry the webhook path yet"),
                Err(e) => Err(e),
            };
            if let Err(e) = published {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            match create_dry_run(env, &pod).await {
                Ok(created) if has_sidecar(&created) => return Ok(()),
                Ok(_) => last = "admitted without a sidecar".into(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("the API server never reached the webhook: {last}")
    }

    /// An HTTP client that trusts the operator's CA.
    pub async fn https_client(&self, env: &TestEnv) -> anyhow::Result<reqwest::Client> {
        let ca = self.ca_pem(env).await?;
        Ok(reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
            .build()?)
    }

    pub fn broker_url(&self) -> &str {
        &self.config.broker_url
    }

    /// The webhook's URL, with the path the operator keeps in its Secret.
    pub async fn webhook_url(&self, env: &TestEnv) -> anyhow::Result<String> {
        Ok(format!(
            "https://{}{}",
            self.config.webhook_addr,
            webhook_path(env, &self.config.webhook_path.secret).await?
        ))
    }

    /// Adds the chart's webhook `webhook`, as the chart renders it with `sets` (`--set`
    /// values: the opt-in webhooks), to this operator's configuration, pointed and scoped like
    /// the others.
    pub async fn add_chart_webhook(
        &self,
        env: &TestEnv,
        webhook: &str,
        sets: &[String],
    ) -> anyhow::Result<()> {
        let rendered = crate::manifests::objects(&crate::manifests::render_chart(
            "byok-operator",
            "byok-system",
            sets,
        )?)?;
        let chart: MutatingWebhookConfiguration = serde_json::from_value(
            crate::manifests::one(&rendered, "MutatingWebhookConfiguration")?.clone(),
        )?;
        let mut added = chart
            .webhooks
            .into_iter()
            .flatten()
            .find(|w| w.name == webhook)
            .with_context(|| format!("the chart has no webhook {webhook}"))?;
        let api = Api::<MutatingWebhookConfiguration>::all(self.client.clone());
        let mut mwc = api.get(&self.webhook_configuration).await?;
        let model = mwc
            .webhooks
            .as_ref()
            .and_then(|w| w.first())
            .cloned()
            .context("no webhook to copy the target from")?;
        added.client_config = model.client_config;
        added.namespace_selector = Some(serde_json::from_value(serde_json::json!(
            {"matchLabels": {"kubernetes.io/metadata.name": env.namespace}}
        ))?);
        mwc.webhooks.get_or_insert_with(Vec::new).push(added);
        api.replace(&self.webhook_configuration, &PostParams::default(), &mwc)
            .await?;
        Ok(())
    }

    /// Removes one webhook (e.g. `update.byok.dev`) from the configuration, as a cluster
    /// whose chart lacks it would be, and waits until the API server stops calling it: a
    /// labelling update passes.
    pub async fn remove_webhook(&self, env: &TestEnv, webhook: &str) -> anyhow::Result<()> {
        let api = Api::<MutatingWebhookConfiguration>::all(self.client.clone());
        let mut mwc = api.get(&self.webhook_configuration).await?;
        let before = mwc.webhooks.as_ref().map_or(0, Vec::len);
        mwc.webhooks
            .get_or_insert_with(Vec::new)
            .retain(|w| w.name != webhook);
        anyhow::ensure!(
            mwc.webhooks.as_ref().map_or(0, Vec::len) + 1 == before,
            "no webhook {webhook}"
        );
        api.replace(&self.webhook_configuration, &PostParams::default(), &mwc)
            .await?;
        // The API server reads configurations through an informer: probe until it stops
        // calling the webhook. The injecting one: a dry-run opted-in pod gets no sidecar.
        let pods = env.api::<Pod>();
        if webhook == "inject.byok.dev" {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let created =
                    create_dry_run(env, &opted_in_pod("webhook-gone-", &["none"])).await?;
                if !has_sidecar(&created) {
                    return Ok(());
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the API server still calls {webhook}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
            }
        }
        // The others: a dry-run update that the webhook would refuse (labelling a pod created
        // without the label).
        let probe: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"generateName": "webhook-gone-"},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]}
        }))?;
        let probe = pods.create(&PostParams::default(), &probe).await?;
        let name = probe.metadata.name.clone().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let labelled = pods
                .patch(
                    &name,
                    &kube::api::PatchParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &kube::api::Patch::Merge(serde_json::json!({"metadata": {"labels": {
                        (names::INJECT_LABEL): names::INJECT_VALUE}}})),
                )
                .await;
            if labelled.is_ok() {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the API server still calls {webhook}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
        }
        pods.delete(&name, &DeleteParams::default()).await?;
        Ok(())
    }
}

impl ServingOperator {
    /// Stops the operator and waits until its webhook configuration is gone (an operator
    /// started next for the same namespace creates one by the same name).
    pub async fn stop(self) -> anyhow::Result<()> {
        let (client, name) = (self.client.clone(), self.webhook_configuration.clone());
        drop(self);
        let api = Api::<MutatingWebhookConfiguration>::all(client);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while api.get_opt(&name).await?.is_some() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the webhook configuration {name} stayed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for ServingOperator {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.webhook_configuration.clone());
        // Best effort: the test namespace's selector keeps a leftover harmless.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = Api::<MutatingWebhookConfiguration>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        }
    }
}

/// The CA an operator serving in `env`'s namespace serves with, from its certificate Secret.
pub async fn serving_ca_pem(env: &TestEnv) -> anyhow::Result<String> {
    let secret = env
        .api::<Secret>()
        .get(byok_operator::serving::certs::DEFAULT_SECRET_NAME)
        .await?;
    let ca = secret
        .data
        .and_then(|d| d.get("ca.crt").cloned())
        .context("no ca.crt")?;
    Ok(String::from_utf8(ca.0)?)
}

/// Creates `pod` with a server-side dry run: what the API server (and its webhooks) would
/// admit, nothing stored.
pub async fn create_dry_run(env: &TestEnv, pod: &Pod) -> Result<Pod, kube::Error> {
    env.api::<Pod>()
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            pod,
        )
        .await
}

/// The webhook's path, as the operator keeps it in `secret` of the test namespace.
pub async fn webhook_path(env: &TestEnv, secret: &str) -> anyhow::Result<String> {
    let secret = env.api::<Secret>().get(secret).await?;
    let path = secret
        .data
        .and_then(|d| d.get(webhook_path::SECRET_KEY).cloned())
        .context("no webhook path in the Secret")?;
    Ok(String::from_utf8(path.0)?)
}

/// The paths the webhooks of configuration `name` send to.
pub async fn configured_paths(client: &kube::Client, name: &str) -> anyhow::Result<Vec<String>> {
    let mwc = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(name)
        .await?;
    Ok(webhook_path::carried(&mwc))
}

/// The webhook that refuses `byok.dev` TokenRequests from anyone but nodes.
pub const TOKEN_WEBHOOK: &str = "token.byok.dev";

/// A pod that opts in to injection with these keys, from `generateName`.
pub fn opted_in_pod(generate_name: &str, keys: &[&str]) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": generate_name,
            "labels": {names::INJECT_LABEL: names::INJECT_VALUE},
            "annotations": {names::PROVIDER_KEYS_ANNOTATION: keys.join(",")},
        },
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }))
    .unwrap_or_default()
}

pub fn has_sidecar(pod: &Pod) -> bool {
    sidecars(pod) == 1
}

/// How many injected sidecars the pod has.
pub fn sidecars(pod: &Pod) -> usize {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map_or(0, |c| {
            c.iter()
                .filter(|c| c.name == byok_operator::webhook::patch::SIDECAR_NAME)
                .count()
        })
}

/// A token like the one the kubelet projects into the sidecar: for `service_account`,
/// bound to `pod`, for `audience` (empty: the API server's own audience).
pub async fn pod_token(
    env: &TestEnv,
    service_account: &str,
    pod: &Pod,
    audience: &str,
) -> anyhow::Result<String> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: (!audience.is_empty()).then(|| vec![audience.to_string()]),
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = env
        .api::<ServiceAccount>()
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    issued
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")
}

/// Creates a ServiceAccount in the test namespace.
pub async fn service_account(env: &TestEnv, name: &str) -> anyhow::Result<()> {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    env.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await?;
    Ok(())
}

/// A Ready anthropic ProviderKey `name` holding `key` (accepted by the fake provider), its
/// spec extended with `extra` (e.g. `consumers`).
pub async fn ready_anthropic(
    env: &TestEnv,
    fake: &FakeProvider,
    name: &str,
    key: &str,
    extra: serde_json::Value,
) -> anyhow::Result<byok_operator::crd::ProviderKey> {
    use crate::operator::{create_pk, is_condition, put_secret, wait_pk};
    fake.add_valid_key(byok_operator::providers::ProviderKind::Anthropic, key);
    let source = format!("{name}-raw");
    put_secret(env, &source, &[("api-key", key)]).await?;
    let mut spec = serde_json::json!({"provider": "anthropic", "secretRef": {"name": source}});
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    create_pk(env, name, spec).await?;
    wait_pk(env, name, "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await
}

/// Registers `mwc` (pointed at the operator's webhook by url), creates an opted-in pod asking
/// for `key.0` and fetches that key from the broker with a token bound to the pod; the answer
/// must hold `key.1`, and `other` (a key the pod did not ask for) must be refused. The broker's
/// CA comes from the operator's certificate Secret `tls_secret` (namespace, name). Returns the
/// broker's answer.
pub async fn broker_serves(
    env: &TestEnv,
    mwc: MutatingWebhookConfiguration,
    tls_secret: (&str, &str),
    broker_port: u16,
    key: (&str, &str),
    other: &str,
) -> anyhow::Result<String> {
    let (key_name, expected) = key;
    kube::Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .create(&kube::api::PostParams::default(), &mwc)
        .await?;
    let deadline = std::time::Instant::now() + WAIT;
    let pod = loop {
        match env
            .api::<Pod>()
            .create(
                &kube::api::PostParams::default(),
                &opted_in_pod("served-", &[key_name]),
            )
            .await
        {
            Ok(pod) if has_sidecar(&pod) => break pod,
            Ok(_) | Err(_) => {}
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the API server never got through to the webhook"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await; // polling interval
    };
    let ca = Api::<Secret>::namespaced(env.client.clone(), tls_secret.0)
        .get(tls_secret.1)
        .await?
        .data
        .and_then(|d| d.get("ca.crt").cloned())
        .context("ca.crt")?;
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca.0)?])
        .build()?;
    let token = pod_token(env, "default", &pod, "byok.dev").await?;
    let url = |name: &str| {
        format!(
            "https://127.0.0.1:{broker_port}/v1/keys/{}/{name}",
            env.namespace
        )
    };
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let answer = http.get(url(key_name)).bearer_auth(&token).send().await?;
        if answer.status() == 200 {
            let body = answer.text().await?;
            anyhow::ensure!(body.contains(expected), "the broker served another key");
            let refused = http.get(url(other)).bearer_auth(&token).send().await?;
            anyhow::ensure!(refused.status() == 403, "{}", refused.status());
            return Ok(body);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the broker never served the key: {}",
            answer.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await; // polling interval
    }
}
